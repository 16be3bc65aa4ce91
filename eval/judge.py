"""
The open-ended benchmarks of paper Table 2, graded by a judge model (GPT-4 in the paper):

  MM-Vet (Yu et al. 2023): the judge gives each answer a correctness score 0.0-1.0 against the ground
      truth, through a few-shot prompt; the benchmark score is the mean x 100 (LLaVA-1.5-7B 30.5, SeVa 37.2).
  LLaVA-Bench in-the-wild (Liu et al. 2023): the judge rates two assistants 1-10 on each question, the
      reference (GPT-4) answer as assistant 1 and ours as assistant 2, seeing the image only through its
      caption; the score is mean(ours) / mean(reference) x 100 (63.4 -> 72.2).

Answers are exported in the official formats (MM-Vet: a json {question_id: answer} for its online
grader; LLaVA-Bench: the answer jsonl, and the reviews in the jsonl LLaVA's summarize_gpt_review.py reads).
The judge is optional: any OpenAI-compatible chat-completions endpoint (--judge-url, --judge-model, the key
from OPENAI_API_KEY), called with urllib, retried with exponential backoff, and cached on disk by a hash
of the request, so a rerun sends nothing. The grading prompts follow the structure of the official ones,
in our own words.

    python -m eval.judge --benchmark mmvet --data-dir /data/mm-vet --model /models/llava-1.5-7b-hf \
        --judge-url https://api.openai.com/v1 --judge-model gpt-4-0613 --out runs/eval/mmvet-7b
    python -m eval.judge --benchmark llava-bench --data-dir /data/llava-bench-in-the-wild --model ... \
        --adapter runs/seva-7b/adapter --judge-url ... --out runs/eval/llava-bench-seva-7b
"""
import argparse
import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict

import common
from eval import runner


# ----------------------------------------------------------------------------- the judge client
def endpoint(url):
    """A base URL (https://host/v1) or the full chat-completions URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def request_key(body):
    """The cache key of a request: a hash of its body (model, messages, temperature, max_tokens)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def chat_completion(url, model, messages, api_key=None, cache_dir=None, temperature=0.0, max_tokens=1024,
                    retries=5, backoff=1.0, timeout=120):
    """The judge's reply (a string) to one chat; retried with exponential backoff on 429, 5xx and network
    errors; cached in CACHE_DIR/<hash>.json so that asking the same again costs no request."""
    body = dict(model=model, messages=messages, temperature=temperature, max_tokens=max_tokens)
    key = request_key(body)
    cache_path = os.path.join(cache_dir, f"{key}.json") if cache_dir else None
    if cache_path and os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            return json.load(f)["reply"]
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode()
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(endpoint(url), data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"]
            break
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:  # a bad request or key: retrying will not help
                raise RuntimeError(f"judge {endpoint(url)}: HTTP {e.code}: {e.read()[:500]!r}") from e
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, KeyError, IndexError) as e:
            error = repr(e)  # network trouble, or a reply that is not a chat completion
        if attempt == retries:
            raise RuntimeError(f"judge {endpoint(url)}: no answer after {retries + 1} tries; last error: {error}")
        time.sleep(backoff * 2 ** attempt)
    if cache_path:
        os.makedirs(cache_dir, exist_ok=True)
        common.write_atomic(cache_path, [json.dumps(dict(request=body, reply=reply), ensure_ascii=False)])
    return reply


# ----------------------------------------------------------------------------- MM-Vet
# The structure of MM-Vet's grader: instructions, a few-shot table of (question, ground truth,
# prediction, correctness), and the row to grade with its last cell left empty. Our wording and examples.
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


def mmvet_prompt(question, ground_truth, prediction):
    rows = [" | ".join(example) for example in MMVET_EXAMPLES]
    ground_truth = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_INSTRUCTIONS + "\n".join(rows) + "\n" + " | ".join([question, ground_truth, prediction, ""])


def parse_mmvet_score(reply):
    """The score in a reply ('0.7', '0.7 because ...'), or None if there is none in 0.0..1.0."""
    match = re.match(r"\s*([01](?:\.\d+)?|\.\d+)\b", reply)
    if not match:
        return None
    score = float(match.group(1))
    return score if 0.0 <= score <= 1.0 else None


def grade_mmvet(items, answers, judge, tries=5):
    """Score each answer; an unreadable reply is asked again at a higher temperature (as MM-Vet's grader
    does), and scores 0.0 after `tries`. Returns (per-question rows, {"score", capability: score})."""
    given = {str(a["question_id"]): a["text"] for a in answers}  # MM-Vet's keys: "v1_0", ...
    rows, by_capability = [], defaultdict(list)
    for qid, item in items.items():
        score, reply = None, None
        for attempt in range(tries):
            reply = chat_completion(messages=[{"role": "user", "content": mmvet_prompt(
                item["question"], item["answer"], given[str(qid)])}], temperature=0.5 * attempt, max_tokens=3, **judge)
            score = parse_mmvet_score(reply)
            if score is not None:
                break
        rows.append(dict(question_id=qid, score=0.0 if score is None else score, reply=reply, parsed=score is not None))
        for capability in item.get("capability", []):
            by_capability[capability].append(rows[-1]["score"])
    results = {"score": 100 * sum(r["score"] for r in rows) / len(rows)}
    results.update({c: 100 * sum(v) / len(v) for c, v in sorted(by_capability.items())})
    return rows, results


def read_mmvet(data_dir):
    """MM-Vet's mm-vet.json: {question_id: {imagename, question, answer, capability}}; images in images/."""
    with open(os.path.join(data_dir, "mm-vet.json"), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- LLaVA-Bench in-the-wild
# The structure of LLaVA's review prompt (rule.json, llava_bench_*): the image as its caption, the
# question, two answers between markers, then the rating instructions. Our wording.
LLAVA_BENCH_SYSTEM = "You are a careful and fair judge of the quality of answers."
LLAVA_BENCH_RULE = (
    "We want your judgement of how well two AI assistants answered the user question shown above. The user "
    "asked it while looking at an image, which you know only through the description given as context. "
    "Rate the helpfulness, relevance, accuracy and level of detail of each response with a single overall "
    "score from 1 to 10, where higher is better.\n"
    "On the first line, write only the two scores, for Assistant 1 and Assistant 2 in that order, separated by "
    "a space.\nFrom the second line on, explain your rating thoroughly and impartially: neither the order in "
    "which the responses appear nor their length should sway you.")


def llava_bench_prompt(caption, question, reference, answer):
    """Assistant 1 is the reference (GPT-4) answer, assistant 2 the model's (LLaVA's convention)."""
    caption = "\n".join(caption) if isinstance(caption, list) else caption
    return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{LLAVA_BENCH_RULE}\n\n")


def parse_pair_scores(reply):
    """The two scores on a reply's first line ('8 6', '8, 6', '8.5 6'), or None."""
    parts = reply.split("\n")[0].replace(",", " ").split()
    try:
        return (float(parts[0]), float(parts[1])) if len(parts) == 2 else None
    except ValueError:
        return None


def grade_llava_bench(questions, contexts, references, answers, judge):
    """Review each answer against the reference; returns (review rows in LLaVA's format, results): per
    category and overall, mean(ours) / mean(reference) x 100, and both means."""
    given = {a["question_id"]: a for a in answers}
    reviews, tuples = [], defaultdict(list)
    for i, q in enumerate(questions):
        ref, ours = references[q["question_id"]], given[q["question_id"]]
        reply = chat_completion(messages=[{"role": "system", "content": LLAVA_BENCH_SYSTEM},
                                          {"role": "user", "content": llava_bench_prompt(
                                              contexts[q["image"]], q["text"], ref["text"], ours["text"])}],
                                temperature=0.2, max_tokens=1024, **judge)
        scores = parse_pair_scores(reply)
        category = "llava_bench_" + q.get("category", "all")
        reviews.append(dict(id=i + 1, question_id=q["question_id"], answer1_id=ref.get("answer_id", ref["question_id"]),
                            answer2_id=ours["answer_id"], category=category, content=reply,
                            tuple=list(scores) if scores else [-1, -1]))
        if scores:  # Deviation: LLaVA averages an unreadable review in as (-1, -1); we leave it out
            tuples[category].append(scores)
            tuples["all"].append(scores)
    results = {}
    for category, pairs in sorted(tuples.items()):
        reference_mean = sum(p[0] for p in pairs) / len(pairs)
        ours_mean = sum(p[1] for p in pairs) / len(pairs)
        results[category] = dict(relative=100 * ours_mean / reference_mean if reference_mean else 0.0,
                                 reference=reference_mean, model=ours_mean, reviews=len(pairs))
    results["unparsed"] = sum(r["tuple"] == [-1, -1] for r in reviews)
    return reviews, results


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
        answers = common.read_jsonl(answers_file)
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
    rows, results = grade_mmvet(items, answers, judge)
    common.write_atomic(os.path.join(out_dir, "mmvet-grades.jsonl"), [json.dumps(r, ensure_ascii=False) for r in rows])
    return dict(results, per_question={r["question_id"]: r["score"] for r in rows})


def evaluate_llava_bench(model, processor, model_id, data_dir, out_dir, judge=None, answers_file=None, rank=0,
                         world_size=1, **decoding):
    """Answer LLaVA-Bench (or read ANSWERS_FILE) into OUT_DIR/llava-bench.jsonl, review if a judge is given."""
    questions, contexts, references = read_llava_bench(data_dir)
    if answers_file:
        answers = common.read_jsonl(answers_file)
    else:
        asked = [dict(question_id=q["question_id"], image=q["image"], text=q["text"]) for q in questions]
        answers = runner.answer_questions(model, processor, asked, os.path.join(out_dir, "llava-bench.jsonl"), model_id,
                                          os.path.join(data_dir, "images"), rank=rank, world_size=world_size,
                                          **decoding)
    if rank != 0 or not judge:
        return None
    reviews, results = grade_llava_bench(questions, contexts, references, answers, judge)
    common.write_atomic(os.path.join(out_dir, "llava-bench-reviews.jsonl"),
                        [json.dumps(r, ensure_ascii=False) for r in reviews])
    # The model's own score per question (assistant 2), for pair-wise comparisons (paper Fig. 5).
    return dict(results, per_question={r["question_id"]: r["tuple"][1] for r in reviews if r["tuple"] != [-1, -1]})


BENCHMARKS = {"mmvet": evaluate_mmvet, "llava-bench": evaluate_llava_bench}


# ----------------------------------------------------------------------------- CLI
def add_judge_args(parser):
    g = parser.add_argument_group("judge (optional; paper: GPT-4)")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (none: answers only, no score); "
                        "the key is read from OPENAI_API_KEY")
    g.add_argument("--judge-model", default="gpt-4-0613", help="judge model name (MM-Vet's grader: gpt-4-0613)")
    g.add_argument("--judge-cache", default="runs/eval/judge-cache", help="folder of cached judge replies")
    g.add_argument("--judge-retries", type=int, default=5, help="retries after a 429, 5xx or network error")
    g.add_argument("--judge-backoff", type=float, default=2.0, help="seconds before the first retry, doubled each time")
    return g


def judge_from_args(args):
    """chat_completion's settings from the flags, or None without --judge-url."""
    if not args.judge_url:
        return None
    return dict(url=args.judge_url, model=args.judge_model, api_key=os.environ.get("OPENAI_API_KEY"),
                cache_dir=args.judge_cache, retries=args.judge_retries, backoff=args.judge_backoff)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_model_args(p, max_new_tokens=1024, batch_size=8)
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which open-ended benchmark")
    g.add_argument("--data-dir", required=True,
                   help="MM-Vet: folder of mm-vet.json and images/; LLaVA-Bench: folder of questions.jsonl, "
                        "context.jsonl, answers_gpt4.jsonl and images/")
    g.add_argument("--answers", default=None, help="grade this answer file instead of generating (no model loaded)")
    g.add_argument("--out", default=None, help="output folder (default runs/eval/BENCHMARK)")
    add_judge_args(p)
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
    results = evaluate(run.model, run.processor, run.model_id, args.data_dir, args.out, judge_from_args(args),
                       args.answers, run.rank, run.world_size, **run.decoding)
    if run.rank == 0:
        if results is None:
            print(f"{args.benchmark}: answers written to {args.out}; no --judge-url, so no score")
        else:
            summary = {k: v for k, v in results.items() if k != "per_question"}
            common.write_atomic(os.path.join(args.out, f"{args.benchmark}-scores.json"),
                                [json.dumps(dict(args=dict(vars(args), model_id=run.model_id), results=summary), indent=1)])
            print(f"{args.benchmark}: " + json.dumps(summary, indent=1))
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.judge", (ValueError, OSError, RuntimeError))
