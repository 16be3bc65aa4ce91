"""
Benchmark: the paper's run at its real shapes on one GPU, against what `--plan` predicts for it.

    python bench/paper_scale.py                  # a random-weight LLaVA-1.5-7B in bf16 on one GPU (~15 GB of weights)
    python bench/paper_scale.py --tiny           # the same script on a tiny LLaVA on CPUs (what the tests run)

The model is configs/llava-1.5-7b-hf/config.json with random weights (no download), the paper's LoRA (r 1024,
alpha 2048 on every linear layer of the language model), the vision tower and projector frozen, the trainable
weights in fp32 and the frozen base in bf16 as trainable.prepare_model makes them, gradient checkpointing, and
the per-device batch that `train_ddp.py --plan` proposes for this GPU's memory (pairs of LLaVA-1.5's shape: 576
image tokens, 64 text tokens of prompt, --answer-tokens per answer). Ten DPO steps (train_ddp.dpo_micro_step with
the shared-prefix pair forward, the reference with LoRA switched off, then AdamW): seconds per step, pairs per
second, peak memory against the plan's estimate, and model-FLOPs utilisation (plan_costs.step_flops over the
step time, against --peak-tflops). Then generation as seva.py runs it, greedy: the authors' batch 1 against
batch 32, answers per second, and how many answers are the same token for token (every prompt has the same
length, so batching adds no padding; bf16 kernels of different batch sizes may still round differently).

Peak memory: on CUDA torch.cuda.max_memory_allocated over the steps (tensors only, all of them); on CPU the
tensors live before a step plus bench/dpo_step.py's profiler peak during one. One table, printed as markdown.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

import common  # noqa: E402
import dpo_step  # noqa: E402
import lora  # noqa: E402
import measure  # noqa: E402
import plan  # noqa: E402
import plan_costs  # noqa: E402
import train_ddp  # noqa: E402
import vlm  # noqa: E402

LLAVA_7B = os.path.join(ROOT, "configs", "llava-1.5-7b-hf")
TINY = dict(text_config=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=512),
            vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=48, patch_size=4), image_token_index=511, image_seq_length=144)


def model_folder(tiny, out):
    """The config folder: the shipped LLaVA-1.5-7B, or a tiny one written into `out`."""
    if not tiny:
        return LLAVA_7B
    config = json.load(open(os.path.join(LLAVA_7B, "config.json")))
    for key, value in TINY.items():
        config[key] = dict(config[key], **value) if isinstance(value, dict) else value
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return out


def build(folder, device, amp_dtype, lora_r):
    """A random model as trainable.prepare_model shapes it (without reading weights)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder),
                                                        dtype=amp_dtype or torch.float32)
    lora.apply_lora(model, lora_r, 2.0 * lora_r)
    vlm.freeze_vision(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 masters, as prepare_model
    with torch.no_grad():  # policy != reference
        for _, module in lora.lora_modules(model):
            module.lora_B.weight.normal_(0, 1e-4)
    vlm.disable_dropout(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def planned(folder, args, gpu_memory):
    """train_ddp.py --plan for one GPU of `gpu_memory` GiB at these pairs' lengths: (report, batch size)."""
    prompt = plan.PROMPT_TEXT + plan.meta_model(folder).config.image_seq_length
    plan_args = train_ddp.parse_args(["--plan", "--model", folder, "--lora-r", str(args.lora_r), "--lora-alpha",
                                      str(2 * args.lora_r), "--batch-size", str(args.batch_size),
                                      "--gradient-checkpointing", "--gpu-memory", f"{gpu_memory:.1f}",
                                      "--max-length", str(prompt + args.answer_tokens), "--pairs", "",
                                      "--precision", "bf16" if torch.cuda.is_available() else "fp32"])
    report = plan.plan_training(plan_args)
    batch = report["recommended"]["batch"] if report["recommended"] else args.batch_size
    return report, batch, prompt


def size(n):
    return f"{n / plan.GiB:.2f} GiB" if n >= plan.GiB else f"{n / 2 ** 20:.1f} MiB"


def live_bytes(model, optimizer):
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def train_steps(model, args, device, amp_dtype, batch_size, prompt):
    """--steps DPO steps (after one warm-up): (s/step, peak bytes, the batch)."""
    shape = dpo_step.parse_args(["--image-size", str(model.config.vision_config.image_size),
                                 "--patch-size", str(model.config.vision_config.patch_size),
                                 "--vocab", str(model.config.image_token_index + 1),  # image id = vocab - 1
                                 "--pairs", str(batch_size),
                                 "--prompt-tokens", str(prompt - model.config.image_seq_length)])
    batch = dpo_step.make_batch(shape, args.answer_tokens, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    step = lambda: dpo_step.dpo_step(model, optimizer, batch, "shared_prefix", amp_dtype)
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = [measure.timed(step, device)[0] for _ in range(args.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = live_bytes(model, optimizer) + measure.peak_memory(step, device)
    return sorted(seconds)[len(seconds) // 2], peak, batch


@torch.no_grad()
def generation(model, args, device, prompt):
    """Greedy answers to --prompts same-length prompts at batch 1 and at --generate-batch: (answers/s each, equal)."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, config.image_token_index, (args.prompts, prompt - config.image_seq_length),
                         generator=generator)
    ids = torch.cat([text[:, :8], torch.full((args.prompts, config.image_seq_length), config.image_token_index),
                     text[:, 8:]], 1).to(device)
    side = config.vision_config.image_size
    pixels = torch.randn(args.prompts, 3, side, side, generator=generator).to(device, model.dtype)
    model.eval()
    results = {}
    for batch in (1, args.generate_batch):
        answers, start = [], time.perf_counter()
        for i in range(0, args.prompts, batch):
            out = model.generate(input_ids=ids[i:i + batch], attention_mask=torch.ones_like(ids[i:i + batch]),
                                 pixel_values=pixels[i:i + batch], max_new_tokens=args.new_tokens, do_sample=False,
                                 min_new_tokens=args.new_tokens)
            answers += out[:, ids.shape[1]:].tolist()
        measure.sync(device)
        results[batch] = (args.prompts / (time.perf_counter() - start), answers)
    same = sum(a == b for a, b in zip(results[1][1], results[args.generate_batch][1]))
    return results[1][0], results[args.generate_batch][0], same


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny LLaVA on CPUs: the script's own test")
    p.add_argument("--lora-r", type=int, default=1024, help="LoRA rank, alpha = 2r (paper: 1024; --tiny: 8)")
    p.add_argument("--batch-size", type=int, default=16, help="per-device batch to plan from (paper: 16)")
    p.add_argument("--answer-tokens", type=int, default=64, help="tokens per answer of the benchmark's pairs")
    p.add_argument("--steps", type=int, default=10, help="timed DPO steps after one warm-up (--tiny: 2)")
    p.add_argument("--prompts", type=int, default=32, help="prompts to answer in the generation part (--tiny: 4)")
    p.add_argument("--generate-batch", type=int, default=32, help="the batched run's batch (seva.py's default 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per generated answer (--tiny: 4)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the GPU's dense bf16 peak for MFU (0: 989 on H100/H200, 312 on A100, else measured)")
    args = p.parse_args(argv)
    if args.tiny:
        args.lora_r, args.steps, args.prompts, args.generate_batch, args.new_tokens = 8, 2, 4, 4, 4
        args.batch_size, args.answer_tokens = 2, 8
    return args


def peak_flops(args, device, amp_dtype):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    for key, value in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("A800", 312e12)):
        if key in name:
            return value
    return measure.matmul_peak(device, amp_dtype or torch.float32, [1024 if args.tiny else 8192])


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    amp_dtype = common.compute_dtype(device, "bf16")
    gpu_memory = torch.cuda.get_device_properties(0).total_memory / plan.GiB if device.type == "cuda" else 8.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.tiny, tmp)
        report, batch_size, prompt = planned(folder, args, gpu_memory)
        model = build(folder, device, amp_dtype, args.lora_r)
    seconds, peak, batch = train_steps(model, args, device, amp_dtype, batch_size, prompt)
    flops = plan_costs.step_flops(report["shapes"], plan_costs.geometry("shared_prefix", batch_size, prompt,
                                                                        args.answer_tokens, args.answer_tokens))
    planned_peak = plan.training_memory(report["counts"], report["shapes"], report["args"], 1, "ddp", True,
                                        batch_size)[1]
    single, batched, same = generation(model, args, device, prompt)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = [("device", name), ("model", f"{'tiny LLaVA' if args.tiny else 'LLaVA-1.5-7B'}, random weights, "
                                        f"LoRA r {args.lora_r}, gradient checkpointing, "
                                        f"{'bf16 autocast' if amp_dtype else 'fp32'}"),
            ("per-device batch (the plan's for this memory)",
             f"{batch_size} pairs of {prompt} + 2 x {args.answer_tokens} tokens"),
            ("s / step (median)", f"{seconds:.3f}"), ("pairs / s", f"{batch_size / seconds:.2f}"),
            ("peak memory, measured", size(peak)),
            ("peak memory, --plan", f"{size(planned_peak)} ({planned_peak / peak:.2f} x measured)"),
            ("MFU", f"{flops / seconds / peak_flops(args, device, amp_dtype):.3f}"),
            ("generation, batch 1", f"{single:.2f} answers / s"),
            (f"generation, batch {args.generate_batch}", f"{batched:.2f} answers / s ({batched / single:.1f}x)"),
            ("same answers", f"{same} / {args.prompts}")]
    print("\n".join(common.markdown_table(["", ""], [list(row) for row in rows])), flush=True)
    return dict(rows)


if __name__ == "__main__":
    main()
