"""
The files of the multiple-choice benchmarks, read into one question format: MMBench's tsv (base64 images, its
circular copies as extra rows), ScienceQA's problems.json (+ pid_splits.json; text-only problems skipped and
counted), SEED-Bench.json (video questions skipped), or a generic jsonl / json list. eval/multiple_choice.py
asks and scores them.

A question: question_id, question, hint, options, answer (a letter, or None), category, image or image_base64,
and the benchmark it is from (which decides its prompt and letter rule).
"""
import csv
import json
import os
import sys

import common

LETTERS = "ABCDEFGHIJ"
COPY_OFFSET = 1_000_000  # MMBench's tsv: the circular copies of question i are the rows i + k * 1,000,000


def group_of(question):
    """MMBench: a question and its circular copies share index mod 1,000,000; other questions are their own."""
    qid = question["question_id"]
    return qid % COPY_OFFSET if question.get("benchmark") == "mmbench" and isinstance(qid, int) else qid



# ----------------------------------------------------------------------------- reading questions
def is_none(value):
    """MMBench leaves cells empty or 'nan' where a question has no hint or fewer options."""
    return value is None or (isinstance(value, float) and value != value) or \
        (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


def normalize_question(row, where, benchmark="generic"):
    """One question from a tsv, json or jsonl row: question_id, question, hint, options, answer, category,
    image, and the benchmark it is from (which decides its prompt and letter rule)."""
    qid = next((row[k] for k in ("question_id", "index", "id") if k in row), None)
    if qid is None or is_none(row.get("question")):
        raise ValueError(f"{where}: needs question_id (or index) and question")
    if isinstance(qid, str) and qid.isdigit():
        qid = int(qid)  # MMBench's index column is a number
    if isinstance(row.get("options"), list):
        options = [str(o) for o in row["options"]]
    elif isinstance(row.get("choices"), list):  # ScienceQA's field name
        options = [str(o) for o in row["choices"]]
    else:
        options = []
        for letter in LETTERS:  # A, B, ... or SEED's choice_a, ...; stop at the first missing one
            value = row.get(letter, row.get(f"choice_{letter.lower()}"))
            if is_none(value):
                break
            options.append(str(value))
    if len(options) < 2:
        raise ValueError(f"{where}: question {qid} has {len(options)} option(s)")
    answer = row.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):  # an option's index
        answer = LETTERS[answer]
    answer = None if is_none(answer) else str(answer).strip()  # MMBench's test split has no answers
    if answer is not None and answer not in LETTERS[:len(options)]:
        raise ValueError(f"{where}: question {qid} has answer {answer!r}, not one of {LETTERS[:len(options)]}")
    question = dict(question_id=qid, question=str(row["question"]),
                    hint=None if is_none(row.get("hint")) else str(row["hint"]), options=options, answer=answer,
                    category=next((str(row[k]) for k in ("category", "question_type_id") if not is_none(row.get(k))),
                                  None), benchmark=benchmark)
    image = row.get("image", row.get("data_id"))
    if not is_none(row.get("image_base64")):
        question["image_base64"] = row["image_base64"]
    elif not is_none(image):
        question["image"] = image
    else:
        raise ValueError(f"{where}: question {qid} has no image (text-only questions are not supported)")
    return question


def scienceqa_split(path, problems, split):
    """The pids of a split: pid_splits.json beside problems.json (what LLaVA's converter reads), else each
    problem's own "split" field."""
    splits_file = os.path.join(os.path.dirname(os.path.abspath(path)), "pid_splits.json")
    if os.path.exists(splits_file):
        with open(splits_file, encoding="utf-8") as f:
            splits = json.load(f)
        if split not in splits:
            raise ValueError(f"{splits_file}: no split {split!r} (it has {sorted(splits)})")
        return [str(pid) for pid in splits[split]]
    return [pid for pid, problem in problems.items() if problem.get("split") == split]


def scienceqa_questions(path, problems, split):
    """ScienceQA's problems.json as LLaVA's convert_sqa_to_llava.py reads it: the split's problems with an
    image (at {pid}/{image}); returns (questions, how many text-only problems were skipped)."""
    questions, text_only = [], 0
    for pid in scienceqa_split(path, problems, split):
        if pid not in problems:
            raise ValueError(f"{path}: split {split} names problem {pid}, which it does not hold")
        problem = problems[pid]
        if problem.get("image") is None:
            text_only += 1  # LLaVA-1.5's SQA-IMG (and the paper's column) counts problems with an image only
            continue
        if len(problem["choices"]) < 2 or not 0 <= problem["answer"] < len(problem["choices"]):
            raise ValueError(f"{path}: problem {pid}: answer {problem['answer']} of {len(problem['choices'])} choices")
        questions.append(dict(question_id=pid, question=problem["question"], hint=problem.get("hint") or "",
                              options=[str(c) for c in problem["choices"]], answer=LETTERS[problem["answer"]],
                              category=problem.get("category"), image=os.path.join(pid, problem["image"]),
                              benchmark="scienceqa"))
    return questions, text_only


def check_circular_copies(questions, where):
    """Every circular copy (index >= 1e6) needs its question (index mod 1e6) in the file: it is the first round."""
    bases = {q["question_id"] for q in questions if q["question_id"] == group_of(q)}
    orphans = [q["question_id"] for q in questions if group_of(q) not in bases]
    if orphans:
        raise ValueError(f"{where}: circular copies without their question (index mod 1,000,000): {orphans[:5]}")


def read_benchmark(path, split="test"):
    """{benchmark, questions, skipped_text_only} of a file; the benchmark is told from its format."""
    if path.endswith(".tsv"):  # MMBench
        csv.field_size_limit(sys.maxsize)  # base64 images are long cells
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        for row in rows:  # MMBench's image column holds the image itself, base64
            row["image_base64"] = row.pop("image", None)
        benchmark = "mmbench"
    elif path.endswith(".jsonl"):
        rows, benchmark = common.read_jsonl(path), "generic"
    else:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        benchmark = "generic"
        if isinstance(rows, dict) and isinstance(rows.get("questions"), list):  # SEED-Bench.json
            rows, benchmark = rows["questions"], "seed"
        elif isinstance(rows, dict):  # ScienceQA's problems.json: {pid: problem}
            questions, skipped = scienceqa_questions(path, rows, split)
            return dict(benchmark="scienceqa", questions=questions, skipped_text_only=skipped)
    rows = [row for row in rows if row.get("data_type", "image") == "image"]  # SEED-Image: no video questions
    questions = [normalize_question(row, f"{path}: row {i + 1}", benchmark) for i, row in enumerate(rows)]
    if benchmark == "mmbench":
        check_circular_copies(questions, path)
    return dict(benchmark=benchmark, questions=questions, skipped_text_only=0)


def read_questions(path, split="test"):
    """The questions of a file, normalized (read_benchmark's)."""
    return read_benchmark(path, split)["questions"]
