"""
SeVa, Algorithm 1 line 1: sample (image, question) instances from a LLaVA-665k-format pool (paper 4.1: the
textvqa and ocr_vqa subsets, up to 2 questions per image, 8k instances from each subset), seeded.

An instance is {id, image, question, answer}: `answer` is the pool's own answer, never used to make a pair
(seva.py keeps it beside the pair only to measure which way the pair points).
"""
import random
from collections import Counter

import vlm

SUBSETS = ("textvqa", "ocr_vqa", "gqa", "coco", "vg")  # LLaVA-665k's image folders
def clean_question(text, subset="all"):
    """The authors' step 1: `<image>` removed; for textvqa (TextCaps captions) the rest is kept as it is, newlines
    included; every other subset loses the short-answer suffix and its newlines (the authors do this for
    ocr_vqa; gqa and coco, ablations of the paper, get the same)."""
    if subset == "textvqa":
        return text.replace("<image>\n", "").replace("<image>", "").strip()
    text = text.replace("<image>", "").replace(vlm.SINGLE_WORD, "")
    # Deviation: newlines become one space (the authors delete them).
    return " ".join(text.split())


def record_problem(record, subset="all"):
    """Why a record cannot give instances, or None."""
    if not isinstance(record, dict):
        return "not a json object"
    missing = [key for key in ("id", "image", "conversations") if key not in record]
    if missing:
        return f"missing key(s): {', '.join(missing)}"
    turns = record["conversations"]
    if not isinstance(record["image"], str) or not isinstance(turns, list) or not all(
            isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str) for t in turns):
        return "image must be a path and conversations a list of {from: human|gpt, value} turns"
    humans = [t for t in turns if t["from"] == "human"]
    if not humans:
        return "no human turn"
    if any(not clean_question(t["value"], subset) for t in humans):
        return "a human turn is empty once cleaned"
    return None


def subset_of(record, subsets):
    """The subset a record belongs to, by its image path's first folder (all: one subset of everything)."""
    if list(subsets) == ["all"]:
        return "all"
    image = record.get("image") if isinstance(record, dict) else None
    prefix = image.split("/")[0] if isinstance(image, str) else None
    return prefix if prefix in subsets else None


def record_instances(record, seed, subset="all"):
    """Up to 2 of a record's human turns, picked at random (paper 4.1), each one instance."""
    turns = record["conversations"]
    humans = [k for k, turn in enumerate(turns) if turn["from"] == "human"]
    rng = random.Random(f"{seed}/{record['id']}")  # per record: its pick does not depend on the rest
    instances = []
    for turn in sorted(rng.sample(range(len(humans)), min(2, len(humans)))):
        k = humans[turn]
        answer = turns[k + 1]["value"] if k + 1 < len(turns) and turns[k + 1]["from"] == "gpt" else None
        instances.append(dict(id=f"{record['id']}-{turn}", image=record["image"],
                              question=clean_question(turns[k]["value"], subset), answer=answer))
    return instances


def sample_instances(records, subsets, num_samples, seed, source="data"):
    """Alg. 1 line 1: num_samples instances (0: all), drawn evenly over the subsets, seeded.

    Returns (instances, skipped counts by reason, messages). Records are taken in a seeded random order
    with all their (up to 2) instances, as the authors sample records; the last one may be cut to fit.
    """
    groups = {subset: [] for subset in subsets}
    skipped, messages = Counter(), []
    for position, record in enumerate(records):
        subset = subset_of(record, subsets)
        if subset is None:
            continue
        problem = record_problem(record, subset)
        if problem:
            name = record.get("id", f"#{position}") if isinstance(record, dict) else f"#{position}"
            skipped["malformed record"] += 1
            messages.append(f"{source}: record {name}: {problem}; skipped")
            continue
        groups[subset].append(record)
    quotas = [num_samples // len(subsets) + (i < num_samples % len(subsets)) for i in range(len(subsets))]
    instances = []
    for (subset, group), quota in zip(groups.items(), quotas):
        order = list(range(len(group)))
        random.Random(f"{seed}/{subset}").shuffle(order)
        taken = []
        for i in order:
            if num_samples and len(taken) >= quota:
                break
            taken += record_instances(group[i], seed, subset)
        if not taken or (num_samples and len(taken) < quota):
            messages.append(f"{source}: subset {subset} gives only {len(taken)} instances of its share {quota or 'all'}")
        instances += taken[:quota] if num_samples else taken
    return instances, skipped, messages
