"""
Benchmark: one DPO step of SeVa (reference forward + policy forward/backward + AdamW) with each pair forward
of dpo.py, on a random LLaVA at LLaVA-1.5's proportions: 576 image tokens, ~40 prompt text tokens, short answers.

    python bench/dpo_step.py                                  # the default run: ~3 minutes on 2 CPU cores
    python bench/dpo_step.py --answers 16 --pairs 4 --rounds 5
    python bench/dpo_step.py --width 1024 --layers 8 --pairs 8  # on a GPU (cuda is used when present, bf16 autocast)
    python bench/dpo_step.py --negatives 1,2,4 --answers 16 --forwards concatenated,shared_prefix --no-memory
                                                              # several rejected answers per pair (paper 3.3)
    python bench/dpo_step.py --family qwen2_vl --answers 16 --forwards concatenated,shared_prefix --no-memory
                                                              # at a family's proportions (FAMILY_IMAGE_TOKENS)
    python bench/dpo_step.py --family qwen2_vl --answers 16,64 --flops-only    # the FLOP ratios alone, in seconds

Variants: concatenated (naive: 2B full sequences), shared_image (vision tower once per pair), shared_prefix
(one packed sequence per pair), each with the on-the-fly reference (LoRA disabled) and the precomputed one.
The step is train_ddp.py's own `dpo_micro_step`, then gradient clipping and AdamW. The learning rate is 0 so
every variant and round starts from the same weights: the losses of the variants are compared (max |delta|).
All numbers come from this one run: a warm-up step of every variant first, then the variants alternate
(order reversed every other round); step time is the median of --rounds, "x naive" the median of the per-round
ratios to concatenated with the same reference. With K rejected answers per pair (--negatives) a step scores
B (1 + K) answers; "s per answer" is the step time divided by them. Not a test: CPU numbers are noisy.

Peak memory: on CUDA torch.cuda.max_memory_allocated during the step minus what was allocated before it;
on CPU the same quantity from torch's profiler (every tensor allocation and free during one profiled step,
summed in time order). Both count tensors only (no allocator caching, no Python objects).

FLOPs of a step: counted analytically for the tokens each variant really computes, padding included (the
formula and what it leaves out: bench/step_flops.py). "% matmul peak" divides FLOP/s by the best torch.mm
throughput of large squares, measured first (fp32 on CPU, bf16 on CUDA): a roofline figure.
--check-flops prints torch's FlopCounterMode count beside ours (it agrees within ~1% with --attention eager; it
does not count the CPU sdpa kernel).
"""
import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import collate  # noqa: E402
import common  # noqa: E402
import dpo  # noqa: E402
import lora  # noqa: E402
import train_ddp  # noqa: E402
import trainable  # noqa: E402
import vlm  # noqa: E402
from measure import matmul_peak, peak_memory, timed, torch_flops  # noqa: E402  (bench/measure.py)
from step_flops import linear_weights, step_flops  # noqa: E402  (bench/step_flops.py)

FORWARDS = ("concatenated", "shared_image", "shared_prefix")
# --family: the image tokens one 448 x 448 image (one question, SeVa's use) becomes in each family's released
# checkpoints, which is what sets the shared prefix's gain; the model stays the LLaVA-shaped one below with the
# nearest square number of image tokens (the families' own positions and masks are tested equal to the naive
# forward in tests/test_families.py; their cost is small beside the tokens).
FAMILY_IMAGE_TOKENS = {
    "llava": 576,  # CLIP 336 / 14: 24 x 24, whatever the image
    "llava_next": 2928,  # about; grid 672 x 672: 2 x 2 crops + the whole image, 5 x 576, + 48 row-end tokens
    "llava_onevision": 3693,  # about; SigLIP 384 / 14 = 27 x 27 = 729 a crop: 2 x 2 crops + the whole, + 48 row ends
    "qwen2_vl": 256, "qwen2_5_vl": 256,  # 448 / 14 = 32 x 32 patches, merged 2 x 2
    "qwen3_vl": 196,  # 448 / 16 = 28 x 28 patches, merged 2 x 2
    "internvl": 256,  # one 448 tile (an image of one tile's aspect gets no thumbnail): 32 x 32 pixel-shuffled
    "idefics3": 2873,  # about; resized to 1456 (4 x 364): 4 x 4 crops + the whole image, 17 x 169
    "smolvlm": 1088,  # about; resized to 2048 (4 x 512): 4 x 4 crops + the whole image, 17 x 64
    "paligemma": 256,  # the 224 checkpoints: 16 x 16 (448: 1024)
    "gemma3": 256,  # 896 / 14 = 64 x 64 patches pooled 4 x 4
}
REFERENCES = ("adapter", "precomputed")


# ----------------------------------------------------------------------------- model and batches
def build_model(args, device, with_lora=True):
    """A random LLaVA-1.5 from configs (no hub): CLIP vision tower, MLP projector, Llama; LoRA on, B random."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.vision_width,
                              intermediate_size=4 * args.vision_width, num_hidden_layers=args.vision_layers,
                              num_attention_heads=max(1, args.vision_width // 64))
    text = LlamaConfig(hidden_size=args.width, intermediate_size=int(2.6875 * args.width) // 8 * 8,
                       num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64),
                       vocab_size=args.vocab, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=args.vocab - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(device)
    model.set_attn_implementation(args.attention)
    if not with_lora:
        return model
    lora.apply_lora(model, args.lora_r, 2 * args.lora_r)
    vlm.freeze_vision(model)
    with torch.no_grad():  # policy != reference, so the losses are not all log 2
        for _, module in lora.lora_modules(model):
            module.lora_B.weight.normal_(0, 0.02)
    return model.train()


def make_batch(args, answer_tokens, device, negatives=1):
    """B pairs as collate_pairs makes them: [text, 576 image tokens, text] prompt, then an answer. Chosen
    answers have `answer_tokens` tokens, rejected ones 3/4 of that in every other pair (padding, as real pairs);
    negatives > 1: that many rejected answers per pair, the j-th in every other pair shorter again."""
    generator = torch.Generator().manual_seed(answer_tokens)
    image_tokens = (args.image_size // args.patch_size) ** 2
    image_id, before = args.vocab - 1, args.prompt_tokens * 3 // 4  # system prompt + "USER:" before the image

    def text(n):
        return torch.randint(1, args.vocab - 1, (n,), generator=generator)

    def sequence(prompt, answer, pixel_values):
        return {"input_ids": torch.cat([prompt, answer]), "labels": torch.cat([torch.full_like(prompt, -100), answer]),
                "pixel_values": pixel_values}

    pairs = []
    for i in range(args.pairs):
        prompt = torch.cat([text(before), torch.full((image_tokens,), image_id), text(args.prompt_tokens - before)])
        pixel_values = torch.randn(1, 3, args.image_size, args.image_size, generator=generator)
        lengths = [max(1, answer_tokens * (4 - j % 3) // 4) if (i + j) % 2 else answer_tokens
                   for j in range(1, negatives + 1)]
        rejected = [sequence(prompt, text(n), pixel_values) for n in lengths]
        pairs.append({"chosen": sequence(prompt, text(answer_tokens), pixel_values),
                      "rejected": rejected if negatives > 1 else rejected[0]})
    return {k: v.to(device) for k, v in collate.collate_pairs(pairs, pad_token_id=0).items()}


# ----------------------------------------------------------------------------- one step
def dpo_step(model, optimizer, batch, forward, amp_dtype):
    """train_ddp.py's DPO step on one micro-batch: (summed loss, summed policy chosen log-probs)."""
    with torch.autocast(batch["input_ids"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pairs = collate.split_rows(batch)[0]
        negatives = (batch["input_ids"].shape[0] - pairs) // pairs if "pair_index" in batch else 0
        loss, stats = train_ddp.dpo_micro_step(model, model, None, batch, trainable.pair_forward_for(model, forward),
                                               beta=0.1, max_negatives=negatives)
        (loss / pairs).backward()  # the mean over the pairs
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats["loss"].item(), stats["logps/chosen"].item()


def with_reference(model, batch, amp_dtype):
    """The batch plus precomputed reference log-probs (as train_ddp.py --reference precomputed stores them)."""
    with torch.no_grad(), lora.disable_adapter(model), torch.autocast(
            batch["input_ids"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        chosen, rejected = dpo.concatenated_forward(model, batch)
    return dict(batch, reference_chosen_logps=chosen.float(), reference_rejected_logps=rejected.float())


def reference_memory(model, batch, device, amp_dtype):
    """Peak tensor memory (bytes) of the reference pass (no grad, LoRA off, the naive forward's call) with the KV
    cache transformers keeps by default (use_cache=True, as before dpo.py passed False) and without it, and the
    largest |difference| of their logits (0: the cache buys nothing)."""
    results = {}
    for use_cache in (True, False):
        def reference():
            with torch.no_grad(), lora.disable_adapter(model), torch.autocast(
                    device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                results[use_cache] = model(**dpo.model_inputs(batch), use_cache=use_cache).logits.float()
        reference()  # warm-up
        results[f"peak {use_cache}"] = peak_memory(reference, device)
    return results["peak True"], results["peak False"], float((results[True] - results[False]).abs().max())


def fsdp_load(args):
    """Under torchrun (gloo on CPU): each rank's tensor memory while loading the model for FSDP2 LoRA training and
    after it, the way train_ddp.py loaded it before (every rank reads the whole fp32 model, adds LoRA, then shards)
    and the way it does now (fsdp.load_sharded: meta-device build, sharded, bf16 base, rank 0's broadcast).
    Returns rank 0's table rows. The model: build_model's, saved to --fsdp-load with the toy world's tokenizer."""
    import torch.distributed as dist
    from transformers import AutoTokenizer
    import fsdp
    from toyworld import model as toymodel
    rank, world_size, device = common.compute_init(0)
    folder = args.fsdp_load
    if rank == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        model = build_model(args, torch.device("cpu"), with_lora=False)
        model.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        toymodel.build_processor(tokenizer, args.patch_size, args.image_size).save_pretrained(folder)
    common.barrier(world_size)

    def prepare(model):
        lora.apply_lora(model, args.lora_r, 2 * args.lora_r)
        vlm.freeze_vision(model)

    def before():  # train_ddp.prepare_model + wrap as they were
        model, _ = vlm.load(folder, device, torch.float32)
        prepare(model)
        fsdp.shard(model)
        return model

    ways = {"before: fp32, whole on every rank, then sharded": before,
            "now: bf16 base, meta build, broadcast from rank 0": lambda: fsdp.load_sharded(
                folder, device, torch.bfloat16, prepare, rank)[0]}
    rows = []
    for name, load in ways.items():
        loaded = {}
        peak = peak_memory(lambda: loaded.update(model=load()), device)
        after = fsdp.local_bytes(loaded.pop("model"))
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (peak, after))
        rows += [f"| {name} | {r} | {p / 2**20:.1f} | {a / 2**20:.1f} |" for r, (p, a) in enumerate(gathered)]
    whole = build_model(args, torch.device("cpu"))
    rows.append(f"| the whole model (fp32 base + LoRA), for scale | - | - | {fsdp.local_bytes(whole) / 2**20:.1f} |")
    return rows


# ----------------------------------------------------------------------------- FLOPs
def counted_flops(model, optimizer, batch, forward, amp_dtype):
    """torch's own count of one step (FlopCounterMode), to check step_flops."""
    return torch_flops(lambda: dpo_step(model, optimizer, batch, forward, amp_dtype), cpu_attention=False)


# ----------------------------------------------------------------------------- measurement
def measure(model, optimizer, batch, forwards, args, device, amp_dtype, peak):
    """Every (pair forward, reference) variant on one batch: warm-up, peak memory, alternating timed rounds.
    Returns the table rows."""
    batches = {"adapter": batch, "precomputed": with_reference(model, batch, amp_dtype)}
    variants = [(forward, reference) for forward in forwards for reference in REFERENCES]
    step = {v: (lambda v=v: dpo_step(model, optimizer, batches[v[1]], v[0], amp_dtype)) for v in variants}
    results = {v: step[v]() for v in variants}  # the warm-up; its (loss, logps) are compared below
    memory = {v: peak_memory(step[v], device) if args.memory else float("nan") for v in variants}
    times = {v: [] for v in variants}
    for round_index in range(args.rounds):
        for v in (variants if round_index % 2 == 0 else variants[::-1]):
            times[v].append(timed(step[v], device)[0])
    rows, answer_tokens = [], int((batch["labels"][0] != -100).sum())
    pairs = collate.split_rows(batch)[0]
    answers = batch["input_ids"].shape[0]  # B chosen + R rejected
    negatives = (answers - pairs) // pairs
    for v in variants:
        naive = ("concatenated", v[1]) if "concatenated" in forwards else v  # same reference
        seconds, flops = statistics.median(times[v]), step_flops(model, batch, *v)
        counted = (f" ({counted_flops(model, optimizer, batches[v[1]], v[0], amp_dtype) / 1e9:.2f})"
                   if args.check_flops else "")
        # x naive: the median of the per-round ratios; a round runs the variants back to back, so a slow spell
        # of a shared machine slows both sides of a ratio alike
        ratio = statistics.median(t / t_naive for t, t_naive in zip(times[v], times[naive]))
        loss_delta = abs(results[v][0] - results[naive][0]) / args.pairs
        rows.append(f"| {answer_tokens} | {negatives} | {v[0]} | {v[1]} | {seconds:.3f} | {min(times[v]):.3f} "
                    f"| {1e3 * seconds / answers:.1f} | {ratio:.2f} "
                    f"| {memory[v] / 2**20:.0f} | {memory[v] / memory[naive]:.2f} | {flops / 1e9:.2f}{counted} "
                    f"| {flops / seconds / 1e9:.1f} | {100 * flops / seconds / peak:.0f} | {loss_delta:.1e} |")
    return rows


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("model (LLaVA-1.5-7B: image 336 / patch 14, CLIP 1024 x 24, Llama 4096 x 32)")
    g.add_argument("--image-size", type=int, default=96, help="image side in pixels (LLaVA-1.5: 336)")
    g.add_argument("--patch-size", type=int, default=4, help="(image / patch)^2 image tokens: 96 / 4 = 576 as LLaVA's")
    g.add_argument("--vision-width", type=int, default=128, help="CLIP hidden size (LLaVA-1.5: 1024)")
    g.add_argument("--vision-layers", type=int, default=2, help="CLIP layers (LLaVA-1.5: 24)")
    g.add_argument("--width", type=int, default=256, help="Llama hidden size (LLaVA-1.5-7B: 4096)")
    g.add_argument("--layers", type=int, default=4, help="Llama layers (LLaVA-1.5-7B: 32)")
    g.add_argument("--vocab", type=int, default=1024,
                   help="vocabulary; small so that the lm_head keeps LLaVA's small share of the FLOPs (LLaVA: 32064)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank, alpha = 2r (paper: 1024)")
    g.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    g = p.add_argument_group("batch and measurement")
    g.add_argument("--pairs", type=int, default=2, help="pairs per step (paper: 16 per GPU)")
    g.add_argument("--prompt-tokens", type=int, default=40, help="prompt text tokens besides the image tokens")
    g.add_argument("--answers", default="4,16,64", help="answer lengths in tokens, comma-separated")
    g.add_argument("--forwards", default=",".join(FORWARDS), help="pair forwards to compare, comma-separated")
    g.add_argument("--negatives", default="1",
                   help="rejected answers per pair, comma-separated (seva.py --num-negatives; paper 3.3: K views)")
    g.add_argument("--rounds", type=int, default=5, help="timed rounds per variant, after one warm-up step")
    g.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    g.add_argument("--check-flops", action="store_true", help="also print torch's FlopCounterMode count per variant")
    g.add_argument("--fsdp-load", metavar="FOLDER", default="",
                   help="only measure each rank's memory while loading for FSDP2 and after, the old way and "
                        "fsdp.load_sharded's (run under torchrun; the model is saved to FOLDER first)")
    g.add_argument("--tokenizer", default="toy/model-sft", help="--fsdp-load: the tokenizer saved with the model")
    g.add_argument("--reference-cache", action="store_true",
                   help="only measure the reference pass's peak memory with a KV cache (transformers' default) and "
                        "without (use_cache=False, as dpo.py runs it), for each answer length")
    g.add_argument("--matmul-sizes", default="", help="sides of the squares for the matmul peak, comma-separated "
                                                       "(default: 2048,4096 on CPU, 8192 on CUDA)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--flops-only", action="store_true",
                   help="print each variant's FLOPs (bench/step_flops.py's formula) and their ratio to the naive "
                        "forward's, timing nothing: machine-independent, unlike the times; seconds to run")
    g.add_argument("--family", choices=sorted(FAMILY_IMAGE_TOKENS),
                   help="image tokens per image as this family's (FAMILY_IMAGE_TOKENS; sets --image-size with "
                        "--patch-size 4); default: --image-size and --patch-size as given")
    args = p.parse_args(argv)
    if args.family:
        args.patch_size = 4
        args.image_size = 4 * round(FAMILY_IMAGE_TOKENS[args.family] ** 0.5)
    return args


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = common.compute_dtype(device, "bf16")  # bf16 autocast on CUDA, fp32 on CPU
    forwards = args.forwards.split(",")
    if args.fsdp_load:  # nothing else is measured
        table = fsdp_load(args)
        common.print0(f"FSDP2 load, {os.environ.get('WORLD_SIZE', 1)} processes, width {args.width} x {args.layers} "
                      f"layers, LoRA r {args.lora_r}; tensor bytes per rank (CPU: host = device)\n"
                      "| way | rank | peak MiB while loading | MiB after |\n|---|---|---|---|\n" + "\n".join(table))
        common.finish_distributed()
        sys.exit(0)
    if args.reference_cache:  # nothing else is measured
        model = build_model(args, device)
        print(f"device {device}, {'bf16 autocast' if amp_dtype else 'fp32'}, {args.pairs} pairs, width {args.width} "
              f"x {args.layers} layers; the reference pass (no grad, LoRA off, 2B rows)")
        print("| answer tokens | rows x tokens | peak MiB with cache | peak MiB without | x | cache MiB expected | "
              "max abs dlogits |\n|---|---|---|---|---|---|---|")
        for answer_tokens in [int(a) for a in args.answers.split(",")]:
            batch = make_batch(args, answer_tokens, device)
            with_cache, without, delta = reference_memory(model, batch, device, amp_dtype)
            rows, length = batch["input_ids"].shape
            text = model.config.text_config
            kv_width = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
            expected = 2 * text.num_hidden_layers * kv_width * rows * length * (2 if amp_dtype else 4)  # K and V
            print(f"| {answer_tokens} | {rows} x {length} | {with_cache / 2**20:.1f} | {without / 2**20:.1f} | "
                  f"{without / with_cache:.2f} | {expected / 2**20:.1f} | {delta:.1e} |", flush=True)
        sys.exit(0)
    if args.flops_only:
        model = build_model(args, device)
        print(f"image tokens {(args.image_size // args.patch_size) ** 2}"
              + (f" ({args.family}: {FAMILY_IMAGE_TOKENS[args.family]})" if args.family else "")
              + f", {args.prompt_tokens} prompt text tokens, {args.pairs} pairs\n"
              "| answer tokens | forward | reference | GFLOP | x naive |\n|---|---|---|---|---|")
        for answer_tokens in [int(a) for a in args.answers.split(",")]:
            batch = make_batch(args, answer_tokens, device)
            for reference in REFERENCES:
                naive = step_flops(model, batch, "concatenated", reference)
                for forward in forwards:
                    flops = step_flops(model, batch, forward, reference)
                    print(f"| {answer_tokens} | {forward} | {reference} | {flops / 1e9:.2f} | {flops / naive:.2f} |")
        sys.exit(0)
    sizes = args.matmul_sizes or ("8192" if device.type == "cuda" else "2048,4096")
    peak = matmul_peak(device, amp_dtype or torch.float32, [int(size) for size in sizes.split(",")])
    model = build_model(args, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    n_base, n_lora = linear_weights(model.model.language_model)
    print(f"device {device} ({torch.get_num_threads()} threads), {'bf16 autocast' if amp_dtype else 'fp32'}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s; model {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"params (language linears {n_base / 1e6:.2f} M + LoRA {n_lora / 1e6:.2f} M), "
          f"{args.pairs} pairs per step, {args.rounds} rounds"
          + (f"; {args.family}'s proportions" if args.family else ""), flush=True)

    table = ["| answer tokens | negatives | forward | reference | step s (median) | min s | ms per answer | x naive "
             "| peak MiB | x naive | GFLOP | GFLOP/s | % matmul peak | abs dloss vs naive |", "|---" * 14 + "|"]
    print("\n".join(table), flush=True)
    for negatives in [int(k) for k in args.negatives.split(",")]:
        for answer_tokens in [int(a) for a in args.answers.split(",")]:
            batch = make_batch(args, answer_tokens, device, negatives)
            rows = measure(model, optimizer, batch, forwards, args, device, amp_dtype, peak)
            print("\n".join(rows), flush=True)
            table += rows
    prompt = args.prompt_tokens + (args.image_size // args.patch_size) ** 2
    print(f"\nprompt {prompt} tokens ({args.prompt_tokens} text + image); x naive: against concatenated with the "
          f"same reference; abs dloss: |mean DPO loss - naive's|, fp32 on CPU, bf16 autocast on CUDA")


if __name__ == "__main__":
    common.run_main(lambda: main(parse_args()), "bench/dpo_step.py")
