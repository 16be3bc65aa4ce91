"""
Numbers across runs: mean ± sd over seeds, the fits across runs (pair quality against gain, pair claims against
the change in CHAIR_i) into OUT/analyses.md, and the confusion of answers (OUT/confusion-FAMILY.md).
"""
import collections
import json
import os
import statistics

import numpy as np

import common
import lora
import pairs
import vlm
from eval import hallucination, toyvqa
from study.settings import BASE


def mean_spread(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def accuracy_of(run, family="overall"):
    return (run["accuracy"] or run["start_accuracy"])[family]


def base_dpo_runs(rows):
    """The distinct runs (a run reused by several ablations counts once) at the base lr, beta, rank and SFT model
    that trained a step: the runs the fits across runs are made over."""
    fixed = ("lr", "beta", "lora_r", "sft_epochs", "objective")
    distinct = {json.dumps([r["setting"], r["seed"]], sort_keys=True): r for r in rows}
    return [r for r in distinct.values() if all(r["setting"][k] == BASE[k] for k in fixed) and r["steps"]]


def pair_quality_analysis(rows):
    """What does a pair of each quality class do to accuracy? A least-squares fit, without intercept, of each DPO
    run's accuracy change on the counts of trained pairs per class, over the runs at the base learning rate, beta,
    rank and SFT model (they differ in augmentation, noise step, pool and pair filter, so in the mix of classes)."""
    runs = [r for r in base_dpo_runs(rows) if r["trained_quality"]]
    classes = [q for q in pairs.QUALITY if any(r["trained_quality"][q] for r in runs)]  # a class never seen: no fit
    if len(runs) < 2 * len(classes):
        return []
    counts = np.array([[r["trained_quality"][q] for q in classes] for r in runs], dtype=float) / 100
    change = np.array([accuracy_of(r) - r["start_accuracy"]["overall"] for r in runs])
    coef, *_ = np.linalg.lstsq(counts, change, rcond=None)
    residual = change - counts @ coef
    lines = ["## Pair quality against gain", "",
             f"Fit over {len(runs)} DPO runs at the base lr, beta, rank and SFT model: accuracy change = sum over "
             f"classes of (pairs of that class trained / 100) x coefficient. Residual sd "
             f"{residual.std():.3f}; the counts come from the true answers, which SeVa never sees.", "",
             "| pair class | coefficient (accuracy change per 100 pairs) | mean pairs per run |", "|---|---|---|"]
    for q, c, n in zip(classes, coef, counts.mean(0) * 100):
        lines.append(f"| {q} | {c:+.3f} | {n:.0f} |")
    return lines + [f"Classes with no pair in any of these runs are left out: "
                    f"{', '.join(q for q in pairs.QUALITY if q not in classes) or 'none'}.", ""]


def pair_claims_analysis(rows, base_open):
    """What the paper could not measure: does the share of trained pairs whose chosen answer holds fewer false
    claims predict the change in descriptions' CHAIR_i? A least-squares line over the DPO runs at the base lr,
    beta, rank and SFT model that trained a step (base_open: that SFT model's metrics, for rows that predate
    their own start_open)."""
    fewer = hallucination.PAIR_CLASSES[0]
    runs = [r for r in base_dpo_runs(rows) if r.get("open") and sum((r.get("pair_claims") or {}).values())]
    if len(runs) < 8:  # a line through a few runs of one setting would say nothing
        return []
    share = np.array([100 * r["pair_claims"][fewer] / sum(r["pair_claims"].values()) for r in runs])
    change = np.array([100 * (r["open"]["chair_i_desc"] - (r.get("start_open") or base_open)["chair_i_desc"])
                       for r in runs])
    if share.std() == 0:
        return []
    slope, intercept = np.polyfit(share, change, 1)
    correlation = float(np.corrcoef(share, change)[0, 1])
    return ["## Which side holds more false claims, against the change in CHAIR_i", "",
            f"Over {len(runs)} DPO runs at the base lr, beta, rank and SFT model: x = the share of trained pairs "
            f"whose chosen answer holds fewer false claims than its rejected one ({share.mean():.1f}% on average, "
            f"{share.min():.1f}-{share.max():.1f}%), y = the descriptions' CHAIR_i change against the start model "
            f"(points, {change.mean():+.1f} on average).", "",
            "| fit | slope (points per 100% of pairs) | intercept (points) | correlation | R² |", "|---|---|---|---|---|",
            f"| least squares, y = intercept + slope x / 100 | {100 * slope:+.1f} | {intercept:+.1f} | "
            f"{correlation:+.2f} | {correlation ** 2:.3f} |", ""]


def recorded_start(rows):
    """The open-stage metrics of the world's own SFT model as the rows recorded them (None before rows did)."""
    return next((r["start_open"] for r in rows if r.get("start_open") and r["setting"]["sft_epochs"] ==
                 BASE["sft_epochs"]), None)


def analyses(out, rows):
    """OUT/analyses.md: the fits across runs, from runs.jsonl's rows (load_rows) alone."""
    start = recorded_start(rows)
    lines = ["# Fits across the runs of runs.jsonl", "",
             f"Made by `python -m study --analyses --out {out}` from runs.jsonl alone.", ""]
    lines += pair_quality_analysis(rows) + (pair_claims_analysis(rows, start) if start else [])
    path = os.path.join(out, "analyses.md")
    common.write_atomic(path, lines)
    return path


def confusion(world, out, family, runs):
    """What a model answers to toy/val.json's `family` questions, against the right answer: the SFT model's
    counts, then each named run's (its adapter on its start model). Written to OUT/confusion-FAMILY.md."""
    val = [r for r in json.load(open(os.path.join(world, "val.json"))) if toyvqa.first_question(r)[3] == family]
    truths = [toyvqa.first_question(r)[2] for r in val]
    lines = [f"# {family} questions of {world}/val.json: right answer -> answer given", "",
             f"Made by `python -m study --confusion {family} --runs {' '.join(runs)}`.", ""]
    for name in ["SFT"] + runs:
        train = os.path.join(out, "runs", name, "train")
        start = (os.path.join(world, "model-sft") if name == "SFT"
                 else json.load(open(os.path.join(train, "args.json")))["model"])
        model, processor = vlm.load(start)
        if name != "SFT":
            lora.load_lora(model, os.path.join(train, "adapter"))
        _, answers = toyvqa.vqa_accuracy(model.eval(), processor, val, os.path.join(world, "images"))
        counts = collections.Counter(zip(truths, (a.lower() for a in answers)))
        right = sum(n for (t, a), n in counts.items() if t.lower() == a)
        lines += [f"## {name}: {right} of {len(val)} right", "", "| right answer | answer given | questions |",
                  "|---|---|---|"] + [f"| {t} | {a} | {n} |" for (t, a), n in sorted(counts.items())] + [""]
    path = os.path.join(out, f"confusion-{family}.md")
    common.write_atomic(path, lines[:-1])  # the last section's blank line is the file's last newline
    return path
