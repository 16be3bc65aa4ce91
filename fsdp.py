"""
FSDP2 (torch's `fully_shard`) for LoRA training: one unit per decoder layer, bottom-up, the rest in the root unit.
The frozen base keeps the dtype it is loaded in (bf16 under --precision bf16: half the memory, and half the bytes of
every all-gather), the trainable parameters (LoRA, the projector if asked) are fp32 in the same units: FSDP2
gathers each dtype apart.

Loaded so that no rank ever holds the whole model on its device, nor the whole fp32 model anywhere:

  1. rank 0 alone loads the model from disk into host memory, in the base's dtype, and prepares it (LoRA, freezing)
     as one process would: the same random draws, so LoRA's A is the one process's;
  2. every rank builds the same model on the meta device (no memory), prepares it the same way, and shards it;
  3. each rank allocates its shards only, and rank 0 broadcasts the weights tensor by tensor, each rank keeping its
     own shard (torch.distributed.checkpoint's set_model_state_dict, broadcast_from_rank0); the buffers a state
     dict leaves out (rotary frequencies, position ids) are broadcast too.

A rank's device then holds 1/N of the model from the start (bench/dpo_step.py --fsdp-load measures it).
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

import vlm


def shard(model):
    """FSDP2 in place: each decoder layer a unit, bottom-up, then the root unit holding the rest."""
    for layer in model.get_submodule(vlm.spec(model)["decoder_layers"]):
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "get_image_features")  # dpo.shared_image_forward calls it outside forward
    return model


def load_sharded(path, device, dtype, prepare, rank):
    """The model of the folder `path` in `dtype`, prepare(model) applied (LoRA, freezing: the same on every rank),
    sharded by `shard` and on `device`. Returns (model, processor); rank 0 alone reads the weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    full = None
    if rank == 0:  # first, as one process would: the random draws of prepare (LoRA's A) are then the same
        full, processor = vlm.load(path, "cpu", dtype)
        prepare(full)
    else:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):  # shapes and dtypes only: no memory, no random draw
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    vlm.family_of(model)
    prepare(model)
    shard(model)
    model.to_empty(device=device)  # this rank's shards, uninitialised: filled below
    set_model_state_dict(model, full.state_dict() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # what no state dict holds (non-persistent buffers)
        if rank == 0:
            buffer.copy_(full.get_buffer(name))
        dist.broadcast(buffer, src=0)
    del full
    return model, processor


def local_bytes(model):
    """Bytes of this rank's parameters and buffers (a DTensor counts its local shard)."""
    tensors = list(model.parameters()) + list(model.buffers())
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)
