"""
Benchmark: SeVa's rejected answers drafted by the chosen ones (draft.py) against plain greedy decoding, with the
toy world's own model on its own pool, where the answers mean something: a rejected answer equals its chosen one
as often as the main command finds (~80% of the instances are dropped by Alg. 1 line 3).

    python bench/drafting.py                      # ~1 minute on 2 CPU cores (needs toy/: python -m toyworld)
    python bench/drafting.py --instances 1000 --batch-size 64 --rounds 3

seva.py's `answer_chunk` on the pool's textvqa and ocr_vqa instances (seed 0), noise step 500, max 512 new
tokens, batches of --batch-size, --rounds rounds alternating drafted and plain after a warm-up of each: the
forwards that decode each rejected answer (plain greedy decoding: one per token; drafted: draft.py's count), per
answer and per batch (a batch runs until its last answer ends), the pairs stage's time, and every answer checked
the same both ways. Not a test: CPU numbers from a shared machine are noisy; the ratios less.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before the imports: bench/ holds a generate.py of its own

import torch  # noqa: E402

import common  # noqa: E402
import pool  # noqa: E402
import seva  # noqa: E402
import vlm  # noqa: E402


def drafting_on_the_toy_pool(args):
    """The toy world's own model on its pool, as the main command runs seva.py (textvqa and ocr_vqa,
    noise step 500, batch --batch-size): the rejected answers decoded with and without drafting, --rounds
    alternating rounds; the forwards per rejected answer, the pairs stage's time, every answer the same."""
    model, processor = vlm.load(args.model)
    model.eval()
    instances = pool.sample_instances(json.load(open(args.pool)), ["textvqa", "ocr_vqa"], args.instances, 0,
                                      args.pool)[0]
    folder = os.path.join(os.path.dirname(os.path.abspath(args.pool)), "images")
    plain_generate, drafted_generate = seva.generate, seva.drafted_generate
    record = {"plain": [], "drafted": []}  # per batch: each rejected answer's forwards

    def plain(*a, **kwargs):  # the rejected answers' token counts: plain decoding takes a forward per token
        if kwargs.get("pixel_transform") is None:
            return plain_generate(*a, **kwargs)
        answers, ids, _ = seva.generate_tokens(*a, **kwargs)
        record["plain"].append([len(i) for i in ids])
        return answers

    def drafted(*a, **kwargs):
        steps = []
        out = drafted_generate(*a, **kwargs, steps=steps)
        record["drafted"].append(steps)
        return out
    seva.generate, seva.drafted_generate = plain, drafted
    times, made = {"plain": [], "drafted": []}, {}
    for round_index in range(args.rounds + 1):  # round 0: the warm-up
        for way in ("drafted", "plain") if round_index % 2 else ("plain", "drafted"):
            record[way] = []
            start = time.perf_counter()
            with torch.no_grad():
                rows = [row for k in range(0, len(instances), args.batch_size)
                        for row in seva.answer_chunk(model, processor, instances[k:k + args.batch_size], folder,
                                                     seva.AnswerSettings(max_new_tokens=args.max_new_tokens,
                                                                         draft=way == "drafted"), warn=print)]
            seconds = time.perf_counter() - start
            if made.setdefault(way, rows) != rows or made.get("plain", rows) != rows:
                raise AssertionError(f"{way}: other answers than before")
            if round_index:
                times[way].append(seconds)
                print(f"round {round_index}, {way}: pairs {seconds:.1f} s", flush=True)
    seva.generate, seva.drafted_generate = plain_generate, drafted_generate
    equal = sum(r["chosen"] == r["rejected"] for r in made["plain"])
    per_answer = {way: sum(map(sum, record[way])) / len(instances) for way in record}
    per_batch = {way: sum(map(max, record[way])) for way in record}
    ratio = statistics.median(d / p for d, p in zip(times["drafted"], times["plain"]))
    print(f"toy pool, {args.model}: {len(instances)} instances, batches of {args.batch_size}, noise step 500; "
          f"{equal} rejected answers equal their chosen one ({100 * equal / len(instances):.0f}%, dropped by line 3)")
    print(f"rejected answers: {per_answer['plain']:.2f} forwards per answer without drafting, "
          f"{per_answer['drafted']:.2f} with ({per_answer['plain'] / per_answer['drafted']:.2f}x fewer); forwards per "
          f"batch: {per_batch['plain']} -> {per_batch['drafted']} in all; the pairs stage drafted: {ratio:.2f}x the "
          f"time (median of {args.rounds} rounds), every answer identical")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--model", default="toy/model-sft",
                   help="the model that makes the pairs (default: the toy world's SFT, toy/model-sft)")
    p.add_argument("--pool", default="toy/pool.json",
                   help="the pool, its images in the images/ folder beside it (default: toy/pool.json)")
    p.add_argument("--instances", type=int, default=256, help="instances of the pool (default 256; main command: 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="seva.py --batch-size (default 32; main command: 64)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default and authors: 512)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of each way, after one warm-up (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.pool, os.path.join(args.model, "config.json")):
        if not os.path.exists(path):
            raise ValueError(f"{path}: not found; build the toy world first (python -m toyworld)")
    drafting_on_the_toy_pool(args)


if __name__ == "__main__":
    common.run_main(lambda: main(parse_args()), "bench/drafting.py")
