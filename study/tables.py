"""
OUT/report.md: per ablation and value, its table (pairs, pair quality, margin, accuracy), the protocol's table
on the open stage, consistency and pair-wise outcomes where measured, the accuracy change by family, the
exploratory search's section and the fits across runs.
"""
import json
import os
import statistics

import common
import pairs
from eval import gallery_compare, hallucination
from study.analyses import accuracy_of, mean_spread, pair_claims_analysis, pair_quality_analysis
from study import settings
from study.settings import ABLATIONS, BASE, TEMPERATURES, label, matches, search_settings, setting_of


# The protocol's primary metric first, then its guards and the secondary ones: (key, column, percent).
OPEN_COLUMNS = [("chair_i_desc", "CHAIR_i desc (primary)", True), ("cover_desc", "Cover desc", True),
                ("words_desc", "words desc", False), ("chair_s_desc", "CHAIR_s desc", True),
                ("shr_desc", "SHR-like desc", True), ("chair_i_cap", "CHAIR_i cap", True),
                ("cover_cap", "Cover cap", True), ("sentences", "sentence answers", True),
                ("pope_f1", "POPE F1", True), ("pope_yes", "POPE yes-ratio", False)]


def table(runs_of_ablation, key, values):
    lines = [f"| {key} | seeds | pairs kept % | trained: chosen right & rejected wrong % | trained: inverted % | "
             f"pairs trained | mean reward margin | start | accuracy | delta vs start |", "|---" * 10 + "|"]
    for value in values:
        runs = [r for r in runs_of_ablation if matches(r, key, value, values)]
        if not runs:
            continue
        share = lambda k: [100 * r["trained_quality"][k] / max(1, sum(r["trained_quality"].values()))
                           for r in runs if r["trained_quality"]]
        margins = [r["mean_margin"] for r in runs if r["mean_margin"] is not None]
        delta = statistics.mean(accuracy_of(r) - r["start_accuracy"]["overall"] for r in runs)
        lines.append(f"| {label(value)} | {len(runs)} | {mean_spread([r['kept_percent'] for r in runs])} | "
                     f"{mean_spread(share(pairs.QUALITY[0])) if share(pairs.QUALITY[0]) else '-'} | "
                     f"{mean_spread(share(pairs.QUALITY[2])) if share(pairs.QUALITY[2]) else '-'} | "
                     f"{statistics.mean(r['pairs_trained'] for r in runs):.0f} | "
                     f"{mean_spread(margins) if margins else ('-' if any(r['steps'] for r in runs) else 'no step')} | "
                     f"{statistics.mean(r['start_accuracy']['overall'] for r in runs):.3f} | "
                     f"{mean_spread([accuracy_of(r) for r in runs])} | {delta:+.3f} |")
    return lines


def open_table(runs_of_ablation, key, values, start):
    """Per value: every protocol metric, mean ± sd over seeds, with the start (SFT) model's row first. A value
    whose descriptions name fewer than half the objects the SFT model's name (Cover) is marked collapsed: its
    low CHAIR_i would come from saying almost nothing."""
    cell = lambda v, percent: f"{100 * v:.1f}" if percent else f"{v:.2f}"
    fewer = hallucination.PAIR_CLASSES[0]
    lines = [f"| {key} | seeds | short answers | " + " | ".join(c for _, c, _ in OPEN_COLUMNS) + " | chosen log-prob "
             f"first -> last | trained: {fewer} % |", "|---" * (len(OPEN_COLUMNS) + 5) + "|",
             "| SFT model | - | " + f"{100 * start['accuracy']['overall']:.1f} | "
             + " | ".join(cell(start["open"].get(k, float("nan")), p) for k, _, p in OPEN_COLUMNS) + " | - | - |"]
    if key == "sft_epochs":  # each value starts from its own SFT model
        for value in values:
            first = next((r for r in runs_of_ablation if matches(r, key, value) and r.get("start_open")), None)
            if first:
                lines.append(f"| SFT model, {value} epochs | - | {100 * first['start_accuracy']['overall']:.1f} | "
                             + " | ".join(cell(first["start_open"][k], p) for k, _, p in OPEN_COLUMNS) + " | - | - |")
    for value in values:
        runs = [r for r in runs_of_ablation if matches(r, key, value, values) and r.get("open")]
        if not runs:
            continue
        spread = lambda xs, percent: (mean_spread([100 * x for x in xs], 1) if percent else mean_spread(xs, 2))
        logps = [r["chosen_logps"] for r in runs if r.get("chosen_logps")]
        shares = [r["pair_claims"][fewer] / sum(r["pair_claims"].values()) for r in runs
                  if r.get("pair_claims") and sum(r["pair_claims"].values())]
        collapsed = statistics.mean(r["open"]["cover_desc"] for r in runs) < start["open"]["cover_desc"] / 2
        lines.append(f"| {label(value)}{' **(collapsed)**' if collapsed else ''} | {len(runs)} | "
                     f"{spread([accuracy_of(r) for r in runs], True)} | "
                     + " | ".join(spread([r["open"][k] for r in runs], p) for k, _, p in OPEN_COLUMNS) + " | "
                     + (f"{statistics.mean(a for a, _ in logps):.2f} -> {statistics.mean(b for _, b in logps):.2f}"
                        if logps else "-") + f" | {spread(shares, True) if shares else '-'} |")
    return lines


def consistency_table(runs, start):
    """C5: per model, the share of short answers sampled at each temperature that equal the greedy one (mean ±
    sd over seeds; the SFT model sampled with the same seeds). start: start_consistency's {seed: {t: share}}."""
    runs = [r for r in runs if r.get("consistency")]
    if not runs:
        return []
    seeds = sorted({str(r["seed"]) for r in runs})
    lines = ["| model | seeds | " + " | ".join(f"same as greedy at T = {t} %" for t in TEMPERATURES) + " |",
             "|---" * (len(TEMPERATURES) + 2) + "|"]
    for name, shares in (("SFT model", [start[seed] for seed in seeds if seed in start]),
                         ("SeVa", [r["consistency"] for r in runs])):
        lines.append(f"| {name} | {len(shares)} | "
                     + " | ".join(mean_spread([100 * c[str(t)] for c in shares], 1) for t in TEMPERATURES) + " |")
    return lines + [""]


def pairwise_table(runs):
    """Fig. 5's table: per kind, won / lost / tied (mean ± sd over seeds) and mean words before -> after."""
    runs = [r for r in runs if r.get("pairwise")]
    if not runs:
        return []
    lines = [f"Pair-wise outcomes of {len(runs)} seeds, question by question, SeVa's answer against the SFT "
             "model's by the rule of its kind (eval/gallery_compare.py RULES: captions and descriptions, fewer false claims "
             "wins; the others, right where the other is wrong wins).", "",
             "| kind | questions | won | lost | tied | words: SFT -> SeVa |", "|---" * 6 + "|"]
    for kind in runs[0]["pairwise"]:
        counts = [r["pairwise"][kind] for r in runs]
        lines.append(f"| {kind} | {sum(counts[0][o] for o in gallery_compare.OUTCOMES)} | "
                     + " | ".join(mean_spread([c[o] for c in counts], 1) for o in gallery_compare.OUTCOMES)
                     + f" | {statistics.mean(c['words_start'] for c in counts):.1f} -> "
                       f"{mean_spread([c['words'] for c in counts], 1)} |")
    return lines + [""]


def family_table(rows):
    """Does any setting help some question families while hurting others? Mean change per family."""
    families = [k for k in rows[0]["start_accuracy"] if k != "overall"]
    lines = ["## Accuracy change by question family (mean over seeds, against the start model)", "",
             "| ablation | value | " + " | ".join(families) + " | overall |",
             "|---|---|" + "---|" * (len(families) + 1)]
    for name, (_, key, values) in ABLATIONS.items():
        for value in values:
            runs = [r for r in rows if r["ablation"] == name and matches(r, key, value, values)]
            if runs:
                change = [statistics.mean(accuracy_of(r, f) - r["start_accuracy"][f] for r in runs)
                          for f in families + ["overall"]]
                lines.append(f"| {name} | {label(value)} | " + " | ".join(f"{c:+.3f}" for c in change) + " |")
    return lines + [""]


def wall_time(rows):
    """The report's wall-time line: the measured mean per run (rows record it since it was added) and what
    `ablations.py all` would take on this machine at that rate, every value of every ablation with 3 seeds."""
    timed = [r["seconds"] for r in rows if r.get("seconds") and r.get("steps")]
    if not timed:
        return []
    runs = {(json.dumps(dict(BASE, **setting_of(key, value)), sort_keys=True), seed)
            for _, key, values in ABLATIONS.values() for value in values for seed in (0, 1, 2)}
    runs |= {(json.dumps(dict(BASE, **s), sort_keys=True), 0) for s in search_settings()}
    every = len(runs) + len(settings.CONFIRM_SEEDS)
    median = statistics.median(timed)  # a run that shared the machine with other work takes longer
    return [f"Wall time: {median / 60:.1f} min per trained run, the median of {len(timed)} runs timed (2 CPU cores, "
            f"other work on the machine at times); `python -m study all` is {every} distinct runs (each table's "
            f"runs of the default setting are made once), about {every * median / 3600:.1f} hours at that rate, plus "
            "the SFT models of the SFT-strength table. Each command appends its runs to runs.jsonl as they end and "
            "skips those already there, so a crashed command resumes where it stopped.", ""]


def report(out, rows, base, argv, base_open=None, base_consistency=None, exploratory=()):
    """OUT/report.md: per ablation, per value: pairs kept, pair quality, reward margin, accuracy (mean ± sd); the
    accuracy change by question family; and the pair-quality analysis. base: the SFT model's accuracy;
    base_open: its open-stage metrics (an open-stage world), which add study/protocol.md's table per
    ablation."""
    here = lambda name: os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), out)
    lines = ["# SeVa's ablations on the toy world", "",
             f"Made by `python -m study {' '.join(argv)}`. Mean ± standard deviation over seeds "
             f"(seeds vary the pair sampling, the noise and the DPO data order; the SFT model is fixed except in "
             f"the SFT-strength ablation). What the numbers say, and why: [findings.md]({here('findings.md')}).", "",
             f"SFT baseline accuracy on toy/val.json: overall {base['overall']:.3f} "
             f"({', '.join(f'{k} {v:.2f}' for k, v in base.items() if k != 'overall')}).", ""]
    if base_open:
        lines += [f"Open stage. What was chosen when: the stage and its bands, then [protocol.md]({here('protocol.md')}) (the "
                  "settings, the metrics, and what would count as support or refutation of each claim), were "
                  "committed before any SeVa result on the stage was read. In each ablation's protocol table: "
                  "percent except words and the yes-ratio; CHAIR and SHR lower is better; the chosen log-prob is "
                  "the policy's mean over the step's pairs at the first and last step; **(collapsed)**: the "
                  "descriptions name fewer than half the objects the SFT model's do, so a low CHAIR_i is no gain.",
                  ""]
    else:
        lines += [
             "What was chosen when: the toy world (data sizes, model, SFT) was fixed to meet its own bands "
             "(val accuracy 55-90%, >= 15% of answers changed by noise at step 500) before any SeVa run. "
             "The DPO settings shared by every run (LoRA r 32 / alpha 64, lr 5e-4, 1 epoch, beta 0.1, global "
             "batch 16, diffusion step 500, 1000 instances) are train_ddp.py's and run_toy.sh's defaults, set "
             "before any SeVa evaluation; two SeVa evaluations of run_toy.sh (2 epochs, then 1) were seen "
             "before the paper's ablations ran and nothing was changed after them. The SFT-strength, pair-filter, "
             "learning-rate and beta ablations were added after the paper's ablations had shown every setting "
             "lowering accuracy; their values were fixed before any of their runs, and the defaults were not "
             "changed after them.", ""]
    lines += wall_time(rows)
    for name, (title, key, values) in ABLATIONS.items():
        mine = [r for r in rows if r["ablation"] == name]
        if mine:
            lines += [f"## {title}", "", f"`python -m study {name} --seeds "
                      f"{' '.join(map(str, sorted({r['seed'] for r in mine})))}`", ""] + table(mine, key, values) + [""]
            if base_open:
                lines += open_table(mine, key, values, dict(accuracy=base, open=base_open)) + [""]
            if name == "consistency" and base_consistency:
                lines += consistency_table(mine, base_consistency)
            if name == "fig5":
                lines += pairwise_table(mine)
    lines += list(exploratory) + family_table(rows) + pair_quality_analysis(rows)
    lines += pair_claims_analysis(rows, base_open) if base_open else []
    lines += ["Runs with fewer pairs than one global batch (16) train no step: their accuracy is their start "
              "model's. *start* is the accuracy of the SFT model the run started from.", ""]
    common.write_atomic(os.path.join(out, "report.md"), lines)


def guarded(scores, accuracy, base_open, base):
    """Whether a model keeps Cover and short-answer accuracy within settings.GUARD of the SFT model's."""
    return scores["cover_desc"] >= base_open["cover_desc"] - settings.GUARD and accuracy >= base["overall"] - settings.GUARD


def search_best(rows, base, base_open):
    """The searched setting with the lowest descriptions' CHAIR_i among the guarded ones (seed 0), or None."""
    searched = [r for r in rows if r["ablation"] == "search" and r.get("open")]
    ok = [r for r in searched if guarded(r["open"], accuracy_of(r), base_open, base)]
    return min(ok, key=lambda r: r["open"]["chair_i_desc"])["setting"] if ok else None


def search_report(rows, base, base_open, start_confirm):
    """The exploratory section: every searched setting (seed 0), then the best one's confirmation."""
    searched = [r for r in rows if r["ablation"] == "search" and r.get("open")]
    if not searched:
        return []
    pct = lambda v: f"{100 * v:.1f}"
    changed = lambda setting: ", ".join(f"{k} {v}" for k, v in setting.items() if BASE.get(k) != v) or "default"
    lines = ["## Exploratory: a search for a setting that lowers CHAIR_i without losing Cover or accuracy", "",
             "Reported apart from the confirmatory tables ([protocol.md](../protocol.md), \"Exploratory\"). Seed 0 "
             f"each; *guarded*: Cover and short-answer accuracy within {100 * settings.GUARD:.0f} points of the SFT model's.",
             "", "| setting | CHAIR_i desc | Cover desc | words desc | short answers | guarded |", "|---" * 6 + "|",
             f"| SFT model | {pct(base_open['chair_i_desc'])} | {pct(base_open['cover_desc'])} | "
             f"{base_open['words_desc']:.2f} | {pct(base['overall'])} | - |"]
    for r in sorted(searched, key=lambda r: r["open"]["chair_i_desc"]):
        lines.append(f"| {changed(r['setting'])} | {pct(r['open']['chair_i_desc'])} | {pct(r['open']['cover_desc'])} "
                     f"| {r['open']['words_desc']:.2f} | {pct(accuracy_of(r))} | "
                     f"{'yes' if guarded(r['open'], accuracy_of(r), base_open, base) else 'no'} |")
    best = search_best(rows, base, base_open)
    confirmed = [r for r in rows if r["ablation"] == "confirm" and r.get("confirm")]
    if best is None:
        return lines + ["", "No searched setting kept Cover and accuracy within the guard: nothing to confirm, "
                            "no setting found.", ""]
    lines += ["", f"The best guarded setting, **{changed(best)}**, on seeds {', '.join(map(str, settings.CONFIRM_SEEDS))} and "
                  "the confirmation split (new images and questions, data seed "
                  f"{settings.CONFIRM_DATA_SEED}, never seen by the search):", "",
              "| model | seeds | CHAIR_i desc | Cover desc | words desc | CHAIR_i cap | Cover cap | short answers |",
              "|---" * 8 + "|"]
    keys = ("chair_i_desc", "cover_desc", "words_desc", "chair_i_cap", "cover_cap")
    cells = lambda scores: [mean_spread([100 * s[k] if k != "words_desc" else s[k] for s in scores], 1)
                            for k in keys] + [mean_spread([100 * s["accuracy"]["overall"] for s in scores], 1)]
    if start_confirm:
        lines.append("| SFT model | - | " + " | ".join(cells([start_confirm])) + " |")
    if confirmed:
        scores = [r["confirm"] for r in confirmed]
        lines.append(f"| searched best | {len(scores)} | " + " | ".join(cells(scores)) + " |")
        mean = lambda k: statistics.mean(s[k] for s in scores)
        found = (mean("chair_i_desc") <= start_confirm["chair_i_desc"] - 0.03
                 and guarded(dict(cover_desc=mean("cover_desc")),
                             statistics.mean(s["accuracy"]["overall"] for s in scores),
                             start_confirm, start_confirm["accuracy"]))
        lines += ["", f"By the protocol's test (CHAIR_i down 3 points or more, Cover and accuracy within "
                      f"{100 * settings.GUARD:.0f}): **{'found' if found else 'not found'}**."]
    return lines + [""]
