"""
Toy-world VQA: greedy exact-match accuracy per question family (colour, shape, count, exist, word) on
toy/val.json, on the clean images and under diffusion noise at --noise-step (robustness: the noise that
made SeVa's rejected answers, paper Alg. 1 line 2). The toy world's stand-in for paper Table 2's VQA
columns (GQA, SQA): short answers checked against labels.

    python -m eval.toyvqa --model toy/model-sft --adapter runs/dpo/adapter --noise-step 500

The one place toy VQA is scored (`is_right`: case-insensitive exact match): the answer files of the runner
(`evaluate`) and a model in memory (`vqa_accuracy`, which `python -m toyworld` prints) give equal numbers
(tested).
"""
import argparse
import os

import augment
import common
import vlm
from eval import runner
from generate import generate


# ----------------------------------------------------------------------------- questions and scoring
def first_question(record):
    """(image, question, answer, family) of a record's first turn."""
    human, gpt = record["conversations"][0], record["conversations"][1]
    return record["image"], human["value"].replace("<image>", "").strip(), gpt["value"], record["families"][0]


def toy_questions(records):
    """The first question of each val.json record, as runner questions (question_id = the record's id)."""
    questions = []
    for record in records:
        image, question, _, family = first_question(record)
        questions.append(dict(question_id=record["id"], image=image, text=question, metadata=dict(family=family)))
    return questions


def is_right(given, record):
    """The one rule of toy VQA: exact match with the first question's answer, case-insensitive."""
    return given.lower() == first_question(record)[2].lower()


def scores(records, texts):
    """{family: accuracy, ..., "overall": accuracy} of answers (strings) to each record's first question."""
    right = {}
    for record, given in zip(records, texts):
        right.setdefault(first_question(record)[3], []).append(is_right(given, record))
    accuracy = {family: sum(r) / len(r) for family, r in sorted(right.items())}
    accuracy["overall"] = sum(sum(r) for r in right.values()) / len(records)
    return accuracy


def texts_of(records, answers):
    """The answer file's texts, in the records' order."""
    given = {a["question_id"]: a["text"] for a in answers}
    return [given[r["id"]] for r in records]


def correctness(records, answers):
    """Is each answer of an answer file right?"""
    return [is_right(given, record) for given, record in zip(texts_of(records, answers), records)]


def vqa_scores(records, answers):
    """scores() of an answer file."""
    return scores(records, texts_of(records, answers))


def share_changed(clean, noisy):
    """The share of questions whose answer (a string) the noise changed."""
    return sum(a != b for a, b in zip(clean, noisy)) / len(clean)


def change_rate(clean, noisy):
    """share_changed of two answer files."""
    return share_changed([a["text"] for a in clean], [b["text"] for b in noisy])


# ----------------------------------------------------------------------------- a model in memory (toyworld.py)
def vqa_accuracy(model, processor, records, image_folder, batch_size=64, pixel_transform=None):
    """Greedy answers to the first question of each record, straight through generate.py, and their scores.
    Returns ({family: accuracy, "overall": accuracy}, answers)."""
    rows = [first_question(r) for r in records]
    pad = vlm.pads_to_square(model)
    images = [vlm.load_image(os.path.join(image_folder, image), pad=pad) for image, _, _, _ in rows]
    answers = generate(model, processor, images, [q for _, q, _, _ in rows], batch_size=batch_size,
                       pixel_transform=pixel_transform, progress=True)
    return scores(records, answers), answers


def noise_change_rate(model, processor, records, image_folder, noise_step, seed, batch_size=64):
    """The fraction of questions whose greedy answer changes when the image gets diffusion noise."""
    _, clean = vqa_accuracy(model, processor, records, image_folder, batch_size)
    noise = augment.noise_transform([r["id"] for r in records], noise_step, seed)
    _, noisy = vqa_accuracy(model, processor, records, image_folder, batch_size, pixel_transform=noise)
    return share_changed(clean, noisy)


# ----------------------------------------------------------------------------- the benchmark
def evaluate(model, processor, model_id, val_path, image_folder, out_dir, noise_step=500, seed=0, rank=0,
             world_size=1, **decoding):
    """{"clean": accuracy, "noisy": accuracy, "changed": share}; noise_step None skips the noisy run.
    Answers in OUT_DIR/toyvqa-clean.jsonl and OUT_DIR/toyvqa-noise{step}.jsonl."""
    records = common.read_records(val_path)
    questions = toy_questions(records)
    shared = dict(rank=rank, world_size=world_size, **decoding)
    clean = runner.answer_questions(model, processor, questions, os.path.join(out_dir, "toyvqa-clean.jsonl"),
                                    model_id, image_folder, **shared)
    results = {"clean": vqa_scores(records, clean)}
    if noise_step is not None:
        noisy = runner.answer_questions(model, processor, questions,
                                        os.path.join(out_dir, f"toyvqa-noise{noise_step}.jsonl"), model_id,
                                        image_folder, noise_step=noise_step, seed=seed, **shared)
        results["noisy"] = vqa_scores(records, noisy)
        results["changed"] = change_rate(clean, noisy)
    return results


def format_table(results):
    families = list(results["clean"])
    return "\n".join(common.markdown_table(["images", *families], [
        [name] + [f"{100 * results[name][f]:.1f}" for f in families] for name in ("clean", "noisy") if name in results]))


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
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
    run = runner.setup(args)
    results = evaluate(run.model, run.processor, run.model_id, args.val, args.image_folder, args.out, noise_step,
                       args.seed, run.rank, run.world_size, **run.decoding)
    if run.rank == 0:
        runner.write_results(args, run, "toyvqa", results)
        print(f"toy VQA exact match, {run.model_id} (percent)\n" + format_table(results))
        if "changed" in results:
            print(f"answers changed by noise at step {noise_step}: {results['changed']:.1%}")
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.toyvqa")
