"""
Benchmark: greedy answers one at a time (the authors' way) vs batched with left padding (generate.py).

    python bench/generate.py                          # toy/model-sft, 128 questions of toy/pool.json
    python bench/generate.py --num 256 --batch-size 64 --threads 1

Both variants answer the same questions; the answers must be identical token for token (asserted in
every round). Prints answers/s and generated tokens/s of each and the speed-up, all measured in this
one run: a warm-up first, then the variants alternate (order swapped every round), median of rounds.
Not a test: numbers depend on the machine, and on CPU are noisy (+-30%).
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before the imports: this file's own name would shadow the root generate.py

import torch  # noqa: E402

import common  # noqa: E402
import vlm  # noqa: E402
from generate import generate_tokens  # noqa: E402


def load_questions(data, image_folder, num, pad=True):
    """The first `num` human turns of a LLaVA-665k-format json, with their images."""
    images, questions = [], []
    for record in json.load(open(data)):
        image = vlm.load_image(os.path.join(image_folder, record["image"]), pad=pad)
        for turn in record["conversations"]:
            if turn["from"] == "human" and len(questions) < num:
                images.append(image)
                questions.append(" ".join(turn["value"].replace("<image>", "").split()))
        if len(questions) >= num:
            break
    return images, questions


def timed(model, processor, images, questions, batch_size, args):
    """(seconds, answers, new token ids) of one pass over the questions."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers, ids, _ = generate_tokens(model, processor, images, questions, args.template, args.max_new_tokens, batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, answers, ids


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--model", default="toy/model-sft", help="local HF model folder")
    p.add_argument("--data", default="toy/pool.json", help="LLaVA-665k-format json the questions come from")
    p.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    p.add_argument("--num", type=int, default=128, help="questions answered per variant and round")
    p.add_argument("--batch-size", type=int, default=32, help="the batched variant's batch size (authors: 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (authors: 512)")
    p.add_argument("--template", choices=vlm.TEMPLATES, help="prompt template (default: the model family's)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant, after one warm-up round")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = vlm.load(args.model, device, common.weight_dtype(device, "bf16"))
    model.eval()
    images, questions = load_questions(args.data, args.image_folder, args.num, pad=vlm.pads_to_square(model))
    variants = {"batch size 1 (authors)": 1, f"batched ({args.batch_size})": args.batch_size}

    for batch_size in variants.values():  # warm-up: first calls pay for allocation and kernel choice
        timed(model, processor, images[:8], questions[:8], batch_size, args)
    seconds = {name: [] for name in variants}
    reference = None
    for round_ in range(args.rounds):
        names = list(variants) if round_ % 2 == 0 else list(variants)[::-1]  # alternate: drifts hit both
        for name in names:
            elapsed, answers, ids = timed(model, processor, images, questions, variants[name], args)
            seconds[name].append(elapsed)
            if reference is None:
                reference = (answers, ids)
            elif (answers, ids) != reference:
                first = next(i for i in range(len(ids)) if ids[i] != reference[1][i] or answers[i] != reference[0][i])
                raise AssertionError(f"{name}: question {first} {questions[first]!r} got {answers[first]!r}, "
                                     f"the other variant {reference[0][first]!r}")
    tokens = sum(len(row) for row in reference[1])

    print(f"{len(questions)} questions, {tokens} generated tokens, {args.model} on {device} "
          f"({torch.get_num_threads()} threads), median of {args.rounds} rounds; outputs identical")
    print("| variant | seconds | answers/s | tokens/s |\n|---|---|---|---|")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.3f} | {len(questions) / median:.1f} | {tokens / median:.1f} |")
    one, batched = (statistics.median(times) for times in seconds.values())
    print(f"speed-up of batching: {one / batched:.2f}x")


if __name__ == "__main__":
    common.run_main(lambda: main(parse_args()), "bench/generate.py")
