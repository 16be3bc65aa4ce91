"""
What train_ddp.py trains on: LLaVA-665k records (SFT) or seva.py's pairs (DPO) as tokenized examples, and
which of them each optimizer step sees.

With --reference precomputed, the reference log-probs of every pair are computed once before training and
stored beside the pairs; they then travel with each example.

A step's examples are a pure function of (step, seed): a seeded permutation per epoch cut into global
batches, each split into contiguous per-rank slices and micro-batches. So 1 process, N processes and a
resumed run see the same examples at every step.
"""
import json
import os
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import collate
import common
import dpo
import pairs
import vlm


def sft_turns(record):
    """[(question, answer), ...] of a LLaVA-665k record, the `<image>` placeholder removed."""
    conversations = record["conversations"]
    return [(human["value"].replace("<image>", "").strip(), gpt["value"])
            for human, gpt in zip(conversations[0::2], conversations[1::2])]


def pair_turns(record):
    """The chosen conversation of a seva.py pair, then each rejected one."""
    return [[(record["question"], answer)] for answer in [record["chosen"]] + pairs.rejected_list(record["rejected"])]


def record_problem(record, objective):
    """Why a record cannot be trained on (a malformed record), or None."""
    if not isinstance(record, dict):
        return "not a json object"
    keys = ("image", "conversations") if objective == "sft" else ("image", "question", "chosen", "rejected")
    missing = [key for key in keys if key not in record]
    if missing:
        return f"missing key(s): {', '.join(missing)}"
    if objective == "dpo" and not (all(isinstance(record[key], str) for key in keys[:3]) and (
            isinstance(record["rejected"], str) or (isinstance(record["rejected"], list) and record["rejected"]
                                                    and all(isinstance(r, str) for r in record["rejected"])))):
        return "image, question and chosen must be strings, rejected a string or a non-empty list of strings"
    if objective == "sft" and not (isinstance(record["conversations"], list) and record["conversations"]
                                   and all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                           for t in record["conversations"])):
        return "conversations must be a non-empty list of {from, value} turns"
    return None


def degenerate_problem(record):
    """Why a pair teaches nothing, or None: an empty chosen or rejected answer, or a rejected answer equal to the
    chosen one (Alg. 1 line 3 drops equal answers; a pairs file made elsewhere may hold them). Its DPO loss is
    log 2 with a gradient that pushes nothing apart (equal), or towards saying nothing (empty)."""
    chosen = record["chosen"].strip()
    rejected = [r.strip() for r in pairs.rejected_list(record["rejected"])]
    if not chosen or not all(rejected):
        return "an empty answer"
    if chosen in rejected:
        return "chosen equals rejected"
    return None


def image_problem(path):
    """Why an image cannot be read (missing or corrupt), or None: every image is opened and decoded once up
    front, so that no step fails on one."""
    try:
        vlm.load_image(path, pad=False)
    except ValueError as e:
        return str(e)
    return None


class TrainDataset(torch.utils.data.Dataset):
    """SFT records or DPO pairs, tokenized on demand (labels: answers + end-of-turn tokens only).

    Records that cannot be used (malformed, a degenerate pair, a missing or corrupt image, longer than
    max_length) are named, skipped and counted up front, before the first step: `skipped` holds their names,
    `skip_reasons` the counts by reason. bad_lines: the lines of a jsonl source that read_jsonl skipped (not
    UTF-8), counted here too, and kept out of the line numbers the messages give. Long examples are never
    truncated into the image. fixed_image_tokens (vlm.FAMILIES): every image makes as many tokens as the first
    (LLaVA-1.5: 576), so the first one is measured; else every example is encoded once up front to measure its
    own. source names the data file in the messages.
    """

    def __init__(self, records, objective, image_folder, processor, template, max_length, cache=False, pad=True,
                 fixed_image_tokens=True, rank=0, source="data", bad_lines=()):
        self.objective, self.image_folder, self.pad = objective, image_folder, pad
        self.processor, self.template, self.max_length = processor, template, max_length
        self.cache = {} if cache else None
        self.records, self.skipped, self.skip_reasons = [], [], Counter()
        self.lengths = []  # tokens of each usable record (its longest sequence), for --group-by-length
        extra_tokens = None
        where = "line" if source.endswith(".jsonl") else "record"
        for line in bad_lines:
            self.skipped.append(f"line {line}")
            self.skip_reasons["line not UTF-8"] += 1
        for index, record in enumerate(tqdm(records, desc=f"checking {source}", disable=rank != 0)):
            line = index + 1
            for bad in sorted(bad_lines):  # the file's line: past the lines skipped before it
                line += bad <= line
            name = record.get("id", f"#{index + 1}") if isinstance(record, dict) else f"#{index + 1}"
            problem = record_problem(record, objective)
            reason = "malformed record"
            if problem is None and objective == "dpo":
                problem, reason = degenerate_problem(record), "degenerate pair (equal or empty answers)"
            if problem is None:
                problem = image_problem(os.path.join(image_folder, record["image"]))
                reason = "missing or corrupt image"
            if problem is None:
                turns = [sft_turns(record)] if objective == "sft" else pair_turns(record)
                example = None
                if extra_tokens is None or not fixed_image_tokens:
                    example = self.encode(record, check=False)
                    extra_tokens = vlm.image_extra_tokens(
                        processor, example if objective == "sft" else example["chosen"], turns[0], template)
                length = max(vlm.sequence_length(processor, t, template, extra_tokens) for t in turns)
                if length > max_length:
                    problem, reason = f"{length} tokens > --max-length {max_length}", "longer than --max-length"
            if problem:
                self.skipped.append(name)
                self.skip_reasons[reason] += 1
                if rank == 0 and len(self.skipped) <= 20:
                    print(f"{source}: {where} {line}, record {name}: {problem}; skipped", flush=True)
                continue
            if example is not None and self.cache is not None:  # measured by encoding it: keep it
                self.cache[len(self.records)] = example
            self.records.append(record)
            self.lengths.append(length)
        if rank == 0 and len(self.skipped) > 20:
            print(f"{source}: ... and {len(self.skipped) - 20} more skipped", flush=True)

    def encode(self, record, check=True):
        image = vlm.load_image(os.path.join(self.image_folder, record["image"]), pad=self.pad)
        if self.objective == "sft":
            example = vlm.encode(self.processor, image, sft_turns(record), self.template)
            if check:
                self.check_length(record, example)
            return example
        pair = collate.encode_pair(self.processor, image, record["question"], record["chosen"], record["rejected"],
                               self.template)
        if check:
            self.check_length(record, pair["chosen"], *pairs.rejected_list(pair["rejected"]))
        pair.update({k: record[k] for k in pairs.REFERENCE_KEYS if k in record})
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
        return collate.collate(examples, pad) if self.objective == "sft" else collate.collate_pairs(examples, pad)


# ----------------------------------------------------------------------------- which examples each step sees
GROUP = 16  # --group-by-length: global batches per group sorted by length


def step_indices(step, num_examples, global_batch, seed, lengths=None):
    """The example indices of optimizer step `step`: a seeded permutation per epoch, partial batch dropped.

    lengths (--group-by-length, as LLaVA's group_by_modality_length): each run of GROUP batches of the
    permutation is sorted by length before it is cut into batches, and the epoch's batches are shuffled, so a
    batch holds examples of similar length and pads less. A function of (step, seed) alone: resumes are exact."""
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_examples} examples are fewer than one global batch ({global_batch})")
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator)[:steps_per_epoch * global_batch]
    if lengths is not None:
        size = GROUP * global_batch
        groups = [order[i:i + size].tolist() for i in range(0, len(order), size)]
        batches = [sorted_group[j:j + global_batch] for group in groups
                   for sorted_group in [sorted(group, key=lambda i: lengths[i])]
                   for j in range(0, len(sorted_group), global_batch)]
        return batches[torch.randperm(len(batches), generator=generator)[position].item()]
    return order[position * global_batch:(position + 1) * global_batch].tolist()


def rank_micro_batches(indices, rank, world_size, accumulation):
    """Split one global batch into this rank's micro-batches (rank r gets a contiguous slice)."""
    per_rank = len(indices) // world_size
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    micro = per_rank // accumulation
    return [mine[i * micro:(i + 1) * micro] for i in range(accumulation)]


def packed_length(example):
    """The tokens of an encoded pair packed into one sequence (dpo.pack_pairs): its prompt once, then each answer."""
    chosen = example["chosen"]
    prompt = int(dpo.prompt_length(chosen["labels"]))
    return len(chosen["input_ids"]) + sum(len(r["input_ids"]) - prompt for r in pairs.rejected_list(example["rejected"]))


def budget_micro_batches(indices, lengths, budget, count=0):
    """A rank's share of a global batch cut, in order, into micro-batches of at most `budget` tokens (`lengths`:
    {index: packed_length}); a pair longer than the budget goes alone. count > 0: exactly that many micro-batches
    (ranks must run the same number of forwards), the one of most pairs halved until there are."""
    micro = []
    for i in indices:
        if micro and sum(lengths[j] for j in micro[-1]) + lengths[i] <= budget:
            micro[-1].append(i)
        else:
            micro.append([i])
    while len(micro) < count:
        k = max(range(len(micro)), key=lambda k: len(micro[k]))
        if len(micro[k]) < 2:
            raise ValueError(f"{len(indices)} pairs cannot make {count} micro-batches")
        half = len(micro[k]) // 2
        micro[k:k + 1] = [micro[k][:half], micro[k][half:]]
    return micro


def budget_split(encoded, max_tokens, rank, world_size):
    """--max-tokens-per-batch: this rank's share of a step's global batch ({index: encoded pair}, in order) cut into
    micro-batches (index lists) of at most max_tokens packed tokens, the same number on every rank (a collective:
    call it on the training thread only). The global batch stays so many pairs: the loss is the same on 1 process
    as on N."""
    lengths = {i: packed_length(example) for i, example in encoded.items()}
    counts = [0.0] * world_size
    counts[rank] = len(budget_micro_batches(list(encoded), lengths, max_tokens))
    most = int(max(common.all_reduce_sum(counts, world_size)))
    return budget_micro_batches(list(encoded), lengths, max_tokens, most)


# ----------------------------------------------------------------------------- the precomputed reference
def reference_path(pairs_path, model_path, image_folder, pad, template, precision, max_length, pair_forward,
                   ld_alpha=None):
    """Where precompute_reference keeps the reference log-probs of a pairs file: beside it, keyed by what
    decides them (the pairs' content, the weights' files, the images and their padding, template, precision,
    length limit, forward)."""
    decides = [common.files_fingerprint(model_path), common.file_digest(pairs_path), os.path.abspath(image_folder),
               pad, template, precision, max_length, pair_forward] + ([ld_alpha] if ld_alpha is not None else [])
    key = common.args_digest(decides)[:12]
    return f"{os.path.splitext(pairs_path)[0]}.reference-{key}.jsonl"


def pair_key(record):
    """A pair's content (image, question, its answers): what its reference log-probs belong to."""
    return common.args_digest([record["image"], record["question"], record["chosen"], record["rejected"]])


def pairs_reference(records, path, use, ld_alpha=None):
    """The pairs as training reads them. use (--reference pairs): each pair must carry the reference log-probs
    seva.py --reference-logps wrote into it, and they are used; otherwise any such fields are dropped, so that
    only the reference asked for scores the pairs."""
    if not use:
        return [{k: v for k, v in r.items() if k not in pairs.REFERENCE_KEYS} if isinstance(r, dict) else r
                for r in records]
    if ld_alpha is not None:
        raise ValueError("--reference pairs holds plain log-probs; LD-DPO (--ld-alpha) weighs them by length: "
                         "use --reference adapter or precomputed")
    where = "line" if path.endswith(".jsonl") else "record"
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            continue  # malformed: TrainDataset names and skips it
        name = f"{path}: {where} {index + 1}, record {record.get('id', '?')}"
        if not all(k in record for k in pairs.REFERENCE_KEYS):
            raise ValueError(f"{name}: no reference log-probs; make the pairs with seva.py --reference-logps, "
                             f"or train with --reference adapter")
        scored = record["reference_rejected_logps"]
        if "rejected" in record and len(pairs.rejected_list(scored)) != len(pairs.rejected_list(record["rejected"])):
            raise ValueError(f"{name}: {len(pairs.rejected_list(scored))} reference log-probs for "
                             f"{len(pairs.rejected_list(record['rejected']))} rejected answers")
    return records


def check_pairs_model(pairs_path, model, template):
    """--reference pairs: the pairs' log-probs are the model's that made them (seva.py's OUT.args.json says
    which): training another model or template on them is refused."""
    sidecar = pairs_path + ".args.json"
    if not os.path.exists(sidecar):
        return
    made = json.load(open(sidecar)).get("args", {})
    same = lambda a, b: os.path.realpath(a) == os.path.realpath(b) or (
        os.path.isdir(a) and common.files_fingerprint(a) == common.files_fingerprint(b))
    if made.get("model") and not same(made["model"], model):
        raise ValueError(f"{pairs_path}: its reference log-probs are {made['model']}'s (its .args.json), not "
                         f"--model {model}'s; use --reference adapter or precomputed")
    if made.get("template") and made["template"] != template:
        raise ValueError(f"{pairs_path}: its reference log-probs were scored with template {made['template']}, "
                         f"not {template}")


def pairs_padding(pairs_path, default):
    """Whether seva.py padded the images of a pairs file to squares (its OUT.args.json records it), so that
    training sees each image as the answers were generated from it; `default` where no sidecar says."""
    sidecar = pairs_path + ".args.json"
    if not os.path.exists(sidecar):
        return default
    with open(sidecar, encoding="utf-8") as f:
        return json.load(f).get("args", {}).get("pad", default)


@torch.no_grad()
def precompute_reference(model, dataset, path, pair_forward, batch_size, rank, world_size, device, amp_dtype):
    """Reference log-probs of every pair, computed once before any update (sharded over ranks) into `path`,
    then put into the dataset's records, so training runs no reference forward."""
    if not os.path.exists(path):
        common.print0(f"precomputing reference log-probs into {path}")
        mine = list(range(rank, len(dataset), world_size))
        rows = []
        for start in tqdm(range(0, len(mine), batch_size), desc="reference", disable=rank != 0):
            indices = mine[start:start + batch_size]
            batch = {k: v.to(device) for k, v in dataset.collate([dataset[i] for i in indices]).items()}
            with common.autocast(device, amp_dtype):
                chosen, rejected = pair_forward(model, batch)
            rejected = rejected.tolist()  # flat, in pair order: back into each pair's own
            for i, c in zip(indices, chosen.tolist()):
                record = dataset.records[i]
                count = len(pairs.rejected_list(record["rejected"]))
                own, rejected = rejected[:count], rejected[count:]
                rows.append({"key": pair_key(record), "id": record.get("id"), "reference_chosen_logps": c,
                             "reference_rejected_logps": own if isinstance(record["rejected"], list) else own[0]})
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if rank == 0:
            common.write_atomic(path, [json.dumps(row) for row in sorted(rows, key=lambda row: row["key"])])
        common.barrier(world_size)
    reference = {row["key"]: row for row in common.read_jsonl(path)}
    for record in dataset.records:
        row = reference[pair_key(record)]
        record.update(reference_chosen_logps=row["reference_chosen_logps"],
                      reference_rejected_logps=row["reference_rejected_logps"])
    if dataset.cache is not None:
        dataset.cache.clear()
