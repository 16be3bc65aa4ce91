"""
Training on torchrun: SeVa's DPO with LoRA (Alg. 1 line 4), and the supervised fine-tuning that makes
the toy world's LLaVA.

    torchrun --standalone --nproc_per_node=2 train_ddp.py --pairs runs/seva/pairs.jsonl --out runs/dpo
    python train_ddp.py --objective sft --data toy/sft.json --out runs/sft

Distributed is switched on by torchrun's environment variables alone (RANK, WORLD_SIZE, LOCAL_RANK).
A step consumes one global batch = per-device batch x gradient accumulation x world size: always the
same examples for a given seed and step, and a loss normalised over the whole global batch, so 1
process and N processes (DDP or FSDP2) train the same model, and a resumed run the same as an
uninterrupted one.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import dpo
import vlm


# ----------------------------------------------------------------------------- init
def compute_init(seed=0):
    """Read torchrun's environment; return (rank, world_size, device). One place for 1 CPU or N GPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # NCCL for CUDA tensors, gloo for the few CPU tensors (metric sums, gathered objects) we reduce
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    return rank, world_size, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autocast_dtype(device, precision):
    """bf16 autocast on CUDA with support, fp32 on CPU. fp16 is refused: we run no loss scaler."""
    if precision == "fp16":
        raise ValueError("fp16 is not supported (no loss scaler); use bf16 on GPUs or fp32")
    if precision == "bf16" and device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16; use --precision fp32")
        return torch.bfloat16
    return None  # fp32: no autocast


def all_reduce_sum(values, world_size):
    """Sum a list of floats over the ranks."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------- data
def read_records(path):
    """A LLaVA-665k style json list, or a jsonl file of records; errors name the file and line."""
    with open(path) as f:
        if not path.endswith(".jsonl"):
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed json: {e}") from e
        records = []
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: malformed json line: {e}") from e
        return records


def sft_turns(record):
    """[(question, answer), ...] of a LLaVA-665k record, the `<image>` placeholder removed."""
    conversations = record["conversations"]
    return [(human["value"].replace("<image>", "").strip(), gpt["value"])
            for human, gpt in zip(conversations[0::2], conversations[1::2])]


def pair_turns(record):
    """The chosen and rejected conversations of a seva.py pair."""
    return [(record["question"], record["chosen"])], [(record["question"], record["rejected"])]


class TrainDataset(torch.utils.data.Dataset):
    """SFT records or DPO pairs, tokenized on demand (labels: answers + end-of-turn tokens only).

    Examples longer than max_length are reported and skipped up front, never truncated into the image.
    fixed_image_tokens (vlm.FAMILIES): every image makes as many tokens as the first (LLaVA-1.5: 576), so
    the first one is measured; else every example is encoded once up front to measure its own.
    """

    def __init__(self, records, objective, image_folder, processor, template, max_length, cache=False, pad=True,
                 fixed_image_tokens=True):
        self.objective, self.image_folder, self.pad = objective, image_folder, pad
        self.processor, self.template, self.max_length = processor, template, max_length
        self.cache = {} if cache else None
        self.records, self.skipped = [], []
        extra_tokens = None
        quiet = fixed_image_tokens or int(os.environ.get("RANK", 0)) != 0
        for index, record in enumerate(tqdm(records, desc="measuring each image's tokens", disable=quiet)):
            name = record.get("id", index)
            turns = [sft_turns(record)] if objective == "sft" else pair_turns(record)
            example = None
            if extra_tokens is None or not fixed_image_tokens:
                example = self.encode(record, check=False)
                extra_tokens = vlm.image_extra_tokens(processor, example if objective == "sft" else example["chosen"],
                                                      turns[0], template)
            length = max(vlm.sequence_length(processor, t, template, extra_tokens) for t in turns)
            if length > max_length:
                self.skipped.append(name)
                print0(f"skipping {name}: {length} tokens > --max-length {max_length}")
            else:
                if example is not None and self.cache is not None:  # measured by encoding it: keep it
                    self.cache[len(self.records)] = example
                self.records.append(record)

    def encode(self, record, check=True):
        image = vlm.load_image(os.path.join(self.image_folder, record["image"]), pad=self.pad)
        if self.objective == "sft":
            example = vlm.encode(self.processor, image, sft_turns(record), self.template)
            if check:
                self.check_length(record, example)
            return example
        pair = dpo.encode_pair(self.processor, image, record["question"], record["chosen"], record["rejected"],
                               self.template)
        if check:
            self.check_length(record, pair["chosen"], pair["rejected"])
        pair.update({k: record[k] for k in ("reference_chosen_logps", "reference_rejected_logps") if k in record})
        return pair

    def check_length(self, record, *examples):
        length = max(len(e["input_ids"]) for e in examples)
        if length > self.max_length:
            raise ValueError(f"{record.get('id')}: {length} tokens > --max-length {self.max_length}: its image "
                             f"{record['image']} made more tokens than the first image did (is the model's "
                             f"fixed_image_tokens in vlm.FAMILIES right?)")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        example = self.encode(self.records[index])
        if self.cache is not None:
            self.cache[index] = example
        return example

    def collate(self, examples):
        pad = self.processor.tokenizer.pad_token_id
        return dpo.collate(examples, pad) if self.objective == "sft" else dpo.collate_pairs(examples, pad)


def step_indices(step, num_examples, global_batch, seed):
    """The example indices of optimizer step `step`: a seeded permutation per epoch, partial batch dropped."""
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_examples} examples are fewer than one global batch ({global_batch})")
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * global_batch:(position + 1) * global_batch].tolist()


def rank_micro_batches(indices, rank, world_size, accumulation):
    """Split one global batch into this rank's micro-batches (rank r gets a contiguous slice)."""
    per_rank = len(indices) // world_size
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    micro = per_rank // accumulation
    return [mine[i * micro:(i + 1) * micro] for i in range(accumulation)]


# ----------------------------------------------------------------------------- model
def prepare_model(args, device):
    """Load the model, add LoRA (or not), freeze what SeVa never trains. Returns (model, processor).

    LoRA under bf16 autocast with DDP stores the frozen base in bf16: half its memory, and autocast computes
    its matmuls in bf16 anyway; LoRA's weights stay fp32. (FSDP2 wants one dtype per unit: fp32 there.)"""
    amp_dtype = autocast_dtype(device, args.precision)
    low = amp_dtype is not None and args.lora_r > 0 and args.parallel == "ddp"
    model, processor = vlm.load(args.model, device, amp_dtype if low else torch.float32)
    if args.lora_r > 0:
        dpo.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)  # freezes all but LoRA
        vlm.freeze_vision(model, train_projector=args.train_projector)
    else:  # full fine-tuning of the language model (and the projector, as LLaVA's SFT)
        vlm.freeze_vision(model, train_projector=args.objective == "sft" or args.train_projector)
    if args.objective == "dpo":  # paper: dropout off for DPO (it would make the reference noisy)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def wrap(model, args, world_size, device):
    """DDP, or FSDP2 with one unit per decoder layer (bottom-up) and the rest in the root unit."""
    if world_size == 1 and args.parallel == "ddp":
        return model
    if args.parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for layer in vlm.get_module(model, vlm.spec(model)["decoder_layers"]):
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "get_image_features")  # dpo.shared_image_forward calls it outside forward
    return model


def grad_sync(model, last, args, world_size):
    """Synchronise gradients on the last micro-step of a step only."""
    if world_size == 1:
        return nullcontext()
    if args.parallel == "fsdp":
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else model.no_sync()


# ----------------------------------------------------------------------------- losses
def sft_micro_step(model, batch):
    """Summed next-token loss over the answer tokens of a micro-batch."""
    labels = batch.pop("labels")
    logits = model(**batch).logits  # (B, T, V)
    loss = -dpo.sequence_logps(logits, labels).sum()  # next-token cross-entropy, summed over answer tokens
    return loss, {"loss": loss.detach()}


def reference_logps(raw_model, reference_model, batch, pair_forward):
    """Reference log-probs: precomputed in the batch, a frozen copy (full fine-tuning), or the policy
    with its adapters disabled (LoRA: no second model in memory)."""
    if "reference_chosen_logps" in batch:
        return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    with torch.no_grad(), (dpo.disable_adapter(raw_model) if reference_model is None else nullcontext()):
        return pair_forward(raw_model if reference_model is None else reference_model, batch)


def dpo_micro_step(model, raw_model, reference_model, batch, args):
    """Summed DPO loss (Eq. 7) of a micro-batch of pairs, and the summed statistics we log."""
    pair_forward = dpo.PAIR_FORWARDS[args.pair_forward]
    reference_chosen, reference_rejected = reference_logps(raw_model, reference_model, batch, pair_forward)
    policy_chosen, policy_rejected = pair_forward(model, batch)  # (B,), (B,)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        policy_chosen, policy_rejected, reference_chosen.to(policy_chosen), reference_rejected.to(policy_chosen),
        beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type)
    stats = {"loss": losses.detach(), "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
             "rewards/margins": chosen_rewards - rejected_rewards,
             "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
             "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach(),
             "logps/ref_chosen": reference_chosen, "logps/ref_rejected": reference_rejected}
    return losses.sum(), {k: v.sum() for k, v in stats.items()}


@torch.no_grad()
def precompute_reference(model, dataset, args, rank, world_size, device, amp_dtype):
    """Reference log-probs of every pair, computed once (sharded over ranks) and stored beside the
    pairs, so training runs no reference forward. Reused while model, template and precision match."""
    with open(args.data, "rb") as f:  # the pairs' content and the weights' files: a changed input is recomputed
        pairs_digest = hashlib.sha256(f.read()).hexdigest()
    weights = sorted((name, os.path.getsize(os.path.join(args.model, name)), os.path.getmtime(os.path.join(args.model, name)))
                     for name in os.listdir(args.model))
    key = hashlib.sha256(json.dumps([os.path.abspath(args.model), weights, pairs_digest, args.template, args.precision,
                                     args.max_length, args.pair_forward]).encode()).hexdigest()[:12]
    path = f"{os.path.splitext(args.data)[0]}.reference-{key}.jsonl"
    if not os.path.exists(path):
        print0(f"precomputing reference log-probs into {path}")
        pair_forward, mine = dpo.PAIR_FORWARDS[args.pair_forward], list(range(rank, len(dataset), world_size))
        rows = []
        for start in tqdm(range(0, len(mine), args.batch_size), desc="reference", disable=rank != 0):
            indices = mine[start:start + args.batch_size]
            batch = {k: v.to(device) for k, v in dataset.collate([dataset[i] for i in indices]).items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                chosen, rejected = pair_forward(model, batch)
            rows += [{"id": dataset.records[i]["id"], "reference_chosen_logps": c, "reference_rejected_logps": r}
                     for i, c, r in zip(indices, chosen.tolist(), rejected.tolist())]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if rank == 0:
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in sorted(rows, key=lambda row: row["id"]))
            os.replace(path + ".tmp", path)
        if world_size > 1:
            dist.barrier()
    reference = {row["id"]: row for row in read_records(path)}
    for record in dataset.records:
        record.update(reference[record["id"]])
    if dataset.cache is not None:
        dataset.cache.clear()


# ----------------------------------------------------------------------------- the loop
def train(args):
    """Train as args say; returns the trained model (unwrapped)."""
    resolve_defaults(args)
    rank, world_size, device = compute_init(args.seed)
    amp_dtype = autocast_dtype(device, args.precision)
    global_batch = args.batch_size * args.grad_accum * world_size
    if args.global_batch and args.global_batch != global_batch:
        raise ValueError(f"--global-batch {args.global_batch} != batch {args.batch_size} x accumulation "
                         f"{args.grad_accum} x world size {world_size} = {global_batch}")
    if args.parallel == "fsdp" and world_size == 1:
        args.parallel = "ddp"  # nothing to shard in one process

    raw_model, processor = prepare_model(args, device)
    args.template = vlm.resolve_template(raw_model, args.template)
    dataset = TrainDataset(read_records(args.data), args.objective, args.image_folder, processor,
                           args.template, args.max_length, args.cache_data, pad=vlm.pads_to_square(raw_model),
                           fixed_image_tokens=vlm.spec(raw_model)["fixed_image_tokens"])
    reference_model = None
    if args.objective == "dpo" and args.reference == "precomputed":
        precompute_reference(raw_model, dataset, args, rank, world_size, device, amp_dtype)  # before any update
    elif args.objective == "dpo" and args.lora_r == 0:  # full fine-tuning: the reference is a frozen copy
        reference_model = copy.deepcopy(raw_model).requires_grad_(False)
    num_steps = args.max_steps or int(args.epochs * (len(dataset) // global_batch))  # whole batches of each epoch
    if num_steps == 0:
        raise ValueError(f"{args.data}: {len(dataset)} examples x {args.epochs} epochs make no step of a global "
                         f"batch of {global_batch}")
    model = wrap(raw_model, args, world_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(math.ceil(args.warmup_ratio * num_steps),
                                                                       num_steps))
    os.makedirs(args.out, exist_ok=True)
    start_step, latest = 0, checkpoint.latest_checkpoint(args.out)
    if args.resume and latest:
        start_step = checkpoint.load_checkpoint(model, optimizer, scheduler, latest, rank, args)
        print0(f"resumed from {latest} at step {start_step}")
    print0(f"{args.objective}: {len(dataset)} examples ({len(dataset.skipped)} skipped), {num_steps} steps of "
           f"{global_batch}, {world_size} process(es), {args.parallel}, "
           f"{sum(p.numel() for p in params):,} trainable parameters")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:  # keep the rows of the steps a resumed run does not redo; a fresh run starts a fresh file
        checkpoint.write_lines_atomic(metrics_path, [json.dumps(row) for row in checkpoint.read_appended_jsonl(
            metrics_path) if row["step"] <= start_step])
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    micro_step = sft_micro_step if args.objective == "sft" else (
        lambda model, batch: dpo_micro_step(model, raw_model, reference_model, batch, args))

    model.train()
    progress = tqdm(total=num_steps, initial=start_step, disable=rank != 0 or not args.progress, desc=args.objective)
    for step in range(start_step, num_steps):
        t0 = time.time()
        indices = step_indices(step, len(dataset), global_batch, args.seed)
        batches = [dataset.collate([dataset[i] for i in micro])
                   for micro in rank_micro_batches(indices, rank, world_size, args.grad_accum)]
        # Normalise by the whole global batch: pairs for DPO, answer tokens for SFT (counted over ranks).
        normaliser = global_batch if args.objective == "dpo" else all_reduce_sum(
            [sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)], world_size)[0]
        sums = {}
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            with grad_sync(model, i == len(batches) - 1, args, world_size), \
                    torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                objective, stats = micro_step(model, batch)
                # DDP and FSDP average gradients over ranks: scale so the result is the global mean.
                (objective * world_size / normaliser).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        totals = dict(zip(sums, all_reduce_sum(list(sums.values()), world_size)))
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step + 1}; nothing was updated, the last "
                                     f"checkpoint ({checkpoint.latest_checkpoint(args.out)}) is intact")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: DTensor
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, **{k: v / normaliser for k, v in totals.items()},
               "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
               # tokens of the unpacked sequences (prompt counted twice per pair), whatever the pair forward
               "tokens_per_s": sum(int(b["attention_mask"].sum()) for b in batches) * world_size / (time.time() - t0)}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        progress.update()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < num_steps:
            checkpoint.save_checkpoint(model, raw_model, optimizer, scheduler, step + 1, args, rank, world_size)
    progress.close()
    checkpoint.export(model, raw_model, processor, args, rank,
                      fresh_model=lambda: prepare_model(args, torch.device("cpu"))[0])
    if world_size > 1:
        dist.barrier()
    return raw_model


def lr_lambda(warmup_steps, total_steps):
    """Linear warmup from lr / warmup_steps, then cosine decay to 0 (the authors' cosine; HF's warmup starts at 0)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------- CLI
# Defaults that run the toy world; the paper's values are named in each flag's help.
OBJECTIVE_DEFAULTS = {
    "dpo": dict(model="toy/model-sft", data="runs/seva/pairs.jsonl", out="runs/dpo", lr=5e-4, lora_r=32,
                lora_alpha=64),
    "sft": dict(model="toy/model-init", data="toy/sft.json", out="runs/sft", lr=1e-3, lora_r=0, lora_alpha=0),
}


def resolve_defaults(args):
    for key, value in OBJECTIVE_DEFAULTS[args.objective].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--objective", default="dpo", choices=["dpo", "sft"],
                   help="dpo: SeVa's preference training on seva.py pairs; sft: supervised fine-tuning")
    g.add_argument("--model", help="local HF model folder to start from (dpo: toy/model-sft; sft: toy/model-init)")
    g.add_argument("--data", "--pairs", dest="data",
                   help="dpo: pairs jsonl from seva.py (runs/seva/pairs.jsonl); sft: LLaVA-665k json (toy/sft.json)")
    g.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    g.add_argument("--template", choices=vlm.TEMPLATES,
                   help="prompt template (default: the family's; LLaVA-1.5: llava_v1, the authors'; others: chat)")
    g.add_argument("--max-length", type=int, default=2048, help="longer examples are skipped (paper: 2048)")
    g.add_argument("--cache-data", action="store_true", help="keep tokenized examples in memory (small data sets)")
    g.add_argument("--out", help="output folder: metrics.jsonl, args.json, checkpoints, adapter/ or model/")
    g = p.add_argument_group("LoRA and DPO")
    g.add_argument("--lora-r", type=int, help="LoRA rank, 0 = full fine-tuning (paper: 1024; toy: 32)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (paper: 2048, i.e. 2r; toy: 64)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout, sft only: dpo turns every dropout off (paper config 0.05, effectively 0)")
    g.add_argument("--train-projector", action="store_true",
                   help="also train the multimodal projector (the authors' code does; the paper does not say)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta (paper: 0.1)")
    g.add_argument("--loss-type", default="sigmoid", choices=dpo.LOSS_TYPES, help="sigmoid is Eq. 7 (paper)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (paper: 0)")
    g.add_argument("--reference", default="adapter", choices=["adapter", "precomputed"],
                   help="adapter: the policy with LoRA disabled (a frozen copy for full fine-tuning); "
                        "precomputed: log-probs computed once, stored beside the pairs")
    g.add_argument("--pair-forward", default="shared_prefix", choices=list(dpo.PAIR_FORWARDS),
                   help="how a pair is scored, all equal (tests/test_shared_prefix.py): shared_prefix packs prompt + "
                        "chosen + rejected into one sequence (fastest; families without it fall back to "
                        "concatenated); shared_image runs the vision tower once per pair; concatenated runs "
                        "chosen and rejected as 2B full sequences (the naive way)")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged/, the LoRA merged into the model")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=8, help="examples per device per micro-step (paper: 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (paper: 1)")
    g.add_argument("--global-batch", type=int, default=0,
                   help="if set, checked against batch x accumulation x world size (paper: 128)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (paper: 1, over pairs listed twice)")
    g.add_argument("--max-steps", type=int, default=0, help="if set, train exactly this many steps")
    g.add_argument("--lr", type=float, help="peak learning rate (paper: 2e-6; toy dpo: 5e-4, toy sft: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="warmup fraction of the steps (paper: 0.03)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (paper: 1.0)")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"],
                   help="bf16 autocast on CUDA (paper: bf16); CPUs always run fp32; fp16 is refused")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (paper: on)")
    g.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="ddp, or fsdp (FSDP2, one unit per decoder layer; the paper used DeepSpeed ZeRO-3)")
    g.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, help="write a checkpoint every N steps (0: only the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/latest if it exists")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
    if dist.is_initialized():
        dist.destroy_process_group()
