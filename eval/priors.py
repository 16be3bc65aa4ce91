"""
Prior-driven hallucination on the toy world's prior stage (python -m toyworld --stage prior): where a model names
an object because its partner is there (the language prior), not because it sees it.

On WORLD/val-prior.json (captions and descriptions of images that break the prior, objects without their
partners, and of images that keep it, a pair), per kind of answer and of image:

  partner rate     answers naming an absent partner of an object in the image / answers (on broken images: the
                   prior-driven hallucination; on kept images every partner is present, so it is 0)
  CHAIR_i          hallucinated object mentions / all object mentions (eval/hallucination.py), split by cause:
                   CHAIR_i partner (an absent partner named) + CHAIR_i other (any other absent object)
  first false      the mean position (1 = first) of an answer's first hallucinated object among its object
                   mentions, over the answers with one (0 where no answer has one); and the share of those after
                   a correctly named object
                   (LURE: hallucinations come late in an answer, after what is seen)
  Cover            the image's objects mentioned / the image's objects

    python -m eval.priors --model toy-prior/model-sft [--adapter runs/dpo/adapter] [--noise-step 500]
"""
import argparse
import os
import statistics

import common
from eval import hallucination, runner, toyvqa
from toyworld import grammar as toygrammar
from toyworld import priors as toypriors

SPLITS = ("broken", "kept")
KINDS = ("caption", "description")


def partner_map(world):
    """{(colour, shape): its partner} of a prior-stage world (WORLD/partners.json)."""
    return toypriors.partner_of([tuple(map(tuple, pair)) for pair in common.read_records(
        os.path.join(world, "partners.json"))])


def prior_metrics(texts, scenes, partner):
    """The metrics above over answers (strings) about `scenes` (one each); partner: {kind: partner}."""
    mentions = by_partner = other = naming = first_late = covered = objects = words = 0
    firsts = []
    for text, scene in zip(texts, scenes):
        claims, _ = hallucination.answer_claims(text)
        absent = toypriors.absent_partners(scene, partner)
        named_partner = False
        first = None
        for position, claim in enumerate(claims, 1):
            if not toygrammar.hallucinated_object(claim, scene):
                continue
            if claim["colour"] is not None and (claim["colour"], claim["shape"]) in absent:
                by_partner, named_partner = by_partner + 1, True
            else:
                other += 1
            first = first or position
        mentions += len(claims)
        naming += named_partner
        covered, objects = covered + hallucination.mentioned(claims, scene), objects + len(scene["objects"])
        words += len(text.split())
        if first:
            firsts.append(first)
            first_late += first > 1
    return dict(partner_rate=naming / max(1, len(texts)), chair_i=(by_partner + other) / max(1, mentions),
                chair_i_partner=by_partner / max(1, mentions), chair_i_other=other / max(1, mentions),
                cover=covered / max(1, objects), words=words / len(texts),
                first_false=statistics.mean(firsts) if firsts else 0.0,
                first_false_late=first_late / max(1, len(firsts)), answers=len(texts), mentions=mentions)


def evaluate(model, processor, model_id, world, out_dir, noise_step=None, seed=0, **decoding):
    """{"{split} {kind}s": prior_metrics(), ..., "broken": pooled over the broken images' captions and
    descriptions, "kept": the same on kept images} on WORLD/val-prior.json; answers in OUT_DIR
    (prior[-noise{step}].jsonl). noise_step: each image under diffusion noise at that step (seeded)."""
    records = common.read_records(os.path.join(world, "val-prior.json"))
    scenes = common.read_records(os.path.join(world, "scenes.json"))
    partner = partner_map(world)
    name = "prior" + (f"-noise{noise_step}" if noise_step is not None else "")
    answers = runner.answer_questions(model, processor, toyvqa.toy_questions(records),
                                      os.path.join(out_dir, f"{name}.jsonl"), model_id, os.path.join(world, "images"),
                                      noise_step=noise_step, seed=seed, **decoding)
    texts = toyvqa.texts_of(records, answers)
    results = {}
    for split in SPLITS:
        for kind in KINDS + (None,):
            chosen = [(t, scenes[r["image"]]) for r, t in zip(records, texts)
                      if r["prior"] == split and (kind is None or r["families"][0] == kind)]
            name = split if kind is None else f"{split} {kind}s"
            if not chosen:
                raise ValueError(f"{os.path.join(world, 'val-prior.json')}: no {name} to score")
            results[name] = prior_metrics(*zip(*chosen), partner)
    return results


COLUMNS = ("partner_rate", "chair_i", "chair_i_partner", "chair_i_other", "cover", "first_false",
           "first_false_late", "words")


def format_table(results):
    lines = ["| answers | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in ("first_false", "words") else
                                                 f"{100 * row[c]:.1f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.priors", description=__doc__, formatter_class=common.HelpFormatter)
    runner.add_model_args(p, max_new_tokens=96, batch_size=64)
    g = p.add_argument_group("the prior stage")
    g.add_argument("--world", default="toy-prior", help="a prior-stage toy world (python -m toyworld --stage prior)")
    g.add_argument("--noise-step", type=int, default=-1,
                   help="answer on each image under diffusion noise at this step 0..999 (-1: the clean images)")
    g.add_argument("--out", default="runs/eval/priors", help="folder for the answer files and results")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = runner.setup(args)
    results = evaluate(run.model, run.processor, run.model_id, args.world, args.out,
                       None if args.noise_step < 0 else args.noise_step, args.seed, **run.decoding)
    runner.write_results(args, run, "priors", results)
    print(f"prior-driven hallucination, {run.model_id} (percent; first false: a position)\n" + format_table(results))
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.priors")
