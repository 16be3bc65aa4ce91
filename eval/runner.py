"""
The common runner of eval/: a model folder, plus optionally a SeVa LoRA adapter, answers a list of
questions into an answer file in LLaVA's format, so LLaVA's official scorers accept it:

    {"question_id": ..., "prompt": ..., "text": ..., "answer_id": ..., "model_id": ..., "metadata": {...}}

Answers are greedy (the paper's evaluation: do_sample False, num_beams 1) and batched through
generate.py; `temperature > 0` samples instead, seeded, for paper Table 5's consistency study.

Resumable: each finished chunk of --batch-size questions is appended (flush + fsync) to
OUT.partial-rank{r}-of-{N}.jsonl; a rerun keeps the complete chunks (a torn last line is dropped) and
answers the rest. The answer file is written atomically at the end, in question order, with a sidecar
OUT.args.json; a rerun with the same settings then reads it back and generates nothing.
Under torchrun (train_ddp.compute_init) chunk k goes to rank k % N and rank 0 merges: every batch is the
one a single process makes, so the merged file equals the 1-process file.

The benchmarks (pope.py, toyvqa.py, ...) call `answer_questions`; the CLI answers any LLaVA question
file (jsonl: question_id, image, text), as LLaVA's model_vqa_loader.py does:

    python -m eval.runner --questions toy/pope/random.jsonl --out runs/eval/answers.jsonl
    torchrun --standalone --nproc_per_node=8 -m eval.runner --model /models/llava-1.5-7b-hf \
        --questions llava_pope_test.jsonl --image-folder /data/coco/val2014 --out runs/eval/pope-7b.jsonl
"""
import argparse
import base64
import glob
import hashlib
import io
import json
import os

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

import augment
import checkpoint
import dpo
import train_ddp
import vlm
from generate import generate


# ----------------------------------------------------------------------------- the model
def model_id_of(model_dir, adapter=None):
    """A readable name for the answer files: LLaVA uses the model folder's name."""
    name = os.path.basename(os.path.normpath(model_dir))
    return name if not adapter else f"{name}+{os.path.basename(os.path.normpath(adapter))}"


def fingerprint(model_dir, adapter=None):
    """Which weights answered: name, size and modification time of the files of the model folder (and
    adapter). Answer files made by other weights under the same folder names are then not reused."""
    h = hashlib.sha256()
    for folder in [model_dir] + ([adapter] if adapter else []):
        for name in sorted(os.listdir(folder)):
            stat = os.stat(os.path.join(folder, name))
            h.update(f"{os.path.abspath(folder)}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_adapter(model, adapter, merge=True):
    """SeVa's adapter onto a model: the LoRA weights (dpo.load_lora) and, for an adapter trained with
    --train-projector, the projector weights saved beside them (LLaVA's non_lora_trainables.safetensors)."""
    dpo.load_lora(model, adapter)
    extra = os.path.join(adapter, "non_lora_trainables.safetensors")
    if os.path.exists(extra):
        tensors = {k: v.to(model.dtype) for k, v in load_file(extra).items()}
        unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{extra}: keys the model does not have: {unexpected[:5]}")
    if merge:
        dpo.merge_lora(model)  # the same answers as unmerged LoRA, faster


def load_model(model_dir, adapter=None, device="cpu", dtype=torch.float32, merge=True):
    """A local HF VLM folder, with SeVa's adapter on top if given (merged: the same answers, faster).
    The model carries `eval_fingerprint`, which answer_questions writes into its settings."""
    model, processor = vlm.load(model_dir, device, dtype)
    if adapter:
        load_adapter(model, adapter, merge)
    model.eval()
    model.eval_fingerprint = fingerprint(model_dir, adapter)
    return model, processor


def add_model_args(parser, max_new_tokens=16, batch_size=32, model_flags=True):
    """The flags every benchmark's CLI shares (model_flags: --model, --adapter, --model-id too)."""
    g = parser.add_argument_group("model and decoding")
    if model_flags:
        g.add_argument("--model", default="toy/model-sft", help="local HF model folder (paper: LLaVA-1.5-7B/13B)")
        g.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT layout, train_ddp.py's OUT/adapter)")
        g.add_argument("--model-id", default=None, help="model_id written into the answers (default: folder names)")
    g.add_argument("--template", choices=vlm.TEMPLATES,
                   help="prompt template (default: the family's; LLaVA-1.5: llava_v1, the authors'; others: chat)")
    g.add_argument("--no-pad", dest="pad", action="store_false",
                   help="no square padding with the CLIP mean colour (LLaVA-1.5 pads; other families never do)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="answer length limit (LLaVA's eval scripts: 128 for short answers, 1024 for open-ended)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="questions per batch and per chunk of the partial files (LLaVA: 1; greedy answers do not "
                        "depend on it)")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="weights in bf16 on CUDA with support (paper: bf16), fp32 otherwise; CPUs always run fp32")
    g.add_argument("--seed", type=int, default=0, help="seed of the image noise and of sampling")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return g


def setup(args):
    """torchrun's environment and the model: (model, processor, rank, world_size). bf16 on CUDA, fp32 on CPU."""
    rank, world_size, device = train_ddp.compute_init(args.seed)
    dtype = train_ddp.autocast_dtype(device, args.precision) or torch.float32
    model, processor = load_model(args.model, args.adapter, device, dtype)
    if args.model_id is None:
        args.model_id = model_id_of(args.model, args.adapter)
    return model, processor, rank, world_size


def decoding(args):
    """The runner's keyword arguments from the shared flags."""
    return dict(template=args.template, pad=args.pad, max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, progress=args.progress)


def finish_distributed(world_size):
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- questions
# A question is a dict: question_id, text (what the user asks, options included), and the image as
# `image` (a path under image_folder) or `image_base64` (MMBench's tsv); optional `metadata` (a dict
# copied into the answer) and `fields` (extra top-level answer fields, e.g. MMBench's round_id).
def question_image(question, image_folder, pad=True):
    """The question's image as RGB, padded to a square as LLaVA-1.5 does unless pad=False."""
    if "image_base64" in question:
        try:
            with Image.open(io.BytesIO(base64.b64decode(question["image_base64"]))) as img:
                image = img.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"question {question['question_id']}: cannot decode its base64 image: {e}") from e
        return vlm.pad_to_square(image) if pad else image
    return vlm.load_image(os.path.join(image_folder, question["image"]), pad=pad)


def questions_digest(questions):
    """A hash of the question list: a partial file made for other questions is refused."""
    h = hashlib.sha256()
    for q in questions:
        image = q.get("image") or hashlib.sha256(q.get("image_base64", "").encode()).hexdigest()
        h.update(json.dumps([q["question_id"], q["text"], image], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- sampling (paper Table 5)
class SampledModel:
    """generate.py decodes greedily. This thin wrapper turns its one `model.generate` call per batch into
    temperature sampling seeded by `seed`, and leaves prompts, padding and decoding to generate.py."""

    def __init__(self, model, temperature, seed):
        self.model, self.temperature, self.seed = model, temperature, seed

    def parameters(self):
        return self.model.parameters()

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def generate(self, **kwargs):
        # LLaVA samples with do_sample=True and the temperature, other settings at the model's defaults.
        kwargs.update(do_sample=True, temperature=self.temperature)
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # the same batch and seed give the same samples
            return self.model.generate(**kwargs)


# ----------------------------------------------------------------------------- files
def partial_path(out, rank, world_size):
    return f"{out}.partial-rank{rank}-of-{world_size}.jsonl"


write_atomic = checkpoint.write_lines_atomic  # every eval module writes its files through it


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_partial(path):
    """(header, rows) of a partial file's complete lines; a torn last line (a kill mid-write) is dropped."""
    rows = checkpoint.read_appended_jsonl(path)
    return (rows[0], rows[1:]) if rows else (None, [])


def run_header(questions, model_id, settings, world_size):
    """What decides the answers; a partial file or answer file made otherwise is not reused."""
    decisive = dict(model_id=model_id, questions=questions_digest(questions),
                    num_questions=len(questions), **settings)
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]
    return dict(eval_partial=1, args_hash=digest, settings=decisive, world_size=world_size)


def answer_id(model_id, question_id, prompt, text):
    # Deviation: LLaVA draws a random shortuuid; a hash makes reruns and resumed runs byte-identical.
    return hashlib.sha256(json.dumps([model_id, question_id, prompt, text]).encode()).hexdigest()[:22]


def answer_row(question, text, model_id):
    """One line of LLaVA's answer file (model_vqa.py's fields), plus the question's extra fields."""
    prompt = question["text"]
    row = dict(question_id=question["question_id"], prompt=prompt, text=text,
               answer_id=answer_id(model_id, question["question_id"], prompt, text), model_id=model_id,
               metadata=question.get("metadata", {}))
    row.update(question.get("fields", {}))
    return row


# ----------------------------------------------------------------------------- the run
def chunks_of(num_questions, batch_size):
    """Fixed chunks of batch_size positions; chunk k is answered by rank k % world_size."""
    return [list(range(start, min(start + batch_size, num_questions))) for start in range(0, num_questions, batch_size)]


def answer_chunk(model, processor, questions, chunk, chunk_index, image_folder, template, pad, max_new_tokens,
                 noise_step, temperature, seed):
    """The answers (strings) of one chunk of question positions, generated as one batch."""
    batch = [questions[i] for i in chunk]
    images = [question_image(q, image_folder, pad) for q in batch]
    noise = None
    if noise_step is not None:  # diffusion noise on the processor's pixels, each question its own (augment.py)
        ids = [q["question_id"] for q in batch]
        noise = lambda pixels, rows: augment.diffusion_noise_rows(pixels, [ids[r] for r in rows], noise_step, seed)
    if temperature > 0:
        model = SampledModel(model, temperature, augment.sample_seed(seed, f"chunk-{chunk_index}"))
    return generate(model, processor, images, [q["text"] for q in batch], template=template,
                    max_new_tokens=max_new_tokens, batch_size=len(batch), pixel_transform=noise)


def answer_questions(model, processor, questions, out, model_id, image_folder=".", template=None, pad=True,
                     max_new_tokens=16, batch_size=16, noise_step=None, temperature=0.0, seed=0, rank=0,
                     world_size=1, progress=False):
    """Answer every question into the answer file `out`; returns its rows, in question order, on every rank.

    noise_step: diffusion noise at that step on each image (seeded by (seed, question_id)), or None.
    temperature: 0 = greedy (the paper's evaluation); > 0 = sampling seeded by (seed, chunk).
    """
    ids = [q["question_id"] for q in questions]
    template, pad = vlm.resolve_template(model, template), pad and vlm.pads_to_square(model)
    seeded = noise_step is not None or temperature > 0  # the seed matters only then
    settings = dict(weights=getattr(model, "eval_fingerprint", None), dtype=str(next(model.parameters()).dtype),
                    template=template, pad=pad,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, noise_step=noise_step,
                    temperature=temperature, seed=seed if seeded else None)
    header = run_header(questions, model_id, settings, world_size)
    sidecar = out + ".args.json"
    if os.path.exists(out) and os.path.exists(sidecar):  # finished before with the same settings: reuse
        with open(sidecar) as f:
            if json.load(f).get("args_hash") == header["args_hash"]:
                return read_jsonl(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    chunks = chunks_of(len(questions), batch_size)

    # ---- resume: refuse foreign partial files, keep this rank's complete chunks
    for path in glob.glob(glob.escape(out) + ".partial-rank*-of-*.jsonl"):
        old, _ = read_partial(path)
        if old and (old.get("args_hash"), old.get("world_size")) != (header["args_hash"], world_size):
            differ = [k for k in header["settings"] if old.get("settings", {}).get(k) != header["settings"][k]]
            differ += ["number of processes"] if old.get("world_size") != world_size else []
            raise ValueError(f"{path} was made with other settings (differing: {', '.join(differ)}); rerun with "
                             f"them to resume, or delete the partial files to start over")
    path = partial_path(out, rank, world_size)
    _, rows = read_partial(path)
    rows = [row for row in rows if row["index"] < len(ids) and row["question_id"] == ids[row["index"]]]
    present = {row["index"] for row in rows}
    done = {k for k, chunk in enumerate(chunks) if all(i in present for i in chunk)}
    rows = [row for row in rows if row["index"] // batch_size in done]
    write_atomic(path, [json.dumps(header)] + [json.dumps(row, ensure_ascii=False) for row in rows])

    # ---- answer this rank's remaining chunks, each appended as soon as it is done
    todo = [k for k in range(rank, len(chunks), world_size) if k not in done]
    with open(path, "a", encoding="utf-8") as f:
        for k in tqdm(todo, desc=os.path.basename(out), disable=rank != 0 or not progress):
            texts = answer_chunk(model, processor, questions, chunks[k], k, image_folder, template, pad,
                                 max_new_tokens, noise_step, temperature, seed)
            f.write("".join(json.dumps(dict(index=i, question_id=ids[i], text=text), ensure_ascii=False) + "\n"
                            for i, text in zip(chunks[k], texts)))
            f.flush()
            os.fsync(f.fileno())  # a chunk on disk survives any kill

    # ---- rank 0 merges the partial files in question order
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        texts = {}
        for r in range(world_size):
            texts.update((row["index"], row["text"]) for row in read_partial(partial_path(out, r, world_size))[1])
        missing = [ids[i] for i in range(len(ids)) if i not in texts]
        if missing:
            raise RuntimeError(f"{out}: the partial files lack questions {missing[:10]}; rerun to complete them")
        write_atomic(out, [json.dumps(answer_row(q, texts[i], model_id), ensure_ascii=False)
                           for i, q in enumerate(questions)])
        write_atomic(sidecar, [json.dumps(dict(args_hash=header["args_hash"], settings=header["settings"]), indent=1)])
        for r in range(world_size):
            os.remove(partial_path(out, r, world_size))
    if world_size > 1:
        dist.barrier()
    return read_jsonl(out)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("questions and answers")
    g.add_argument("--questions", default="toy/pope/random.jsonl",
                   help="LLaVA question file: jsonl of question_id, image, text")
    g.add_argument("--image-folder", default="toy/images", help="folder the questions' image paths are relative to")
    g.add_argument("--out", default="runs/eval/answers.jsonl", help="the answer file (LLaVA's format)")
    g.add_argument("--noise-step", type=int, default=-1,
                   help="diffusion noise on every image at this step 0..999 (-1: none; paper: 500 for 13B, 800 for 7B)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy, the paper's evaluation; > 0: sampling seeded by --seed (paper Table 5)")
    args = p.parse_args(argv)
    if not -1 <= args.noise_step <= 999 or args.temperature < 0:
        p.error("--noise-step must be in -1..999 and --temperature >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    questions = [dict(question_id=row["question_id"], image=row["image"], text=row["text"])
                 for row in read_jsonl(args.questions)]
    model, processor, rank, world_size = setup(args)
    rows = answer_questions(model, processor, questions, args.out, args.model_id, args.image_folder,
                            noise_step=None if args.noise_step < 0 else args.noise_step, temperature=args.temperature,
                            seed=args.seed, rank=rank, world_size=world_size, **decoding(args))
    train_ddp.print0(f"wrote {len(rows)} answers to {args.out}")
    finish_distributed(world_size)
    return rows


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"eval.runner: error: {e}")
