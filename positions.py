"""
Where each token sits and what it attends to, as a family's own forward makes them.

The pair forwards that compute a prompt once for all its answers (dpo.shared_prefix_forward, dpo.packed_forward),
the prompts read a few rows at a time (generate.prefilled) and the answers scored on a prompt's KV cache
(generate.score_answers) give the model positions and an attention mask themselves. They take them from here, so
that every answer gets exactly what the model's own forward over prompt + that answer alone gives it.

Positions (vlm.FAMILIES positions):
  1d     0, 1, 2, ... along a row's tokens (padding aside); PaliGemma counts from 1, and its generation too, so
         an answer scored on its prompt's cache continues from there (RoPE itself sees only differences).
  mrope  Qwen2-VL, Qwen2.5-VL, Qwen3-VL: three positions per token (temporal, height, width). A text token has the
         same number thrice, one more than the largest position before it; an image's tokens have their grid's
         coordinates, offset by the text before them, so the text after an image of h x w merged patches
         continues at (start + max(h, w)), not at (start + h w). The model's own `get_rope_index` computes them.
An answer continues at its prompt's largest position + 1 in every family; a packed sequence gathers each answer's
positions from its own row (prompt + that answer alone), as it gathers its tokens.

Attention (vlm.FAMILIES attention): causal, plus blocks of tokens that attend to each other both ways:
  prefix        PaliGemma: the whole prompt (token_type_ids 0), the prefix-LM mask.
  image_blocks  Gemma 3: each image's tokens (token_type_ids 1), one block per image.
Both blocks lie inside the prompt, which a packed sequence holds once: its answers see the prompt as before.
"""
import torch

import vlm


def row_positions(model, inputs):
    """The positions the model's own forward gives every token of a padded batch (input_ids, attention_mask, and
    for M-RoPE mm_token_type_ids and image_grid_thw): (B, T) for 1d families, (3, B, T) for M-RoPE. Right- or
    left-padded alike; padding positions are meaningless."""
    mask, row = inputs["attention_mask"], vlm.spec(vlm.unwrap(model).config)
    if row["positions"] == "1d":  # (B, T): first_position, + 1, ... from each row's first real token
        return (mask.long().cumsum(-1) - 1).clamp(min=0) + row["first_position"]
    positions, _ = vlm.unwrap(model).model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    return positions  # (3, B, T)


def next_positions(model, inputs):
    """(B,): the position of the first token after each row of `inputs` (a prompt's first answer token): one more
    than the row's largest position, in every dimension (text positions are equal in all three)."""
    positions = row_positions(model, inputs)
    positions = positions.masked_fill(inputs["attention_mask"] == 0, -1)
    return positions.reshape(-1, *inputs["attention_mask"].shape).amax(dim=(0, 2)) + 1


def attention_blocks(model, inputs):
    """(B, T) block ids: tokens of the same block >= 0 attend to each other both ways, -1 causal only; None for a
    causal family. As the model's own mask has them, from its per-token token_type_ids."""
    kind = vlm.spec(vlm.unwrap(model).config)["attention"]
    if kind == "causal":
        return None
    token_types = inputs["token_type_ids"]
    if kind == "prefix":  # PaliGemma: the prefix (0) is one block; the suffix (1: answers, padding) is causal
        return torch.where(token_types == 0, 0, -1)
    image = token_types == 1  # Gemma 3: a block per image, numbered where one starts
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(-1) - 1, -1)


def sliding_window(model):
    """The text model's sliding window where some of its layers use one (Gemma 3, Gemma 2), else None."""
    text = vlm.unwrap(model).config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or []
    return text.sliding_window if "sliding_attention" in layer_types else None


def masks_for_layers(allowed, position_ids, window):
    """An explicit (B, 1, L, L) mask for each kind of layer: {"full_attention": allowed, "sliding_attention":
    allowed where the key is fewer than `window` positions before the query}. Positions, not indices: a packed
    answer sits further along its sequence than in its own row, its positions are its row's."""
    text = position_ids if position_ids.dim() == 2 else position_ids[0]  # (B, L): 1d, or M-RoPE's temporal
    near = (text[:, :, None] - text[:, None, :]) < window  # (B, L, L)
    return {"full_attention": allowed, "sliding_attention": allowed & near[:, None]}
