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

# The trainable weights alone (LoRA, and the projector if trained), gathered whole onto rank 0's CPU: the frozen
# base is never gathered (it is on disk already), so a checkpoint of a 7B LoRA run copies megabytes, not 14 GB.
TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def trainable_names(raw_model):
    return [name for name, p in raw_model.named_parameters() if p.requires_grad]


def save_checkpoint(model, raw_model, optimizer, scheduler, step, out, config, rank, world_size):
    """OUT/checkpoint-STEP/ written in a temporary folder and renamed, then OUT/latest points to it:
    a crash at any moment leaves the last good checkpoint intact. config: the run's resolved arguments."""
    weights = get_model_state_dict(model, options=TRAINABLE)  # collective: every rank
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=TRAINABLE)
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


# A resume continues exactly the run that wrote the checkpoint, so every entry of the run's configuration must be
# the same (which examples each step sees, how they are split over processes and micro-batches, precision, the
# parallel mode, the optimizer and schedule, LoRA, the loss, the pairs' content, the reference), except these,
# which change no number: where the outputs go and how they are shown.
RESUME_FREE = ("out", "resume", "save_every", "progress", "merge", "cache_data", "gradient_checkpointing",
               "global_batch", "data", "skipped")
NAMES = {"world_size": "number of processes", "data_digest": "the data's content"}


def check_resume(path, config):
    """Refuse to resume from a checkpoint made with another configuration, naming each difference."""
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f)["args"]
    differ = [f"{NAMES.get(k, k)} ({saved.get(k)!r} in the checkpoint, {config[k]!r} now)"
              for k in config if k not in RESUME_FREE and saved.get(k) != config[k]]
    if differ:
        raise ValueError(f"--resume: {path} was made with other {'; '.join(differ)}; resume with the same "
                         f"arguments and number of processes, or use another --out")


def load_checkpoint(model, optimizer, scheduler, path, rank):
    """Restore weights, optimizer, scheduler and RNG from a checkpoint (check_resume first); return the step to
    continue at."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
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
    sharded (FSDP), or a merge over a bf16 base: the trained weights go into a fresh fp32 copy of the model
    (fresh_model()) on rank 0's CPU, its frozen part read from disk as it was loaded."""
    weights = get_model_state_dict(model, options=TRAINABLE)  # collective: every rank
    if rank != 0:
        return
    if sharded or (merge and any(p.dtype != torch.float32 for p in raw_model.parameters())):
        # a bf16 base (trainable.prepare_model) is merged into the weights as loaded, not into their bf16
        # copies, which would round small updates away
        raw_model = fresh_model()
        missing = set(trainable_names(raw_model)) - weights.keys()
        if missing:
            raise RuntimeError(f"trained weights missing from the gathered state: {sorted(missing)[:5]}")
        raw_model.load_state_dict(weights, strict=False)
    if lora_r > 0:
        adapter_dir = os.path.join(out, "adapter")
        lora.save_lora(raw_model, adapter_dir, base_model_name_or_path=os.path.abspath(model_path))
        others = {k: v for k, v in weights.items() if ".lora_" not in k}
        if others:  # --train-projector: LLaVA's own name for the trained weights outside LoRA
            save_file(others, os.path.join(adapter_dir, "non_lora_trainables.safetensors"))
        if merge:
            save_model_atomic(lora.remove_lora(raw_model), processor, os.path.join(out, "merged"))
    else:
        save_model_atomic(raw_model, processor, os.path.join(out, "model"))
