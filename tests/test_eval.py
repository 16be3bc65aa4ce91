"""eval/: every scorer against hand-worked cases; the runner's answer files (LLaVA's format, equal to
generate.py's answers, resumed == uninterrupted, 2 ranks == 1); the judge client against a local server;
compare.py end to end, its numbers recomputed from its answer files."""
import base64
import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import lora
import vlm
from conftest import ROOT
from eval import (compare, compare_report, hallucination, judge, judge_client, mc_files, mc_letters, multiple_choice, pope,
                  runner, toyvqa)
from generate import generate
from helpers import read_lines

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


def write_mc_files(toy_world, folder):
    """A hand-made MMBench-style tsv (base64 images, a 'nan' hint, a 3-option question) and a jsonl."""
    images = os.path.join(toy_world, "images")
    b64 = [base64.b64encode(open(os.path.join(images, f"val/00000{i}.png"), "rb").read()).decode() for i in range(2)]
    tsv = os.path.join(folder, "mmb.tsv")
    with open(tsv, "w") as f:
        f.write("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n")
        f.write(f"1\tWhat color is the circle?\tnan\tred\tgreen\tblue\tyellow\tA\tcolour\t{b64[0]}\n")
        f.write(f"2\tHow many objects are there?\tCount carefully.\t1\t2\t3\t\tB\tcount\t{b64[1]}\n")
    jsonl = os.path.join(folder, "seed.jsonl")
    with open(jsonl, "w") as f:
        f.write(json.dumps(dict(question_id="q1", question="What shape is red?", options=["circle", "star"],
                                answer="B", image="val/000000.png")) + "\n")
        f.write(json.dumps(dict(question_id="q2", question="How many?", choice_a="1", choice_b="2", choice_c="3",
                                answer="A", data_id="val/000001.png", hint="Look.")) + "\n")
    return tsv, jsonl


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


# ----------------------------------------------------------------------------- the judge client
@contextlib.contextmanager
def judge_server(reply, fail_first=0, status=500, max_requests=20):
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (a free port): records every request,
    answers the first `fail_first` with `status`, then reply(body); refuses more than max_requests."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = json.loads(raw)
            requests.append(dict(path=self.path, auth=self.headers.get("Authorization"), body=body, raw=raw))
            if len(requests) > max_requests:
                code, payload = 503, {"error": "too many requests for a test"}
            elif len(requests) <= fail_first:
                code, payload = status, {"error": "scripted failure"}
            else:
                code, payload = 200, {"object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply(body)}, "finish_reason": "stop"}]}
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


@pytest.mark.parametrize("reply, expected", [("0.7", 0.7), ("1.0", 1.0), ("0", 0.0), ("0.3 since half is missing", 0.3),
                                             (".5", 0.5), ("1.5", None), ("great", None), ("", None)])
def test_parse_mmvet_score(reply, expected):
    assert judge.parse_mmvet_score(reply) == expected


# "7, 9": the official parse replaces "," with " " and splits on single spaces, so it reads three parts.
@pytest.mark.parametrize("reply, expected", [("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)), ("7, 9", None),
                                             ("8.5 6", (8.5, 6.0)), ("Score: 7", None), ("7 8 9", None), ("", None)])
def test_parse_pair_scores(reply, expected):
    assert judge.parse_pair_scores(reply) == expected


def test_mmvet_judge_retries_parses_and_caches(tmp_path, no_proxy):
    data = tmp_path / "mm-vet"
    data.mkdir()
    items = {"v1_0": dict(imagename="v1_0.png", question="What is 2+2?", answer="4", capability=["math"]),
             "v1_1": dict(imagename="v1_1.png", question="Which fruits?", answer="apple<AND>pear",
                          capability=["rec", "math"])}
    (data / "mm-vet.json").write_text(json.dumps(items))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(dict(question_id=q, text=t)) + "\n"
                               for q, t in [("v1_0", "It is 4."), ("v1_1", "An apple.")]))
    out, cache = tmp_path / "out", tmp_path / "cache"

    def reply(body):
        return "1.0" if body["messages"][-1]["content"].endswith("| It is 4. | ") else "0.5"

    argv = ["--benchmark", "mmvet", "--data-dir", str(data), "--answers", str(answers), "--out", str(out),
            "--judge-model", "judge-x", "--judge-cache", str(cache), "--judge-backoff", "0.01"]
    with judge_server(reply, fail_first=1) as (url, requests):
        results = judge.main(argv + ["--judge-url", url])
        assert len(requests) == 3  # one 500, retried, then one per question
        assert requests[0]["body"] == requests[1]["body"] and requests[0]["path"] == "/v1/chat/completions"
        assert requests[0]["auth"] == "Bearer test-key"  # from OPENAI_API_KEY
        body = requests[1]["body"]
        assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 3
        assert [m["role"] for m in body["messages"]] == ["user"]
        prompt = body["messages"][0]["content"]
        assert "<AND>" in prompt and "Question | Ground truth | Prediction | Correctness" in prompt
        assert prompt.endswith("\nWhat is 2+2? | 4 | It is 4. | ")
        assert requests[2]["body"]["messages"][0]["content"].endswith(
            "\nWhich fruits? | apple <AND> pear | An apple. | ")
        assert results["per_question"] == {"v1_0": 1.0, "v1_1": 0.5}
        assert results["score"] == pytest.approx(75.0) and results["math"] == pytest.approx(75.0)
        assert results["rec"] == pytest.approx(50.0)
        assert json.load(open(out / "mmvet.json")) == {"v1_0": "It is 4.", "v1_1": "An apple."}  # MM-Vet's format
        assert judge.main(argv + ["--judge-url", url]) == results
        assert len(requests) == 3  # the rerun came from the cache: no request


def test_mmvet_unreadable_reply_is_asked_again_hotter(tmp_path, no_proxy):
    items = {"v1_0": dict(imagename="a.png", question="Q?", answer="4", capability=["math"])}
    with judge_server(lambda body: "0.3" if body["temperature"] > 0 else "cannot tell") as (url, requests):
        rows, results = judge.grade_mmvet(items, [dict(question_id="v1_0", text="4")],
                                          dict(url=url, model="j", cache_dir=None, backoff=0.01))
    assert [r["body"]["temperature"] for r in requests] == [0.0, 0.0, 0.5]  # MM-Vet: first retry at 0.0
    assert rows[0]["score"] == 0.3 and results["score"] == pytest.approx(30.0)


def test_llava_bench_judge_pairs_with_the_reference(tmp_path, no_proxy):
    questions = [dict(question_id=0, image="001.jpg", text="What is in the image?", category="conv"),
                 dict(question_id=1, image="002.jpg", text="Why is it funny?", category="complex")]
    contexts = {"001.jpg": ["A cat on a mat.", "cat: [0.1, 0.2, 0.5, 0.6]"], "002.jpg": "A dog in a hat."}
    references = {0: dict(question_id=0, text="A cat sits on a mat.", answer_id="ref0"),
                  1: dict(question_id=1, text="The dog wears a hat.", answer_id="ref1")}
    answers = [dict(question_id=0, text="A cat.", answer_id="a0"),
               dict(question_id=1, text="A hat on a dog.", answer_id="a1")]
    replies = {"A cat.": "8 6\nAssistant 1 gives more detail.", "A hat on a dog.": "7 7\nBoth are fine."}

    def reply(body):
        return next(r for text, r in replies.items() if f"[Assistant 2]\n{text}\n" in body["messages"][1]["content"])

    cache = tmp_path / "cache"
    settings = dict(model="judge-x", api_key="k", cache_dir=str(cache), backoff=0.01)
    with judge_server(reply) as (url, requests):
        reviews, results = judge.grade_llava_bench(questions, contexts, references, answers, dict(settings, url=url))
        body = requests[0]["body"]
        assert body["temperature"] == 0.2 and [m["role"] for m in body["messages"]] == ["system", "user"]
        content = body["messages"][1]["content"]
        assert content.startswith(
            "[Context]\nA cat on a mat.\ncat: [0.1, 0.2, 0.5, 0.6]\n\n[Question]\nWhat is in the image?")
        assert "[Assistant 1]\nA cat sits on a mat.\n\n[End of Assistant 1]" in content  # the reference is assistant 1
        assert [r["tuple"] for r in reviews] == [[8.0, 6.0], [7.0, 7.0]]
        assert list(reviews[0]) == ["id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple"]
        assert results["llava_bench_conv"]["relative"] == pytest.approx(75.0)
        assert results["llava_bench_complex"]["relative"] == pytest.approx(100.0)
        assert results["all"]["relative"] == pytest.approx(100 * 13 / 15)
        judge.grade_llava_bench(questions, contexts, references, answers, dict(settings, url=url))
        assert len(requests) == 2  # cached


def test_judge_client_does_not_retry_a_bad_request(no_proxy):
    with judge_server(lambda body: "1.0", fail_first=1, status=401) as (url, requests):
        with pytest.raises(RuntimeError, match="HTTP 401"):
            judge_client.chat_completion(url, "j", [{"role": "user", "content": "hi"}], backoff=0.01)
    assert len(requests) == 1


# ----------------------------------------------------------------------------- compare.py end to end
def make_adapter(toy_world, out):
    """A tiny LoRA adapter with random B (LoRA's B = 0 would change nothing), saved in PEFT's layout."""
    model, _ = vlm.load(os.path.join(toy_world, "model-sft"))
    lora.apply_lora(model, 4, 8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in lora.lora_modules(model):
            module.lora_B.weight.copy_(0.5 * torch.randn(module.lora_B.weight.shape, generator=generator))
    lora.save_lora(model, str(out))
    return str(out)


def test_adapter_loads_lora_and_the_projector_beside_it(toy_world, tmp_path):
    """runner.load_model(base, adapter) == the LoRA model by hand (unmerged), projector weights included."""
    from safetensors.torch import save_file
    adapter = make_adapter(toy_world, tmp_path / "adapter")
    base = os.path.join(toy_world, "model-sft")
    by_hand, processor = vlm.load(base)
    lora.load_lora(by_hand, adapter)
    projector = {k: 1.5 * v for k, v in by_hand.state_dict().items() if k.startswith("model.multi_modal_projector.")}
    by_hand.load_state_dict(projector, strict=False)
    save_file(projector, os.path.join(adapter, "non_lora_trainables.safetensors"))  # what --train-projector writes
    loaded, _ = runner.load_model(base, adapter)
    image = vlm.load_image(os.path.join(toy_world, "images", "val", "000000.png"))
    inputs = processor(images=[image], text=[vlm.prompt_text(processor, "How many objects are there?", "llava_v1")],
                       return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, by_hand(**inputs).logits, rtol=1e-4, atol=1e-5)
    run = runner.setup(runner.parse_args(["--model", base, "--adapter", adapter]))  # what the CLIs answer with
    assert run.decoding["weights"] == runner.fingerprint(base, adapter) != runner.fingerprint(base)
    with torch.no_grad():
        torch.testing.assert_close(run.model(**inputs).logits, by_hand(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_compare_end_to_end(toy_world, toy_pairs, tmp_path, monkeypatch):
    adapter = make_adapter(toy_world, tmp_path / "adapter")
    tsv, _ = write_mc_files(toy_world, tmp_path)
    out = tmp_path / "compare"
    images = os.path.join(toy_world, "images")
    argv = ["--base", os.path.join(toy_world, "model-sft"), "--adapter", adapter, "--pope-dir",
            os.path.join(toy_world, "pope"), "--image-folder", images, "--val", os.path.join(toy_world, "val.json"),
            "--noise-step", "999", "--temperatures", "0.0001,1.0", "--mc", f"MMB={tsv}", "--circular",
            "--max-new-tokens", "3", "--open-max-new-tokens", "12", "--world", toy_world, "--pairs", toy_pairs,
            "--batch-size", "8", "--no-progress", "--out", str(out)]
    report = compare.main(argv)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "compare.md").read_text()
    open_columns = [f"{m}-{k}" for k in ("cap", "desc") for m in ("CHAIR_i", "CHAIR_s", "Cover", "SHR")] + ["Sentences"]
    header = "| model | MMB | POPE-rand | POPE-pop | POPE-adv | POPE | VQA | VQA-noisy | " + " | ".join(open_columns)
    assert header in text
    for section in ("## POPE, every metric", "## Short answers by family", "## Open-ended answers",
                    "## The pairs trained: which side holds more false claims"):
        assert section in text, section
    saved = json.load(open(out / "compare.json"))
    assert saved["table"] == report["table"] and saved["pairwise"] == report["pairwise"]

    # ---- every number again, from the answer files and the labels, by hand
    val = json.load(open(os.path.join(toy_world, "val.json")))
    scenes = json.load(open(os.path.join(toy_world, "scenes.json")))
    truth = {r["id"]: r["conversations"][1]["value"].lower() for r in val}
    right = {}  # (model, benchmark) -> {question: bool}
    expected = {}
    for name, folder in (("SFT", "sft"), ("SeVa", "seva")):
        answers = out / "answers" / folder
        f1s = []
        right[name, "POPE"] = {}
        for split in ("random", "popular", "adversarial"):
            pope_file = os.path.join(toy_world, "pope", f"{split}.jsonl")
            labels = {r["question_id"]: r["label"] for r in read_lines(pope_file)}
            said = {r["question_id"]: pope.pope_answer(r["text"]) for r in read_lines(answers / f"pope-{split}.jsonl")}
            tp = sum(said[q] == "yes" and labels[q] == "yes" for q in labels)
            fp = sum(said[q] == "yes" and labels[q] == "no" for q in labels)
            fn = sum(said[q] == "no" and labels[q] == "yes" for q in labels)
            precision, recall = (tp / (tp + fp) if tp + fp else 0), (tp / (tp + fn) if tp + fn else 0)
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0)
            right[name, "POPE"].update((f"{split}/{q}", said[q] == labels[q]) for q in labels)
        for column, file in (("VQA", "toyvqa-clean.jsonl"), ("VQA-noisy", "toyvqa-noise999.jsonl")):
            right[name, column] = {r["question_id"]: r["text"].lower() == truth[r["question_id"]]
                                   for r in read_lines(answers / file)}
        rounds = {}
        for r in read_lines(answers / "MMB.jsonl"):
            letter = mc_letters.mmbench_letter(r["text"], r["options"])  # the official rule (VLMEvalKit's)
            original = r["option_char"][ord(letter) - ord("A")] if letter not in (None, "Z") else None
            rounds.setdefault(r["question_id"], []).append(original == {1: "A", 2: "B"}[r["question_id"]])
        right[name, "MMB"] = {q: all(ok) for q, ok in rounds.items()}
        expected[name] = [100 * sum(right[name, "MMB"].values()) / 2, *(100 * f for f in f1s), 100 * sum(f1s) / 3,
                          100 * sum(right[name, "VQA"].values()) / len(val),
                          100 * sum(right[name, "VQA-noisy"].values()) / len(val)]
        for kind in ("caption", "description"):  # again from the answer files, through hallucination's scorer
            records = json.load(open(os.path.join(toy_world, f"val-{kind}s.json")))
            said = {r["question_id"]: r["text"] for r in read_lines(answers / f"{kind}-clean.jsonl")}
            m = hallucination.hallucination([said[r["id"]] for r in records], [scenes[r["image"]] for r in records])
            expected[name] += [100 * m[k] for k in ("chair_i", "chair_s", "cover", "shr")]
        records = json.load(open(os.path.join(toy_world, "val-sentences.json")))
        said = {r["question_id"]: r["text"] for r in read_lines(answers / "sentence-clean.jsonl")}
        right[name, "Sentences"] = {r["id"]: hallucination.sentence_right(said[r["id"]], r, scenes[r["image"]])
                                    for r in records}
        expected[name].append(100 * sum(right[name, "Sentences"].values()) / len(records))
        greedy = read_lines(answers / "toyvqa-clean.jsonl")
        for t in ("0.0001", "1.0"):
            sampled = read_lines(answers / f"toyvqa-t{t}.jsonl")
            agree = sum(a["text"].lower() == b["text"].lower() for a, b in zip(greedy, sampled)) / len(val)
            assert report["consistency"][name][t]["agreement"] == pytest.approx(agree)
        assert report["consistency"][name]["0.0001"]["agreement"] >= 0.5  # about greedy at a temperature near 0
    assert report["table"]["columns"] == ["MMB", "POPE-rand", "POPE-pop", "POPE-adv", "POPE", "VQA", "VQA-noisy",
                                          *open_columns]
    for name in ("SFT", "SeVa"):
        assert report["table"][name] == pytest.approx(expected[name])
    assert report["table"]["delta"] == pytest.approx([b - a for a, b in zip(expected["SFT"], expected["SeVa"])])
    trained = read_lines(toy_pairs)
    assert report["pairs"]["claims"] == hallucination.pair_claims(trained, scenes)
    assert sum(r["pairs"] for r in report["pairs"]["claims"].values()) == len(trained)
    for bench in ("POPE", "VQA", "VQA-noisy", "MMB", "Sentences"):
        sft, seva = right["SFT", bench], right["SeVa", bench]
        assert report["pairwise"][bench] == dict(win=sum(seva[q] and not sft[q] for q in sft),
                                                 lose=sum(sft[q] and not seva[q] for q in sft),
                                                 tie=sum(sft[q] == seva[q] for q in sft))
    # the adapter changed some answers (else SFT vs SeVa would test nothing)
    clean = "toyvqa-clean.jsonl"
    assert read_lines(out / "answers" / "sft" / clean) != read_lines(out / "answers" / "seva" / clean)

    # ---- a rerun generates nothing (every answer file is reused) and reports the same; sampling is seeded
    monkeypatch.setattr(runner, "answer_chunk", lambda *a, **k: pytest.fail("generated again"))
    assert compare.main(argv)["table"] == report["table"]


def test_a_degenerate_pope_model_is_marked_and_so_is_its_delta():
    # The case a user met: SFT accuracy 0.49 at yes-ratio 0.78, SeVa 0.50 at yes-ratio 1.00; F1 rose 6.5 points.
    def pope_results(accuracy, yes_ratio, f1):
        split = dict(accuracy=accuracy, precision=0.5, recall=0.5, f1=f1, yes_ratio=yes_ratio)
        return {"pope": {"random": split, "popular": split, "adversarial": split, "average": split}}
    results = {"SFT": pope_results(0.49, 0.78, 0.602), "SeVa": pope_results(0.50, 1.00, 0.667)}
    assert compare_report.degenerate_columns(results["SFT"]) == set()  # 0.78 is inside 0.2-0.8
    assert compare_report.degenerate_columns(results["SeVa"]) == {"POPE-rand", "POPE-pop", "POPE-adv", "POPE"}
    columns = {m: compare_report.table_columns(results[m]) for m in compare.MODELS}
    table = {"columns": list(columns["SFT"]), **{m: list(columns[m].values()) for m in compare.MODELS}}
    table["delta"] = [b - a for a, b in zip(table["SFT"], table["SeVa"])]
    args = compare.parse_args(["--noise-step", "-1"])
    text = compare_report.markdown(table, {}, {}, {"SFT": "sft", "SeVa": "seva"}, args, results=results)
    rows = {}  # the main table's rows: the first row of each name
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "60.2 |" in rows["SFT"] and "(degenerate)" not in rows["SFT"]
    assert "66.7 (degenerate)" in rows["SeVa"]
    assert "+6.5 (degenerate)" in rows["delta (SeVa - SFT)"]  # never a bare "POPE +6.5"
    pope_rows = [line for line in text.splitlines() if line.startswith("| SeVa | random")]
    assert pope_rows and "50.0" in pope_rows[0] and "1.00" in pope_rows[0] and "**degenerate**" in pope_rows[0]


def test_the_caption_names_only_the_columns_the_table_has():
    toy = compare_report.caption(["POPE-rand", "POPE", "VQA", "VQA-noisy", "CHAIR_i-cap", "Cover-cap", "Sentences"], 500)
    assert "MMVet" not in toy and "LLaVA-W" not in toy and "step 500" in toy and "lower is better" in toy
    judged = compare_report.caption(["MMVet", "LLaVA-W"], None)
    assert "MMVet" in judged and "LLaVA-W" in judged
    assert not any(word in judged for word in ("POPE", "VQA", "CHAIR", "lower is better"))
