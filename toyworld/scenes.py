"""
The toy world's scenes: random scene graphs (1-3 coloured shapes that never overlap, maybe a short word), drawn
as 64 x 64 images, and what a pretrained vision tower would know about them (stage 0's targets).
"""
import math

import torch
from PIL import Image, ImageDraw, ImageFont

from toyworld.grammar import COLOURS, SHAPES, SIZES, WORDS

IMAGE_SIZE = 64


def make_scene(rng, word=None):
    """A random scene graph: background, 1-3 objects that do not overlap, maybe a word (word: None, a coin
    decides; True, always one, as on the images of LLaVA-665k's text subsets)."""
    grey = rng.randint(175, 245)  # pale, low-saturation backgrounds that never look like an object colour
    scene = {"background": [grey + rng.randint(-10, 10) for _ in range(3)], "objects": [], "word": None}
    if rng.random() < 0.5 or word:
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
        if label_map and "faint" in obj:
            continue  # the prior stage's faint partners: background to stage 0's probes (toyworld/priors.py)
        if label_map:
            fill = k + 1
        elif "faint" in obj:  # that share of its colour's contrast with the background
            fill = tuple(round(obj["faint"] * c + (1 - obj["faint"]) * b)
                         for c, b in zip(COLOURS[obj["colour"]], scene["background"]))
        else:
            fill = COLOURS[obj["colour"]]
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


# ----------------------------------------------------------------------------- what stage 0 learns from them
def patch_targets(scene, patch_size):
    """What a pretrained CLIP would know about each patch: the colour, shape, object (colour x shape) and
    word it mostly shows (class 0: none), read off the scene's label map; and the scene's object count. The prior
    stage's faint partners are background in all of them, but for the count where the stage counts them
    (toyworld/priors.py, FAINT_COUNTED)."""
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
    count = sum("faint" not in o or o.get("counted", False) for o in scene["objects"])
    return colour, shape, pair, word, count - 1


def present_pairs(scene):
    """The (colour, shape) pairs a scene holds, as a multi-hot vector over the 24 pairs."""
    present = torch.zeros(len(COLOURS) * len(SHAPES))
    for obj in (o for o in scene["objects"] if "faint" not in o):
        present[list(COLOURS).index(obj["colour"]) * len(SHAPES) + SHAPES.index(obj["shape"])] = 1
    return present


def vision_targets(scenes, names, patch_size, present=False):
    """stage 0 (toymodel.pretrain_vision): the probes' targets of the named scenes, stacked, and their classes.
    present: also the image-level set of (colour, shape) pairs, which the question "is there a red circle?"
    asks about (a multi-label head on the pooled patches, as the count's)."""
    colour, shape, pair, word, count = zip(*(patch_targets(scenes[name], patch_size) for name in names))
    targets = dict(colour=torch.stack(colour), shape=torch.stack(shape), pair=torch.stack(pair),
                   word=torch.stack(word), count=torch.tensor(count))
    classes = dict(colour=1 + len(COLOURS), shape=1 + len(SHAPES), pair=1 + len(COLOURS) * len(SHAPES),
                   word=1 + len(WORDS), count=3)
    if present:
        targets["present"] = torch.stack([present_pairs(scenes[name]) for name in names])
        classes["present"] = len(COLOURS) * len(SHAPES)
    return targets, classes
