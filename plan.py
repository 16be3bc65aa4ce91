"""
`--plan`: what a run will cost before it is paid for. train_ddp.py and seva.py take the same command line
plus --plan, print this and exit before any weight is read or any process group starts:

    python train_ddp.py --plan --model configs/llava-1.5-7b-hf --lora-r 1024 --lora-alpha 2048 --batch-size 16 \
        --gradient-checkpointing --parallel fsdp --nproc-per-node 8 --gpu-memory 80

The model is built from its config.json on the meta device (no memory, no weights) and LoRA applied as
trainable.prepare_model applies it; the counts come from that model, the per-token costs from plan_costs.py.
Memory is per GPU, for bf16 autocast on CUDA (--precision bf16, the paper's) or fp32. A run "fits" when its
peak stays under 90% of --gpu-memory: the rest is the CUDA context and the allocator's fragmentation.
"""
import os
from dataclasses import replace

import torch

import lora
import plan_costs
import vlm

GiB = 2 ** 30
HEADROOM = 0.9  # of --gpu-memory: CUDA context, allocator fragmentation
PROMPT_TEXT = 64  # text tokens of a LLaVA-1.5 prompt besides the image (system prompt, question), without --pairs
PAPER_PAIRS = 16000  # paper 4.1: 8k textvqa + 8k ocr_vqa instances (fewer pairs after the filter)
PAPER_GLOBAL_BATCH = 128  # the authors: 16 pairs per GPU x 8 GPUs
# Dense bf16 matmul peaks and memory bandwidths the run time is given for (NVIDIA's data sheets).
GPUS = {"A100": (312e12, 2.0e12), "H100": (989e12, 3.35e12)}


# ----------------------------------------------------------------------------- the model, on the meta device
def meta_model(model_dir, lora_r=0, lora_alpha=0.0, lora_dropout=0.0, objective="dpo", train_projector=False,
               train_vision=False):
    """The model of MODEL_DIR/config.json with no storage, LoRA applied and parts frozen as
    trainable.prepare_model does (apply_lora, then freeze_vision, then unfreeze_vision)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model {model_dir}: no config.json (the LLaVA-1.5 configs ship in configs/)")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    vlm.family_of(config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    if lora_r > 0:
        lora.apply_lora(model, lora_r, lora_alpha, lora_dropout)
        vlm.freeze_vision(model, train_projector=train_projector)
    else:
        vlm.freeze_vision(model, train_projector=objective == "sft" or train_projector)
    if train_vision:
        vlm.unfreeze_vision(model)
    return model


def parameter_counts(model):
    """{part: (parameters, trainable)} for the vision tower, the projector, the decoder layers' own weights,
    LoRA, and the rest (embeddings, final norm, lm_head)."""
    row = vlm.spec(model)
    prefixes = {"vision tower": row["vision_tower"] + ".", "projector": row["projector"] + ".",
                "decoder layers": row["decoder_layers"] + "."}
    counts = {part: [0, 0] for part in ("vision tower", "projector", "decoder layers", "LoRA",
                                        "embeddings, norm, lm_head")}
    for name, p in model.named_parameters():
        part = "LoRA" if ".lora_A." in name or ".lora_B." in name else next(
            (part for part, prefix in prefixes.items() if name.startswith(prefix)), "embeddings, norm, lm_head")
        counts[part][0] += p.numel()
        counts[part][1] += p.numel() * p.requires_grad
    return {part: tuple(c) for part, c in counts.items()}


def fsdp_units(model):
    """The modules trainable.wrap shards one by one: each decoder layer, then the root (everything else)."""
    layers = model.get_submodule(vlm.spec(model)["decoder_layers"])
    names = [f"{vlm.spec(model)['decoder_layers']}.{i}" for i in range(len(layers))]
    in_layers = sum(p.numel() for p in layers.parameters())
    return names, sum(p.numel() for p in layers[0].parameters()), sum(p.numel() for p in model.parameters()) - in_layers


# ----------------------------------------------------------------------------- the pairs' lengths
def pair_lengths(args, model, shapes):
    """(longest, mean) (prompt, chosen, rejected) token counts of a pair: measured on --pairs when the file and
    the model folder's tokenizer are there, else the bound --max-length puts on every sequence."""
    bound = shapes.image_tokens + PROMPT_TEXT, args.max_length - shapes.image_tokens - PROMPT_TEXT
    bound = (bound[0], bound[1], bound[1])
    if not (args.data and os.path.isfile(args.data) and vlm.spec(model)["fixed_image_tokens"]):
        return bound, bound, f"no pairs file: every sequence at --max-length {args.max_length} (the bound)", PAPER_PAIRS
    try:
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError):
        return bound, bound, f"{args.model} has no tokenizer: every sequence at --max-length {args.max_length}", \
            PAPER_PAIRS
    import common
    import pairs
    template = vlm.resolve_template(model, args.template)
    extra = shapes.image_tokens - 1  # the <image> placeholder becomes the image's tokens
    count = lambda text: len(processor.tokenizer(text).input_ids)
    rows = []
    for record in common.read_records(args.data):
        prompt = count(vlm.prompt_text(processor, record["question"], template)) + extra
        total = lambda answer: vlm.sequence_length(processor, [(record["question"], answer)], template, extra)
        rejected = max(total(r) for r in pairs.rejected_list(record["rejected"]))
        rows.append((prompt, total(record["chosen"]) - prompt, rejected - prompt))
    rows = [r for r in rows if r[0] + max(r[1], r[2]) <= args.max_length]  # train_ddp.py skips the others
    if not rows:
        raise ValueError(f"{args.data}: no pair fits in --max-length {args.max_length}")
    longest = tuple(max(r[k] for r in rows) for k in range(3))
    mean = tuple(round(sum(r[k] for r in rows) / len(rows)) for k in range(3))
    return longest, mean, f"{len(rows)} pairs of {args.data}", len(rows)


# ----------------------------------------------------------------------------- memory per GPU
def training_memory(counts, shapes, args, world, parallel, gradient_checkpointing, batch, rank_scale=1.0):
    """{line: bytes} per GPU for train_ddp.py, and the peak. rank_scale: LoRA weights scaled (a lower rank)."""
    bf16 = args.precision == "bf16"
    total = sum(c[0] for c in counts.values())
    lora_params = counts["LoRA"][0] * rank_scale
    trainable = sum(c[1] for part, c in counts.items() if part != "LoRA") + lora_params
    frozen = total - counts["LoRA"][0] - sum(c[1] for part, c in counts.items() if part != "LoRA")
    fsdp = parallel == "fsdp" and world > 1
    shard = world if fsdp else 1
    low = bf16 and args.lora_r > 0  # trainable.prepare_model: a bf16 frozen base under LoRA, DDP and FSDP2 alike
    s = replace(shapes, rank=int(shapes.rank * rank_scale), layer_lora=int(shapes.layer_lora * rank_scale))
    g = plan_costs.geometry(args.forward, batch, *args.longest)
    lines = {
        "frozen weights": frozen * (2 if low else 4) / shard,
        "trainable weights (fp32, the masters)": trainable * 4 / shard,
        "gradients (fp32)": trainable * 4 / shard,
        "AdamW states (2 x fp32)": trainable * 8 / shard,
        "DDP gradient buckets": trainable * 4 if parallel == "ddp" and world > 1 else 0,
        "reference copy (full fine-tuning)": total * 4 if args.lora_r == 0 and args.reference == "adapter" else 0,
    }
    # FSDP2 keeps the root unit gathered from forward to backward, and two decoder layers at a time
    gathered = (args.root_params + 2 * args.layer_params) * (2 if low else 4) if fsdp else 0
    autocast = trainable * 2 if bf16 else 0  # autocast's bf16 copies of trainable weights, held to the step's end
    activations = plan_costs.activation_bytes(s, g, bf16, gradient_checkpointing)
    reference = plan_costs.reference_bytes(s, g, bf16) if args.reference == "adapter" else 0
    lines.update({"FSDP gathered units": gathered, "autocast bf16 copies of trainable": autocast,
                  f"activations ({args.forward}, {batch} pairs{', checkpointed' if gradient_checkpointing else ''})":
                      activations, "reference pass (no grad, before the policy)": reference,
                  "AdamW step temporaries": trainable * 4 / shard})
    persistent = sum(list(lines.values())[:6])
    # the reference pass, the policy's forward and backward, and AdamW's step come one after another
    peak = persistent + max(reference + gathered, activations + gathered + autocast, trainable * 4 / shard)
    return lines, peak


def fits(peak, gpu_memory):
    return peak <= HEADROOM * gpu_memory * GiB


def suggestions(counts, shapes, args, world):
    """The first settings, changed one at a time in this order, whose peak fits: gradient checkpointing, FSDP2,
    a halved per-device batch with doubled accumulation (the global batch kept), a halved LoRA rank."""
    settings = dict(parallel=args.parallel if world > 1 else "ddp", gradient_checkpointing=args.gradient_checkpointing,
                    batch=args.batch_size, grad_accum=args.grad_accum, rank_scale=1.0)
    tried = []

    def peak_of(s):
        return training_memory(counts, shapes, args, world, s["parallel"], s["gradient_checkpointing"], s["batch"],
                               s["rank_scale"])[1]

    changes = []
    if not settings["gradient_checkpointing"]:
        changes.append(("--gradient-checkpointing", dict(gradient_checkpointing=True)))
    if world > 1 and settings["parallel"] == "ddp":
        changes.append(("--parallel fsdp", dict(parallel="fsdp")))
    for change, new in changes:
        settings.update(new)
        tried.append((change, peak_of(settings)))
        if fits(tried[-1][1], args.gpu_memory):
            return tried, settings
    while settings["batch"] > 1:
        settings.update(batch=settings["batch"] // 2, grad_accum=settings["grad_accum"] * 2)
        tried.append((f"--batch-size {settings['batch']} --grad-accum {settings['grad_accum']}", peak_of(settings)))
        if fits(tried[-1][1], args.gpu_memory):
            return tried, settings
    while args.lora_r and args.lora_r * settings["rank_scale"] > 8:
        settings.update(rank_scale=settings["rank_scale"] / 2)
        r = int(args.lora_r * settings["rank_scale"])
        tried.append((f"--lora-r {r} --lora-alpha {2 * r}", peak_of(settings)))
        if fits(tried[-1][1], args.gpu_memory):
            return tried, settings
    return tried, None


# ----------------------------------------------------------------------------- the report
def gib(n):
    return f"{n / GiB:8.2f} GiB"


def duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def plan_training(args):
    """train_ddp.py --plan: prints the report; returns its numbers (for the tests)."""
    world = args.nproc_per_node * args.nnodes
    model = meta_model(args.model, args.lora_r, args.lora_alpha, args.lora_dropout, args.objective,
                       args.train_projector, args.train_vision)
    counts = parameter_counts(model)
    shapes = plan_costs.shapes_of(model, vlm.spec(model))
    args.forward = args.pair_forward if not vlm.pair_forward_problem(model, args.pair_forward) else "concatenated"
    units, args.layer_params, args.root_params = fsdp_units(model)
    args.longest, mean, source, pairs = pair_lengths(args, model, shapes)
    parallel = args.parallel if world > 1 else "ddp"
    lines, peak = training_memory(counts, shapes, args, world, parallel, args.gradient_checkpointing, args.batch_size)
    out = [f"plan: {args.model} ({vlm.family_of(model)}), {world} GPU(s) of {args.gpu_memory:g} GiB, {parallel}, "
           f"{args.precision}, LoRA r {args.lora_r} / alpha {args.lora_alpha:g}, pair forward {args.forward}",
           f"lengths: {source}; longest pair: prompt {args.longest[0]} (image {shapes.image_tokens}) + chosen "
           f"{args.longest[1]} + rejected {args.longest[2]} tokens", "",
           f"  {'parameters':26s} {'total':>12s} {'trainable':>12s}"]
    for part, (n, trained) in counts.items():
        out.append(f"  {part:26s} {n / 1e6:10.1f} M {trained / 1e6:10.1f} M")
    total, trainable = (sum(c[k] for c in counts.values()) for k in (0, 1))
    out += [f"  {'all':26s} {total / 1e6:10.1f} M {trainable / 1e6:10.1f} M ({100 * trainable / total:.1f}%)",
            f"  FSDP2 units: {len(units)} decoder layers of {args.layer_params / 1e6:.0f} M + the root of "
            f"{args.root_params / 1e6:.0f} M", "", "memory per GPU (GiB = 2^30 bytes)"]
    out += [f"  {name:52s} {gib(value)}" for name, value in lines.items() if value]
    ok = fits(peak, args.gpu_memory)
    out.append(f"  {'peak':52s} {gib(peak)}   {'FITS' if ok else 'DOES NOT FIT'} in {HEADROOM:.0%} of "
               f"{args.gpu_memory:g} GiB")
    other = "fsdp" if parallel == "ddp" else "ddp"
    if world > 1:
        peak_with = lambda parallel, checkpointing: gib(training_memory(
            counts, shapes, args, world, parallel, checkpointing, args.batch_size)[1]).strip()
        out.append(f"  (with --parallel {other}: {peak_with(other, args.gradient_checkpointing)}; gradient "
                   f"checkpointing {'off' if args.gradient_checkpointing else 'on'}: "
                   f"{peak_with(parallel, not args.gradient_checkpointing)})")
    recommended = None
    if not ok:
        tried, recommended = suggestions(counts, shapes, args, world)
        out.append("  to fit, one change after another:")
        out += [f"    + {change:44s} {gib(value)}" for change, value in tried]
        out.append("  none of these fits" if recommended is None else "  (the last line fits)")
    global_batch = args.batch_size * args.grad_accum * world
    steps = args.max_steps or int(args.epochs * (pairs // global_batch))
    g = plan_costs.geometry(args.forward, args.batch_size, *mean)
    step = plan_costs.step_flops(shapes, g, reference=args.reference == "adapter", lora=args.lora_r > 0) \
        * args.grad_accum * world
    batch = recommended["batch"] if recommended else args.batch_size
    if global_batch != PAPER_GLOBAL_BATCH and PAPER_GLOBAL_BATCH % (batch * world) == 0:
        out.append(f"  global batch {global_batch}; the paper's {PAPER_GLOBAL_BATCH}: --batch-size {batch} "
                   f"--grad-accum {PAPER_GLOBAL_BATCH // (batch * world)} (accumulation adds no memory)")
    out += ["", f"FLOPs: {step / 1e15:.1f} PFLOP per step of {global_batch} pairs (mean pair: prompt {mean[0]} + "
                f"{mean[1]} + {mean[2]}), {steps} steps over {pairs} pairs x {args.epochs:g} epoch(s)"]
    for gpu, (flops, _) in GPUS.items():
        seconds = step / (world * flops * args.mfu)
        out.append(f"  {gpu}-class ({flops / 1e12:.0f} TFLOP/s bf16) at MFU {args.mfu:g}: {seconds:.1f} s/step, "
                   f"run {duration(seconds * steps)}")
    print("\n".join(out), flush=True)
    return dict(counts=counts, lines=lines, peak=peak, fits=ok, recommended=recommended, step_flops=step,
                steps=steps, shapes=shapes, units=units, args=args)


def plan_generation(args):
    """seva.py --plan: weights and KV cache per GPU, FLOPs per instance, and the time of the pairs."""
    world = args.nproc_per_node * args.nnodes
    model = meta_model(args.model)
    counts = parameter_counts(model)
    shapes = plan_costs.shapes_of(model, vlm.spec(model))
    total = sum(c[0] for c in counts.values())
    weight_bytes = 2 if args.precision == "bf16" else 4
    prompt = shapes.image_tokens + PROMPT_TEXT
    length = min(prompt + args.max_new_tokens, args.max_length)
    cache = plan_costs.kv_cache_bytes(shapes, args.batch_size, length, weight_bytes)
    held = cache if args.reference_logps else 0  # the prompts' cache kept while the rejected answers decode
    rows = args.prefill_batch_size or args.batch_size
    prefill = rows * prompt * (4 * shapes.hidden + 3 * shapes.intermediate) * weight_bytes \
        + args.batch_size * shapes.vocab * 4
    lines = {"weights": total * weight_bytes, f"KV cache ({args.batch_size} x {length} tokens)": cache,
             "prompt cache held (--reference-logps)": held, f"prefill working set ({rows} rows)": prefill}
    peak = sum(lines.values())
    instances = args.num_samples or PAPER_PAIRS
    flops = plan_costs.generation_flops(shapes, prompt, args.max_new_tokens) * args.num_negatives
    out = [f"plan: seva.py on {args.model}, {world} GPU(s) of {args.gpu_memory:g} GiB, batch {args.batch_size}, "
           f"answers up to {args.max_new_tokens} tokens", "", "memory per GPU"]
    out += [f"  {name:52s} {gib(value)}" for name, value in lines.items() if value]
    ok = fits(peak, args.gpu_memory)
    out.append(f"  {'peak':52s} {gib(peak)}   {'FITS' if ok else 'DOES NOT FIT'} in {HEADROOM:.0%} of "
               f"{args.gpu_memory:g} GiB")
    if not ok:
        per_row = plan_costs.kv_cache_bytes(shapes, 1, length, weight_bytes) * (2 if args.reference_logps else 1)
        room = HEADROOM * args.gpu_memory * GiB - total * weight_bytes - prefill
        out.append(f"  fits with --batch-size {max(0, int(room // per_row))}" if room > per_row
                   else "  the weights alone do not fit: more GPUs do not help (seva.py keeps a whole model per GPU)")
    out += ["", f"FLOPs: {flops / 1e12:.1f} TFLOP per instance (two prefills of {prompt} tokens and two answers of "
                f"{args.max_new_tokens}, the bound), {instances} instances"]
    for gpu, (peak_flops, bandwidth) in GPUS.items():
        compute = flops / (peak_flops * args.mfu)
        # decoding reads every weight and the cache once per token for the whole batch: bandwidth-bound
        decode = 2 * args.max_new_tokens * (total * weight_bytes + cache / 2) / bandwidth / args.batch_size
        seconds = max(compute, decode)
        out.append(f"  {gpu}-class: {seconds:.2f} s per instance ({'memory' if decode > compute else 'compute'}"
                   f"-bound), {duration(seconds * instances / world)} for all")
    print("\n".join(out), flush=True)
    return dict(counts=counts, lines=lines, peak=peak, fits=ok, flops=flops)


# ----------------------------------------------------------------------------- the flags
def add_arguments(parser):
    """The flags that stand for the machine under --plan (train_ddp.py and seva.py)."""
    g = parser.add_argument_group("plan (print what the run will cost, then exit; reads config.json only)")
    g.add_argument("--plan", action="store_true", help="print memory per GPU, FLOPs and run time, and exit")
    g.add_argument("--nproc-per-node", type=int, default=1, help="GPUs per machine the run will use")
    g.add_argument("--nnodes", type=int, default=1, help="machines the run will use")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (80: A100/H100-80GB; H200: 141)")
    g.add_argument("--mfu", type=float, default=0.3,
                   help="model-FLOPs utilisation assumed for the run time (0.3: as LoRA-DPO with gradient "
                        "checkpointing recomputes a forward (a third more work than the model FLOPs) on dense "
                        "7B training that reaches ~0.4 of the bf16 peak)")
