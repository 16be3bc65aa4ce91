"""train_ddp.py, objective dpo: LoRA-DPO learns the preference; 1 process == 2 (DDP, FSDP2);
resumed == uninterrupted; precomputed reference == adapter-disabled reference; results load back."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import collate
import common
import export
import data
import dpo
import lora
import pairs
import train_ddp
import trainable
import vlm
from conftest import ROOT


def dpo_args(toy_world, toy_pairs, out, *extra):
    return ["--objective", "dpo", "--model", os.path.join(toy_world, "model-sft"), "--pairs", toy_pairs,
            "--image-folder", os.path.join(toy_world, "images"), "--out", str(out), "--seed", "0",
            "--lora-r", "8", "--lora-alpha", "16", "--lr", "2e-3", "--no-progress", *extra]


def model_of(args):
    """trainable.prepare_model as the run of `args` calls it on a CPU: (model, processor)."""
    return trainable.prepare_model(args.model, torch.device("cpu"), None, args.objective, args.lora_r, args.lora_alpha,
                                   args.lora_dropout, args.train_projector, args.parallel, args.gradient_checkpointing)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def assert_same_adapter(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol)


def test_pair_labels_cover_only_the_answers(toy_world):
    _, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    image = vlm.load_image(os.path.join(toy_world, "images", "val", "000000.png"))
    pair = collate.encode_pair(processor, image, "What color is the star?", "red", "deep blue", "llava_v1")
    decode = lambda e: processor.tokenizer.decode(e["input_ids"][e["labels"] != -100])
    assert decode(pair["chosen"]) == " red</s>" and decode(pair["rejected"]) == " deep blue</s>"
    # same prompt and image tokens in both: they differ only after the prompt
    n = int((pair["chosen"]["labels"] == -100).sum())
    assert torch.equal(pair["chosen"]["input_ids"][:n], pair["rejected"]["input_ids"][:n])
    assert torch.equal(pair["chosen"]["pixel_values"], pair["rejected"]["pixel_values"])


def test_a_pairs_image_is_processed_once(toy_world):
    """encode_pair calls the processor (which processes the image) once per pair, whatever its number of rejected
    answers, and gives the examples, and the batch, that encoding each answer alone gives."""
    _, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    calls = []

    class Counting:  # the processor, counting its calls
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, *args, **kwargs):
            calls.append(kwargs.get("images"))
            return processor(*args, **kwargs)

    question = "What color is the star?"
    pairs_now, pairs_before = [], []
    for index, rejected in enumerate(["deep blue", ["deep blue", "green", "a red square"]]):
        image = vlm.load_image(os.path.join(toy_world, "images", "val", f"00000{index}.png"))
        calls.clear()
        pair = collate.encode_pair(Counting(), image, question, "red", rejected, "llava_v1")
        assert len(calls) == 1
        alone = lambda answer: vlm.encode(processor, image, [(question, answer)], "llava_v1")  # as before
        before = {"chosen": alone("red"), "rejected": [alone(r) for r in rejected] if isinstance(rejected, list)
                  else alone(rejected)}
        for got, want in zip([pair["chosen"], *pairs.rejected_list(pair["rejected"])],
                             [before["chosen"], *pairs.rejected_list(before["rejected"])]):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        pairs_now.append(pair)
        pairs_before.append(before)
    pad = processor.tokenizer.pad_token_id
    batch, batch_before = collate.collate_pairs(pairs_now, pad), collate.collate_pairs(pairs_before, pad)
    assert batch.keys() == batch_before.keys() and all(torch.equal(batch[k], batch_before[k]) for k in batch)


def test_dpo_learns_the_preference(toy_world, toy_pairs, tmp_path):
    """Two dozen steps on 8 right-way-round pairs: reward accuracy above 0.5 and a positive margin."""
    few = tmp_path / "pairs.jsonl"
    few.write_text("".join(open(toy_pairs).readlines()[:8]))
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, str(few), tmp_path, "--batch-size", "8",
                                                  "--max-steps", "24", "--cache-data", "--lr", "1e-2")))
    rows = metrics(tmp_path)
    assert len(rows) == 24
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: policy == reference
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert rows[-1]["rewards/accuracies"] > 0.5
    assert rows[-1]["rewards/margins"] > 0.05
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.02
    with open(os.path.join(tmp_path, "adapter", "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert all(k.startswith("base_model.model.") for k in adapter(tmp_path))


def test_merged_model_loads_like_any_hf_model(toy_world, toy_pairs, tmp_path):
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path, "--batch-size", "4",
                                                  "--max-steps", "3", "--merge", "--lr", "1e-2")))
    merged, processor = vlm.load(os.path.join(tmp_path, "merged"))
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    base, _ = vlm.load(os.path.join(toy_world, "model-sft"))
    lora.load_lora(base, os.path.join(tmp_path, "adapter"))  # the adapter on a fresh copy of the base model
    batch = data.TrainDataset(common.read_records(toy_pairs)[:2], "dpo", os.path.join(toy_world, "images"),
                                   processor, "llava_v1", 2048)
    inputs = {k: v for k, v in batch.collate([batch[0], batch[1]]).items() if k != "labels"}
    with torch.no_grad():
        merged_logits, adapter_logits = merged(**inputs).logits, base(**inputs).logits
        with lora.disable_adapter(base):
            base_logits = base(**inputs).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # training changed something


def test_prefetching_changes_no_number(toy_world, toy_pairs, tmp_path):
    """The next step's examples prepared in a background thread (--prefetch, the default) are those the training
    thread prepares itself (--no-prefetch): every metric and every adapter weight bit for bit, here with
    micro-batches cut to a token budget (~800 packed tokens a step: 2 micro-batches or more) on the training thread
    (test_train_sft.py: micro-batches collated in the thread)."""
    flags = ("--batch-size", "4", "--max-steps", "4", "--max-tokens-per-batch", "600", "--group-by-length")
    for name, prefetch in (("on", "--prefetch"), ("off", "--no-prefetch")):
        train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / name, *flags, prefetch)))
    timing = ("tokens_per_s", "data_s")
    on, off = metrics(tmp_path / "on"), metrics(tmp_path / "off")
    assert len(on) == len(off) == 4 and all(row["data_s"] >= 0 for row in on + off)
    assert [{k: v for k, v in row.items() if k not in timing} for row in on] == \
        [{k: v for k, v in row.items() if k not in timing} for row in off]
    a, b = adapter(tmp_path / "on"), adapter(tmp_path / "off")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_precomputed_reference_equals_adapter_reference(toy_world, toy_pairs, tmp_path):
    flags = ("--batch-size", "4", "--max-steps", "4")
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "adapter", *flags)))
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "pre", *flags,
                                                  "--reference", "precomputed")))
    assert list(os.path.dirname(toy_pairs) and [f for f in os.listdir(os.path.dirname(toy_pairs))
                                                if f.startswith("true-pairs.reference-")])
    for a, b in zip(metrics(tmp_path / "adapter"), metrics(tmp_path / "pre")):
        for key in ("loss", "logps/ref_chosen", "logps/ref_rejected", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert_same_adapter(adapter(tmp_path / "adapter"), adapter(tmp_path / "pre"))


@pytest.mark.parametrize("cpu_bf16", [False, True], ids=["fp32", "bf16"])
def test_resumed_equals_uninterrupted(toy_world, toy_pairs, tmp_path, monkeypatch, cpu_bf16):
    """bf16: the GPU's precision path (a bf16 base, fp32 LoRA, bf16 autocast) forced on the CPU, its sharded
    checkpoint resumed bit for bit as fp32's is."""
    if cpu_bf16:
        monkeypatch.setenv(common.CPU_BF16, "1")
    flags = ("--batch-size", "4", "--max-steps", "6", "--save-every", "2")
    model = train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "straight", *flags)))
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" not in n} == {
        torch.bfloat16 if cpu_bf16 else torch.float32}  # the frozen base as the precision path keeps it

    save = checkpoint.save_checkpoint
    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        if args[3] == 4:  # the step: crash right after the second checkpoint
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "crashed", *flags)))
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert open(tmp_path / "crashed" / "latest").read() == "checkpoint-000004"
    assert os.path.exists(tmp_path / "crashed" / "checkpoint-000002")  # the last two are kept (--keep 2)
    with pytest.raises(ValueError, match="other lr"):  # a resume must keep what decides the run
        train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "crashed", *flags,
                                                      "--resume", "--lr", "1e-3")))
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "crashed", *flags, "--resume")))
    assert_same_adapter(adapter(tmp_path / "straight"), adapter(tmp_path / "crashed"), rtol=0, atol=0)
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "crashed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]


def test_non_finite_loss_stops_and_keeps_the_checkpoint(toy_world, toy_pairs, tmp_path, monkeypatch):
    loss, calls = dpo.dpo_loss, []
    def poisoned(*args, **kwargs):
        calls.append(1)
        losses, chosen, rejected = loss(*args, **kwargs)
        return (losses * float("nan") if len(calls) > 2 else losses), chosen, rejected
    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path, "--batch-size", "4",
                                                      "--max-steps", "5", "--save-every", "1")))
    latest = checkpoint.latest_checkpoint(str(tmp_path))
    assert latest.endswith("checkpoint-000002")
    assert json.load(open(os.path.join(latest, "state.json")))["step"] == 2
    assert checkpoint.checkpoint_problem(latest) is None


@pytest.mark.parametrize("fixed_image_tokens", [True, False])
@pytest.mark.parametrize("long", [0, 1])
def test_too_long_pairs_are_skipped_not_truncated(toy_world, toy_pairs, long, fixed_image_tokens):
    _, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    records = common.read_records(toy_pairs)[:4]
    records[long] = dict(records[long], chosen=" ".join(["red"] * 300))  # the first one too: it is measured
    dataset = data.TrainDataset(records, "dpo", os.path.join(toy_world, "images"), processor, "llava_v1", 400,
                                     fixed_image_tokens=fixed_image_tokens)  # False: each image measured
    assert dataset.skipped == [records[long]["id"]] and len(dataset) == 3
    for i in range(len(dataset)):  # the length check agrees with the real encoding
        assert len(dataset[i]["chosen"]["input_ids"]) <= 400


def run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(toy_world, toy_pairs, tmp_path, parallel):
    """Global batch 8: 1 process x 4 x accumulation 2 against 2 processes x 2 x accumulation 2. The 2 processes'
    checkpoint of step 2 is sharded: under FSDP2 each rank wrote half of every trained tensor, and resumed from it
    they train the same adapter bit for bit."""
    # --merge: FSDP2's ranks hold shards of LoRA; the merged folder (bf16 there) is the one process's
    merge_dtype = {"ddp": "float32", "fsdp": "bfloat16"}[parallel]
    steps = ("--max-steps", "3", "--global-batch", "8", "--grad-accum", "2", "--merge", "--merge-dtype", merge_dtype)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py"]
    two = dpo_args(toy_world, toy_pairs, tmp_path / "two", "--batch-size", "2", "--parallel", parallel, *steps,
                   "--save-every", "2")
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, toy_pairs, tmp_path / "one", "--batch-size", "4", *steps)])
    run(torchrun + two)
    one, straight = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)  # training moved B off zero
    assert_same_adapter(one, straight)
    merged_one, merged_two = [load_file(str(tmp_path / n / "merged" / "model.safetensors")) for n in ("one", "two")]
    dtypes = {v.dtype for v in merged_one.values()}, {v.dtype for v in merged_two.values()}
    assert dtypes[0] == dtypes[1] == {getattr(torch, merge_dtype)}
    # bf16: the adapters' 1e-4 difference may move a merged value across a rounding boundary, one step of 2^-7 at most
    assert_same_adapter(merged_one, merged_two, rtol=1e-4 if parallel == "ddp" else 2 ** -7, atol=1e-6)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # margins are beta x differences of log-prob sums: a caption's sum (~-100) in fp32 carries ~1e-5 of
        # rounding that depends on the batch split, so ~1e-6 on the margin
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)
    saved = str(tmp_path / "two" / "checkpoint-000002")
    index = checkpoint.SafeReader(saved).read_metadata()
    files = {i: index.storage_data[i].relative_path for i in index.storage_data}
    lora_weights = [k for k in index.state_dict_metadata if k.startswith("model.") and ".lora_" in k]
    assert len(lora_weights) == len([k for k in one if ".lora_" in k])
    for name in lora_weights:  # where each tensor's chunks are, and in which rank's file
        chunks = sorted((i.offset[0], files[i]) for i in files if i.fqn == name)
        rows = index.state_dict_metadata[name].size[0]
        assert chunks == ([(0, "__0_0.distcp"), ((rows + 1) // 2, "__1_0.distcp")] if parallel == "fsdp" else
                          [(0, chunks[0][1])]), name  # DDP: one copy, written by one of the ranks
    if parallel == "fsdp":  # resumed from the sharded checkpoint: the same run, bit for bit
        losses = [r["loss"] for r in metrics(tmp_path / "two")]
        assert f"resumed from {saved} at step 2" in run(torchrun + two + ["--resume"])
        assert_same_adapter(straight, adapter(tmp_path / "two"), rtol=0, atol=0)
        assert [r["loss"] for r in metrics(tmp_path / "two")] == losses


def test_only_lora_is_trained_unless_the_projector_is_asked_for(toy_world, toy_pairs, tmp_path):
    args = train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path))
    model, _ = model_of(args)
    trainable = checkpoint.trainable_names(model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all("language_model" in n for n in trainable)  # never the vision tower or the projector
    args.train_projector = True
    model, _ = model_of(args)
    extra = [n for n in checkpoint.trainable_names(model) if ".lora_" not in n]
    assert extra and all(n.startswith("model.multi_modal_projector.") for n in extra)
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "run", "--batch-size", "4",
                                                  "--max-steps", "2", "--train-projector", "--merge",
                                                  "--merge-dtype", "bfloat16")))
    saved = load_file(os.path.join(tmp_path, "run", "adapter", "non_lora_trainables.safetensors"))
    assert sorted(saved) == sorted(extra)
    merged = vlm.load(os.path.join(tmp_path, "run", "merged"), dtype=torch.bfloat16)[0].state_dict()
    base = vlm.load(args.model)[0].state_dict()
    for name in extra:  # the trained projector in the merged model, cast once
        assert torch.equal(merged[name], saved[name].bfloat16()) and not torch.equal(saved[name], base[name]), name


def test_gradient_checkpointing_changes_nothing_but_memory(toy_world, toy_pairs, tmp_path):
    args = train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path, "--gradient-checkpointing"))
    model, _ = model_of(args)
    assert model.is_activation_checkpointing
    flags = ("--batch-size", "4", "--max-steps", "2")
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "plain", *flags)))
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "ckpt", *flags,
                                                  "--gradient-checkpointing")))
    assert_same_adapter(adapter(tmp_path / "plain"), adapter(tmp_path / "ckpt"), rtol=1e-5, atol=1e-7)


def test_lora_over_a_bf16_base_trains_in_fp32_and_merges_into_the_weights_as_loaded(toy_world, toy_pairs, tmp_path):
    """On a GPU with bf16 autocast and DDP the frozen base is stored in bf16 (trainable.prepare_model); here the
    same model on the CPU's bf16 autocast. LoRA keeps fp32 weights and gradients, scores as the fp32-base model
    does to bf16's precision, and --merge folds it into the fp32 weights from disk, not their bf16 copies."""
    args = train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path, "--merge"))
    full, processor = model_of(args)  # fp32 on a CPU
    low, _ = vlm.load(args.model, dtype=torch.bfloat16)
    lora.apply_lora(low, args.lora_r, args.lora_alpha)
    vlm.freeze_vision(low)
    torch.manual_seed(0)
    for _, module in lora.lora_modules(full):
        torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    low.load_state_dict({k: v for k, v in full.state_dict().items() if ".lora_" in k}, strict=False)
    assert all(p.dtype == torch.float32 for n, p in low.named_parameters() if ".lora_" in n)
    dataset = data.TrainDataset(common.read_records(toy_pairs)[:4], "dpo", args.image_folder, processor,
                                     "llava_v1", args.max_length)
    batch = dataset.collate([dataset[i] for i in range(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dpo.concatenated_forward(low, batch)
        want = dpo.concatenated_forward(full, batch)
        got[0].sum().backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.5)
    grads = [p.grad for n, p in low.named_parameters() if ".lora_" in n]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

    # --merge from the bf16 base: each merged weight is the base as stored (fp32 here) + scale B A in fp32, cast once
    # to the dtype asked; computed here independently, from the fp32 model and the formula
    scales = {name: module.scale for name, module in lora.lora_modules(full)}
    lora_weights = {k: v for k, v in full.state_dict().items() if ".lora_" in k}
    base_weights = {k.replace(".base.", "."): v for k, v in full.state_dict().items() if ".lora_" not in k}
    for asked in ("float32", "bfloat16"):
        export.export(low, low, processor, str(tmp_path / asked), 0, args.model, args.lora_r, True, False, None,
                          merge_dtype=asked)
        merged_dir = tmp_path / asked / "merged"
        assert json.load(open(merged_dir / "config.json"))["dtype"] == asked
        assert {v.dtype for v in load_file(str(merged_dir / "model.safetensors")).values()} == {getattr(torch, asked)}
        merged = vlm.load(str(merged_dir), dtype=getattr(torch, asked))[0].state_dict()
        changed = 0
        for key, value in merged.items():
            module = key.removesuffix(".weight")
            want = base_weights[key].float()
            if module in scales:
                update = lora_weights[f"{module}.lora_B.weight"] @ lora_weights[f"{module}.lora_A.weight"]
                want = want + scales[module] * update
                changed += 1
            assert torch.equal(value, want.to(getattr(torch, asked))), key
        assert changed == len(scales)
    with torch.no_grad():  # the merged fp32 model is the LoRA model, merged in memory
        reference = lora.remove_lora(full).state_dict()
    for key, value in vlm.load(str(tmp_path / "float32" / "merged"))[0].state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_merge_names_the_update_a_cast_rounds_away():
    """lora.merged_weight on hand-worked values: an update of 1e-4 on weights of 1 is below bf16's resolution
    (1 + 1e-4 rounds to 1: 2^-7 apart there) and vanishes whole, a warning says so; 0.5 is exact in bf16; fp32
    keeps 1e-4 to ~6e-8 / 1e-4."""
    weight = torch.ones(4, 8)
    small, large = torch.full((4, 8), 1e-4), torch.full((4, 8), 0.5)
    small[0] = 0  # elements the update leaves alone are not counted
    merged, stats = lora.merged_weight(weight, small, torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, weight.bfloat16())
    assert stats[:2].tolist() == [24, 24]  # 24 elements updated, all 24 rounded away
    line = lora.rounding_line(stats, torch.bfloat16)
    assert line.startswith("warning: merged in bfloat16: 100.0% of the updated weights")
    assert "100.0% of the update's norm is lost" in line
    merged, stats = lora.merged_weight(weight, large, torch.bfloat16)
    assert torch.equal(merged, torch.full((4, 8), 1.5, dtype=torch.bfloat16)) and stats[1] == 0 and stats[3] == 0
    assert lora.rounding_line(stats, torch.bfloat16).startswith("merged in bfloat16: 0.0%")
    merged, stats = lora.merged_weight(weight, small, torch.float32)
    assert stats[1] == 0 and not lora.rounding_line(stats, torch.float32).startswith("warning")
    # summed over layers: the line reads the totals
    both = lora.merged_weight(weight, small, torch.bfloat16)[1] + lora.merged_weight(weight, large, torch.bfloat16)[1]
    assert lora.rounding_line(both, torch.bfloat16).startswith("merged in bfloat16: 42.9%")  # 24 of 56
