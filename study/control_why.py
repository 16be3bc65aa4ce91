"""
Why a control fails, measured (study/protocol.md, "2026-12-03: the control", its last item): each trained pair's
log-prob of chosen and rejected (summed over the answer's tokens) under the SFT model and under the trained
model, against the pair's similarity, the share of shared tokens. Likelihood displacement (Razin et al. 2024) is
strongest where chosen and rejected are nearly the same text.

Written by `python -m study.control --why` to OUT/why.md, from runs under OUT/runs (or PAIRS,ADAPTER given
directly, e.g. the main command's runs/seva/pairs.jsonl,runs/dpo/adapter).
"""
import json
import os
import statistics

import numpy as np
import torch

import common
import data
import dpo
import lora
import vlm


def shared_share(a, b):
    """Similarity of two token lists: their longest common subsequence over the longer one's length."""
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / max(len(a), len(b))


def pair_logps(model, processor, records, image_folder, pairs_path, batch_size=16):
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs per pair, as
    train_ddp.py's loss sees them (the same template, padding and forward); the reference is the model with
    its LoRA disabled."""
    pad = data.pairs_padding(pairs_path, vlm.pads_to_square(model))
    dataset = data.TrainDataset(records, "dpo", image_folder, processor, vlm.resolve_template(model), 2048,
                                pad=pad, fixed_image_tokens=vlm.spec(model)["fixed_image_tokens"], source=pairs_path)
    if dataset.skipped:
        raise ValueError(f"{pairs_path}: {len(dataset.skipped)} pairs cannot be encoded ({dataset.skipped[:3]})")
    found = [[], [], [], []]
    with torch.no_grad():
        for first in range(0, len(dataset), batch_size):
            batch = dataset.collate([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
            policy = dpo.concatenated_forward(model, batch)
            with lora.disable_adapter(model):
                reference = dpo.concatenated_forward(model, batch)
            for column, values in zip(found, (*policy, *reference)):
                column.extend(values.tolist())
    return found


def measure(world, start_dir, pairs_path, adapter):
    """Per pair: similarity, and the change (trained - SFT) of the chosen and rejected log-probs."""
    records = common.read_jsonl(pairs_path)
    model, processor = vlm.load(start_dir)
    lora.load_lora(model, adapter)  # unmerged: the reference is the same model with the LoRA disabled
    model.eval()
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = pair_logps(
        model, processor, records, os.path.join(world, "images"), pairs_path)
    tokens = lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    similarity = [shared_share(tokens(r["chosen"]), tokens(r["rejected"])) for r in records]
    return dict(similarity=similarity, chosen=[p - r for p, r in zip(policy_chosen, reference_chosen)],
                rejected=[p - r for p, r in zip(policy_rejected, reference_rejected)],
                reference_chosen=reference_chosen, reference_rejected=reference_rejected)


def run_table(name, found):
    """The lines of one run: by tercile of similarity, the pairs' mean similarity and mean log-prob changes;
    then the correlations over every pair."""
    order = np.argsort(found["similarity"], kind="stable")
    thirds = np.array_split(order, 3)
    mean = lambda key, idx: statistics.mean(found[key][i] for i in idx)
    rows = [[label, len(idx), f"{mean('similarity', idx):.2f}", f"{mean('reference_chosen', idx):.2f}",
             f"{mean('chosen', idx):+.2f}", f"{mean('reference_rejected', idx):.2f}", f"{mean('rejected', idx):+.2f}",
             f"{100 * statistics.mean(int(found['chosen'][i] < 0) for i in idx):.0f}"]
            for label, idx in zip(("least similar third", "middle third", "most similar third"), thirds)]
    rows.append(["all", len(order), f"{statistics.mean(found['similarity']):.2f}",
                 f"{statistics.mean(found['reference_chosen']):.2f}", f"{statistics.mean(found['chosen']):+.2f}",
                 f"{statistics.mean(found['reference_rejected']):.2f}", f"{statistics.mean(found['rejected']):+.2f}",
                 f"{100 * statistics.mean(int(c < 0) for c in found['chosen']):.0f}"])
    correlation = lambda key: float(np.corrcoef(found["similarity"], found[key])[0, 1])
    return ([f"## {name}", ""] + common.markdown_table(
        ["pairs", "n", "similarity", "chosen log-prob, SFT", "chosen change", "rejected log-prob, SFT",
         "rejected change", "chosen fell %"], rows)
        + ["", f"Correlation over the {len(order)} pairs of similarity with the chosen answer's change: "
               f"{correlation('chosen'):+.2f}; with the rejected answer's: {correlation('rejected'):+.2f}.", ""])


def write(out, world, start_dir, runs):
    """OUT/why.md for the runs named (folders under OUT/runs, or PAIRS,ADAPTER)."""
    lines = ["# Why the controls fail: log-prob change per pair against the pair's similarity", "",
             f"Made by `python -m study.control --why --why-runs {' '.join(runs)}`. Per pair, the answer's log-prob "
             "summed over its tokens (the quantity DPO's loss uses) under the SFT model, and its change under the "
             "trained model (trained - SFT). Similarity: the longest common token subsequence of chosen and "
             "rejected over the longer answer's tokens.", ""]
    for run in runs:
        if "," in run:
            pairs_path, adapter = run.split(",", 1)
        else:
            pairs_path, adapter = (os.path.join(out, "runs", run, p) for p in ("pairs.jsonl", "train/adapter"))
        cache = os.path.join(out, "why", run.replace("/", "_").replace(",", "+") + ".json")
        if not os.path.exists(cache):  # the measurement of a run, kept: a rerun only adds runs
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            common.write_atomic(cache, [json.dumps(measure(world, start_dir, pairs_path, adapter))])
        lines += run_table(run, json.load(open(cache)))
    path = os.path.join(out, "why.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
