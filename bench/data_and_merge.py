"""
Benchmark: two costs of train_ddp.py beside the step's own math.

    python bench/data_and_merge.py --toy toy                        # both, on the toy world: ~2 minutes
    python bench/data_and_merge.py --toy toy --steps 20 --rounds 5 --no-merge
    python bench/data_and_merge.py --toy toy --width 1024 --layers 8 --no-data   # the merge at a larger scale

1. Data: the share of a step's wall time the training thread spends on the step's data (images processed, tokens,
   batches collated) with --no-prefetch, and waiting for it with --prefetch (the next step's data prepared in a
   background thread while a step computes): train_ddp.py's own setup and loop on the toy world's SFT model and
   pairs made from its SFT data (chosen: the record's answer; rejected: the next record's), --batch-size 8, one
   process, the two alternating over --rounds runs (order reversed every round) after a warm-up of each. "data
   share" = the metrics' data_s summed over the run / the loop's wall time, median over rounds; the first step of
   a prefetching run prepares its own data, as a run without prefetching does. Not a test: CPU numbers are noisy.
2. --merge: the peak host memory of writing OUT/merged/ as export did it before (a fresh fp32 copy of the model
   with LoRA, the trained weights loaded into it, merged there: fp32 on disk) and as it does now
   (export.merged_model: the base read in the dtype it is stored in, fp16 as LLaVA-1.5's, each LoRA layer
   merged in fp32 and cast once to --merge-dtype auto = fp16), on bench/dpo_step.py's random LLaVA (its --width,
   --layers, LoRA r 16 on every linear layer of the language model, B random) saved in fp16. Memory: host memory,
   each way in a fresh process, sampled every 2 ms above the process before the merge (torch, transformers, the
   trained LoRA weights): anonymous memory (what the process holds) and resident memory (that plus the pages of the
   weights file it maps: safetensors loads a model stored in the dtype asked without a copy), and the merged
   folder's size.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import export  # noqa: E402
import lora  # noqa: E402
import train_ddp  # noqa: E402
import vlm  # noqa: E402
from bench import dpo_step  # noqa: E402


# ----------------------------------------------------------------------------- 1. the step's data
def make_pairs(toy, path):
    """Pairs from the toy world's SFT records: chosen its first answer, rejected the next record's."""
    records = json.load(open(os.path.join(toy, "sft.json")))
    with open(path, "w") as f:
        for i, record in enumerate(records):
            other = records[(i + 1) % len(records)]
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            f.write(json.dumps({"id": str(i), "image": record["image"], "question": question,
                                "chosen": record["conversations"][1]["value"],
                                "rejected": other["conversations"][1]["value"]}) + "\n")


def data_share(args, tmp):
    pairs = os.path.join(tmp, "pairs.jsonl")
    make_pairs(args.toy, pairs)
    results = {True: [], False: []}
    for round_index in range(-1, args.rounds):  # round -1: a warm-up, not counted
        for prefetch in (True, False) if round_index % 2 == 0 else (False, True):
            out = os.path.join(tmp, f"run-{round_index}-{prefetch}")
            run_args = train_ddp.parse_args([
                "--model", os.path.join(args.toy, "model-sft"), "--pairs", pairs, "--out", out,
                "--image-folder", os.path.join(args.toy, "images"), "--batch-size", str(args.batch_size),
                "--max-steps", str(args.steps), "--no-progress", "--prefetch" if prefetch else "--no-prefetch"])
            run = train_ddp.setup(run_args)
            start = time.perf_counter()
            train_ddp.loop(run, out, 0, 1, 1.0, progress=False, prefetch=prefetch)
            wall = time.perf_counter() - start
            waited = sum(json.loads(line)["data_s"] for line in open(os.path.join(out, "metrics.jsonl")))
            if round_index >= 0:
                results[prefetch].append((wall / args.steps, waited / wall))
    print(f"\ndata: {args.steps} steps of {args.batch_size} pairs on {args.toy}/model-sft, {args.rounds} rounds")
    print("| prefetch | step s (median) | data share of the step (median) |")
    print("|---|---|---|")
    for prefetch in (False, True):
        step_s = statistics.median(s for s, _ in results[prefetch])
        share = statistics.median(d for _, d in results[prefetch])
        print(f"| {'on' if prefetch else 'off'} | {step_s:.3f} | {share:.1%} |")
    ratio = statistics.median(off[0] / on[0] for on, off in zip(results[True], results[False]))
    print(f"step time off / on: {ratio:.2f} (median of the rounds' ratios)")


# ----------------------------------------------------------------------------- 2. --merge
def merge_memory(args, tmp):
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from toyworld import model as toymodel
    folder = os.path.join(tmp, "base")
    model = dpo_step.build_model(args, torch.device("cpu"))  # LoRA on, B random: the trained weights
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
    save_file(weights, os.path.join(tmp, "lora.safetensors"))
    lora.remove_lora(model)  # back to a plain model (B's update folded in: a random base all the same)
    model.half().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.toy, "model-sft"))
    toymodel.build_processor(tokenizer, args.patch_size, args.image_size).save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    print(f"\n--merge: a random LLaVA of {parameters / 1e6:.1f} M parameters stored in fp16 "
          f"({parameters * 2 / 2**20:.1f} MiB), LoRA r {args.lora_r} "
          f"({sum(v.numel() for v in weights.values()) / 1e6:.1f} M parameters)")
    print("| merge | peak anonymous MiB | peak resident MiB (+ mapped file pages) | merged/ MiB on disk |")
    print("|---|---|---|---|")
    for way in ("before", "now"):  # each in a fresh process: its own high-water mark
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--merge-way", way, "--lora-r",
                                 str(args.lora_r), "--toy", tmp], capture_output=True, text=True, check=True)
        peak = json.loads(result.stdout.strip().splitlines()[-1])
        out = os.path.join(tmp, way)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
        print(f"| {MERGE_WAYS[way]} | {peak['anonymous'] / 2**20:.0f} | {peak['resident'] / 2**20:.0f} | "
              f"{size / 2**20:.0f} |")


MERGE_WAYS = {"before": "before: a fresh fp32 model with LoRA, the weights in, merged there",
              "now": "now: export.merged_model, the base as stored, merged per layer"}


def memory_now():
    """(anonymous, resident) bytes of this process now: memory it holds, and that plus the file pages it maps
    (safetensors' mmap of the weights: clean pages the kernel may drop)."""
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("RssAnon", "VmRSS")))
    return tuple(int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "VmRSS"))


def merge_way(way, tmp, lora_r):
    """In a fresh process: merge tmp/lora.safetensors into tmp/base/ as `way` says, save it to tmp/WAY/, and print
    the peak memory the merge added above the process before it, sampled every 2 ms: anonymous and resident."""
    import threading
    from safetensors.torch import load_file
    folder = os.path.join(tmp, "base")
    weights = load_file(os.path.join(tmp, "lora.safetensors"))
    scales = {name.removesuffix(".lora_A.weight"): 2.0 for name in weights if name.endswith(".lora_A.weight")}
    vlm.load(folder, "cpu", torch.float16)  # transformers' modules imported: not the merge's memory
    start, peak, done = memory_now(), list(memory_now()), threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[:] = [max(p, m) for p, m in zip(peak, memory_now())]
    sampler = threading.Thread(target=sample)
    sampler.start()
    if way == "before":  # export as it was: trainable.prepare_model's fresh fp32 model, the weights in, merged there
        merged, _ = vlm.load(folder, "cpu", torch.float32)
        lora.apply_lora(merged, lora_r, 2 * lora_r)
        merged.load_state_dict(weights, strict=False)
        lora.remove_lora(merged)
    else:
        merged = export.merged_model(folder, weights, scales, "auto", "cpu")
    done.set()
    sampler.join()
    peak = [max(p, m) for p, m in zip(peak, memory_now())]
    merged.save_pretrained(os.path.join(tmp, way))
    print(json.dumps({"anonymous": peak[0] - start[0], "resident": peak[1] - start[1]}))


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", default="toy", help="the toy world (python -m toyworld): its model, images, SFT data "
                                                "(default: toy)")
    p.add_argument("--steps", type=int, default=10, help="training steps per run (default: 10)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="runs with and without prefetching each (default: 3)")
    p.add_argument("--no-data", dest="data", action="store_false", help="skip the data measurement")
    p.add_argument("--no-merge", dest="merge", action="store_false", help="skip the merge measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, torch's)")
    g = p.add_argument_group("--merge's model (bench/dpo_step.py's random LLaVA)")
    for flag, default in (("--width", 512), ("--layers", 4), ("--vision-width", 128), ("--vision-layers", 2),
                          ("--image-size", 96), ("--patch-size", 4), ("--vocab", 1024), ("--lora-r", 16)):
        g.add_argument(flag, type=int, default=default, help=f"(default: {default})")
    p.add_argument("--merge-way", choices=list(MERGE_WAYS), help=argparse.SUPPRESS)  # a child of merge_memory
    args = p.parse_args(argv)
    args.attention = "sdpa"
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge_way:
        merge_way(args.merge_way, args.toy, args.lora_r)
        sys.exit()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data_share(args, tmp)
        if args.merge:
            merge_memory(args, tmp)
