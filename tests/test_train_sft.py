"""train_ddp.py, objective sft: the loss goes down, and 2 DDP processes train the same weights as 1."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import train_ddp
import vlm
from conftest import ROOT


def sft_args(toy_world, out, *extra):
    return ["--objective", "sft", "--model", os.path.join(toy_world, "model-init"),
            "--data", os.path.join(toy_world, "sft.json"), "--image-folder", os.path.join(toy_world, "images"),
            "--out", out, "--seed", "0", "--lr", "3e-3", "--no-progress", *extra]


def batch_loss(model, processor, toy_world, n=16):
    records = common.read_records(os.path.join(toy_world, "sft.json"))[:n]
    dataset = data.TrainDataset(records, "sft", os.path.join(toy_world, "images"), processor, "llava_v1", 2048)
    batch = dataset.collate([dataset[i] for i in range(n)])
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss, _ = train_ddp.sft_micro_step(model, batch)
    return loss.item() / tokens


def test_a_few_sft_steps_lower_the_loss(toy_world, tmp_path):
    before, processor = vlm.load(os.path.join(toy_world, "model-init"))
    after = train_ddp.train(train_ddp.parse_args(sft_args(toy_world, str(tmp_path), "--batch-size", "8",
                                                          "--max-steps", "8")))
    assert batch_loss(after, processor, toy_world) < batch_loss(before, processor, toy_world) - 0.5
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert os.path.exists(tmp_path / "model" / "model.safetensors")


def test_prefetching_changes_no_number_with_dropout(toy_world, tmp_path):
    """SFT with LoRA dropout draws random numbers on the training thread every step; the background thread that
    prepares the next step's batches (--prefetch) draws none, so the run is the one without it, bit for bit."""
    flags = ("--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.1", "--batch-size", "4", "--max-steps", "4")
    runs = {}
    for flag in ("--prefetch", "--no-prefetch"):
        train_ddp.train(train_ddp.parse_args(sft_args(toy_world, str(tmp_path / flag), *flags, flag)))
        rows = [json.loads(line) for line in open(tmp_path / flag / "metrics.jsonl")]
        runs[flag] = ([{k: v for k, v in row.items() if k not in ("tokens_per_s", "data_s")} for row in rows],
                      load_file(str(tmp_path / flag / "adapter" / "adapter_model.safetensors")))
    (rows, weights), (rows_off, weights_off) = runs["--prefetch"], runs["--no-prefetch"]
    assert len(rows) == 4 and rows == rows_off
    assert weights.keys() == weights_off.keys() and all(torch.equal(weights[k], weights_off[k]) for k in weights)


def test_labels_cover_only_answers(toy_world):
    _, processor = vlm.load(os.path.join(toy_world, "model-init"))
    record = common.read_records(os.path.join(toy_world, "sft.json"))[0]
    dataset = data.TrainDataset([record], "sft", os.path.join(toy_world, "images"), processor, "llava_v1", 2048)
    example = dataset[0]
    trained = processor.tokenizer.decode(example["labels"][example["labels"] != -100])
    eos = processor.tokenizer.eos_token
    assert trained == "".join(f" {a}{eos}" for _, a in data.sft_turns(record))


def test_global_batch_is_checked(toy_world, tmp_path):
    with pytest.raises(ValueError, match="global-batch"):
        train_ddp.train(train_ddp.parse_args(sft_args(toy_world, str(tmp_path), "--batch-size", "4",
                                                      "--global-batch", "8", "--max-steps", "1")))


def test_fp16_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        common.compute_dtype(torch.device("cpu"), "fp16")


def run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_two_processes_equal_one(toy_world, tmp_path):
    """Global batch 8 as 1 process x 4 x accumulation 2, and as 2 processes x 2 x accumulation 2."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([sys.executable, "train_ddp.py", *sft_args(toy_world, one, "--batch-size", "4", "--grad-accum", "2",
                                                    "--max-steps", "3", "--global-batch", "8")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py",
         *sft_args(toy_world, two, "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3",
                   "--global-batch", "8")])
    weights_one = load_file(os.path.join(one, "model", "model.safetensors"))
    weights_two = load_file(os.path.join(two, "model", "model.safetensors"))
    start = load_file(os.path.join(toy_world, "model-init", "model.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    moved = 0
    for key in weights_one:
        torch.testing.assert_close(weights_one[key], weights_two[key], rtol=1e-4, atol=1e-5)
        moved += not torch.equal(weights_one[key], start[key])
    assert moved > 10  # training changed the weights, so the equality means something
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl"))] for d in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
