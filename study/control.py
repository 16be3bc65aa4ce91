"""
The control the study lacked: can preference training lower hallucination on the open stage at all?

SeVa's pairs are the SFT model's answer on the image (chosen) against its answer under noise (rejected). The
controls keep the main command's instances (runs/seva/pairs.jsonl) and put the data's true answer on the chosen
side, which SeVa never sees (study/protocol.md, its section "2026-12-03: the control"):

    dpo-own    DPO: chosen = the true answer, rejected = the SFT model's own answer where it is false, else its
               answer under noise
    dpo-seva   DPO: chosen = the true answer, rejected = the SeVa pair's rejected answer (dropped where right)
    sft        continual SFT on the same instances' true answers

each at two training settings (the main command's, and the study's best guarded setting) and seeds 0, 1, 2.
A cell succeeds when, in every seed, captions' CHAIR_i (the trained task) falls by at least 3 points with
captions' Cover no more than 2 points below the SFT model's. Every run is appended to OUT/runs.jsonl as it ends,
so a rerun does only the missing ones; OUT/report.md is rewritten after each.

    python -m study.control                       # every control, setting and seed
    python -m study.control --controls dpo-own --settings main --seeds 0
    python -m study.control --why                 # per-pair log-prob change against the pairs' similarity
"""
import argparse
import json
import os
import statistics
import time

import common
import seva
import train_ddp
import vlm
from eval import hallucination, runner
from study import ablations, analyses, models, scores, settings
from study import control_why as why

CONTROLS = ("dpo-own", "dpo-seva", "sft")
# The training settings (protocol, "the two settings"): the main command's, and the exploratory search's best
# guarded setting, whose noise step chose only SeVa's pairs and so does not apply to the controls' fixed pairs.
SETTINGS = {"main": dict(lr=5e-4, beta=0.1, rpo_alpha=0.0, ld_alpha=None),
            "guarded": dict(lr=1e-4, beta=0.5, rpo_alpha=0.5, ld_alpha=0.5),
            # exploratory, registered after the control was read (protocol's third section of 2026-12-03)
            "long": dict(lr=5e-4, beta=0.1, rpo_alpha=0.0, ld_alpha=None, epochs=3),
            # exploratory, the reason measured (protocol's ninth section of 2026-12-03): dpo-own, seed 0, the main
            # setting with one thing changed: LoRA's rank, full fine-tuning (at lr 5e-5: every weight moves, so
            # the LoRA lr would be too large), a lower lr, images never trained on (pairs_file: their own pairs)
            "r8": dict(lr=5e-4, beta=0.1, rpo_alpha=0.0, ld_alpha=None, lora_r=8),
            "r128": dict(lr=5e-4, beta=0.1, rpo_alpha=0.0, ld_alpha=None, lora_r=128),
            "full": dict(lr=5e-5, beta=0.1, rpo_alpha=0.0, ld_alpha=None, lora_r=0),
            "lr5e-5": dict(lr=5e-5, beta=0.1, rpo_alpha=0.0, ld_alpha=None),
            "unseen": dict(lr=5e-4, beta=0.1, rpo_alpha=0.0, ld_alpha=None, pairs_file="seva-pairs-unseen.jsonl")}
REGISTERED = ("main", "guarded")  # the settings the control's reading is over
LORA_R = 32  # alpha 2r, as every study run
FALL, COVER_SLACK = 0.03, 0.02  # support: CHAIR_i down >= 3 points, Cover no more than 2 points down


# ----------------------------------------------------------------------------- the controls' data
def right(answer, truth):
    """Whether an answer equals the true one (seva.normalize: case, spaces, trailing punctuation)."""
    return seva.normalize(answer) == seva.normalize(truth)


def control_pairs(seva_pairs, control):
    """The control's DPO pairs from SeVa's kept pairs, and how many instances were dropped. dpo-own: rejected =
    the SFT model's answer on the image (SeVa's chosen) where it is false, else its answer under noise (SeVa's
    rejected, which then differs from the true answer); dpo-seva: rejected = SeVa's rejected, the instance
    dropped where that is right. Pairs without a true answer are dropped too."""
    made, dropped = [], 0
    for pair in seva_pairs:
        truth = pair.get("answer")
        if truth is None or isinstance(pair["rejected"], list):
            dropped += 1
            continue
        if control == "dpo-own":
            rejected = pair["rejected"] if right(pair["chosen"], truth) else pair["chosen"]
        else:
            rejected = pair["rejected"]
        if right(rejected, truth):
            dropped += 1
            continue
        made.append(dict(id=pair["id"], image=pair["image"], question=pair["question"], chosen=truth,
                         rejected=rejected, answer=truth, control=control))
    return made, dropped


def write_data(folder, seva_pairs, control):
    """The run's training file (pairs.jsonl for DPO, sft.json of the true answers for SFT) and the instances
    dropped."""
    os.makedirs(folder, exist_ok=True)
    if control == "sft":  # ablations.sft_records reads the kept pairs from FOLDER/pairs.jsonl
        common.write_atomic(os.path.join(folder, "pairs.jsonl"), [json.dumps(p) for p in seva_pairs])
        path = ablations.sft_records(folder)
        return path, len(seva_pairs) - len(json.load(open(path)))
    made, dropped = control_pairs(seva_pairs, control)
    path = os.path.join(folder, "pairs.jsonl")
    common.write_atomic(path, [json.dumps(p) for p in made])
    return path, dropped


def main_command_pairs(world, pool_file, path, noise_step=500):
    """The main command's SeVa pairs (seva.py: textvqa and ocr_vqa, 1000 instances, seed 0) from WORLD's SFT
    model on WORLD/POOL_FILE at a noise step, written to PATH once and read back after."""
    if not os.path.exists(path):
        seva.main(["--model", os.path.join(world, "model-sft"), "--data", os.path.join(world, pool_file),
                   "--image-folder", os.path.join(world, "images"), "--subsets", "textvqa,ocr_vqa", "--num-samples",
                   "1000", "--batch-size", "64", "--noise-step", str(noise_step), "--seed", "0", "--no-progress",
                   "--out", path])
    return common.read_jsonl(path)


def lora_rank(setting):
    """A setting's LoRA rank; 0: full fine-tuning of the language model."""
    return SETTINGS[setting].get("lora_r", LORA_R)


# ----------------------------------------------------------------------------- one run
def score(model, processor, world, answers_dir, model_id, weights):
    """scores.score_open's metrics without POPE (protocol, the control's second section: POPE is evidence
    for no claim on this stage, and the shared machine cannot afford its 1080 probes per run)."""
    found = hallucination.evaluate(model, processor, model_id, world, os.path.join(world, "images"), answers_dir,
                                   max_new_tokens=96, batch_size=64, progress=False, weights=weights)
    scores = {f"{metric}_{short}": found[kind][metric] for kind, short in (("caption", "cap"), ("description", "desc"))
              for metric in ("chair_i", "chair_s", "cover", "shr", "words")}
    return dict(scores, sentences=found["sentence"]["overall"])


def run_name(control, setting, seed):
    return f"{control}-{setting}-seed{seed}"


def training_args(start, images, folder, data_path, control, setting, seed):
    """train_ddp.py's arguments of one run: one process, global batch 16, LoRA r 32 / alpha 64, 1 epoch."""
    return values_args(start, images, folder, data_path, control == "sft", SETTINGS[setting], seed)


def values_args(start, images, folder, data_path, sft, s, seed):
    """train_ddp.py's arguments from a setting's values `s` (lr, beta, rpo_alpha, ld_alpha; lora_r and epochs if
    not LORA_R and 1): continual SFT on data_path when sft, else DPO on its pairs."""
    rank = s.get("lora_r", LORA_R)
    argv = ["--model", start, "--image-folder", images, "--out", os.path.join(folder, "train"), "--seed", str(seed),
            "--lora-r", str(rank), "--lora-alpha", str(2 * rank), "--lr", str(s["lr"]),
            "--batch-size", str(settings.GLOBAL_BATCH), "--no-progress", "--cache-data",
            "--epochs", str(s.get("epochs", 1))]
    if sft:
        return argv + ["--objective", "sft", "--data", data_path]
    argv += ["--objective", "dpo", "--pairs", data_path, "--beta", str(s["beta"]), "--rpo-alpha", str(s["rpo_alpha"])]
    return argv + (["--ld-alpha", str(s["ld_alpha"])] if s["ld_alpha"] is not None else [])


def run_once(world, out, seva_pairs, control, setting, seed):
    """Train one control and score it as the study scores every run; returns its row for runs.jsonl."""
    began = time.time()
    name = run_name(control, setting, seed)
    folder, start, images = os.path.join(out, "runs", name), os.path.join(world, "model-sft"), os.path.join(world, "images")
    data_path, dropped = write_data(folder, seva_pairs, control)
    trained = len(json.load(open(data_path))) if control == "sft" else len(common.read_jsonl(data_path))
    argv = training_args(start, images, folder, data_path, control, setting, seed)
    model = train_ddp.train(train_ddp.parse_args(argv))
    model.eval()
    _, processor = vlm.load(start)
    answers = os.path.join(folder, "answers")
    weights = (runner.fingerprint(start, os.path.join(folder, "train", "adapter")) if lora_rank(setting) else
               runner.fingerprint(os.path.join(folder, "train", "model")))
    row = dict(control=control, setting=setting, seed=seed, training=argv, instances=len(seva_pairs),
               trained=trained, dropped=dropped,
               accuracy=scores.short_answers(model, processor, world, answers),
               open=score(model, processor, world, answers, name, weights))
    metrics = common.read_jsonl(os.path.join(folder, "train", "metrics.jsonl"), appended=True)
    row["steps"] = len(metrics)
    if control != "sft":  # likelihood displacement: the policy's mean log-probs at the first and last step
        row["logps"] = {side: [metrics[0][f"logps/{side}"], metrics[-1][f"logps/{side}"]]
                        for side in ("chosen", "rejected")}
    return dict(row, seconds=time.time() - began)


def schedule(rows, start, controls, settings, seeds):
    """The next (control, setting, seed) to run, or None (protocol, the control's second section): the first seed
    of every cell; then the other seeds of the cells whose first seed meets the test (only they can still
    succeed); then the rest."""
    done = {(r["control"], r["setting"], r["seed"]) for r in rows}
    cells = [(c, s) for s in settings for c in controls]
    first = [(c, s, seeds[0]) for c, s in cells]
    open_cells = [(c, s) for c, s in cells if any(r["control"] == c and r["setting"] == s and r["seed"] == seeds[0]
                                                  and verdict(r, start) for r in rows)]
    later = [(c, s, seed) for c, s in open_cells for seed in seeds[1:]]
    rest = [(c, s, seed) for c, s in cells for seed in seeds[1:]]
    return next((run for run in first + later + rest if run not in done), None)


# ----------------------------------------------------------------------------- the reading
def verdict(run, start):
    """One seed's test: captions' CHAIR_i down by FALL or more, captions' Cover down by no more than COVER_SLACK."""
    o, s = run["open"], start["open"]
    return o["chair_i_cap"] <= s["chair_i_cap"] - FALL and o["cover_cap"] >= s["cover_cap"] - COVER_SLACK


def collapsed(scores, start):
    """Descriptions or captions naming fewer than half the objects the SFT model's name."""
    return any(scores[k] < start["open"][k] / 2 for k in ("cover_desc", "cover_cap"))


COLUMNS = [("chair_i_cap", "CHAIR_i cap (primary)", True), ("cover_cap", "Cover cap (guard)", True),
           ("chair_i_desc", "CHAIR_i desc", True), ("cover_desc", "Cover desc", True),
           ("words_cap", "words cap", False), ("words_desc", "words desc", False),
           ("sentences", "sentence answers", True)]


def cells(scores, accuracy):
    """A table row's cells: each column's mean ± sd over the scores given, then short answers."""
    spread = lambda xs, p: analyses.mean_spread([100 * x for x in xs], 1) if p else analyses.mean_spread(xs, 2)
    return [spread([s.get(k, float("nan")) for s in scores], p) for k, _, p in COLUMNS] + [spread(accuracy, True)]


def reference_rows(rows_of_study, start):
    """SeVa's own rows from the study (study/open/runs.jsonl) that started from this same SFT model, as (setting,
    title, rows): the default setting (table2) and the best guarded setting's seed-0 search run."""
    # rows older than the start_open field started from the SFT model the study's newer rows record
    recorded = next((r["start_open"] for r in rows_of_study if r.get("start_open")), None)
    same = [r for r in rows_of_study if (r.get("start_open") or recorded) == start["open"] and r.get("open")
            and r.get("steps")]
    found = []
    default = {json.dumps(r["setting"], sort_keys=True) + str(r["seed"]): r for r in same if r["ablation"] == "table2"}
    if default:
        found.append(("main", "SeVa, the default setting (study/open)", list(default.values())))
    best = [r for r in same if r["ablation"] == "search" and r["setting"].get("noise_step") == 800
            and r["setting"].get("lr") == 1e-4 and r["setting"].get("beta") == 0.5
            and r["setting"].get("rpo_alpha") == 0.5 and r["setting"].get("ld_alpha") == 0.5]
    if best:
        found.append(("guarded", "SeVa, the best guarded setting with its noise step 800 (study/open search)", best))
    return found


def report(out, rows, start, seva_path, references=()):
    """OUT/report.md: per setting, the SFT model, SeVa's study rows and each control (mean ± sd over seeds), then
    each cell's seeds against the registered test, and the reading."""
    header = ["model", "seeds"] + [c for _, c, _ in COLUMNS] + ["short answers", "pairs trained", "steps",
                                                               "chosen log-prob first -> last",
                                                               "rejected log-prob first -> last"]
    lines = ["# The control: preference training with the true answer as chosen", "",
             "Made by `python -m study.control` from the main command's pairs (" + seva_path + f", {len(rows) and rows[0]['instances']} "
             "instances). Pre-registered in [protocol.md](../protocol.md), section \"2026-12-03: the control\", "
             "committed before any of these runs. Percent except words; mean ± sd over seeds; "
             "**(collapsed)**: captions or descriptions name fewer than half the objects the SFT model's do.", ""]
    successes = []
    for setting, config in SETTINGS.items():
        mine = [r for r in rows if r["setting"] == setting]
        if not mine:
            continue
        lines += [f"## Setting `{setting}`: " + ", ".join(f"{k} {'off' if v is None else v}" for k, v in config.items()),
                  ""] + (["Exploratory, registered after the control's cells were read; apart from the reading.", ""]
                         if setting not in REGISTERED else [])
        body = [["SFT model", "-"] + cells([start["open"]], [start["accuracy"]["overall"]]) + ["-"] * 4]
        for title, runs in [(title, runs) for where, title, runs in references if where == setting]:
            body.append([title, len(runs)] + cells([r["open"] for r in runs], [analyses.accuracy_of(r) for r in runs])
                        + [f"{statistics.mean(r['pairs_trained'] for r in runs):.0f}",
                           f"{statistics.mean(r['steps'] for r in runs):.0f}",
                           f"{statistics.mean(r['chosen_logps'][0] for r in runs):.2f} -> "
                           f"{statistics.mean(r['chosen_logps'][1] for r in runs):.2f}", "-"])
        for control in CONTROLS:
            runs = [r for r in mine if r["control"] == control]
            if not runs:
                continue
            logp = lambda side: (f"{statistics.mean(r['logps'][side][0] for r in runs):.2f} -> "
                                 f"{statistics.mean(r['logps'][side][1] for r in runs):.2f}") if control != "sft" else "-"
            mark = " **(collapsed)**" if any(collapsed(r["open"], start) for r in runs) else ""
            body.append([f"{control}{mark}", len(runs)] + cells([r["open"] for r in runs],
                                                              [r["accuracy"]["overall"] for r in runs])
                        + [f"{statistics.mean(r['trained'] for r in runs):.0f}",
                           f"{statistics.mean(r['steps'] for r in runs):.0f}", logp("chosen"), logp("rejected")])
        lines += common.markdown_table(header, body) + [""]
        per_seed = []
        for control in CONTROLS:
            runs = sorted((r for r in mine if r["control"] == control), key=lambda r: r["seed"])
            if not runs:
                continue
            deltas = "; ".join(f"seed {r['seed']}: {100 * (r['open']['chair_i_cap'] - start['open']['chair_i_cap']):+.1f}"
                               f" / {100 * (r['open']['cover_cap'] - start['open']['cover_cap']):+.1f}"
                               f" ({'meets' if verdict(r, start) else 'fails'})" for r in runs)
            state = cell_state(runs, start)
            successes += [(control, setting)] * (state == "succeeds")
            per_seed.append([control, len(runs), deltas, f"**{state}**" if state == "succeeds" else state])
        lines += ["Each seed's change of captions' CHAIR_i / Cover against the SFT model (points), and the "
                  "registered test:", ""]
        lines += common.markdown_table(["control", "seeds", "CHAIR_i cap / Cover cap change per seed", "cell"],
                                       per_seed) + [""]
    lines += ["## The reading (protocol.md's rule)", "", reading(successes, rows, start), ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def cell_state(runs, start):
    """succeeds: 3 seeds or more, every one meeting the test; fails: a seed fails (no later seed can change
    that); else open."""
    if any(not verdict(r, start) for r in runs):
        return "fails"
    return "succeeds" if len(runs) >= 3 else f"open ({len(runs)} of 3 seeds, all meet)"


def reading(successes, rows, start):
    complete = all(not cell_state([r for r in rows if r["control"] == c and r["setting"] == s], start).startswith("open")
                   and any(r["control"] == c and r["setting"] == s for r in rows)
                   for c in CONTROLS for s in REGISTERED)
    dpo = [f"{c} at `{s}`" for c, s in successes if c != "sft" and s in REGISTERED]
    sft = [f"sft at `{s}`" for c, s in successes if c == "sft" and s in REGISTERED]
    if dpo:
        return (f"A DPO control succeeds ({', '.join(dpo)}): the stage can show a DPO gain on the trained task, so "
                "the study's refutations stand with a control that could have succeeded.")
    if sft:
        return (f"Only continual SFT succeeds ({', '.join(sft)}): the stage can show a gain, but not by DPO on this "
                "model; what is specific to SeVa is only its difference from the DPO controls.")
    if not complete:
        return "Not every cell is decided yet (a failing seed, or 3 seeds that meet): no reading."
    return ("No cell succeeds: no control shows that the experiment could have succeeded, so the paper's claims "
            "are untested on this stage, not refuted; what remains is the comparison of SeVa against the controls.")


# ----------------------------------------------------------------------------- the command
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's text as written, and every flag's default."""


def main(argv=None):
    common.run_main(lambda: run_control(argv), "study.control")


def run_control(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.control", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--world", default="toy", help="the toy world folder (python -m toyworld)")
    p.add_argument("--pairs", default="study/control/seva-pairs.jsonl",
                   help="the main command's SeVa pairs (bash run_toy.sh's runs/seva/pairs.jsonl; this default is a copy)")
    p.add_argument("--out", default="study/control", help="runs.jsonl, report.md, each run's files")
    p.add_argument("--controls", nargs="+", default=list(CONTROLS), choices=CONTROLS, help="which controls")
    p.add_argument("--settings", nargs="+", default=list(REGISTERED), choices=list(SETTINGS),
                   help="which settings (long: the exploratory cell, apart from the reading)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (LoRA initialisation, data order)")
    p.add_argument("--study-runs", default="study/open/runs.jsonl",
                   help="the study's runs, for SeVa's rows beside the controls (those from the same SFT model)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--why", action="store_true", help="instead of training: OUT/why.md, each pair's log-prob "
                   "change under the trained model against its similarity (the runs of --why-runs)")
    p.add_argument("--why-runs", nargs="+", default=["dpo-own-main-seed0", "dpo-seva-main-seed0"],
                   help="run folders under OUT/runs for --why")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if not scores.is_open(args.world):
        p.error(f"{args.world} is not an open-stage world (python -m toyworld)")
    os.makedirs(args.out, exist_ok=True)
    start_dir = os.path.join(args.world, "model-sft")
    if args.why:
        print(open(why.write(args.out, args.world, start_dir, args.why_runs)).read())
        return
    seva_pairs = common.read_jsonl(args.pairs)
    start = dict(accuracy=models.model_accuracy(args.world, args.out, start_dir),
                 open=models.open_scores(args.world, args.out, start_dir))
    log = os.path.join(args.out, "runs.jsonl")
    rows = common.read_jsonl(log, appended=True)
    study_rows = common.read_jsonl(args.study_runs, appended=True)
    references = reference_rows(study_rows, start)
    write = lambda: report(args.out, rows, start, args.pairs, references)
    while True:
        todo = schedule(rows, start, args.controls, args.settings, args.seeds)
        if not todo:
            break
        pairs_file = SETTINGS[todo[1]].get("pairs_file")  # unseen: SeVa's pairs made on pool-unseen.json
        pairs = (main_command_pairs(args.world, "pool-unseen.json", os.path.join(args.out, pairs_file)) if pairs_file
                 else seva_pairs)
        row = run_once(args.world, args.out, pairs, *todo)
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        write()
    write()
    print(open(os.path.join(args.out, "report.md")).read())


if __name__ == "__main__":
    main()
