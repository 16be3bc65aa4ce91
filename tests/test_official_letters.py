"""Each benchmark's scorer against its official rule on a small answer file of edge cases: capital and lowercase
letters, letters in parentheses, "The answer is X" with and without what follows, several sentences, newlines,
empty answers, yes/no phrasings. Every expected verdict is worked out by hand from the official rule, in the
comments beside it (the rules: eval/mc_letters.py's docstrings; POPE: LLaVA's eval_pope.py; GQA: LLaVA's
convert_gqa_for_eval.py with GQA's eval.py)."""
import json

import pytest

from eval import gqa, mc_letters, mc_matcher, multiple_choice, pope
from test_judge import judge_server, no_proxy  # noqa: F401 (no_proxy is a fixture)


def rows_of(questions, texts, circular=False):
    """Answer rows as the runner writes them (round_id, options, option_char), with the given texts."""
    items = multiple_choice.runner_questions(questions, circular)
    return [dict(question_id=item["question_id"], text=text, **item["fields"]) for item, text in zip(items, texts)]


# ----------------------------------------------------------------------------- ScienceQA (eval_science_qa.py)
# (answer, letter read) for choices cat / dog / bird, the right one B (dog). The rule: the answer as written is
# a letter A-E; or starts with "X. "; or `The answer is ([A-Z]).` occurs exactly once; else FAILED.
SCIENCEQA = [
    ("B", "B"),                                   # a bare letter
    ("b", None),                                  # lower case: not in [A..E], no pattern
    ("(B)", None),                                # parentheses: neither a letter nor "B. "
    ("B. It is a dog.", "B"),                     # "B" then ". "
    ("B.", None),                                 # only 2 characters: the "X. " rule needs 3
    ("B\n", None),                                # not stripped: "B\n" is not "B"
    ("B\nIt is a dog.", None),                    # the 2nd and 3rd characters are "\nI", not ". "
    ("The answer is B.", "B"),                    # the pattern once
    ("The answer is B", None),                    # nothing after the letter: the pattern's "." needs a character
    ("The answer is B. The answer is B.", None),  # the pattern twice: FAILED
    ("The answer is B, a dog.", "B"),             # any character after the letter
    ("The answer is D.", None),                   # D is not one of the 3 choices (get_pred_idx)
    ("", None),                                   # empty
    (" B", None),                                 # a leading space: not stripped
    ("I think the answer is B.", None),           # lower-case "the": the pattern has "The"
    ("The answer is (B).", None),                 # "(" is not a capital letter
    ("C", "C"),                                   # a letter, the wrong one
]


def test_scienceqa_edge_cases_as_eval_science_qa():
    choices = ["cat", "dog", "bird"]
    assert [mc_letters.scienceqa_letter(text, choices) for text, _ in SCIENCEQA] == [l for _, l in SCIENCEQA]
    questions = [dict(question_id=str(i), question="Which animal?", hint="", options=choices, answer="B",
                      category="c", image=f"{i}/image.png", benchmark="scienceqa") for i in range(len(SCIENCEQA))]
    results = multiple_choice.score(questions, rows_of(questions, [t for t, _ in SCIENCEQA]))
    # right: "B", "B. It is a dog.", "The answer is B.", "The answer is B, a dog." -> 4 of 17
    assert results["accuracy"] == pytest.approx(4 / 17)
    assert results["unparsed"] == 12  # 17 answers, 5 with a letter (4 B, 1 C)
    # our looser reading (a named option, never the default) reads 6 more of them as B: "b", "(B)", "B.", "B\n",
    # "B\nIt is a dog.", "The answer is B"
    loose = multiple_choice.score(questions, rows_of(questions, [t for t, _ in SCIENCEQA]), letter_rule="loose")
    assert loose["accuracy"] > results["accuracy"] and "not an official rule" in loose["letter_rule"]


def test_scienceqa_answer_file_prompt_carries_the_image_marker():
    question = dict(question_id="7", question="Which?", hint="", options=["a", "b"], answer="A", category=None,
                    image="7/image.png", benchmark="scienceqa")
    item = multiple_choice.runner_questions([question])[0]
    assert item["prompt"] == "<image>\n" + item["text"] and not item["text"].startswith("<image>")


# ----------------------------------------------------------------------------- MMBench (VLMEvalKit's can_infer)
# (answer, letter read) for options dog / cat / bird / fish, the right one B (cat). The rule: punctuation
# .()[],:;!*#{} to spaces, split; exactly one capital option letter among the words -> it; none, but "Z" -> Z;
# else the one option whose text is in the lower-cased answer; else nothing (wrong under exact matching).
MMBENCH = [
    ("B", "B"),                                  # a bare letter
    ("A cat", "A"),                              # "A" is a word and the only letter: A (the article is not special)
    ("b", None),                                 # lower case is no letter; "b" holds no option's text
    ("(b)", None),                               # the same after the parentheses go
    ("(B)", "B"),                                # parentheses become spaces: "B"
    ("The answer is B.", "B"),                   # words The, answer, is, B
    ("It is a cat.", "B"),                       # no capital letter word ("It" is not one); "cat" is in it
    ("B or C", None),                            # two letters: none; no option text
    ("", None),                                  # empty
    ("Z", "Z"),                                  # no letter, but Z: none of the options (wrong)
    ("cat and dog", None),                       # two options' texts
    ("B\nIt is a cat.", "B"),                    # whitespace splits at the newline: B
    ("I think it is the second one.", None),     # "I" is no option letter (4 options: A-D); no option text
]


def mmbench_questions(n, options=("dog", "cat", "bird", "fish"), answer="B"):
    return [dict(question_id=i, question="Which animal?", hint=None, options=list(options), answer=answer,
                 category="c", image_base64="x", benchmark="mmbench") for i in range(1, n + 1)]


def test_mmbench_edge_cases_as_can_infer_exact_matching():
    options = ["dog", "cat", "bird", "fish"]
    assert [mc_letters.mmbench_letter(text, options) for text, _ in MMBENCH] == [l for _, l in MMBENCH]
    questions = mmbench_questions(len(MMBENCH))
    results = multiple_choice.score(questions, rows_of(questions, [t for t, _ in MMBENCH]))
    # right: "B", "(B)", "The answer is B.", "It is a cat.", "B\nIt is a cat." -> 5 of 13; the 6 without a
    # letter count wrong (exact matching), as do "A cat" (A) and "Z"
    assert results["accuracy"] == pytest.approx(5 / 13) and results["unparsed"] == 6
    assert results["matcher"].startswith("none: exact matching")


MATCHER_TEMPLATE = "MADE-UP matcher.\nQ: {}\nOptions: HEADING\n{}\nAnswer: {}\nOut: "  # not VLMEvalKit's


def matcher_reply(body):
    """A scripted matcher: 'b' and '(b)' -> B; 'cat and dog' -> unreadable; anything else -> Z."""
    answer = body["messages"][0]["content"].split("\nAnswer: ")[1].split("\nOut: ")[0]
    return {"b": "B", "(b)": "The option is B.", "cat and dog": "hmm"}.get(answer, "Z")


def test_mmbench_matcher_reads_only_the_unmatched_rows(no_proxy):
    questions = mmbench_questions(len(MMBENCH))
    with judge_server(matcher_reply) as (url, requests):
        matcher = mc_matcher.Matcher(dict(url=url, model="m", cache_dir=None, backoff=0.01), MATCHER_TEMPLATE)
        results = multiple_choice.score(questions, rows_of(questions, [t for t, _ in MMBENCH]), matcher=matcher)
    asked = [r["body"]["messages"][0]["content"] for r in requests]
    # the 6 rows without a letter are asked ("cat and dog" 3 times: its replies name no letter); "A cat" and "Z"
    # have a letter (wrong) and are not
    assert len(asked) == 8
    assert asked[0] == ("MADE-UP matcher.\nQ: Which animal?\nOptions: HEADING\nA. dog\nB. cat\nC. bird\nD. fish\n"
                        "\nAnswer: b\nOut: ")
    # the matcher makes "b" and "(b)" right: 5 + 2 = 7 of 13
    assert results["accuracy"] == pytest.approx(7 / 13) and "judge m" in results["matcher"]


def test_mmbench_circular_group_lost_by_a_wrong_prefetched_row(no_proxy):
    # group 1: options dog / cat (B) and its copy 1000001 showing cat / dog (A); group 2 likewise
    base = mmbench_questions(2, options=("dog", "cat"))
    copies = [dict(q, question_id=q["question_id"] + 1_000_000, options=["cat", "dog"], answer="A") for q in base]
    questions = [base[0], copies[0], base[1], copies[1]]
    texts = ["B", "a",        # group 1: right, then no letter
             "A cat", "b"]    # group 2: A is wrong (dog), then no letter
    rows = rows_of(questions, texts, circular=True)
    exact = multiple_choice.group_outcomes(questions, rows, circular=True)
    assert exact == {1: (False, True), 2: (False, False)}  # exact matching: a row without a letter is wrong
    with judge_server(lambda body: "A") as (url, requests):
        matcher = mc_matcher.Matcher(dict(url=url, model="m", cache_dir=None, backoff=0.01), MATCHER_TEMPLATE)
        matched = multiple_choice.group_outcomes(questions, rows, circular=True, matcher=matcher)
    # the matcher reads "a" as A (cat in the copy: right); group 2 is lost by its wrong row, so its "b" is not asked
    assert matched == {1: (True, True), 2: (False, False)} and len(requests) == 1
    assert "\nA. cat\nB. dog\n" in requests[0]["body"]["messages"][0]["content"]


# ----------------------------------------------------------------------------- SEED (convert_seed_for_submission)
# right only if the answer equals the letter: "B" only
SEED = [("B", True), ("B.", False), ("b", False), (" B", False), ("(B)", False), ("B\n", False), ("", False),
        ("The answer is B.", False), ("C", False)]


def test_seed_edge_cases_exact_letter():
    options = ["dog", "cat", "bird", "fish"]
    assert [mc_letters.seed_letter(text, options) == "B" for text, _ in SEED] == [r for _, r in SEED]


# ----------------------------------------------------------------------------- POPE (eval_pope.py)
# (answer, label, read as): the text before the first ".", commas dropped, split at spaces only; "No", "not" or
# "no" among the words -> no, else yes.
POPE = [
    ("Yes.", "yes", "yes"),
    ("Yes, there is a dog.", "yes", "yes"),
    ("No.", "no", "no"),
    ("No, there is not.", "no", "no"),        # "No there is not": No
    ("Not sure", "no", "yes"),                # "Not" is none of No / not / no
    ("not sure", "no", "no"),
    ("", "yes", "yes"),                       # nothing said: yes
    ("There is no dog.", "no", "no"),
    ("No\nIt is a cat.", "no", "yes"),        # split at spaces only: "No\nIt" is one word
    ("yes", "yes", "yes"),
    ("The dog is not there.", "no", "no"),
    ("Yes. There is no cat.", "yes", "yes"),  # the first sentence only
]


def test_pope_edge_cases_as_eval_pope():
    assert [pope.pope_answer(text) for text, _, _ in POPE] == [said for _, _, said in POPE]
    metrics = pope.pope_metrics([said for _, _, said in POPE], [label for _, label, _ in POPE])
    # by hand: TP 5 (rows 1, 2, 7, 10, 12), FP 2 ("Not sure", "No\nIt is a cat."), TN 5, FN 0
    assert metrics["accuracy"] == pytest.approx(10 / 12) and metrics["precision"] == pytest.approx(5 / 7)
    assert metrics["recall"] == 1.0 and metrics["f1"] == pytest.approx(10 / 12)  # 2 (5/7) / (12/7)
    assert metrics["yes_ratio"] == pytest.approx(7 / 12)


# ----------------------------------------------------------------------------- GQA (trailing "." off, lower case)
GQA = [("Yes.", "yes", True), ("RED", "red", True), ("Red...", "red", True), ("The red one.", "red", False),
       ("red.\n", "red", False),  # the newline stops the strip of "."
       ("", "red", False), ("No, it is not.", "no", False)]


def test_gqa_edge_cases_exact_string():
    assert [gqa.normalise(text) == truth for text, truth, _ in GQA] == [r for _, _, r in GQA]


def write_pope_files(folder, counts):
    folder.mkdir()
    for split, n in counts.items():
        rows = [json.dumps(dict(question_id=i, image=f"{i}.jpg", text="Is there a dog in the image?",
                                label="yes" if i % 2 else "no")) for i in range(n)]
        (folder / f"coco_pope_{split}.json").write_text("\n".join(rows) + "\n")
    return str(folder)


def test_pope_check_names_the_question_files(tmp_path, capsys):
    pinned = write_pope_files(tmp_path / "pinned", {"random": 2910, "popular": 3000, "adversarial": 3000})
    files = pope.main(["--pope-dir", pinned, "--check-questions"])
    printed = capsys.readouterr().out
    assert {split: f["questions"] for split, f in files.items()} == {"random": 2910, "popular": 3000, "adversarial": 3000}
    assert files["random"]["yes"] == 1455  # odd question ids of 0..2909
    assert "POPE questions, random: 2910 (1455 yes)" in printed and "the counts of POPE commit e3e39262" in printed
    later = write_pope_files(tmp_path / "later", {"random": 3000, "popular": 3000, "adversarial": 3000})
    pope.main(["--pope-dir", later, "--check-questions"])
    assert "NOT the counts of POPE commit e3e39262" in capsys.readouterr().out
