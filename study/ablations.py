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
import collections
import itertools
import json
import os
import random
import statistics
import time

import numpy as np

import augment
import common
import lora
import pairs
import seva
from toyworld import datafiles as toydata
import train_ddp
import vlm
from eval import compare, gallery_compare, hallucination, pope, runner, toyvqa

# name -> (what the paper calls it, the setting that varies, its values)
ABLATIONS = {
    "table2": ("Table 2 in small: SeVa against the SFT model, the default setting", "noise_step", [500]),
    "fig5": ("Fig. 5: answer length and pair-wise win / lose / tie, SeVa's answers against the SFT model's, the "
             "default setting", "noise_step", [500]),
    "augmentation": ("Table 1: the source of rejected answers", "augmentation", augment.ALL_AUGMENTATIONS),
    "noise_step": ("Fig. 6: diffusion noise step", "noise_step", [100, 200, 300, 400, 500, 600, 700, 800, 900]),
    "consistency": ("Table 5 in small: consistency under sampling, the default setting (short answers sampled at "
                    "temperature 0.5 and 1.0 that equal the greedy one)", "noise_step", [500]),
    "pool_size": ("Table 4: unlabeled instances sampled", "num_samples", [250, 500, 1000, 2000]),
    "subsets": ("Table 4: the pool's subsets (textvqa: captions, ocr_vqa: short reading questions, gqa: short "
                "questions, coco: descriptions)", "subsets",
                ["textvqa,ocr_vqa", "textvqa", "ocr_vqa", "gqa", "coco", "textvqa,ocr_vqa,gqa,coco"]),
    "lora_rank": ("Table 6: LoRA rank (alpha = 2r)", "lora_r", [8, 32, 128]),
    "pool_source": ("pool: SFT images (as the paper) or images the model never saw", "data",
                    ["pool.json", "pool-unseen.json"]),
    "objective": ("Table 3: SeVa against continual SFT on the same questions with the true answers",
                  "objective", ["dpo", "sft"]),
    "sft_strength": ("The strength of the SFT model: SeVa from SFT models trained for fewer or more epochs",
                     "sft_epochs", [1, 2, 3, 6, 10]),
    "pair_filter": ("Pair quality against gain: DPO on the kept pairs filtered by their true answers (an oracle "
                    "no real run has; for analysis only)", "pairs_used", ["all", "right_wrong", "not_inverted",
                                                                          "inverted"]),
    "dpo_lr": ("DPO learning rate (added after the runs above: not in the paper's ablations)", "lr",
               [5e-5, 1e-4, 2e-4, 5e-4]),
    "beta": ("DPO beta (added after the runs above: not in the paper's ablations)", "beta", [0.05, 0.1, 0.5, 1.0]),
    # Values that are dicts set several settings at once (their label names them).
    "negatives": ("Paper 3.3: K negatives (K noise seeds at the step), InfoNCE against K pairwise losses", "negatives",
                  [{"num_negatives": 1}, {"num_negatives": 2, "negatives_loss": "infonce"},
                   {"num_negatives": 4, "negatives_loss": "infonce"}, {"num_negatives": 2, "negatives_loss": "pairwise"},
                   {"num_negatives": 4, "negatives_loss": "pairwise"}]),
    "remedies": ("The DPO remedies: RPO's NLL on the chosen answer, LD-DPO's length weighting", "remedy",
                 [{"rpo_alpha": 0.0}, {"rpo_alpha": 0.5}, {"rpo_alpha": 1.0}, {"ld_alpha": 0.5}]),
}
# The settings every run shares unless its ablation varies one (chosen with the pipeline, see the report).
# main() sets sft_epochs to the world's own (toy/model-sft itself) and subsets to --subsets.
BASE = dict(augmentation="diffusion", noise_step=500, num_samples=1000, lora_r=32, data="pool.json", objective="dpo",
            sft_epochs=6, pairs_used="all", lr=5e-4, beta=0.1, subsets="textvqa,ocr_vqa", num_negatives=1,
            negatives_loss="infonce", rpo_alpha=0.0, ld_alpha=None)
# What rows written before a setting existed ran with: the closed stage, its 6-epoch SFT model, the whole pool.
LEGACY = dict(sft_epochs=6, subsets="all")
# Which kept pairs pair_filter trains on, by pairs.pair_quality's classes (the true answer is never used otherwise).
PAIR_FILTERS = {"all": pairs.QUALITY, "right_wrong": pairs.QUALITY[:1], "inverted": pairs.QUALITY[2:3],
                "not_inverted": pairs.QUALITY[:2] + pairs.QUALITY[3:]}
GLOBAL_BATCH = 16  # as run_toy.sh's 2 processes x 8


def setting_of(key, value):
    """The settings one value of an ablation sets: {key: value}, or the value itself when it is a dict."""
    return dict(value) if isinstance(value, dict) else {key: value}


def label(value):
    """A value as the report's tables show it."""
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def matches(run, key, value, values=()):
    """Whether a run is that value of that ablation's setting: with dict values, every setting any of the
    ablation's `values` sets is the value's or else BASE's (rpo_alpha 0 is not the LD-DPO run, whose rpo_alpha
    is 0 too)."""
    keys = {k for v in values for k in setting_of(key, v)} | set(setting_of(key, value))
    expected = {k: BASE[k] for k in keys if k in BASE} | setting_of(key, value)
    return all(run["setting"].get(k) == v for k, v in expected.items())


def run_name(setting, seed):
    """A run's folder under OUT/runs: the settings that differ from BASE, and the seed."""
    changed = [f"{k}={v}" for k, v in sorted(setting.items()) if BASE.get(k) != v]
    return "-".join(changed or ["base"]) + f"-seed{seed}"


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
                "--lr", str(setting["lr"]), "--beta", str(setting["beta"]), "--batch-size", str(GLOBAL_BATCH),
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
    if row["pairs_trained"] < GLOBAL_BATCH:  # too few pairs for one step: the model stays the SFT model
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


TEMPERATURES = (0.5, 1.0)  # study/protocol.md, C5


def sampling_consistency(model, processor, world, answers_dir, model_id, weights, seed):
    """C5: {temperature: share of short answers (toy/val.json) sampled at it, seeded, that equal the greedy
    ones}, as eval.compare measures it (its answer files in answers_dir)."""
    found = compare.consistency(model, processor, model_id, common.read_records(os.path.join(world, "val.json")),
                                os.path.join(world, "images"), answers_dir, TEMPERATURES, seed, batch_size=64,
                                weights=weights)
    return {t: v["agreement"] for t, v in found.items()}


def start_consistency(world, out, model_dir, seeds):
    """A start model's sampling_consistency, per seed (the seed sets the sampling), computed once."""
    name = os.path.basename(os.path.normpath(model_dir))
    path = os.path.join(out, "models", name + ".consistency.json")
    found = json.load(open(path)) if os.path.exists(path) else {}
    if any(str(seed) not in found for seed in seeds):
        model, processor = runner.load_model(model_dir)
        for seed in [s for s in seeds if str(s) not in found]:
            found[str(seed)] = sampling_consistency(
                model, processor, world, os.path.join(out, "models", f"{name}-answers-seed{seed}"), name,
                runner.fingerprint(model_dir), seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        toydata.write_json(found, path)
    return found


def confirm_scores(model, processor, confirm, answers_dir, model_id, weights):
    """The exploratory search's confirmation: a model's open-stage metrics and short-answer accuracy on a split
    the search never saw."""
    val = json.load(open(os.path.join(confirm, "val.json")))
    accuracy, _ = toyvqa.vqa_accuracy(model, processor, val, os.path.join(confirm, "images"))
    return dict(score_open(model, processor, confirm, answers_dir, model_id, weights), accuracy=accuracy)


# ----------------------------------------------------------------------------- the exploratory search
# study/protocol.md, "Exploratory": the grid, and how much of it is run (its dated section of 2026-12-02).
SEARCH = dict(num_negatives=[1, 2, 4], negatives_loss=["infonce", "pairwise"], rpo_alpha=[0.0, 0.5],
              ld_alpha=[None, 0.5], lr=[1e-4, 5e-4], beta=[0.1, 0.5], noise_step=[500, 800])
SEARCH_DRAWS = 15  # settings drawn at random from the grid, beside the default
CONFIRM_SEEDS = [3, 4, 5]
CONFIRM_DATA_SEED = 1  # the confirmation split's images and questions; the world's own are seed 0
GUARD = 0.02  # Cover and short-answer accuracy within 2 points of the SFT model's


def search_settings():
    """The default and SEARCH_DRAWS settings drawn (seeded) from the grid's runnable settings: with one negative
    the InfoNCE and pairwise losses are the same loss, so those settings count once; LD-DPO takes one rejected
    answer per pair (train_ddp.py refuses it with several), so K > 1 goes without it."""
    grid = [dict(zip(SEARCH, values)) for values in itertools.product(*SEARCH.values())]
    grid = [g for g in grid if runnable(g)]
    default = {k: BASE[k] for k in SEARCH}
    return [default] + random.Random("search/0").sample([g for g in grid if g != default], SEARCH_DRAWS)


def runnable(setting):
    """Whether train_ddp.py takes a searched setting (see search_settings)."""
    negatives = setting.get("num_negatives", 1)
    return (negatives > 1 or setting.get("negatives_loss", "infonce") == "infonce") and \
        (negatives == 1 or setting.get("ld_alpha") is None)


def guarded(scores, accuracy, base_open, base):
    """Whether a model keeps Cover and short-answer accuracy within GUARD of the SFT model's."""
    return scores["cover_desc"] >= base_open["cover_desc"] - GUARD and accuracy >= base["overall"] - GUARD


def search_best(rows, base, base_open):
    """The searched setting with the lowest descriptions' CHAIR_i among the guarded ones (seed 0), or None."""
    searched = [r for r in rows if r["ablation"] == "search" and r.get("open")]
    ok = [r for r in searched if guarded(r["open"], accuracy_of(r), base_open, base)]
    return min(ok, key=lambda r: r["open"]["chair_i_desc"])["setting"] if ok else None


def search(args, rows, run, base, base_open):
    """Search the grid on seed 0, then run the best guarded setting on CONFIRM_SEEDS, scored on a confirmation
    split made (before the search's first run) with another data seed."""
    confirm = os.path.join(args.out, "confirm")
    if not os.path.exists(os.path.join(confirm, "scenes.json")):
        sizes = {kind: len(json.load(open(os.path.join(args.world, name)))) for kind, name in
                 (("short", "val.json"), ("sentence", "val-sentences.json"), ("caption", "val-captions.json"),
                  ("description", "val-descriptions.json"))}
        print("confirmation split:", toydata.build_validation(confirm, CONFIRM_DATA_SEED, sizes))
    for setting in search_settings():
        run("search", dict(BASE, **setting), 0)
    best = search_best(rows, base, base_open)
    for seed in CONFIRM_SEEDS if best else []:
        run("confirm", best, seed, confirm=confirm)


def confirm_start(out, model_dir):
    """The SFT model's scores on the confirmation split, computed once (OUT/models/NAME.confirm.json)."""
    name = os.path.basename(os.path.normpath(model_dir))
    path = os.path.join(out, "models", name + ".confirm.json")
    if not os.path.exists(path):
        model, processor = runner.load_model(model_dir)
        toydata.write_json(confirm_scores(model, processor, os.path.join(out, "confirm"),
                                          os.path.join(out, "models", name + "-confirm-answers"), name,
                                          runner.fingerprint(model_dir)), path)
    return json.load(open(path))


def search_report(rows, base, base_open, start_confirm):
    """The exploratory section: every searched setting (seed 0), then the best one's confirmation."""
    searched = [r for r in rows if r["ablation"] == "search" and r.get("open")]
    if not searched:
        return []
    pct = lambda v: f"{100 * v:.1f}"
    changed = lambda setting: ", ".join(f"{k} {v}" for k, v in setting.items() if BASE.get(k) != v) or "default"
    lines = ["## Exploratory: a search for a setting that lowers CHAIR_i without losing Cover or accuracy", "",
             "Reported apart from the confirmatory tables ([protocol.md](../protocol.md), \"Exploratory\"). Seed 0 "
             f"each; *guarded*: Cover and short-answer accuracy within {100 * GUARD:.0f} points of the SFT model's.",
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
    lines += ["", f"The best guarded setting, **{changed(best)}**, on seeds {', '.join(map(str, CONFIRM_SEEDS))} and "
                  "the confirmation split (new images and questions, data seed "
                  f"{CONFIRM_DATA_SEED}, never seen by the search):", "",
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
                      f"{100 * GUARD:.0f}): **{'found' if found else 'not found'}**."]
    return lines + [""]


# ----------------------------------------------------------------------------- the open stage's metrics
def is_open(world):
    """An open-stage world (python -m toyworld): it has captions, descriptions and sentence answers."""
    return os.path.exists(os.path.join(world, "val-descriptions.json"))


def score_open(model, processor, world, answers_dir, model_id, weights):
    """study/protocol.md's metrics of one model, as eval.compare computes them (greedy, 96 new tokens for
    the open-ended answers), flat: {chair_i_desc, cover_desc, ..., sentences, pope_f1, pope_yes}. weights:
    runner.fingerprint of the model's files (the answer files' resume key)."""
    images = os.path.join(world, "images")
    decoding = dict(batch_size=64, progress=False, weights=weights)
    found = hallucination.evaluate(model, processor, model_id, world, images, answers_dir, max_new_tokens=96,
                                   **decoding)
    scores = {f"{metric}_{short}": found[kind][metric] for kind, short in (("caption", "cap"), ("description", "desc"))
              for metric in ("chair_i", "chair_s", "cover", "shr", "words")}
    scores["sentences"] = found["sentence"]["overall"]
    if not os.path.isdir(os.path.join(world, "pope")):  # a confirmation split (toydata.build_validation)
        return scores
    probes = pope.evaluate(model, processor, model_id, os.path.join(world, "pope"), images, answers_dir, **decoding)
    return dict(scores, pope_f1=probes["average"]["f1"], pope_yes=probes["average"]["yes_ratio"])


def pair_claims(world, trained):
    """Which side of the trained pairs holds more false claims (eval/hallucination.py), over every subset:
    {class: pairs}; rejected answers of a record with several count once each."""
    table = hallucination.pair_claims(trained, common.read_records(os.path.join(world, "scenes.json")))
    return {c: sum(row[c] for row in table.values()) for c in hallucination.PAIR_CLASSES}


def short_answers(model, processor, world, answers_dir):
    """A model's accuracy on toy/val.json; its answers written to ANSWERS_DIR/toyvqa-clean.jsonl (eval.compare's
    name) for the pair-wise outcomes."""
    val = json.load(open(os.path.join(world, "val.json")))
    accuracy, answers = toyvqa.vqa_accuracy(model, processor, val, os.path.join(world, "images"))
    os.makedirs(answers_dir, exist_ok=True)
    common.write_atomic(os.path.join(answers_dir, "toyvqa-clean.jsonl"),
                        [json.dumps(dict(question_id=r["id"], text=a)) for r, a in zip(val, answers)])
    return accuracy


def compared_sources(world):
    """The questions the pair-wise outcomes compare: every kind study/protocol.md scores."""
    return gallery_compare.toy_sources(world, os.path.join(world, "val.json"), os.path.join(world, "pope"), pope.SPLITS)


def start_answers(world, out, model_dir):
    """The folder of a start model's answers to compared_sources (OUT/models/NAME-answers), made once."""
    name = os.path.basename(os.path.normpath(model_dir))
    folder = os.path.join(out, "models", name + "-answers")
    if not all(os.path.exists(os.path.join(folder, file)) for _, file, _ in compared_sources(world)):
        model, processor = runner.load_model(model_dir)
        score_open(model, processor, world, folder, name, runner.fingerprint(model_dir))  # resumes its answer files
        short_answers(model, processor, world, folder)
    return folder


def pairwise(world, start_dir, run_dir):
    """Fig. 5: per kind of question, how often the run's answer wins, loses or ties against its start model's by
    the kind's rule (eval/gallery_compare.py RULES), and both models' mean answer length in words."""
    questions = gallery_compare.answered_questions(compared_sources(world), {"SFT": start_dir, "SeVa": run_dir},
                                           common.read_records(os.path.join(world, "scenes.json")))
    found = {}
    for kind in dict.fromkeys(q["kind"] for q in questions):
        mine = [q for q in questions if q["kind"] == kind]
        words = lambda name: statistics.mean(len(q["answers"][name].split()) for q in mine)
        found[kind] = dict(**{o: sum(q["outcome"] == o for q in mine) for o in gallery_compare.OUTCOMES},
                           words_start=words("SFT"), words=words("SeVa"))
    return found


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


def open_scores(world, out, model_dir):
    """A start model's open-stage metrics, computed once (OUT/models/NAME.open.json)."""
    path = os.path.join(out, "models", os.path.basename(os.path.normpath(model_dir)) + ".open.json")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        model, processor = runner.load_model(model_dir)
        name = os.path.basename(os.path.normpath(model_dir))
        answers = os.path.join(out, "models", name + "-answers")
        toydata.write_json(score_open(model, processor, world, answers, name, runner.fingerprint(model_dir)), path)
    return json.load(open(path))


# The protocol's primary metric first, then its guards and the secondary ones: (key, column, percent).
OPEN_COLUMNS = [("chair_i_desc", "CHAIR_i desc (primary)", True), ("cover_desc", "Cover desc", True),
                ("words_desc", "words desc", False), ("chair_s_desc", "CHAIR_s desc", True),
                ("shr_desc", "SHR-like desc", True), ("chair_i_cap", "CHAIR_i cap", True),
                ("cover_cap", "Cover cap", True), ("sentences", "sentence answers", True),
                ("pope_f1", "POPE F1", True), ("pope_yes", "POPE yes-ratio", False)]


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


def sft_model(world, out, epochs):
    """The SFT model SeVa starts from: the world's own (toy/model-sft) when `epochs` is the epochs it was trained
    for, else one trained the same way (same initial model, data, batch, lr and seed) for `epochs` epochs."""
    made = json.load(open(os.path.join(world, "sft-run", "args.json")))
    if epochs == made["epochs"]:
        return os.path.join(world, "model-sft")
    folder = os.path.join(out, "models", f"sft-epochs={epochs}")
    if not os.path.exists(folder):
        run = os.path.join(out, "models", f"sft-epochs={epochs}-run")
        train_ddp.train(train_ddp.parse_args([
            "--objective", "sft", "--model", os.path.join(world, "model-init"),
            "--data", os.path.join(world, "sft.json"),
            "--image-folder", os.path.join(world, "images"), "--out", run, "--batch-size", str(made["batch_size"]),
            "--epochs", str(epochs), "--lr", str(made["lr"]), "--seed", str(made["seed"]), "--cache-data",
            "--max-length", str(made["max_length"]), "--no-progress", "--resume"]
            + ["--group-by-length"] * bool(made.get("group_by_length")) + ["--train-vision"] * bool(made.get("train_vision"))))
        os.replace(os.path.join(run, "model"), folder)
    return folder


def model_accuracy(world, out, model_dir):
    """A model's accuracy on toy/val.json, computed once (OUT/models/NAME.accuracy.json); its answers go to
    OUT/models/NAME-answers, where start_answers looks for them."""
    name = os.path.basename(os.path.normpath(model_dir))
    path = os.path.join(out, "models", name + ".accuracy.json")
    if not os.path.exists(path):
        model, processor = vlm.load(model_dir)
        toydata.write_json(short_answers(model, processor, world, os.path.join(out, "models", name + "-answers")),
                           path)
    return json.load(open(path))


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


def mean_spread(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


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
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def wall_time(rows):
    """The report's wall-time line: the measured mean per run (rows record it since it was added) and what
    `ablations.py all` would take on this machine at that rate, every value of every ablation with 3 seeds."""
    timed = [r["seconds"] for r in rows if r.get("seconds") and r.get("steps")]
    if not timed:
        return []
    runs = {(json.dumps(dict(BASE, **setting_of(key, value)), sort_keys=True), seed)
            for _, key, values in ABLATIONS.values() for value in values for seed in (0, 1, 2)}
    runs |= {(json.dumps(dict(BASE, **s), sort_keys=True), 0) for s in search_settings()}
    every = len(runs) + len(CONFIRM_SEEDS)
    median = statistics.median(timed)  # a run that shared the machine with other work takes longer
    return [f"Wall time: {median / 60:.1f} min per trained run, the median of {len(timed)} runs timed (2 CPU cores, "
            f"other work on the machine at times); `python -m study all` is {every} distinct runs (each table's "
            f"runs of the default setting are made once), about {every * median / 3600:.1f} hours at that rate, plus "
            "the SFT models of the SFT-strength table. Each command appends its runs to runs.jsonl as they end and "
            "skips those already there, so a crashed command resumes where it stopped.", ""]


def accuracy_of(run, family="overall"):
    return (run["accuracy"] or run["start_accuracy"])[family]


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
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


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
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None):
    common.run_main(lambda: run_study(argv), "study")


def run_study(argv=None):
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

