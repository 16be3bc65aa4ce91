"""eval/gqa.py: LLaVA's normalisation and GQA eval.py's exact match on hand-worked answers; the per-type
accuracies and the predictions file against numbers counted by hand; evaluate() on the toy model against a
recount from its own answer file, through GQA's json and LLaVA's jsonl alike; bad input stopped early."""
import json
import os

import pytest
from PIL import Image

from eval import gqa, runner, toyvqa
from eval.pope import LLAVA_SUFFIX

pytestmark = pytest.mark.usefixtures("one_thread")


def entry(image_id, question, answer, structural, semantic):
    """One question of GQA's testdev_balanced_questions.json (the fields we read, plus two we ignore)."""
    return dict(imageId=image_id, question=question, answer=answer, isBalanced=True, fullAnswer=f"It is {answer}.",
                types=dict(structural=structural, semantic=semantic, detailed=f"{semantic}-{structural}"))


# Six questions, one of each structural type GQA has but compare, and the model's answers to them.
HAND = {
    "201": entry("n10", "Is the circle red?", "yes", "verify", "attr"),
    "202": entry("n11", "What colour is the star?", "blue", "query", "attr"),
    "203": entry("n10", "Is the square red or green?", "green", "choose", "attr"),
    "204": entry("n11", "Which shape is left of the star?", "circle", "query", "rel"),
    "205": entry("n12", "Are there both circles and stars?", "no", "logical", "obj"),
    "206": entry("n12", "Is there a triangle?", "no", "verify", "obj"),
}
HAND_ANSWERS = {"201": "Yes.", "202": "Blue", "203": "red", "204": "Circle.", "205": "No..", "206": "yes"}
# normalised: yes, blue, red, circle, no, yes -> right: 201, 202, 204, 205 (203 and 206 wrong)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def answer_rows(texts):
    return [dict(question_id=qid, text=text) for qid, text in texts.items()]


# ----------------------------------------------------------------------------- scoring by hand
@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"), ("No..", "no"), ("Blue", "blue"),
    ("Dr. Who.", "dr. who"),  # only trailing periods go
    ("red ", "red "),  # no whitespace strip (the runner's answers come stripped, as LLaVA's do)
    ("Yes!", "yes!")])
def test_normalise_as_convert_gqa_for_eval(text, expected):
    assert gqa.normalise(text) == expected


def test_exact_match(tmp_path):
    records = gqa.gqa_records(write_json(tmp_path / "q.json", {"1": entry("n1", "What is it?", "circle", "query", "obj")}))
    for text, right in [("circle", True), ("Circle.", True), ("the circle", False), ("circles", False),
                        ("circle, I think", False), ("circle ", False)]:
        assert gqa.correctness(records, answer_rows({"1": text})) == [right], text


def test_scores_by_hand(tmp_path):
    records = gqa.gqa_records(write_json(tmp_path / "q.json", HAND))
    assert [r["text"] for r in records][:1] == ["Is the circle red?" + LLAVA_SUFFIX]
    assert [r["image"] for r in records][:2] == ["n10.jpg", "n11.jpg"]
    results = gqa.score(records, answer_rows(HAND_ANSWERS))
    # right: 201, 202, 204, 205 of 6 -> 4/6
    # binary (structural not query: 201 verify, 203 choose, 205 logical, 206 verify): right 201, 205 -> 2/4
    #   (the rule "answer is yes/no" would give 201, 205, 206 -> 2/3 instead: 203's answer "green" is binary here)
    # open (query: 202, 204): both right -> 2/2
    # structural: choose 203 -> 0/1; logical 205 -> 1/1; query 202, 204 -> 2/2; verify 201, 206 -> 1/2
    # semantic: attr 201, 202, 203 -> 2/3; obj 205, 206 -> 1/2; rel 204 -> 1/1
    assert results["accuracy"] == pytest.approx(4 / 6)
    assert results["binary"] == pytest.approx(2 / 4) and results["open"] == pytest.approx(1.0)
    assert results["structural"] == pytest.approx(dict(choose=0.0, logical=1.0, query=1.0, verify=0.5))
    assert results["semantic"] == pytest.approx(dict(attr=2 / 3, obj=0.5, rel=1.0))
    assert results["questions"] == dict(all=6, binary=4, open=2, structural=dict(choose=1, logical=1, query=2, verify=2),
                                        semantic=dict(attr=3, obj=2, rel=1))
    # no open question at all: open accuracy None, not 0
    only_binary = gqa.score(records[:1], answer_rows(HAND_ANSWERS))
    assert only_binary["open"] is None and only_binary["binary"] == 1.0 and only_binary["questions"]["open"] == 0
    table = gqa.format_table(results)
    assert "| all | 6 | 66.7 |" in table and "| structural: verify | 2 | 50.0 |" in table
    with pytest.raises(ValueError, match=r"no answer for question ids \['206'\]"):
        gqa.score(records, answer_rows(HAND_ANSWERS)[:5])


def test_predictions_file_by_hand(tmp_path):
    records = gqa.gqa_records(write_json(tmp_path / "q.json", HAND))
    answers = answer_rows(HAND_ANSWERS)[::-1]  # matched by id, not by position
    assert gqa.prediction_rows(records, answers) == [
        {"questionId": "201", "prediction": "yes"}, {"questionId": "202", "prediction": "blue"},
        {"questionId": "203", "prediction": "red"}, {"questionId": "204", "prediction": "circle"},
        {"questionId": "205", "prediction": "no"}, {"questionId": "206", "prediction": "yes"}]


# ----------------------------------------------------------------------------- input files
def test_llava_jsonl_reads_as_the_official_json(tmp_path):
    official = write_json(tmp_path / "q.json", HAND)
    with open(tmp_path / "llava.jsonl", "w") as f:
        for k, (qid, e) in enumerate(HAND.items()):  # LLaVA's file carries the suffix; one row without it
            text = e["question"] + (LLAVA_SUFFIX if k else "")
            f.write(json.dumps(dict(question_id=qid, image=f"{e['imageId']}.jpg", text=text, category="default")) + "\n")
    llava = str(tmp_path / "llava.jsonl")
    assert gqa.read_questions(llava, official) == gqa.read_questions(official)
    assert {r["answer"] for r in gqa.read_questions(llava)} == {None}  # no answers without the json
    with pytest.raises(ValueError, match=r"q-small.json: no question ids \['205', '206'\]"):
        gqa.read_questions(llava, write_json(tmp_path / "q-small.json", dict(list(HAND.items())[:4])))


def test_malformed_files_are_named(tmp_path):
    (tmp_path / "torn.json").write_text('{"201": {"imageId": ')
    with pytest.raises(ValueError, match="torn.json: malformed json"):
        gqa.read_questions(str(tmp_path / "torn.json"))
    with pytest.raises(ValueError, match="list.json: expected GQA's json dict"):
        gqa.read_questions(write_json(tmp_path / "list.json", [HAND["201"]]))
    no_answer = {"201": {k: v for k, v in HAND["201"].items() if k != "answer"}}
    with pytest.raises(ValueError, match="noanswer.json: question 201 needs"):
        gqa.read_questions(write_json(tmp_path / "noanswer.json", no_answer))
    (tmp_path / "bad.jsonl").write_text('{"question_id": "1", "image": "a.jpg", "text": "Q"}\n{"question_id"\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: malformed json"):
        gqa.read_questions(str(tmp_path / "bad.jsonl"))


def test_missing_image_stops_before_answering(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id in ("n10", "n11"):  # n12 (questions 205, 206) is missing
        Image.new("RGB", (8, 8)).save(folder / f"{image_id}.jpg")
    monkeypatch.setattr(gqa.runner, "answer_questions", lambda *a, **k: pytest.fail("answered"))
    with pytest.raises(ValueError, match=r"2 of 6 questions have no image \(question 205: .*n12.jpg, question 206"):
        gqa.evaluate(None, None, "m", write_json(tmp_path / "q.json", HAND), str(folder), str(tmp_path / "out"),
                     weights="w")


# ----------------------------------------------------------------------------- end to end on the toy model
def toy_gqa(toy_world, folder, count=6):
    """The first `count` toy val questions as a GQA testdev-style json, their images as {imageId}.jpg."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    data = {}
    for k, record in enumerate(json.load(open(os.path.join(toy_world, "val.json")))[:count]):
        image, question, answer, family = toyvqa.first_question(record)
        image_id = f"toy{k}"
        with Image.open(os.path.join(toy_world, "images", image)) as img:
            img.convert("RGB").save(os.path.join(folder, "images", f"{image_id}.jpg"))
        structural = "verify" if family == "exist" else "query"
        data[str(3000 + k)] = entry(image_id, question, answer.lower(), structural, family)
    return data


def recount(data, rows):
    """Accuracy from an answer file alone: LLaVA's normalisation, then equality with the answer."""
    return sum(row["text"].rstrip(".").lower() == data[str(row["question_id"])]["answer"] for row in rows) / len(rows)


def test_evaluate_on_the_toy_model(toy_world, tmp_path):
    model, processor = runner.load_model(os.path.join(toy_world, "model-sft"))
    data = toy_gqa(toy_world, str(tmp_path))
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    settings = dict(max_new_tokens=6, batch_size=4, weights="sft")
    results = gqa.evaluate(model, processor, "m", write_json(tmp_path / "q.json", data), images, out, **settings)
    rows = [json.loads(line) for line in open(os.path.join(out, gqa.ANSWER_FILE))]
    assert [r["question_id"] for r in rows] == list(data)
    assert [r["prompt"] for r in rows] == [e["question"] + LLAVA_SUFFIX for e in data.values()]
    assert results["accuracy"] == pytest.approx(recount(data, rows))
    assert json.load(open(os.path.join(out, gqa.PREDICTIONS_FILE))) == [
        {"questionId": str(r["question_id"]), "prediction": r["text"].rstrip(".").lower()} for r in rows]

    # The toy model never saw LLaVA's suffix and may answer nothing right; make the even questions' answers
    # its own (right whatever it says) and rescore: the same answers (reused, not generated), a known floor.
    for k, row in enumerate(rows):
        if k % 2 == 0:
            data[row["question_id"]]["answer"] = row["text"].rstrip(".").lower()
    again = gqa.evaluate(model, processor, "m", write_json(tmp_path / "q2.json", data), images, out, **settings)
    assert again["accuracy"] == pytest.approx(recount(data, rows)) and again["accuracy"] >= 0.5

    # A second path: LLaVA's jsonl, scored with the json's answers, asks and scores the same
    llava = tmp_path / "llava.jsonl"
    llava.write_text("".join(json.dumps(dict(question_id=qid, image=f"{e['imageId']}.jpg",
                                             text=e["question"] + LLAVA_SUFFIX)) + "\n" for qid, e in data.items()))
    via_llava = gqa.evaluate(model, processor, "m", str(llava), images, str(tmp_path / "out-llava"),
                             answers_path=str(tmp_path / "q2.json"), **settings)
    assert via_llava == again
    assert gqa.evaluate(model, processor, "m", str(llava), images, str(tmp_path / "out-llava"), **settings) == dict(
        accuracy=None, questions=dict(all=len(data)))


def test_cli_writes_results_with_its_arguments(toy_world, tmp_path):
    data = toy_gqa(toy_world, str(tmp_path), count=3)
    out = str(tmp_path / "out")
    results = gqa.main(["--model", os.path.join(toy_world, "model-sft"), "--questions-json",
                        write_json(tmp_path / "q.json", data), "--image-folder", str(tmp_path / "images"),
                        "--out", out, "--max-new-tokens", "6", "--no-progress"])
    saved = json.load(open(os.path.join(out, "gqa.json")))
    assert saved["results"] == results and saved["args"]["model_id"] == "model-sft"
    assert saved["args"]["max_new_tokens"] == 6 and saved["args"]["questions_json"].endswith("q.json")
    with pytest.raises(SystemExit):  # neither question file given
        gqa.parse_args(["--image-folder", "x"])
    assert gqa.parse_args(["--image-folder", "x", "--questions-json", "q.json"]).max_new_tokens == 128  # LLaVA's
