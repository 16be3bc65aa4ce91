"""
One model scored as study/protocol.md says: short answers, the open stage's metrics (captions' and descriptions'
CHAIR_i, CHAIR_s, Cover, SHR-like and length, sentence answers, POPE), sampling consistency, the false claims
of the trained pairs, and the pair-wise outcomes against the start model (paper Fig. 5).
"""
import json
import os
import statistics

import common
from eval import compare, gallery_compare, hallucination, pope, toyvqa
from study.settings import TEMPERATURES


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


def sampling_consistency(model, processor, world, answers_dir, model_id, weights, seed):
    """C5: {temperature: share of short answers (toy/val.json) sampled at it, seeded, that equal the greedy
    ones}, as eval.compare measures it (its answer files in answers_dir)."""
    found = compare.consistency(model, processor, model_id, common.read_records(os.path.join(world, "val.json")),
                                os.path.join(world, "images"), answers_dir, TEMPERATURES, seed, batch_size=64,
                                weights=weights)
    return {t: v["agreement"] for t, v in found.items()}


def confirm_scores(model, processor, confirm, answers_dir, model_id, weights):
    """The exploratory search's confirmation: a model's open-stage metrics and short-answer accuracy on a split
    the search never saw."""
    val = json.load(open(os.path.join(confirm, "val.json")))
    accuracy, _ = toyvqa.vqa_accuracy(model, processor, val, os.path.join(confirm, "images"))
    return dict(score_open(model, processor, confirm, answers_dir, model_id, weights), accuracy=accuracy)
