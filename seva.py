"""
SeVa, Algorithm 1, data side: preference pairs made by the model itself, with no labels.

  line 1  sample (image, question) pairs from a LLaVA-665k-format json (paper 4.1: the textvqa and
          ocr_vqa subsets, up to 2 questions per image, 8k instances from each subset);
  line 2  chosen = model(I, Q) and rejected = model(T(I), Q), greedy, T = diffusion noise by default;
  line 3  drop the pairs whose two answers are equal.
The pairs file is what `train_ddp.py --objective dpo --pairs` trains on (line 4). The json's own answers
are never used to make pairs; they are kept beside each pair only to measure which way it points.

One process:   python seva.py --model toy/model-sft --data toy/pool.json --out runs/seva/pairs.jsonl
N processes:   torchrun --standalone --nproc_per_node=N seva.py ...     (the same file, byte for byte)

Resumable: each finished batch is appended to OUT.partial-rank{r}-of-{N}.jsonl; after a crash, rerun
the same command and it continues. The pairs file is written atomically at the end.
"""
import argparse
import glob
import hashlib
import json
import os
import random
import sys
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import augment
import checkpoint
import train_ddp
import vlm
from generate import generate

# ----------------------------------------------------------------------------- sampling (Alg. 1 line 1)
SUBSETS = ("textvqa", "ocr_vqa", "gqa", "coco", "vg")  # LLaVA-665k's image folders
OCRVQA_SUFFIX = "Answer the question using a single word or phrase."


def clean_question(text):
    """The authors' step 1: remove `<image>`, the OCR-VQA suffix and the newlines."""
    text = text.replace("<image>", "").replace(OCRVQA_SUFFIX, "")
    # Deviation: newlines become one space (the authors delete them for ocr_vqa, keep them for textvqa).
    return " ".join(text.split())


def record_problem(record):
    """Why a record cannot give instances, or None."""
    if not isinstance(record, dict):
        return "not a json object"
    missing = [key for key in ("id", "image", "conversations") if key not in record]
    if missing:
        return f"missing key(s): {', '.join(missing)}"
    turns = record["conversations"]
    if not isinstance(record["image"], str) or not isinstance(turns, list) or not all(
            isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str) for t in turns):
        return "image must be a path and conversations a list of {from: human|gpt, value} turns"
    humans = [t for t in turns if t["from"] == "human"]
    if not humans:
        return "no human turn"
    if any(not clean_question(t["value"]) for t in humans):
        return "a human turn is empty once cleaned"
    return None


def subset_of(record, subsets):
    """The subset a record belongs to, by its image path's first folder (all: one subset of everything)."""
    if list(subsets) == ["all"]:
        return "all"
    image = record.get("image") if isinstance(record, dict) else None
    prefix = image.split("/")[0] if isinstance(image, str) else None
    return prefix if prefix in subsets else None


def record_instances(record, seed):
    """Up to 2 of a record's human turns, picked at random (paper 4.1), each one instance."""
    turns = record["conversations"]
    humans = [k for k, turn in enumerate(turns) if turn["from"] == "human"]
    rng = random.Random(f"{seed}/{record['id']}")  # per record: its pick does not depend on the rest
    instances = []
    for turn in sorted(rng.sample(range(len(humans)), min(2, len(humans)))):
        k = humans[turn]
        answer = turns[k + 1]["value"] if k + 1 < len(turns) and turns[k + 1]["from"] == "gpt" else None
        instances.append(dict(id=f"{record['id']}-{turn}", image=record["image"],
                              question=clean_question(turns[k]["value"]), answer=answer))
    return instances


def sample_instances(records, subsets, num_samples, seed, source="data"):
    """Alg. 1 line 1: num_samples instances (0: all), drawn evenly over the subsets, seeded.

    Returns (instances, skipped counts by reason, messages). Records are taken in a seeded random order
    with all their (up to 2) instances, as the authors sample records; the last one may be cut to fit.
    """
    groups = {subset: [] for subset in subsets}
    skipped, messages = Counter(), []
    for position, record in enumerate(records):
        subset = subset_of(record, subsets)
        if subset is None:
            continue
        problem = record_problem(record)
        if problem:
            name = record.get("id", f"#{position}") if isinstance(record, dict) else f"#{position}"
            skipped["malformed record"] += 1
            messages.append(f"{source}: record {name}: {problem}; skipped")
            continue
        groups[subset].append(record)
    quotas = [num_samples // len(subsets) + (i < num_samples % len(subsets)) for i in range(len(subsets))]
    instances = []
    for (subset, group), quota in zip(groups.items(), quotas):
        order = list(range(len(group)))
        random.Random(f"{seed}/{subset}").shuffle(order)
        taken = []
        for i in order:
            if num_samples and len(taken) >= quota:
                break
            taken += record_instances(group[i], seed)
        if not taken or (num_samples and len(taken) < quota):
            messages.append(f"{source}: subset {subset} gives only {len(taken)} instances of its share {quota or 'all'}")
        instances += taken[:quota] if num_samples else taken
    return instances, skipped, messages


# ----------------------------------------------------------------------------- filtering (Alg. 1 line 3)
def normalize(answer):
    """Lowercase, whitespace collapsed, trailing punctuation stripped."""
    return " ".join(answer.lower().split()).rstrip(".,;:!?").rstrip()


def same_answer(chosen, rejected, mode="exact"):
    """exact: string equality, as the authors; normalized: equality after `normalize`."""
    if mode == "exact":
        return chosen == rejected
    if mode == "normalized":
        return normalize(chosen) == normalize(rejected)
    raise ValueError(f"unknown filter {mode!r}; use exact or normalized")


# ----------------------------------------------------------------------------- generation (Alg. 1 line 2)
def answer_chunk(model, processor, chunk, image_folder, augmentation="diffusion", noise_step=500, seed=0,
                 schedule="sigmoid", template=None, pad=True, max_new_tokens=512, max_length=2048, warn=print):
    """Chosen and rejected answers of one chunk [(index, instance), ...], generated as one batch.
    template None: the family's; pad: LLaVA-1.5's square padding, for the families that pad.

    Returns one row per instance, in order: {index, id, chosen, rejected} or {index, id, skipped, message}.
    """
    rows, ready = {}, []
    template, pad = vlm.resolve_template(model, template), pad and vlm.pads_to_square(model)

    def skip(index, instance, reason, message):  # a clear message naming the record; counted by reason
        rows[index] = dict(index=index, id=instance["id"], skipped=reason,
                           message=f"record {instance['id']}: {message}; skipped")
        warn(rows[index]["message"])

    for index, instance in chunk:
        path = os.path.join(image_folder, instance["image"])
        try:
            image = vlm.load_image(path, pad=pad)
        except ValueError as e:  # the error names the file
            skip(index, instance, "missing or corrupt image", str(e))
            continue
        prompt = vlm.prompt_text(processor, instance["question"], template)
        length = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]  # image tokens too
        if length + max_new_tokens > max_length:
            skip(index, instance, "longer than --max-length",
                 f"{path}: {length} prompt tokens + {max_new_tokens} new tokens > --max-length {max_length}")
            continue
        ready.append((index, instance, image))
    if ready:
        images = [image for _, _, image in ready]
        questions = [instance["question"] for _, instance, _ in ready]
        ids = [instance["id"] for _, instance, _ in ready]
        batch = dict(template=template, max_new_tokens=max_new_tokens, batch_size=len(ready))
        chosen = generate(model, processor, images, questions, **batch)  # on the original image I
        if augmentation == "diffusion":  # on the processor's normalized pixels, as the authors
            def noise(pixel_values, rows_in_batch):  # each instance its own noise, seeded by its id
                return augment.diffusion_noise_rows(pixel_values, [ids[i] for i in rows_in_batch], noise_step,
                                                    seed, schedule)
            rejected = generate(model, processor, images, questions, pixel_transform=noise, **batch)
        else:  # an image-level T(I) of Fig. 2, seeded per instance
            transform = augment.AUGMENTATIONS[augmentation]
            augmented = [transform(image, augment.sample_seed(seed, id_)) for image, id_ in zip(images, ids)]
            rejected = generate(model, processor, augmented, questions, **batch)
        for (index, instance, _), c, r in zip(ready, chosen, rejected):
            rows[index] = dict(index=index, id=instance["id"], chosen=c, rejected=r)
    return [rows[index] for index, _ in chunk]


# ----------------------------------------------------------------------------- resumable partial files
# The arguments that decide the output: partial files made with others are not resumed.
OUTPUT_ARGS = ("model", "data", "image_folder", "subsets", "num_samples", "seed", "augmentation", "noise_step",
               "noise_schedule", "template", "pad", "max_new_tokens", "max_length", "batch_size", "precision")


def partial_header(args, world_size):
    decisive = {key: getattr(args, key) for key in OUTPUT_ARGS}
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]
    return dict(seva_partial=1, args_hash=digest, args=decisive, world_size=world_size)


def partial_path(out, rank, world_size):
    return f"{out}.partial-rank{rank}-of-{world_size}.jsonl"


def read_partial(path, header=None):
    """The rows of a partial file's complete lines; a torn last line (a kill mid-write) is dropped.
    With a header, refuse a file made with other arguments or another number of processes."""
    rows = checkpoint.read_appended_jsonl(path)
    old = rows.pop(0) if rows else None
    if header and old and (old.get("args_hash"), old.get("world_size")) != (header["args_hash"], header["world_size"]):
        differ = [k for k in OUTPUT_ARGS if old.get("args", {}).get(k) != header["args"][k]]
        differ += ["number of processes"] if old.get("world_size") != header["world_size"] else []
        raise ValueError(f"{path} was made with other arguments (differing: {', '.join(differ)}); rerun with "
                         f"them to resume, or delete the partial files to start over")
    return rows


def resume(out, rank, header, chunks, batch_size):
    """Refuse foreign partial files; keep the chunks this rank's file holds in full (a kill may cut
    the last one), rewritten atomically; return the indices of those chunks."""
    for path in glob.glob(glob.escape(out) + ".partial-rank*-of-*.jsonl"):
        read_partial(path, header)
    path = partial_path(out, rank, header["world_size"])
    rows = read_partial(path, header)
    present = {row["index"] for row in rows}
    done = {k for k, chunk in enumerate(chunks) if all(i in present for i in chunk)}
    rows = [row for row in rows if row["index"] // batch_size in done]
    checkpoint.write_lines_atomic(path, [json.dumps(header)] + [json.dumps(row, ensure_ascii=False) for row in rows])
    return done


# ----------------------------------------------------------------------------- merge, summary, exports
QUALITY = ("chosen right, rejected wrong", "both wrong", "chosen wrong, rejected right", "both right but different")


def pair_quality(pairs):
    """Does the self-supervised preference point the right way? Counts over the kept pairs with an answer
    (right: equal to the json's answer, case-insensitive, stripped); None when no pair has one."""
    counts = dict.fromkeys(QUALITY, 0)
    for pair in pairs:
        if "answer" in pair:
            counts[quality_of(pair)] += 1
    return counts if sum(counts.values()) else None


def quality_of(pair):
    """The QUALITY class of one pair that has the json's answer."""
    truth = pair["answer"].strip().lower()
    right = (pair["chosen"].strip().lower() == truth, pair["rejected"].strip().lower() == truth)
    return QUALITY[[(True, False), (False, False), (False, True), (True, True)].index(right)]


def summarize(instances, rows, pairs, sampling_skipped, messages):
    skipped = Counter(sampling_skipped) + Counter(row["skipped"] for row in rows if "skipped" in row)
    answered = sum("skipped" not in row for row in rows)
    words = lambda key: round(sum(len(p[key].split()) for p in pairs) / max(len(pairs), 1), 2)
    return dict(instances=len(instances), answered=answered, pairs=len(pairs),
                kept_percent=round(100 * len(pairs) / max(answered, 1), 1),
                mean_words_chosen=words("chosen"), mean_words_rejected=words("rejected"),
                skipped=dict(sorted(skipped.items())), pair_quality=pair_quality(pairs),
                messages=messages + [row["message"] for row in rows if "skipped" in row])


def format_summary(s, filter_mode):
    lines = [f"instances {s['instances']}, answered {s['answered']}, pairs kept {s['pairs']} ({s['kept_percent']}%, "
             f"filter {filter_mode})",
             f"mean answer length of kept pairs: chosen {s['mean_words_chosen']} words, "
             f"rejected {s['mean_words_rejected']} words"]
    lines += [f"skipped ({reason}): {count}" for reason, count in s["skipped"].items()]
    if s["pair_quality"]:
        total = sum(s["pair_quality"].values())
        lines.append(f"pair quality over the {total} kept pairs with an answer in the data:")
        lines += [f"  {name:<30} {count:>6} {100 * count / total:5.1f}%" for name, count in s["pair_quality"].items()]
    return "\n".join(lines)


def export_lines(pairs, image_folder, kind):
    """trl: TRL's vision preference format (conversational); authors: their step-3 json list."""
    if kind == "authors":
        return [json.dumps([dict(chosen=p["chosen"], reject=p["rejected"], question=p["question"], image_id=p["image"])
                            for p in pairs], indent=1, ensure_ascii=False)]
    text = lambda role, content: [{"role": role, "content": content}]
    return [json.dumps(dict(images=[os.path.join(image_folder, p["image"])],
                            prompt=text("user", [{"type": "image"}, {"type": "text", "text": p["question"]}]),
                            chosen=text("assistant", [{"type": "text", "text": p["chosen"]}]),
                            rejected=text("assistant", [{"type": "text", "text": p["rejected"]}])),
                       ensure_ascii=False) for p in pairs]


def finish(args, instances, sampling_skipped, messages, world_size):
    """Rank 0: merge the partial files in instance order; write the pairs, the sidecar and the exports."""
    rows = {}
    for rank in range(world_size):
        rows.update((row["index"], row) for row in read_partial(partial_path(args.out, rank, world_size)))
    missing = [i for i in range(len(instances)) if i not in rows or rows[i]["id"] != instances[i]["id"]]
    if missing:
        raise RuntimeError(f"the partial files lack instances {missing[:10]}; rerun to complete them")
    rows = [rows[i] for i in range(len(instances))]
    pairs = []
    for instance, row in zip(instances, rows):
        if "skipped" in row or same_answer(row["chosen"], row["rejected"], args.filter):  # Alg. 1 line 3
            continue
        pair = dict(id=instance["id"], image=instance["image"], question=instance["question"], chosen=row["chosen"],
                    rejected=row["rejected"], augmentation=args.augmentation)
        if args.augmentation == "diffusion":
            pair["noise_step"] = args.noise_step
        if instance["answer"] is not None:
            pair["answer"] = instance["answer"]  # for analysis only: never used to make the pair
        pairs.append(pair)
    checkpoint.write_lines_atomic(args.out, [json.dumps(pair, ensure_ascii=False) for pair in pairs])
    summary = summarize(instances, rows, pairs, sampling_skipped, messages)
    checkpoint.write_lines_atomic(args.out + ".args.json", [json.dumps(dict(args=vars(args), world_size=world_size, summary=summary),
                                                      indent=1, ensure_ascii=False)])
    base = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    for kind in args.export:
        checkpoint.write_lines_atomic(base + (".trl.jsonl" if kind == "trl" else ".authors.json"),
                     export_lines(pairs, args.image_folder, kind))
    for rank in range(world_size):
        os.remove(partial_path(args.out, rank, world_size))
    return summary


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data (Alg. 1 line 1)")
    g.add_argument("--data", default="toy/pool.json", help="LLaVA-665k-format json or jsonl (paper: llava_v1_5_mix665k.json)")
    g.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    g.add_argument("--subsets", default="all", help=f"comma list of {', '.join(SUBSETS)} (image path prefixes), "
                                                    f"or all (paper: textvqa,ocr_vqa)")
    g.add_argument("--num-samples", type=int, default=0,
                   help="instances in total, drawn evenly over the subsets; 0 = all (paper: 16000, 8k per subset)")
    g.add_argument("--seed", type=int, default=0, help="sampling and augmentation seed (the authors set none)")
    g = p.add_argument_group("generation (Alg. 1 line 2)")
    g.add_argument("--model", default="toy/model-sft", help="local HF model folder (paper: LLaVA-1.5-7B/13B)")
    g.add_argument("--augmentation", default="diffusion",
                   help=f"T(I) for the rejected answer: {', '.join(augment.ALL_AUGMENTATIONS)} (paper: diffusion)")
    g.add_argument("--noise-step", type=int, default=500, help="diffusion step 0..999 (paper: 500 for 13B, 800 for 7B)")
    g.add_argument("--noise-schedule", default="sigmoid", choices=["sigmoid", "linear"],
                   help="sigmoid: the authors' (VCD) betas; linear: DDPM's")
    g.add_argument("--template", choices=vlm.TEMPLATES,
                   help="prompt template (default: the family's; LLaVA-1.5: llava_v1, the authors'; others: chat)")
    g.add_argument("--no-pad", dest="pad", action="store_false",
                   help="no square padding with the CLIP mean colour (LLaVA-1.5 pads; other families never do)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (authors: 512)")
    g.add_argument("--max-length", type=int, default=2048,
                   help="context limit: prompt + max-new-tokens longer than this is skipped (paper: 2048)")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="weights in bf16 on CUDA with support (paper: bf16), fp32 otherwise; CPUs always run fp32")
    g.add_argument("--batch-size", type=int, default=16,
                   help="instances per batch and per chunk of the output (authors: 1; batching changes no answer)")
    g = p.add_argument_group("output (Alg. 1 line 3)")
    g.add_argument("--filter", default="exact", choices=["exact", "normalized"],
                   help="drop pairs with equal answers: exact string equality (authors) or after lowercasing, "
                        "collapsing whitespace and stripping trailing punctuation")
    g.add_argument("--out", default="runs/seva/pairs.jsonl", help="pairs file (jsonl); OUT.args.json gets args and summary")
    g.add_argument("--export", default="", help="comma list: trl (OUT .trl.jsonl, TRL's vision DPO format), "
                                                "authors (OUT .authors.json, the authors' step-3 fields)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    args.subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    args.export = [s.strip() for s in args.export.split(",") if s.strip()]
    return args


def check_args(args):
    """Refuse bad arguments before any work, the model not yet loaded."""
    augment.check_augmentation(args.augmentation)
    if not 0 <= args.noise_step < augment.NUM_DIFFUSION_STEPS:
        raise ValueError(f"--noise-step must be in 0..{augment.NUM_DIFFUSION_STEPS - 1}, got {args.noise_step}")
    if args.subsets != ["all"] and (not args.subsets or any(s not in SUBSETS for s in args.subsets)):
        raise ValueError(f"--subsets {','.join(args.subsets)}: choose from {', '.join(SUBSETS)}, or all")
    if any(kind not in ("trl", "authors") for kind in args.export):
        raise ValueError(f"--export {','.join(args.export)}: choose from trl, authors")
    if args.batch_size < 1 or args.num_samples < 0 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1, --num-samples >= 0")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model {args.model}: not a model folder (no config.json); build the toy world with "
                         f"`python toyworld.py` or pass a local HF folder")
    for path in (args.data, args.image_folder):
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world_size, device = train_ddp.compute_init(args.seed)
    warn = print if world_size == 1 else lambda message: print(f"[rank {rank}] {message}", flush=True)

    # ---- Alg. 1 line 1: sample; every rank computes the same list
    records = train_ddp.read_records(args.data)
    if not isinstance(records, list):
        raise ValueError(f"{args.data}: expected a json list of records")
    instances, sampling_skipped, messages = sample_instances(records, args.subsets, args.num_samples, args.seed, args.data)
    for message in messages[:20]:
        train_ddp.print0(message)
    if len(messages) > 20:
        train_ddp.print0(f"... and {len(messages) - 20} more (all in {args.out}.args.json)")
    if not instances:
        raise ValueError(f"{args.data}: no instances to answer (subsets: {','.join(args.subsets)}; a subset is "
                         f"the first folder of the image paths)")
    # Fixed chunks of --batch-size, chunk k on rank k % N: every batch is the one a single process makes.
    chunks = [list(range(start, min(start + args.batch_size, len(instances))))
              for start in range(0, len(instances), args.batch_size)]
    model, processor = vlm.load(args.model, device, train_ddp.autocast_dtype(device, args.precision) or torch.float32)
    model.eval()
    args.template = vlm.resolve_template(model, args.template)  # the family's, recorded as used
    args.pad = args.pad and vlm.pads_to_square(model)
    header = partial_header(args, world_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done = resume(args.out, rank, header, chunks, args.batch_size)
    path = partial_path(args.out, rank, world_size)

    # ---- Alg. 1 line 2: answer on I and on T(I); append each finished chunk (resumable)
    todo = [k for k in range(rank, len(chunks), world_size) if k not in done]
    train_ddp.print0(f"{len(instances)} instances in {len(chunks)} chunks of {args.batch_size} on {world_size} process(es)")
    if done:
        warn(f"resuming {path}: {len(done)} chunk(s) done before")
    with open(path, "a", encoding="utf-8") as f:
        for k in tqdm(todo, desc="seva", disable=rank != 0 or not args.progress):
            rows = answer_chunk(model, processor, [(i, instances[i]) for i in chunks[k]], args.image_folder,
                                args.augmentation, args.noise_step, args.seed, args.noise_schedule, args.template,
                                args.pad, args.max_new_tokens, args.max_length, warn)
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())  # a chunk on disk survives any kill

    # ---- Alg. 1 line 3: filter, merge in instance order (rank 0)
    if world_size > 1:
        dist.barrier()
    summary = None
    if rank == 0:
        summary = finish(args, instances, sampling_skipped, messages, world_size)
        print(f"wrote {args.out}\n" + format_summary(summary, args.filter), flush=True)
    if world_size > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"seva.py: error: {e}")
