"""
Nothing lost on a crash: training checkpoints that survive a kill at any moment, prove themselves and resume
(the results a run ends with: export.py).

A checkpoint is OUT/checkpoint-STEP/, written in a temporary folder and renamed, then OUT/latest is pointed at it:
  .metadata, __R_0.distcp  the trainable weights (LoRA, the projector if trained) and AdamW's state, in
                           torch.distributed.checkpoint's format: each rank R writes its own part (its shards under
                           FSDP2; under DDP each replicated tensor is written once, by one rank) and reads back only
                           its own; the frozen base is never written (it is on disk already)
  rng-rankR.pt             each rank's RNG state
  state.json               the step, the scheduler and the run's configuration
  manifest.json            the size and sha256 of every other file, written last by rank 0
No rank ever gathers the whole state. Nothing is unpickled on load but DCP's own metadata classes (SafeReader): the
tensors and the rest load with torch.load(..., weights_only=True).
Several nodes: OUT must be on a filesystem every rank shares (rank 0 checks every rank's shard, writes the manifest
over them and renames the folder); a rank's shard not seen by rank 0 stops the run in one line.

A resume takes the newest checkpoint whose files all match their manifest (good_checkpoint); a damaged, truncated
or incomplete one (any rank's shard included) is named in one line and the one before it is used; the last `keep`
(default 2) are kept. A checkpoint of the earlier, gathered format (trainable.safetensors) is refused in one line.
The run's configuration holds base_digest, which base weights it trains (base_digest()): a resume, or an
adapter loaded onto a model, on other weights is refused.
"""
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

import common

# The results' (export): the trainable weights alone (LoRA, and the projector if trained), gathered whole onto rank
# 0's CPU; the frozen base is never gathered (it is on disk already).
TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# A checkpoint's: each rank's own part of the trainable weights and of AdamW's state (DTensor shards under FSDP2,
# whole tensors in one process or under DDP), never gathered.
SHARDED = StateDictOptions(ignore_frozen_params=True)
LOAD_SHARDED = StateDictOptions(ignore_frozen_params=True, strict=False)  # dcp.load has checked every key is there


def trainable_names(raw_model):
    return [name for name, p in raw_model.named_parameters() if p.requires_grad]


def save_checkpoint(model, optimizer, scheduler, step, out, config, rank, world_size, keep=2):
    """OUT/checkpoint-STEP/ written in a temporary folder with its manifest and renamed, then OUT/latest points
    to it and all but the newest `keep` checkpoints are removed: a crash at any moment leaves the last good
    checkpoints intact. Every rank calls it and writes its own shards. config: the run's resolved arguments."""
    # Every rank writes into the same temporary folder, so it has a fixed name (not common.atomic_path)
    final, tmp = os.path.join(out, f"checkpoint-{step:06d}"), os.path.join(out, f"checkpoint-{step:06d}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    common.barrier(world_size)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available()
                else torch.empty(0, dtype=torch.uint8)}, os.path.join(tmp, f"rng-rank{rank}.pt"))
    weights, optimizer_state = get_state_dict(model, optimizer, options=SHARDED)
    with one_process_quiet():  # collective: every rank writes its part
        written = dcp.save({"model": weights, "optimizer": optimizer_state}, storage_writer=dcp.FileSystemWriter(tmp),
                           no_dist=not dist.is_initialized())
    if rank == 0:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "scheduler": scheduler.state_dict(), "args": config}, f, indent=1)
    common.barrier(world_size)
    if rank == 0:
        for name in sorted({info.relative_path for info in written.storage_data.values()}):
            if not os.path.isfile(os.path.join(tmp, name)):
                raise OSError(f"{os.path.join(tmp, name)}: written by another rank, not seen by rank 0: --out "
                              f"must be on a filesystem every node shares")
        write_manifest(tmp)
        common.remove(final)  # left by an earlier run into the same folder, or by a resume from before it
        os.replace(tmp, final)
        with common.atomic_path(os.path.join(out, "latest")) as tmp, open(tmp, "w") as f:
            f.write(os.path.basename(final))
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    common.barrier(world_size)


def checkpoints(out):
    """OUT's checkpoint folders, oldest first (finished ones: never a .tmp)."""
    found = [name for name in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", name)] if os.path.isdir(out) else []
    return [os.path.join(out, name) for name in sorted(found, key=lambda name: int(name.split("-")[1]))]


def remove_checkpoints(out):
    """A fresh run into OUT starts over: the checkpoints of an earlier run there are removed."""
    for path in checkpoints(out) + glob_tmp(out):
        shutil.rmtree(path, ignore_errors=True)
    common.remove(os.path.join(out, "latest"))


def glob_tmp(out):
    return [os.path.join(out, n) for n in os.listdir(out) if n.endswith(".tmp")] if os.path.isdir(out) else []


# ----------------------------------------------------------------------------- checkpoints that prove themselves
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of every rank's shards


def write_manifest(folder):
    """manifest.json: {"files": {name: {"size", "sha256"}}} of every file in the folder, written last."""
    files = {name: {"size": os.path.getsize(os.path.join(folder, name)),
                    "sha256": common.file_digest(os.path.join(folder, name))}
             for name in sorted(os.listdir(folder)) if name != MANIFEST}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)


def checkpoint_problem(folder):
    """What is wrong with a checkpoint, naming the file (missing, truncated, damaged), or None: every file its
    manifest lists is there with its size and sha256."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"{path}: missing (an incomplete checkpoint, or one made before checkpoints had manifests)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: damaged ({e})"
    if DCP_METADATA not in files:
        return (f"{folder}: an earlier format (the weights gathered whole in trainable.safetensors), which this "
                f"version does not read" if "trainable.safetensors" in files else f"{folder}: no {DCP_METADATA}")
    for name, expected in files.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{file}: missing"
        size = os.path.getsize(file)
        if size != expected["size"]:
            return f"{file}: {size} bytes, {expected['size']} written (truncated or damaged)"
        if common.file_digest(file) != expected["sha256"]:
            return f"{file}: damaged (its sha256 differs from the one written)"
    return None


def good_checkpoint(out):
    """The checkpoint to resume from: the newest in OUT whose files all match their manifest, or None where OUT
    has none. Each one passed over, and a damaged OUT/latest, is named in one line; where checkpoints exist
    and none is good, the resume is refused."""
    found = checkpoints(out)
    if not found:
        return None
    pointer = latest_checkpoint(out)
    if pointer not in found:
        common.print0(f"{os.path.join(out, 'latest')}: {'missing' if pointer is None else 'names no checkpoint'}; "
                      f"looking for the newest good checkpoint")
    problems = []
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            if problems:
                common.print0(f"falling back to {folder}")
            return folder
        problems.append(problem)
        common.print0(f"--resume: {problem}; checkpoint refused")
    raise ValueError(f"--resume: no good checkpoint in {out} ({'; '.join(problems)}); rerun without --resume "
                     f"to start over")


# ----------------------------------------------------------------------------- which base weights
SAMPLE_BLOCKS, BLOCK = 16, 1 << 20  # a file larger than SAMPLE_BLOCKS x BLOCK is sampled, a smaller one read


def base_digest(model_path):
    """Which base weights: a short hash over the model folder's config and weight files (not their names'
    folder): each one's name and size, a safetensors file's header (every tensor's name, dtype, shape and
    place), and its bytes (whole up to 16 MiB, else 16 blocks of 1 MiB spread evenly). Seconds for a 7B model;
    other weights, even under the same path, give another digest."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(model_path) if n == "config.json" or n.endswith((".safetensors", ".bin")))
    for name in names:
        path = os.path.join(model_path, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}\n".encode())
        with open(path, "rb") as f:
            if name.endswith(".safetensors") and size >= 8:
                h.update(f.read(min(int.from_bytes(f.read(8), "little"), size - 8)))
            if size <= SAMPLE_BLOCKS * BLOCK:
                f.seek(0)
                h.update(f.read())
                continue
            for k in range(SAMPLE_BLOCKS):
                f.seek((size - BLOCK) * k // (SAMPLE_BLOCKS - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()[:16]


BASE_FILE = "base_model.json"  # in an adapter folder: which base it was trained on


def write_base(adapter_dir, model_path, digest):
    with open(os.path.join(adapter_dir, BASE_FILE), "w") as f:
        json.dump({"base_model": os.path.abspath(model_path), "base_digest": digest}, f, indent=1)


def check_base(adapter_dir, model_path, allow_other_base=False):
    """Refuse an adapter on other base weights than it was trained on (its base_model.json says which), unless
    allow_other_base; an adapter without the file (made elsewhere) is taken as it is."""
    path = os.path.join(adapter_dir, BASE_FILE)
    if allow_other_base or not os.path.exists(path):
        return
    with open(path) as f:
        made = json.load(f)
    if made.get("base_digest") != base_digest(model_path):
        raise ValueError(f"{adapter_dir}: trained on the base weights of {made.get('base_model')} (digest "
                         f"{made.get('base_digest')}), not on {model_path}'s ({base_digest(model_path)}); load it "
                         f"onto that model, or pass --allow-other-base to do so on purpose")


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
RESUME_FREE = ("out", "resume", "save_every", "progress", "merge", "merge_dtype", "prefetch", "cache_data",
               "gradient_checkpointing", "global_batch", "data", "skipped", "keep",
               "plan", "nproc_per_node", "nnodes", "gpu_memory", "mfu")  # --plan's flags (plan.py) train nothing
NAMES = {"world_size": "number of processes", "data_digest": "the data's content",
         "base_digest": "base weights (--model's content; --allow-other-base to resume anyway)"}


def check_resume(path, config):
    """Refuse to resume from a checkpoint made with another configuration, naming each difference (other base
    weights too, unless config["allow_other_base"])."""
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f)["args"]
    free = RESUME_FREE + (("base_digest", "allow_other_base") if config.get("allow_other_base") else
                          ("allow_other_base",))
    differ = [f"{NAMES.get(k, k)} ({saved.get(k)!r} in the checkpoint, {config[k]!r} now)"
              for k in config if k not in free and saved.get(k) != config[k]]
    if differ:
        raise ValueError(f"--resume: {path} was made with other {'; '.join(differ)}; resume with the same "
                         f"arguments and number of processes, or use another --out")


def load_checkpoint(model, optimizer, scheduler, path, rank):
    """Restore weights, optimizer, scheduler and RNG from a checkpoint (check_resume first); return the step to
    continue at. Every rank calls it and reads its own shards."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    weights, optimizer_state = get_state_dict(model, optimizer, options=SHARDED)  # this rank's tensors, filled
    both = {"model": weights, "optimizer": optimizer_state}
    SafeReader(path).read_metadata()  # a foreign .metadata refused in one line, before DCP's collective load
    with one_process_quiet():
        dcp.load(both, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"],
                   options=LOAD_SHARDED)
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng["cuda"].numel():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


# torch.distributed.checkpoint pickles its index (.metadata) and the optimizer's hyperparameters: read back with
# DCP's own classes only, so that a checkpoint from elsewhere cannot run code when it is loaded.
METADATA_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.path = file.name

    def find_class(self, module, name):
        if (module, name) in METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise ValueError(f"{self.path}: holds {module}.{name}, not one of torch.distributed.checkpoint's metadata "
                         f"classes; refused")


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, its .metadata unpickled into DCP's metadata classes only."""
    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, DCP_METADATA), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def one_process_quiet():
    """DCP warns that one process without a process group saves or loads alone: here that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's planner, the optimizer's hyperparameters (numbers, flags) read with torch.load(weights_only=True)."""
    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)  # raises on anything but tensors and plain values
        value.seek(0)
        super().load_bytes(read_item, value)


# ----------------------------------------------------------------------------- the results
def save_model_atomic(model, processor, out_dir):
    """save_pretrained into a temporary folder, then rename: a crash never leaves half a model."""
    with common.atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


# ----------------------------------------------------------------------------- a run stopped early
def stop_run(run, out, steps, reason, save_every, saved, keep):
    """End train_ddp.py's run after `steps` steps on a signal (the step's checkpoint written, with --save-every) or
    with its launcher gone (reason 0: nothing more written): common.Stopped, whose one line says how to resume."""
    if reason == 0:
        raise common.Stopped(f"its launcher is gone: stopped after step {steps} of {run.num_steps}, writing "
                             f"nothing more; rerun with --resume (from {latest_checkpoint(out)})", 1)
    if save_every and not saved:
        save_checkpoint(run.model, run.optimizer, run.scheduler, steps, out, run.config, run.rank,
                        run.world_size, keep)
    name = signal.Signals(reason).name
    how = (f"checkpoint {latest_checkpoint(out)} written: rerun the same command with --resume to continue exactly"
           if save_every else "no checkpoint (--save-every 0): a rerun starts over")
    raise common.Stopped(f"stopped by {name} after step {steps} of {run.num_steps}; {how}", 128 + reason)
