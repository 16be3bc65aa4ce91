"""
GQA (Hudson & Manning 2019), the compositional visual question answering benchmark of paper Table 2
(LLaVA-1.5-7B 62.0, SeVa-7B 60.7): short answers about real images (Visual Genome), on the 12,578
questions of the testdev-balanced split, evaluated the way LLaVA-1.5 does it:

  * prompt: the question, then LLaVA-1.5's "\\nAnswer the question using a single word or phrase.";
    greedy, at most 128 new tokens (LLaVA's model_vqa_loader.py default), through eval/runner.py;
  * prediction: the answer with trailing periods removed and lower-cased (LLaVA's
    scripts/convert_gqa_for_eval.py), written to OUT/testdev_balanced_predictions.json, the file
    GQA's official eval.py reads;
  * score: a prediction is right when it equals the answer string exactly (eval.py); accuracy overall
    (the paper's number), for binary and open questions, and per structural and semantic type.
    Not computed: eval.py's distribution score, its consistency (it needs the all-questions file's
    entailed questions), validity, plausibility and grounding (choices and scene graphs, which testdev
    does not ship). The paper reports accuracy only.

Input: GQA's testdev_balanced_questions.json ({questionId: {imageId, question, answer, types, ...}},
images at IMAGE_FOLDER/{imageId}.jpg), or LLaVA's llava_gqa_testdev_balanced.jsonl (question_id,
image, text) with the answers taken from --questions-json (without it: answers and predictions only).

    python -m eval.gqa --model /models/llava-1.5-7b-hf [--adapter runs/seva-7b/adapter] \\
        --questions-json /data/gqa/testdev_balanced_questions.json --image-folder /data/gqa/images \\
        --out runs/eval/gqa-7b
"""
import argparse
import json
import os

import common
from eval import runner
from eval.pope import LLAVA_SUFFIX

QUESTIONS_FILE = "testdev_balanced_questions.json"  # GQA's official name, in LLaVA's playground/data/eval/gqa/data
PREDICTIONS_FILE = "testdev_balanced_predictions.json"  # the name eval.py --tier testdev_balanced looks for
ANSWER_FILE = "gqa.jsonl"  # the runner's answer file, LLaVA's format


# ----------------------------------------------------------------------------- data
# A record: question_id, image (a path under the image folder), text (the prompt), answer, structural,
# semantic (answer and types None when only LLaVA's question file is given).
def gqa_records(path):
    """GQA's official question file as records, in the file's order."""
    data = common.read_records(path)  # a malformed file is an error naming it
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected GQA's json dict {{questionId: question}}, got a {type(data).__name__}")
    records = []
    for question_id, entry in data.items():
        types = entry.get("types") if isinstance(entry, dict) else None
        if not isinstance(types, dict) or any(k not in entry for k in ("imageId", "question", "answer")) \
                or any(k not in types for k in ("structural", "semantic")):
            raise ValueError(f"{path}: question {question_id} needs imageId, question, answer and "
                             "types.structural, types.semantic")
        records.append(dict(question_id=question_id, image=f"{entry['imageId']}.jpg",
                            text=entry["question"] + LLAVA_SUFFIX, answer=entry["answer"],
                            structural=types["structural"], semantic=types["semantic"]))
    return records


def llava_records(path):
    """LLaVA's GQA question file (jsonl: question_id, image, text) as records without answers."""
    records = []
    for line_no, row in enumerate(common.read_jsonl(path), 1):
        missing = [k for k in ("question_id", "image", "text") if k not in row]
        if missing:
            raise ValueError(f"{path}: row {line_no} lacks {', '.join(missing)}")
        # LLaVA's file carries the suffix already; a file without it gets it, so both inputs ask the same
        text = row["text"] if row["text"].endswith(LLAVA_SUFFIX) else row["text"] + LLAVA_SUFFIX
        records.append(dict(question_id=row["question_id"], image=row["image"], text=text, answer=None,
                            structural=None, semantic=None))
    return records


def with_answers(records, truth, truth_path):
    """The records with the answer and types of the same question id in `truth` (gqa_records)."""
    by_id = {r["question_id"]: r for r in truth}  # GQA's ids are strings; LLaVA's file keeps them so
    missing = [r["question_id"] for r in records if str(r["question_id"]) not in by_id]
    if missing:
        raise ValueError(f"{truth_path}: no question ids {missing[:10]} ({len(missing)} of {len(records)})")
    return [dict(r, **{k: by_id[str(r["question_id"])][k] for k in ("answer", "structural", "semantic")})
            for r in records]


def read_questions(questions_path, answers_path=None):
    """Records of GQA's json, or of LLaVA's jsonl with the answers of GQA's json at answers_path if given."""
    if not questions_path.endswith(".jsonl"):
        return gqa_records(questions_path)
    records = llava_records(questions_path)
    return with_answers(records, gqa_records(answers_path), answers_path) if answers_path else records


def runner_questions(records):
    return [dict(question_id=r["question_id"], image=r["image"], text=r["text"]) for r in records]


# ----------------------------------------------------------------------------- scoring (convert_gqa_for_eval.py, eval.py)
def normalise(text):
    """convert_gqa_for_eval.py's prediction: trailing periods removed, lower case ("Yes." -> "yes")."""
    return text.rstrip(".").lower()


def answer_type(record):
    # The rule of GQA's eval.py: a question is "open" when its structural type is query, else "binary"
    # (verify, logical, choose, compare). Not "the answer is yes or no": choose questions ("Is it red or
    # blue?") have answers like "red" and still count as binary, so our binary/open equal eval.py's.
    return "open" if record["structural"] == "query" else "binary"


def predictions(records, answers):
    """normalise() of each record's answer in the runner's answer file, matched by question id."""
    given = {str(a["question_id"]): a["text"] for a in answers}
    missing = [r["question_id"] for r in records if str(r["question_id"]) not in given]
    if missing:
        raise ValueError(f"no answer for question ids {missing[:10]} ({len(missing)} of {len(records)})")
    return [normalise(given[str(r["question_id"])]) for r in records]


def correctness(records, answers):
    """Is each prediction right? eval.py: equal to the answer string, nothing else (no synonyms, no stemming)."""
    return [prediction == r["answer"] for prediction, r in zip(predictions(records, answers), records)]


def accuracy_by(right, keys):
    """({key: accuracy}, {key: number of questions}) over the questions of each key, keys sorted."""
    groups = {}
    for ok, key in zip(right, keys):
        groups.setdefault(key, []).append(ok)
    return ({k: sum(v) / len(v) for k, v in sorted(groups.items())},
            {k: len(v) for k, v in sorted(groups.items())})


def score(records, answers):
    """Accuracy overall, binary, open (None where a set has no question), per structural and semantic type,
    and the number of questions behind each."""
    if not records:
        raise ValueError("no GQA questions to score")
    right = correctness(records, answers)
    by_answer_type, answer_type_counts = accuracy_by(right, [answer_type(r) for r in records])
    structural, structural_counts = accuracy_by(right, [r["structural"] for r in records])
    semantic, semantic_counts = accuracy_by(right, [r["semantic"] for r in records])
    return dict(accuracy=sum(right) / len(right), binary=by_answer_type.get("binary"), open=by_answer_type.get("open"),
                structural=structural, semantic=semantic,
                questions=dict(all=len(right), binary=answer_type_counts.get("binary", 0),
                               open=answer_type_counts.get("open", 0), structural=structural_counts,
                               semantic=semantic_counts))


def prediction_rows(records, answers):
    """The predictions file of eval.py: [{"questionId": ..., "prediction": ...}], in question order."""
    return [dict(questionId=r["question_id"], prediction=p) for r, p in zip(records, predictions(records, answers))]


# ----------------------------------------------------------------------------- the benchmark
def evaluate(model, processor, model_id, questions_path, image_folder, out_dir, rank=0, world_size=1,
             answers_path=None, **decoding):
    """Answer and score GQA: score()'s dict (accuracy None when the questions carry no answers).
    questions_path: GQA's json, or LLaVA's jsonl with GQA's json as answers_path for the answers.
    Writes OUT_DIR/gqa.jsonl (the answers) and OUT_DIR/testdev_balanced_predictions.json (for eval.py)."""
    records = read_questions(questions_path, answers_path)
    questions = runner_questions(records)
    runner.check_images(questions, image_folder)  # before any answering
    answers = runner.answer_questions(model, processor, questions, os.path.join(out_dir, ANSWER_FILE),
                                      model_id, image_folder, rank=rank, world_size=world_size, **decoding)
    if rank == 0:
        common.write_atomic(os.path.join(out_dir, PREDICTIONS_FILE), [json.dumps(prediction_rows(records, answers))])
    if any(r["answer"] is None for r in records):
        return dict(accuracy=None, questions=dict(all=len(records)))
    return score(records, answers)


def format_table(results):
    counts = results["questions"]
    rows = [["all", counts["all"], results["accuracy"]], ["binary", counts["binary"], results["binary"]],
            ["open", counts["open"], results["open"]]]
    for kind in ("structural", "semantic"):
        rows += [[f"{kind}: {t}", counts[kind][t], accuracy] for t, accuracy in results[kind].items()]
    return "\n".join(common.markdown_table(["questions", "number", "accuracy"], [
        [name, n, "-" if accuracy is None else f"{100 * accuracy:.1f}"] for name, n, accuracy in rows]))


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    runner.add_model_args(p, max_new_tokens=128)
    g = p.add_argument_group("data")
    g.add_argument("--questions-json", default=None,
                   help=f"GQA's official {QUESTIONS_FILE} (LLaVA: playground/data/eval/gqa/data/); answered "
                        "and scored, or with --llava-questions only the answers' source")
    g.add_argument("--llava-questions", default=None,
                   help="LLaVA's llava_gqa_testdev_balanced.jsonl (question_id, image, text) to answer instead; "
                        "scored against --questions-json if given")
    g.add_argument("--image-folder", required=True,
                   help="GQA's images folder, {imageId}.jpg (LLaVA: playground/data/eval/gqa/data/images)")
    g.add_argument("--out", default="runs/eval/gqa",
                   help=f"folder for {ANSWER_FILE}, {PREDICTIONS_FILE} (eval.py's input) and gqa.json")
    args = p.parse_args(argv)
    if not args.questions_json and not args.llava_questions:
        p.error(f"give --questions-json (GQA's {QUESTIONS_FILE}) or --llava-questions")
    return args


def main(argv=None):
    args = parse_args(argv)
    questions_path = args.llava_questions or args.questions_json
    answers_path = args.questions_json if args.llava_questions else None  # LLaVA's file: answers from GQA's
    # bad files and missing images fail here, not after the minutes a 7B model takes to load
    runner.check_images(runner_questions(read_questions(questions_path, answers_path)), args.image_folder)
    run = runner.setup(args)
    results = evaluate(run.model, run.processor, run.model_id, questions_path, args.image_folder, args.out,
                       run.rank, run.world_size, answers_path=answers_path, **run.decoding)
    if run.rank == 0:
        runner.write_results(args, run, "gqa", results)
        if results["accuracy"] is None:
            print(f"GQA, {run.model_id}: {results['questions']['all']} answers in {args.out}/{PREDICTIONS_FILE}; "
                  "not scored (give --questions-json for the answers)")
        else:
            print(f"GQA testdev-balanced, {run.model_id} (percent; paper Table 2 reports 'all': LLaVA-1.5-7B 62.0, "
                  "SeVa-7B 60.7)\n" + format_table(results))
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.gqa")
