"""Checks of dpo.py against independent computations: hand-worked losses, F.cross_entropy, the LoRA
formula, merged vs unmerged weights, a save/load round trip and a few DPO steps on a tiny LLaVA."""
import json
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpo  # noqa: E402
import vlm  # noqa: E402

IMAGE_TOKEN = 299
NUM_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches; the default strategy drops CLS
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llava(seed=0):
    """A 0.2 M-parameter LLaVA built from configs (no hub); the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=300),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def tiny_inputs(batch=2, text_tokens=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    image = torch.full((batch, NUM_IMAGE_TOKENS), IMAGE_TOKEN)  # (B, 16)
    text = torch.randint(1, IMAGE_TOKEN, (batch, text_tokens), generator=generator)  # (B, 8)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], dim=1)  # (B, 25): bos, image, text
    pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)  # (B, 3, 32, 32)
    return dict(input_ids=input_ids, pixel_values=pixel_values)


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits  # (B, T, V)


def randomize_lora_B(model, std=0.1):
    """Give every lora_B a non-zero value so that the adapter changes the model."""
    with torch.no_grad():
        for name, p in dpo.lora_parameters(model):
            if "lora_B" in name:
                p.normal_(0, std)


# ----------------------------------------------------------------------------- dpo_loss, by hand
# Two pairs, beta = 0.1:
#   pair 1: policy chosen -1, rejected -3; reference -2, -2.
#           pi_logratios = -1 - (-3) = 2, ref_logratios = 0, logits = 2, beta * logits = 0.2
#   pair 2: policy chosen -1, rejected -30; reference -2, -11.
#           pi_logratios = 29, ref_logratios = 9, logits = 20, beta * logits = 2
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-1.0, -1.0]), torch.tensor([-3.0, -30.0])
REFERENCE_CHOSEN, REFERENCE_REJECTED = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -11.0])


def run_loss(**kwargs):
    return dpo.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1, **kwargs)


def test_dpo_loss_sigmoid_by_hand():
    """Eq. 7: -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187308) = 0.5981389;
    -log sigmoid(2) = log(1 + e^-2) = log(1.1353353) = 0.1269280."""
    losses, _, _ = run_loss()
    torch.testing.assert_close(losses, torch.tensor([0.5981389, 0.1269280]))


def test_dpo_loss_label_smoothing_by_hand():
    """eps = 0.1: 0.9 * -log sigmoid(x) + 0.1 * -log sigmoid(-x), and -log sigmoid(-x) = -log sigmoid(x) + x:
    pair 1: 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.6181389; pair 2: 0.1269280 + 0.1 * 2 = 0.3269280."""
    losses, _, _ = run_loss(label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.6181389, 0.3269280]))


def test_dpo_loss_ipo_by_hand():
    """(logits - 1 / (2 * 0.1))^2: (2 - 5)^2 = 9, (20 - 5)^2 = 225."""
    losses, _, _ = run_loss(loss_type="ipo")
    torch.testing.assert_close(losses, torch.tensor([9.0, 225.0]))


def test_dpo_loss_hinge_by_hand():
    """relu(1 - 0.1 * logits): relu(1 - 0.2) = 0.8, relu(1 - 2) = 0."""
    losses, _, _ = run_loss(loss_type="hinge")
    torch.testing.assert_close(losses, torch.tensor([0.8, 0.0]))


def test_dpo_rewards_by_hand_and_detached():
    """chosen: 0.1 * (-1 - (-2)) = 0.1 for both; rejected: 0.1 * (-3 + 2) = -0.1, 0.1 * (-30 + 11) = -1.9."""
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    policy_rejected = POLICY_REJECTED.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        policy_chosen, policy_rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, -1.9]))
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_loss_unknown_type_raises():
    with pytest.raises(ValueError, match="loss_type"):
        run_loss(loss_type="kto")


# ----------------------------------------------------------------------------- sequence_logps
def masked_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 7), generator=generator)  # (B, T)
    labels[0, :3] = -100  # a prompt
    labels[1, 2:5] = -100  # a hole in the middle
    labels[2, 0] = 5  # the first label is never predicted; only labels[:, 1:] count
    return logits, labels


def cross_entropy_logps(logits, labels):
    """The independent path: token log-probs = -F.cross_entropy, 0 at ignored positions."""
    token_nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                ignore_index=-100, reduction="none")  # (B, T-1)
    count = (labels[:, 1:] != -100).sum(-1)  # (B,)
    return -token_nll.sum(-1), count


def test_sequence_logps_sum_and_mean_match_cross_entropy():
    logits, labels = masked_labels()
    expected_sum, count = cross_entropy_logps(logits, labels)
    torch.testing.assert_close(dpo.sequence_logps(logits, labels), expected_sum)
    torch.testing.assert_close(dpo.sequence_logps(logits, labels, average=True), expected_sum / count)


def test_sequence_logps_upcasts_bf16_logits():
    logits, labels = masked_labels()
    logits_bf16 = logits.bfloat16()
    expected, _ = cross_entropy_logps(logits_bf16.float(), labels)  # the fp32 answer for these logits
    result = dpo.sequence_logps(logits_bf16, labels)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- LoRA
def test_lora_linear_matches_hand_formula():
    """y = x W^T + b + (alpha / r) x A^T B^T, with alpha / r = 4 / 2 = 2."""
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = dpo.LoRALinear(base, r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 5)  # (N, in)
    A, B = layer.lora_A.weight, layer.lora_B.weight  # (r, in), (out, r)
    expected = x @ base.weight.T + base.bias + 2.0 * x @ A.T @ B.T  # (N, out)
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and A.requires_grad and B.requires_grad


def test_lora_weights_stay_fp32_over_a_bf16_base():
    """AdamW on bf16 LoRA weights would round small updates away: they are fp32 whatever the base; the layer
    takes and gives the base's dtype."""
    layer = dpo.LoRALinear(nn.Linear(5, 3).bfloat16(), r=2, alpha=4)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 5).bfloat16()
    out = layer(x)
    expected = layer.base(x).float() + 2.0 * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_apply_lora_targets_language_model_projections_only():
    model = tiny_llava()
    names = dpo.apply_lora(model, r=4, alpha=8)
    expected = {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(names) == expected and len(names) == 14
    assert {name for name, _ in dpo.lora_modules(model)} == expected
    assert not any("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n for n in names)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in dpo.lora_parameters(model)}
    assert len(trainable) == 28  # lora_A and lora_B of 14 layers


def test_apply_lora_no_match_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        dpo.apply_lora(tiny_llava(), r=4, alpha=8, targets=r"nothing\.here")


def test_lora_at_init_equals_base_and_disable_adapter_restores_base():
    inputs = tiny_inputs()
    model = tiny_llava()
    base_logits = logits_of(model, inputs)
    dpo.apply_lora(model, r=4, alpha=8)
    assert torch.equal(logits_of(model, inputs), base_logits)  # B = 0 at init
    randomize_lora_B(model)
    assert not torch.allclose(logits_of(model, inputs), base_logits, atol=1e-4)
    with dpo.disable_adapter(model):
        assert torch.equal(logits_of(model, inputs), base_logits)
    with pytest.raises(RuntimeError, match="boom"), dpo.disable_adapter(model):
        raise RuntimeError("boom")
    assert not any(module.disabled for _, module in dpo.lora_modules(model))  # restored on the exception


def test_merge_equals_unmerged_and_unmerge_restores_base():
    inputs = tiny_inputs()
    model = tiny_llava()
    dpo.apply_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    base_weights = {name: m.base.weight.detach().clone() for name, m in dpo.lora_modules(model)}
    unmerged_logits = logits_of(model, inputs)
    dpo.merge_lora(model)
    dpo.merge_lora(model)  # idempotent: the update is added once
    torch.testing.assert_close(logits_of(model, inputs), unmerged_logits, rtol=1e-5, atol=1e-5)
    dpo.unmerge_lora(model)
    dpo.unmerge_lora(model)
    for name, module in dpo.lora_modules(model):
        torch.testing.assert_close(module.base.weight, base_weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, inputs), unmerged_logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- save / load
PEFT_KEY = re.compile(r"base_model\.model\.model\.language_model\.layers\.\d+\."
                      r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.lora_(A|B)\.weight")


def test_save_load_round_trip_in_peft_layout(tmp_path):
    inputs = tiny_inputs()
    model = tiny_llava(seed=0)
    dpo.apply_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    dpo.save_lora(model, str(tmp_path), base_model_name_or_path="tiny")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no tmp files

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 28 and all(PEFT_KEY.fullmatch(key) for key in tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == vlm.lora_targets(model)
    assert config["base_model_name_or_path"] == "tiny"

    fresh = tiny_llava(seed=0)  # same base weights, no LoRA yet
    loaded = dpo.load_lora(fresh, str(tmp_path))
    assert len(loaded) == 14
    assert torch.equal(logits_of(fresh, inputs), logits_of(model, inputs))


def test_load_lora_rejects_mismatched_keys(tmp_path):
    model = tiny_llava()
    dpo.apply_lora(model, r=4, alpha=8)
    dpo.save_lora(model, str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key.replace("q_proj", "query")] = tensors.pop(key)
    save_file(tensors, path)
    with pytest.raises(KeyError, match="query"):
        dpo.load_lora(tiny_llava(), str(tmp_path))


def test_load_lora_rejects_other_rank(tmp_path):
    model = tiny_llava()
    dpo.apply_lora(model, r=4, alpha=8)
    dpo.save_lora(model, str(tmp_path))
    other = tiny_llava()
    dpo.apply_lora(other, r=2, alpha=8)
    with pytest.raises(ValueError, match="r=4"):
        dpo.load_lora(other, str(tmp_path))


# ----------------------------------------------------------------------------- a few DPO steps
def test_dpo_steps_lower_loss_and_make_margin_positive():
    """Policy = LoRA model, reference = the same model under disable_adapter: at step 0 the loss is
    log 2 and the margin 0; a few AdamW steps on one pair must lower the loss and open the margin."""
    torch.manual_seed(0)
    model = tiny_llava()
    dpo.apply_lora(model, r=4, alpha=8)
    model.train()
    inputs = tiny_inputs(batch=2, text_tokens=10, seed=3)
    inputs["input_ids"][1, :-4] = inputs["input_ids"][0, :-4]  # one prompt (bos, image, question) ...
    inputs["pixel_values"][1] = inputs["pixel_values"][0]  # ... on one image, scored for both answers
    labels = inputs["input_ids"].clone()  # (2, T): row 0 chosen, row 1 rejected
    labels[:, :-4] = -100  # only the 4 answer tokens count
    optimizer = torch.optim.AdamW([p for _, p in dpo.lora_parameters(model)], lr=1e-2, weight_decay=0.0)

    history = []
    for _ in range(15):
        with torch.no_grad(), dpo.disable_adapter(model):
            reference_logps = dpo.sequence_logps(model(**inputs).logits, labels)  # (2,)
        policy_logps = dpo.sequence_logps(model(**inputs).logits, labels)  # (2,)
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
            policy_logps[:1], policy_logps[1:], reference_logps[:1], reference_logps[1:], beta=0.1)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        history.append((losses.item(), (chosen_rewards - rejected_rewards).item()))

    assert history[0][0] == pytest.approx(math.log(2), abs=1e-5) and history[0][1] == pytest.approx(0, abs=1e-5)
    # Adam at this lr may bump the loss up for a step; after 15 steps it sits near 0.35 (margin ~0.85).
    assert history[-1][0] < math.log(2) - 0.15
    assert history[-1][1] > 0.3
