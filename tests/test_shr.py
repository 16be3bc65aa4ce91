"""eval/shr.py: HA-DPO's sentence split, region lines, judgement parsing and ratio by hand; the Visual Genome path
against a local judge with a made-up prompt; the toy world's exact judge on hand-made descriptions."""
import json
import os
import re
import shutil

import pytest

import common
import vlm
from eval import runner, shr
from generate import generate_beam
from test_judge import judge_server, no_proxy  # noqa: F401 (no_proxy is a fixture)

SCENE = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "center": [10, 10]},
                     {"shape": "star", "colour": "blue", "size": "large", "center": [50, 30]}], "word": "cat"}


def test_sentences_as_ha_dpo_splits_them():
    text = "A cat sits on a mat. A cat sits on a mat.  The dog runs.A cat sits. Two birds."
    # the repeat goes, and so does "A cat sits", which is part of the first sentence
    assert shr.sentences(text) == ["A cat sits on a mat", "The dog runs", "Two birds"]
    assert shr.numbered(["x", "y"]) == "1. x\n2. y\n"


def test_region_lines_by_hand():
    image = dict(width=200, height=100)
    regions = [dict(x=20, y=10, width=50, height=30, phrase="a red ball"), dict(x=0, y=0, width=1, height=1, phrase="")]
    # 20/200 = 0.1, 10/100 = 0.1, 70/200 = 0.35, 40/100 = 0.4; the empty phrase is left out
    assert shr.regions_text(image, regions) == "[0.1, 0.1, 0.35, 0.4]: a red ball\n"


def test_parse_judgement():
    reply = "Sure.\nJudgement:\n1. hallucination: no dog\n\n2. Correct: yes\n3. cannot judge: mood\n"
    assert shr.parse_judgement(reply, 3) == ["hallucination", "correct", "cannot judge"]
    assert shr.parse_judgement(reply, 2) is None  # one line per sentence, or none counts
    assert shr.parse_judgement("1. correct: fine", 1) is None


def test_metrics_by_hand():
    judged = [[("a b c", "hallucination"), ("d e", "correct"), ("f", "cannot judge")],
              [("g h i j", "hallucination"), ("k", None)]]
    results = shr.metrics(judged)
    # 5 sentences, 11 words over 2 images; classed: 4 sentences (the None one is out), 2 hallucinated
    # (3 + 4 = 7 words) of 4 classed (3 + 2 + 1 + 4 = 10 words)
    assert results["sentences_per_image"] == 2.5 and results["words_per_image"] == 5.5
    assert results["hallucinated_sentences_per_image"] == 1.0 and results["hallucinated_words_per_image"] == 3.5
    assert results["shr"] == 0.5 and results["hallucinated_words_ratio"] == 0.7
    assert results["unjudged_sentences"] == 1


def test_the_toy_judge_reads_each_sentence_against_the_scene():
    text = ("There are two objects. A small red circle is at the top left. A large blue star is at the top. "
            "The word is dog. A purple square. Colourless green ideas sleep")
    judged = shr.judge_toy([(text, SCENE)])[0]
    # right: the count, the circle (top left); wrong: the star is at (50, 30) = the right, not the top; the
    # word is cat; there is no purple square; the last sentence is not the toy grammar's: wrong too
    assert [c for _, c in judged] == ["correct", "correct", "hallucination", "hallucination", "hallucination",
                                      "hallucination"]
    assert shr.metrics([judged])["shr"] == pytest.approx(4 / 6)


def write_vg(toy_world, tmp_path):
    shr_dir, vg_dir = tmp_path / "shr", tmp_path / "vg"
    os.makedirs(shr_dir)
    os.makedirs(vg_dir / "VG_100K")
    for k in (1, 2):
        shutil.copy(os.path.join(toy_world, "images", "val", f"00000{k}.png"), vg_dir / "VG_100K" / f"{k}.jpg")
    (shr_dir / "val_images_final.json").write_text(json.dumps([{"image_id": 1}, {"image_id": 2}]))
    (vg_dir / "image_data.json").write_text(json.dumps(
        [{"image_id": k, "url": f"https://vg/VG_100K/{k}.jpg", "width": 64, "height": 32} for k in (1, 2)]))
    (vg_dir / "region_descriptions.json").write_text(json.dumps(
        [{"id": k, "regions": [{"image_id": k, "x": 16, "y": 8, "width": 16, "height": 8, "phrase": f"thing {k}"}]}
         for k in (1, 2)]))
    (shr_dir / "shr_factual_part1.jsonl").write_text(json.dumps({"1": ["A fact.", "Another."]}) + "\n")
    (shr_dir / "shr_factual_part2.jsonl").write_text(json.dumps({"2": ["Fact two."]}) + "\n")
    return str(shr_dir), str(vg_dir)


def test_visual_genome_path_with_the_users_prompt(toy_world, tmp_path, no_proxy):  # noqa: F811
    shr_dir, vg_dir = write_vg(toy_world, tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("MADE-UP JUDGE PROMPT\nREGIONS\n{}FACTS\n{}SENTENCES\n{}END\n")

    def reply(body):  # the first sentence of every description a hallucination, the rest correct
        numbered = re.split(r"SENTENCES\n|Sentences to judge:\n", body["messages"][0]["content"])[-1]
        count = len(re.findall(r"^\d+\. ", numbered, re.M))
        return "Judgement:\n" + "".join(f"{i}. {'hallucination' if i == 1 else 'correct'}: because\n"
                                        for i in range(1, count + 1))
    model, processor = runner.load_model(os.path.join(toy_world, "model-sft"))
    with judge_server(reply) as (url, requests):
        judge = dict(url=url, model=None, cache_dir=None, backoff=0.01, judge_prompt=str(prompt))
        results = shr.evaluate(model, processor, "m", shr_dir, vg_dir, str(tmp_path / "out"), judge,
                               max_new_tokens=12, batch_size=2, weights="w")
    answers = {a["question_id"]: a["text"] for a in common.read_jsonl(tmp_path / "out" / "shr-answers.jsonl")}
    kept = {k: shr.sentences(answers[k]) for k in (1, 2)}
    first = requests[0]["body"]
    assert first["model"] == "gpt-4" and first["temperature"] == 0.7 and first["max_tokens"] == 800
    assert first["messages"][0]["content"] == (f"MADE-UP JUDGE PROMPT\nREGIONS\n[0.25, 0.25, 0.5, 0.5]: thing 1\n"
                                               f"FACTS\nA fact.\nAnother.\nSENTENCES\n{shr.numbered(kept[1])}END\n")
    judged = sum(len(k) for k in kept.values())
    assert judged > 0 and results["shr"] == pytest.approx(sum(1 for k in kept.values() if k) / judged)
    assert results["comparable"] is True and results["prompt_files"]["--judge-prompt"]["path"] == str(prompt)
    with judge_server(reply) as (url, _):
        judge = dict(url=url, model=None, cache_dir=None, backoff=0.01)
        paraphrased = shr.evaluate(model, processor, "m", shr_dir, vg_dir, str(tmp_path / "out"), judge,
                                   max_new_tokens=12, batch_size=2, weights="w")
    assert paraphrased["comparable"] is False and "not comparable with published scores" in paraphrased["note"]


def test_a_reply_without_judgement_is_asked_again(toy_world, tmp_path, no_proxy):  # noqa: F811
    shr_dir, vg_dir = write_vg(toy_world, tmp_path)
    model, processor = runner.load_model(os.path.join(toy_world, "model-sft"))
    with judge_server(lambda body: "I cannot help.", max_requests=50) as (url, requests):
        judge = dict(url=url, model=None, cache_dir=str(tmp_path / "cache"), backoff=0.01)
        results = shr.evaluate(model, processor, "m", shr_dir, vg_dir, str(tmp_path / "out"), judge,
                               max_new_tokens=12, batch_size=2, weights="w")
    assert len(requests) == 2 * shr.JUDGE_TRIES  # each image asked JUDGE_TRIES times (the cache kept apart)
    assert results["unjudged_sentences"] == results["sentences_per_image"] * 2 and results["shr"] == 0


def test_descriptions_by_beam_search_and_the_official_request_bytes(toy_world, tmp_path, no_proxy):  # noqa: F811
    """SHR's defaults are the published baseline's decoding (5 beams, 512 new tokens); the judge's request is
    gpt_utils.py's body: its fields in the openai client's order, serialised by json.dumps' defaults; an image
    whose request text is over 15,000 characters is skipped, as shr_eval.py skips it."""
    args = shr.parse_args(["--shr-dir", "s", "--vg-dir", "v"])
    assert args.num_beams == 5 and args.max_new_tokens == 512
    shr_dir, vg_dir = write_vg(toy_world, tmp_path)
    with open(os.path.join(shr_dir, "shr_factual_part2.jsonl"), "w") as f:  # image 2's request: > 15,000 chars
        f.write(json.dumps({"2": ["x" * 15_000]}) + "\n")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("P\n{}F\n{}S\n{}")
    model, processor = runner.load_model(os.path.join(toy_world, "model-sft"))
    with judge_server(lambda body: "Judgement:\n" + "".join(f"{i}. correct: ok\n" for i in range(1, 40))) as (url, requests):
        judge = dict(url=url, model=None, cache_dir=None, backoff=0.01, judge_prompt=str(prompt))
        shr.evaluate(model, processor, "m", shr_dir, vg_dir, str(tmp_path / "out"), judge, max_new_tokens=12,
                     batch_size=2, weights="w", num_beams=5)
    answers = common.read_jsonl(tmp_path / "out" / "shr-answers.jsonl")
    images = [vlm.load_image(os.path.join(vg_dir, "VG_100K", f"{k}.jpg")) for k in (1, 2)]
    assert [a["text"] for a in answers] == generate_beam(model, processor, images, [shr.PROMPT] * 2, num_beams=5,
                                                         max_new_tokens=12)
    assert len(requests) == 1  # image 2 skipped
    content = "P\n[0.25, 0.25, 0.5, 0.5]: thing 1\nF\nA fact.\nAnother.\nS\n" + shr.numbered(shr.sentences(answers[0]["text"]))
    # by hand, as json.dumps writes the openai client's parameters (messages first, then model and the decoding
    # arguments in their dataclass's order, then logit_bias)
    expected = ('{"messages": [{"role": "user", "content": ' + json.dumps(content) + '}], "model": "gpt-4", '
                '"max_tokens": 800, "temperature": 0.7, "top_p": 1.0, "n": 1, "stream": false, "stop": ["###"], '
                '"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {"50256": -100}}')
    assert requests[0]["raw"] == expected.encode()
