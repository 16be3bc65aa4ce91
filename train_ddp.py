"""
Training on torchrun: supervised fine-tuning (how the toy world's LLaVA is made) and, later, SeVa's DPO.

One process:   python train_ddp.py --objective sft --data toy/sft.json --out runs/sft
N processes:   torchrun --standalone --nproc_per_node=N train_ddp.py ...   (gloo on CPU, NCCL on GPUs)

Distributed is switched on by torchrun's environment variables alone (RANK, WORLD_SIZE, LOCAL_RANK).
A step consumes one global batch = per-device batch x gradient accumulation x world size, always the
same examples in the same order for a given seed, so 1 process and N processes train the same model.
"""
import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import vlm


# ----------------------------------------------------------------------------- init
def compute_init(seed=0):
    """Read torchrun's environment; return (rank, world_size, device). One place for 1 CPU or N GPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    return rank, world_size, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autocast_dtype(device, precision):
    """bf16 autocast on CUDA with support, fp32 on CPU. fp16 is refused: we run no loss scaler."""
    if precision == "fp16":
        raise ValueError("fp16 is not supported (no loss scaler); use bf16 on GPUs or fp32")
    if precision == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "bf16" and device.type == "cuda":
        raise ValueError("this GPU has no bf16; use --precision fp32")
    return None  # fp32: no autocast


# ----------------------------------------------------------------------------- data
def read_records(path):
    """A LLaVA-665k style json list, or a jsonl file of records; errors name the file and line."""
    with open(path) as f:
        if path.endswith(".jsonl"):
            records = []
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: malformed json line: {e}") from e
            return records
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed json: {e}") from e


def sft_turns(record):
    """[(question, answer), ...] of a LLaVA-665k record, the `<image>` placeholder removed."""
    conversations = record["conversations"]
    return [(human["value"].replace("<image>", "").strip(), gpt["value"])
            for human, gpt in zip(conversations[0::2], conversations[1::2])]


class SFTDataset(torch.utils.data.Dataset):
    """LLaVA-665k records tokenized on demand: labels cover the answers and their end-of-turn tokens."""

    def __init__(self, records, image_folder, processor, template, max_length, cache=False):
        self.records, self.image_folder = records, image_folder
        self.processor, self.template, self.max_length = processor, template, max_length
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        record = self.records[index]
        image = vlm.load_image(os.path.join(self.image_folder, record["image"]))
        example = vlm.encode(self.processor, image, sft_turns(record), self.template)
        if len(example["input_ids"]) > self.max_length:
            raise ValueError(f"record {record.get('id', index)} has {len(example['input_ids'])} tokens, "
                             f"more than --max-length {self.max_length}")
        if self.cache is not None:
            self.cache[index] = example
        return example


def collate(examples, pad_token_id):
    """Right-pad a list of encoded examples into a batch."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_token_id),
             "labels": torch.full((len(examples), length), -100),
             "attention_mask": torch.zeros(len(examples), length, dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = e["input_ids"], e["labels"], 1
    for key in examples[0]:
        if key not in batch:  # image tensors: pixel_values (and what other families need)
            batch[key] = torch.cat([e[key] for e in examples])
    return batch


def global_batches(num_examples, global_batch, num_steps, seed):
    """The example indices of every optimizer step: a seeded permutation per epoch, last partial batch dropped."""
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_examples} examples are fewer than one global batch ({global_batch})")
    for step in range(num_steps):
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        yield order[position * global_batch:(position + 1) * global_batch].tolist()


def rank_micro_batches(indices, rank, world_size, accumulation):
    """Split one global batch into this rank's micro-batches (rank-major: rank r gets a contiguous slice)."""
    per_rank = len(indices) // world_size
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    micro = per_rank // accumulation
    return [mine[i * micro:(i + 1) * micro] for i in range(accumulation)]


# ----------------------------------------------------------------------------- losses
def sft_token_losses(model, batch):
    """Summed next-token loss over the answer tokens of a batch, and the number of those tokens."""
    labels = batch.pop("labels")
    logits = model(**batch).logits  # (B, T, V)
    shifted = labels[:, 1:]  # (B, T-1): token t is predicted from position t-1
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, int((shifted != -100).sum())


def lr_lambda(warmup_steps, total_steps):
    """Linear warmup, then cosine decay to 0 (the authors' schedule)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------- saving
def save_model_atomic(model, processor, out_dir):
    """save_pretrained into a temporary folder, then rename: a crash never leaves half a model."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------- the loop
def train(args):
    """Train as args say; returns the trained model (unwrapped) on rank 0's device."""
    rank, world_size, device = compute_init(args.seed)
    amp_dtype = autocast_dtype(device, args.precision)
    global_batch = args.batch_size * args.grad_accum * world_size
    if args.global_batch and args.global_batch != global_batch:
        raise ValueError(f"--global-batch {args.global_batch} != batch {args.batch_size} x accumulation "
                         f"{args.grad_accum} x world size {world_size} = {global_batch}")

    model, processor = vlm.load(args.model, device)
    vlm.freeze_vision(model, train_projector=True)  # SFT trains projector + language model, as LLaVA
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    records = read_records(args.data)
    dataset = SFTDataset(records, args.image_folder, processor, args.template, args.max_length, args.cache_data)
    num_steps = args.max_steps or int(len(dataset) * args.epochs) // global_batch
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(math.ceil(args.warmup_ratio * num_steps), num_steps))
    pad_id = processor.tokenizer.pad_token_id
    print0(f"training {num_steps} steps of {global_batch} examples ({world_size} process(es), "
           f"{sum(p.numel() for p in params):,} trainable parameters)")

    os.makedirs(args.out, exist_ok=True)
    metrics_file = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    progress = tqdm(total=num_steps, disable=rank != 0 or not args.progress, desc="train")
    model.train()
    for step, indices in enumerate(global_batches(len(dataset), global_batch, num_steps, args.seed)):
        t0 = time.time()
        micro_batches = rank_micro_batches(indices, rank, world_size, args.grad_accum)
        batches = [collate([dataset[i] for i in micro], pad_id) for micro in micro_batches]
        # The loss is a mean over the answer tokens of the whole global batch, so the gradient does
        # not depend on how the batch is split over ranks and micro-steps.
        num_tokens = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        if world_size > 1:
            dist.all_reduce(num_tokens)
        loss_sum = 0.0
        for micro_step, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = micro_step == len(batches) - 1
            sync = nullcontext() if (last or world_size == 1) else model.no_sync()  # sync grads once
            with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = sft_token_losses(model, batch)
                # DDP averages gradients over ranks; multiply by world_size to get the global mean.
                (loss * world_size / num_tokens.item()).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_total = torch.tensor(loss_sum)
        if world_size > 1:
            dist.all_reduce(loss_total)
        row = {"step": step + 1, "loss": loss_total.item() / num_tokens.item(), "lr": scheduler.get_last_lr()[0],
               "grad_norm": float(grad_norm), "tokens_per_s": num_tokens.item() / (time.time() - t0)}
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        progress.set_postfix(loss=f"{row['loss']:.3f}")
        progress.update()
    progress.close()

    unwrapped = model.module if world_size > 1 else model
    if rank == 0:
        save_model_atomic(unwrapped, processor, os.path.join(args.out, "model"))
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        metrics_file.close()
    if world_size > 1:
        dist.barrier()
    return unwrapped


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--objective", default="sft", choices=["sft"], help="what to train: sft (supervised fine-tuning)")
    g.add_argument("--model", default="toy/model-sft", help="local HF model folder to start from")
    g.add_argument("--data", default="toy/sft.json", help="LLaVA-665k format json (sft)")
    g.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    g.add_argument("--template", default="llava_v1", choices=vlm.TEMPLATES,
                   help="prompt template: llava_v1 (the authors') or the processor's chat template")
    g.add_argument("--max-length", type=int, default=2048, help="longest sequence in tokens (paper: 2048)")
    g.add_argument("--cache-data", action="store_true", help="keep tokenized examples in memory (small data sets)")
    g.add_argument("--out", default="runs/sft", help="output folder: metrics.jsonl, model/, args.json")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=16, help="examples per device per micro-step (paper: 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--global-batch", type=int, default=0,
                   help="if set, checked against batch x accumulation x world size (paper: 128)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (paper: 1)")
    g.add_argument("--max-steps", type=int, default=0, help="if set, train exactly this many steps")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (LLaVA SFT: 2e-5)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="warmup fraction of the steps (paper: 0.03)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (paper: 1.0)")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"],
                   help="bf16 autocast on CUDA (paper: bf16); CPUs always run fp32; fp16 is refused")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (paper: on)")
    g.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    train(args)
    if dist.is_initialized():
        dist.destroy_process_group()
