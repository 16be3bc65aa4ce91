"""
The model train_ddp.py trains: loaded, LoRA added (or not), what SeVa never trains frozen, trainable weights in
fp32; then wrapped for N processes (DDP, or FSDP2 one decoder layer per unit), with the gradients synchronised on
a step's last micro-step only; and the pair forward (dpo.PAIR_FORWARDS) the model can run.
"""
from contextlib import nullcontext

import torch

import common
import dpo
import fsdp
import lora
import vlm


def prepare_model(path, device, amp_dtype=None, objective="dpo", lora_r=0, lora_alpha=0.0, lora_dropout=0.0,
                  train_projector=False, parallel="ddp", gradient_checkpointing=False, train_vision=False, rank=0):
    """Load the model, add LoRA (or not), freeze what SeVa never trains. Returns (model, processor).

    LoRA under bf16 autocast stores the frozen base in bf16: half its memory, and autocast computes its matmuls in
    bf16 anyway. Every trainable parameter (LoRA, and the projector with train_projector) is fp32 whatever the
    base's dtype: AdamW's small updates on bf16 weights would round away. LoRA under FSDP2 (parallel "fsdp",
    torchrun) is built on the meta device and sharded before any weight is read (fsdp.load_sharded): no rank
    holds the whole model; full fine-tuning there loads the fp32 model on each rank and wrap() shards it."""
    low = amp_dtype is not None and lora_r > 0

    def prepare(model):
        if lora_r > 0:
            lora.apply_lora(model, lora_r, lora_alpha, lora_dropout)  # freezes all but LoRA
            vlm.freeze_vision(model, train_projector=train_projector)
        else:  # full fine-tuning of the language model (and the projector, as LLaVA's SFT)
            vlm.freeze_vision(model, train_projector=objective == "sft" or train_projector)
        if train_vision:
            vlm.unfreeze_vision(model)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # master weights in fp32
        if objective == "dpo":  # paper: dropout off for DPO (it would make the reference noisy)
            vlm.disable_dropout(model)
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    if parallel == "fsdp" and lora_r > 0:
        return fsdp.load_sharded(path, device, amp_dtype if low else torch.float32, prepare, rank)
    model, processor = vlm.load(path, device, amp_dtype if low else torch.float32)
    prepare(model)
    return model, processor


def wrap(model, parallel, world_size, device):
    """DDP, or FSDP2 with one unit per decoder layer (bottom-up) and the rest in the root unit (fsdp.shard; LoRA
    models come sharded from prepare_model)."""
    if world_size == 1:
        return model
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import FSDPModule
    return model if isinstance(model, FSDPModule) else fsdp.shard(model)


def grad_sync(model, last, parallel, world_size):
    """Synchronise gradients on the last micro-step of a step only."""
    if world_size == 1:
        return nullcontext()
    if parallel == "fsdp":
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else model.no_sync()


def pair_forward_for(model, name):
    """dpo.PAIR_FORWARDS[name], or the concatenated forward where the model cannot run it (said once, here)."""
    problem = vlm.pair_forward_problem(model, name)
    if problem:
        common.print0(f"{name}: {problem}; falling back to the concatenated forward")
        return dpo.concatenated_forward
    return dpo.PAIR_FORWARDS[name]
