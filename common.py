"""
What every script needs, in one small module (as nanochat's common.py): torchrun's environment, rank-0
printing, the dtypes, and the file protocols that keep finished work on disk through a crash.

  compute_init, print0, all_reduce_sum,   one set-up for 1 CPU process and N GPUs alike
    barrier, finish_distributed
  compute_dtype, weight_dtype, autocast   the one place that decides precision (bf16 on CUDA, fp32 on CPU;
                                          SEVA_CPU_BF16=1: bf16 on CPU too, as tests of the GPU's path run)
  sample_seed                             the per-sample seed every random choice draws from
  atomic_path, write_atomic               files (and folders) written whole or not at all
  read_jsonl, read_records                jsonl / json records, errors naming file and line, torn line dropped,
                                          a line that is not UTF-8 named, skipped and counted
  to_rgb                                  an image as the 8-bit RGB a processor expects, through its real mode
  files_fingerprint, args_digest          which weights, which arguments: what decides an output
  ShardedOutput                           work in fixed chunks over N ranks, appended as it finishes, resumed
                                          after any kill, merged in order (seva.py and eval/runner.py)
  run_main, Stopped, HelpFormatter        a script's user errors as one line, its --help with every default;
  markdown_table                          the tables every report prints
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- processes and devices
def compute_init(seed=0):
    """Read torchrun's environment; return (rank, world_size, device). One place for 1 CPU or N GPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # NCCL for CUDA tensors, gloo for the few CPU tensors (metric sums, gathered objects) we reduce
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    return rank, world_size, device


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values, world_size):
    """Sum a list of floats over the ranks."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def sample_seed(seed, sample_id):
    """A stable per-sample seed from (run seed, sample id); the same in every process, unlike hash(). Every
    per-sample random choice (augmentations, diffusion noise, sampling) draws from it."""
    # The id is used through its text, so the int 7 and the string "7" name the same sample.
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    # 63 bits fit a signed 64-bit int: random.Random, numpy and torch.Generator all accept it.
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def barrier(world_size):
    if world_size > 1:
        dist.barrier()


def finish_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# A CPU runs fp32; with this variable set to 1 it runs bf16 autocast as a GPU does (tests of the GPU's path).
CPU_BF16 = "SEVA_CPU_BF16"


def compute_dtype(device, precision):
    """The autocast dtype: bf16 on CUDA with native bf16, None (plain fp32) on CPU unless SEVA_CPU_BF16=1. fp16
    is refused: we run no loss scaler."""
    if precision == "fp16":
        raise ValueError("fp16 is not supported (no loss scaler); use bf16 on GPUs or fp32")
    if precision == "bf16" and device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):  # a V100 or T4 would emulate it, slowly
            raise ValueError("this GPU has no native bf16 (it would emulate it); use --precision fp32")
        return torch.bfloat16
    if precision == "bf16" and os.environ.get(CPU_BF16) == "1":
        return torch.bfloat16
    return None


def weight_dtype(device, precision):
    """The dtype to load a model's weights in for inference: bf16 where compute_dtype is bf16, else fp32."""
    return compute_dtype(device, precision) or torch.float32


def autocast(device, dtype):
    """torch.autocast in `dtype` on `device`, or nothing when dtype is None (fp32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (a file or a folder) to write; on success rename it into place,
    so a reader never sees half of it and a crash leaves the old one (or none)."""
    tmp = f"{path.rstrip('/')}.tmp"  # same folder: the rename is atomic; a rerun clears what a crash left
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if os.path.isdir(tmp):
        shutil.rmtree(path, ignore_errors=True)  # a folder cannot be renamed over a folder
    else:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it visible
    os.replace(tmp, path)


def remove(path):
    """Remove a file or a folder, if there is one."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def write_atomic(path, lines):
    """Write text lines (each gets a newline) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def read_jsonl(path, appended=False, skipped=None):
    """The rows of a jsonl file; a malformed line is an error naming the file and line.

    A line that is not UTF-8 is a bad record, not a bad file: it is named (file, line, byte), skipped, and
    counted in `skipped` (a list that gets (path, line, reason)) where one is given.
    appended: the file is appended to as work finishes (partial files, metrics), so what follows its last
    newline is a torn line (a kill mid-write) and is dropped, and a missing file has no rows."""
    if appended and not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if appended:
        lines = lines[:-1]  # after the last newline: empty, or torn
    rows = []
    for line_no, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            print0(f"{path}:{line_no}: {reason}; skipped")
            if skipped is not None:
                skipped.append((path, line_no, reason))
            continue
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                torn = " (only the last line may be torn)" if appended else ""
                raise ValueError(f"{path}:{line_no}: malformed json line{torn}: {e}") from e
    return rows


def read_records(path, skipped=None):
    """A LLaVA-665k style json list, or a jsonl file of records (read_jsonl: a line that is not UTF-8 is skipped
    and counted in `skipped`); errors name the file (and line)."""
    if path.endswith(".jsonl"):
        return read_jsonl(path, skipped=skipped)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); one json document has no "
                         f"records to skip: fix the byte, or write the records as jsonl") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed json: {e}") from e


def file_digest(path):
    """sha256 of a file's bytes: which content a run read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def args_digest(decisive):
    """A short hash of the arguments that decide an output."""
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def files_fingerprint(*folders):
    """Which weights: name, size and modification time of every file in the folders. An output made from other
    weights under the same folder names is then not reused."""
    h = hashlib.sha256()
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            stat = os.stat(os.path.join(folder, name))
            h.update(f"{os.path.abspath(folder)}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- images
def to_rgb(image):
    """A PIL image as the 8-bit RGB image a processor expects, converted through its real mode.

    PIL's convert("RGB") clips the 16- and 32-bit integer modes a 16-bit PNG opens in ("I;16", "I") to 255,
    which turns such an image white: their values are scaled from 16 bits to 8 instead. Transparency (RGBA,
    LA, a palette or grey image with a transparent colour) is composited onto white, as transformers'
    convert_to_rgb does, rather than dropped."""
    if image.mode.startswith("I"):  # 16-bit PNGs (I;16, I;16B) and the 32-bit mode PIL may widen them to
        import numpy as np
        from PIL import Image
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        from PIL import Image
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------- sharded, resumable output
class ShardedOutput:
    """Work on `ids` (one per item) in fixed chunks of `chunk_size`; chunk k is rank k % N's, so every batch
    is the one a single process makes and the merged file equals the 1-process file.

    Each finished chunk's rows ({"index": position, "id": ids[position], ...}) are appended to
    OUT.partial-rank{r}-of-{N}.jsonl and fsynced, after a header holding the arguments that decide the output
    (`decisive`). A rerun keeps the chunks a file holds in full (a torn last line is dropped) and does the
    rest; partial files made with other arguments or another number of processes are refused, naming what
    differs. Rank 0 merges the rows in order once every rank is done.
    """

    def __init__(self, out, decisive, ids, chunk_size, rank=0, world_size=1, what="arguments", items="instances"):
        self.out, self.ids, self.rank, self.world_size = out, list(ids), rank, world_size
        self.what, self.items = what, items  # the words the errors use: "other arguments", "lack instances"
        self.chunks = [list(range(start, min(start + chunk_size, len(self.ids))))
                       for start in range(0, len(self.ids), chunk_size)]
        self.header = dict(partial=1, args_hash=args_digest(decisive), args=decisive, world_size=world_size)
        self.path = self.partial_path(rank)
        self.done_before = 0

    def partial_path(self, rank):
        return f"{self.out}.partial-rank{rank}-of-{self.world_size}.jsonl"

    def read(self, path):
        """The rows of a partial file, its header checked against ours."""
        rows = read_jsonl(path, appended=True)
        old = rows.pop(0) if rows else None
        if old and (old.get("args_hash"), old.get("world_size")) != (self.header["args_hash"], self.world_size):
            ours, theirs = self.header["args"], old.get("args", {})
            differ = [k for k in ours if theirs.get(k) != ours[k]]
            differ += ["number of processes"] if old.get("world_size") != self.world_size else []
            raise ValueError(f"{path} was made with other {self.what} (differing: {', '.join(differ)}); rerun "
                             f"with them to resume, or delete the partial files to start over")
        return [row for row in rows if row["index"] < len(self.ids) and row.get("id") == self.ids[row["index"]]]

    def resume(self):
        """Refuse foreign partial files; keep this rank's complete chunks (rewritten atomically); return the
        indices of the chunks this rank has still to do."""
        for path in glob.glob(glob.escape(self.out) + ".partial-rank*-of-*.jsonl"):
            if path != self.path:
                self.read(path)
        rows = self.read(self.path)
        present = {row["index"] for row in rows}
        done = {k for k, chunk in enumerate(self.chunks) if all(i in present for i in chunk)}
        keep = {i for k in done for i in self.chunks[k]}
        write_atomic(self.path, [json.dumps(self.header)] +
                     [json.dumps(row, ensure_ascii=False) for row in rows if row["index"] in keep])
        self.done_before = len(done)
        return [k for k in range(self.rank, len(self.chunks), self.world_size) if k not in done]

    def append(self, rows):
        """One finished chunk's rows, on disk before this returns: a chunk written survives any kill."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())

    def merge(self):
        """Rank 0: every rank's rows in order, one per id (call after every rank has appended its chunks)."""
        rows = {}
        for rank in range(self.world_size):
            rows.update((row["index"], row) for row in self.read(self.partial_path(rank)))
        missing = [self.ids[i] for i in range(len(self.ids)) if i not in rows]
        if missing:
            raise RuntimeError(f"{self.out}: the partial files lack {self.items} {missing[:10]}; rerun to complete "
                               f"them")
        return [rows[i] for i in range(len(self.ids))]

    def remove(self):
        for rank in range(self.world_size):
            os.remove(self.partial_path(rank))


# ----------------------------------------------------------------------------- scripts
class Stopped(Exception):
    """A run that stopped early on purpose (a signal, its launcher gone); the message says how to resume."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def run_main(main, name, errors=(ValueError, OSError, FloatingPointError)):
    """Run a script's main(): a user error (bad input, a missing file) ends in one line, `NAME: error: ...`,
    never a traceback; so do Ctrl-C and SIGTERM (finished work stays on disk: rerun to resume) and a Stopped
    run (its line says how to resume). Exit codes: 1 for an error, 128 + the signal's number for a signal."""
    def interrupted(number, frame):
        raise KeyboardInterrupt(signal.Signals(number).name)
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        main()
    except Stopped as e:
        print0(f"{name}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        which = str(e) or "SIGINT"
        print0(f"{name}: stopped by {which}; what finished is on disk: rerun the same command to continue",
               file=sys.stderr)
        sys.exit(128 + signal.Signals[which].value)
    except errors as e:
        sys.exit(f"{name}: error: {e}")
    finally:
        signal.signal(signal.SIGTERM, previous)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the script's docstring as written and every flag's default beside its help ("(default: 8)"),
    the paper's value staying in the help text. Switches (on/off flags), and flags whose default is empty or
    depends on another (None), say so in their own help, as do flags whose help already names its default."""

    def _get_help_string(self, action):
        if action.default in (None, "", []) or isinstance(action.default, bool) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def markdown_table(header, rows):
    """The lines of a markdown table: a header row, its rule, one line per row (cells as given)."""
    line = lambda cells: "| " + " | ".join(str(cell) for cell in cells) + " |"
    return [line(header), "|---" * len(header) + "|"] + [line(row) for row in rows]

