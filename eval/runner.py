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
Under torchrun (common.compute_init) chunk k goes to rank k % N and rank 0 merges (common.ShardedOutput):
every batch is the one a single process makes, so the merged file equals the 1-process file.

The benchmarks (pope.py, toyvqa.py, ...) call `answer_questions`; the CLI answers any LLaVA question
file (jsonl: question_id, image, text), as LLaVA's model_vqa_loader.py does:

    python -m eval.runner --questions toy/pope/random.jsonl --out runs/eval/answers.jsonl
    torchrun --standalone --nproc_per_node=8 -m eval.runner --model /models/llava-1.5-7b-hf \
        --questions llava_pope_test.jsonl --image-folder /data/coco/val2014 --out runs/eval/pope-7b.jsonl
"""
import argparse
import atexit
import base64
import collections
import hashlib
import io
import json
import os
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

import augment
import checkpoint
import common
import lora
import runcontrol
import vlm
from generate import generate, generate_beam


# ----------------------------------------------------------------------------- the model
def model_id_of(model_dir, adapter=None):
    """A readable name for the answer files: LLaVA uses the model folder's name."""
    name = os.path.basename(os.path.normpath(model_dir))
    return name if not adapter else f"{name}+{os.path.basename(os.path.normpath(adapter))}"


def fingerprint(model_dir, adapter=None):
    """Which weights answer (common.files_fingerprint of the model folder and the adapter)."""
    return common.files_fingerprint(model_dir, *([adapter] if adapter else []))


def load_adapter(model, adapter, merge=None):
    """SeVa's adapter onto a model: the LoRA weights (lora.load_lora) and, for an adapter trained with
    --train-projector, the projector weights saved beside them (LLaVA's non_lora_trainables.safetensors).

    merge None: merged into fp32 weights (the same answers, faster); over bf16 weights the adapter stays
    unmerged, in fp32, and answers run under bf16 autocast with the LoRA sum in fp32 (inference_autocast). At
    SeVa's lr 2e-6 the update is about one bf16 grid step of the weights, so merging it into bf16 weights
    would round most of it away (tests/test_precision.py)."""
    merge = model.dtype == torch.float32 if merge is None else merge
    lora.load_lora(model, adapter)
    extra = os.path.join(adapter, "non_lora_trainables.safetensors")
    if os.path.exists(extra):
        tensors = {k: v.to(model.dtype) for k, v in load_file(extra).items()}
        unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{extra}: keys the model does not have: {unexpected[:5]}")
    if merge:
        lora.merge_lora(model)


def load_model(model_dir, adapter=None, device="cpu", dtype=torch.float32, merge=None, allow_other_base=False):
    """A local HF VLM folder, with SeVa's adapter on top if given (see load_adapter for when it is merged). An
    adapter trained on other base weights than the folder's is refused (checkpoint.check_base), unless
    allow_other_base."""
    model, processor = vlm.load(model_dir, device, dtype)
    if adapter:
        checkpoint.check_base(adapter, model_dir, allow_other_base)
        load_adapter(model, adapter, merge)
    return model.eval(), processor


def add_model_args(parser, max_new_tokens=16, batch_size=32, model_flags=True):
    """The flags every benchmark's CLI shares (model_flags: --model, --adapter, --model-id too)."""
    g = parser.add_argument_group("model and decoding")
    if model_flags:
        g.add_argument("--model", default="toy/model-sft", help="local HF model folder (paper: LLaVA-1.5-7B/13B)")
        g.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT layout, train_ddp.py's OUT/adapter)")
        g.add_argument("--model-id", default=None, help="model_id written into the answers (default: folder names)")
        g.add_argument("--allow-other-base", action="store_true",
                       help="load --adapter onto --model even where its base_model.json names other base weights")
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


@dataclass
class Loaded:
    """A benchmark CLI's model and where it runs (setup)."""
    model: torch.nn.Module
    processor: object
    model_id: str  # the readable name written into the answers
    rank: int
    world_size: int
    decoding: dict  # answer_questions' keyword arguments from the shared flags, the weights' fingerprint included


def setup(args):
    """torchrun's environment and the model of the shared flags. bf16 on CUDA, fp32 on CPU. Rank 0 holds
    args.out (runcontrol.lock_output) until the process ends: a second run on it is refused."""
    rank, world_size, device = common.compute_init(args.seed)
    lock = runcontrol.lock_output(args.out, rank, world_size)
    if lock:
        atexit.register(lock.release)
    model, processor = load_model(args.model, args.adapter, device, common.weight_dtype(device, args.precision),
                                  allow_other_base=args.allow_other_base)
    return Loaded(model, processor, args.model_id or model_id_of(args.model, args.adapter), rank, world_size,
                  decoding(args, fingerprint(args.model, args.adapter)))


def write_results(args, run, name, results):
    """A benchmark CLI's OUT/{name}.json: its arguments (and the model's readable name) beside its results."""
    common.write_atomic(os.path.join(args.out, f"{name}.json"),
                        [json.dumps(dict(args=dict(vars(args), model_id=run.model_id), results=results), indent=1)])


def decoding(args, weights):
    """The runner's keyword arguments from the shared flags; `weights`: fingerprint() of the model's files."""
    return dict(template=args.template, pad=args.pad, max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, progress=args.progress, weights=weights,
                num_beams=getattr(args, "num_beams", 1))  # SHR's flag


# ----------------------------------------------------------------------------- questions
# A question is a dict: question_id, text (what the user asks, options included), and the image as
# `image` (a path under image_folder) or `image_base64` (MMBench's tsv); optional `metadata` (a dict
# copied into the answer), `fields` (extra top-level answer fields, e.g. MMBench's round_id) and `prompt` (the
# answer's prompt field when it differs from text).
def question_image(question, image_folder, pad=True):
    """The question's image as RGB, padded to a square as LLaVA-1.5 does unless pad=False."""
    if "image_base64" in question:
        try:
            with Image.open(io.BytesIO(base64.b64decode(question["image_base64"]))) as img:
                image = common.to_rgb(img)
        except (OSError, ValueError) as e:
            raise ValueError(f"question {question['question_id']}: cannot decode its base64 image: {e}") from e
        return vlm.pad_to_square(image) if pad else image
    return vlm.load_image(os.path.join(image_folder, question["image"]), pad=pad)


def check_images(questions, image_folder):
    """Every question's image file must exist: a missing one stops the run before any answering, named."""
    missing = [(q["question_id"], os.path.join(image_folder, q["image"])) for q in questions
               if "image" in q and not os.path.isfile(os.path.join(image_folder, q["image"]))]
    if missing:
        listed = ", ".join(f"question {qid}: {path}" for qid, path in missing[:10])
        raise ValueError(f"{len(missing)} of {len(questions)} questions have no image ({listed})")


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
def decisive_settings(questions, model_id, settings):
    """What decides the answers; a partial file or answer file made otherwise is not reused."""
    return dict(model_id=model_id, questions=questions_digest(questions), num_questions=len(questions), **settings)


def answer_id(model_id, question_id, prompt, text):
    # Deviation: LLaVA draws a random shortuuid; a hash makes reruns and resumed runs byte-identical.
    return hashlib.sha256(json.dumps([model_id, question_id, prompt, text]).encode()).hexdigest()[:22]


def answer_key(row):
    """What names one answer: its question_id, and its round where a question is asked in rounds (circular
    multiple choice: round_id, a field of the answer row and of the runner question's "fields")."""
    round_id = row.get("round_id", row.get("fields", {}).get("round_id"))
    return str(row.get("question_id")) if round_id is None else f"{row.get('question_id')}/round {round_id}"


def check_answer_ids(path, answers, questions):
    """Refuse, in one line naming the file and the ids, an answer file that does not answer each question
    exactly once: duplicate ids (which would count twice, or overwrite each other), missing ones and unknown
    ones (another question file's answers) would each change a score in silence."""
    given = collections.Counter(answer_key(a) for a in answers)
    expected = [answer_key(q) for q in questions]
    known = set(expected)
    problems = [(what, ids) for what, ids in (
        ("duplicate", [k for k, n in given.items() if n > 1]), ("missing", [k for k in expected if k not in given]),
        ("unknown", [k for k in given if k not in known])) if ids]
    if problems:
        raise ValueError(f"{path}: not one answer per question: " + "; ".join(
            f"{len(ids)} {what} id(s) {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}" for what, ids in problems))
    return answers


def read_answers(path, questions):
    """An answer file's rows (common.read_jsonl), refused unless they answer each question exactly once
    (check_answer_ids); questions: rows with question_id (and round_id where asked in rounds)."""
    return check_answer_ids(path, common.read_jsonl(path), questions)


def answer_row(question, text, model_id):
    """One line of LLaVA's answer file (model_vqa.py's fields), plus the question's extra fields. The prompt field
    is the question's text, or its `prompt` where LLaVA's scorer expects more (ScienceQA: the <image> marker)."""
    prompt = question.get("prompt", question["text"])
    row = dict(question_id=question["question_id"], prompt=prompt, text=text,
               answer_id=answer_id(model_id, question["question_id"], prompt, text), model_id=model_id,
               metadata=question.get("metadata", {}))
    row.update(question.get("fields", {}))
    return row


# ----------------------------------------------------------------------------- the run
def answer_chunk(model, processor, questions, chunk, chunk_index, image_folder, template, pad, max_new_tokens,
                 noise_step, temperature, seed, num_beams=1):
    """The answers (strings) of one chunk of question positions, generated as one batch."""
    batch = [questions[i] for i in chunk]
    images = [question_image(q, image_folder, pad) for q in batch]
    noise = None  # diffusion noise on the processor's pixels, each question its own (augment.py)
    if noise_step is not None:
        noise = augment.noise_transform([q["question_id"] for q in batch], noise_step, seed)
    if temperature > 0:
        model = SampledModel(model, temperature, common.sample_seed(seed, f"chunk-{chunk_index}"))
    with inference_autocast(model):
        if num_beams > 1:  # SHR's baseline decoding (eval/shr.py)
            return generate_beam(model, processor, images, [q["text"] for q in batch], template=template,
                                 num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=len(batch),
                                 pixel_transform=noise)
        return generate(model, processor, images, [q["text"] for q in batch], template=template,
                        max_new_tokens=max_new_tokens, batch_size=len(batch), pixel_transform=noise)


def inference_autocast(model):
    """Answers of a bf16 model run under bf16 autocast: the same numbers for the plain model, and an unmerged
    fp32 adapter (load_adapter) keeps its small update in an fp32 sum."""
    dtype = model.dtype
    return common.autocast(next(model.parameters()).device, None if dtype == torch.float32 else dtype)


def answer_questions(model, processor, questions, out, model_id, image_folder=".", template=None, pad=True,
                     max_new_tokens=16, batch_size=16, noise_step=None, temperature=0.0, seed=0, rank=0,
                     world_size=1, progress=False, num_beams=1, *, weights):
    """Answer every question into the answer file `out`; returns its rows, in question order, on every rank.

    noise_step: diffusion noise at that step on each image (seeded by (seed, question_id)), or None.
    temperature: 0 = greedy (the paper's evaluation); > 0 = sampling seeded by (seed, chunk).
    num_beams: > 1 = beam search (generate.generate_beam; SHR's baseline: 5), greedy temperature only.
    weights: which weights answer (fingerprint(); required, so that a finished or partial answer file made by
        other weights under the same model_id is never reused).
    """
    if num_beams > 1 and temperature > 0:
        raise ValueError(f"beam search ({num_beams} beams) does not sample: temperature must be 0")
    template, pad = vlm.resolve_template(model, template), pad and vlm.pads_to_square(model)
    seeded = noise_step is not None or temperature > 0  # the seed matters only then
    settings = decisive_settings(questions, model_id, dict(
        weights=weights, dtype=str(next(model.parameters()).dtype), template=template, pad=pad,
        max_new_tokens=max_new_tokens, batch_size=batch_size, noise_step=noise_step, temperature=temperature,
        seed=seed if seeded else None, **({"num_beams": num_beams} if num_beams > 1 else {})))
    sidecar = out + ".args.json"
    if os.path.exists(out) and os.path.exists(sidecar):  # finished before with the same settings: reuse
        with open(sidecar) as f:
            if json.load(f).get("args_hash") == common.args_digest(settings):
                return read_answers(out, questions)
    check_images(questions, image_folder)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    output = common.ShardedOutput(out, settings, [q["question_id"] for q in questions], batch_size, rank, world_size,
                                  what="settings", items="questions")
    for k in tqdm(output.resume(), desc=os.path.basename(out), disable=rank != 0 or not progress):
        texts = answer_chunk(model, processor, questions, output.chunks[k], k, image_folder, template, pad,
                             max_new_tokens, noise_step, temperature, seed, num_beams)
        output.append([dict(index=i, id=questions[i]["question_id"], text=text)
                       for i, text in zip(output.chunks[k], texts)])
    common.barrier(world_size)
    if rank == 0:  # merge in question order
        rows = output.merge()
        common.write_atomic(out, [json.dumps(answer_row(q, row["text"], model_id), ensure_ascii=False)
                           for q, row in zip(questions, rows)])
        common.write_atomic(sidecar, [json.dumps(dict(args_hash=common.args_digest(settings), settings=settings),
                                                 indent=1)])
        output.remove()
    common.barrier(world_size)
    return read_answers(out, questions)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
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
                 for row in common.read_jsonl(args.questions)]
    run = setup(args)
    rows = answer_questions(run.model, run.processor, questions, args.out, run.model_id, args.image_folder,
                            noise_step=None if args.noise_step < 0 else args.noise_step, temperature=args.temperature,
                            seed=args.seed, rank=run.rank, world_size=run.world_size, **run.decoding)
    common.print0(f"wrote {len(rows)} answers to {args.out}")
    common.finish_distributed()
    return rows


if __name__ == "__main__":
    common.run_main(main, "eval.runner", (ValueError, OSError, KeyError))
