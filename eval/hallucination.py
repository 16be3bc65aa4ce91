"""
Open-ended answers on the toy world, scored exactly from the scene graphs (toyworld/grammar.py reads every sentence
back into claims): object hallucination in captions and descriptions, and the correctness of sentence answers.
The toy world's stand-in for the paper's hallucination and open-ended columns (SHR, MM-Vet, LLaVA-Bench).

  CHAIR_i   hallucinated object mentions / all object mentions, pooled over the answers (Rohrbach et al. 2018);
            an object is a (colour, shape), hallucinated when the scene holds no such object
  CHAIR_s   answers with at least one hallucinated object / all answers
  Cover     the scene's objects mentioned / the scene's objects, pooled (AMBER)
  SHR-like  sentences with any false claim (object, size, position, count, word) or outside the grammar / all
            sentences, split and counted as HA-DPO's SHR is (eval/shr.py)
  words     mean length of an answer in words (paper Fig. 5: answers grow under SeVa)
  unparsed  sentences the grammar cannot read (counted in SHR-like as false, and shown: a degenerate model
            would otherwise look clean)

Sentence answers (the coco subset's closed-set questions without the single-word suffix): right when the
sentence holds the expected claim and no false one.

    python -m eval.hallucination --model toy/model-sft --adapter runs/dpo/adapter
"""
import argparse
import os

import common
import pairs as pairs_file
from toyworld import grammar as toygrammar
from eval import runner, shr, toyvqa

KINDS = ("caption", "description")


# ----------------------------------------------------------------------------- scoring
def answer_claims(text):
    """(object claims, unparsed sentences) of an answer."""
    objects, unparsed = [], 0
    for sentence in toygrammar.split_sentences(text):
        claims = toygrammar.parse(sentence)
        if claims is None:
            unparsed += 1
        else:
            objects += [c for c in claims if c["kind"] == "object"]
    return objects, unparsed


def mentioned(claims, scene):
    """How many of the scene's objects the object claims name (Cover's numerator): same shape, and colour where
    the claim says one."""
    return sum(any(c["shape"] == o["shape"] and c["colour"] in (None, o["colour"]) for c in claims)
               for o in scene["objects"])


def hallucination(texts, scenes):
    """The metrics above over answers (strings) to open-ended prompts about `scenes` (one each)."""
    mentions = hallucinated = answers_hallucinating = covered = objects = words = unparsed = 0
    for text, scene in zip(texts, scenes):
        claims, bad = answer_claims(text)
        wrong = [c for c in claims if toygrammar.hallucinated_object(c, scene)]
        mentions, hallucinated, unparsed = mentions + len(claims), hallucinated + len(wrong), unparsed + bad
        answers_hallucinating += bool(wrong)
        objects += len(scene["objects"])
        covered += mentioned(claims, scene)
        words += len(text.split())
    sentences = shr.metrics(shr.judge_toy(list(zip(texts, scenes))))
    return dict(chair_i=hallucinated / max(1, mentions), chair_s=answers_hallucinating / len(texts),
                cover=covered / max(1, objects), shr=sentences["shr"], words=words / len(texts),
                sentences=sentences["sentences_per_image"], mentions=mentions, unparsed=unparsed,
                answers=len(texts))


def sentence_right(text, record, scene):
    """Does a sentence answer hold the expected claim (the reference sentence's) and no false one?"""
    claims = [c for s in toygrammar.split_sentences(text) for c in (toygrammar.parse(s) or [None])]
    if not claims or None in claims or toygrammar.false_claims(claims, scene):
        return False
    expected = toygrammar.parse(record["conversations"][1]["value"])
    return all(claim in claims for claim in expected)


def sentence_scores(records, texts, scenes):
    """{family: share right, ..., "overall": share right} of sentence answers."""
    right = {}
    for record, text, scene in zip(records, texts, scenes):
        right.setdefault(record["families"][0], []).append(sentence_right(text, record, scene))
    scores = {family: sum(r) / len(r) for family, r in sorted(right.items())}
    scores["overall"] = sum(sum(r) for r in right.values()) / len(records)
    return scores


# ----------------------------------------------------------------------------- the pairs SeVa trains on
PAIR_CLASSES = ("chosen fewer false claims", "as many", "rejected fewer false claims")


def false_count(text, scene):
    """The false claims of an answer about a scene: each claim the scene contradicts, and each sentence outside
    the grammar (it claims something unreadable)."""
    count = 0
    for sentence in toygrammar.split_sentences(text):
        claims = toygrammar.parse(sentence)
        count += 1 if claims is None else len(toygrammar.false_claims(claims, scene))
    return count


def pair_claims(pairs, scenes):
    """Does the self-supervised preference point the right way on open-ended answers? Per subset (the image's
    folder) of the pairs: how many pairs have fewer false claims in chosen than in rejected, as many, or more;
    the mean false claims and words of each side. Pairs whose image has no scene are left out; a record with
    several rejected answers counts once per rejected answer."""
    table = {}
    for pair in pairs_file.expand(pairs):
        scene = scenes.get(pair["image"])
        if scene is None:
            continue
        row = table.setdefault(pair["image"].split("/")[0], dict(
            pairs=0, **dict.fromkeys(PAIR_CLASSES, 0), false_chosen=0.0, false_rejected=0.0, words_chosen=0.0,
            words_rejected=0.0))
        chosen, rejected = false_count(pair["chosen"], scene), false_count(pair["rejected"], scene)
        row["pairs"] += 1
        row[PAIR_CLASSES[(chosen >= rejected) + (chosen > rejected)]] += 1
        for side, count in (("chosen", chosen), ("rejected", rejected)):
            row[f"false_{side}"] += count
            row[f"words_{side}"] += len(pair[side].split())
    for row in table.values():
        for key in ("false_chosen", "false_rejected", "words_chosen", "words_rejected"):
            row[key] /= row["pairs"]
    return dict(sorted(table.items()))


# ----------------------------------------------------------------------------- the benchmark
def evaluate(model, processor, model_id, world, image_folder, out_dir, noise_step=None, seed=0, rank=0,
             world_size=1, **decoding):
    """{caption, description: hallucination(); sentence: sentence_scores()} on the toy world's val files
    (WORLD/val-captions.json, val-descriptions.json, val-sentences.json); answers in OUT_DIR. noise_step:
    also the captions and descriptions under diffusion noise at that step ("caption-noisy", ...)."""
    scenes = common.read_records(os.path.join(world, "scenes.json"))
    shared = dict(rank=rank, world_size=world_size, **decoding)
    results = {}
    for kind in KINDS + ("sentence",):
        records = common.read_records(os.path.join(world, f"val-{kind}s.json"))
        questions = toyvqa.toy_questions(records)
        runs = [("", None)] + ([("-noisy", noise_step)] if noise_step is not None and kind != "sentence" else [])
        for tag, step in runs:
            answers = runner.answer_questions(model, processor, questions,
                                              os.path.join(out_dir, f"{kind}{tag or '-clean'}.jsonl"), model_id,
                                              image_folder, noise_step=step, seed=seed, **shared)
            texts = toyvqa.texts_of(records, answers)
            their = [scenes[r["image"]] for r in records]
            results[kind + tag] = (sentence_scores(records, texts, their) if kind == "sentence"
                                   else hallucination(texts, their))
    return results


def format_table(results):
    rows = [[kind] + [f"{100 * results[kind][m]:.1f}" for m in ("chair_i", "chair_s", "cover", "shr")]
            + [f"{results[kind]['words']:.1f}", results[kind]["unparsed"]] for kind in results if kind != "sentence"]
    lines = common.markdown_table(["answers", "CHAIR_i", "CHAIR_s", "Cover", "SHR-like", "words", "unparsed"], rows)
    if "sentence" in results:
        lines += ["", "sentence answers right: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in results["sentence"].items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    runner.add_model_args(p, max_new_tokens=96)
    g = p.add_argument_group("data")
    g.add_argument("--world", default="toy", help="the toy world (python -m toyworld): its val files and scenes")
    g.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    g.add_argument("--noise-step", type=int, default=-1,
                   help="also answer under diffusion noise at this step 0..999 (-1: not; paper: 500 for 13B)")
    g.add_argument("--out", default="runs/eval/hallucination", help="folder for the answer files and results")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = runner.setup(args)
    results = evaluate(run.model, run.processor, run.model_id, args.world, args.image_folder, args.out,
                       None if args.noise_step < 0 else args.noise_step, args.seed, run.rank, run.world_size,
                       **run.decoding)
    if run.rank == 0:
        runner.write_results(args, run, "hallucination", results)
        print(f"toy hallucination, {run.model_id} (percent)\n" + format_table(results))
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.hallucination")
