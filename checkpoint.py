"""
Nothing lost on a crash: training checkpoints that survive a kill at any moment, resume, and the results.

A checkpoint is OUT/checkpoint-STEP/ (trainable weights in safetensors, optimizer, scheduler, RNG, step and
the run's configuration), written in a temporary folder and renamed, then OUT/latest is pointed at it. Every
rank takes part (the state dicts of FSDP2 are gathered collectively); rank 0 writes. Nothing is ever
unpickled on load: weights are safetensors and the rest loads with torch.load(..., weights_only=True).
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import common
import lora

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_names(raw_model):
    return [name for name, p in raw_model.named_parameters() if p.requires_grad]


def save_checkpoint(model, raw_model, optimizer, scheduler, step, out, config, rank, world_size):
    """OUT/checkpoint-STEP/ written in a temporary folder and renamed, then OUT/latest points to it:
    a crash at any moment leaves the last good checkpoint intact. config: the run's resolved arguments."""
    names = set(trainable_names(raw_model))
    weights = {k: v for k, v in get_model_state_dict(model, options=FULL).items() if k in names}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL)  # collective: every rank
    # Every rank writes its RNG state into the same temporary folder, so it has a fixed name (not common.atomic_path)
    final, tmp = os.path.join(out, f"checkpoint-{step:06d}"), os.path.join(out, f"checkpoint-{step:06d}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    common.barrier(world_size)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available()
                else torch.empty(0, dtype=torch.uint8)}, os.path.join(tmp, f"rng-rank{rank}.pt"))
    if rank == 0:
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "scheduler": scheduler.state_dict(), "args": config}, f, indent=1)
    common.barrier(world_size)
    if rank == 0:
        previous = latest_checkpoint(out)
        if os.path.isdir(final) and final != previous:  # left by an earlier run into the same folder
            shutil.rmtree(final)
        os.replace(tmp, final)
        with common.atomic_path(os.path.join(out, "latest")) as tmp, open(tmp, "w") as f:
            f.write(os.path.basename(final))
        if previous and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
    common.barrier(world_size)


def latest_checkpoint(out):
    try:
        with open(os.path.join(out, "latest")) as f:
            return os.path.join(out, f.read().strip())
    except FileNotFoundError:
        return None


# The arguments that decide which examples each step sees and how it updates: a resume must keep them.
RUN_ARGS = ("objective", "model", "data", "batch_size", "grad_accum", "global_batch", "epochs", "max_steps", "lr",
            "warmup_ratio", "seed", "lora_r", "lora_alpha", "beta", "loss_type", "label_smoothing", "template",
            "max_length")


def load_checkpoint(model, optimizer, scheduler, path, rank, config):
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; return the step to continue at.
    A checkpoint made with other RUN_ARGS than `config` is refused."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    differ = [k for k in RUN_ARGS if state["args"].get(k) != config[k]]
    if differ:
        raise ValueError(f"{path} was made with other {', '.join(differ)}; resume with the same arguments")
    set_model_state_dict(model, load_file(os.path.join(path, "trainable.safetensors")),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, torch.load(os.path.join(path, "optimizer.pt"), weights_only=True),
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng["cuda"].numel():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


# ----------------------------------------------------------------------------- the results
def save_model_atomic(model, processor, out_dir):
    """save_pretrained into a temporary folder, then rename: a crash never leaves half a model."""
    with common.atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def export(model, raw_model, processor, out, rank, model_path, lora_r, merge, sharded, fresh_model):
    """The results: OUT/adapter/ (PEFT layout) and, with merge, OUT/merged/; OUT/model/ for full fine-tuning.
    sharded (FSDP): the shards are gathered into a fresh copy (fresh_model()) on rank 0's CPU first."""
    weights = get_model_state_dict(model, options=FULL)  # collective: every rank
    if rank != 0:
        return
    if sharded:
        raw_model = fresh_model()  # an unsharded copy on CPU, to hold the gathered weights
        raw_model.load_state_dict(weights)
    elif merge and any(p.dtype != torch.float32 for p in raw_model.parameters()):
        # a bf16 base (train_ddp.prepare_model): merge into the weights as loaded, not into their bf16 copies,
        # which would round away small updates
        trained = {k: weights[k] for k in trainable_names(raw_model)}
        raw_model = fresh_model()
        raw_model.load_state_dict(trained, strict=False)
    if lora_r > 0:
        adapter_dir = os.path.join(out, "adapter")
        lora.save_lora(raw_model, adapter_dir, base_model_name_or_path=os.path.abspath(model_path))
        others = {k: v for k, v in weights.items() if k in trainable_names(raw_model) and ".lora_" not in k}
        if others:  # --train-projector: LLaVA's own name for the trained weights outside LoRA
            save_file(others, os.path.join(adapter_dir, "non_lora_trainables.safetensors"))
        if merge:
            save_model_atomic(lora.remove_lora(raw_model), processor, os.path.join(out, "merged"))
    else:
        save_model_atomic(raw_model, processor, os.path.join(out, "model"))
