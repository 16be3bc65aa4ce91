"""
The paper's ablations replayed on the toy world, where every answer can be checked.

One SeVa run = seva.py pairs -> LoRA-DPO (train_ddp.py, one process) -> greedy exact match on toy/val.json,
for each value of one setting and each seed; the SFT model is the baseline. On the open stage (the default
world) every run is also scored as study/protocol.md says: captions' and descriptions' CHAIR_i, CHAIR_s,
Cover, SHR-like and length, sentence answers, POPE, and the chosen answers' log-prob over training. Every run
is written to OUT/runs.jsonl as soon as it ends, so a rerun only does the missing runs; the report is
rewritten at the end.

    python -m study table2                     # Table 2 in small: the default setting, 3 seeds
    python -m study noise_step                 # Fig. 6: noise step 100..900
    python -m study augmentation               # Table 1: every augmentation of augment.py
    python -m study all --seeds 0 1 2          # everything, into study/open/report.md
    python -m study fig5 --out study/fig5  # Fig. 5: win / lose / tie against the SFT model, per kind
    python -m study --analyses                 # the fits across runs, from OUT/runs.jsonl alone
    python -m study --confusion count --runs lr=5e-05-seed0   # what runs answer, by right answer

study/report.md was made on the closed stage, the first toy world (`python -m toyworld --stage closed --out toy-closed`, then
`--world toy-closed --subsets all --out study`); its rows predate the subsets setting and read as
subsets=all. The open stage's runs go to study/open/; study/fig5/ holds runs made on another machine,
whose toy world (its SFT model) differs, so they have their own folder and baseline.
"""
import argparse
import json
import os
import statistics
import time

import common
import pairs
import seva
from toyworld import datafiles as toydata
import train_ddp
import vlm
from eval import runner
from study.analyses import analyses, confusion, recorded_start
from study.models import confirm_start, model_accuracy, open_scores, sft_model, start_answers, start_consistency
from study.scores import confirm_scores, is_open, pair_claims, pairwise, sampling_consistency, score_open, short_answers
from study import settings
from study.settings import ABLATIONS, BASE, LEGACY, PAIR_FILTERS, label, run_name, search_settings, setting_of
from study.tables import report, search_best, search_report


def run_once(world, out, setting, seed, consistency=False, confirm=None):
    """One SeVa (or continual-SFT) run; returns its row for runs.jsonl. consistency: also Table 5's agreement of
    sampled and greedy short answers; confirm: a confirmation split's folder (toydata.build_validation) to score
    the model on too."""
    began = time.time()
    folder = os.path.join(out, "runs", run_name(setting, seed))
    start, images = sft_model(world, out, setting["sft_epochs"]), os.path.join(world, "images")
    summary = seva.main(["--model", start, "--data", os.path.join(world, setting["data"]), "--image-folder", images,
                         "--augmentation", setting["augmentation"], "--noise-step", str(setting["noise_step"]),
                         "--num-samples", str(setting["num_samples"]), "--seed", str(seed), "--batch-size", "64",
                         "--subsets", setting["subsets"], "--num-negatives", str(setting["num_negatives"]),
                         "--out", os.path.join(folder, "pairs.jsonl"), "--no-progress"])
    pairs_path = filter_pairs(folder, setting["pairs_used"])
    training = ["--model", start, "--image-folder", images, "--out", os.path.join(folder, "train"),
                "--seed", str(seed), "--lora-r", str(setting["lora_r"]), "--lora-alpha", str(2 * setting["lora_r"]),
                "--lr", str(setting["lr"]), "--beta", str(setting["beta"]), "--batch-size", str(settings.GLOBAL_BATCH),
                "--no-progress", "--cache-data", "--negatives-loss", setting["negatives_loss"],
                "--rpo-alpha", str(setting["rpo_alpha"])]
    if setting["ld_alpha"] is not None:
        training += ["--ld-alpha", str(setting["ld_alpha"])]
    if setting["objective"] == "dpo":
        training += ["--objective", "dpo", "--pairs", pairs_path]
    else:  # Table 3: the same images and questions, trained on their true answers, same step budget
        training += ["--objective", "sft", "--data", sft_records(folder)]
    row = dict(setting=setting, seed=seed, pairs=summary["pairs"], kept_percent=summary["kept_percent"],
               pair_quality=summary["pair_quality"], pairs_trained=len(common.read_jsonl(pairs_path)),
               trained_quality=pairs.pair_quality(common.read_jsonl(pairs_path)),
               steps=0, mean_margin=None, accuracy=None, start_accuracy=model_accuracy(world, out, start))
    if is_open(world):
        row["start_open"] = row["open"] = open_scores(world, out, start)  # until a step is trained: the start's
        row["pair_claims"] = pair_claims(world, common.read_jsonl(pairs_path))
    if row["pairs_trained"] < settings.GLOBAL_BATCH:  # too few pairs for one step: the model stays the SFT model
        return dict(row, seconds=time.time() - began)
    model = train_ddp.train(train_ddp.parse_args(training))
    model.eval()
    _, processor = vlm.load(start)
    row["accuracy"] = short_answers(model, processor, world, os.path.join(folder, "answers"))
    weights = runner.fingerprint(start, os.path.join(folder, "train", "adapter"))
    if consistency:
        row["consistency"] = sampling_consistency(model, processor, world, os.path.join(folder, "answers"),
                                                  run_name(setting, seed), weights, seed)
    if confirm:
        row["confirm"] = confirm_scores(model, processor, confirm, os.path.join(folder, "confirm-answers"),
                                        run_name(setting, seed), weights)
    metrics = common.read_jsonl(os.path.join(folder, "train", "metrics.jsonl"), appended=True)
    row["steps"] = len(metrics)
    if setting["objective"] == "dpo":
        row["mean_margin"] = statistics.mean(m["rewards/margins"] for m in metrics)
        # likelihood displacement: the chosen answers' mean log-prob under the policy, first and last step
        row["chosen_logps"] = [metrics[0]["logps/chosen"], metrics[-1]["logps/chosen"]]
    if is_open(world):
        row["open"] = score_open(model, processor, world, os.path.join(folder, "answers"), run_name(setting, seed),
                                 weights)
        row["pairwise"] = pairwise(world, start_answers(world, out, start), os.path.join(folder, "answers"))
    return dict(row, seconds=time.time() - began)


def filter_pairs(folder, pairs_used):
    """pair_filter: the kept pairs of the classes PAIR_FILTERS[pairs_used], by their true answers."""
    path = os.path.join(folder, "pairs.jsonl")
    if pairs_used == "all":
        return path
    keep = [pair for pair in common.read_jsonl(path)
            if "answer" in pair and pairs.quality_of(pair) in PAIR_FILTERS[pairs_used]]
    filtered = os.path.join(folder, f"pairs-{pairs_used}.jsonl")
    common.write_atomic(filtered, [json.dumps(pair) for pair in keep])
    return filtered


def sft_records(folder):
    """Continual SFT's data (Table 3): the questions of SeVa's kept pairs on the same images, each with
    its true answer from the data instead of a preference."""
    kept = common.read_jsonl(os.path.join(folder, "pairs.jsonl"))
    records = [{"id": pair["id"], "image": pair["image"],
                "conversations": [{"from": "human", "value": "<image>\n" + pair["question"]},
                                  {"from": "gpt", "value": pair["answer"]}]} for pair in kept if pair.get("answer")]
    path = os.path.join(folder, "sft.json")
    toydata.write_json(records, path)
    return path


def search(args, rows, run, base, base_open):
    """Search the grid on seed 0, then run the best guarded setting on settings.CONFIRM_SEEDS, scored on a confirmation
    split made (before the search's first run) with another data seed."""
    confirm = os.path.join(args.out, "confirm")
    if not os.path.exists(os.path.join(confirm, "scenes.json")):
        sizes = {kind: len(json.load(open(os.path.join(args.world, name)))) for kind, name in
                 (("short", "val.json"), ("sentence", "val-sentences.json"), ("caption", "val-captions.json"),
                  ("description", "val-descriptions.json"))}
        print("confirmation split:", toydata.build_validation(confirm, settings.CONFIRM_DATA_SEED, sizes))
    for setting in search_settings():
        run("search", dict(BASE, **setting), 0)
    best = search_best(rows, base, base_open)
    for seed in settings.CONFIRM_SEEDS if best else []:
        run("confirm", best, seed, confirm=confirm)


def load_rows(log, world, out):
    """runs.jsonl's rows, those written before a setting existed completed with its BASE value."""
    rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    for r in rows:
        r["setting"] = {**BASE, **LEGACY, **r["setting"]}
        r.setdefault("pairs_trained", r["pairs"])
        r.setdefault("trained_quality", r["pair_quality"])
        if "start_accuracy" not in r:
            r["start_accuracy"] = model_accuracy(world, out, sft_model(world, out, r["setting"]["sft_epochs"]))
    return rows


def main(argv=None):
    common.run_main(lambda: run_study(argv), "study")


def run_study(argv=None):
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("ablations", nargs="*", help=f"which ablations to run: {', '.join(ABLATIONS)}, or all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (at least 3 for a mean and a spread)")
    p.add_argument("--world", default="toy", help="the toy world folder (python -m toyworld)")
    p.add_argument("--out", default="study/open",
                   help="runs.jsonl, report.md and each run's files (the closed stage's: study)")
    p.add_argument("--subsets", default="textvqa,ocr_vqa",
                   help="seva.py --subsets of every run (paper 4.1: textvqa,ocr_vqa; the closed stage: all)")
    p.add_argument("--values", nargs="+", metavar="VALUE",
                   help="run only these values of the ablation named (as its table labels them), e.g. the protocol's "
                        "subset of sft_strength's: --values 1 2 3 6")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--confusion", metavar="FAMILY", help="instead of running: the answers to one question family "
                   "(colour, shape, count, exist, word) of the SFT model and of the --runs, by right answer")
    p.add_argument("--runs", nargs="*", default=[], help="run folders under OUT/runs, for --confusion")
    p.add_argument("--analyses", action="store_true",
                   help="instead of running: OUT/analyses.md, the fits across runs (pair quality, pair claims) from "
                        "OUT/runs.jsonl alone (a model is loaded only to score the start model of rows older than "
                        "that field; the open stage's rows all hold it, so any machine gives the same file)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.confusion:
        print(open(confusion(args.world, args.out, args.confusion, args.runs)).read())
        return
    unknown = [a for a in args.ablations if a not in list(ABLATIONS) + ["search", "all"]]
    if unknown or not (args.ablations or args.analyses):
        p.error(f"name the ablations to run ({', '.join(ABLATIONS)}, search, or all), or ask for --confusion "
                f"or --analyses")
    if args.values and (len(args.ablations) != 1 or args.ablations[0] not in ABLATIONS):
        p.error("--values goes with one ablation (not search or all)")
    if args.values:
        labels = [label(v) for v in ABLATIONS[args.ablations[0]][2]]
        if any(v not in labels for v in args.values):
            p.error(f"--values {' '.join(args.values)}: {args.ablations[0]}'s values are {', '.join(labels)}")
    os.makedirs(args.out, exist_ok=True)
    BASE.update(subsets=args.subsets,
                sft_epochs=json.load(open(os.path.join(args.world, "sft-run", "args.json")))["epochs"])
    names = [n for n in ABLATIONS if n != "fig5" or is_open(args.world)] + (["search"] if is_open(args.world) else []) \
        if "all" in args.ablations else args.ablations
    for name in ("search", "fig5"):
        if name in names and not is_open(args.world):
            p.error(f"{name}: {args.world} is not an open-stage world (python -m toyworld)")
    log = os.path.join(args.out, "runs.jsonl")
    rows = load_rows(log, args.world, args.out)
    if args.analyses:
        print(open(analyses(args.out, rows)).read())
        return
    sft = sft_model(args.world, args.out, BASE["sft_epochs"])
    base = model_accuracy(args.world, args.out, sft)
    base_open = open_scores(args.world, args.out, sft) if is_open(args.world) else None
    made = recorded_start(rows)
    if made and base_open and made != base_open:  # another machine's kernels train another SFT model
        p.error(f"{log} was made with another toy world: its SFT model's descriptions have CHAIR_i "
                f"{made['chair_i_desc']:.3f}, {args.world}'s {base_open['chair_i_desc']:.3f}; give another --out "
                "(runs of two toy worlds are never mixed)")

    def write_report():
        sampled = sorted({r["seed"] for r in rows if r.get("consistency")})
        report(args.out, rows, base, argv if argv is not None else [], base_open,
               start_consistency(args.world, args.out, sft, sampled) if sampled else None,
               search_report(rows, base, base_open, confirm_start(args.out, sft)
                             if any(r["ablation"] == "confirm" for r in rows) else None) if base_open else [])

    def run(name, setting, seed, needs=(), **extra):
        """One row of ablation `name`, appended to runs.jsonl as it ends; a row already there is kept. needs: the
        row fields the ablation reads, which rows of older runs may lack (extra's names are needed too)."""
        needed = lambda r: all(k in r for k in (*extra, *needs))
        if any(r["ablation"] == name and r["setting"] == setting and r["seed"] == seed and needed(r) for r in rows):
            return
        # runs are deterministic: a run another ablation already made (its base value) is reused
        done = [r for r in rows if r["setting"] == setting and r["seed"] == seed and needed(r)]
        row = dict(done[0] if done else run_once(args.world, args.out, setting, seed, **extra), ablation=name)
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        write_report()

    for name in names:
        if name == "search":
            search(args, rows, run, base, base_open)
            continue
        _, key, values = ABLATIONS[name]
        for value in values:
            if args.values and label(value) not in args.values:
                continue
            for seed in args.seeds:
                run(name, dict(BASE, **setting_of(key, value)), seed,
                    needs=("pairwise",) if name == "fig5" else (),
                    **(dict(consistency=True) if name == "consistency" else {}))
    write_report()
    print(open(os.path.join(args.out, "report.md")).read())
