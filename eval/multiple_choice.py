"""
Multiple-choice benchmarks of paper Table 2: MMBench (en and cn), SEED-Bench-Image, ScienceQA, from
local files. The options go into the prompt as LLaVA-1.5 writes them (model_vqa_mmbench.py):

    {hint}
    {question}
    A. {option A}
    B. {option B}
    ...
    Answer with the option's letter from the given choices directly.

The letter is read from the answer robustly (`extract_letter`) and compared with the right one.
Circular evaluation (MMBench's): each question is asked once per option, the options rotated each
time; it counts as right only if it is right in every rotation.

Files: MMBench's tsv (index, question, hint, A, B, C, D, answer, category, image as base64), or a jsonl
with one question a line: question_id, question, options (a list) or A/B/C/D... (or SEED's choice_a...),
answer (a letter, or ScienceQA's option index), image (a path under --image-folder; SEED's data_id) or
image_base64, optional hint and category; or a json list of the same (SEED-Bench.json's "questions": its
video questions are skipped, as SEED-Image has none).

    python -m eval.multiple_choice --model /models/llava-1.5-7b-hf --data /data/mmbench/mmbench_dev_20230712.tsv \
        --circular
    python -m eval.multiple_choice --model ... --data /data/mmbench/mmbench_dev_cn_20231003.tsv --lang cn --circular
    python -m eval.multiple_choice --model ... --data /data/seed/seed-image.jsonl --image-folder /data/seed/images
"""
import argparse
import csv
import json
import os
import re
import sys
from collections import defaultdict

import common
from eval import runner

LETTERS = "ABCDEFGHIJ"
SUFFIX = {"en": "Answer with the option's letter from the given choices directly.",
          "cn": "请直接回答选项字母。"}  # LLaVA's two single-prediction prompts


# ----------------------------------------------------------------------------- reading questions
def is_none(value):
    """MMBench leaves cells empty or 'nan' where a question has no hint or fewer options."""
    return value is None or (isinstance(value, float) and value != value) or \
        (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


def normalize_question(row, where):
    """One question from a tsv or jsonl row: question_id, question, hint, options, answer, category, image."""
    qid = next((row[k] for k in ("question_id", "index", "id") if k in row), None)
    if qid is None or is_none(row.get("question")):
        raise ValueError(f"{where}: needs question_id (or index) and question")
    if isinstance(qid, str) and qid.isdigit():
        qid = int(qid)  # MMBench's index column is a number
    if isinstance(row.get("options"), list):
        options = [str(o) for o in row["options"]]
    elif isinstance(row.get("choices"), list):  # ScienceQA's problems.json
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
    if isinstance(answer, int) and not isinstance(answer, bool):  # ScienceQA: the option's index
        answer = LETTERS[answer]
    answer = None if is_none(answer) else str(answer).strip()  # MMBench's test split has no answers
    if answer is not None and answer not in LETTERS[:len(options)]:
        raise ValueError(f"{where}: question {qid} has answer {answer!r}, not one of {LETTERS[:len(options)]}")
    question = dict(question_id=qid, question=str(row["question"]),
                    hint=None if is_none(row.get("hint")) else str(row["hint"]), options=options, answer=answer,
                    category=next((str(row[k]) for k in ("category", "question_type_id") if not is_none(row.get(k))),
                                  None))
    image = row.get("image", row.get("data_id"))
    if not is_none(row.get("image_base64")):
        question["image_base64"] = row["image_base64"]
    elif not is_none(image):
        question["image"] = image
    else:
        raise ValueError(f"{where}: question {qid} has no image (text-only questions are not supported)")
    return question


def read_questions(path):
    """The questions of a tsv (MMBench) or jsonl / json file, normalized."""
    if path.endswith(".tsv"):
        csv.field_size_limit(sys.maxsize)  # base64 images are long cells
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        for row in rows:  # MMBench's image column holds the image itself, base64
            row["image_base64"] = row.pop("image", None)
    elif path.endswith(".jsonl"):
        rows = common.read_jsonl(path)
    else:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if isinstance(rows, dict) and isinstance(rows.get("questions"), list):  # SEED-Bench.json
            rows = rows["questions"]
        elif isinstance(rows, dict):  # ScienceQA's problems.json: {id: problem}
            rows = [dict(row, question_id=key) for key, row in rows.items()]
    rows = [row for row in rows if row.get("data_type", "image") == "image"]  # SEED-Image: no video questions
    return [normalize_question(row, f"{path}: row {i + 1}") for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------- prompts and rotations
def mc_prompt(question, hint, options, lang="en"):
    """LLaVA-1.5's multiple-choice prompt (model_vqa_mmbench.py with --single-pred-prompt)."""
    text = f"{hint}\n{question}" if hint else question
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return text + "\n" + SUFFIX[lang]


def rotations(options, circular):
    """[(round, shown options, their original letters)]: round r shows option (j + r) % n at letter j."""
    n = len(options)
    return [(r, options[r:] + options[:r], list(LETTERS[r:n] + LETTERS[:r])) for r in range(n if circular else 1)]


def runner_questions(questions, circular=False, lang="en"):
    """One runner question per (question, rotation), with LLaVA's round_id / options / option_char fields."""
    out = []
    for q in questions:
        for round_id, shown, letters in rotations(q["options"], circular):
            item = dict(question_id=q["question_id"], text=mc_prompt(q["question"], q["hint"], shown, lang),
                        fields=dict(round_id=round_id, options=shown, option_char=letters))
            item.update({k: q[k] for k in ("image", "image_base64") if k in q})
            out.append(item)
    return out


# ----------------------------------------------------------------------------- scoring
def extract_letter(text, options):
    """The option letter an answer picks, or None. In order: the answer is a letter ('B', '(b)'); it starts
    with one ('B. cat', '(B) cat', 'B: cat'); 'the answer is B' / 'Answer: B'; exactly one valid capital
    letter stands alone in it (MMBench's rule; a leading article 'A cat' does not count); exactly one
    option's text is in it (MMBench's second rule)."""
    letters = LETTERS[:len(options)]
    text = text.strip()
    match = (re.fullmatch(r"\(?([A-Za-z])\)?\.?", text) or re.match(r"\(?([A-Z])(?:[.):]|\)\s)", text)
             or re.search(r"(?i:answer)(?:\s+is)?\s*:?\s*\(?([A-Z])\b", text))
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    words = re.sub(r"[.()\[\],:;!*#{}\"']", " ", text).split()
    found = [letter for letter in letters if letter in words]
    lowered = text.lower()
    by_text = [letter for letter, option in zip(letters, options)
               if option.strip() and option.strip().lower() in lowered]
    article = words[:1] == ["A"] and len(words) > 1 and words[1][:1].islower() and words.count("A") == 1
    if len(found) == 1 and not (article and found == ["A"] and len(by_text) == 1):  # "A cat": the article
        return found[0]
    return by_text[0] if len(by_text) == 1 else None


def round_right(answer_row, truth):
    """Is one round's answer right? Its letter is mapped back through the round's rotation."""
    letter = extract_letter(answer_row["text"], answer_row["options"])
    return letter is not None and answer_row["option_char"][LETTERS.index(letter)] == truth


def outcomes(questions, answers, circular=False):
    """[(right in every round, right in the first round)] of each labeled question."""
    by_key = {(a["question_id"], a["round_id"]): a for a in answers}
    result = []
    for q in questions:
        if q["answer"] is not None:
            ok = [round_right(by_key[(q["question_id"], r)], q["answer"])
                  for r, _, _ in rotations(q["options"], circular)]
            result.append((all(ok), ok[0]))
    return result


def score(questions, answers, circular=False):
    """Accuracy (circular: right in every rotation), accuracy of the first round alone, per category."""
    labeled = [q for q in questions if q["answer"] is not None]
    if not labeled:
        return None  # e.g. MMBench's test split: submit the answer file instead
    results = outcomes(labeled, answers, circular)
    per_category = defaultdict(list)
    for q, (right, _) in zip(labeled, results):
        per_category[q["category"] or "all"].append(right)
    return dict(accuracy=sum(r for r, _ in results) / len(results),
                first_round_accuracy=sum(f for _, f in results) / len(results), num_questions=len(results),
                circular=circular, unparsed=sum(extract_letter(a["text"], a["options"]) is None for a in answers),
                categories={c: sum(v) / len(v) for c, v in sorted(per_category.items())})


# ----------------------------------------------------------------------------- the benchmark
def evaluate(model, processor, model_id, path, image_folder, out_dir, circular=False, lang="en", name=None,
             rank=0, world_size=1, **decoding):
    """Answer and score one file; answers in OUT_DIR/{name}.jsonl (LLaVA's MMBench answer fields)."""
    questions = read_questions(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    answers = runner.answer_questions(model, processor, runner_questions(questions, circular, lang),
                                      os.path.join(out_dir, f"{name}.jsonl"), model_id, image_folder,
                                      rank=rank, world_size=world_size, **decoding)
    return score(questions, answers, circular)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_model_args(p, max_new_tokens=16)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="MMBench tsv, or a jsonl / json of questions (see above)")
    g.add_argument("--image-folder", default=".",
                   help="folder the image paths are relative to (unused for base64 images)")
    g.add_argument("--circular", action="store_true",
                   help="MMBench's circular evaluation: every rotation of the options must be answered right")
    g.add_argument("--lang", default="en", choices=sorted(SUFFIX), help="prompt language (cn: MMBench-CN)")
    g.add_argument("--name", default=None, help="benchmark name for the answer file (default: the data file's name)")
    g.add_argument("--out", default="runs/eval/multiple_choice", help="folder for the answer file and NAME.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = runner.setup(args)
    name = args.name or os.path.splitext(os.path.basename(args.data))[0]
    results = evaluate(run.model, run.processor, run.model_id, args.data, args.image_folder, args.out, args.circular,
                       args.lang, name, run.rank, run.world_size, **run.decoding)
    if run.rank == 0:
        common.write_atomic(os.path.join(args.out, f"{name}.json"),
                            [json.dumps(dict(args=dict(vars(args), model_id=run.model_id), results=results), indent=1)])
        if results is None:
            print(f"{name}: no answers in the data; the answer file is {os.path.join(args.out, name + '.jsonl')}")
        else:
            print(f"{name}, {run.model_id}: accuracy {100 * results['accuracy']:.1f}"
                  f"{' (circular)' if args.circular else ''} over {results['num_questions']} questions, "
                  f"{results['unparsed']} answer(s) without a letter")
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.multiple_choice")
