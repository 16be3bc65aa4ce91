"""
Benchmark: what a user pays for, the whole of SeVa per kept pair (Alg. 1: the pairs, then one DPO epoch on
them), the project's way against the authors' way, in one run, on a random LLaVA at LLaVA-1.5's proportions.

    python bench/seva_pipeline.py                 # ~10 minutes on 2 CPU cores (needs toy/: python -m toyworld)
    python bench/seva_pipeline.py --pairs 32 --batch-size 16 --rounds 3 --no-flops

The authors' way: every answer generated alone (batch 1), chosen on the image and rejected under diffusion
noise; DPO with the concatenated forward (2B padded sequences) and the reference computed on the fly (the
model with LoRA off) in every step.
The project's way: seva.py's `answer_chunk` on batches of --batch-size, the prompts read --prefill-batch-size at
a time (each layer's activations stay small) and decoded together, which also scores both answers under the
model on the original image (--reference-logps: the chosen answer's log-probs from its own generation, the
rejected one's by continuing the prompt's KV cache); DPO with --forward (default shared_prefix: one sequence per
pair, the prompt once), micro-batches cut to --max-tokens-per-batch packed tokens, and the reference from the
pairs (train_ddp.py --reference pairs: no reference forward). `--forward packed` puts every pair of a
micro-batch in one row: no padding, but SDPA then computes the row's whole attention square under its
block-diagonal mask, (sum of the pairs' lengths)^2 instead of the sum of their squares.

The model: a random LLaVA built from configs (no hub): 96 px images in 4 px patches = 576 image tokens, CLIP 128
wide x 2 layers, Llama 256 wide x 4 layers, LoRA r 16 (as bench/dpo_step.py), the toy world's tokenizer.
The questions are the toy world's pool questions (textvqa captions and ocr_vqa reading, seva.py's subsets) and
each answer's length is that of the pool's true answer to it (the open stage's distribution): a random model
never ends an answer by itself, so a logits processor ends answer i with EOS after exactly that many tokens
(the same in both ways). Every answer of the two ways must be identical (checked every round).

Measured in this one run: a warm-up pass of both ways first (under torch's FlopCounterMode: the FLOPs per pair,
matmuls and convolutions; the CPU sdpa attention kernel is not counted), then --rounds rounds alternating the
order: wall time per kept pair (median of rounds) of each stage, its share, and the ratios (medians of the
per-round ratios); the time spent in generate.py's generate while the pairs are made gives the batching speed-up. Not a test: numbers from a shared machine move by +-30%; the ratios much less.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before the imports: bench/ holds a generate.py of its own

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import collate  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import lora  # noqa: E402
import pool  # noqa: E402
import seva  # noqa: E402
from toyworld import model as toymodel  # noqa: E402
import train_ddp  # noqa: E402
import vlm  # noqa: E402


# ----------------------------------------------------------------------------- the model and the instances
def build(args):
    """(model, processor): a random LLaVA-1.5 at LLaVA's proportions with the toy world's tokenizer; LoRA on
    with B = 0, so that the model with LoRA is the SFT model SeVa starts from."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    processor = toymodel.build_processor(tokenizer, args.patch_size, args.image_size)
    vision = CLIPVisionConfig(image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.vision_width,
                              intermediate_size=4 * args.vision_width, num_hidden_layers=args.vision_layers,
                              num_attention_heads=max(1, args.vision_width // 64))
    text = LlamaConfig(hidden_size=args.width, intermediate_size=int(2.6875 * args.width) // 8 * 8,
                       num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64),
                       vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_seq_length=(args.image_size // args.patch_size) ** 2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    lora.apply_lora(model, args.lora_r, 2 * args.lora_r)
    vlm.freeze_vision(model)
    return model.eval(), processor


def instances(args, folder, tokenizer):
    """--pairs instances of the pool as seva.py samples them (textvqa and ocr_vqa, seed 0), a random image each
    (written to `folder`), and answer lengths in tokens (+ EOS): the chosen answer's is that of the pool's true
    answer to the question, the rejected one's that of the next instance's answer, one token longer where the
    two would be equal, so that every pair is kept (as line 3 keeps only pairs whose answers differ)."""
    rows = pool.sample_instances(json.load(open(args.pool)), ["textvqa", "ocr_vqa"], args.pairs, 0, args.pool)[0]
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        row["image"] = f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)).save(
            os.path.join(folder, row["image"]))
    chosen = [len(tokenizer(row["answer"], add_special_tokens=False).input_ids) + 1 for row in rows]
    rejected = [n + (n == c) for c, n in zip(chosen, chosen[1:] + chosen[:1])]
    return rows, chosen, rejected


class ForcedLengths:
    """The model, whose every generate call ends answer i with EOS after exactly lengths[i] tokens (and never
    before): `queue` holds the lengths of each coming generate call, in call order."""

    def __init__(self, model, eos):
        self.model, self.eos, self.queue = model, eos, []

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def generate(self, **kwargs):
        from transformers import LogitsProcessorList
        lengths, prompt, eos = torch.tensor(self.queue.pop(0)), kwargs["input_ids"].shape[1], self.eos

        def force(input_ids, scores):  # (B, prompt + t), (B, V): token t of each answer comes next
            ends = lengths == input_ids.shape[1] - prompt + 1  # (B,)
            scores[:, eos] = torch.where(ends, torch.finfo(scores.dtype).max, torch.finfo(scores.dtype).min)
            return scores
        return self.model.generate(**kwargs, logits_processor=LogitsProcessorList([force]))


# ----------------------------------------------------------------------------- Alg. 1 lines 1-3, both ways
def pairs_authors(model, processor, rows, chosen_lengths, rejected_lengths, folder, args):
    """Every answer alone (batch 1), as the authors' scripts: the pairs, without reference log-probs."""
    out = []
    for row, c, r in zip(rows, chosen_lengths, rejected_lengths):
        model.queue = [[c], [r]]
        settings = seva.AnswerSettings(noise_step=args.noise_step, max_new_tokens=args.max_new_tokens)
        out += seva.answer_chunk(model, processor, [row], folder, settings, warn=lambda m: None)
    return out


def pairs_ours(model, processor, rows, chosen_lengths, rejected_lengths, folder, args):
    """seva.py's batches, scoring both answers on the original image as they are made (--reference-logps)."""
    out = []
    for start in range(0, len(rows), args.batch_size):
        end = start + args.batch_size
        model.queue = [chosen_lengths[start:end], rejected_lengths[start:end]]
        settings = seva.AnswerSettings(noise_step=args.noise_step, max_new_tokens=args.max_new_tokens, reference=True,
                                       prefill_batch=args.prefill_batch_size or None)
        out += seva.answer_chunk(model, processor, rows[start:end], folder, settings, warn=lambda m: None)
    return out


# ----------------------------------------------------------------------------- Alg. 1 line 4, both ways
def encoded_pairs(processor, rows, answered, folder, reference):
    """The kept pairs as train_ddp.py encodes them (the reference log-probs with them, where asked)."""
    kept = []
    for row, pair in zip(rows, answered):
        if seva.same_answer(pair["chosen"], pair["rejected"]):
            continue
        image = vlm.load_image(os.path.join(folder, row["image"]))
        encoded = collate.encode_pair(processor, image, row["question"], pair["chosen"], pair["rejected"], "llava_v1")
        if reference:
            encoded.update(reference_chosen_logps=pair["reference_chosen_logps"],
                           reference_rejected_logps=pair["reference_rejected_logps"])
        kept.append(encoded)
    return kept


def dpo_epoch(model, optimizer, encoded, forward, micro_batches, pad):
    """One epoch of train_ddp.py's DPO step over the pairs: each global batch of --global-batch pairs, its
    micro-batches, backward, clipping, AdamW. Learning rate 0: every round starts from the same weights."""
    for batch_pairs in micro_batches:
        for micro in batch_pairs:
            batch = collate.collate_pairs([encoded[i] for i in micro], pad)
            loss, _ = train_ddp.dpo_micro_step(model, model, None, batch, forward, beta=0.1)
            (loss / sum(len(m) for m in batch_pairs)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def step_batches(encoded, args, budget):
    """Each step's micro-batches: --global-batch pairs in order, cut into --micro-batch pairs (the authors'
    per-device batch) or, with a token budget, to --max-tokens-per-batch packed tokens (train_ddp.py)."""
    steps = []
    for start in range(0, len(encoded) - args.global_batch + 1, args.global_batch):
        indices = list(range(start, start + args.global_batch))
        if budget:
            lengths = {i: data.packed_length(encoded[i]) for i in indices}
            steps.append(data.budget_micro_batches(indices, lengths, args.max_tokens_per_batch))
        else:
            steps.append([indices[i:i + args.micro_batch] for i in range(0, len(indices), args.micro_batch)])
    return steps


# ----------------------------------------------------------------------------- measurement
def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("model (LLaVA-1.5-7B: image 336 / patch 14, CLIP 1024 x 24, Llama 4096 x 32)")
    g.add_argument("--tokenizer", default="toy/model-sft", help="a model folder whose tokenizer is used")
    g.add_argument("--image-size", type=int, default=96, help="image side in pixels (LLaVA-1.5: 336)")
    g.add_argument("--patch-size", type=int, default=4, help="(image / patch)^2 image tokens: 96 / 4 = 576 as LLaVA's")
    g.add_argument("--vision-width", type=int, default=128, help="CLIP hidden size (LLaVA-1.5: 1024)")
    g.add_argument("--vision-layers", type=int, default=2, help="CLIP layers (LLaVA-1.5: 24)")
    g.add_argument("--width", type=int, default=256, help="Llama hidden size (LLaVA-1.5-7B: 4096)")
    g.add_argument("--layers", type=int, default=4, help="Llama layers (LLaVA-1.5-7B: 32)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank, alpha = 2r (paper: 1024)")
    g = p.add_argument_group("SeVa")
    g.add_argument("--pool", default="toy/pool.json", help="the open stage's pool: questions and answer lengths")
    g.add_argument("--pairs", type=int, default=64, help="instances answered (every pair is kept: answers differ)")
    g.add_argument("--noise-step", type=int, default=500, help="diffusion step of the rejected answers")
    g.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (authors: 512)")
    g.add_argument("--batch-size", type=int, default=32, help="the project's generation batch (authors: 1)")
    g.add_argument("--prefill-batch-size", type=int, default=4,
                   help="the project's prompts per prefill forward (seva.py --prefill-batch-size; 0: the whole batch)")
    g.add_argument("--global-batch", type=int, default=16, help="pairs per DPO step, both ways")
    g.add_argument("--micro-batch", type=int, default=8, help="the authors' pairs per forward")
    g.add_argument("--max-tokens-per-batch", type=int, default=8192, help="the project's token budget per forward")
    g.add_argument("--forward", default="shared_prefix", choices=["shared_prefix", "packed"],
                   help="the project's pair forward (train_ddp.py --pair-forward)")
    g = p.add_argument_group("measurement")
    g.add_argument("--rounds", type=int, default=2, help="timed rounds of each way, after one warm-up")
    g.add_argument("--prefill-only", action="store_true",
                   help="instead: our pairs with the prompts read --prefill-batch-size at a time against all at once, "
                        "--rounds alternating rounds in this fresh process (as seva.py runs, no training before)")
    g.add_argument("--no-flops", dest="count_flops", action="store_false", help="skip the FLOP count")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def answers(made):
    """The (chosen, rejected) answers of made pairs, to check that two ways made the same."""
    return [(r["chosen"], r["rejected"]) for r in made]


def prefill_only(args, pairs_of):
    """--prefill-only: our pairs' wall time with the prompts read a few at a time against all at once."""
    rows = args.prefill_batch_size
    times, first = {rows: [], 0: []}, None
    for round_index in range(args.rounds):
        for size in ((rows, 0) if round_index % 2 == 0 else (0, rows)):
            args.prefill_batch_size = size
            seconds, _, made = pairs_of("ours")
            times[size].append(seconds)
            first = first or answers(made)
            if answers(made) != first:  # every run, both sizes, against the first one made
                raise AssertionError("other pairs with the prompts read a few at a time")
            print(f"round {round_index + 1}, prefill {size or 'all'}: pairs {times[size][-1]:.1f} s", flush=True)
    args.prefill_batch_size = rows
    ratio = statistics.median(a / b for a, b in zip(times[rows], times[0]))
    print(f"our pairs with the prompts read {rows} at a time: {ratio:.2f}x the time of all {args.batch_size} at once "
          f"(median of {args.rounds} rounds, answers identical)")


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.pool, os.path.join(args.tokenizer, "tokenizer.json")):
        if not os.path.exists(path):
            raise ValueError(f"{path}: not found; build the toy world first (python -m toyworld)")
    raw, processor = build(args)
    model = ForcedLengths(raw, processor.tokenizer.eos_token_id)
    in_generate = {"seconds": 0.0}  # the time in generate.py's generate: the generation's share of the pairs

    def timed(original):
        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            in_generate["seconds"] += time.perf_counter() - start
            return out
        return timed_generate
    seva.generate, seva.generate_tokens = timed(seva.generate), timed(seva.generate_tokens)
    optimizer = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=0.0)
    pad = processor.tokenizer.pad_token_id
    folder = tempfile.mkdtemp(prefix="seva-pipeline-")
    rows, chosen_lengths, rejected_lengths = instances(args, folder, processor.tokenizer)
    make = {"authors": pairs_authors, "ours": pairs_ours}
    forward = {"authors": dpo.concatenated_forward, "ours": dpo.PAIR_FORWARDS[args.forward]}

    def pairs_of(way):  # (seconds, seconds in generate, the answered rows)
        in_generate["seconds"] = 0.0
        with torch.no_grad():
            seconds, made = timed(lambda: make[way](model, processor, rows, chosen_lengths, rejected_lengths,
                                                    folder, args))
        if reference and answers(made) != answers(reference):
            raise AssertionError(f"{way}: other pairs than the authors' way made")
        return seconds, in_generate["seconds"], made

    def train_of(way, answered):
        encoded = encoded_pairs(processor, rows, answered, folder, reference=way == "ours")
        batches = step_batches(encoded, args, budget=way == "ours")
        raw.train()
        dpo_epoch(raw, optimizer, encoded, forward[way], batches, pad)
        raw.eval()

    reference = None
    if args.prefill_only:
        prefill_only(args, pairs_of)
        return
    reference = pairs_of("authors")[2]
    kept = len(encoded_pairs(processor, rows, reference, folder, False))
    count = flops if args.count_flops else lambda fn: (fn(), 0.0)[1]
    counted = {}
    for way in make:  # the warm-up: a pass of each way, FLOPs counted
        made = {}
        counted[f"pairs {way}"] = count(lambda: made.setdefault("rows", pairs_of(way)[2]))
        counted[f"dpo {way}"] = count(lambda: train_of(way, made["rows"]))
    times = {f"{stage} {way}": [] for stage in ("pairs", "generate", "dpo") for way in make}
    for round_index in range(args.rounds):
        for way in (list(make) if round_index % 2 == 0 else list(make)[::-1]):
            seconds, generating, made = pairs_of(way)
            times[f"pairs {way}"].append(seconds)
            times[f"generate {way}"].append(generating)
            times[f"dpo {way}"].append(timed(lambda: train_of(way, made))[0])
            print(f"round {round_index + 1}, {way}: pairs {seconds:.1f} s (generate {generating:.1f} s), "
                  f"DPO {times[f'dpo {way}'][-1]:.1f} s", flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))

    tokens = sum(chosen_lengths) / len(chosen_lengths)
    print(f"{len(rows)} instances, {kept} kept pairs; chosen answers of {tokens:.1f} tokens on average (the pool's); "
          f"model {sum(p.numel() for p in raw.parameters()) / 1e6:.1f} M params; "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds; every answer identical both ways; "
          f"our DPO: {args.forward}, {args.max_tokens_per_batch} tokens per micro-batch")
    print("| way | stage | s per pair | share | GFLOP per pair |\n|---|---|---|---|---|")
    for way in make:
        total = median[f"pairs {way}"] + median[f"dpo {way}"]
        for stage in ("pairs", "dpo"):
            key = f"{stage} {way}"
            gflop = f"{counted[key] / kept / 1e9:.2f}" if args.count_flops else "-"
            print(f"| {way} | {stage} | {median[key] / kept:.3f} | {100 * median[key] / total:.0f}% | {gflop} |")
    answered = 2 * len(rows)  # chosen and rejected
    print(f"generation (the time in generate while making the pairs): batch {args.batch_size} gives "
          f"{per_round('generate authors', 'generate ours'):.2f}x the answers/s of batch 1 "
          f"({answered / median['generate authors']:.1f} -> {answered / median['generate ours']:.1f} answers/s), "
          f"every answer identical")
    whole = statistics.median((a + b) / (c + d) for a, b, c, d in zip(times["pairs ours"], times["dpo ours"],
                                                                       times["pairs authors"], times["dpo authors"]))
    print(f"whole SeVa per pair: {whole:.2f}x the authors' way (pairs {per_round('pairs ours', 'pairs authors'):.2f}x, "
          f"DPO {per_round('dpo ours', 'dpo authors'):.2f}x)")


if __name__ == "__main__":
    common.run_main(lambda: main(parse_args()), "bench/seva_pipeline.py")
