"""
The toy world's data: questions about scenes, and the files a LLaVA-1.5 is fine-tuned and evaluated on.

Two stages:
- open (the default): LLaVA-665k's shape. Each SFT image belongs to one subset folder, as in 665k, so that
  `seva.py --subsets` means on the toy world what it means on the real data:
    textvqa/  TextCaps-style: "Provide a one-sentence caption for the provided image." (+ "Reference OCR token")
              -> one sentence naming every object (size, colour, shape) and the word
    ocr_vqa/  reading the word, with the single-word suffix -> the word
    gqa/      colour, shape, count and existence, with the suffix -> one word
    coco/     LLaVA-Instruct's stand-in: "Describe the image in detail." -> a few sentences (count, each object
              with its position, the word); and the closed-set questions without the suffix -> one sentence
  Every sentence is toyworld/grammar.py's, so every answer can be scored exactly against the scene graph.
- closed: the first toy world, every answer one word (five question families): ablations/report.md was made on it.
"""
import json
import os
import random

from tqdm import tqdm

import common
from toyworld import grammar as toygrammar
from toyworld import priors
from toyworld import scenes as toyscenes
import vlm
from toyworld.grammar import COLOURS, SHAPES

QUESTION_FAMILIES = ["colour", "shape", "count", "exist", "word"]
PHRASINGS = {
    "colour": ["What color is the {shape}?", "What is the color of the {shape}?",
               "Which color does the {shape} have?"],
    "shape": ["What shape is the {colour} object?", "Which shape is {colour}?",
              "What is the shape of the {colour} object?"],
    "count": ["How many objects are there?", "How many shapes are in the image?",
              "Count the objects in the image."],
    "exist": ["Is there a {colour} {shape} in the image?", "Do you see a {colour} {shape}?",
              "Is there a {colour} {shape}?"],
    "word": ["What word is written in the image?", "What does the text say?",
             "Read the word in the image."],
}
CAPTION = "Provide a one-sentence caption for the provided image."  # LLaVA-665k's textvqa (TextCaps) prompt
BRIEF = "Provide a brief description of the given image."  # one of LLaVA's stage-1 (LCS-558K) prompts
DESCRIBE = "Describe the image in detail."  # LLaVA-Instruct's detailed description
SUBSETS = ("textvqa", "ocr_vqa", "gqa", "coco")


# ----------------------------------------------------------------------------- questions
def answer(scene, family, slots):
    """The true answer of a question about a scene: the one place answers are computed."""
    objects = scene["objects"]
    if family == "colour":
        return next(o["colour"] for o in objects if o["shape"] == slots["shape"])
    if family == "shape":
        return next(o["shape"] for o in objects if o["colour"] == slots["colour"])
    if family == "count":
        return str(len(objects))
    if family == "exist":
        present = any(o["shape"] == slots["shape"] and o["colour"] == slots["colour"] for o in objects)
        return "Yes" if present else "No"
    if family == "word":
        return scene["word"]
    raise ValueError(family)


def askable(scene, family):
    """The slot fillings for which a question of this family has exactly one right answer."""
    objects = scene["objects"]
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    if family == "colour":
        return [{"shape": s} for s in SHAPES if shapes.count(s) == 1]
    if family == "shape":
        return [{"colour": c} for c in COLOURS if colours.count(c) == 1]
    if family == "exist":
        return [{"shape": s, "colour": c} for s in SHAPES for c in COLOURS]
    if family == "word":
        return [{}] if scene["word"] else []
    return [{}]


def exist_slots(scene, rng):
    """Half yes, half no, so the SFT data has no yes-bias."""
    present = [{"shape": o["shape"], "colour": o["colour"]} for o in scene["objects"]]
    if rng.random() < 0.5:
        return rng.choice(present)
    absent = [s for s in askable(scene, "exist") if s not in present]
    return rng.choice(absent)


def make_question(scene, family, rng):
    """(question, answer, slots) of a family about a scene, or None where the family has nothing to ask."""
    slots = exist_slots(scene, rng) if family == "exist" else None
    if slots is None:
        options = askable(scene, family)
        if not options:
            return None
        slots = rng.choice(options)
    question = rng.choice(PHRASINGS[family]).format(**slots)
    return question, answer(scene, family, slots), slots


def turns_record(turns):
    """A LLaVA-665k record body from [(family, question, answer)]: the image before the first question."""
    conversations = []
    for i, (_, question, reply) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": reply})
    return {"conversations": conversations, "families": [family for family, _, _ in turns]}


def questions_of(scene, rng, families, max_turns):
    """Up to max_turns (family, question, answer, slots) of different families, in a random order."""
    asked = []
    for family in rng.sample(families, len(families)):
        qa = make_question(scene, family, rng)
        if qa is not None:
            asked.append((family, *qa))
        if len(asked) == max_turns:
            break
    return asked


# ----------------------------------------------------------------------------- the open stage's records
def caption_prompt(scene):
    return CAPTION + (f"\nReference OCR token: {scene['word']}" if scene["word"] else "")


def short(question):
    return f"{question}\n{vlm.SINGLE_WORD}"


def subset_record(subset, scene, rng):
    """One image's SFT record in its subset's style."""
    if subset == "textvqa":
        return turns_record([("caption", caption_prompt(scene), toygrammar.caption(scene))])
    if subset == "ocr_vqa":
        question, reply, _ = make_question(scene, "word", rng)
        return turns_record([("word", short(question), reply)])
    if subset == "gqa":
        asked = questions_of(scene, rng, QUESTION_FAMILIES[:4], rng.randint(2, 3))
        return turns_record([(f, short(q), a) for f, q, a, _ in asked])
    asked = questions_of(scene, rng, QUESTION_FAMILIES, rng.randint(1, 2))  # coco: a description and sentences
    turns = [("description", DESCRIBE, toygrammar.description(scene))]
    turns += [(f, q, toygrammar.sentence_answer(f, slots, a)) for f, q, a, slots in asked]
    rng.shuffle(turns)  # as LLaVA-Instruct's conversations, any turn may come first
    return turns_record(turns)


def val_record(kind, name, scene, rng, index):
    """One labeled validation question of a benchmark (short, sentence, caption, description)."""
    if kind in ("caption", "description"):
        prompt = caption_prompt(scene) if kind == "caption" else DESCRIBE
        reply = toygrammar.caption(scene) if kind == "caption" else toygrammar.description(scene)
        return dict(id=f"val-{kind}-{index:06d}", image=name, **turns_record([(kind, prompt, reply)]))
    turn = index % len(QUESTION_FAMILIES)  # families in turn
    for family in QUESTION_FAMILIES[turn:] + QUESTION_FAMILIES[:turn]:
        qa = make_question(scene, family, rng)
        if qa:
            break
    question, reply, slots = qa
    if kind == "short":
        question = short(question)
    else:
        reply = toygrammar.sentence_answer(family, slots, reply)
    record = dict(id=f"val-{kind}-{index:06d}", image=name, **turns_record([(family, question, reply)]))
    return dict(record, slots=slots)


# ----------------------------------------------------------------------------- POPE
def pope_questions(scene, split, rng, popularity, partner=None):
    """POPE (Li et al. 2023): 3 questions about present objects, 3 about absent ones.

    Objects are (colour, shape) pairs. Negatives: random (any absent pair), popular (the most frequent
    pairs of the SFT data), adversarial (pairs that share a colour or a shape with a present object, the
    toy world's analogue of frequently co-occurring objects; on the prior stage, with partner {kind: partner},
    the absent partners of the present objects, POPE's co-occurring objects themselves).
    """
    present = [(o["colour"], o["shape"]) for o in scene["objects"]]
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if split == "random":
        negatives = rng.sample(absent, 3)
    elif split == "popular":
        negatives = sorted(absent, key=lambda pair: -popularity[pair])[:3]
    elif split == "adversarial" and partner:  # the prior stage's: the absent partners of present objects first
        negatives = sorted({partner[q] for q in present} - set(present))[:3]
        negatives += rng.sample([p for p in absent if p not in negatives], 3 - len(negatives))
    elif split == "adversarial":
        near = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)]
        negatives = rng.sample(near, min(3, len(near)))
        negatives += rng.sample([p for p in absent if p not in negatives], 3 - len(negatives))
    else:
        raise ValueError(split)
    positives = [rng.choice(present) for _ in range(3)]
    return [(f"Is there a {c} {s} in the image?", "yes") for c, s in positives] + \
           [(f"Is there a {c} {s} in the image?", "no") for c, s in negatives]


def pope_files(out, seed, scenes, pope_images, sft_images, partner=None):
    """toy/pope/{split}.jsonl; popularity counted over the SFT images; partner: the prior stage's pairing."""
    popularity = {(c, s): 0 for c in COLOURS for s in SHAPES}
    for name in sft_images:
        for o in scenes[name]["objects"]:
            popularity[(o["colour"], o["shape"])] += 1
    for split in ["random", "popular", "adversarial"]:
        rows = []
        for name in pope_images:
            rng = random.Random(f"{seed}/pope/{split}/{name}")
            for text, label in pope_questions(scenes[name], split, rng, popularity, partner):
                rows.append({"question_id": len(rows), "image": name, "text": text, "label": label})
        write_json(rows, os.path.join(out, "pope", f"{split}.jsonl"), jsonl=True)


# ----------------------------------------------------------------------------- files
def scene_rng(seed, split, index):
    return random.Random(f"{seed}/{split}/{index}")  # string seeds hash with sha512: stable across runs


def write_json(obj, path, jsonl=False):
    """A json file (or a jsonl file of rows) written atomically: readers never see half a file."""
    common.write_atomic(path, [json.dumps(row) for row in obj] if jsonl else [json.dumps(obj, indent=1)])


def draw(out, scenes, name, rng, word=None, distinct=0, make=toyscenes.make_scene):
    """A new scene for image `name` (with at least `distinct` different objects), rendered and recorded.
    make(rng, word): the stage's scene maker (the prior stage's draws pairs of partners)."""
    scene = make(rng, word)
    while len({(o["colour"], o["shape"]) for o in scene["objects"]}) < distinct:
        scene = make(rng, word)
    os.makedirs(os.path.dirname(os.path.join(out, "images", name)), exist_ok=True)
    toyscenes.render(scene).save(os.path.join(out, "images", name))
    scenes[name] = scene
    return scene


def build_open(out, seed, sizes, pairs=None):
    """The open stage's images and files; sizes: sft (images), shares (per subset), pool and unseen (records
    per subset), val (per benchmark), pope (images), prior (the prior stage's held-out images per kind of answer
    and of image), prior_pool (its pool drawn as those images are), pair_share, faint_share, faint and faint_counted
    (the prior stage's scenes). pairs: the prior stage's partner pairs
    (toyworld/priors.py), None for the open stage: its SFT, pool, unseen and val images are drawn as its training
    scenes. Returns a summary."""
    make = toyscenes.make_scene if pairs is None else (
        lambda rng, word: priors.make_prior_scene(rng, pairs, "train", word, sizes["pair_share"],
                                                sizes["faint_share"], sizes["faint"], sizes["faint_counted"]))
    scenes, sft, unseen = {}, [], []
    order = list(range(sizes["sft"]))
    random.Random(f"{seed}/subsets").shuffle(order)
    bounds, total = [], 0
    for share in sizes["shares"]:
        total += share
        bounds.append(round(total * sizes["sft"]))
    for rank, index in enumerate(tqdm(order, desc="images/sft", leave=False)):
        subset = SUBSETS[next(k for k, bound in enumerate(bounds) if rank < bound)]
        rng = scene_rng(seed, "sft", index)
        name = f"{subset}/{index:06d}.png"
        scene = draw(out, scenes, name, rng, word=subset in ("textvqa", "ocr_vqa") or None, make=make)
        sft.append(dict(id=f"{subset}-{index:06d}", image=name, **subset_record(subset, scene, rng)))
    sft.sort(key=lambda r: r["id"])
    for subset in SUBSETS:  # images the model never saw, in the same subset folders
        for index in range(sizes["unseen"]):
            rng = scene_rng(seed, f"unseen/{subset}", index)
            name = f"{subset}/unseen-{index:06d}.png"
            scene = draw(out, scenes, name, rng, word=subset in ("textvqa", "ocr_vqa") or None, make=make)
            unseen.append(dict(id=f"{subset}-unseen-{index:06d}", image=name, **subset_record(subset, scene, rng)))
    pool_rng = random.Random(f"{seed}/pool")
    pool = []  # paper 4.1: the pool is drawn from the SFT data, its answers never used to make pairs
    for subset in SUBSETS:
        records = [r for r in sft if r["image"].startswith(subset + "/")]
        pool += pool_rng.sample(records, min(sizes["pool"], len(records)))
    val = val_splits(out, seed, sizes["val"], scenes, make)
    pope = [f"pope/{index:06d}.png" for index in range(sizes["pope"])]
    for index, name in enumerate(pope):  # POPE images hold 3 distinct objects, so 3 positives exist
        if pairs is None:
            draw(out, scenes, name, scene_rng(seed, "pope", index), distinct=3)
        else:  # the prior stage's: 2 lone objects, their partners absent (its adversarial negatives); the 3
            # positives then ask about one of the two twice
            draw(out, scenes, name, scene_rng(seed, "pope", index), distinct=2,
                 make=lambda rng, word: priors.make_prior_scene(rng, pairs, "broken", word))
    os.makedirs(os.path.join(out, "pope"), exist_ok=True)
    pope_files(out, seed, scenes, pope, [r["image"] for r in sft], None if pairs is None else priors.partner_of(pairs))
    if pairs is not None:
        write_json(prior_val(out, seed, sizes["prior"], scenes, pairs), os.path.join(out, "val-prior.json"))
        write_json([list(map(list, p)) for p in pairs], os.path.join(out, "partners.json"))
        write_json(prior_pool(out, seed, sizes["prior_pool"], scenes, pairs), os.path.join(out, "pool-prior.json"))
    # LLaVA's stage 1 (feature alignment) data, LCS-558K's analogue: a caption of every SFT image; the plain
    # template drops the prompt, as the authors' stage 1 does.
    pretrain = [dict(id=f"pretrain-{r['id']}", image=r["image"], conversations=[
        {"from": "human", "value": f"{BRIEF}\n<image>"},
        {"from": "gpt", "value": toygrammar.caption(scenes[r["image"]])}]) for r in sft]
    write_json(pretrain, os.path.join(out, "pretrain.json"))
    write_json(sft, os.path.join(out, "sft.json"))
    write_json(sorted(pool, key=lambda r: r["id"]), os.path.join(out, "pool.json"))
    write_json(unseen, os.path.join(out, "pool-unseen.json"))
    write_val(out, val)
    write_json(scenes, os.path.join(out, "scenes.json"))  # written last: marks the data as done
    return {"images": len(scenes), "sft records": len(sft), "pool records": len(pool),
            "val": {kind: len(records) for kind, records in val.items()}}


def val_splits(out, seed, sizes, scenes, make=toyscenes.make_scene):
    """The open stage's held-out questions, {kind: records}, their images drawn into OUT/images/val/."""
    val = {kind: [] for kind in ("short", "sentence", "caption", "description")}
    for kind, records in val.items():
        for index in range(sizes[kind]):
            rng = scene_rng(seed, f"val/{kind}", index)
            name = f"val/{index:06d}.png" if kind == "short" else f"val/{kind}-{index:06d}.png"
            scene = draw(out, scenes, name, rng, word=True if kind == "caption" else None, make=make)
            records.append(val_record(kind, name, scene, rng, index))
    return val


def prior_val(out, seed, size, scenes, pairs):
    """The prior stage's held-out captions and descriptions: `size` of each on images that break the prior
    (objects without their partners) and on images that keep it (a pair), each record marked with "prior"."""
    records = []
    for prior in ("broken", "kept"):
        for kind in ("caption", "description"):
            for index in range(size):
                rng = scene_rng(seed, f"prior/{prior}/{kind}", index)
                name = f"val/prior-{prior}-{kind}-{index:06d}.png"
                scene = draw(out, scenes, name, rng, word=True if kind == "caption" else None,
                             make=lambda rng, word: priors.make_prior_scene(rng, pairs, prior, word))
                record = val_record(kind, name, scene, rng, index)
                records.append(dict(record, id=f"prior-{prior}-{record['id']}", prior=prior))
    return records


def prior_pool(out, seed, size, scenes, pairs):
    """A SeVa pool drawn as the prior stage's held-out images are (study/protocol.md, its fourteenth section of
    2026-12-03): `size` textvqa caption records, half on images that break the prior and half on images that keep
    it, none faint, their images under OUT/images/textvqa/ (so seva.py's --subsets textvqa takes them)."""
    records = []
    for prior in ("broken", "kept"):
        for index in range(size // 2):
            rng = scene_rng(seed, f"prior-pool/{prior}", index)
            name = f"textvqa/prior-pool-{prior}-{index:06d}.png"
            scene = draw(out, scenes, name, rng, word=True,
                         make=lambda rng, word: priors.make_prior_scene(rng, pairs, prior, word))
            records.append(dict(id=f"textvqa-prior-pool-{prior}-{index:06d}", image=name,
                                **subset_record("textvqa", scene, rng)))
    return records


def write_val(out, val):
    write_json(val["short"], os.path.join(out, "val.json"))  # eval/toyvqa.py's
    for kind in ("sentence", "caption", "description"):
        write_json(val[kind], os.path.join(out, f"val-{kind}s.json"))


def build_validation(out, seed, sizes):
    """Only the held-out splits (no SFT data, no POPE), e.g. a confirmation split made with another seed, in a
    folder of their own that eval/ reads as a world: val*.json, images/val/, scenes.json."""
    scenes = {}
    val = val_splits(out, seed, sizes, scenes)
    write_val(out, val)
    write_json(scenes, os.path.join(out, "scenes.json"))  # written last: marks the split as done
    return {kind: len(records) for kind, records in val.items()}


# ----------------------------------------------------------------------------- the closed stage (the first toy world)
def build_closed(out, seed, sizes):
    """The first toy world's images and files, as they were: one-word answers, multi-turn SFT records."""
    scenes, splits = {}, {}
    for split in ["sft", "unseen", "val", "pope"]:
        splits[split] = []
        for index in tqdm(range(sizes[split]), desc=f"images/{split}", leave=False):
            rng = scene_rng(seed, split, index)
            name = f"{split}/{index:06d}.png"
            draw(out, scenes, name, rng, distinct=3 if split == "pope" else 0)
            splits[split].append((name, rng))

    def records(split, max_turns, prefix):
        return [dict(id=f"{prefix}-{i:06d}", image=name, **turns_record(
            [(f, q, a) for f, q, a, _ in questions_of(scenes[name], rng, QUESTION_FAMILIES, max_turns)]))
            for i, (name, rng) in enumerate(splits[split])]

    sft = records("sft", 3, "sft")
    pool = sorted(random.Random(f"{seed}/pool").sample(sft, sizes["pool"]), key=lambda r: r["id"])
    unseen = records("unseen", 2, "unseen")
    val = []
    for i, (name, rng) in enumerate(splits["val"]):  # one question each
        record = val_record("short", name, scenes[name], rng, i)
        record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("\n" + vlm.SINGLE_WORD, "")
        val.append(dict(id=f"val-{i:06d}", image=name, families=record["families"],
                        conversations=record["conversations"]))
    os.makedirs(os.path.join(out, "pope"), exist_ok=True)
    pope_files(out, seed, scenes, [name for name, _ in splits["pope"]], [name for name, _ in splits["sft"]])
    write_json(sft, os.path.join(out, "sft.json"))
    write_json(pool, os.path.join(out, "pool.json"))
    write_json(unseen, os.path.join(out, "pool-unseen.json"))
    write_json(val, os.path.join(out, "val.json"))
    write_json(scenes, os.path.join(out, "scenes.json"))  # written last: marks the data as done
    return {"images": len(scenes), "sft records": len(sft), "pool records": len(pool), "val questions": len(val)}
