"""
LoRA, by hand (Hu et al. 2021, as torchtune writes it): every targeted nn.Linear gets a low-rank update,
y = W x + (alpha / r) B A x, with A Kaiming-initialised and B zero, so training starts at the model itself.

SeVa (paper 4.1) puts LoRA on every linear layer of the language model except lm_head (r 1024, alpha 2048);
the vision tower stays frozen. The DPO reference model is the same network with its adapters switched off
(`disable_adapter`): no second copy in memory. Adapters are saved in PEFT's on-disk layout, so
`peft.PeftModel.from_pretrained` loads them too.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import common
import vlm


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update: y = base(x) + (alpha / r) * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)  # the pretrained layer, frozen
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # LoRA's own weights are at least fp32 (AdamW on bf16 weights loses small updates), whatever the base's
        factory = dict(dtype=torch.promote_types(base.weight.dtype, torch.float32), device=base.weight.device)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: at init the layer equals the base layer
        self.disabled = False  # True inside disable_adapter: the reference model
        self.merged = False  # True after merge_lora: the update lives in base.weight

    def forward(self, x):  # x (..., in)
        out = self.base(x)  # (..., out)
        if self.merged:
            return out
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.disabled:
            # What the enabled layer returns with B = 0, dtype included: the reference (disabled) and the policy
            # at step 1 are then the same function, bit for bit, under bf16 too (loss log 2, rewards 0).
            return out.float() if autocast else out
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        if autocast:
            # Under bf16 autocast the base's output is bf16, on the bf16 grid: adding an update smaller than
            # half a grid step there would round it away. The sum stays fp32 (autocast casts it where needed).
            return out.float() + self.scale * update.float()
        return out + self.scale * update.to(out.dtype)

    def delta_weight(self):
        return self.scale * self.lora_B.weight @ self.lora_A.weight  # (out, in)


def lora_modules(model):
    """The (name, LoRALinear) pairs of a model."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def apply_lora(model, r, alpha, dropout=0.0, targets=None):
    """Wrap every nn.Linear whose full name matches `targets` (default: the family's, vlm.FAMILIES) in a
    LoRALinear; freeze everything else. Returns the wrapped modules' names."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers")
    targets = vlm.lora_targets(model) if targets is None else targets
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and re.fullmatch(targets, name)]
    if not names:
        raise ValueError(f"no nn.Linear module name matches the LoRA targets {targets!r}")
    for p in model.parameters():
        p.requires_grad_(False)  # everything frozen; the new LoRA params below are trainable
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), r, alpha, dropout))
    return names


@contextlib.contextmanager
def disable_adapter(model):
    """Run the model without its LoRA updates (the DPO reference model); restores the flags on exit."""
    modules = [module for _, module in lora_modules(model)]
    if any(module.merged for module in modules):
        raise RuntimeError("cannot disable merged LoRA layers")
    previous = [module.disabled for module in modules]
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module, was_disabled in zip(modules, previous):
            module.disabled = was_disabled


@torch.no_grad()
def merge_lora(model):
    """Fold each LoRA update into its base weight in place (W + scale * B @ A, computed in fp32 and cast once to
    W's dtype: merged_weight); no-op if merged. Into bf16 weights a small update rounds away: merge into fp32
    weights, or keep the adapter unmerged (eval/runner.py)."""
    for _, module in lora_modules(model):
        if not module.merged:
            weight = module.base.weight
            weight.copy_(merged_weight(weight, module.delta_weight(), weight.dtype)[0])
            module.merged = True


def remove_lora(model):
    """Merge every LoRA layer and put the plain nn.Linear back: a model any HF code can save and load."""
    merge_lora(model)
    for name, module in lora_modules(model):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, module.base)
    return model


# ----------------------------------------------------------------------------- merging into a saved model
LOST_WARNING = 0.1  # a merged model that loses more than this share of the update's norm is named in a warning


@torch.no_grad()
def merged_weight(weight, delta, dtype):
    """(weight + delta in fp32, cast once to dtype, what the cast did to the update): the latter as a (4,) float64
    tensor of sums that rounding_line reads: elements the update changes, those of them whose merged value equals
    the base's in dtype (the update rounded away), the update's squared norm, and the squared norm of what the
    merged weights carry of it minus the update (the part lost)."""
    delta = delta.float()  # (out, in)
    merged = (weight.float() + delta).to(dtype)
    base = weight.to(dtype)  # the base as a model in dtype holds it
    updated = delta != 0
    lost = merged.float() - base.float() - delta  # what the merged weights carry of the update, minus the update
    stats = torch.stack([updated.sum(), (updated & (merged == base)).sum()]).double()
    norms = torch.stack([torch.linalg.vector_norm(delta), torch.linalg.vector_norm(lost)]).double()
    return merged, torch.cat([stats, norms.square()])


def rounding_line(stats, dtype):
    """One line: how much of the update merging into `dtype` rounded away (merged_weight's sums, added up); a
    warning where more than LOST_WARNING of its norm is lost."""
    updated, vanished, update_square, lost_square = stats.tolist()
    lost = math.sqrt(lost_square / update_square) if update_square else 0.0
    line = (f"merged in {str(dtype).removeprefix('torch.')}: {vanished / max(updated, 1):.1%} of the updated weights "
            f"equal the base's after the cast, {lost:.1%} of the update's norm is lost")
    if lost > LOST_WARNING:
        return (f"warning: {line}; evaluate the base with the adapter (OUT/adapter, unmerged) or merge with "
                f"--merge-dtype float32")
    return line


@torch.no_grad()
def merge_into(model, lora_weights, scales, dtype, device):
    """Fold LoRA updates given as tensors into `model`, a model without LoRA (the base as stored): each targeted
    nn.Linear's weight becomes W + scale * B @ A, computed on `device` in fp32 one layer at a time and cast once to
    `dtype`. lora_weights: {MODULE.lora_A.weight, MODULE.lora_B.weight: tensor} (a LoRA model's state dict);
    scales: {MODULE: alpha / r}. Returns merged_weight's sums over every layer."""
    totals = torch.zeros(4, dtype=torch.float64)
    for name, scale in scales.items():
        linear = model.get_submodule(name)
        lora_A = lora_weights[f"{name}.lora_A.weight"].to(device, torch.float32)  # (r, in)
        lora_B = lora_weights[f"{name}.lora_B.weight"].to(device, torch.float32)  # (out, r)
        merged, stats = merged_weight(linear.weight.to(device), scale * lora_B @ lora_A, dtype)
        linear.weight = nn.Parameter(merged.to(linear.weight.device), requires_grad=False)
        totals += stats.cpu()
    return totals


# ----------------------------------------------------------------------------- PEFT's on-disk layout
# PEFT's adapter_config.json fields that we write as constants and refuse to load otherwise.
PEFT_FIXED = dict(bias="none", fan_in_fan_out=False, modules_to_save=None, use_rslora=False,
                  use_dora=False, layers_to_transform=None)


def peft_key(module_name, param_name):
    """PEFT's safetensors key: `base_model.model.<module>.lora_A.weight` (no adapter name)."""
    return f"base_model.model.{module_name}.{param_name}"


def save_lora(model, out_dir, base_model_name_or_path="", targets=None, weights=None):
    """Save the LoRA adapter in PEFT's layout: adapter_config.json + adapter_model.safetensors.
    targets: the regex apply_lora was given (default: the family's). weights: the LoRA tensors by state-dict name,
    where the model's own are not whole (a state dict gathered from FSDP2's shards)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers to save")
    settings = {(m.r, m.alpha, getattr(m.dropout, "p", 0.0)) for _, m in modules}
    if len(settings) != 1:
        raise ValueError(f"LoRA layers with different r/alpha/dropout cannot share one config: {settings}")
    r, alpha, dropout = settings.pop()
    names = [name for name, _ in modules]
    # PEFT applies a string target_modules with re.fullmatch over module names, as apply_lora does.
    # If the regex does not reproduce the wrapped names exactly, list them instead.
    if targets is None:
        try:
            targets = vlm.lora_targets(model)
        except ValueError:  # a family not in vlm.FAMILIES: the names themselves
            targets = ""
    regex = targets
    if [name for name, _ in model.named_modules() if re.fullmatch(regex, name)] != names:
        regex = "|".join(re.escape(name) for name in names)
    config = dict(peft_type="LORA", task_type=None, r=r, lora_alpha=alpha, lora_dropout=dropout,
                  target_modules=regex, base_model_name_or_path=base_model_name_or_path,
                  inference_mode=True, init_lora_weights=True, revision=None, **PEFT_FIXED)
    tensor = lambda name, module, part: (getattr(module, part).weight if weights is None
                                         else weights[f"{name}.{part}.weight"])
    tensors = {peft_key(name, f"{part}.weight"): tensor(name, module, part).detach().cpu().contiguous()
               for name, module in modules for part in ("lora_A", "lora_B")}
    os.makedirs(out_dir, exist_ok=True)
    with common.atomic_path(os.path.join(out_dir, "adapter_model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    common.write_atomic(os.path.join(out_dir, "adapter_config.json"), [json.dumps(config, indent=2)])


def load_lora(model, adapter_dir):
    """Load a PEFT-layout LoRA adapter into a model (applying LoRA first if it has none); strict keys."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    for field, value in PEFT_FIXED.items():
        if config.get(field, value) != value:
            raise ValueError(f"{adapter_dir}: {field}={config[field]!r} is not supported (only {value!r})")
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if isinstance(targets, list):  # PEFT: a list of names matches any module name ending in one of them
        targets = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"
    modules = lora_modules(model)
    if not modules:
        apply_lora(model, r, alpha, config.get("lora_dropout", 0.0), targets)
        modules = lora_modules(model)
    elif any((m.r, m.alpha) != (r, alpha) for _, m in modules):
        raise ValueError(f"{adapter_dir}: r={r}, lora_alpha={alpha} differ from the model's LoRA layers")

    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = {peft_key(name, f"{part}.weight"): getattr(module, part).weight
              for name, module in modules for part in ("lora_A", "lora_B")}
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"{adapter_dir}: adapter keys do not match the model; "
                       f"missing {missing[:5]} ({len(missing)} in all), "
                       f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    with torch.no_grad():
        for key, param in params.items():
            if tensors[key].shape != param.shape:  # copy_ would broadcast silently
                raise ValueError(f"{adapter_dir}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(tensors[key])
    return [name for name, _ in modules]
