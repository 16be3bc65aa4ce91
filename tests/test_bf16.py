"""The precision path a GPU runs (--precision bf16), on the CPU's bf16 autocast (SEVA_CPU_BF16=1): the reference
(adapter disabled) is the policy at step 1 bit for bit, so the first step's loss is log 2 and its rewards 0 exactly;
and no scoring forward builds a KV cache."""
import math
import os
import sys

import pytest
import torch

import common
import data
import dpo
import lora
import train_ddp
import vlm
from test_train_dpo import adapter, dpo_args, metrics, run

LOG2 = float(torch.tensor(math.log(2), dtype=torch.float32))  # -log sigmoid(0) in fp32, as dpo_loss computes it


@pytest.fixture
def cpu_bf16(monkeypatch):
    monkeypatch.setenv(common.CPU_BF16, "1")


def test_compute_dtype_runs_bf16_on_a_cpu_only_when_asked(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(common.CPU_BF16, raising=False)
    assert common.compute_dtype(cpu, "bf16") is None and common.compute_dtype(cpu, "fp32") is None
    monkeypatch.setenv(common.CPU_BF16, "1")
    assert common.compute_dtype(cpu, "bf16") == torch.bfloat16 and common.compute_dtype(cpu, "fp32") is None
    with pytest.raises(ValueError, match="fp16"):
        common.compute_dtype(cpu, "fp16")


# ----------------------------------------------------------------------------- the adapter switched off
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("autocast", [True, False])
def test_disabled_adapter_returns_the_enabled_one_with_B_zero(base_dtype, autocast):
    """Bit for bit and in the same dtype: downstream of the first LoRA layer both passes run the same arithmetic."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(16, 8).to(base_dtype), r=4, alpha=8)  # B = 0
    x = torch.randn(3, 5, 16, dtype=base_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        enabled = layer(x)
        layer.disabled = True
        disabled = layer(x)
    assert enabled.dtype == disabled.dtype == (torch.float32 if autocast else base_dtype)
    assert torch.equal(enabled, disabled)


# ----------------------------------------------------------------------------- step 1 under bf16, DDP
@pytest.mark.parametrize("pair_forward", ["shared_prefix", "concatenated"])
def test_first_step_is_exact_under_bf16(toy_world, toy_pairs, tmp_path, cpu_bf16, pair_forward):
    """1 process (DDP's path: bf16 base, fp32 LoRA), bf16 autocast, gradient checkpointing as the paper runs: the
    reference, the policy's forward, the loss and the first step. Before the fix the loss was 0.69338, not log 2."""
    model = train_ddp.train(train_ddp.parse_args(dpo_args(
        toy_world, toy_pairs, tmp_path, "--batch-size", "4", "--max-steps", "2", "--gradient-checkpointing",
        "--pair-forward", pair_forward, "--lr", "1e-2")))
    dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" not in n}
    assert dtypes == {torch.bfloat16}  # the frozen base as a GPU stores it
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.float32}
    first, second = metrics(tmp_path)
    assert first["loss"] == LOG2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == 0.0, key
    assert first["logps/chosen"] == first["logps/ref_chosen"] and first["grad_norm"] > 0
    assert second["loss"] != LOG2 and second["rewards/margins"] != 0.0  # the step moved the policy


# ----------------------------------------------------------------------------- no KV cache in scoring
def language_model(model):
    return vlm.unwrap(model).model.language_model


@pytest.mark.parametrize("name", list(dpo.PAIR_FORWARDS))
def test_no_scoring_forward_builds_a_cache(toy_world, toy_pairs, name):
    """Every pair forward (the reference's and the precompute's under no_grad, the policy's with gradients) runs
    the language model without a cache: transformers keeps one whenever use_cache is not False."""
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    lora.apply_lora(model, 4, 8)
    assert model.config.get_text_config().use_cache  # the default a cache would come from
    records = common.read_records(toy_pairs)[:3]
    dataset = data.TrainDataset(records, "dpo", os.path.join(toy_world, "images"), processor, "llava_v1", 2048)
    batch = dataset.collate([dataset[i] for i in range(3)])
    caches = []
    hook = language_model(model).register_forward_hook(lambda module, args, output: caches.append(output.cache))
    try:
        with torch.no_grad(), lora.disable_adapter(model):
            dpo.PAIR_FORWARDS[name](model, batch)  # the reference
        dpo.PAIR_FORWARDS[name](model, batch)[0].sum().backward()  # the policy
    finally:
        hook.remove()
    assert len(caches) == 2 and caches == [None, None]


# ----------------------------------------------------------------------------- FSDP2 over a bf16 base
def test_fsdp_trains_a_bf16_base_as_one_process_does(toy_world, toy_pairs, tmp_path, cpu_bf16):
    """Global batch 8 under bf16 autocast: 1 process (bf16 base, fp32 LoRA) against 2 FSDP2 processes (gloo; the
    base built on the meta device, sharded, in bf16, filled by rank 0's broadcast), and against fp32 training."""
    steps = ("--max-steps", "3", "--global-batch", "8", "--grad-accum", "2")
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "one", "--batch-size", "4",
                                                  *steps)))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py",
         *dpo_args(toy_world, toy_pairs, tmp_path / "two", "--batch-size", "2", "--parallel", "fsdp", *steps)])
    os.environ[common.CPU_BF16] = "0"  # fp32 (monkeypatch restores the variable)
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, tmp_path / "fp32", "--batch-size", "4",
                                                  *steps)))
    one, two, fp32 = metrics(tmp_path / "one"), metrics(tmp_path / "two"), metrics(tmp_path / "fp32")
    for row in (one[0], two[0]):  # step 1, exactly: the reference is the policy
        assert row["loss"] == LOG2 and row["rewards/margins"] == row["rewards/chosen"] == 0.0
    # Measured: the losses of 1 and 2 processes agree to 6e-6 relative, the gradient norms to 7e-4, each lora_B to
    # 4% of its norm (AdamW's first steps are ~lr whatever a gradient's size: bf16's rounding, which differs with the
    # batch split, flips the sign of the smallest gradients); against fp32 training 5e-5, 3e-3 and 8%.
    for a, b, c in zip(one, two, fp32):
        assert b["loss"] == pytest.approx(a["loss"], rel=5e-5) and b["loss"] == pytest.approx(c["loss"], rel=5e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-3)
        assert b["grad_norm"] == pytest.approx(c["grad_norm"], rel=2e-2)
    a1, a2, a32 = adapter(tmp_path / "one"), adapter(tmp_path / "two"), adapter(tmp_path / "fp32")
    for key in (k for k in a1 if "lora_B" in k):
        assert a1[key].norm() > 0
        assert (a2[key] - a1[key]).norm() < 0.1 * a1[key].norm(), key
        assert (a2[key] - a32[key]).norm() < 0.25 * a32[key].norm(), key


def test_sharded_load_keeps_a_bf16_base_and_fp32_lora(toy_world, tmp_path):
    """fsdp.load_sharded in one gloo process: every decoder layer an FSDP2 unit, the frozen base bf16, LoRA fp32, and
    the same logits as the model loaded whole and prepared the same way (same seed: the same LoRA A)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import fsdp
    path = os.path.join(toy_world, "model-sft")

    def prepare(model):
        lora.apply_lora(model, 4, 8)
        vlm.freeze_vision(model)
        for _, module in lora.lora_modules(model):  # B != 0, so that LoRA shows in the logits
            torch.nn.init.constant_(module.lora_B.weight, 0.01)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, processor = fsdp.load_sharded(path, torch.device("cpu"), torch.bfloat16, prepare, rank=0)
        assert all(isinstance(layer, FSDPModule) for layer in model.get_submodule(vlm.spec(model)["decoder_layers"]))
        assert {(p.dtype, p.requires_grad) for p in model.parameters()} == {(torch.bfloat16, False),
                                                                            (torch.float32, True)}
        torch.manual_seed(0)
        whole, _ = vlm.load(path, "cpu", torch.bfloat16)
        prepare(whole)
        dataset = data.TrainDataset(common.read_records(os.path.join(toy_world, "sft.json"))[:2], "sft",
                                    os.path.join(toy_world, "images"), processor, "llava_v1", 2048)
        batch = dataset.collate([dataset[0], dataset[1]])
        batch.pop("labels")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(**batch, use_cache=False).logits, whole(**batch, use_cache=False).logits)
    finally:
        dist.destroy_process_group()
