"""eval/: every scorer against hand-worked cases; the runner's answer files (LLaVA's format, equal to
generate.py's answers, resumed == uninterrupted, 2 ranks == 1). The judge client: test_judge.py; compare.py:
test_compare.py."""
import json
import os
import subprocess
import sys

import pytest

import vlm
from conftest import ROOT
from eval import mc_files, mc_letters, multiple_choice, pope, runner, toyvqa
from generate import generate
from helpers import read_lines, write_mc_files

ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]  # LLaVA's model_vqa.py

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- POPE scoring
@pytest.mark.parametrize("text, expected", [
    ("No.", "no"), ("No", "no"), ("Yes", "yes"), ("Yes, there is a red circle.", "yes"),
    ("There is not a red circle in the image.", "no"), ("no, the circle is blue", "no"),
    ("Yes. There is no other object.", "yes"),  # only the first sentence counts
    ("No, there is not.", "no"), ("I don't know", "yes"), ("Nope", "yes"),
    ("NO", "yes"),  # LLaVA's rule is case-sensitive: "NO" is not a no-word
    ("No\nthere is none", "yes"),  # split on spaces only, as the original: "No\nthere" is one word
    ("", "yes")])
def test_pope_answer(text, expected):
    assert pope.pope_answer(text) == expected


def test_pope_metrics_by_hand():
    predictions = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    # TP = rows 0, 4; FP = row 1; TN = rows 2, 5; FN = row 3
    # accuracy 4/6; precision 2/3; recall 2/3; F1 = 2 (2/3)(2/3) / (4/3) = 2/3; yes-ratio 3/6
    metrics = pope.pope_metrics(predictions, labels)
    assert metrics == pytest.approx(dict(accuracy=4 / 6, precision=2 / 3, recall=2 / 3, f1=2 / 3, yes_ratio=0.5))
    # a model that never says yes: LLaVA's script divides by zero; we report 0
    assert pope.pope_metrics(["no"] * 4, ["yes", "no", "yes", "no"]) == dict(
        accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0)
    # one more: TP 3, FP 1, FN 0, TN 0 -> precision 3/4, recall 1, F1 = 2 (3/4) / (7/4) = 6/7
    assert pope.pope_metrics(["yes"] * 4, ["yes", "yes", "yes", "no"])["f1"] == pytest.approx(6 / 7)
    assert pope.average([dict(accuracy=0.5, precision=1, recall=0, f1=0.2, yes_ratio=0),
                         dict(accuracy=1.0, precision=0, recall=1, f1=0.4, yes_ratio=1)])["f1"] == pytest.approx(0.3)


def test_pope_reads_the_coco_file_names(tmp_path):
    row = {"question_id": 7, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
           "label": "yes"}
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(row) + "\n")  # jsonl despite the name
    assert pope.read_pope(pope.split_file(str(tmp_path), "random")) == [row]
    assert pope.pope_questions([row], pope.LLAVA_SUFFIX)[0]["text"] == (
        "Is there a snowboard in the image?\nAnswer the question using a single word or phrase.")
    with pytest.raises(FileNotFoundError):
        pope.split_file(str(tmp_path), "popular")


# ----------------------------------------------------------------------------- multiple choice scoring
@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("B.", "B"), ("B. cat", "B"), ("(C) bird", "C"), ("D: fish", "D"),
    ("The answer is D.", "D"), ("Answer: A", "A"), ("I think it is C, the bird.", "C"),
    ("A cat", "B"),  # the article, then the text of option B
    ("the fish", "D"), ("A or B", None), ("E", None), ("", None), ("dog and cat", None)])
def test_loose_letter(text, expected):
    assert mc_letters.loose_letter(text, ["dog", "cat", "bird", "fish"]) == expected


def test_prompt_as_llava_writes_it():
    assert multiple_choice.mc_prompt("What is it?", "A hint.", ["dog", "cat"]) == (
        "A hint.\nWhat is it?\nA. dog\nB. cat\nAnswer with the option's letter from the given choices directly.")
    assert multiple_choice.mc_prompt("What is it?", None, ["dog", "cat"], "cn").endswith(
        "\nB. cat\n请直接回答选项字母。")


def test_circular_evaluation_by_hand():
    question = dict(question_id=1, question="Which?", hint=None, options=["w", "x", "y", "z"], answer="C",
                    category="c", image="i.png")
    items = multiple_choice.runner_questions([question], circular=True)
    # round r shows option (j + r) % 4 at letter j: "y" (the right one, C) is at C, B, A, D in rounds 0..3
    assert [item["fields"]["options"] for item in items] == [list("wxyz"), list("xyzw"), list("yzwx"), list("zwxy")]
    assert [item["fields"]["option_char"] for item in items] == [list("ABCD"), list("BCDA"), list("CDAB"), list("DABC")]
    assert "\nA. x\nB. y\n" in items[1]["text"]

    def answers(texts):
        return [dict(question_id=1, text=t, **item["fields"]) for t, item in zip(texts, items)]

    right = multiple_choice.score([question], answers(["C", "B", "A", "D"]), circular=True)
    assert right["accuracy"] == 1.0 and right["first_round_accuracy"] == 1.0
    one_wrong = multiple_choice.score([question], answers(["C", "B. y", "A", "A"]), circular=True)
    assert one_wrong["accuracy"] == 0.0 and one_wrong["first_round_accuracy"] == 1.0
    assert multiple_choice.score([question], answers(["the y one"]), circular=False)["accuracy"] == 1.0
    assert multiple_choice.score([dict(question, answer=None)], answers(["C"]), circular=False) is None


def test_multiple_choice_files_through_the_runner(sft, toy_world, tmp_path):
    model, processor = sft
    tsv, jsonl = write_mc_files(toy_world, tmp_path)
    from_tsv, from_jsonl = mc_files.read_questions(tsv), mc_files.read_questions(jsonl)
    assert [len(q["options"]) for q in from_tsv] == [4, 3]
    assert [q["hint"] for q in from_tsv] == [None, "Count carefully."]
    assert [q["question_id"] for q in from_tsv] == [1, 2] and all("image_base64" in q for q in from_tsv)
    assert [q["options"] for q in from_jsonl] == [["circle", "star"], ["1", "2", "3"]]
    assert [q["image"] for q in from_jsonl] == ["val/000000.png", "val/000001.png"]

    results = multiple_choice.evaluate(model, processor, "m", tsv, ".", str(tmp_path), circular=True,
                                       max_new_tokens=3, batch_size=4, weights="sft")
    rows = read_lines(tmp_path / "mmb.jsonl")
    assert [(r["question_id"], r["round_id"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    assert all(set(r) == set(ANSWER_KEYS) | {"round_id", "options", "option_char"} for r in rows)
    assert rows[0]["prompt"] == multiple_choice.mc_prompt("What color is the circle?", None,
                                                          ["red", "green", "blue", "yellow"])
    assert results == multiple_choice.score(from_tsv, rows, circular=True)
    # a second path: the same images given as files answer the same as the base64 ones
    by_path = [dict(q, image=f"val/00000{i}.png") for i, q in enumerate(from_tsv)]
    for q in by_path:
        del q["image_base64"]
    again = runner.answer_questions(model, processor, multiple_choice.runner_questions(by_path, circular=True),
                                    str(tmp_path / "by-path.jsonl"), "m", os.path.join(toy_world, "images"),
                                    max_new_tokens=3, batch_size=4, weights="sft")
    assert [r["text"] for r in again] == [r["text"] for r in rows]


# ----------------------------------------------------------------------------- the runner
def val_questions(toy_world):
    records = json.load(open(os.path.join(toy_world, "val.json")))
    return records, toyvqa.toy_questions(records)


def test_answer_file_is_llavas_format_and_generates_answers(sft, toy_world, tmp_path, monkeypatch):
    model, processor = sft
    images = os.path.join(toy_world, "images")
    _, questions = val_questions(toy_world)
    out = str(tmp_path / "answers.jsonl")
    rows = runner.answer_questions(model, processor, questions, out, "model-sft", images, max_new_tokens=4,
                                   batch_size=4, weights="sft")
    assert read_lines(out) == rows and [list(r) for r in rows] == [ANSWER_KEYS] * len(questions)
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    assert rows[0]["prompt"] == questions[0]["text"] and rows[0]["metadata"] == questions[0]["metadata"]
    assert len({r["answer_id"] for r in rows}) == len(rows)
    direct = generate(model, processor, [vlm.load_image(os.path.join(images, q["image"])) for q in questions],
                      [q["text"] for q in questions], max_new_tokens=4, batch_size=1)
    assert [r["text"] for r in rows] == direct  # the runner's answers are generate.py's
    assert sorted(os.listdir(tmp_path)) == ["answers.jsonl", "answers.jsonl.args.json"]
    # a rerun with the same settings reads the file back and generates nothing
    monkeypatch.setattr(runner, "answer_chunk", lambda *a, **k: pytest.fail("generated again"))
    assert runner.answer_questions(model, processor, questions, out, "model-sft", images, max_new_tokens=4,
                                   batch_size=4, weights="sft") == rows


def test_sampling_is_seeded(sft, toy_world, tmp_path):
    model, processor = sft
    _, questions = val_questions(toy_world)
    images = os.path.join(toy_world, "images")

    def sample(name, seed, temperature=1.0):
        rows = runner.answer_questions(model, processor, questions, str(tmp_path / name), "m", images,
                                       max_new_tokens=4, batch_size=4, temperature=temperature, seed=seed, weights="sft")
        return [r["text"] for r in rows]

    first = sample("a.jsonl", 0)
    assert sample("b.jsonl", 0) == first  # same seed, same samples
    assert sample("c.jsonl", 1) != first  # another seed, other samples
    greedy = [r["text"] for r in runner.answer_questions(model, processor, questions, str(tmp_path / "g.jsonl"), "m",
                                                         images, max_new_tokens=4, batch_size=4, weights="sft")]
    assert sample("d.jsonl", 0, temperature=1e-4) == greedy  # a temperature near 0 samples the greedy answer


def test_toyvqa_equals_toyworlds_own_measures(sft, toy_world, tmp_path):
    model, processor = sft
    records, _ = val_questions(toy_world)
    images = os.path.join(toy_world, "images")
    results = toyvqa.evaluate(model, processor, "m", os.path.join(toy_world, "val.json"), images, str(tmp_path),
                              noise_step=999, seed=0, max_new_tokens=16, batch_size=16, weights="sft")
    accuracy, answers = toyvqa.vqa_accuracy(model, processor, records, images)
    assert results["clean"] == accuracy
    assert [r["text"] for r in read_lines(tmp_path / "toyvqa-clean.jsonl")] == answers
    assert results["changed"] == toyvqa.noise_change_rate(model, processor, records, images, 999, 0)


def test_resumed_equals_uninterrupted(sft, toy_world, tmp_path, monkeypatch):
    model, processor = sft
    images = os.path.join(toy_world, "images")
    questions = pope.pope_questions(pope.read_pope(os.path.join(toy_world, "pope", "random.jsonl")))  # 18
    settings = dict(max_new_tokens=4, batch_size=4, weights="sft")  # 5 chunks: 4, 4, 4, 4, 2
    full = tmp_path / "full.jsonl"
    runner.answer_questions(model, processor, questions, str(full), "m", images, **settings)

    out = tmp_path / "resumed.jsonl"
    real, chunks = runner.answer_chunk, []

    def crash_at_third_chunk(*args, **kwargs):
        chunks.append(args[4])  # the chunk's index
        if len(chunks) == 3:
            raise KeyboardInterrupt  # a kill after two chunks reached the disk
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "answer_chunk", crash_at_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        runner.answer_questions(model, processor, questions, str(out), "m", images, **settings)
    partial = f"{out}.partial-rank0-of-1.jsonl"
    assert len(read_lines(partial)) == 1 + 8 and not out.exists()
    with open(partial, "a") as f:  # half of chunk 2 made it, then a line torn by the kill
        f.write(json.dumps(dict(index=8, id=8, text="half a chunk")) + "\n" + '{"index": 9, "question_')
    with pytest.raises(ValueError, match="other settings"):  # a partial file made otherwise is refused
        runner.answer_questions(model, processor, questions, str(out), "m", images, max_new_tokens=5, batch_size=4,
                                weights="sft")
    chunks.clear()
    monkeypatch.setattr(runner, "answer_chunk", lambda *a, **k: (chunks.append(a[4]), real(*a, **k))[1])
    runner.answer_questions(model, processor, questions, str(out), "m", images, **settings)
    assert chunks == [2, 3, 4]  # chunks 0 and 1 were skipped; the incomplete chunk 2 was redone
    assert out.read_bytes() == full.read_bytes()
    assert not os.path.exists(partial)


def test_two_ranks_equal_one(toy_world, tmp_path):
    common = ["--model", os.path.join(toy_world, "model-sft"), "--pope-dir", os.path.join(toy_world, "pope"),
              "--image-folder", os.path.join(toy_world, "images"), "--splits", "random", "--max-new-tokens", "4",
              "--batch-size", "2", "--no-progress"]
    one = pope.main(common + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "eval.pope", *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=180)
    answers = "pope-random.jsonl"
    assert (tmp_path / "two" / answers).read_bytes() == (tmp_path / "one" / answers).read_bytes()
    assert json.load(open(tmp_path / "two" / "pope.json"))["results"] == one
    assert sorted(os.listdir(tmp_path / "two")) == ["pope-random.jsonl", "pope-random.jsonl.args.json", "pope.json"]
