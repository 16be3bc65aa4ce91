"""
Why no control succeeds on the prior stage, measured (study/protocol.md, its thirteenth section of 2026-12-03).

1. Sensitivity or criterion. For every answer and every object of its scene the answer names, whether it also
   names that object's partner: present on kept images (a hit), absent on broken ones (a false alarm). From the
   two shares H and FA, signal detection's sensitivity d' = z(H) - z(FA) and criterion c = -(z(H) + z(FA)) / 2:
   a model that reads the image better raises d'; one that names partners less often everywhere raises c.
2. What the pairs teach: how many pool images hold a faint partner, how many true answers name one, and how many
   chosen and rejected answers of each pair set name an absent partner (the error the test counts).

    python -m study.priors_why                                        # study/priors/fit on toy-prior
    python -m study.priors_why --out study/priors/fit-pool            # the pool drawn as the held-out images
"""
import argparse
import os
import random
import statistics

import common
from eval import hallucination, priors, toyvqa
from study import priors as studypriors
from toyworld import priors as toypriors


def kinds_named(text):
    """The (colour, shape) kinds an answer names, colour and shape both given."""
    claims, _ = hallucination.answer_claims(text)
    return {(c["colour"], c["shape"]) for c in claims if c["colour"] is not None and c["shape"] is not None}


def answer_trials(text, scene, partner):
    """One answer's trials, one per object of its scene the answer names: (partner present, partner named)."""
    named = kinds_named(text)
    present = {(o["colour"], o["shape"]) for o in scene["objects"]}
    return [(partner[k] in present, partner[k] in named) for k in present if k in named]


def partner_trials(texts, scenes, partner):
    """Every answer's trials, in one list."""
    return [trial for text, scene in zip(texts, scenes) for trial in answer_trials(text, scene, partner)]


def _z(p):
    return statistics.NormalDist().inv_cdf(p)


def detection(trials):
    """H, FA, d', c and the trial counts of (present, named) trials; shares clipped to [1/2n, 1 - 1/2n]. A side
    with no trial has no share: ValueError."""
    hits = [named for present, named in trials if present]
    alarms = [named for present, named in trials if not present]
    if not hits or not alarms:
        raise ValueError(f"no trial with the partner {'present' if not hits else 'absent'}: no d'")

    def clip(k, n):
        return min(max(k / n, 0.5 / n), 1 - 0.5 / n)
    h, fa = clip(sum(hits), len(hits)), clip(sum(alarms), len(alarms))
    return dict(hit=h, false_alarm=fa, d=_z(h) - _z(fa), c=-(_z(h) + _z(fa)) / 2, present=len(hits),
                absent=len(alarms))


def interval(texts, scenes, partner, draws=1000, seed=0):
    """The 95% interval of d' over resamples of the answers (with replacement)."""
    per_answer = [answer_trials(text, scene, partner) for text, scene in zip(texts, scenes)]
    rng, n, values = random.Random(seed), len(texts), []
    for _ in range(draws):
        picked = [rng.randrange(n) for _ in range(n)]
        values.append(detection([trial for i in picked for trial in per_answer[i]])["d"])
    values.sort()
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def answers_of(records, scenes, path):
    """(texts, scenes) of an answer file over the records (WORLD/val-prior.json), in the records' order; scenes:
    WORLD/scenes.json."""
    return toyvqa.texts_of(records, common.read_jsonl(path)), [scenes[r["image"]] for r in records]


def pair_content(scenes, pairs, partner):
    """What a pair set shows DPO: shares of chosen and rejected answers naming an absent partner, over its pairs."""
    out = dict(pairs=len(pairs), chosen=0, rejected=0)
    for p in pairs:
        absent = toypriors.absent_partners(scenes[p["image"]], partner)
        out["chosen"] += bool(kinds_named(p["chosen"]) & absent)
        out["rejected"] += bool(kinds_named(p["rejected"]) & absent)
    return out


def pool_content(scenes, pairs, partner):
    """The instances' images with a faint partner, and their true answers naming it."""
    faint = named = 0
    for p in pairs:
        kinds = {(o["colour"], o["shape"]) for o in scenes[p["image"]]["objects"] if "faint" in o}
        faint += bool(kinds)
        named += bool(kinds & kinds_named(p["answer"]))
    return dict(instances=len(pairs), faint=faint, named=named)


def why(world, out):
    partner = priors.partner_map(world)
    records = common.read_records(os.path.join(world, "val-prior.json"))
    all_scenes = common.read_records(os.path.join(world, "scenes.json"))
    runs = common.read_jsonl(os.path.join(out, "runs.jsonl"), appended=True)
    texts, scenes = answers_of(records, all_scenes, os.path.join(out, "models", "model-sft-answers", "prior.jsonl"))
    start_scores = common.read_records(os.path.join(out, "models", "model-sft.prior.json"))
    start = detection(partner_trials(texts, scenes, partner))
    low, high = interval(texts, scenes, partner)
    rows = [["SFT model", "-", f"{100 * start['hit']:.1f}", f"{100 * start['false_alarm']:.1f}",
             f"{start['d']:.2f} [{low:.2f}, {high:.2f}]", f"{start['c']:.2f}", start["present"], start["absent"], "-"]]
    raised, lowered, main_runs, meeting = [], [], 0, 0
    for r in runs:
        setting = r.get("setting", "main")
        name = studypriors.run_name(r["arm"], r["seed"], setting)
        meeting += r["arm"] != "sft" and studypriors.meets(r, start_scores)
        answers = answers_of(records, all_scenes, os.path.join(out, "runs", name, "answers", "prior.jsonl"))
        found = detection(partner_trials(*answers, partner))
        above = found["d"] > high
        if r["arm"] != "sft" and setting == "main":  # every other arm trains by DPO
            main_runs += 1
            if above:
                raised.append(name)
            if found["d"] < low:
                lowered.append(name)
        rows.append([studypriors.label(setting, r["arm"]), r["seed"],
                     f"{100 * found['hit']:.1f}", f"{100 * found['false_alarm']:.1f}", f"{found['d']:.2f}",
                     f"{found['c']:.2f}", found["present"], found["absent"], "above" if above else "no"])
    lines = ["# The prior stage's partner naming: sensitivity and criterion, and what the pairs teach", "",
             "Made by `python -m study.priors_why` (study/protocol.md, its thirteenth section of 2026-12-03) from "
             f"the answer files of `{out}` on `{world}`. Exploratory.", "",
             "## 1. Sensitivity or criterion", "",
             "A trial is an object an answer names; a hit, its partner named when present (kept images); a false "
             "alarm, its partner named when absent (broken images). H and FA in percent; d' = z(H) - z(FA), "
             "c = -(z(H) + z(FA)) / 2; the SFT model's d' with its 95% interval over 1000 resamples of its answers.",
             ""]
    lines += common.markdown_table(["model", "seed", "H", "FA", "d'", "c", "trials present", "trials absent",
                                    "d' above the SFT model's interval"], rows) + [""]
    dpo_runs = sum(r["arm"] != "sft" for r in runs)
    if raised:
        verdict = (f"{', '.join(raised)} raise d' above the SFT model's interval: a criterion shift is not the whole "
                   "reason the controls fail.")
    else:
        verdict = (f"no DPO run at the main setting raises d' above the SFT model's interval, and {len(lowered)} of "
                   f"its {main_runs} lower it below: DPO lowers the partners named when absent by naming partners less "
                   "often everywhere (the criterion), and where it moves the partner rate most the model tells a "
                   "present partner from an absent one less well. DPO runs here that meet the one-run test: "
                   f"{meeting} of {dpo_runs}.")
    lines += [f"**Reading:** {verdict}", ""]
    pairs500 = common.read_jsonl(studypriors.pairs_path(out, 500))
    pool = pool_content(all_scenes, pairs500, partner)
    lines += ["## 2. What the pairs teach", "",
              f"Of the {pool['instances']} instances the step-500 pairs keep, {pool['faint']} show a faint partner "
              f"and {pool['named']} true answers name it" + (
                  ": on this pool, drawn as the training scenes are, naming a partner on weak evidence is right."
                  if pool["named"] else "."), ""]
    sets = [("seva (step 500)", pairs500)] + [
        (arm, common.read_jsonl(os.path.join(out, "runs", studypriors.run_name(arm, 0), "pairs.jsonl")))
        for arm in ("dpo-own", "dpo-seva")]
    table = []
    for name, pairs in sets:
        found = pair_content(all_scenes, pairs, partner)
        table.append([name, found["pairs"], f"{found['chosen']} ({100 * found['chosen'] / found['pairs']:.1f}%)",
                      f"{found['rejected']} ({100 * found['rejected'] / found['pairs']:.1f}%)"])
    lines += common.markdown_table(["pairs", "pairs", "chosen names an absent partner",
                                    "rejected names an absent partner"], table) + [""]
    common.write_atomic(os.path.join(out, "why.md"), ["\n".join(lines)])
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.priors_why", description=__doc__,
                                formatter_class=common.HelpFormatter)
    p.add_argument("--world", default="toy-prior",
                   help="the prior stage the runs were made on (python -m toyworld --stage prior --out WORLD)")
    p.add_argument("--out", default="study/priors/fit",
                   help="python -m study.priors's OUT: runs.jsonl, runs/, models/; why.md is written there")
    args = p.parse_args(argv)
    common.run_main(lambda: print(why(args.world, args.out)), "study.priors_why")


if __name__ == "__main__":
    main()
