"""
The toy world: synthetic scenes, questions about them, and a tiny LLaVA trained on them.

No model or data set can be downloaded here, so SeVa runs end to end on a world we make ourselves:
  toy/images/                      PNG scenes: 1-3 coloured shapes, sometimes a short written word
  toy/scenes.json                  the scene graph of every image, so every answer can be checked
  toy/sft.json                     the SFT split, LLaVA-665k conversation format (multi-turn)
  toy/pool.json                    the pool SeVa samples from: SFT images and questions, as in the paper
  toy/pool-unseen.json             the same from images the model never saw (an ablation)
  toy/val.json                     held-out, labeled questions (same format)
  toy/pope/{random,popular,adversarial}.jsonl   POPE-style yes/no probes
  toy/model-sft/                   a tiny LLaVA (HF folder) that plays LLaVA-1.5: the model SeVa starts from

`python toyworld.py` builds all of it in a few minutes on 2 CPU cores; finished parts are skipped
(`--force` redoes them). Everything is deterministic given --seed.
"""
import argparse
import json
import math
import os
import random
import shutil
import time

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import common
import vlm
from toygrammar import COLOURS, SHAPES, SIZES, WORDS  # the world's vocabulary is its language's

# ----------------------------------------------------------------------------- the questions
QUESTION_FAMILIES = ["colour", "shape", "count", "exist", "word"]
IMAGE_SIZE = 64

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


# ----------------------------------------------------------------------------- scenes
def make_scene(rng):
    """A random scene graph: background, 1-3 objects that do not overlap, maybe a word."""
    grey = rng.randint(175, 245)  # pale, low-saturation backgrounds that never look like an object colour
    scene = {"background": [grey + rng.randint(-10, 10) for _ in range(3)], "objects": [], "word": None}
    if rng.random() < 0.5:
        scene["word"] = rng.choice(WORDS)
    top = 12 if scene["word"] is None else 0  # the word lives in the bottom band
    boxes = []
    for _ in range(rng.randint(1, 3)):
        for _try in range(50):  # rejection sampling: objects never overlap, so none is occluded
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            cx, cy = rng.randint(r + 1, IMAGE_SIZE - r - 2), rng.randint(r + 1, IMAGE_SIZE - 20 + top - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(box[2] < b[0] - 1 or box[0] > b[2] + 1 or box[3] < b[1] - 1 or box[1] > b[3] + 1
                   for b in boxes):
                boxes.append(box)
                scene["objects"].append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                                         "size": size, "center": [cx, cy]})
                break
    return scene


def render(scene, label_map=False):
    """Draw a scene graph as a PIL image. With label_map, draw instead an 8-bit map in which object k
    has value k + 1 and the word's box value 255 (stage 0 learns from it)."""
    mode, background = ("L", 0) if label_map else ("RGB", tuple(scene["background"]))
    image = Image.new(mode, (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for k, obj in enumerate(scene["objects"]):
        (cx, cy), r = obj["center"], SIZES[obj["size"]]
        fill = k + 1 if label_map else COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:  # a five-pointed star: outer and inner corners alternate
            corners = [(cx + (r if j % 2 == 0 else 0.45 * r) * math.sin(j * math.pi / 5),
                        cy - (r if j % 2 == 0 else 0.45 * r) * math.cos(j * math.pi / 5)) for j in range(10)]
            draw.polygon(corners, fill=fill)
    if scene["word"]:
        font = ImageFont.load_default(size=15)
        position = (IMAGE_SIZE // 2, IMAGE_SIZE - 9)
        if label_map:
            draw.rectangle(draw.textbbox(position, scene["word"], font=font, anchor="mm"), fill=255)
        else:
            draw.text(position, scene["word"], fill=(20, 20, 20), font=font, anchor="mm")
    return image


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
    """(question, answer) of a family about a scene, or None where the family has nothing to ask."""
    slots = exist_slots(scene, rng) if family == "exist" else None
    if slots is None:
        options = askable(scene, family)
        if not options:
            return None
        slots = rng.choice(options)
    question = rng.choice(PHRASINGS[family]).format(**slots)
    return question, answer(scene, family, slots)


def conversation(scene, rng, max_turns):
    """A LLaVA-665k style record body: up to max_turns questions of different families."""
    families = rng.sample(QUESTION_FAMILIES, len(QUESTION_FAMILIES))
    turns = []
    for family in families:
        qa = make_question(scene, family, rng)
        if qa is not None:
            turns.append((family, *qa))
        if len(turns) == max_turns:
            break
    conversations = []
    for i, (_, question, ans) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": ans})
    return {"conversations": conversations, "families": [f for f, _, _ in turns]}


def pope_questions(scene, split, rng, popularity):
    """POPE (Li et al. 2023): 3 questions about present objects, 3 about absent ones.

    Objects are (colour, shape) pairs. Negatives: random (any absent pair), popular (the most frequent
    pairs of the SFT data), adversarial (pairs that share a colour or a shape with a present object, the
    toy world's analogue of frequently co-occurring objects).
    """
    present = [(o["colour"], o["shape"]) for o in scene["objects"]]
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if split == "random":
        negatives = rng.sample(absent, 3)
    elif split == "popular":
        negatives = sorted(absent, key=lambda pair: -popularity[pair])[:3]
    elif split == "adversarial":
        near = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)]
        negatives = rng.sample(near, min(3, len(near)))
        negatives += rng.sample([p for p in absent if p not in negatives], 3 - len(negatives))
    else:
        raise ValueError(split)
    positives = [rng.choice(present) for _ in range(3)]
    return [(f"Is there a {c} {s} in the image?", "yes") for c, s in positives] + \
           [(f"Is there a {c} {s} in the image?", "no") for c, s in negatives]


# ----------------------------------------------------------------------------- data files
def scene_rng(seed, split, index):
    return random.Random(f"{seed}/{split}/{index}")  # string seeds hash with sha512: stable across runs


def write_json_atomic(obj, path, jsonl=False):
    """A json file (or a jsonl file of rows) written atomically: readers never see half a file."""
    common.write_atomic(path, [json.dumps(row) for row in obj] if jsonl else [json.dumps(obj, indent=1)])


def build_data(out, seed, sizes):
    """Render every split's images and write the json files. Returns a small summary dict."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "pope"), exist_ok=True)
    scenes, splits = {}, {}
    for split in ["sft", "unseen", "val", "pope"]:
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        splits[split] = []
        for index in tqdm(range(sizes[split]), desc=f"images/{split}", leave=False):
            rng = scene_rng(seed, split, index)
            scene = make_scene(rng)
            while split == "pope" and len({(o["colour"], o["shape"]) for o in scene["objects"]}) < 3:
                scene = make_scene(rng)  # POPE images hold 3 distinct objects, so 3 positives exist
            name = f"{split}/{index:06d}.png"
            render(scene).save(os.path.join(out, "images", name))
            scenes[name] = scene
            splits[split].append((name, rng))

    def records(split, max_turns, prefix):
        return [dict(id=f"{prefix}-{i:06d}", image=name, **conversation(scenes[name], rng, max_turns))
                for i, (name, rng) in enumerate(splits[split])]

    sft = records("sft", 3, "sft")
    pool_rng = random.Random(f"{seed}/pool")
    pool = sorted(pool_rng.sample(sft, sizes["pool"]), key=lambda r: r["id"])  # paper: the pool is the SFT data
    unseen = records("unseen", 2, "unseen")
    val = []
    for i, (name, rng) in enumerate(splits["val"]):  # one question each
        turn = i % len(QUESTION_FAMILIES)  # families in turn
        for family in QUESTION_FAMILIES[turn:] + QUESTION_FAMILIES[:turn]:
            qa = make_question(scenes[name], family, rng)
            if qa:
                break
        val.append({"id": f"val-{i:06d}", "image": name, "families": [family],
                    "conversations": [{"from": "human", "value": "<image>\n" + qa[0]},
                                      {"from": "gpt", "value": qa[1]}]})
    popularity = {(c, s): 0 for c in COLOURS for s in SHAPES}
    for name, _ in splits["sft"]:
        for o in scenes[name]["objects"]:
            popularity[(o["colour"], o["shape"])] += 1
    for split in ["random", "popular", "adversarial"]:
        rows = []
        for name, _ in splits["pope"]:
            rng = random.Random(f"{seed}/pope/{split}/{name}")
            for text, label in pope_questions(scenes[name], split, rng, popularity):
                rows.append({"question_id": len(rows), "image": name, "text": text, "label": label})
        write_json_atomic(rows, os.path.join(out, "pope", f"{split}.jsonl"), jsonl=True)
    write_json_atomic(sft, os.path.join(out, "sft.json"))
    write_json_atomic(pool, os.path.join(out, "pool.json"))
    write_json_atomic(unseen, os.path.join(out, "pool-unseen.json"))
    write_json_atomic(val, os.path.join(out, "val.json"))
    write_json_atomic(scenes, os.path.join(out, "scenes.json"))  # written last: marks the data as done
    return {"images": len(scenes), "sft records": len(sft), "pool records": len(pool), "val questions": len(val)}


# ----------------------------------------------------------------------------- stage 0's targets
def patch_targets(scene, patch_size):
    """What a pretrained CLIP would know about each patch: the colour, shape, object (colour x shape) and
    word it mostly shows (class 0: none), read off the scene's label map; and the scene's object count."""
    labels = torch.frombuffer(bytearray(render(scene, label_map=True).tobytes()), dtype=torch.uint8)
    side = IMAGE_SIZE // patch_size
    patches = labels.view(side, patch_size, side, patch_size).permute(0, 2, 1, 3).reshape(side * side, -1)
    values = [v for v in patches.unique().tolist() if v > 0]
    colour, shape, pair, word = (torch.zeros(side * side, dtype=torch.long) for _ in range(4))
    if values:
        coverage = torch.stack([(patches == v).sum(1) for v in values], dim=1)  # (P, labels): pixels of each
        best = coverage.argmax(1)
        for p in range(side * side):
            if coverage[p, best[p]] < patch_size ** 2 // 8:  # under 1/8 of the patch: background
                continue
            value = values[best[p]]
            if value == 255:
                word[p] = 1 + WORDS.index(scene["word"])
            else:
                obj = scene["objects"][value - 1]
                colour[p], shape[p] = 1 + list(COLOURS).index(obj["colour"]), 1 + SHAPES.index(obj["shape"])
                pair[p] = (colour[p] - 1) * len(SHAPES) + shape[p]
    return colour, shape, pair, word, len(scene["objects"]) - 1


def vision_targets(scenes, names, patch_size):
    """stage 0 (toymodel.pretrain_vision): the probes' targets of the named scenes, stacked, and their classes."""
    colour, shape, pair, word, count = zip(*(patch_targets(scenes[name], patch_size) for name in names))
    targets = dict(colour=torch.stack(colour), shape=torch.stack(shape), pair=torch.stack(pair),
                   word=torch.stack(word), count=torch.tensor(count))
    classes = dict(colour=1 + len(COLOURS), shape=1 + len(SHAPES), pair=1 + len(COLOURS) * len(SHAPES),
                   word=1 + len(WORDS), count=3)
    return targets, classes


# ----------------------------------------------------------------------------- the whole build
def build(args):
    """Build every missing part of the toy world (all of it with --force); print the summary."""
    import checkpoint
    import toymodel
    import train_ddp
    from eval import toyvqa
    torch.set_num_threads(args.threads)
    out = args.out
    started = time.time()
    os.makedirs(out, exist_ok=True)
    sizes = dict(sft=args.sft_images, unseen=args.unseen_images, val=args.val_images, pope=args.pope_images,
                 pool=args.pool_size)
    if args.force or not os.path.exists(os.path.join(out, "scenes.json")):
        print("data:", build_data(out, args.seed, sizes))
    scenes = json.load(open(os.path.join(out, "scenes.json")))
    init_dir, sft_dir = os.path.join(out, "model-init"), os.path.join(out, "model-sft")

    if args.force or not os.path.exists(init_dir):
        sft = json.load(open(os.path.join(out, "sft.json")))
        corpus = [vlm.LLAVA_V1_SYSTEM + " USER: ASSISTANT:"] + [c["value"] for r in sft for c in r["conversations"]]
        tokenizer = toymodel.train_tokenizer(corpus, args.vocab_size)
        processor = toymodel.build_processor(tokenizer, args.patch_size, IMAGE_SIZE)
        torch.manual_seed(args.seed)
        model = toymodel.build_model(tokenizer, args.width, args.vision_layers, args.text_layers, args.patch_size,
                                     IMAGE_SIZE)
        names = sorted(n for n in scenes if n.startswith("sft/"))
        pixels = processor.image_processor([Image.open(os.path.join(out, "images", n)) for n in names],
                                           return_tensors="pt")["pixel_values"]
        targets, classes = vision_targets(scenes, names, args.patch_size)
        loss = toymodel.pretrain_vision(model, pixels, targets, classes, args.vision_steps, 64, 2e-3, args.seed)
        print(f"stage 0: vision tower pretrained, probe loss {loss:.3f}")
        checkpoint.save_model_atomic(model, processor, init_dir)

    if args.force or not os.path.exists(sft_dir):
        run_dir = os.path.join(out, "sft-run")
        shutil.rmtree(run_dir, ignore_errors=True)
        train_ddp.train(train_ddp.parse_args([
            "--objective", "sft", "--model", init_dir, "--data", os.path.join(out, "sft.json"),
            "--image-folder", os.path.join(out, "images"), "--out", run_dir, "--batch-size", str(args.sft_batch_size),
            "--epochs", str(args.sft_epochs), "--lr", str(args.sft_lr), "--seed", str(args.seed), "--cache-data"]))
        shutil.rmtree(sft_dir, ignore_errors=True)
        os.replace(os.path.join(run_dir, "model"), sft_dir)

    report_path = os.path.join(out, "report.json")
    if args.force or not os.path.exists(report_path):
        model, processor = vlm.load(sft_dir)
        val = json.load(open(os.path.join(out, "val.json")))
        pool = json.load(open(os.path.join(out, "pool.json")))[:args.noise_check]
        accuracy, _ = toyvqa.vqa_accuracy(model, processor, val, os.path.join(out, "images"))
        changed = toyvqa.noise_change_rate(model, processor, pool, os.path.join(out, "images"), 500, args.seed)
        write_json_atomic({"val_accuracy": accuracy, "noise500_changed": changed}, report_path)
    report = json.load(open(report_path))
    accuracy, changed = report["val_accuracy"], report["noise500_changed"]
    print(f"\ntoy world in {out}/ ({time.time() - started:.0f} s)")
    print("greedy exact match on val.json: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    print(f"  band 55%-90%: {'ok' if 0.55 <= accuracy['overall'] <= 0.90 else 'OUT OF BAND'}")
    print(f"answers changed by diffusion noise at step 500 on pool questions: {changed:.1%}")
    print(f"  band >= 15%: {'ok' if changed >= 0.15 else 'OUT OF BAND'}")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="toy", help="folder to write the toy world to")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--force", action="store_true", help="rebuild every part, even finished ones")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    g = p.add_argument_group("data sizes")
    g.add_argument("--sft-images", type=int, default=6000, help="images (records) of the SFT split")
    g.add_argument("--pool-size", type=int, default=1000, help="SFT records copied into the SeVa pool")
    g.add_argument("--unseen-images", type=int, default=1000, help="images of pool-unseen.json")
    g.add_argument("--val-images", type=int, default=800, help="held-out images, one question each")
    g.add_argument("--pope-images", type=int, default=100, help="POPE images (6 questions each, per split)")
    g = p.add_argument_group("model and training")
    g.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary size")
    g.add_argument("--width", type=int, default=128, help="hidden size of the vision tower and the language model")
    g.add_argument("--vision-layers", type=int, default=3, help="CLIP layers (LLaVA reads layer -2)")
    g.add_argument("--text-layers", type=int, default=2, help="Llama layers")
    g.add_argument("--patch-size", type=int, default=8, help="CLIP patch size: (64/patch)^2 image tokens")
    g.add_argument("--vision-steps", type=int, default=800, help="stage-0 vision pretraining steps")
    g.add_argument("--sft-epochs", type=float, default=6, help="SFT passes over sft.json")
    g.add_argument("--sft-batch-size", type=int, default=64, help="SFT examples per step")
    g.add_argument("--sft-lr", type=float, default=1e-3, help="SFT peak learning rate")
    g.add_argument("--noise-check", type=int, default=500, help="pool questions used to measure the noise band")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.run_main(lambda: build(parse_args()), "toyworld.py")
