"""
POPE (Li et al. 2023), the hallucination benchmark of paper Table 2: "Is there a <object> in the image?"
about objects that are, or are not, in the image; three splits by how the absent objects are drawn
(random, popular, adversarial). Scored exactly as LLaVA's and SeVa's eval_pope.py: keep the text before
the first '.', drop commas, split on spaces; the words "No", "not" or "no" make the answer "no", anything
else is "yes"; positive class "yes". Paper Table 2's POPE column (85.9 -> 86.7 for 7B) is the F1 score
averaged over the three splits, as LLaVA-1.5 reports it.

Toy world (toy/pope/*.jsonl, the default):
    python -m eval.pope --model toy/model-sft --adapter runs/dpo/adapter
COCO POPE (the POPE repo's coco_pope_{random,popular,adversarial}.json, jsonl despite the name):
    python -m eval.pope --model /models/llava-1.5-7b-hf --pope-dir /data/pope/coco \
        --image-folder /data/coco/val2014 --prompt-suffix llava --max-new-tokens 128 --out runs/eval/pope-7b

Which questions: LLaVA-1.5 (and the published numbers that follow it) answers the coco files of POPE's commit
e3e39262 (random 2,910 questions, popular and adversarial 3,000 each); POPE's later files differ (3,000 random
questions, spelling fixes in some prompts). Every run prints and records the files it answered (path, questions
and "yes" labels per split, sha256) and whether their counts are LLaVA's; `--check-questions` does only that.
"""
import argparse
import os

import common
import vlm
from eval import runner

SPLITS = ("random", "popular", "adversarial")
LLAVA_POPE_COMMIT = "e3e39262c85a6a83f26cf5094022a782cb0df58d"  # LLaVA's docs/Evaluation.md links output/coco there
LLAVA_POPE_COUNTS = {"random": 2910, "popular": 3000, "adversarial": 3000}  # llava_pope_test.jsonl: 8,910
# LLaVA-1.5's POPE question file appends this to every question.
LLAVA_SUFFIX = "\n" + vlm.SINGLE_WORD
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


# ----------------------------------------------------------------------------- scoring (LLaVA's eval_pope.py)
def pope_answer(text):
    """A free-form answer as "yes" or "no", the way LLaVA's eval_pope.py reads it."""
    if "." in text:
        text = text.split(".")[0]  # only the first sentence
    words = text.replace(",", "").split(" ")  # spaces only, as the original: "No\n..." stays one word
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions, labels):
    """Accuracy, precision, recall, F1 and yes-ratio of "yes"/"no" predictions; positive class "yes"."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    positive = [p == "yes" for p in predictions]
    truth = [label.strip().lower() != "no" for label in labels]  # LLaVA: anything but "no" is positive
    tp = sum(p and t for p, t in zip(positive, truth))
    fp = sum(p and not t for p, t in zip(positive, truth))
    tn = sum(not p and not t for p, t in zip(positive, truth))
    fn = sum(not p and t for p, t in zip(positive, truth))
    # Deviation: LLaVA divides by zero when the model never says "yes" (or "no"); we report 0.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(tp + tn) / len(labels), precision=precision, recall=recall, f1=f1,
                yes_ratio=sum(positive) / len(positive))


def average(results):
    """Each metric averaged over the splits (LLaVA-1.5 and SeVa report the average F1)."""
    return {m: sum(r[m] for r in results) / len(results) for m in METRICS}


# ----------------------------------------------------------------------------- data
def split_file(pope_dir, split):
    """toy/pope/{split}.jsonl, or the POPE repo's coco_pope_{split}.json."""
    for name in (f"{split}.jsonl", f"coco_pope_{split}.json", f"{split}.json"):
        path = os.path.join(pope_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{pope_dir}: no {split}.jsonl or coco_pope_{split}.json")


def read_pope(path):
    """POPE's jsonl rows: question_id, image, text, label."""
    rows = common.read_jsonl(path)
    for line_no, row in enumerate(rows, 1):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
        if missing:
            raise ValueError(f"{path}: row {line_no} lacks {', '.join(missing)}")
    return rows


def pope_questions(rows, prompt_suffix=""):
    return [dict(question_id=row["question_id"], image=row["image"], text=row["text"] + prompt_suffix)
            for row in rows]


def predictions(rows, answers):
    """pope_answer of each row's answer, matched by question_id."""
    given = {a["question_id"]: a["text"] for a in answers}
    missing = [row["question_id"] for row in rows if row["question_id"] not in given]
    if missing:
        raise ValueError(f"no answer for question_ids {missing[:10]}")
    return [pope_answer(given[row["question_id"]]) for row in rows]


def score(rows, answers):
    """pope_metrics of an answer file against POPE's labels."""
    return pope_metrics(predictions(rows, answers), [row["label"] for row in rows])


def correctness(rows, answers):
    """Is each answer right? (for pair-wise comparisons, paper Fig. 5)"""
    return [p == ("no" if row["label"].strip().lower() == "no" else "yes")
            for p, row in zip(predictions(rows, answers), rows)]


def question_files(pope_dir, splits=SPLITS):
    """{split: {path, questions, yes, sha256}}: the question files a run answers."""
    files = {}
    for split in splits:
        path = split_file(pope_dir, split)
        rows = read_pope(path)
        files[split] = dict(path=path, questions=len(rows), yes=sum(r["label"].strip().lower() != "no" for r in rows),
                            sha256=common.file_digest(path))
    return files


def question_lines(files):
    """What question_files found, in words: counts per split, and whether they are LLaVA-1.5's files'."""
    lines = [f"POPE questions, {split}: {f['questions']} ({f['yes']} yes) from {f['path']} (sha256 {f['sha256'][:12]})"
             for split, f in files.items()]
    counts = {split: f["questions"] for split, f in files.items()}
    pinned = f"POPE commit {LLAVA_POPE_COMMIT[:8]}, which LLaVA-1.5 answers: random 2910, popular 3000, adversarial 3000"
    if all(LLAVA_POPE_COUNTS.get(split) == n for split, n in counts.items()):
        lines.append(f"POPE questions: the counts of {pinned}")
    else:
        lines.append(f"POPE questions: NOT the counts of {pinned}; a score on these is not comparable question for "
                     f"question with published LLaVA-1.5 numbers")
    return lines


# ----------------------------------------------------------------------------- the benchmark
def evaluate(model, processor, model_id, pope_dir, image_folder, out_dir, splits=SPLITS, prompt_suffix="",
             rank=0, world_size=1, **decoding):
    """Answer and score every split: {split: metrics, ..., "average": metrics}.
    Answers in OUT_DIR/pope-{split}.jsonl, each in its label file's order (LLaVA's eval_pope.py reads them so)."""
    results = {}
    for split in splits:
        rows = read_pope(split_file(pope_dir, split))
        answers = runner.answer_questions(model, processor, pope_questions(rows, prompt_suffix),
                                          os.path.join(out_dir, f"pope-{split}.jsonl"), model_id, image_folder,
                                          rank=rank, world_size=world_size, **decoding)
        results[split] = score(rows, answers)
    results["average"] = average([results[s] for s in splits])
    return results


def format_table(results):
    return "\n".join(common.markdown_table(["split", *METRICS], [
        [split] + [f"{100 * metrics[m]:.1f}" for m in METRICS] for split, metrics in results.items()
        if split != "questions"]))


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    runner.add_model_args(p, max_new_tokens=16)
    g = p.add_argument_group("data")
    g.add_argument("--pope-dir", default="toy/pope",
                   help="folder of {random,popular,adversarial}.jsonl or the POPE repo's coco_pope_{split}.json")
    g.add_argument("--image-folder", default="toy/images",
                   help="folder the rows' image paths are relative to (COCO: val2014)")
    g.add_argument("--splits", default=",".join(SPLITS), help="comma list of splits to run")
    g.add_argument("--prompt-suffix", default="",
                   help="text appended to each question; 'llava' = LLaVA-1.5's '\\nAnswer the question using a "
                        "single word or phrase.' (use it with COCO POPE; the toy model was not trained on it)")
    g.add_argument("--out", default="runs/eval/pope", help="folder for the answer files and pope.json")
    g.add_argument("--check-questions", action="store_true",
                   help="only print the question files' counts per split (and whether they are LLaVA-1.5's) and exit")
    args = p.parse_args(argv)
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if args.prompt_suffix == "llava":
        args.prompt_suffix = LLAVA_SUFFIX
    return args


def main(argv=None):
    args = parse_args(argv)
    files = question_files(args.pope_dir, args.splits)
    if args.check_questions:
        print("\n".join(question_lines(files)))
        return files
    run = runner.setup(args)
    results = evaluate(run.model, run.processor, run.model_id, args.pope_dir, args.image_folder, args.out, args.splits,
                       args.prompt_suffix, run.rank, run.world_size, **run.decoding)
    results["questions"] = files
    if run.rank == 0:
        runner.write_results(args, run, "pope", results)
        print(f"POPE, {run.model_id} (percent; paper Table 2 reports the average F1)\n" + format_table(results))
        print("\n".join(question_lines(files)))
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.pope")
