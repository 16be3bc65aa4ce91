"""
Toy-world VQA: greedy exact-match accuracy per question family (colour, shape, count, exist, word) on
toy/val.json, on the clean images and under diffusion noise at --noise-step (robustness: the noise that
made SeVa's rejected answers, paper Alg. 1 line 2). The toy world's stand-in for paper Table 2's VQA
columns (GQA, SQA): short answers checked against labels.

    python -m eval.toyvqa --model toy/model-sft --adapter runs/dpo/adapter --noise-step 500

The questions and the scoring rule are toyworld.py's (`first_question`; case-insensitive exact match, as
`vqa_accuracy`), so the numbers equal the ones `python toyworld.py` prints (tested).
"""
import argparse
import json
import os
import sys

import toyworld
import train_ddp
from eval import runner


# ----------------------------------------------------------------------------- questions and scoring
def toy_questions(records):
    """The first question of each val.json record, as runner questions (question_id = the record's id)."""
    questions = []
    for record in records:
        image, question, _, family = toyworld.first_question(record)
        questions.append(dict(question_id=record["id"], image=image, text=question, metadata=dict(family=family)))
    return questions


def correctness(records, answers):
    """Is each answer right? toyworld.vqa_accuracy's rule: exact match, case-insensitive."""
    given = {a["question_id"]: a["text"] for a in answers}
    return [given[r["id"]].lower() == toyworld.first_question(r)[2].lower() for r in records]


def vqa_scores(records, answers):
    """{family: accuracy, ..., "overall": accuracy} of an answer file, scored by toyworld.vqa_scores."""
    given = {a["question_id"]: a["text"] for a in answers}
    return toyworld.vqa_scores(records, [given[r["id"]] for r in records])


def change_rate(clean, noisy):
    """The share of questions whose answer the noise changed (toyworld.noise_change_rate's measure)."""
    return sum(a["text"] != b["text"] for a, b in zip(clean, noisy)) / len(clean)


# ----------------------------------------------------------------------------- the benchmark
def evaluate(model, processor, model_id, val_path, image_folder, out_dir, noise_step=500, seed=0, rank=0,
             world_size=1, **decoding):
    """{"clean": accuracy, "noisy": accuracy, "changed": share}; noise_step None skips the noisy run.
    Answers in OUT_DIR/toyvqa-clean.jsonl and OUT_DIR/toyvqa-noise{step}.jsonl."""
    records = train_ddp.read_records(val_path)
    questions = toy_questions(records)
    common = dict(rank=rank, world_size=world_size, **decoding)
    clean = runner.answer_questions(model, processor, questions, os.path.join(out_dir, "toyvqa-clean.jsonl"),
                                    model_id, image_folder, **common)
    results = {"clean": vqa_scores(records, clean)}
    if noise_step is not None:
        noisy = runner.answer_questions(model, processor, questions,
                                        os.path.join(out_dir, f"toyvqa-noise{noise_step}.jsonl"), model_id,
                                        image_folder, noise_step=noise_step, seed=seed, **common)
        results["noisy"] = vqa_scores(records, noisy)
        results["changed"] = change_rate(clean, noisy)
    return results


def format_table(results):
    families = list(results["clean"])
    lines = ["| images | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    for name in ("clean", "noisy"):
        if name in results:
            lines.append(f"| {name} | " + " | ".join(f"{100 * results[name][f]:.1f}" for f in families) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_model_args(p, max_new_tokens=16)
    g = p.add_argument_group("data")
    g.add_argument("--val", default="toy/val.json", help="held-out labeled questions (LLaVA-665k format)")
    g.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    g.add_argument("--noise-step", type=int, default=500,
                   help="diffusion step 0..999 of the noisy run, -1 to skip it (paper: 500 for 13B, 800 for 7B)")
    g.add_argument("--out", default="runs/eval/toyvqa", help="folder for the answer files and toyvqa.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not -1 <= args.noise_step <= 999:
        raise ValueError(f"--noise-step must be in 0..999, or -1, got {args.noise_step}")
    noise_step = None if args.noise_step < 0 else args.noise_step
    model, processor, rank, world_size = runner.setup(args)
    results = evaluate(model, processor, args.model_id, args.val, args.image_folder, args.out, noise_step,
                       args.seed, rank, world_size, **runner.decoding(args))
    if rank == 0:
        runner.write_atomic(os.path.join(args.out, "toyvqa.json"),
                            [json.dumps(dict(args=vars(args), results=results), indent=1)])
        print(f"toy VQA exact match, {args.model_id} (percent)\n" + format_table(results))
        if "changed" in results:
            print(f"answers changed by noise at step {noise_step}: {results['changed']:.1%}")
    runner.finish_distributed(world_size)
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"eval.toyvqa: error: {e}")
