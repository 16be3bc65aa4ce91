"""
SeVa, Algorithm 1, data side: preference pairs made by the model itself, with no labels.

  line 1  sample (image, question) pairs from a LLaVA-665k-format json (paper 4.1: the textvqa and
          ocr_vqa subsets, up to 2 questions per image, 8k instances from each subset; pool.py);
  line 2  chosen = model(I, Q) and rejected = model(T(I), Q), greedy, T = diffusion noise by default;
  line 3  drop the pairs whose two answers are equal.
The pairs file is what `train_ddp.py --objective dpo --pairs` trains on (line 4). The json's own answers
are never used to make pairs; they are kept beside each pair only to measure which way it points.

One process:   python seva.py --model toy/model-sft --data toy/pool.json --out runs/seva/pairs.jsonl
N processes:   torchrun --standalone --nproc_per_node=N seva.py ...     (the same file, byte for byte)

Resumable: each finished batch is appended to OUT.partial-rank{r}-of-{N}.jsonl (common.ShardedOutput);
after a crash, rerun the same command and it continues. The pairs file is written atomically at the end.
"""
import argparse
import atexit
import os
from dataclasses import dataclass

from tqdm import tqdm

import augment
import common
import diffusion
import pairs
import plan
import pool
import runcontrol
import vlm
from draft import can_draft, drafted_generate
from generate import generate, generate_tokens, score_answers


# ----------------------------------------------------------------------------- Alg. 1 line 2: chosen on I, rejected on T(I)
def view_ids(ids, view):
    """The seeds of the view-th augmented view of each instance: view 0 is the instance's own id (one negative,
    as Alg. 1), view j > 0 its id + "/view{j}", so every view draws its own noise."""
    return ids if view == 0 else [f"{i}/view{view}" for i in ids]


@dataclass(frozen=True)
class AnswerSettings:
    """How answer_chunk answers (seva.py's flags, settings_of(args)). template None: the family's; pad: LLaVA-1.5's
    square padding, for the families that pad. negative_steps (paper 3.3, several negatives): the noise step of
    each augmented view, each view seeded apart (view_ids); None: one view at noise_step. reference
    (--reference-logps): also score the answers each pair will keep (line 3, by filter_mode) on the ORIGINAL image.
    prefill_batch: prompts read so many at a time (None: all at once). draft: each rejected answer decoded with its
    instance's chosen answer as the draft (draft.py: the same answers in fewer forwards) where the family allows
    (draft.can_draft); False: one forward per token."""
    augmentation: str = "diffusion"
    noise_step: int = 500
    seed: int = 0
    schedule: str = "sigmoid"
    template: str | None = None
    pad: bool = True
    max_new_tokens: int = 512
    max_length: int = 2048
    negative_steps: list | None = None
    reference: bool = False
    filter_mode: str = "exact"
    prefill_batch: int | None = None
    draft: bool = True


def settings_of(args):
    """seva.py's parsed arguments as answer_chunk's settings."""
    return AnswerSettings(args.augmentation, args.noise_step, args.seed, args.noise_schedule, args.template, args.pad,
                          args.max_new_tokens, args.max_length, args.negative_steps, args.reference_logps, args.filter,
                          args.prefill_batch_size or None, args.draft)


def answer_chunk(model, processor, instances, image_folder, settings=AnswerSettings(), warn=print):
    """Chosen and rejected answers of a chunk of instances, each generated as one batch, as `settings` say
    (AnswerSettings). With settings.reference also the model's log-probs of the answers each pair will keep,
    both on the ORIGINAL image, as training's reference scores them (generate.score_answers).

    Returns one row per instance, in order: {chosen, rejected} (rejected: one answer, or with negative_steps a
    list of one per view), with reference also {reference_chosen_logps, reference_rejected_logps} where a
    pair is kept, or {skipped: reason, message}.
    """
    s = settings
    template, pad = vlm.resolve_template(model, s.template), s.pad and vlm.pads_to_square(model)
    rows, images = load_chunk(processor, instances, image_folder, template, pad, s.max_new_tokens, s.max_length, warn)
    ready = [k for k, row in enumerate(rows) if row is None]
    if ready:
        questions, ids = [instances[k]["question"] for k in ready], [instances[k]["id"] for k in ready]
        decoding = dict(template=template, max_new_tokens=s.max_new_tokens, batch_size=len(ready),
                        prefill_batch=s.prefill_batch)
        if s.reference:  # the prompts' KV cache is kept, to score the answers on the original image below
            chosen, chosen_ids, state = generate_tokens(model, processor, images, questions, keep_state=True,
                                                        **decoding)  # chosen = model(I, Q)
        else:
            chosen, chosen_ids, _ = generate_tokens(model, processor, images, questions,
                                                    **decoding)  # chosen = model(I, Q)
        views = []
        for view, step in enumerate(s.negative_steps or [s.noise_step]):
            augmented, pixel_transform = augment.augmented_batch(s.augmentation, images, view_ids(ids, view), s.seed,
                                                                 step, s.schedule)
            # rejected = model(T(I), Q), each instance its own seeded T; most often the chosen answer again, so the
            # chosen answer drafts it (the same greedy answer, most of it in one forward)
            if s.draft and can_draft(model):
                views.append(drafted_generate(model, processor, augmented, questions, chosen_ids,
                                              pixel_transform=pixel_transform, **decoding)[0])
            else:
                views.append(generate(model, processor, augmented, questions, pixel_transform=pixel_transform,
                                      **decoding))
        for n, (k, c) in enumerate(zip(ready, chosen)):
            rows[k] = dict(chosen=c, rejected=[v[n] for v in views] if s.negative_steps else views[0][n])
        if s.reference:
            kept = [kept_rejected(rows[k], s.filter_mode) for k in ready]
            scored = score_answers(model, processor, state, images, questions,
                                   [[rows[k]["chosen"]] + r for k, r in zip(ready, kept)], chosen_ids, template)
            for k, r, (c, *rejected) in zip(ready, kept, scored):
                if r:
                    rows[k].update(reference_chosen_logps=c,
                                   reference_rejected_logps=rejected if s.negative_steps else rejected[0])
    return rows


def load_chunk(processor, instances, image_folder, template, pad, max_new_tokens, max_length, warn):
    """(rows, images): rows[k] is None for an instance ready to answer, else why it is skipped (a message
    naming the record, printed through `warn` and counted by reason); images of the ready ones, in order."""
    rows, images = [], []
    for instance in instances:
        path = os.path.join(image_folder, instance["image"])
        try:
            image = vlm.load_image(path, pad=pad)
        except ValueError as e:  # the error names the file
            problem = ("missing or corrupt image", str(e))
        else:
            prompt = vlm.prompt_text(processor, instance["question"], template)
            length = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]  # image tokens too
            problem = None if length + max_new_tokens <= max_length else ("longer than --max-length", (
                f"{path}: {length} prompt tokens + {max_new_tokens} new tokens > --max-length {max_length}"))
        if problem:
            rows.append(dict(skipped=problem[0], message=f"record {instance['id']}: {problem[1]}; skipped"))
            warn(rows[-1]["message"])
        else:
            rows.append(None)
            images.append(image)
    return rows, images


# ----------------------------------------------------------------------------- Alg. 1 line 3: drop equal answers
def distinct_rejected(chosen, rejected, mode="exact"):
    """Several negatives (paper 3.3): the rejected answers that differ from the chosen one and from each other,
    in view order; [] drops the instance, as line 3 drops a pair whose answers are equal."""
    kept = []
    for answer in rejected:
        if not same_answer(chosen, answer, mode) and not any(same_answer(answer, k, mode) for k in kept):
            kept.append(answer)
    return kept


def reference_of(row):
    """A kept pair's reference log-probs (--reference-logps), or {}."""
    return {k: row[k] for k in pairs.REFERENCE_KEYS if k in row}


def kept_rejected(row, mode="exact"):
    """The rejected answers of a row that line 3 keeps: [] when the pair is dropped."""
    if isinstance(row["rejected"], list):
        return distinct_rejected(row["chosen"], row["rejected"], mode)
    return [] if same_answer(row["chosen"], row["rejected"], mode) else [row["rejected"]]


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


# ----------------------------------------------------------------------------- the output, chunk by chunk
# The arguments that decide the output: partial files made with others are not resumed.
OUTPUT_ARGS = ("model", "data", "image_folder", "subsets", "num_samples", "seed", "augmentation", "noise_step",
               "noise_schedule", "template", "pad", "max_new_tokens", "max_length", "batch_size", "precision",
               "negative_steps", "reference_logps", "filter")


def sharded_output(args, instances, rank, world_size):
    """Where each finished chunk of answers goes until the pairs file is written (common.ShardedOutput)."""
    return common.ShardedOutput(args.out, {key: getattr(args, key) for key in OUTPUT_ARGS},
                                [instance["id"] for instance in instances], args.batch_size, rank, world_size)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data (Alg. 1 line 1)")
    g.add_argument("--data", default="toy/pool.json",
                   help="LLaVA-665k-format json or jsonl (paper: llava_v1_5_mix665k.json)")
    g.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    g.add_argument("--subsets", default="all", help=f"comma list of {', '.join(pool.SUBSETS)} (image path prefixes), "
                                                    f"or all (paper: textvqa,ocr_vqa)")
    g.add_argument("--num-samples", type=int, default=0,
                   help="instances in total, drawn evenly over the subsets; 0 = all (paper: 16000, 8k per subset)")
    g.add_argument("--seed", type=int, default=0, help="sampling and augmentation seed (the authors set none)")
    g = p.add_argument_group("generation (Alg. 1 line 2)")
    g.add_argument("--model", default="toy/model-sft", help="local HF model folder (paper: LLaVA-1.5-7B/13B)")
    g.add_argument("--augmentation", default="diffusion",
                   help=f"T(I) for the rejected answer: {', '.join(augment.ALL_AUGMENTATIONS)} (paper: diffusion)")
    g.add_argument("--noise-step", type=int, default=500, help="diffusion step 0..999 (paper: 500 for 13B, 800 for 7B)")
    g.add_argument("--num-negatives", type=int, default=1,
                   help="K augmented views per instance, K rejected answers (paper 3.3); the distinct ones that "
                        "differ from the chosen answer are kept in one record (train_ddp.py --negatives-loss), the "
                        "instance dropped when none does (Alg. 1: 1)")
    g.add_argument("--negative-steps", default="",
                   help="with diffusion noise, one step per view (comma list, e.g. 300,500,800; K = its length); "
                        "default: K views at --noise-step, each with its own noise")
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
    g.add_argument("--prefill-batch-size", type=int, default=0,
                   help="read each batch's prompts this many at a time, then decode the batch together (0: all at "
                        "once). On CPUs 4 is faster: the activations stay small; answers are the same. Every family "
                        "but PaliGemma (vlm.FAMILIES prefill_rows)")
    g.add_argument("--no-draft", dest="draft", action="store_false",
                   help="decode the rejected answers one forward per token; by default each is drafted by its "
                        "chosen answer, verified in one forward (draft.py: the same answers, fewer forwards), in "
                        "the families with vlm.FAMILIES prefill_rows; the others decode plainly")
    g.add_argument("--reference-logps", action="store_true",
                   help="also score each kept pair's answers under this model on the original image, as training's "
                        "reference does, into the pairs (the chosen answer from its own generation, the rejected by "
                        "continuing the prompt's KV cache): train_ddp.py --reference pairs then runs no reference "
                        "forward; keeps each batch's prompt cache while its rejected answers are generated")
    g = p.add_argument_group("output (Alg. 1 line 3)")
    g.add_argument("--filter", default="exact", choices=["exact", "normalized"],
                   help="drop pairs with equal answers: exact string equality (authors) or after lowercasing, "
                        "collapsing whitespace and stripping trailing punctuation")
    g.add_argument("--out", default="runs/seva/pairs.jsonl", help="pairs file (jsonl); OUT.args.json gets args and summary")
    g.add_argument("--export", default="", help="comma list: trl (OUT .trl.jsonl, TRL's vision DPO format), "
                                                "authors (OUT .authors.json, the authors' step-3 fields)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    plan.add_arguments(p)
    args = p.parse_args(argv)
    args.subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    args.export = [s.strip() for s in args.export.split(",") if s.strip()]
    try:
        steps = [int(step) for step in args.negative_steps.split(",") if step.strip()]
    except ValueError:
        p.error(f"--negative-steps {args.negative_steps}: a comma list of integers")
    if steps and args.num_negatives not in (1, len(steps)):
        p.error(f"--negative-steps gives {len(steps)} steps but --num-negatives is {args.num_negatives}")
    if args.num_negatives < 1:
        p.error(f"--num-negatives must be >= 1, got {args.num_negatives}")
    # None: Alg. 1's one negative (the pairs file as ever); else the step of each view
    args.negative_steps = steps or ([args.noise_step] * args.num_negatives if args.num_negatives > 1 else None)
    args.num_negatives = len(args.negative_steps or [None])
    return args


def check_args(args):
    """Refuse bad arguments before any work, the model not yet loaded."""
    augment.check_augmentation(args.augmentation)
    for flag, step in [("--noise-step", args.noise_step)] + [("--negative-steps", s) for s in args.negative_steps or []]:
        if not 0 <= step < diffusion.NUM_DIFFUSION_STEPS:
            raise ValueError(f"{flag} must be in 0..{diffusion.NUM_DIFFUSION_STEPS - 1}, got {step}")
    if args.negative_steps and len(set(args.negative_steps)) > 1 and args.augmentation != "diffusion":
        raise ValueError("--negative-steps are diffusion steps: use them with --augmentation diffusion")
    if args.subsets != ["all"] and (not args.subsets or any(s not in pool.SUBSETS for s in args.subsets)):
        raise ValueError(f"--subsets {','.join(args.subsets)}: choose from {', '.join(pool.SUBSETS)}, or all")
    if any(kind not in ("trl", "authors") for kind in args.export):
        raise ValueError(f"--export {','.join(args.export)}: choose from trl, authors")
    if args.prefill_batch_size < 0:
        raise ValueError("--prefill-batch-size must be >= 0")
    if args.batch_size < 1 or args.num_samples < 0 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1, --num-samples >= 0")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model {args.model}: not a model folder (no config.json); build the toy world with "
                         f"`python -m toyworld` or pass a local HF folder")
    for path in (args.data, args.image_folder):
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder")


def main(argv=None):
    args = parse_args(argv)
    if args.plan:  # from config.json alone: no weight read, no process group
        return plan.plan_generation(args)
    check_args(args)
    rank, world_size, device = common.compute_init(args.seed)
    lock = runcontrol.lock_output(args.out, rank, world_size)  # one run per --out: a second is refused
    if lock:
        atexit.register(lock.release)
    warn = print if world_size == 1 else lambda message: print(f"[rank {rank}] {message}", flush=True)

    # ---- Alg. 1 line 1: sample; every rank computes the same list
    records = common.read_records(args.data)
    if not isinstance(records, list):
        raise ValueError(f"{args.data}: expected a json list of records")
    instances, sampling_skipped, messages = pool.sample_instances(records, args.subsets, args.num_samples, args.seed, args.data)
    for message in messages[:20]:
        common.print0(message)
    if len(messages) > 20:
        common.print0(f"... and {len(messages) - 20} more (all in {args.out}.args.json)")
    if not instances:
        raise ValueError(f"{args.data}: no instances to answer (subsets: {','.join(args.subsets)}; a subset is "
                         f"the first folder of the image paths)")
    model, processor = vlm.load(args.model, device, common.weight_dtype(device, args.precision))
    model.eval()
    args.template = vlm.resolve_template(model, args.template)  # the family's, recorded as used
    args.pad = args.pad and vlm.pads_to_square(model)
    problem = args.reference_logps and vlm.pair_forward_problem(model, "shared_prefix")
    if problem:  # the answers continue the prompt's cache (generate.score_answers)
        raise ValueError(f"--reference-logps: {problem}; make the pairs without it (train_ddp.py --reference "
                         f"precomputed scores them instead)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    output = sharded_output(args, instances, rank, world_size)
    todo = output.resume()
    common.print0(f"{len(instances)} instances in {len(output.chunks)} chunks of {args.batch_size} on "
                  f"{world_size} process(es)")
    if output.done_before:
        warn(f"resuming {output.path}: {output.done_before} chunk(s) done before")

    # ---- Alg. 1 line 2: answer on I and on T(I), chunk k on rank k % N; each finished chunk goes to disk
    settings = settings_of(args)
    for k in tqdm(todo, desc="seva", disable=rank != 0 or not args.progress):
        chunk = output.chunks[k]
        rows = answer_chunk(model, processor, [instances[i] for i in chunk], args.image_folder, settings, warn)
        output.append([dict(index=i, id=instances[i]["id"], **row) for i, row in zip(chunk, rows)])
    common.barrier(world_size)

    # ---- Alg. 1 line 3: drop the pairs whose answers are equal (rank 0, in instance order)
    summary = None
    if rank == 0:
        rows = output.merge()
        if args.negative_steps is None:  # one negative
            kept = [pairs.pair_record(instance, row["chosen"], row["rejected"], args.augmentation, args.noise_step)
                    | reference_of(row) for instance, row in zip(instances, rows)
                    if "skipped" not in row and not same_answer(row["chosen"], row["rejected"], args.filter)]
        else:  # several: the distinct rejected answers that differ from chosen, with the step each came from
            kept = []
            for instance, row in zip(instances, rows):
                rejected = [] if "skipped" in row else distinct_rejected(row["chosen"], row["rejected"], args.filter)
                if rejected:
                    steps = [args.negative_steps[row["rejected"].index(r)] for r in rejected]
                    kept.append(pairs.pair_record(instance, row["chosen"], rejected, args.augmentation, steps)
                                | reference_of(row))
        summary = pairs.summarize(instances, rows, kept, sampling_skipped, messages)
        pairs.write_pairs(args.out, kept, dict(args=vars(args), world_size=world_size, summary=summary),
                          args.image_folder, args.export)
        output.remove()
        print(f"wrote {args.out}\n" + pairs.format_summary(summary, args.filter), flush=True)
    common.finish_distributed()
    return summary


if __name__ == "__main__":
    common.run_main(main, "seva.py")
