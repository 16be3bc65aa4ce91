"""
The FLOPs of one DPO step of bench/dpo_step.py, counted analytically (multiply-add = 2 FLOPs; matmuls and
convolutions only), for the tokens each variant really computes, padding included:
  forward  = images * [2 N_vision T_vision + 4 h_v T_vision^2 L_v + 2 N_projector T_image + 2 (3 p^2) h_v T_image]
           + rows * [2 N_lm L + 4 h L^2 layers] + 2 h V positions
  backward = rows * [2 N_base L + 4 N_lora L + 8 h L^2 layers] + 2 h V positions   (policy only)
  step     = reference forward (N_lm = N_base: LoRA disabled; 0 when precomputed) + policy forward + backward
N_lm = linear weights of the decoder layers (N_base) plus LoRA (N_lora); rows x L the language model's padded
batch (2B sequences, or B packed ones); positions = where the lm_head runs (every position, or only the scored
ones with logits_to_keep). The frozen weights get activation gradients only (2 N T, not the 4 N T of a trained
weight; the first layer's q, k, v need none either: a ~1% over-count kept for simplicity); attention counts the
full L x L square (an explicit mask skips nothing); the frozen vision tower has no backward.
"""
import torch

import collate
import dpo


def linear_weights(module):
    """Sum of in x out over the nn.Linear layers of a module, split into (base, LoRA)."""
    base = lora = 0
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            if ".lora_A" in f".{name}" or ".lora_B" in f".{name}":
                lora += layer.in_features * layer.out_features
            else:
                base += layer.in_features * layer.out_features
    return base, lora


def step_flops(model, batch, forward, reference):
    """The module docstring's formula for one step of this variant on this batch."""
    config, text = model.config, model.config.text_config
    vision = config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    vision_tokens = image_tokens + 1  # CLS
    n_vision = linear_weights(model.model.vision_tower)[0]
    n_projector = linear_weights(model.model.multi_modal_projector)[0]
    n_base, n_lora = linear_weights(model.model.language_model)
    h, vocab, layers = text.hidden_size, text.vocab_size, text.num_hidden_layers
    pairs = collate.split_rows(batch)[0]
    if forward == "shared_prefix":
        packed = dpo.pack_pairs(batch)
        rows, length = pairs, packed["input_ids"].shape[1]
        positions = pairs * sum(p.shape[1] for p in packed["positions"])
    else:
        rows, length = batch["input_ids"].shape[0], batch["input_ids"].shape[1]  # B chosen + R rejected
        positions = rows * length
    images = pairs if forward != "concatenated" else batch["input_ids"].shape[0]
    vision_forward = images * (2 * n_vision * vision_tokens + 4 * vision.hidden_size * vision_tokens ** 2
                               * vision.num_hidden_layers + 2 * n_projector * image_tokens
                               + 2 * 3 * vision.patch_size ** 2 * vision.hidden_size * image_tokens)

    def language_forward(n_linear):
        return rows * (2 * n_linear * length + 4 * h * length ** 2 * layers) + 2 * h * vocab * positions

    backward = rows * (2 * n_base * length + 4 * n_lora * length + 8 * h * length ** 2 * layers) \
        + 2 * h * vocab * positions
    reference_forward = 0 if reference == "precomputed" else vision_forward + language_forward(n_base)
    return reference_forward + vision_forward + language_forward(n_base + n_lora) + backward
