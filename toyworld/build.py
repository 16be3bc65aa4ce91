"""
The toy world: synthetic scenes, data about them in LLaVA-665k's shape, and a tiny LLaVA trained on it.

No model or data set can be downloaded here, so SeVa runs end to end on a world we make ourselves:
  toy/images/{textvqa,ocr_vqa,gqa,coco}/   the SFT images, in LLaVA-665k's subset folders (unseen-*: never trained on)
  toy/images/{val,pope}/            held-out images
  toy/scenes.json                   the scene graph of every image, so every answer can be checked
  toy/pretrain.json                 stage-1 records: a caption of every SFT image (LCS-558K's analogue)
  toy/sft.json                      the SFT records (LLaVA-665k format; toyworld/datafiles.py says what each subset asks)
  toy/pool.json                     the pool SeVa samples from: SFT records of every subset, as in the paper
  toy/pool-unseen.json              the same on images the model never saw (an ablation)
  toy/val-prior.json, partners.json, pool-prior.json   the prior stage's (--stage prior): its held-out images
                                    that break or keep the prior, its partner pairs, a pool drawn as those images
  toy/val.json                      short answers, labeled (eval/toyvqa.py)
  toy/val-{sentences,captions,descriptions}.json   open-ended answers, labeled (eval/hallucination.py)
  toy/pope/{random,popular,adversarial}.jsonl      POPE's yes/no probes
  toy/model-init/, model-pretrain/  the tiny LLaVA after stage 0 (vision pretraining) and stage 1 (pretrain.json)
  toy/model-sft/                    a tiny LLaVA (HF folder) that plays LLaVA-1.5: the model SeVa starts from
  toy/report.json                   the stage's bands, measured on the SFT model

`python -m toyworld` builds all of it in a few minutes on 2 CPU cores; finished parts are skipped
(`--force` redoes them). Everything is deterministic given --seed. `--stage closed` builds the first toy world
instead (one-word answers only), on which ablations/report.md was made.
"""
import argparse
import os
import shutil
import time

import torch
from PIL import Image

import common
from toyworld import datafiles as toydata
from toyworld import priors as toypriors
from toyworld import scenes as toyscenes
import vlm

# What makes the open stage a fair one for SeVa, fixed before any SeVa run on it (README): each band gives the
# values it reads from the report and whether they are in the band.
SPLITS = ("random", "popular", "adversarial")
KINDS = ("caption", "description")


def _band(values, ok, sign=""):
    return ", ".join(f"{k} {v:{sign}.2f}" for k, v in values), ok


BANDS = {
    "short answers: exact match overall 55-90%": lambda r: _band(
        [("overall", r["short"]["overall"])], 0.55 <= r["short"]["overall"] <= 0.90),
    "short answers: every family 15 points above its majority answer": lambda r: _band(
        [(f, r["short"][f] - r["majority"][f]) for f in r["majority"]],
        all(r["short"][f] >= r["majority"][f] + 0.15 for f in r["majority"]), sign="+"),
    "POPE: yes-ratio 0.35-0.65 on every split": lambda r: _band(
        [(s, r["pope"][s]["yes_ratio"]) for s in SPLITS], all(0.35 <= r["pope"][s]["yes_ratio"] <= 0.65 for s in SPLITS)),
    "POPE: accuracy at least 65% on every split": lambda r: _band(
        [(s, r["pope"][s]["accuracy"]) for s in SPLITS], all(r["pope"][s]["accuracy"] >= 0.65 for s in SPLITS)),
    "captions and descriptions: CHAIR_i 10-40%": lambda r: _band(
        [(k, r["open"][k]["chair_i"]) for k in KINDS], all(0.10 <= r["open"][k]["chair_i"] <= 0.40 for k in KINDS)),
    "captions and descriptions: Cover 50-90%": lambda r: _band(
        [(k, r["open"][k]["cover"]) for k in KINDS], all(0.50 <= r["open"][k]["cover"] <= 0.90 for k in KINDS)),
    "noise at step 500 changes at least 30% of the pool's captions and descriptions": lambda r: _band(
        [("changed", r["noise500_changed"])], r["noise500_changed"] >= 0.30),
}


# The prior stage's bands (toyworld/priors.py), fixed before any SeVa run on it (study/protocol.md): the open
# stage's CHAIR and Cover bands, and the prior's own on the broken images' descriptions (eval/priors.py).
PRIOR_BANDS = {
    "captions and descriptions: CHAIR_i 10-40%": BANDS["captions and descriptions: CHAIR_i 10-40%"],
    "captions and descriptions: Cover 50-90%": BANDS["captions and descriptions: Cover 50-90%"],
    "the SFT model names an absent partner in 15-50% of its descriptions of prior-broken images": lambda r: _band(
        [("named", r["prior"]["broken descriptions"]["partner_rate"])],
        0.15 <= r["prior"]["broken descriptions"]["partner_rate"] <= 0.50),
    "VCD's premise: noise at step 500 raises that share by at least 5 points": lambda r: _band(
        [("change", r["prior_noise500"]["broken descriptions"]["partner_rate"]
          - r["prior"]["broken descriptions"]["partner_rate"])],
        r["prior_noise500"]["broken descriptions"]["partner_rate"]
        >= r["prior"]["broken descriptions"]["partner_rate"] + 0.05, sign="+"),
    "noise at step 500 changes at least 30% of the pool's captions and descriptions":
        BANDS["noise at step 500 changes at least 30% of the pool's captions and descriptions"],
}


# ----------------------------------------------------------------------------- the model
def build_model(out, scenes, args):
    """toy/model-init: tokenizer, processor and a random LLaVA whose vision tower is pretrained (stage 0)."""
    import checkpoint
    from toyworld import model as toymodel
    sft = common.read_records(os.path.join(out, "sft.json"))
    corpus = [vlm.LLAVA_V1_SYSTEM + " USER: ASSISTANT:"] + [c["value"] for r in sft for c in r["conversations"]]
    tokenizer = toymodel.train_tokenizer(corpus, args.vocab_size)
    processor = toymodel.build_processor(tokenizer, args.patch_size, toyscenes.IMAGE_SIZE)
    torch.manual_seed(args.seed)
    model = toymodel.build_model(tokenizer, args.width, args.vision_layers, args.text_layers, args.patch_size,
                                 toyscenes.IMAGE_SIZE)
    names = sorted(r["image"] for r in sft)
    pixels = processor.image_processor([Image.open(os.path.join(out, "images", n)) for n in names],
                                       return_tensors="pt")["pixel_values"]
    targets, classes = toyscenes.vision_targets(scenes, names, args.patch_size, present=args.stage != "closed")
    loss = toymodel.pretrain_vision(model, pixels, targets, classes, args.vision_steps, 64, 2e-3, args.seed)
    print(f"stage 0: vision tower pretrained, probe loss {loss:.3f}")
    checkpoint.save_model_atomic(model, processor, os.path.join(out, "model-init"))


def train_stage(stage, out, name, start, data, epochs, args, extra=()):
    """toy/model-{name}: train_ddp.py --objective sft from toy/{start} on toy/{data} (vision tower frozen, as
    LLaVA's stages 1 and 2, unless --train-vision). Random batches of every subset: grouping them by length
    (--group-by-length) made the toy model unable to read the word."""
    import train_ddp
    print(f"{stage}: toy/{data} -> toy/model-{name} (train_ddp.py --objective sft, from toy/{start})", flush=True)
    run_dir = os.path.join(out, f"{name}-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    train_ddp.train(train_ddp.parse_args([
        "--objective", "sft", "--model", os.path.join(out, start), "--data", os.path.join(out, data),
        "--image-folder", os.path.join(out, "images"), "--out", run_dir, "--batch-size", str(args.sft_batch_size),
        "--epochs", str(epochs), "--lr", str(args.sft_lr), "--seed", str(args.seed), "--cache-data",
        "--max-length", "512", *extra] + (["--train-vision"] if args.train_vision else [])))
    shutil.rmtree(os.path.join(out, f"model-{name}"), ignore_errors=True)
    os.replace(os.path.join(run_dir, "model"), os.path.join(out, f"model-{name}"))


def pretrain(out, args):
    """toy/model-pretrain: LLaVA's stage 1 on toy/pretrain.json, in its plain template ("<image>{caption}\n").
    LLaVA trains only the projector there, its Vicuna already reads; ours starts from nothing, so its language
    model learns here too, on short sequences, to say what the image tokens show."""
    train_stage("stage 1", out, "pretrain", "model-init", "pretrain.json", args.pretrain_epochs, args, ["--template", "plain"])


def fine_tune(out, args):
    """toy/model-sft: LLaVA's stage 2, the instruction data toy/sft.json, from stage 1's model (if any)."""
    start = "model-pretrain" if args.pretrain_epochs else "model-init"
    train_stage("stage 2", out, "sft", start, "sft.json", args.sft_epochs, args)


# ----------------------------------------------------------------------------- the bands
def majority(records):
    """Each family's majority-answer rate: what always giving its most frequent answer would score."""
    answers = {}
    for record in records:
        answers.setdefault(record["families"][0], []).append(record["conversations"][1]["value"].lower())
    return {f: max(a.count(x) for x in set(a)) / len(a) for f, a in sorted(answers.items())}


def measure_open(out, args):
    """The open or prior stage's report: every band's quantity, measured on the SFT model's answers (toy/report/)."""
    from eval import hallucination, pope, priors, runner, toyvqa
    images, answers_dir = os.path.join(out, "images"), os.path.join(out, "report")
    model, processor = runner.load_model(os.path.join(out, "model-sft"))
    decoding = dict(max_new_tokens=96, batch_size=64, weights=runner.fingerprint(os.path.join(out, "model-sft")))
    val = common.read_records(os.path.join(out, "val.json"))
    report = dict(short=toyvqa.evaluate(model, processor, "sft", os.path.join(out, "val.json"), images, answers_dir,
                                        None, **decoding)["clean"], majority=majority(val))
    report["pope"] = pope.evaluate(model, processor, "sft", os.path.join(out, "pope"), images, answers_dir,
                                   prompt_suffix=pope.LLAVA_SUFFIX, **decoding)
    report["open"] = hallucination.evaluate(model, processor, "sft", out, images, answers_dir, **decoding)
    # the pool's captions (textvqa) and descriptions (coco), as seva.py asks them: clean and under noise
    pool = [r for r in common.read_records(os.path.join(out, "pool.json")) if r["families"][0] in ("caption",
                                                                                                    "description")]
    pool = pool[:args.noise_check]
    questions = toyvqa.toy_questions(pool)
    clean = runner.answer_questions(model, processor, questions, os.path.join(answers_dir, "pool-clean.jsonl"), "sft",
                                    images, **decoding)
    noisy = runner.answer_questions(model, processor, questions, os.path.join(answers_dir, "pool-noise500.jsonl"),
                                    "sft", images, noise_step=500, seed=args.seed, **decoding)
    report["noise500_changed"] = toyvqa.change_rate(clean, noisy)
    if args.stage == "prior":  # the prior's share on clean and noisy images (eval/priors.py)
        found = {name: priors.evaluate(model, processor, "sft", out, answers_dir, step, args.seed, **decoding)
                 for name, step in (("prior", None), ("prior_noise500", 500))}
        report.update(found)
    report["bands"] = {}
    for name, check in (PRIOR_BANDS if args.stage == "prior" else BANDS).items():
        measured, ok = check(report)
        report["bands"][name] = dict(measured=measured, ok=bool(ok))
    return report


def measure_closed(out, args):
    """The closed stage's report: val exact match, and the share of pool answers noise at step 500 changes."""
    from eval import toyvqa
    model, processor = vlm.load(os.path.join(out, "model-sft"))
    val = common.read_records(os.path.join(out, "val.json"))
    pool = common.read_records(os.path.join(out, "pool.json"))[:args.noise_check]
    accuracy, _ = toyvqa.vqa_accuracy(model, processor, val, os.path.join(out, "images"))
    changed = toyvqa.noise_change_rate(model, processor, pool, os.path.join(out, "images"), 500, args.seed)
    return {"val_accuracy": accuracy, "noise500_changed": changed}


def print_report(report, stage):
    if stage == "closed":
        accuracy, changed = report["val_accuracy"], report["noise500_changed"]
        print("greedy exact match on val.json: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
        print(f"  band 55%-90%: {'ok' if 0.55 <= accuracy['overall'] <= 0.90 else 'OUT OF BAND'}")
        print(f"answers changed by diffusion noise at step 500 on pool questions: {changed:.1%}")
        print(f"  band >= 15%: {'ok' if changed >= 0.15 else 'OUT OF BAND'}")
        return
    short, pope = report["short"], report["pope"]
    print("short answers, exact match: " + ", ".join(f"{k} {v:.2f}" for k, v in short.items())
          + "; majority answer: " + ", ".join(f"{k} {v:.2f}" for k, v in report["majority"].items()))
    print("POPE accuracy / yes-ratio (prompt: the question + LLaVA-1.5's one-word suffix; eval.compare asks the "
          "question alone unless --prompt-suffix llava): " + ", ".join(
        f"{s} {pope[s]['accuracy']:.2f} / {pope[s]['yes_ratio']:.2f}" for s in SPLITS))
    for kind in KINDS:
        m = report["open"][kind]
        print(f"{kind}s: CHAIR_i {m['chair_i']:.2f}, CHAIR_s {m['chair_s']:.2f}, Cover {m['cover']:.2f}, "
              f"SHR-like {m['shr']:.2f}, {m['words']:.1f} words, {m['unparsed']} unparsed sentences")
    print("sentence answers right: " + ", ".join(f"{k} {v:.2f}" for k, v in report["open"]["sentence"].items()))
    print(f"pool captions and descriptions changed by noise at step 500: {report['noise500_changed']:.1%}")
    if "prior" in report:
        from eval import priors
        for name in ("prior", "prior_noise500"):
            print(f"{name} (eval/priors.py, percent):\n" + priors.format_table(report[name]))
    for name, band in report["bands"].items():
        print(f"  band {name}: {band['measured']}: {'ok' if band['ok'] else 'OUT OF BAND'}")


# ----------------------------------------------------------------------------- the whole build
def build(args):
    """Build every missing part of the toy world (all of it with --force); print the bands."""
    torch.set_num_threads(args.threads)
    out, started = args.out, time.time()
    os.makedirs(out, exist_ok=True)
    timings = {}

    def part(name, done, make):
        """Make one part of the world unless it is done (and not --force); time it."""
        if args.force or not done:
            began = time.time()
            make()
            timings[name] = time.time() - began

    def data():
        if args.stage in ("open", "prior"):
            sizes = dict(sft=args.sft_images, shares=args.subset_shares, pool=args.pool_size, unseen=args.unseen_images,
                         val=dict(short=args.val_images, sentence=args.val_images // 2,
                                  caption=args.val_images // 4, description=args.val_images // 4),
                         pope=args.pope_images, prior=args.prior_images, prior_pool=args.prior_pool,
                         pair_share=args.pair_share,
                         faint_share=args.faint_share, faint=args.faint, faint_counted=bool(args.faint_counted))
            pairs = toypriors.partner_pairs(args.seed) if args.stage == "prior" else None
            print("data:", toydata.build_open(out, args.seed, sizes, pairs))
        else:
            sizes = dict(sft=args.sft_images, unseen=args.unseen_images, val=args.val_images, pope=args.pope_images,
                         pool=args.pool_size)
            print("data:", toydata.build_closed(out, args.seed, sizes))

    def measure():
        report = measure_closed(out, args) if args.stage == "closed" else measure_open(out, args)
        report["args"] = vars(args)  # what built the world, with every default resolved
        toydata.write_json(report, report_path)

    exists = lambda name: os.path.exists(os.path.join(out, name))
    report_path = os.path.join(out, "report.json")
    part("data", exists("scenes.json"), data)
    part("stage 0", exists("model-init"),
         lambda: build_model(out, common.read_records(os.path.join(out, "scenes.json")), args))
    if args.pretrain_epochs:
        part("stage 1", exists("model-pretrain"), lambda: pretrain(out, args))
    part("SFT", exists("model-sft"), lambda: fine_tune(out, args))
    part("bands", exists("report.json"), measure)
    report = common.read_records(report_path)
    print(f"\ntoy world ({args.stage} stage) in {out}/ ({time.time() - started:.0f} s"
          + "".join(f"; {name} {seconds:.0f} s" for name, seconds in timings.items()) + ")")
    print_report(report, args.stage)
    return report


# The defaults of each stage: the open stage's were chosen to meet its bands, on SFT models alone.
STAGE_DEFAULTS = {
    "open": dict(sft_images=4000, pool_size=600, unseen_images=600, val_images=400, pope_images=60,
                 subset_shares=(0.25, 0.15, 0.35, 0.25), vocab_size=1000, width=128, vision_layers=3,
                 text_layers=2, patch_size=16, vision_steps=800, pretrain_epochs=4, sft_epochs=3, sft_batch_size=64,
                 sft_lr=1e-3, noise_check=100, train_vision=0),
    "closed": dict(sft_images=6000, pool_size=1000, unseen_images=1000, val_images=800, pope_images=100,
                   subset_shares=None, vocab_size=1000, width=128, vision_layers=3, text_layers=2, patch_size=8,
                   vision_steps=800, pretrain_epochs=0, sft_epochs=6, sft_batch_size=64, sft_lr=1e-3,
                   noise_check=500, train_vision=0),
}

# the prior stage: the open stage's, its scenes drawn with partners (toyworld/priors.py)
STAGE_DEFAULTS["prior"] = dict(STAGE_DEFAULTS["open"], prior_images=100, prior_pool=400,
                               pair_share=toypriors.PAIR_SHARE, faint_share=toypriors.FAINT_SHARE, faint=toypriors.FAINT,
                               faint_counted=int(toypriors.FAINT_COUNTED))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m toyworld", description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--out", default="toy", help="folder to write the toy world to")
    p.add_argument("--stage", default="open", choices=list(STAGE_DEFAULTS),
                   help="open: LLaVA-665k's shape, captions and descriptions (the default); prior: the same with "
                        "language priors, each object kind with a partner beside it (toyworld/priors.py); closed: the "
                        "first toy world of one-word answers (ablations/report.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--force", action="store_true", help="rebuild every part, even finished ones")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    g = p.add_argument_group("data sizes (defaults: the stage's)")
    g.add_argument("--sft-images", type=int, help="images (records) of the SFT split (open: 4000; closed: 6000)")
    g.add_argument("--subset-shares", type=float, nargs=4, metavar=("TEXTVQA", "OCR_VQA", "GQA", "COCO"),
                   help="open: the share of SFT images in each subset (0.25 0.15 0.35 0.25)")
    g.add_argument("--pool-size", type=int,
                   help="open: SFT records per subset in the SeVa pool (600); closed: SFT records (1000)")
    g.add_argument("--unseen-images", type=int, help="open: per subset (600); closed: in all (1000)")
    g.add_argument("--val-images", type=int, help="held-out short-answer images; open: half as many sentence "
                                                  "questions, a quarter captions, a quarter descriptions (400)")
    g.add_argument("--prior-images", type=int, help="prior: held-out images per kind of answer (caption, "
                                                    "description) and of image (broken, kept) (100)")
    g.add_argument("--prior-pool", type=int, help="prior: records of pool-prior.json, a SeVa pool drawn as the held-out "
                                                  "images are, half breaking the prior (400)")
    g.add_argument("--pair-share", type=float, help="prior: the probability that a unit of a training scene is a "
                                                  "pair of partners (0.7)")
    g.add_argument("--faint-share", type=float, help="prior: the probability that a training pair's partner is "
                                                   "drawn faint, named by its caption all the same (0.5)")
    g.add_argument("--faint", type=float, help="prior: a faint partner's share of its colour's contrast with the "
                                               "background (0.1)")
    g.add_argument("--faint-counted", type=int, choices=[0, 1],
                   help="prior: 1 = stage 0's object count counts the faint partners, which its other targets never "
                        "see (1)")
    g.add_argument("--pope-images", type=int, help="POPE images (6 questions each, per split) (open: 60; closed: 100)")
    g = p.add_argument_group("model and training (defaults: the stage's)")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size (1000)")
    g.add_argument("--width", type=int, help="hidden size of the vision tower and the language model (128)")
    g.add_argument("--vision-layers", type=int, help="CLIP layers; LLaVA reads layer -2 (3)")
    g.add_argument("--text-layers", type=int, help="Llama layers (2)")
    g.add_argument("--patch-size", type=int, help="CLIP patch size: (64/patch)^2 image tokens (open: 16; closed: 8)")
    g.add_argument("--vision-steps", type=int, help="stage-0 vision pretraining steps (800)")
    g.add_argument("--pretrain-epochs", type=float,
                   help="stage-1 passes over pretrain.json, 0 = no stage 1 (open: 4; closed: 0)")
    g.add_argument("--sft-epochs", type=float, help="SFT passes over sft.json (open: 3; closed: 6)")
    g.add_argument("--sft-batch-size", type=int, help="examples per step of stages 1 and 2 (64)")
    g.add_argument("--sft-lr", type=float, help="peak learning rate of stages 1 and 2 (1e-3)")
    g.add_argument("--train-vision", type=int, choices=[0, 1],
                   help="train the vision tower in stages 1 and 2 too (default 0: frozen, as LLaVA)")
    g.add_argument("--noise-check", type=int,
                   help="pool answers used to measure the noise band (open: 100 captions and descriptions; "
                        "closed: 500 questions)")
    args = p.parse_args(argv)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    common.run_main(lambda: build(parse_args(argv)), "toyworld")
