"""
A run's results: OUT/adapter/ in PEFT's layout (with the base weights' digest), OUT/merged/ with --merge, in the
dtype the user will evaluate in, and OUT/model/ for full fine-tuning. Every rank calls export (the trained
weights are gathered collectively); rank 0 writes.
"""
import json
import os

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import checkpoint
import lora
import vlm


def export(model, raw_model, processor, out, rank, model_path, lora_r, merge, sharded, fresh_model, base=None,
           merge_dtype="auto", device="cpu"):
    """The results: OUT/adapter/ (PEFT layout, and base: the base weights' digest into its base_model.json) and,
    with merge, OUT/merged/ in merge_dtype (merged_model); OUT/model/ for full fine-tuning (sharded, FSDP: the
    trained weights go into a fresh copy of the model, fresh_model(), on rank 0's CPU)."""
    weights = get_model_state_dict(model, options=checkpoint.TRAINABLE)  # collective: every rank
    if rank != 0:
        return
    if lora_r == 0:
        if sharded:
            raw_model = fresh_model()
            missing = set(checkpoint.trainable_names(raw_model)) - weights.keys()
            if missing:
                raise RuntimeError(f"trained weights missing from the gathered state: {sorted(missing)[:5]}")
            raw_model.load_state_dict(weights, strict=False)
        checkpoint.save_model_atomic(raw_model, processor, os.path.join(out, "model"))
        return
    adapter_dir = os.path.join(out, "adapter")
    lora.save_lora(raw_model, adapter_dir, base_model_name_or_path=os.path.abspath(model_path), weights=weights)
    if base:
        checkpoint.write_base(adapter_dir, model_path, base)
    others = {k: v for k, v in weights.items() if ".lora_" not in k}
    if others:  # --train-projector: LLaVA's own name for the trained weights outside LoRA
        save_file(others, os.path.join(adapter_dir, "non_lora_trainables.safetensors"))
    if merge:
        scales = {name: module.scale for name, module in lora.lora_modules(raw_model)}
        checkpoint.save_model_atomic(merged_model(model_path, weights, scales, merge_dtype, device), processor,
                                     os.path.join(out, "merged"))


def stored_dtype(model_path, name="auto"):
    """The dtype `name` names (bfloat16, float16, float32), or for auto the one the model folder's config.json
    says its weights are stored in (LLaVA-1.5: float16; float32 where it says none)."""
    if name != "auto":
        return getattr(torch, name)
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    for section in (config, config.get("text_config") or {}):
        stored = section.get("dtype") or section.get("torch_dtype")
        if stored in ("bfloat16", "float16", "float32"):
            return getattr(torch, stored)
    return torch.float32


def merged_model(model_path, weights, scales, dtype="auto", device="cpu"):
    """The base model with the trained weights in, in `dtype` (stored_dtype): loaded from disk in the dtype it is
    stored in (never a fp32 copy of a half-precision base), each LoRA layer merged on `device` in fp32 and cast
    once (lora.merge_into), the other trained weights (--train-projector) cast once; one line says how much of the
    update the cast rounds away (lora.rounding_line: a warning where it loses it)."""
    stored = stored_dtype(model_path)
    dtype = stored if dtype == "auto" else stored_dtype(model_path, dtype)
    merged, _ = vlm.load(model_path, "cpu", stored)
    print(lora.rounding_line(lora.merge_into(merged, weights, scales, dtype, device), dtype), flush=True)
    for name, value in weights.items():
        if ".lora_" not in name:
            module_name, _, param_name = name.rpartition(".")
            if not hasattr(merged.get_submodule(module_name), param_name):
                raise KeyError(f"{name}: a trained weight the base model {model_path} does not have")
            setattr(merged.get_submodule(module_name), param_name,
                    torch.nn.Parameter(value.to(dtype), requires_grad=False))
    return merged.to(dtype)
