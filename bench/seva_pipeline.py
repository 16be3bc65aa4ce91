"""
Benchmark: what a user pays for, the whole of SeVa per kept pair (Alg. 1: the pairs of every instance, line 3's
filter, then one DPO epoch on the kept pairs), the project's way against the authors' way, in one run, on a random
LLaVA at LLaVA-1.5's proportions.

    python bench/seva_pipeline.py                 # ~20 minutes on 2 idle CPU cores (needs toy/: python -m toyworld)
    python bench/seva_pipeline.py --pairs 40 --kept 40 --batch-size 20 --global-batch 8 --rounds 1
    python bench/drafting.py                      # the toy world's model on its pool: drafting's forwards and time

The authors' way: every answer generated alone (batch 1), chosen on the image and rejected under diffusion
noise; DPO with the concatenated forward (2B padded sequences) and the reference computed on the fly (the
model with LoRA off) in every step.
The project's way: seva.py's `answer_chunk` on batches of --batch-size, the prompts read --prefill-batch-size at
a time (each layer's activations stay small) and decoded together, the rejected answers drafted by the chosen
ones (draft.py), which also scores both answers under the model on the original image (--reference-logps: the
chosen answer's log-probs from its own generation, the rejected one's by continuing the prompt's KV cache); DPO
with --forward (default shared_prefix: one sequence per pair, the prompt once), micro-batches cut to
--max-tokens-per-batch packed tokens, and the reference from the pairs (train_ddp.py --reference pairs: no
reference forward). "undrafted" is the project's pairs stage without drafting (seva.py --no-draft).
`--forward packed` puts every pair of a micro-batch in one row: no padding, but SDPA then computes the row's
whole attention square under its block-diagonal mask, (sum of the pairs' lengths)^2 instead of the sum of their
squares.

The model: a random LLaVA built from configs (no hub): 96 px images in 4 px patches = 576 image tokens, CLIP 128
wide x 2 layers, Llama 256 wide x 4 layers, LoRA r 16 (as bench/dpo_step.py), the toy world's tokenizer; the
pairs are made by the model with LoRA off (the SFT model, as seva.py loads it). A random model's answers mean
nothing and never end, so they are scripted (bench/scripted.py: a logits processor puts the script's token on
top of the model's own logits, in generate and in draft.py alike): the questions are the toy world's pool questions
(textvqa captions and ocr_vqa reading, seva.py's subsets), each chosen answer the pool's true answer to its
question, each rejected answer the chosen one again except in --kept percent of the instances (the main command
keeps ~20%), where its second half is another answer's. Every answer of every way must be identical (checked
every round).

Measured in this one run: a warm-up pass of every way first (under torch's FlopCounterMode: the FLOPs per kept
pair, matmuls, convolutions and attention, the CPU's flash-attention kernel counted as torch counts the GPU's),
then --rounds rounds alternating the order, each after measuring the fp32 matmul peak (bench/measure.py's, on
2048 squares): wall time per kept pair (median of rounds) of each stage, its share, its time over its FLOPs' time
at that round's peak ("x FLOP time": 1 would be every FLOP at the peak), and the ratios (medians of the
per-round ratios); the time spent in generate.py's generate and draft.py's drafted_generate while the pairs are
made gives the batching speed-up; the forwards that decode the rejected answers with and without drafting; our
DPO stage against the bare step (the same pairs encoded before the epoch, 2 per forward, as bench/dpo_step.py).
Not a test: numbers from a shared machine move by +-30%; the ratios much less.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before the imports: bench/ holds a generate.py of its own

import torch  # noqa: E402

import collate  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import lora  # noqa: E402
import seva  # noqa: E402
from toyworld import model as toymodel  # noqa: E402
import train_ddp  # noqa: E402
import vlm  # noqa: E402
from measure import matmul_peak, timed, torch_flops  # noqa: E402  (bench/measure.py)
from scripted import Scripted, instances  # noqa: E402  (bench/scripted.py)


# ----------------------------------------------------------------------------- the model
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


# ----------------------------------------------------------------------------- Alg. 1 lines 1-3, both ways
def pairs_authors(model, processor, rows, chosen, rejected, folder, args):
    """Every answer alone (batch 1), as the authors' scripts: the pairs, without reference log-probs."""
    out = []
    for row, c, r in zip(rows, chosen, rejected):
        model.queue = [[c], [r]]
        settings = seva.AnswerSettings(noise_step=args.noise_step, max_new_tokens=args.max_new_tokens, draft=False)
        out += seva.answer_chunk(model, processor, [row], folder, settings, warn=lambda m: None)
    return out


def pairs_ours(model, processor, rows, chosen, rejected, folder, args, draft=True):
    """seva.py's batches, scoring both answers on the original image as they are made (--reference-logps), the
    rejected answers drafted by the chosen ones (draft.py) unless draft is False (seva.py --no-draft)."""
    out = []
    for start in range(0, len(rows), args.batch_size):
        end = start + args.batch_size
        model.queue = [chosen[start:end], rejected[start:end]]
        settings = seva.AnswerSettings(noise_step=args.noise_step, max_new_tokens=args.max_new_tokens, reference=True,
                                       prefill_batch=args.prefill_batch_size or None, draft=draft)
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


def step_batches(encoded, args, budget, micro=None):
    """Each step's micro-batches: --global-batch pairs in order, cut into `micro` pairs (default --micro-batch, the
    authors' per-device batch) or, with a token budget, to --max-tokens-per-batch packed tokens (train_ddp.py)."""
    micro = micro or args.micro_batch
    steps = []
    for start in range(0, len(encoded) - args.global_batch + 1, args.global_batch):
        indices = list(range(start, start + args.global_batch))
        if budget:
            lengths = {i: data.packed_length(encoded[i]) for i in indices}
            steps.append(data.budget_micro_batches(indices, lengths, args.max_tokens_per_batch))
        else:
            steps.append([indices[i:i + micro] for i in range(0, len(indices), micro)])
    return steps


# ----------------------------------------------------------------------------- CLI
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
    g.add_argument("--pairs", type=int, default=80, help="instances answered, every way all of them (default 80)")
    g.add_argument("--kept", type=float, default=20,
                   help="percent of the instances whose rejected answer differs from the chosen one, the pairs line 3 "
                        "keeps (default 20; the main command keeps ~20%%); the others answer the same on T(I)")
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


# ----------------------------------------------------------------------------- measurement
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
    model = Scripted(raw)
    calls = {"generate": 0.0, "steps": []}  # the time in generate and drafted_generate; the drafted answers' forwards

    def clocked(original, drafted=False):
        def timed_generate(*args, **kwargs):
            start, steps = time.perf_counter(), []
            if drafted:  # the script forced through draft.py's logits processor
                kwargs.update(logits_processor=model.forcing(), steps=steps)
            out = original(*args, **kwargs)
            calls["generate"] += time.perf_counter() - start
            if drafted:
                calls["steps"].append(steps)
            return out
        return timed_generate
    seva.generate, seva.generate_tokens = clocked(seva.generate), clocked(seva.generate_tokens)
    seva.drafted_generate = clocked(seva.drafted_generate, drafted=True)
    optimizer = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=0.0)
    pad = processor.tokenizer.pad_token_id
    folder = tempfile.mkdtemp(prefix="seva-pipeline-")
    rows, chosen, rejected = instances(args, folder, processor.tokenizer)
    make = {"authors": pairs_authors, "ours": pairs_ours,
            "undrafted": lambda *a: pairs_ours(*a, draft=False)}  # ours without drafting: the pairs stage only
    forward = {"authors": dpo.concatenated_forward, "ours": dpo.PAIR_FORWARDS[args.forward]}

    def pairs_of(way):  # (seconds, seconds in generate, the answered rows)
        calls["generate"], calls["steps"] = 0.0, []
        with torch.no_grad(), lora.disable_adapter(raw):  # the SFT model, as seva.py loads it (no LoRA)
            seconds, made = timed(lambda: make[way](model, processor, rows, chosen, rejected, folder, args))
        if reference and answers(made) != answers(reference):
            raise AssertionError(f"{way}: other pairs than the authors' way made")
        return seconds, calls["generate"], made

    def train_of(way, answered, encoded=None):  # encoded: the bare step, on pairs encoded before, 2 per forward
        batches = step_batches(encoded, args, budget=False, micro=2) if encoded else None
        encoded = encoded or encoded_pairs(processor, rows, answered, folder, reference=way == "ours")
        batches = batches or step_batches(encoded, args, budget=way == "ours")
        raw.train()
        dpo_epoch(raw, optimizer, encoded, forward[way], batches, pad)
        raw.eval()

    reference = None
    if args.prefill_only:
        prefill_only(args, pairs_of)
        return
    reference = pairs_of("authors")[2]
    kept = len(encoded_pairs(processor, rows, reference, folder, False))
    count = torch_flops if args.count_flops else lambda fn: (fn(), 0.0)[1]
    counted = {}
    warm = {}
    for way in make:  # the warm-up: a pass of each way, FLOPs counted
        made = {}
        counted[f"pairs {way}"] = count(lambda: made.setdefault("rows", pairs_of(way)[2]))
        warm[way] = made["rows"]
        if way in forward:
            counted[f"dpo {way}"] = count(lambda: train_of(way, made["rows"]))
    pairs_of("ours")  # the drafted forwards of the last warm-up pass of ours, kept below
    drafted_steps = calls["steps"]
    times = {f"{stage} {way}": [] for stage in ("pairs", "generate", "dpo") for way in make}
    peaks = []  # the matmul peak of each round: a busy spell of a shared machine lowers it too
    bare = encoded_pairs(processor, rows, warm["ours"], folder, reference=True)  # for the bare step
    times["bare"] = []
    for round_index in range(args.rounds):
        if args.count_flops:
            peaks.append(matmul_peak(torch.device("cpu"), torch.float32, [2048]))
        for way in (list(make) if round_index % 2 == 0 else list(make)[::-1]):
            seconds, generating, made = pairs_of(way)
            times[f"pairs {way}"].append(seconds)
            times[f"generate {way}"].append(generating)
            line = f"round {round_index + 1}, {way}: pairs {seconds:.1f} s (generate {generating:.1f} s)"
            if way in forward:
                times[f"dpo {way}"].append(timed(lambda: train_of(way, made))[0])
                line += f", DPO {times[f'dpo {way}'][-1]:.1f} s"
            if way == "ours":  # the same step bare: the pairs encoded before, 2 per forward (bench/dpo_step.py)
                times["bare"].append(timed(lambda: train_of(way, made, encoded=bare))[0])
                line += f", the bare step {times['bare'][-1]:.1f} s"
            print(line, flush=True)
    median = {key: statistics.median(values) for key, values in times.items() if values}
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))

    tokens = sum(map(len, chosen)) / len(chosen)
    print(f"{len(rows)} instances, {kept} kept pairs ({args.kept}% asked: the others' rejected answer equals the "
          f"chosen one); chosen answers of {tokens:.1f} tokens on average (the pool's, EOS included); model "
          f"{sum(p.numel() for p in raw.parameters()) / 1e6:.1f} M params; {torch.get_num_threads()} threads; "
          f"median of {args.rounds} rounds; every answer identical in every way; our DPO: {args.forward}, "
          f"{args.max_tokens_per_batch} tokens per micro-batch; undrafted: ours without drafting (seva.py --no-draft)")
    peak = statistics.median(peaks) if peaks else 0.0
    print(f"fp32 matmul peak of this machine in the rounds: {peak / 1e9:.0f} GFLOP/s (median; torch.mm of 2048 "
          f"squares, measured in every round); x FLOP time: the stage's time over its FLOPs' time at that round's "
          f"peak (median of rounds)")
    print("| way | stage | s per kept pair | share | GFLOP per kept pair | x FLOP time |\n|---|---|---|---|---|---|")
    for way in make:
        total = median[f"pairs {way}"] + median.get(f"dpo {way}", 0.0)
        for stage in ("pairs", "dpo") if way in forward else ("pairs",):
            key = f"{stage} {way}"
            gflop = f"{counted[key] / kept / 1e9:.2f}" if args.count_flops else "-"
            flop_time = (f"{statistics.median(t * p / counted[key] for t, p in zip(times[key], peaks)):.1f}"
                         if args.count_flops else "-")
            print(f"| {way} | {stage} | {median[key] / kept:.3f} | {100 * median[key] / total:.0f}% | {gflop} "
                  f"| {flop_time} |")
    answered = 2 * len(rows)  # chosen and rejected
    print(f"generation (the time in generate while making the pairs): batch {args.batch_size} gives "
          f"{per_round('generate authors', 'generate ours'):.2f}x the answers/s of batch 1 "
          f"({answered / median['generate authors']:.1f} -> {answered / median['generate ours']:.1f} answers/s), "
          f"every answer identical")
    steps = [s for batch in drafted_steps for s in batch]
    plain_steps = [len(r) for r in rejected]  # plain greedy decoding: one forward per token
    batched = lambda per_answer: sum(max(per_answer[i:i + args.batch_size])
                                     for i in range(0, len(per_answer), args.batch_size))
    print(f"decoding the rejected answers: {sum(plain_steps) / len(rows):.2f} forwards per answer without drafting, "
          f"{sum(steps) / len(rows):.2f} with ({sum(plain_steps) / sum(steps):.2f}x fewer); forwards per batch of "
          f"{args.batch_size}: {batched(plain_steps)} -> {batched(steps)}; the pairs stage drafted takes "
          f"{per_round('pairs ours', 'pairs undrafted'):.2f}x the time of undrafted")
    print(f"our DPO stage: {per_round('dpo ours', 'bare'):.2f}x the time of the bare step (the same pairs, forward "
          f"and reference, encoded before the epoch, 2 pairs per forward as bench/dpo_step.py)")
    whole = statistics.median((a + b) / (c + d) for a, b, c, d in zip(times["pairs ours"], times["dpo ours"],
                                                                       times["pairs authors"], times["dpo authors"]))
    print(f"whole SeVa per kept pair: {whole:.2f}x the authors' way (pairs {per_round('pairs ours', 'pairs authors'):.2f}x, "
          f"DPO {per_round('dpo ours', 'dpo authors'):.2f}x)")


if __name__ == "__main__":
    common.run_main(lambda: main(parse_args()), "bench/seva_pipeline.py")
