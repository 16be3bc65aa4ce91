"""
The open-ended benchmarks of paper Table 2, graded by a judge model (GPT-4 in the paper):

  MM-Vet (Yu et al. 2023): the judge gives each answer a correctness score 0.0-1.0 against the ground
      truth, through a few-shot prompt; the benchmark score is the mean x 100 (LLaVA-1.5-7B 30.5, SeVa 37.2).
  LLaVA-Bench in-the-wild (Liu et al. 2023): the judge rates two assistants 1-10 on each question, the
      reference (GPT-4) answer as assistant 1 and ours as assistant 2, seeing the image only through its
      caption; the score is mean(ours) / mean(reference) x 100 (63.4 -> 72.2).

Answers are exported in the official formats (MM-Vet: a json {question_id: answer} for its online
grader; LLaVA-Bench: the answer jsonl, and the reviews in the jsonl LLaVA's summarize_gpt_review.py reads).
The judge is optional (eval/judge_client.py: any OpenAI-compatible endpoint, retried, its replies cached).

Comparable with published scores only with the official grading prompts, which this project does not copy:
the user gives their copy of the official files (--judge-prompt: MM-Vet's grader prompt; --rules and
--judge-system: LLaVA's rule.json and the review script's system message) and the official judge model (the
default). Without them a built-in paraphrase grades, and every output says "not comparable with published
scores" (comparable: false, and a note). The requests, the parsing of the replies and the averaging are the
official scripts' (mm-vet_evaluator.py; LLaVA's eval_gpt_review_bench.py and summarize_gpt_review.py).

    python -m eval.judge --benchmark mmvet --data-dir /data/mm-vet --model /models/llava-1.5-7b-hf \
        --judge-url https://api.openai.com/v1 --judge-model gpt-4-0613 --out runs/eval/mmvet-7b
    python -m eval.judge --benchmark llava-bench --data-dir /data/llava-bench-in-the-wild --model ... \
        --adapter runs/seva-7b/adapter --judge-url ... --out runs/eval/llava-bench-seva-7b
"""
import argparse
import json
import os
from collections import defaultdict

import common
from eval import judge_client, runner

# ----------------------------------------------------------------------------- MM-Vet
# The fallback without --judge-prompt: the structure of MM-Vet's grader (instructions, a few-shot table of
# (question, ground truth, prediction, correctness)) in our own wording and examples. Not comparable.
MMVET_INSTRUCTIONS = (
    "Grade how correct a model's prediction is against the ground truth, with a score from 0.0 (entirely wrong) "
    "to 1.0 (entirely right) in steps of 0.1. In a ground truth, <AND> joins parts that must all be in the "
    "prediction for full marks, and <OR> joins alternatives of which any single one is enough. Write only the "
    "score of the last row.\n\n"
    "Question | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n")
MMVET_EXAMPLES = [
    ("What is 12 + 30?", "42", "The sum is 42.", "1.0"),
    ("What is 12 + 30?", "42", "It makes 40.", "0.0"),
    ("Which fruits are on the plate?", "apple <AND> banana", "I can see an apple.", "0.5"),
    ("Which fruits are on the plate?", "apple <AND> banana", "A banana and an apple.", "1.0"),
    ("What colour is the bus?", "red <OR> dark red", "The bus is dark red.", "1.0"),
    ("Why does the man hold an umbrella?", "It is raining, so he keeps dry.",
     "He holds it against the rain, to stay dry.", "1.0"),
    ("Describe the chart's trend and its peak year.", "Sales grow every year and peak in 2019.",
     "Sales grow steadily over the years.", "0.6"),
]


MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "  # mm-vet_evaluator.py's retry query
MMVET_RETRIES = 4  # retries whose reply is read (see grade_mmvet_answer)


def builtin_mmvet_prompt():
    return MMVET_INSTRUCTIONS + "\n".join(" | ".join(example) for example in MMVET_EXAMPLES)


def mmvet_query(prompt, question, ground_truth, prediction):
    """mm-vet_evaluator.py's query: the prompt, a newline, the row to grade with its last cell left empty."""
    ground_truth = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return prompt + "\n" + " | ".join([question, ground_truth, prediction, ""])


def parse_mmvet_score(reply):
    """mm-vet_evaluator.py: the reply's first space-separated word as a float in [0, 1], or None."""
    try:
        score = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    # Deviation: "nan" passes the official range check (and makes its mean nan); here it is asked again.
    return score if 0.0 <= score <= 1.0 else None


def grade_mmvet_answer(query, client):
    """(score, last reply, parsed) as mm-vet_evaluator.py grades one answer: the query at temperature 0.0
    (max_tokens 3); while the reply does not parse, the query + MMVET_RETRY_SUFFIX, the first retry at 0.0,
    each further one 0.5 hotter; 0.0 when 4 retries did not parse."""
    ask = lambda content, temperature: judge_client.chat_completion(messages=[{"role": "user", "content": content}],
                                                       temperature=temperature, max_tokens=3, **client)
    reply = ask(query, 0.0)
    score, temperature = parse_mmvet_score(reply), 0.0
    for _ in range(MMVET_RETRIES):
        if score is not None:
            break
        reply = ask(query + MMVET_RETRY_SUFFIX, temperature)
        score, temperature = parse_mmvet_score(reply), temperature + 0.5
    # The official loop then sends a 5th retry (at 2.0) and discards its reply: the score is 0.0 either way,
    # so that request is not sent here.
    return (0.0 if score is None else score), reply, score is not None


def grade_mmvet(items, answers, judge, prompt=None):
    """Score each answer (grade_mmvet_answer) with the official grader `prompt` (its text; None: our
    paraphrase, not comparable). Returns (per-question rows, {"score", capability: score, comparable, note})."""
    client = judge_client.client_settings(judge, judge_client.MMVET_JUDGE_MODEL)
    given = {str(a["question_id"]): a["text"] for a in answers}  # MM-Vet's keys: "v1_0", ...
    rows, by_capability = [], defaultdict(list)
    for qid, item in items.items():
        query = mmvet_query(builtin_mmvet_prompt() if prompt is None else prompt, item["question"], item["answer"],
                            given[str(qid)])
        score, reply, parsed = grade_mmvet_answer(query, client)
        rows.append(dict(question_id=qid, score=score, reply=reply, parsed=parsed))
        for capability in set(item.get("capability", [])):  # the official counts a capability once per question
            by_capability[capability].append(score)
    results = {"score": 100 * sum(r["score"] for r in rows) / len(rows)}
    results.update({c: 100 * sum(v) / len(v) for c, v in sorted(by_capability.items())})
    missing = [] if prompt is not None else ["the built-in paraphrase of MM-Vet's grader prompt (--judge-prompt)"]
    results.update(judge_client.comparability(missing, client["model"], judge_client.MMVET_JUDGE_MODEL), judge_model=client["model"],
                   unparsed=sum(not r["parsed"] for r in rows))
    return rows, results


def read_mmvet(data_dir):
    """MM-Vet's mm-vet.json: {question_id: {imagename, question, answer, capability}}; images in images/."""
    with open(os.path.join(data_dir, "mm-vet.json"), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- LLaVA-Bench in-the-wild
# The review as LLaVA's eval_gpt_review_bench.py sends it: a system message, then the image as its caption,
# the question, the two answers between markers, the category's rule from rule.json. The fallback without
# --rules / --judge-system: one rule and a system message in our own wording. Not comparable.
LLAVA_BENCH_SYSTEM = "You are a careful and fair judge of the quality of answers."
LLAVA_BENCH_RULE = (
    "We want your judgement of how well two AI assistants answered the user question shown above. The user "
    "asked it while looking at an image, which you know only through the description given as context. "
    "Rate the helpfulness, relevance, accuracy and level of detail of each response with a single overall "
    "score from 1 to 10, where higher is better.\n"
    "On the first line, write only the two scores, for Assistant 1 and Assistant 2 in that order, separated by "
    "a space.\nFrom the second line on, explain your rating thoroughly and impartially: neither the order in "
    "which the responses appear nor their length should sway you.")


def llava_bench_prompt(caption, question, reference, answer, role="Assistant", rule=LLAVA_BENCH_RULE):
    """eval_gpt_review_bench.py's user message: {role} 1 is the reference (GPT-4) answer, {role} 2 the model's;
    role and rule from the question's category in rule.json."""
    caption = "\n".join(caption) if isinstance(caption, list) else caption
    return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule}\n\n")


def parse_pair_scores(reply):
    """The two scores as eval_gpt_review_bench.py's parse_score reads them, or None (its [-1, -1]): the first
    line, ',' -> ' ', split on single spaces (so '8, 6' and '8  6' do not parse), exactly two floats."""
    parts = reply.split("\n")[0].replace(",", " ").split(" ")
    try:
        return (float(parts[0]), float(parts[1])) if len(parts) == 2 else None
    except ValueError:
        return None


def summarize_reviews(reviews):
    """summarize_gpt_review.py: per category and "all", the mean of every review's (reference, model) tuple,
    the unparsed [-1, -1] ones included, each mean rounded to 3 decimals; relative = model / reference x 100."""
    tuples = defaultdict(list)
    for review in reviews:
        tuples[review["category"]].append(review["tuple"])
        tuples["all"].append(review["tuple"])
    results = {}
    for category, pairs in sorted(tuples.items()):
        reference = round(sum(p[0] for p in pairs) / len(pairs), 3)
        model = round(sum(p[1] for p in pairs) / len(pairs), 3)
        results[category] = dict(relative=100 * model / reference if reference else 0.0, reference=reference,
                                 model=model, reviews=len(pairs))
    return results


def rule_of(rules, category):
    """The category's rule ({role, prompt}) in rule.json, or our one rule without it."""
    if rules is None:
        return dict(role="Assistant", prompt=LLAVA_BENCH_RULE)
    if category not in rules:  # the official script asserts the same
        raise ValueError(f"--rules: no rule for category {category!r} (it has {sorted(rules)})")
    return rules[category]


def grade_llava_bench(questions, contexts, references, answers, judge, rules=None, system=None):
    """Review each answer against the reference (temperature 0.2, max_tokens 1024, as the official script)
    with rule.json's `rules` and the official `system` message (None: our paraphrase, not comparable).
    Returns (review rows in LLaVA's format, results: summarize_reviews, unparsed, comparable, note)."""
    client = judge_client.client_settings(judge, judge_client.LLAVA_BENCH_JUDGE_MODEL)
    system_message = LLAVA_BENCH_SYSTEM if system is None else system
    given = {a["question_id"]: a for a in answers}
    reviews = []
    for i, q in enumerate(questions):
        ref, ours = references[q["question_id"]], given[q["question_id"]]
        category = "llava_bench_" + q.get("category", "all")
        rule = rule_of(rules, category)
        content = llava_bench_prompt(contexts[q["image"]], q["text"], ref["text"], ours["text"], rule["role"],
                                     rule["prompt"])
        reply = judge_client.chat_completion(messages=[{"role": "system", "content": system_message},
                                          {"role": "user", "content": content}],
                                temperature=0.2, max_tokens=1024, **client)
        scores = parse_pair_scores(reply)
        reviews.append(dict(id=i + 1, question_id=q["question_id"], answer1_id=ref.get("answer_id", ref["question_id"]),
                            answer2_id=ours["answer_id"], category=category, content=reply,
                            tuple=list(scores) if scores else [-1, -1]))
    results = summarize_reviews(reviews)
    missing = [what for what, given_file in (("the built-in paraphrase of rule.json's rules (--rules)", rules),
                                             ("a built-in system message (--judge-system)", system))
               if given_file is None]
    results.update(judge_client.comparability(missing, client["model"], judge_client.LLAVA_BENCH_JUDGE_MODEL), judge_model=client["model"],
                   unparsed=sum(parse_pair_scores(r["content"]) is None for r in reviews))
    return reviews, results


def read_llava_bench_prompts(rules_path, system_path):
    """rule.json ({"llava_bench_" + category: {role, prompt}}) and the system message (one trailing newline of
    the file dropped: the official message has none), each None when not given."""
    rules = None
    if rules_path:
        with open(rules_path, encoding="utf-8") as f:
            rules = json.load(f)
        bad = [k for k, v in rules.items() if not isinstance(v, dict) or not {"role", "prompt"} <= set(v)]
        if bad:
            raise ValueError(f"{rules_path}: rules without role and prompt: {bad[:5]}")
    system = judge_client.read_text(system_path).removesuffix("\n") if system_path else None
    return rules, system


def read_llava_bench(data_dir):
    """questions.jsonl, context.jsonl ({image: caption}), answers_gpt4.jsonl ({question_id: row})."""
    questions = common.read_jsonl(os.path.join(data_dir, "questions.jsonl"))
    contexts = {row["image"]: row["caption"] for row in common.read_jsonl(os.path.join(data_dir, "context.jsonl"))}
    references = {row["question_id"]: row for row in common.read_jsonl(os.path.join(data_dir, "answers_gpt4.jsonl"))}
    return questions, contexts, references


# ----------------------------------------------------------------------------- the benchmarks
def mmvet_questions(items):
    return [dict(question_id=qid, image=item["imagename"], text=item["question"]) for qid, item in items.items()]


def evaluate_mmvet(model, processor, model_id, data_dir, out_dir, judge=None, answers_file=None, rank=0,
                   world_size=1, **decoding):
    """Answer MM-Vet (or read ANSWERS_FILE), export OUT_DIR/mmvet.json, grade if a judge is given."""
    items = read_mmvet(data_dir)
    if answers_file:
        answers = runner.read_answers(answers_file, mmvet_questions(items))
    else:
        answers = runner.answer_questions(model, processor, mmvet_questions(items),
                                          os.path.join(out_dir, "mmvet-answers.jsonl"), model_id,
                                          os.path.join(data_dir, "images"), rank=rank, world_size=world_size,
                                          **decoding)
    if rank != 0:
        return None
    os.makedirs(out_dir, exist_ok=True)
    common.write_atomic(os.path.join(out_dir, "mmvet.json"),  # MM-Vet's format: {question_id: answer}
                        [json.dumps({a["question_id"]: a["text"] for a in answers}, indent=1, ensure_ascii=False)])
    if not judge:
        return None
    path = judge.get("judge_prompt")  # the official prompt string, sent as is
    rows, results = grade_mmvet(items, answers, judge, judge_client.read_text(path) if path else None)
    results["prompt_files"] = judge_client.prompt_files({"--judge-prompt": path})
    common.write_atomic(os.path.join(out_dir, "mmvet-grades.jsonl"), [json.dumps(r, ensure_ascii=False) for r in rows])
    return dict(results, per_question={r["question_id"]: r["score"] for r in rows})


def evaluate_llava_bench(model, processor, model_id, data_dir, out_dir, judge=None, answers_file=None, rank=0,
                         world_size=1, **decoding):
    """Answer LLaVA-Bench (or read ANSWERS_FILE) into OUT_DIR/llava-bench.jsonl, review if a judge is given."""
    questions, contexts, references = read_llava_bench(data_dir)
    if answers_file:
        answers = runner.read_answers(answers_file, questions)
    else:
        asked = [dict(question_id=q["question_id"], image=q["image"], text=q["text"]) for q in questions]
        answers = runner.answer_questions(model, processor, asked, os.path.join(out_dir, "llava-bench.jsonl"), model_id,
                                          os.path.join(data_dir, "images"), rank=rank, world_size=world_size,
                                          **decoding)
    if rank != 0 or not judge:
        return None
    rules, system = read_llava_bench_prompts(judge.get("llava_rules"), judge.get("llava_system"))
    reviews, results = grade_llava_bench(questions, contexts, references, answers, judge, rules, system)
    results["prompt_files"] = judge_client.prompt_files({"--rules": judge.get("llava_rules"),
                                            "--judge-system": judge.get("llava_system")})
    os.makedirs(out_dir, exist_ok=True)  # with --answers nothing has made it yet
    common.write_atomic(os.path.join(out_dir, "llava-bench-reviews.jsonl"),
                        [json.dumps(r, ensure_ascii=False) for r in reviews])
    # The model's own score per question (assistant 2), for pair-wise comparisons (paper Fig. 5).
    return dict(results, per_question={r["question_id"]: r["tuple"][1] for r in reviews if r["tuple"] != [-1, -1]})


BENCHMARKS = {"mmvet": evaluate_mmvet, "llava-bench": evaluate_llava_bench}


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    runner.add_model_args(p, max_new_tokens=1024, batch_size=8)
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which open-ended benchmark")
    g.add_argument("--data-dir", required=True,
                   help="MM-Vet: folder of mm-vet.json and images/; LLaVA-Bench: folder of questions.jsonl, "
                        "context.jsonl, answers_gpt4.jsonl and images/")
    g.add_argument("--answers", default=None, help="grade this answer file instead of generating (no model loaded)")
    g.add_argument("--out", default=None, help="output folder (default runs/eval/BENCHMARK)")
    judge_client.add_judge_args(p)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", "eval", args.benchmark)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.answers:  # grade a file: no model
        run = runner.Loaded(None, None, args.model_id, 0, 1, runner.decoding(args, None))
    else:
        run = runner.setup(args)
    evaluate = BENCHMARKS[args.benchmark]
    results = evaluate(run.model, run.processor, run.model_id, args.data_dir, args.out, judge_client.judge_from_args(args),
                       args.answers, run.rank, run.world_size, **run.decoding)
    if run.rank == 0:
        if results is None:
            print(f"{args.benchmark}: answers written to {args.out}; no --judge-url, so no score")
        else:
            summary = {k: v for k, v in results.items() if k != "per_question"}
            common.write_atomic(os.path.join(args.out, f"{args.benchmark}-scores.json"),
                                [json.dumps(dict(args=dict(vars(args), model_id=run.model_id), results=summary), indent=1)])
            print(f"{args.benchmark}: " + json.dumps(summary, indent=1))
            if not summary["comparable"]:
                print(f"{args.benchmark}: NOTE: {summary['note']}")
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.judge", (ValueError, OSError, RuntimeError))
