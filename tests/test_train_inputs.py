"""What train_ddp.py refuses, skips and keys by: a resume that cannot be exact is refused in one line, bad records
are named, skipped and counted before the first step, the reference log-probs belong to a pair's content, the
images are padded as seva.py padded them, dropout is off for DPO everywhere, and checkpoints gather only the
trainable weights. Eval stops before answering when an image is missing."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import common
import data
import export
import train_ddp
import trainable
import vlm
from conftest import ROOT
from eval import pope, runner
from test_train_dpo import dpo_args, model_of


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def crash_after_first_checkpoint(toy_world, toy_pairs, out, monkeypatch, *flags):
    save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after its first checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, out, *flags)))
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


# ----------------------------------------------------------------------------- which examples each step sees
def test_grouping_by_length_keeps_each_epoch_a_permutation_and_pads_less():
    lengths = torch.randint(20, 200, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    batch, steps = 8, 1000 // 8

    def epoch(grouped, epoch=0, seed=3):
        return [data.step_indices(epoch * steps + k, 1000, batch, seed, lengths if grouped else None)
                for k in range(steps)]
    plain, grouped = epoch(False), epoch(True)
    assert sorted(i for b in grouped for i in b) == list(range(1000))  # every example once an epoch
    assert grouped == epoch(True) and grouped != epoch(True, epoch=1)  # a function of (step, seed) alone
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded(grouped) < 0.8 * padded(plain)  # a batch holds examples of similar length
    # groups of data.GROUP batches: no batch mixes examples of two groups of the same epoch's permutation
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(3)).tolist()
    group_of = {i: k // (data.GROUP * batch) for k, i in enumerate(order)}
    assert all(len({group_of[i] for i in b}) == 1 for b in grouped)


# ----------------------------------------------------------------------------- exact resume
def test_resume_under_another_number_of_processes_is_refused_in_one_line(toy_world, toy_pairs, tmp_path,
                                                                        monkeypatch):
    flags = ("--batch-size", "2", "--max-steps", "4", "--save-every", "2")
    crash_after_first_checkpoint(toy_world, toy_pairs, tmp_path, monkeypatch, *flags)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_ddp.py", *dpo_args(toy_world, toy_pairs, tmp_path, *flags, "--resume")],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("train_ddp.py: error: ")]
    assert result.returncode != 0 and errors, output[-3000:]
    assert all("number of processes (1 in the checkpoint, 2 now)" in line for line in errors)
    assert "FileNotFoundError" not in output and 'train_ddp.py", line' not in output  # no traceback of ours
    assert json.load(open(tmp_path / "checkpoint-000002" / "state.json"))["step"] == 2  # the checkpoint is intact


def test_resume_names_every_difference(toy_world, toy_pairs, tmp_path, monkeypatch):
    flags = ("--batch-size", "4", "--max-steps", "4", "--save-every", "2")
    crash_after_first_checkpoint(toy_world, toy_pairs, tmp_path, monkeypatch, *flags)
    args = train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path, *flags, "--resume", "--beta", "0.2",
                                         "--weight-decay", "0.1", "--reference", "precomputed"))
    with pytest.raises(ValueError) as refused:
        train_ddp.train(args)
    for name in ("beta (0.1 in the checkpoint, 0.2 now)", "weight_decay", "reference"):
        assert name in str(refused.value)
    assert not any(name.startswith("pairs.reference-") for name in os.listdir(os.path.dirname(toy_pairs)))  # no work
    changed = tmp_path / "changed.jsonl"  # the same pairs file name's content changed
    rows = common.read_jsonl(toy_pairs)
    changed.write_text("".join(json.dumps(dict(r, rejected=r["rejected"] + "!")) + "\n" for r in rows))
    with pytest.raises(ValueError, match="the data's content"):
        train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, str(changed), tmp_path, *flags, "--resume")))


# ----------------------------------------------------------------------------- bad input
def test_bad_pairs_are_named_skipped_and_counted_before_the_first_step(toy_world, toy_pairs, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(os.path.join(toy_world, "images"), images)
    (images / "corrupt.png").write_bytes(b"not a png")
    good = common.read_jsonl(toy_pairs)[:8]
    bad = [dict(good[0], id="gone", image="missing.png"), dict(good[0], id="broken", image="corrupt.png"),
           {k: v for k, v in good[1].items() if k != "rejected"} | dict(id="no-rejected"),
           dict(good[2], id="long", question="What " * 3000 + "?"), ["not", "a", "record"]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in good[:4] + bad + good[4:]))
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, str(pairs), tmp_path / "out", "--image-folder",
                                                  str(images), "--batch-size", "4", "--max-steps", "1")))
    printed = capsys.readouterr().out
    for line, name, words in [(5, "gone", "missing.png"), (6, "broken", "corrupt.png"),
                              (7, "no-rejected", "missing key(s): rejected"), (8, "long", "--max-length 2048"),
                              (9, "#9", "not a json object")]:
        assert any(f"{pairs}: line {line}, record {name}: " in p and words in p for p in printed.splitlines()), name
    expected = {"longer than --max-length": 1, "malformed record": 2, "missing or corrupt image": 2}
    assert json.load(open(tmp_path / "out" / "args.json"))["skipped"] == expected
    assert "8 examples (skipped: 1 longer than --max-length, 2 malformed record, 2 missing or corrupt image)" in printed


def test_a_torn_pairs_file_is_one_line_naming_file_and_line(toy_world, toy_pairs, tmp_path):
    torn = tmp_path / "torn.jsonl"
    torn.write_text(open(toy_pairs).read()[:-40])  # a kill in the middle of the last line
    lines = torn.read_text().count("\n") + 1
    result = subprocess.run([sys.executable, "train_ddp.py", *dpo_args(toy_world, str(torn), tmp_path / "out")],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"train_ddp.py: error: {torn}:{lines}: malformed json")


def test_eval_stops_before_answering_when_an_image_is_missing(toy_world, tmp_path, monkeypatch):
    rows = common.read_jsonl(os.path.join(toy_world, "pope", "random.jsonl"))[:4]
    rows[2] = dict(rows[2], image="nowhere.png")
    path = tmp_path / "random.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(runner, "answer_chunk", lambda *a, **k: pytest.fail("answered"))
    model, processor = runner.load_model(os.path.join(toy_world, "model-sft"))
    with pytest.raises(ValueError, match=f"1 of 4 questions have no image \\(question {rows[2]['question_id']}: "
                                         f".*nowhere.png"):
        pope.evaluate(model, processor, "m", str(tmp_path), os.path.join(toy_world, "images"), str(tmp_path / "o"),
                      ["random"], weights="w")
    path.write_text(path.read_text() + '{"question_id": 9, "im')  # a torn line: named by file and line
    with pytest.raises(ValueError, match="random.jsonl:5: malformed json line"):
        pope.read_pope(str(path))


# ----------------------------------------------------------------------------- what training keys by
def test_reference_log_probs_belong_to_a_pairs_content(toy_world, toy_pairs, tmp_path):
    _, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    args = train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path))
    model, _ = model_of(args)
    first = common.read_jsonl(toy_pairs)[0]
    twins = [first, dict(first, chosen=first["rejected"], rejected=first["chosen"])]  # one id, two contents
    pairs = tmp_path / "twins.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in twins))
    dataset = data.TrainDataset(common.read_jsonl(str(pairs)), "dpo", os.path.join(toy_world, "images"), processor,
                                "llava_v1", 2048)
    path = data.reference_path(str(pairs), args.model, os.path.join(toy_world, "images"), True, "llava_v1", "fp32",
                               2048, "shared_prefix")
    data.precompute_reference(model, dataset, path, trainable.pair_forward_for(model, "shared_prefix"), 2, 0, 1,
                              torch.device("cpu"), None)
    a, b = dataset.records
    assert a["reference_chosen_logps"] == pytest.approx(b["reference_rejected_logps"], abs=1e-5)  # swapped twins
    assert a["reference_chosen_logps"] != pytest.approx(a["reference_rejected_logps"], abs=1e-3)
    key = lambda **changed: data.reference_path(**{**dict(
        pairs_path=str(pairs), model_path=args.model, image_folder=os.path.join(toy_world, "images"), pad=True,
        template="llava_v1", precision="fp32", max_length=2048, pair_forward="shared_prefix"), **changed})
    assert len({key(), key(image_folder=str(tmp_path)), key(pad=False), key(template="chat")}) == 4


def test_training_pads_images_as_the_pairs_were_made(toy_world, toy_pairs, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    shutil.copy(toy_pairs, pairs)
    assert data.pairs_padding(str(pairs), default=True) is True  # no sidecar: the family's padding
    (tmp_path / "pairs.jsonl.args.json").write_text(json.dumps({"args": {"pad": False}}))
    assert data.pairs_padding(str(pairs), default=True) is False
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, str(pairs), tmp_path / "out", "--batch-size", "4",
                                                  "--max-steps", "1")))
    assert json.load(open(tmp_path / "out" / "args.json"))["pad"] is False


def test_dpo_turns_off_the_dropout_the_config_holds(toy_world, tmp_path):
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    model.config.text_config.attention_dropout = 0.5  # read by the attention at every call, no nn.Dropout
    model.config.vision_config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image = vlm.load_image(os.path.join(toy_world, "images", "val", "000000.png"))
    inputs = processor(images=[image], text=[vlm.prompt_text(processor, "How many objects are there?", "llava_v1")],
                       return_tensors="pt")

    def two_forwards(objective):
        model, _ = trainable.prepare_model(str(tmp_path / "model"), torch.device("cpu"), None, objective, 4, 8)
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            return model(**inputs).logits, model(**inputs).logits
    first, second = two_forwards("sft")
    assert not torch.equal(first, second)  # the config's dropout is real: SFT keeps it
    first, second = two_forwards("dpo")
    assert torch.equal(first, second)


def test_checkpoints_and_export_hold_only_the_trainable_weights(toy_world, toy_pairs, tmp_path, monkeypatch):
    calls = []
    real = export.get_model_state_dict

    def spy(model, options=None, **kwargs):
        state = real(model, options=options, **kwargs)
        calls.append((options.ignore_frozen_params, set(state)))
        return state
    monkeypatch.setattr(export, "get_model_state_dict", spy)
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path, "--batch-size", "4", "--max-steps",
                                                  "2", "--save-every", "1", "--train-projector")))
    assert len(calls) == 1  # the export gathers; the checkpoint at step 1 writes each rank's own part
    model, _ = model_of(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path, "--train-projector")))
    trainable = set(checkpoint.trainable_names(model))
    assert all(ignore and keys == trainable for ignore, keys in calls)
    index = checkpoint.SafeReader(str(tmp_path / "checkpoint-000001")).read_metadata().state_dict_metadata
    assert {k.removeprefix("model.") for k in index if k.startswith("model.")} == trainable
    assert {k.removeprefix("optimizer.state.").rsplit(".", 1)[0] for k in index
            if k.startswith("optimizer.state.")} == trainable  # AdamW's state of those alone


def test_a_shard_rank_0_cannot_see_stops_the_save_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.save_checkpoint(model, optimizer, scheduler, 1, str(tmp_path), {}, 0, 1)
    real = checkpoint.dcp.save

    def on_another_node(state, storage_writer, **kwargs):  # the shard lands where rank 0 cannot see it
        written = real(state, storage_writer=storage_writer, **kwargs)
        os.remove(os.path.join(str(storage_writer.path), "__0_0.distcp"))
        return written
    monkeypatch.setattr(checkpoint.dcp, "save", on_another_node)
    with pytest.raises(OSError, match="not seen by rank 0: --out must be on a filesystem every node shares"):
        checkpoint.save_checkpoint(model, optimizer, scheduler, 2, str(tmp_path), {}, 0, 1)
    assert checkpoint.checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-000001")]  # never renamed
    assert checkpoint.checkpoint_problem(str(tmp_path / "checkpoint-000001")) is None
    assert checkpoint.good_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000001")
