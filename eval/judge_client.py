"""
The judge that grades open-ended answers (GPT-4 in the paper): any OpenAI-compatible chat-completions endpoint
(--judge-url, --judge-model, the key from OPENAI_API_KEY), called with urllib, retried with exponential backoff
on 429, 5xx and network errors, and cached on disk by a hash of the request, so a rerun sends nothing.

A judged score is comparable with published ones only with the official grading prompts, which this project
does not copy: the user passes their copy of the official files (--judge-prompt, --rules, --judge-system) and
the official judge model (the default). `comparability` says which, and every output carries it.
eval/judge.py (MM-Vet, LLaVA-Bench) and eval/shr.py (SHR) grade through here.
"""
import hashlib
import json
import os
import time
import urllib.error
import urllib.request

import common

MMVET_JUDGE_MODEL = "gpt-4-0613"  # mm-vet_evaluator.py's --gpt_model default
LLAVA_BENCH_JUDGE_MODEL = "gpt-4-0314"  # eval_gpt_review_bench.py's model
NOT_COMPARABLE = "not comparable with published scores"
SHR_JUDGE_MODEL = "gpt-4"  # HA-DPO's shr_eval (gpt_utils.get_gpt_response)
PROMPT_FILES = ("judge_prompt", "llava_rules", "llava_system")  # judge_from_args' file paths, not chat settings


# ----------------------------------------------------------------------------- the client
def endpoint(url):
    """A base URL (https://host/v1) or the full chat-completions URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def request_key(body):
    """The cache key of a request: a hash of its body (model, messages, temperature, max_tokens)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def chat_completion(url, model, messages, api_key=None, cache_dir=None, temperature=0.0, max_tokens=1024,
                    retries=5, backoff=1.0, timeout=120, extra=None, attempt=0, key_order=None):
    """The judge's reply (a string) to one chat; retried with exponential backoff on 429, 5xx and network
    errors; cached in CACHE_DIR/<hash>.json so that asking the same again costs no request. extra: more
    request fields an official script sends (top_p, stop, ...); attempt: the same request asked again (a sampled
    reply that did not do), cached apart and sent unchanged; key_order: the body's fields in the order an official
    client writes them (the body is serialised as json.dumps writes it by default)."""
    body = dict(model=model, messages=messages, temperature=temperature, max_tokens=max_tokens, **(extra or {}))
    if key_order is not None:
        if sorted(key_order) != sorted(body):
            raise ValueError(f"key_order {key_order} does not name the body's fields {sorted(body)}")
        body = {key: body[key] for key in key_order}
    key = request_key(body) + (f"-{attempt}" if attempt else "")
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


def client_settings(judge, official_model):
    """chat_completion's settings from a judge dict (its prompt files left out); the official model by default."""
    client = {k: v for k, v in judge.items() if k not in PROMPT_FILES}
    client["model"] = client.get("model") or official_model
    return client


def comparability(missing, judge_model, official_model):
    """{comparable, note}: comparable with published scores only with the official prompts (`missing` names
    those replaced by our paraphrase) and the official judge model."""
    reasons = list(missing)
    if judge_model != official_model:
        reasons.append(f"judge {judge_model}, not the official {official_model}")
    if not reasons:
        return dict(comparable=True, note="official grading prompts and judge model")
    return dict(comparable=False, note=f"{NOT_COMPARABLE}: " + "; ".join(reasons))


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prompt_files(paths):
    """{flag: {path, sha256}} of the grading-prompt files given ({flag: path or None}), for the results."""
    return {flag: dict(path=path, sha256=common.file_digest(path)) for flag, path in paths.items() if path}


# ----------------------------------------------------------------------------- CLI
def add_judge_args(parser):
    g = parser.add_argument_group("judge (optional; paper: GPT-4)")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (none: answers only, no score); "
                        "the key is read from OPENAI_API_KEY")
    g.add_argument("--judge-model", default=None,
                   help=f"judge model name (default: the official one, MM-Vet {MMVET_JUDGE_MODEL}, LLaVA-Bench "
                        f"{LLAVA_BENCH_JUDGE_MODEL}; another model is marked not comparable)")
    g.add_argument("--judge-prompt", default=None, metavar="FILE",
                   help="your copy of the official grader prompt, sent as is: MM-Vet's (the `prompt` string of "
                        "mm-vet_evaluator.py; keep its final newline) or SHR's (GPT_JUDGE_PROMPT of HA-DPO's "
                        "shr_eval/gpt_utils.py, with its three {} slots); without it a built-in paraphrase grades "
                        "and the score is marked not comparable with published scores")
    g.add_argument("--rules", default=None, metavar="FILE",
                   help="LLaVA-Bench: your copy of LLaVA's llava/eval/table/rule.json (official: its llava_bench_* "
                        "rules); without it a built-in rule grades, marked not comparable")
    g.add_argument("--judge-system", default=None, metavar="FILE",
                   help="LLaVA-Bench: a text file holding the system message of LLaVA's eval_gpt_review_bench.py "
                        "(official; not in rule.json; a trailing newline is dropped); without it a built-in one, "
                        "marked not comparable")
    g.add_argument("--judge-cache", default="runs/eval/judge-cache", help="folder of cached judge replies")
    g.add_argument("--judge-retries", type=int, default=5, help="retries after a 429, 5xx or network error")
    g.add_argument("--judge-backoff", type=float, default=2.0, help="seconds before the first retry, doubled each time")
    return g


def judge_from_args(args):
    """chat_completion's settings from the flags, or None without --judge-url."""
    if not args.judge_url:
        return None
    return dict(url=args.judge_url, model=args.judge_model, api_key=os.environ.get("OPENAI_API_KEY"),
                cache_dir=args.judge_cache, retries=args.judge_retries, backoff=args.judge_backoff,
                judge_prompt=args.judge_prompt, llava_rules=args.rules, llava_system=args.judge_system)
