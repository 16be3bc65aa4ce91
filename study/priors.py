"""
SeVa on the prior stage (python -m toyworld --stage prior): the control and SeVa's verdicts where the toy world
has a language prior, each object kind with a partner beside it (study/protocol.md, its section "2026-12-03
(fourth)"). Every run trains from the stage's SFT model and is scored by eval/priors.py on the clean held-out
images; the test of one run is the partner rate on prior-broken images (captions and descriptions) down by at
least 3 points, with Cover on broken and on kept images no more than 2 points down.

    dpo-own, dpo-seva, sft   the controls (study/control.py): the true answer as chosen, or continual SFT
    seva                     DPO on SeVa's own pairs (noise step 500)
    seva-step200/-step800    the same on pairs made at other noise steps (seed 0)
    seva-rpo, seva-lr1e-4    RPO alpha 1.0, or lr 1e-4 (seed 0): do they keep the chosen answer likely?

Every run is appended to OUT/runs.jsonl as it ends, so a rerun does only the missing ones, in the protocol's
order; OUT/report.md is rewritten after each.

    python -m study.priors                       # every run, in order (resumes)
    python -m study.priors --runs seva:0 sft:1   # just these
"""
import argparse
import json
import os
import statistics
import time

import common
import train_ddp
import vlm
from eval import priors, runner
from study import analyses, control, models, settings

ARMS = {  # name: (its pairs' noise step, or None for the controls; training overrides)
    "dpo-own": (None, {}), "dpo-seva": (None, {}), "sft": (None, {}), "seva": (500, {}),
    "seva-step200": (200, {}), "seva-step800": (800, {}),
    "seva-rpo": (500, dict(rpo_alpha=1.0)), "seva-lr1e-4": (500, dict(lr=1e-4)),
}
MAIN = dict(lr=5e-4, beta=0.1, rpo_alpha=0.0)  # the main command's training setting
ORDER = ([(a, 0) for a in ("dpo-own", "dpo-seva", "sft", "seva")]
         + [(a, s) for s in (1, 2) for a in ("dpo-own", "dpo-seva", "sft", "seva")]
         + [(a, 0) for a in ("seva-step200", "seva-step800", "seva-rpo", "seva-lr1e-4")])
FALL, COVER_SLACK = 0.03, 0.02  # support: the partner rate down >= 3 points, both Covers no more than 2 points down


# ----------------------------------------------------------------------------- pairs and runs
def pairs_path(out, step):
    """The main command's SeVa pairs on this stage at a noise step: OUT/seva-pairs-stepN.jsonl."""
    return os.path.join(out, f"seva-pairs-step{step}.jsonl")


def training_args(start, images, folder, data_path, arm, seed):
    """train_ddp.py's arguments: one process, global batch 16, LoRA r 32 / alpha 64, 1 epoch."""
    s = dict(MAIN, **ARMS[arm][1])
    argv = ["--model", start, "--image-folder", images, "--out", os.path.join(folder, "train"), "--seed", str(seed),
            "--lora-r", str(control.LORA_R), "--lora-alpha", str(2 * control.LORA_R), "--lr", str(s["lr"]),
            "--batch-size", str(settings.GLOBAL_BATCH), "--no-progress", "--cache-data", "--epochs", "1"]
    if arm == "sft":
        return argv + ["--objective", "sft", "--data", data_path]
    return argv + ["--objective", "dpo", "--pairs", data_path, "--beta", str(s["beta"]), "--rpo-alpha", str(s["rpo_alpha"])]


def score(model, processor, world, answers_dir, name, weights):
    return priors.evaluate(model, processor, name, world, answers_dir, max_new_tokens=96, batch_size=64,
                           progress=False, weights=weights)


def run_once(world, out, arm, seed):
    """Train one arm at one seed and score it; returns its row for runs.jsonl."""
    began = time.time()
    name = f"{arm}-seed{seed}"
    folder, start, images = os.path.join(out, "runs", name), os.path.join(world, "model-sft"), os.path.join(world, "images")
    step = ARMS[arm][0]
    made = control.main_command_pairs(world, "pool.json", pairs_path(out, step or 500), step or 500)
    if step is None:  # a control: its data from the step-500 pairs' instances
        data_path, dropped = control.write_data(folder, made, arm)
    else:
        os.makedirs(folder, exist_ok=True)
        data_path, dropped = pairs_path(out, step), 0
    trained = len(common.read_records(data_path)) if arm == "sft" else len(common.read_jsonl(data_path))
    argv = training_args(start, images, folder, data_path, arm, seed)
    model = train_ddp.train(train_ddp.parse_args(argv))
    model.eval()
    _, processor = vlm.load(start)
    weights = runner.fingerprint(start, os.path.join(folder, "train", "adapter"))
    row = dict(arm=arm, seed=seed, training=argv, instances=len(made), trained=trained, dropped=dropped,
               prior=score(model, processor, world, os.path.join(folder, "answers"), name, weights))
    metrics = common.read_jsonl(os.path.join(folder, "train", "metrics.jsonl"), appended=True)
    row["steps"] = len(metrics)
    if arm != "sft":
        row["logps"] = {side: [metrics[0][f"logps/{side}"], metrics[-1][f"logps/{side}"]]
                        for side in ("chosen", "rejected")}
    return dict(row, seconds=time.time() - began)


# ----------------------------------------------------------------------------- the reading
def meets(run, start):
    """One run's test (protocol): the broken images' partner rate down by FALL or more, both Covers within
    COVER_SLACK of the SFT model's."""
    r, s = run["prior"], start
    return (r["broken"]["partner_rate"] <= s["broken"]["partner_rate"] - FALL
            and all(r[k]["cover"] >= s[k]["cover"] - COVER_SLACK for k in ("broken", "kept")))


def cell_state(runs, start):
    if any(not meets(r, start) for r in runs):
        return "fails"
    return "succeeds" if len(runs) >= 3 else f"open ({len(runs)} of 3 seeds, all meet)"


COLUMNS = [("broken", "partner_rate", "partner rate, broken (primary)"), ("broken", "cover", "Cover broken"),
           ("kept", "cover", "Cover kept"), ("broken", "chair_i", "CHAIR_i broken"),
           ("broken", "chair_i_partner", "CHAIR_i partner"), ("broken", "chair_i_other", "CHAIR_i other"),
           ("kept", "chair_i", "CHAIR_i kept"), ("broken", "first_false", "first false at"),
           ("broken", "words", "words broken")]


def cells(found):
    """Mean ± sd over runs' eval/priors.py results, per column (percent, except positions and words)."""
    out = []
    for split, key, _ in COLUMNS:
        values = [f[split][key] for f in found]
        percent = key not in ("first_false", "words")
        out.append(analyses.mean_spread([100 * v if percent else v for v in values], 1 if percent else 2))
    return out


def report(out, rows, start, world):
    """OUT/report.md: the SFT model and each arm (mean ± sd over seeds), each run against the test, the reading."""
    header = ["model", "seeds"] + [c for _, _, c in COLUMNS] + ["pairs trained", "steps", "chosen log-prob first -> last",
                                                              "rejected log-prob first -> last"]
    body = [["SFT model", "-"] + cells([start]) + ["-"] * 4]
    per_seed, states = [], {}
    for arm in ARMS:
        runs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        if not runs:
            continue
        logp = lambda side: (f"{statistics.mean(r['logps'][side][0] for r in runs):.2f} -> "
                             f"{statistics.mean(r['logps'][side][1] for r in runs):.2f}") if arm != "sft" else "-"
        body.append([arm, len(runs)] + cells([r["prior"] for r in runs])
                    + [f"{statistics.mean(r['trained'] for r in runs):.0f}", f"{statistics.mean(r['steps'] for r in runs):.0f}",
                       logp("chosen"), logp("rejected")])
        states[arm] = cell_state(runs, start)
        deltas = "; ".join(
            f"seed {r['seed']}: {100 * (r['prior']['broken']['partner_rate'] - start['broken']['partner_rate']):+.1f} / "
            f"{100 * (r['prior']['broken']['cover'] - start['broken']['cover']):+.1f} / "
            f"{100 * (r['prior']['kept']['cover'] - start['kept']['cover']):+.1f} ({'meets' if meets(r, start) else 'fails'})"
            for r in runs)
        per_seed.append([arm, len(runs), deltas, states[arm]])
    lines = ["# SeVa on the prior stage: the control and the verdicts", "",
             f"Made by `python -m study.priors` on `{world}` (`python -m toyworld --stage prior`), registered in "
             "[protocol.md](../protocol.md), section \"2026-12-03 (fourth)\", before the stage was built. Scored by "
             f"`eval/priors.py` on {start['broken captions']['answers']} captions and "
             f"{start['broken descriptions']['answers']} descriptions of prior-broken images, and as many of "
             "prior-kept ones. Percent "
             "except positions and words; mean ± sd over seeds. Partner rate: answers naming an absent partner.", "",
             "**Exploratory.** No build of the stage met every band (protocol.md, sections five to eight; "
             "study/priors/builds/), so nothing below is a verdict on the paper's claims; the reading below is the "
             "registered rule's, applied to an exploration.", ""]
    lines += common.markdown_table(header, body) + [""]
    lines += ["Each run's change against the SFT model (points): partner rate broken / Cover broken / Cover kept, "
              "and the registered test:", ""]
    lines += common.markdown_table(["arm", "seeds", "changes per seed", "cell"], per_seed) + [""]
    lines += ["## The reading (protocol.md's rule)", "", reading(states), ""]
    common.write_atomic(os.path.join(out, "report.md"), ["\n".join(lines)])


def reading(states):
    dpo = [a for a in ("dpo-own", "dpo-seva") if states.get(a) == "succeeds"]
    decided = all(a in states and not states[a].startswith("open") for a in ("dpo-own", "dpo-seva", "sft"))
    if dpo:
        seva_state = states.get("seva", "not run")
        return (f"A DPO control succeeds ({', '.join(dpo)}): the stage can show a DPO gain on prior-driven "
                f"hallucination, so SeVa's verdicts are read here. SeVa's cell: {seva_state}.")
    if states.get("sft") == "succeeds":
        return ("Only continual SFT succeeds: the stage shows a gain, but not by DPO; SeVa's rows are comparisons "
                "only.")
    if not decided:
        return "Not every control cell is decided yet: no reading."
    return ("No control cell succeeds: SeVa's verdicts are untested on this stage too; its rows are comparisons "
            "only.")


# ----------------------------------------------------------------------------- the command
def main(argv=None):
    common.run_main(lambda: run(argv), "study.priors")


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.priors", description=__doc__,
                                formatter_class=common.HelpFormatter)
    p.add_argument("--world", default="toy-prior", help="the prior stage (python -m toyworld --stage prior --out WORLD)")
    p.add_argument("--out", default="study/priors", help="runs.jsonl, report.md, the pairs, each run's files")
    p.add_argument("--runs", nargs="+", metavar="ARM:SEED",
                   help="only these runs (default: every run of the protocol, in its order)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if not os.path.exists(os.path.join(args.world, "val-prior.json")):
        p.error(f"{args.world} is not a prior-stage world (python -m toyworld --stage prior --out {args.world})")
    order = ORDER
    if args.runs:
        order = []
        for item in args.runs:
            arm, _, seed = item.partition(":")
            if arm not in ARMS or not seed.isdigit():
                p.error(f"--runs {item!r}: want ARM:SEED, ARM one of {', '.join(ARMS)}")
            order.append((arm, int(seed)))
    os.makedirs(args.out, exist_ok=True)
    start = models.once(args.out, os.path.join(args.world, "model-sft"), ".prior.json",
                        lambda model, processor, name, weights: score(
                            model, processor, args.world, os.path.join(args.out, "models", name + "-answers"), name,
                            weights))
    log = os.path.join(args.out, "runs.jsonl")
    rows = common.read_jsonl(log, appended=True)
    for arm, seed in order:
        if any(r["arm"] == arm and r["seed"] == seed for r in rows):
            continue
        row = run_once(args.world, args.out, arm, seed)
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        report(args.out, rows, start, args.world)
    report(args.out, rows, start, args.world)
    print(open(os.path.join(args.out, "report.md")).read())


if __name__ == "__main__":
    main()
