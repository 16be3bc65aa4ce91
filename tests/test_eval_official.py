"""Scoring as the official scorers do, checked on hand-made files against numbers worked out by hand:
MMBench's CircularEval over the tsv's own circular copies; ScienceQA from problems.json (split, text-only
problems, LLaVA's CQM-A prompt) and LLaVA's letter rules; MM-Vet's and LLaVA-Bench's official grading
requests, parsing and averaging, with made-up prompt files standing in for the user's official copies."""
import base64
import json
import os
import shutil

import pytest

from eval import compare, judge, judge_client, mc_files, mc_letters, multiple_choice, runner
from helpers import read_lines
from test_judge import judge_server, no_proxy  # noqa: F401 (no_proxy is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def scripted(monkeypatch, texts):
    """The runner answers each question with texts[question_id] instead of generating."""
    monkeypatch.setattr(runner, "answer_chunk",
                        lambda model, processor, questions, chunk, *rest: [texts[questions[i]["question_id"]]
                                                                           for i in chunk])


# ----------------------------------------------------------------------------- item 4: MMBench CircularEval
# (index, options, answer, category): question 1 and its 3 copies (options rotated by 1, 2, 3), question 2
# (3 options) and its 2 copies, question 3 (2 options) and its copy. A copy's answer follows the right option.
MMBENCH_ROWS = [
    (1, ["red", "green", "blue", "yellow"], "A", "colour"), (1000001, ["green", "blue", "yellow", "red"], "D", "colour"),
    (2000001, ["blue", "yellow", "red", "green"], "C", "colour"), (3000001, ["yellow", "red", "green", "blue"], "B", "colour"),
    (2, ["1", "2", "3"], "B", "count"), (1000002, ["2", "3", "1"], "A", "count"), (2000002, ["3", "1", "2"], "C", "count"),
    (3, ["one", "two"], "A", "count"), (1000003, ["two", "one"], "B", "count")]
# The model's answers: question 1 right in every row; question 2 right as given, wrong in copy 2000002;
# question 3 wrong as given, right in its copy.
MMBENCH_ANSWERS = {1: "A", 1000001: "D", 2000001: "C", 3000001: "B", 2: "B", 1000002: "A", 2000002: "B",
                   3: "B", 1000003: "B"}


def write_mmbench_with_copies(toy_world, path):
    image = open(os.path.join(toy_world, "images", "val", "000000.png"), "rb").read()
    b64 = base64.b64encode(image).decode()
    with open(path, "w") as f:
        f.write("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n")
        for index, options, answer, category in MMBENCH_ROWS:
            cells = options + [""] * (4 - len(options))
            f.write("\t".join([str(index), "Which one?", "nan", *cells, answer, category, b64]) + "\n")
    return str(path)


def test_mmbench_circular_eval_uses_the_files_copies(sft, toy_world, tmp_path, monkeypatch):
    model, processor = sft
    tsv = write_mmbench_with_copies(toy_world, tmp_path / "mmb.tsv")
    scripted(monkeypatch, MMBENCH_ANSWERS)
    results = multiple_choice.evaluate(model, processor, "m", tsv, ".", str(tmp_path / "circ"), circular=True,
                                       batch_size=4, weights="sft")
    rows = read_lines(tmp_path / "circ" / "mmb.jsonl")
    # every row asked once, as given: no rotation on top of the file's copies
    assert [(r["question_id"], r["round_id"]) for r in rows] == [(i, 0) for i, _, _, _ in MMBENCH_ROWS]
    assert [r["options"] for r in rows] == [options for _, options, _, _ in MMBENCH_ROWS]
    assert "\nA. green\nB. blue\nC. yellow\nD. red\n" in rows[1]["prompt"]
    # by hand from the answer file: a row is right if its letter is its own answer; a group (index mod 1e6)
    # is right if all its rows are. Group 1: 4/4 right; group 2: 2000002 wrong; group 3: row 3 wrong.
    truth = {i: answer for i, _, answer, _ in MMBENCH_ROWS}
    right = {r["question_id"]: r["text"] == truth[r["question_id"]] for r in rows}
    groups = {g: all(ok for i, ok in right.items() if i % 1_000_000 == g) for g in (1, 2, 3)}
    assert groups == {1: True, 2: False, 3: False}
    assert results["accuracy"] == pytest.approx(1 / 3)  # 1 of 3 groups
    assert results["first_round_accuracy"] == pytest.approx(2 / 3)  # rows 1, 2 right, row 3 wrong
    assert results["num_questions"] == 3 and results["benchmark"] == "mmbench"
    assert results["categories"] == {"colour": 1.0, "count": 0.0}  # by group: colour {1}, count {2, 3}
    assert "copies" in results["protocol"]


def test_mmbench_plain_on_a_file_with_copies_scores_the_base_rows(sft, toy_world, tmp_path, monkeypatch, capsys):
    tsv = write_mmbench_with_copies(toy_world, tmp_path / "mmb.tsv")
    scripted(monkeypatch, MMBENCH_ANSWERS)
    results = multiple_choice.main(["--model", os.path.join(toy_world, "model-sft"), "--data", tsv, "--out",
                                    str(tmp_path / "plain"), "--no-progress"])
    rows = read_lines(tmp_path / "plain" / "mmb.jsonl")
    assert [r["question_id"] for r in rows] == [1, 2, 3]  # only the rows with index < 1e6 are asked
    # rows 1 (A), 2 (B) right, row 3 (B, truth A) wrong: 2 / 3; colour {1}: 1/1; count {2, 3}: 1/2
    assert results["accuracy"] == pytest.approx(2 / 3) and results["num_questions"] == 3
    assert results["categories"] == {"colour": 1.0, "count": 0.5}
    assert "index < 1,000,000" in results["note"] and "index < 1,000,000" in capsys.readouterr().out
    saved = json.load(open(tmp_path / "plain" / "mmb.json"))["results"]
    assert saved["note"] == results["note"]


def test_mmbench_copy_without_its_question_is_refused(toy_world, tmp_path):
    tsv = write_mmbench_with_copies(toy_world, tmp_path / "mmb.tsv")
    lines = open(tsv).read().splitlines(keepends=True)
    open(tsv, "w").write("".join(line for line in lines if not line.startswith("3\t")))  # drop question 3
    with pytest.raises(ValueError, match="1000003"):
        mc_files.read_benchmark(tsv)


# ----------------------------------------------------------------------------- item 5: ScienceQA, letter rules
PROBLEMS = {
    "10": dict(question="Which word rhymes with cat?", choices=["hat", "dog"], answer=0, hint="", image=None,
               split="test", category="rhymes"),  # text-only: skipped and counted
    "11": dict(question="Which is a fish?", choices=["shark", "cow"], answer=0, hint="", image="image.png",
               split="train", category="animals"),
    "12": dict(question="Which animal is shown?", choices=["cat", "dog", "bird"], answer=1, hint="",
               image="image.png", split="test", category="animals"),
    "13": dict(question="What  is the colour?", choices=["red", "big  blue"], answer=0,
               hint="The picture shows   a shape. ", image="image.png", split="val", category="colours")}
# LLaVA's CQM-A prompt, by hand. 12: no hint -> "N/A". 13: the hint stripped; one pass of "  " -> " "
# over the whole text, so the three spaces become two ("shows   a" -> "shows  a").
SUFFIX = "\nAnswer with the option's letter from the given choices directly."
PROMPT_12 = "Context: N/A\nQuestion: Which animal is shown?\nOptions: (A) cat (B) dog (C) bird" + SUFFIX
PROMPT_13 = "Context: The picture shows  a shape.\nQuestion: What is the colour?\nOptions: (A) red (B) big blue" + SUFFIX


def write_scienceqa(toy_world, folder, pid_splits=True):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "problems.json"), "w") as f:
        json.dump(PROBLEMS, f)
    if pid_splits:  # problem 13's own split field says val; pid_splits.json (read first) puts it in test
        with open(os.path.join(folder, "pid_splits.json"), "w") as f:
            json.dump({"train": ["11"], "val": [], "test": ["10", "12", "13"]}, f)
    for i, pid in enumerate(["12", "13"]):
        os.makedirs(os.path.join(folder, "images", "test", pid))
        shutil.copy(os.path.join(toy_world, "images", "val", f"00000{i}.png"),
                    os.path.join(folder, "images", "test", pid, "image.png"))
    return os.path.join(folder, "problems.json")


def test_scienceqa_problems_json_split_and_text_only(toy_world, tmp_path):
    problems = write_scienceqa(toy_world, str(tmp_path / "sqa"))
    data = mc_files.read_benchmark(problems)  # --split test
    assert data["benchmark"] == "scienceqa" and data["skipped_text_only"] == 1  # problem 10
    assert [q["question_id"] for q in data["questions"]] == ["12", "13"]  # 11 is train
    assert [q["image"] for q in data["questions"]] == ["12/image.png", "13/image.png"]
    assert [q["answer"] for q in data["questions"]] == ["B", "A"]
    assert [q["question_id"] for q in mc_files.read_questions(problems, "train")] == ["11"]
    texts = [q["text"] for q in multiple_choice.runner_questions(data["questions"])]
    assert texts == [PROMPT_12, PROMPT_13]
    # without pid_splits.json each problem's own split field decides: 13 is val
    other = write_scienceqa(toy_world, str(tmp_path / "sqa-no-splits"), pid_splits=False)
    data = mc_files.read_benchmark(other)
    assert [q["question_id"] for q in data["questions"]] == ["12"] and data["skipped_text_only"] == 1


def test_scienceqa_end_to_end(toy_world, tmp_path, capsys):
    problems = write_scienceqa(toy_world, str(tmp_path / "sqa"))
    out = tmp_path / "out"
    results = multiple_choice.main(["--model", os.path.join(toy_world, "model-sft"), "--data", problems,
                                    "--image-folder", str(tmp_path / "sqa" / "images" / "test"),
                                    "--max-new-tokens", "3", "--batch-size", "4", "--no-progress", "--out", str(out)])
    rows = read_lines(out / "problems.jsonl")
    # the prompt field as LLaVA's model_vqa_science.py writes it: eval_science_qa.py counts a problem as IMG by
    # the <image> marker (without it, its IMG-Accuracy divides by zero)
    assert [r["question_id"] for r in rows] == ["12", "13"]
    assert [r["prompt"] for r in rows] == ["<image>\n" + PROMPT_12, "<image>\n" + PROMPT_13]
    assert results["benchmark"] == "scienceqa" and results["split"] == "test" and results["skipped_text_only"] == 1
    assert "eval_science_qa.py" in results["letter_rule"]
    right = [mc_letters.scienceqa_letter(r["text"], r["options"]) == truth for r, truth in zip(rows, "BA")]
    assert results["accuracy"] == sum(right) / 2
    assert "skipped 1 text-only" in capsys.readouterr().out
    assert json.load(open(out / "problems.json"))["results"]["skipped_text_only"] == 1


# the letter rules' edge cases, answer for answer: tests/test_official_letters.py


def test_benchmark_told_from_the_file_and_recorded(toy_world, tmp_path):
    seed = tmp_path / "SEED-Bench.json"
    seed.write_text(json.dumps({"questions": [
        dict(question_id="101", question="Which?", choice_a="w", choice_b="x", choice_c="y", choice_d="z",
             answer="B", data_id="val/000000.png", data_type="image", question_type_id=1),
        dict(question_id="102", question="Video?", choice_a="w", choice_b="x", choice_c="y", choice_d="z",
             answer="A", data_id="v.mp4", data_type="video", question_type_id=2)]}))
    data = mc_files.read_benchmark(str(seed))
    assert data["benchmark"] == "seed" and [q["question_id"] for q in data["questions"]] == [101]
    answers = [dict(question_id=101, round_id=0, text="B.", options=list("wxyz"), option_char=list("ABCD"))]
    official = multiple_choice.score(data["questions"], answers)  # --letter-rule official: "B." is not "B"
    assert official["accuracy"] == 0.0 and official["benchmark"] == "seed" and official["unparsed"] == 1
    assert multiple_choice.score(data["questions"], answers, letter_rule="loose")["accuracy"] == 1.0
    jsonl = tmp_path / "generic.jsonl"
    jsonl.write_text(json.dumps(dict(question_id="q1", question="Q?", options=["a", "b"], answer="A",
                                     image="val/000000.png")) + "\n")
    assert mc_files.read_benchmark(str(jsonl))["benchmark"] == "generic"
    assert mc_files.read_benchmark(write_mmbench_with_copies(toy_world, tmp_path / "m.tsv"))["benchmark"] \
        == "mmbench"
    assert multiple_choice.parse_args(["--data", "x.tsv"]).letter_rule == "official"


# ----------------------------------------------------------------------------- item 6: MM-Vet
MADE_UP_GRADER = "MADE-UP GRADER PROMPT for a test.\nQ | GT | Pred | Score\nx | y | z | 0.5\n"  # not MM-Vet's


def write_mmvet(tmp_path):
    data = tmp_path / "mm-vet"
    data.mkdir()
    (data / "mm-vet.json").write_text(json.dumps({"v1_0": dict(
        imagename="v1_0.png", question="Which fruits?", answer="apple<AND>pear", capability=["rec"])}))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps(dict(question_id="v1_0", text="An apple.")) + "\n")
    prompt = tmp_path / "grader.txt"
    prompt.write_text(MADE_UP_GRADER)
    return data, answers, prompt


def test_mmvet_official_retries_with_the_users_prompt(tmp_path, no_proxy, capsys):
    data, answers, prompt = write_mmvet(tmp_path)
    replies = iter(["x", "y", "0.7"])
    with judge_server(lambda body: next(replies)) as (url, requests):
        results = judge.main(["--benchmark", "mmvet", "--data-dir", str(data), "--answers", str(answers), "--out",
                              str(tmp_path / "out"), "--judge-url", url, "--judge-cache", str(tmp_path / "cache"),
                              "--judge-prompt", str(prompt)])
    # the query: the file's text exactly, "\n", the row with " <AND> " spaced and its last cell empty
    query = MADE_UP_GRADER + "\n" + "Which fruits? | apple <AND> pear | An apple. | "
    retry = query + "\nPredict the correctness of the answer (digit): "
    bodies = [r["body"] for r in requests]
    assert [b["messages"] for b in bodies] == [[{"role": "user", "content": c}] for c in (query, retry, retry)]
    assert [b["temperature"] for b in bodies] == [0.0, 0.0, 0.5]  # the first retry at 0.0, then 0.5 hotter
    assert {b["max_tokens"] for b in bodies} == {3} and {b["model"] for b in bodies} == {"gpt-4-0613"}
    assert results["score"] == pytest.approx(70.0) and results["comparable"] is True
    saved = json.load(open(tmp_path / "out" / "mmvet-scores.json"))["results"]
    assert saved["comparable"] is True and saved["prompt_files"]["--judge-prompt"]["path"] == str(prompt)
    assert "not comparable" not in capsys.readouterr().out


def test_mmvet_five_unparsable_replies_score_zero(no_proxy):
    items = {"v1_0": dict(imagename="a.png", question="Q?", answer="4", capability=["math"])}
    with judge_server(lambda body: "unsure") as (url, requests):
        rows, results = judge.grade_mmvet(items, [dict(question_id="v1_0", text="4")],
                                          dict(url=url, model=None, cache_dir=None, backoff=0.01))
    # the first request and 4 retries (the official 5th retry's reply is discarded: not sent)
    assert [r["body"]["temperature"] for r in requests] == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert rows[0]["score"] == 0.0 and rows[0]["parsed"] is False and results["score"] == 0.0


# ----------------------------------------------------------------------------- item 6: LLaVA-Bench
@pytest.mark.parametrize("reply, expected", [("8 6", (8.0, 6.0)), ("8  6", None), ("8,6", (8.0, 6.0)),
                                             ("8, 6", None),  # "," -> " " leaves two spaces
                                             ("8 6\nAssistant 1 is better.", (8.0, 6.0)), (" 8 6", None)])
def test_llava_bench_parse_score_as_official(reply, expected):
    assert judge.parse_pair_scores(reply) == expected


MADE_UP_RULES = {"llava_bench_conv": {"role": "Helper", "prompt": "Made-up conv rule: rate both."},
                 "llava_bench_complex": {"role": "Robot", "prompt": "Made-up complex rule."}}


def write_llava_bench(tmp_path, rules=MADE_UP_RULES):
    data = tmp_path / "llava-bench"
    data.mkdir()
    questions = [dict(question_id=0, image="1.jpg", text="What is it?", category="conv"),
                 dict(question_id=1, image="1.jpg", text="What colour?", category="conv"),
                 dict(question_id=2, image="2.jpg", text="Why?", category="complex")]
    (data / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (data / "context.jsonl").write_text(json.dumps(dict(image="1.jpg", caption=["A cat on a mat.", "box: [0, 0, 1, 1]"]))
                                        + "\n" + json.dumps(dict(image="2.jpg", caption=["A dog."])) + "\n")
    (data / "answers_gpt4.jsonl").write_text("".join(json.dumps(dict(question_id=i, text=f"reference {i}")) + "\n"
                                                     for i in range(3)))
    answers = tmp_path / "llava-answers.jsonl"
    answers.write_text("".join(json.dumps(dict(question_id=i, text=f"ours {i}", answer_id=f"a{i}")) + "\n"
                               for i in range(3)))
    (tmp_path / "rule.json").write_text(json.dumps(rules))
    (tmp_path / "system.txt").write_text("Made-up system message.\n")
    return data, answers


LLAVA_REPLIES = {"ours 0": "8 6\nfine", "ours 1": "8  6\ntwo spaces", "ours 2": "7,9\ngood"}


def llava_reply(body):
    return next(r for text, r in LLAVA_REPLIES.items() if f" 2]\n{text}\n" in body["messages"][1]["content"])


def test_llava_bench_official_review_and_averaging(tmp_path, no_proxy):
    data, answers = write_llava_bench(tmp_path)
    argv = ["--benchmark", "llava-bench", "--data-dir", str(data), "--answers", str(answers), "--out",
            str(tmp_path / "out"), "--judge-cache", str(tmp_path / "cache"), "--rules", str(tmp_path / "rule.json"),
            "--judge-system", str(tmp_path / "system.txt")]
    with judge_server(llava_reply) as (url, requests):
        results = judge.main(argv + ["--judge-url", url])
    body = requests[0]["body"]
    assert body["model"] == "gpt-4-0314" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
    assert body["messages"] == [
        {"role": "system", "content": "Made-up system message."},  # the file's text, its final newline dropped
        {"role": "user", "content": "[Context]\nA cat on a mat.\nbox: [0, 0, 1, 1]\n\n[Question]\nWhat is it?\n\n"
                                    "[Helper 1]\nreference 0\n\n[End of Helper 1]\n\n[Helper 2]\nours 0\n\n"
                                    "[End of Helper 2]\n\n[System]\nMade-up conv rule: rate both.\n\n"}]
    assert "[Robot 2]\nours 2\n" in requests[2]["body"]["messages"][1]["content"]
    reviews = read_lines(tmp_path / "out" / "llava-bench-reviews.jsonl")
    assert [r["tuple"] for r in reviews] == [[8.0, 6.0], [-1, -1], [7.0, 9.0]]
    # summarize_gpt_review.py by hand, the [-1, -1] review included:
    # conv: reference (8 - 1) / 2 = 3.5, model (6 - 1) / 2 = 2.5 -> 2.5 / 3.5 x 100 = 71.43
    # complex: 9 / 7 x 100 = 128.57; all: reference (8 - 1 + 7) / 3 = 4.667 (3 decimals), model (6 - 1 + 9) / 3
    # = 4.667 -> 100
    assert results["llava_bench_conv"]["relative"] == pytest.approx(100 * 2.5 / 3.5)
    assert results["llava_bench_complex"]["relative"] == pytest.approx(100 * 9 / 7)
    assert results["all"]["reference"] == 4.667 and results["all"]["relative"] == pytest.approx(100.0)
    assert results["unparsed"] == 1 and results["comparable"] is True


def test_llava_bench_averages_unparsed_reviews_in(tmp_path, no_proxy):
    """The built-in prompts grade the same way: the [-1, -1] review counts in the means (as above, by hand)."""
    data, answers = write_llava_bench(tmp_path)
    questions, contexts, references = judge.read_llava_bench(str(data))
    with judge_server(llava_reply) as (url, _):
        _, results = judge.grade_llava_bench(questions, contexts, references, read_lines(answers),
                                             dict(url=url, model="j", cache_dir=None, backoff=0.01))
    assert results["llava_bench_conv"]["relative"] == pytest.approx(100 * 2.5 / 3.5)  # not 6 / 8
    assert results["unparsed"] == 1 and results["comparable"] is False


def test_llava_bench_rule_for_every_category(tmp_path, no_proxy):
    data, answers = write_llava_bench(tmp_path, rules={"llava_bench_conv": MADE_UP_RULES["llava_bench_conv"]})
    with judge_server(llava_reply) as (url, _):
        with pytest.raises(ValueError, match="llava_bench_complex"):
            judge.main(["--benchmark", "llava-bench", "--data-dir", str(data), "--answers", str(answers), "--out",
                        str(tmp_path / "out"), "--judge-url", url, "--judge-cache", "",
                        "--rules", str(tmp_path / "rule.json")])


def test_judged_outputs_say_when_they_are_not_comparable(tmp_path, no_proxy, capsys):
    data, answers, prompt = write_mmvet(tmp_path)
    lb_data, lb_answers = write_llava_bench(tmp_path)
    mmvet = ["--benchmark", "mmvet", "--data-dir", str(data), "--answers", str(answers), "--judge-cache", ""]
    llava = ["--benchmark", "llava-bench", "--data-dir", str(lb_data), "--answers", str(lb_answers),
             "--judge-cache", ""]
    with judge_server(lambda body: "0.5" if body["messages"][0]["role"] == "user" else llava_reply(body),
                      max_requests=100) as (url, _):
        notes = {}
        for name, argv in (("plain", mmvet), ("rules-only", llava + ["--rules", str(tmp_path / "rule.json")]),
                           ("other-judge", mmvet + ["--judge-prompt", str(prompt), "--judge-model", "gpt-4o"])):
            out = tmp_path / name
            results = judge.main(argv + ["--judge-url", url, "--out", str(out)])
            printed = capsys.readouterr().out
            saved = json.load(open(next(out.glob("*-scores.json"))))["results"]
            for marked in (results, saved):  # the result dict and the scores json
                assert marked["comparable"] is False and "not comparable with published scores" in marked["note"]
            assert "NOTE: not comparable with published scores" in printed  # the printed summary
            notes[name] = results["note"]
        assert "--judge-prompt" in notes["plain"] and "--judge-system" in notes["rules-only"]
        assert "--rules" not in notes["rules-only"] and "gpt-4o" in notes["other-judge"]
        # what compare.py's report receives: its flags carry the files through judge_from_args
        args = compare.parse_args(["--judge-url", url, "--judge-prompt", str(prompt), "--judge-cache", ""])
        given = judge.evaluate_mmvet(None, None, "m", str(data), str(tmp_path / "c1"), judge_client.judge_from_args(args),
                                     str(answers))
        assert given["comparable"] is True and given["note"] == "official grading prompts and judge model"
        args = compare.parse_args(["--judge-url", url, "--judge-cache", ""])
        given = judge.evaluate_mmvet(None, None, "m", str(data), str(tmp_path / "c2"), judge_client.judge_from_args(args),
                                     str(answers))
        assert given["comparable"] is False and "--judge-prompt" in given["note"]
