"""
Training on torchrun: SeVa's DPO with LoRA (Alg. 1 line 4), and the supervised fine-tuning that makes
the toy world's LLaVA.

    torchrun --standalone --nproc_per_node=2 train_ddp.py --pairs runs/seva/pairs.jsonl --out runs/dpo
    python train_ddp.py --objective sft --data toy/sft.json --out runs/sft

Distributed is switched on by torchrun's environment variables alone (RANK, WORLD_SIZE, LOCAL_RANK).
A step consumes one global batch = per-device batch x gradient accumulation x world size: always the
same examples for a given seed and step (data.py), and a loss normalised over the whole global batch, so
1 process and N processes (DDP or FSDP2) train the same model, and a resumed run the same as an
uninterrupted one.
"""
import copy
import functools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoint
import common
import data
import dpo
import export
import lora
import plan
import runcontrol
import trainable
import train_args
import vlm


# ----------------------------------------------------------------------------- losses
def sft_micro_step(model, batch):
    """Summed next-token loss over the answer tokens of a micro-batch."""
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits  # (B, T, V)
    loss = -dpo.sequence_logps(logits, labels).sum()  # next-token cross-entropy, summed over answer tokens
    return loss, {"loss": loss.detach()}


def reference_logps(raw_model, reference_model, batch, pair_forward):
    """Reference log-probs: precomputed in the batch, a frozen copy (full fine-tuning), or the policy
    with its adapters disabled (LoRA: no second model in memory)."""
    if "reference_chosen_logps" in batch:
        return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    with torch.no_grad(), (lora.disable_adapter(raw_model) if reference_model is None else nullcontext()):
        return pair_forward(raw_model if reference_model is None else reference_model, batch)


def dpo_micro_step(model, raw_model, reference_model, batch, pair_forward, beta=0.1, label_smoothing=0.0,
                   loss_type="sigmoid", negatives_loss="infonce", rpo_alpha=0.0, max_negatives=0):
    """Summed DPO loss of a micro-batch of pairs (Eq. 7), plus RPO's term if asked, and the summed statistics we
    log. max_negatives > 0: the data's records hold up to that many rejected answers each (seva.py
    --num-negatives), and every batch takes paper 3.3's loss, so that every step and rank logs the same keys."""
    reference_chosen, reference_rejected = reference_logps(raw_model, reference_model, batch, pair_forward)
    policy_chosen, policy_rejected = pair_forward(model, batch)  # (B,), (B,) or (R,)
    reference_chosen, reference_rejected = reference_chosen.to(policy_chosen), reference_rejected.to(policy_chosen)
    pairs = policy_chosen.shape[0]
    if "pair_index" in batch and not max_negatives:
        raise ValueError("a batch with several rejected answers per pair needs max_negatives (the data's most)")
    if max_negatives:  # several rejected answers per pair
        pair_index = batch.get("pair_index", torch.arange(pairs, device=policy_chosen.device))
        losses, chosen_rewards, rejected_rewards = dpo.multi_negative_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, pair_index, beta,
            negatives_loss, label_smoothing, loss_type)
    else:
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected,
            beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    stats = {"loss": losses.detach()}
    if rpo_alpha:
        nll = dpo.rpo_term(policy_chosen, dpo.answer_tokens(batch["labels"][:pairs]), 1.0)  # (B,): per token
        losses = losses + rpo_alpha * nll
        stats.update({"loss": losses.detach(), "rpo/nll_chosen": nll.detach()})
    if not max_negatives:
        stats.update({"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                      "rewards/margins": chosen_rewards - rejected_rewards,
                      "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                      "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach(),
                      "logps/ref_chosen": reference_chosen, "logps/ref_rejected": reference_rejected})
        return losses.sum(), {k: v.sum() for k, v in stats.items()}
    # Several rejected answers per pair: rewards/rejected is their mean per pair, rewards/margins the chosen
    # reward minus it, rewards/accuracies whether the chosen reward beats every one; neg{j}/... are the j-th
    # rejected answers of the pairs that have one (the loop averages them over neg{j}/pairs).
    counts = dpo.negative_counts(pair_index, pairs)
    per_pair = lambda values: torch.zeros(pairs, device=values.device).index_add(0, pair_index, values) / counts
    beaten = per_pair((chosen_rewards[pair_index] > rejected_rewards).float())
    stats.update({"rewards/chosen": chosen_rewards, "rewards/rejected": per_pair(rejected_rewards),
                  "rewards/margins": chosen_rewards - per_pair(rejected_rewards),
                  "rewards/accuracies": (beaten == 1).float(), "negatives": counts,
                  "logps/chosen": policy_chosen.detach(), "logps/rejected": per_pair(policy_rejected.detach()),
                  "logps/ref_chosen": reference_chosen, "logps/ref_rejected": per_pair(reference_rejected)})
    slot = dpo.negative_slots(pair_index)
    for j in range(max_negatives):  # every slot of the data, so that every rank logs the same keys
        mine = slot == j
        stats.update({f"neg{j + 1}/pairs": mine.float(), f"neg{j + 1}/rewards/rejected": rejected_rewards[mine],
                      f"neg{j + 1}/rewards/margins": chosen_rewards[pair_index[mine]] - rejected_rewards[mine]})
    return losses.sum(), {k: v.sum() for k, v in stats.items()}


# ----------------------------------------------------------------------------- set-up
# Read `train` (at the end) top to bottom: `setup` builds the run, `loop` trains it.
@dataclass
class Run:
    """Everything the loop needs, built by `setup`."""
    config: dict  # the resolved arguments: into args.json and every checkpoint
    objective: str  # dpo or sft
    parallel: str  # ddp or fsdp
    model: torch.nn.Module  # what the loop calls: DDP- or FSDP-wrapped, or the model itself
    raw_model: torch.nn.Module  # the model itself
    processor: object
    dataset: data.TrainDataset
    micro_step: object  # (model, batch) -> (summed loss, summed statistics)
    params: list  # the trainable parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    global_batch: int
    num_steps: int
    start_step: int
    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None
    group_by_length: bool = False  # batches of similar lengths (data.step_indices)
    max_tokens: int = 0  # --max-tokens-per-batch: micro-batches cut to a token budget (data.budget_split)


def setup(args):
    """The model, the data, the loss, the optimizer, and the step to start at (0, or a checkpoint's)."""
    rank, world_size, device = common.compute_init(args.seed)
    amp_dtype = common.compute_dtype(device, args.precision)
    global_batch = args.batch_size * args.grad_accum * world_size
    if args.global_batch and args.global_batch != global_batch:
        raise ValueError(f"--global-batch {args.global_batch} != batch {args.batch_size} x accumulation "
                         f"{args.grad_accum} x world size {world_size} = {global_batch}")
    if args.max_tokens_per_batch and args.objective != "dpo":
        raise ValueError("--max-tokens-per-batch cuts pairs (--objective dpo) to a token budget")
    parallel = args.parallel if world_size > 1 else "ddp"  # nothing to shard in one process
    raw_model, processor = trainable.prepare_model(args.model, device, amp_dtype, args.objective, args.lora_r,
                                                   args.lora_alpha, args.lora_dropout, args.train_projector, parallel,
                                                   args.gradient_checkpointing, args.train_vision, rank)
    pad = vlm.pads_to_square(raw_model)
    if args.objective == "dpo":  # the images as seva.py padded them to make the pairs
        pad = data.pairs_padding(args.data, pad)
    config = dict(vars(args), template=vlm.resolve_template(raw_model, args.template), parallel=parallel, pad=pad,
                  world_size=world_size, data_digest=common.file_digest(args.data),
                  base_digest=checkpoint.base_digest(args.model))
    # the newest checkpoint whose files match their manifest (a damaged one is named and passed over)
    latest = checkpoint.good_checkpoint(args.out) if args.resume else None
    if latest:  # before any work: a resume that cannot be exact is refused
        checkpoint.check_resume(latest, config)
    bad_lines = []  # lines of a jsonl file that are not UTF-8: skipped and counted with the bad records
    records = common.read_records(args.data, skipped=bad_lines)
    if args.objective == "dpo":
        records = data.pairs_reference(records, args.data, args.reference == "pairs", args.ld_alpha)
        if args.reference == "pairs":
            data.check_pairs_model(args.data, args.model, config["template"])
    dataset = data.TrainDataset(records, args.objective, args.image_folder, processor,
                                config["template"], args.max_length, args.cache_data, pad,
                                vlm.spec(raw_model)["fixed_image_tokens"], rank, args.data,
                                [line for _, line, _ in bad_lines])
    config["skipped"] = dict(dataset.skip_reasons)

    micro_step = sft_micro_step
    if args.objective == "dpo":
        pair_forward, reference_model = trainable.pair_forward_for(raw_model, args.pair_forward), None
        several = any(isinstance(r["rejected"], list) for r in dataset.records)  # seva.py --num-negatives K > 1
        max_negatives = max(len(r["rejected"]) for r in dataset.records) if several else 0
        if args.ld_alpha is not None and several:
            raise ValueError(f"{args.data}: --ld-alpha weighs the tokens beyond the shorter answer of a pair; its "
                             f"records have several rejected answers (seva.py --num-negatives): train without it")
        if args.ld_alpha is not None:
            pair_forward = functools.partial(pair_forward, ld_alpha=args.ld_alpha)
        if args.reference == "precomputed":  # before any update
            path = data.reference_path(args.data, args.model, args.image_folder, pad, config["template"],
                                       args.precision, args.max_length, args.pair_forward, args.ld_alpha)
            data.precompute_reference(raw_model, dataset, path, pair_forward, args.batch_size, rank, world_size,
                                      device, amp_dtype)
        elif args.reference == "adapter" and args.lora_r == 0:  # full fine-tuning: the reference is a frozen copy
            reference_model = copy.deepcopy(raw_model).requires_grad_(False)
        loss_settings = dict(beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type,
                             negatives_loss=args.negatives_loss, rpo_alpha=args.rpo_alpha, max_negatives=max_negatives)
        micro_step = lambda model, batch: dpo_micro_step(model, raw_model, reference_model, batch, pair_forward,
                                                         **loss_settings)
    num_steps = args.max_steps or int(args.epochs * (len(dataset) // global_batch))  # whole batches of each epoch
    if num_steps == 0:
        raise ValueError(f"{args.data}: {len(dataset)} examples x {args.epochs} epochs make no step of a global "
                         f"batch of {global_batch}")

    model = trainable.wrap(raw_model, parallel, world_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(math.ceil(args.warmup_ratio * num_steps),
                                                                       num_steps))
    os.makedirs(args.out, exist_ok=True)
    if rank == 0 and not latest:  # a fresh run: an earlier run's checkpoints here are not its own
        checkpoint.remove_checkpoints(args.out)
    start_step = 0
    if latest:
        start_step = checkpoint.load_checkpoint(model, optimizer, scheduler, latest, rank)
        common.print0(f"resumed from {latest} at step {start_step}")
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(dataset.skip_reasons.items())) or "none"
    common.print0(f"{args.objective}: {len(dataset)} examples (skipped: {skipped}), {num_steps} steps of "
                  f"{global_batch}, {world_size} process(es), {parallel}, "
                  f"{sum(p.numel() for p in params):,} trainable parameters")
    if rank == 0:  # keep the metrics of the steps a resumed run does not redo; a fresh run starts a fresh file
        metrics_path = os.path.join(args.out, "metrics.jsonl")
        common.write_atomic(metrics_path, [json.dumps(row) for row in common.read_jsonl(metrics_path, appended=True)
                                           if row["step"] <= start_step])
        common.write_atomic(os.path.join(args.out, "args.json"), [json.dumps(config, indent=2)])
    return Run(config, args.objective, parallel, model, raw_model, processor, dataset, micro_step, params, optimizer,
               scheduler, global_batch, num_steps, start_step, rank, world_size, device, amp_dtype,
               args.group_by_length, args.max_tokens_per_batch)


def lr_lambda(warmup_steps, total_steps):
    """Linear warmup from lr / warmup_steps, then cosine decay to 0 (the authors' cosine; HF's warmup starts at 0)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------- the loop
def loop(run, out, seed, accumulation, grad_clip, save_every=0, progress=True, keep=2, stop=None, prefetch=True):
    """Train from run.start_step to run.num_steps: one global batch per step (data.step_indices: a function of
    step and seed), a row of OUT/metrics.jsonl per step, a checkpoint every `save_every` steps (the last `keep`
    kept). stop (runcontrol.StopSignals): after each step, a SIGINT / SIGTERM ends the run there. prefetch: each
    step's data (images, tokens, batches) is prepared in a background thread during the step before, the same data
    (prepare_step); data_s in the metrics is the time the step still waited for it."""
    model, rank, world_size = run.model, run.rank, run.world_size
    metrics_path = os.path.join(out, "metrics.jsonl")
    model.train()
    bar = tqdm(total=run.num_steps, initial=run.start_step, desc=run.objective, disable=rank != 0 or not progress)
    prepare = functools.partial(prepare_step, run, seed=seed, accumulation=accumulation)
    # --prefetch: the next step's data is prepared in a background thread while this step computes
    background = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
    upcoming = None
    for step in range(run.start_step, run.num_steps):
        t0 = time.time()
        prepared = upcoming.result() if upcoming else prepare(step)
        if background and step + 1 < run.num_steps:
            upcoming = background.submit(prepare, step + 1)
        batches = step_batches(run, prepared)
        data_s = time.time() - t0  # the training thread's wait for the step's data
        # Normalise by the whole global batch: pairs for DPO, answer tokens for SFT (counted over ranks).
        normaliser = run.global_batch if run.objective == "dpo" else common.all_reduce_sum(
            [sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)], world_size)[0]
        sums = {}
        for i, batch in enumerate(batches):
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with trainable.grad_sync(model, i == len(batches) - 1, run.parallel, world_size), \
                    common.autocast(run.device, run.amp_dtype):
                objective, stats = run.micro_step(model, batch)
                # DDP and FSDP average gradients over ranks: scale so the result is the global mean.
                (objective * world_size / normaliser).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        totals = dict(zip(sums, common.all_reduce_sum(list(sums.values()), world_size)))
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step + 1}; nothing was updated, the last "
                                     f"checkpoint ({checkpoint.latest_checkpoint(out)}) is intact")
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: DTensor
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) * world_size  # unpacked: prompt twice per pair
        row = {"step": step + 1, **{k: v / normalisers(totals, normaliser, k) for k, v in totals.items()},
               "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
               "tokens_per_s": tokens / (time.time() - t0), "data_s": data_s}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.update()
        saved = save_every and (step + 1) % save_every == 0 and step + 1 < run.num_steps
        if saved:
            checkpoint.save_checkpoint(model, run.optimizer, run.scheduler, step + 1, out, run.config,
                                       rank, world_size, keep)
        reason = stop.check(world_size) if stop and step + 1 < run.num_steps else None
        if reason is not None:
            bar.close()
            if background:
                background.shutdown(cancel_futures=True)
            checkpoint.stop_run(run, out, step + 1, reason, save_every, saved, keep)
    bar.close()
    if background:
        background.shutdown()


def prepare_step(run, step, seed, accumulation):
    """Step `step`'s data on this rank (data.step_indices: a function of step and seed), with no collective, so that a
    background thread may prepare it: its micro-batches collated, or with --max-tokens-per-batch its examples
    encoded ({index: example}), for step_batches to cut on the training thread."""
    dataset = run.dataset
    indices = data.step_indices(step, len(dataset), run.global_batch, seed,
                                dataset.lengths if run.group_by_length else None)
    if run.max_tokens:
        return {i: dataset[i] for i in data.rank_micro_batches(indices, run.rank, run.world_size, 1)[0]}
    micro = data.rank_micro_batches(indices, run.rank, run.world_size, accumulation)
    return [dataset.collate([dataset[i] for i in batch_indices]) for batch_indices in micro]


def step_batches(run, prepared):
    """The step's micro-batches from prepare_step's result: with --max-tokens-per-batch cut to the token budget here,
    on the training thread (its all_reduce must not run beside the step's collectives from another thread)."""
    if not run.max_tokens:
        return prepared
    micro = data.budget_split(prepared, run.max_tokens, run.rank, run.world_size)
    return [run.dataset.collate([prepared[i] for i in batch_indices]) for batch_indices in micro]


def normalisers(totals, normaliser, key):
    """What a summed statistic is divided by: the global batch, or for the j-th rejected answers' statistics
    (neg{j}/..., several negatives per pair) the number of pairs that have a j-th."""
    slot, _, rest = key.partition("/")
    if slot.startswith("neg") and slot[3:].isdigit() and rest != "pairs":
        return max(totals[f"{slot}/pairs"], 1.0)
    return normaliser


def train(args):
    """Train as args say (parse_args, which fills in the objective's defaults); returns the trained model
    (unwrapped). Writes OUT/adapter/ (LoRA) or OUT/model/ (full fine-tuning) at the end. --plan: the costs only."""
    if args.plan:  # from config.json alone: no weight read, no process group
        return plan.plan_training(args)
    rank, world_size, _ = common.compute_init(args.seed)
    lock = runcontrol.lock_output(args.out, rank, world_size)  # one run per OUT: a second is refused
    try:
        with runcontrol.StopSignals() as stop:
            run = setup(args)
            loop(run, args.out, args.seed, args.grad_accum, args.grad_clip, args.save_every, args.progress,
                 args.keep, stop, args.prefetch)
            fresh_model = lambda: trainable.prepare_model(
                args.model, torch.device("cpu"), None, args.objective, args.lora_r, args.lora_alpha,
                args.lora_dropout, args.train_projector, train_vision=args.train_vision)[0]
            export.export(run.model, run.raw_model, run.processor, args.out, run.rank, args.model, args.lora_r,
                          args.merge, run.parallel == "fsdp", fresh_model, run.config["base_digest"],
                          args.merge_dtype, run.device)
            common.barrier(run.world_size)
    finally:
        if lock:
            lock.release()
    return run.raw_model


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    """The flags (train_args.py: grouped, each with its default and the paper's value)."""
    return train_args.parse_args(argv, __doc__)

if __name__ == "__main__":
    common.run_main(lambda: train(parse_args()), "train_ddp.py")
    common.finish_distributed()
