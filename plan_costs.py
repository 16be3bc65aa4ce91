"""
What one step costs, counted from a model's shapes alone (plan.py prints it): the activations a pair forward
keeps for its backward, and the FLOPs of a DPO step and of seva.py's generation.

Counts are per token and per decoder layer, from what autograd saves in transformers' Llama layer with our
LoRALinear on every projection (the frozen base saves nothing, since its weight takes no gradient):
  the layer input and the normed input (the attention's and the MLP's), rotated q, k, v, the attention output
  and its copy before o_proj: 6 h + 2 kv; the MLP's gate, silu(gate), up and their product: 4 i; each LoRA's
  A output: r per adapted projection; SDPA's output and log-sum-exp (eager keeps its softmax instead: heads x
  the row's length). The vision tower and projector are frozen: their activations live one layer at a time.
The lm_head's logits are taken in fp32 before log_softmax (dpo.sequence_logps): its output is kept, and during
its backward its gradient and the logits' gradient are live beside it: 3 x positions x V x 4 bytes.
Gradient checkpointing keeps each layer's input only, and recomputes one layer at a time in the backward.
Under bf16 autocast (GPUs) the matmuls' saved inputs are bf16 copies, while our LoRA layers return fp32 sums
(lora.py: the update must not round away), so the residual stream and the MLP's products stay fp32: the
`bf16` column of BYTES below says which count is which. The fp32 path is the one the tests measure (CPUs).

FLOPs: multiply-add = 2, matmuls only (as bench/dpo_step.py counts them and torch's FlopCounterMode does):
a linear layer 2 N per token forward; its backward 2 N per token for the input's gradient (none for the
first layer's q, k, v: their input is frozen), 2 N more for a trained weight's; attention 4 h T^2 per layer
forward (the full T x T square: an explicit mask skips nothing) and 8 h T^2 backward.
"""
from dataclasses import dataclass

import torch

# While a layer's backward runs, the gradients of its activations are live beside them: 0.4 x the layer's kept
# bytes, measured with bench/dpo_step.py's profiler (tests/test_plan.py's first three configurations).
BACKWARD_TRANSIENT = 0.4
# Bytes per saved element: (fp32 run, bf16 autocast run); see the docstring.
BYTES = {"residual": (4, 4), "matmul_input": (4, 2), "mlp": (4, 4), "lora": (4, 2), "attention": (4, 2)}


@dataclass
class Shapes:
    """A VLM's sizes, read from its (meta-device) model: what the counts below need."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_width: int  # key/value heads x head size (hidden, without grouped-query attention)
    vocab: int
    image_tokens: int  # tokens one image puts into the language model (LLaVA-1.5: 576)
    vision_tokens: int  # tokens in the vision tower (patches + CLS)
    vision_hidden: int
    vision_layers: int
    vision_linear: int  # weights of the vision tower's linear layers (in x out, summed)
    projector_linear: int
    layer_linear: int  # one decoder layer's base linear weights
    layer_lora: int  # one decoder layer's LoRA weights
    lora_modules: int  # LoRA modules per decoder layer
    rank: int
    patch_pixels: int  # 3 x patch x patch: the patch embedding's inputs


def linear_weights(module):
    """(base, LoRA) sums of in x out over the nn.Linear layers of a module."""
    base = lora = 0
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            is_lora = any(part in ("lora_A", "lora_B") for part in name.split("."))
            lora += is_lora * layer.in_features * layer.out_features
            base += (not is_lora) * layer.in_features * layer.out_features
    return base, lora


def shapes_of(model, row):
    """Shapes of a model whose family row (vlm.FAMILIES) names its vision tower, projector and decoder layers."""
    text, vision = model.config.get_text_config(), model.config.vision_config
    layers = model.get_submodule(row["decoder_layers"])
    layer_base, layer_lora = linear_weights(layers[0])
    ranks = {m.r for m in layers[0].modules() if hasattr(m, "lora_A")}
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    patches = (vision.image_size // vision.patch_size) ** 2
    return Shapes(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=len(layers),
                  heads=text.num_attention_heads,
                  kv_width=(getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim,
                  vocab=text.vocab_size, image_tokens=patches, vision_tokens=patches + 1,
                  vision_hidden=vision.hidden_size, vision_layers=vision.num_hidden_layers,
                  vision_linear=linear_weights(model.get_submodule(row["vision_tower"]))[0],
                  projector_linear=sum(linear_weights(model.get_submodule(row["projector"]))),
                  layer_linear=layer_base, layer_lora=layer_lora, rank=max(ranks, default=0),
                  lora_modules=sum(hasattr(m, "lora_A") for m in layers[0].modules()),
                  patch_pixels=3 * vision.patch_size ** 2)


# ----------------------------------------------------------------------------- one micro-batch's geometry
@dataclass
class Geometry:
    """What a pair forward computes for B pairs of prompt P and answers (chosen, rejected) tokens."""
    rows: int  # sequences in the language model
    length: int  # tokens per row, padding included
    positions: int  # where the lm_head runs (all of them, or the scored ones with logits_to_keep)
    images: int  # images through the vision tower


def geometry(forward, pairs, prompt, chosen, rejected):
    if forward in ("concatenated", "shared_image"):  # 2B rows padded to the longer answer
        length = prompt + max(chosen, rejected)
        return Geometry(2 * pairs, length, 2 * pairs * length, 2 * pairs if forward == "concatenated" else pairs)
    kept = pairs * (2 + chosen + rejected)  # dpo.pack_pairs: 1 + answer positions per answer slot
    if forward == "shared_prefix":  # one packed row per pair: prompt once, then both answers
        return Geometry(pairs, prompt + chosen + rejected, kept, pairs)
    if forward == "packed":  # every pair in one row
        return Geometry(1, pairs * (prompt + chosen + rejected), kept, pairs)
    raise ValueError(f"unknown pair forward {forward!r}")


# ----------------------------------------------------------------------------- activations
def layer_bytes(s, row_length, bf16, attention="sdpa"):
    """Bytes one decoder layer keeps for its backward, per token."""
    pick = lambda kind: BYTES[kind][1 if bf16 else 0]
    h, kv, i = s.hidden, s.kv_width, s.intermediate
    kept = 2 * h * pick("residual") + (4 * h + 2 * kv) * pick("matmul_input") + 4 * i * pick("mlp") \
        + s.lora_modules * s.rank * pick("lora")
    if attention == "eager":
        kept += s.heads * row_length * 4  # the softmax, fp32
    else:
        kept += h * pick("attention") + s.heads * 4  # output and log-sum-exp
    return kept


def activation_bytes(s, g, bf16, checkpointing, attention="sdpa"):
    """Peak bytes of one micro-batch's policy forward and backward above the weights: what the layers keep,
    the attention mask, the logits in fp32; with checkpointing the layers' inputs plus one layer recomputed."""
    tokens = g.rows * g.length
    per_layer = layer_bytes(s, g.length, bf16, attention) * tokens
    mask = g.rows * g.length ** 2 * (4 if attention == "eager" else 1)
    logits = 3 * g.positions * s.vocab * 4 + (g.positions * s.vocab * 2 if bf16 else 0)
    backward = BACKWARD_TRANSIENT * per_layer  # the gradients of the layer being differentiated
    if not checkpointing:  # the logits' backward comes before the layers'
        return s.layers * per_layer + mask + max(logits, backward)
    # the layers' inputs, and the larger of the logits (first in the backward) and one layer recomputed
    return s.layers * tokens * s.hidden * BYTES["residual"][bf16] + mask + max(logits, per_layer + backward)


def reference_bytes(s, g, bf16, attention="sdpa"):
    """Peak bytes of the reference pass (no gradient): one layer's working set and the fp32 logits."""
    working = g.rows * g.length * (4 * s.hidden + 3 * s.intermediate) * (2 if bf16 else 4)
    scores = g.rows * s.heads * g.length ** 2 * 4 if attention == "eager" else 0
    return working + scores + g.rows * g.length ** 2 + 2 * g.positions * s.vocab * 4


# ----------------------------------------------------------------------------- FLOPs
def vision_flops(s, images):
    """The frozen vision tower and the projector, forward only."""
    tokens = s.vision_tokens
    return images * (2 * s.vision_linear * tokens + 4 * s.vision_hidden * tokens ** 2 * s.vision_layers
                     + 2 * s.projector_linear * s.image_tokens + 2 * s.patch_pixels * s.vision_hidden * s.image_tokens)


def step_flops(s, g, reference=True, lora=True):
    """One DPO micro-batch: reference forward (LoRA off), policy forward and backward. lora=False: full
    fine-tuning (every decoder weight trained)."""
    tokens, attention = g.rows * g.length, 4 * s.hidden * g.length ** 2 * s.layers * g.rows
    head = 2 * s.hidden * s.vocab * g.positions
    language = 2 * s.layer_linear * s.layers * tokens
    adapters = 2 * s.layer_lora * s.layers * tokens
    forward = vision_flops(s, g.images) + language + adapters + attention + head
    # the first layer's q, k, v (and their LoRA A) read the frozen embeddings: no gradient for their input
    first = 2 * tokens * s.hidden * (s.hidden + 2 * s.kv_width + (3 * s.rank if s.rank else 0))
    backward = language * (1 if lora else 2) + 2 * adapters + 2 * attention + head - first
    reference_forward = vision_flops(s, g.images) + language + attention + head if reference else 0
    return reference_forward + forward + backward


def generation_flops(s, prompt, answer):
    """seva.py, one instance: two prefills (the image and its noised view) and two greedy answers of `answer`
    tokens each (the lm_head on the prompt's last position and on every new token)."""
    language = 2 * s.layer_linear * s.layers
    prefill = vision_flops(s, 1) + language * prompt + 4 * s.hidden * prompt ** 2 * s.layers \
        + 2 * s.hidden * s.vocab
    steps = answer - 1  # the prefill gives the first token; each later one is a forward of the one before it
    context = steps * prompt + steps * (steps + 1) // 2  # keys each step attends to, summed
    decode = steps * (language + 2 * s.hidden * s.vocab) + 4 * s.hidden * context * s.layers
    return 2 * (prefill + decode)


def kv_cache_bytes(s, batch, length, bytes_per=2):
    """Keys and values of every layer for `batch` sequences of `length` tokens."""
    return 2 * s.layers * s.kv_width * batch * length * bytes_per
