"""eval/judge_client.py and eval/judge.py against a local OpenAI-compatible server: retries, parsing, caching,
the pair scores of LLaVA-Bench."""
import contextlib
import http.server
import json
import threading

import pytest

from eval import judge, judge_client

pytestmark = pytest.mark.usefixtures("one_thread")


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
