"""Checks of lora.py against independent computations: the LoRA formula, merged vs unmerged weights, the
adapter off, and a save/load round trip in PEFT's layout on a tiny LLaVA."""
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import lora
import vlm
from helpers import PROJECTIONS, lora_parameters, logits_of, randomize_lora_B, tiny_inputs, tiny_llava, unmerge_lora


# ----------------------------------------------------------------------------- LoRA
def test_lora_linear_matches_hand_formula():
    """y = x W^T + b + (alpha / r) x A^T B^T, with alpha / r = 4 / 2 = 2."""
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = lora.LoRALinear(base, r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 5)  # (N, in)
    A, B = layer.lora_A.weight, layer.lora_B.weight  # (r, in), (out, r)
    expected = x @ base.weight.T + base.bias + 2.0 * x @ A.T @ B.T  # (N, out)
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and A.requires_grad and B.requires_grad


def test_lora_weights_stay_fp32_over_a_bf16_base():
    """AdamW on bf16 LoRA weights would round small updates away: they are fp32 whatever the base; the layer
    takes and gives the base's dtype."""
    layer = lora.LoRALinear(nn.Linear(5, 3).bfloat16(), r=2, alpha=4)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 5).bfloat16()
    out = layer(x)
    expected = layer.base(x).float() + 2.0 * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_apply_lora_targets_language_model_projections_only():
    model = tiny_llava()
    names = lora.apply_lora(model, r=4, alpha=8)
    expected = {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(names) == expected and len(names) == 14
    assert {name for name, _ in lora.lora_modules(model)} == expected
    assert not any("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n for n in names)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in lora_parameters(model)}
    assert len(trainable) == 28  # lora_A and lora_B of 14 layers


def test_apply_lora_no_match_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.apply_lora(tiny_llava(), r=4, alpha=8, targets=r"nothing\.here")


def test_lora_at_init_equals_base_and_disable_adapter_restores_base():
    inputs = tiny_inputs()
    model = tiny_llava()
    base_logits = logits_of(model, inputs)
    lora.apply_lora(model, r=4, alpha=8)
    assert torch.equal(logits_of(model, inputs), base_logits)  # B = 0 at init
    randomize_lora_B(model)
    assert not torch.allclose(logits_of(model, inputs), base_logits, atol=1e-4)
    with lora.disable_adapter(model):
        assert torch.equal(logits_of(model, inputs), base_logits)
    with pytest.raises(RuntimeError, match="boom"), lora.disable_adapter(model):
        raise RuntimeError("boom")
    assert not any(module.disabled for _, module in lora.lora_modules(model))  # restored on the exception


def test_merge_equals_unmerged_and_unmerge_restores_base():
    inputs = tiny_inputs()
    model = tiny_llava()
    lora.apply_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    base_weights = {name: m.base.weight.detach().clone() for name, m in lora.lora_modules(model)}
    unmerged_logits = logits_of(model, inputs)
    lora.merge_lora(model)
    lora.merge_lora(model)  # idempotent: the update is added once
    torch.testing.assert_close(logits_of(model, inputs), unmerged_logits, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    unmerge_lora(model)
    for name, module in lora.lora_modules(model):
        torch.testing.assert_close(module.base.weight, base_weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, inputs), unmerged_logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- save / load
PEFT_KEY = re.compile(r"base_model\.model\.model\.language_model\.layers\.\d+\."
                      r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.lora_(A|B)\.weight")


def test_save_load_round_trip_in_peft_layout(tmp_path):
    inputs = tiny_inputs()
    model = tiny_llava(seed=0)
    lora.apply_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    lora.save_lora(model, str(tmp_path), base_model_name_or_path="tiny")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no tmp files

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 28 and all(PEFT_KEY.fullmatch(key) for key in tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == vlm.lora_targets(model)
    assert config["base_model_name_or_path"] == "tiny"

    fresh = tiny_llava(seed=0)  # same base weights, no LoRA yet
    loaded = lora.load_lora(fresh, str(tmp_path))
    assert len(loaded) == 14
    assert torch.equal(logits_of(fresh, inputs), logits_of(model, inputs))


def test_load_lora_rejects_mismatched_keys(tmp_path):
    model = tiny_llava()
    lora.apply_lora(model, r=4, alpha=8)
    lora.save_lora(model, str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key.replace("q_proj", "query")] = tensors.pop(key)
    save_file(tensors, path)
    with pytest.raises(KeyError, match="query"):
        lora.load_lora(tiny_llava(), str(tmp_path))


def test_load_lora_rejects_other_rank(tmp_path):
    model = tiny_llava()
    lora.apply_lora(model, r=4, alpha=8)
    lora.save_lora(model, str(tmp_path))
    other = tiny_llava()
    lora.apply_lora(other, r=2, alpha=8)
    with pytest.raises(ValueError, match="r=4"):
        lora.load_lora(other, str(tmp_path))
