"""
The pairs file that seva.py writes and train_ddp.py --objective dpo reads: one json line per kept pair,

    {"id", "image", "question", "chosen", "rejected", "augmentation", ["noise_step"], ["answer"]}

chosen and rejected both scored on `image` (the original: Alg. 1 line 4). `answer` is the data's own answer,
kept for analysis only: it says which way a pair points (`pair_quality`), which the paper does not measure.
With several negatives (seva.py --num-negatives K, paper 3.3) `rejected` is a list of the distinct rejected
answers and `noise_steps` the step each came from; `expand` makes one single-negative pair of each.
Exports: TRL's vision preference format, and the authors' step-3 json (one pair per rejected answer).
seva.py ends with `write_pairs`: the pairs file, OUT.args.json (its arguments and `summarize`'s summary) and
the exports.
"""
import json
import os
from collections import Counter

import common


def pair_record(instance, chosen, rejected, augmentation, noise_step):
    """One line of the pairs file: what train_ddp.py trains on, plus the json's answer for analysis only.
    rejected, noise_step: one answer and its step, or lists of them (several negatives)."""
    pair = dict(id=instance["id"], image=instance["image"], question=instance["question"], chosen=chosen,
                rejected=rejected, augmentation=augmentation)
    if augmentation == "diffusion":
        pair["noise_steps" if isinstance(noise_step, list) else "noise_step"] = noise_step
    if instance["answer"] is not None:
        pair["answer"] = instance["answer"]  # never used to make the pair
    return pair


# A pair's reference log-probs, where it carries them (seva.py --reference-logps, train_ddp.py --reference).
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def rejected_list(rejected):
    """A pair's rejected answer(s) (or their encodings) as a list: [one], or the several negatives."""
    return rejected if isinstance(rejected, list) else [rejected]


def expand(pairs):
    """One single-negative pair per rejected answer (a record with one rejected answer stays as it is)."""
    out = []
    for pair in pairs:
        if not isinstance(pair["rejected"], list):
            out.append(pair)
            continue
        for j, rejected in enumerate(pair["rejected"]):
            single = {k: v for k, v in pair.items() if k != "noise_steps"}
            single.update(rejected=rejected, **({"noise_step": pair["noise_steps"][j]} if "noise_steps" in pair else {}))
            out.append(single)
    return out


QUALITY = ("chosen right, rejected wrong", "both wrong", "chosen wrong, rejected right", "both right but different")


def pair_quality(pairs):
    """Does the self-supervised preference point the right way? Counts over the kept pairs with an answer
    (right: equal to the json's answer, case-insensitive, stripped); None when no pair has one."""
    counts = dict.fromkeys(QUALITY, 0)
    for pair in expand(pairs):
        if "answer" in pair:
            counts[quality_of(pair)] += 1
    return counts if sum(counts.values()) else None


def quality_of(pair):
    """The QUALITY class of one pair that has the json's answer."""
    truth = pair["answer"].strip().lower()
    right = (pair["chosen"].strip().lower() == truth, pair["rejected"].strip().lower() == truth)
    return QUALITY[[(True, False), (False, False), (False, True), (True, True)].index(right)]


def export_lines(pairs, image_folder, kind):
    """trl: TRL's vision preference format (conversational); authors: their step-3 json list. A record with
    several rejected answers gives one pair each."""
    pairs = expand(pairs)
    if kind == "authors":
        return [json.dumps([dict(chosen=p["chosen"], reject=p["rejected"], question=p["question"], image_id=p["image"])
                            for p in pairs], indent=1, ensure_ascii=False)]
    text = lambda role, content: [{"role": role, "content": content}]
    return [json.dumps(dict(images=[os.path.join(image_folder, p["image"])],
                            prompt=text("user", [{"type": "image"}, {"type": "text", "text": p["question"]}]),
                            chosen=text("assistant", [{"type": "text", "text": p["chosen"]}]),
                            rejected=text("assistant", [{"type": "text", "text": p["rejected"]}])),
                       ensure_ascii=False) for p in pairs]


# ----------------------------------------------------------------------------- what seva.py writes at the end
def summarize(instances, rows, kept, sampling_skipped, messages):
    """What seva.py made, into OUT.args.json: instances answered, pairs kept, answer lengths, skips, pair quality.
    rows: seva.answer_chunk's rows of every instance; kept: the pair records line 3 kept."""
    skipped = Counter(sampling_skipped) + Counter(row["skipped"] for row in rows if "skipped" in row)
    answered = sum("skipped" not in row for row in rows)
    single = expand(kept)  # one (chosen, rejected) per rejected answer
    words = lambda key: round(sum(len(p[key].split()) for p in single) / max(len(single), 1), 2)
    return dict(instances=len(instances), answered=answered, pairs=len(kept),
                kept_percent=round(100 * len(kept) / max(answered, 1), 1),
                mean_words_chosen=words("chosen"), mean_words_rejected=words("rejected"),
                skipped=dict(sorted(skipped.items())), pair_quality=pair_quality(kept),
                messages=messages + [row["message"] for row in rows if "skipped" in row])


def format_summary(s, filter_mode):
    """summarize's dict as the lines seva.py prints at the end."""
    lines = [f"instances {s['instances']}, answered {s['answered']}, pairs kept {s['pairs']} ({s['kept_percent']}%, "
             f"filter {filter_mode})",
             f"mean answer length of kept pairs: chosen {s['mean_words_chosen']:.1f} words, "
             f"rejected {s['mean_words_rejected']:.1f} words"]
    lines += [f"skipped ({reason}): {count}" for reason, count in s["skipped"].items()]
    if s["pair_quality"]:
        total = sum(s["pair_quality"].values())
        lines.append(f"pair quality over the {total} kept pairs with an answer in the data:")
        lines += [f"  {name:<30} {count:>6} {100 * count / total:5.1f}%" for name, count in s["pair_quality"].items()]
    return "\n".join(lines)


def write_pairs(path, kept, run, image_folder, exports=()):
    """The pairs file, PATH.args.json (`run`: the arguments, world size and summary) and the exports (trl:
    PATH less .jsonl + .trl.jsonl; authors: + .authors.json), each atomically."""
    common.write_atomic(path, [json.dumps(pair, ensure_ascii=False) for pair in kept])
    common.write_atomic(path + ".args.json", [json.dumps(run, indent=1, ensure_ascii=False)])
    base = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
    for kind in exports:
        common.write_atomic(base + (".trl.jsonl" if kind == "trl" else ".authors.json"),
                            export_lines(kept, image_folder, kind))
