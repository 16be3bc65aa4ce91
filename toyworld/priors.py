"""
The prior stage's scenes: the open stage with language priors (python -m toyworld --stage prior).

The open stage draws every object independently, so a model has no prior that a noisy view could expose. Here
each object kind (a colour and a shape) has one partner kind, and the two come as a pair: the anchor on the left,
its partner just right of it on the same row, so every caption (left to right) and description (reading order)
names the partner right after its anchor. In the training scenes (and every image drawn like them: the pool, the
unseen pool, the stage's val files) each unit is drawn a pair with probability PAIR_SHARE, else its anchor or partner
alone; a model learns that "a red circle" is followed by "a blue square".
The held-out images break the prior (objects without their partners) or keep it (a pair present), so the share
of answers that name an absent partner measures the prior-driven hallucination that LURE and VCD describe.

    partners    12 (anchor, partner) pairs of kinds, a fixed pairing of the 24 kinds (toy/partners.json)
    faint       (FAINT_SHARE) a train-mode pair's partner drawn at FAINT of its colour's contrast and labelled
                background in the vision tower's pretraining targets (colour, shape, object, presence; the
                object count too unless FAINT_COUNTED), named by its caption all the same: the weak evidence on
                which a prior decides (LURE's uncertainty), and which noise erases
    train       1 or 2 units, each drawn a pair (PAIR_SHARE) or a lone kind whose partner is absent; a second
                pair is dropped (at most 3 objects)
    broken      1 or 2 lone kinds, none with its partner
    kept        one pair (every object with its partner)
"""
import random

from toyworld.grammar import COLOURS, SHAPES, SIZES, WORDS
from toyworld.scenes import IMAGE_SIZE

PAIR_SHARE = 0.7  # the probability that a training scene's unit is drawn a pair (python -m toyworld's default)
# the fifth build's, the first to meet every band (study/protocol.md, its eleventh and twelfth sections of 2026-12-03)
FAINT_SHARE, FAINT = 0.5, 0.1  # the probability that a training pair's partner is faint, and its contrast
FAINT_COUNTED = True  # whether stage 0's object count counts the faint partners (its other targets never see them)
GAP = (2, 5)  # pixels between an anchor's box and its partner's


def partner_pairs(seed):
    """The 12 (anchor, partner) pairs of kinds ((colour, shape) tuples), a fixed pairing drawn by seed in which
    the two kinds of a pair differ in colour and in shape (so a partner is never half named by its anchor)."""
    rng = random.Random(f"{seed}/partners")
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    while True:
        rng.shuffle(kinds)
        pairs = [(kinds[2 * i], kinds[2 * i + 1]) for i in range(len(kinds) // 2)]
        if all(a[0] != b[0] and a[1] != b[1] for a, b in pairs):
            return pairs


def partner_of(pairs):
    """{kind: its partner} both ways."""
    found = {}
    for a, b in pairs:
        found[a], found[b] = b, a
    return found


def _free(box, boxes):
    return all(box[2] < b[0] - 1 or box[0] > b[2] + 1 or box[3] < b[1] - 1 or box[1] > b[3] + 1 for b in boxes)


def _object(kind, size, cx, cy):
    return {"shape": kind[1], "colour": kind[0], "size": size, "center": [cx, cy]}


def _place(rng, kinds, boxes, top):
    """Objects of the given kinds side by side on one row (a pair: anchor then partner), at a random free place,
    or None after 50 tries."""
    for _try in range(50):
        sizes = [rng.choice(list(SIZES)) for _ in kinds]
        radii = [SIZES[s] for s in sizes]
        gaps = [rng.randint(*GAP) for _ in kinds[1:]]
        width = 2 * sum(radii) + sum(gaps)
        if width > IMAGE_SIZE - 3:
            continue
        left = rng.randint(1, IMAGE_SIZE - 2 - width)
        r_max = max(radii)
        cy = rng.randint(r_max + 1, IMAGE_SIZE - 20 + top - r_max)
        placed, x = [], left
        for k, (kind, size, r) in enumerate(zip(kinds, sizes, radii)):
            cx = x + r
            placed.append((_object(kind, size, cx, cy), (cx - r, cy - r, cx + r, cy + r)))
            x = cx + r + (gaps[k] if k < len(gaps) else 0)
        if all(_free(box, boxes) for _, box in placed):
            return placed
    return None


def make_prior_scene(rng, pairs, mode="train", word=None, pair_share=PAIR_SHARE, faint_share=FAINT_SHARE,
                     faint=FAINT, counted=FAINT_COUNTED):
    """A scene graph as toyworld.scenes.make_scene's, with the prior: mode train, broken or kept (above);
    pair_share: the probability that a training scene's unit is a pair; faint_share: the probability that a
    training pair's partner is drawn faint (faint of its colour's contrast with the background, and unseen by
    stage 0's probes but for the object count when counted), though every caption names it: a partner the model
    learns to name on weak evidence."""
    grey = rng.randint(175, 245)
    scene = {"background": [grey + rng.randint(-10, 10) for _ in range(3)], "objects": [], "word": None}
    if rng.random() < 0.5 or word:
        scene["word"] = rng.choice(WORDS)
    top = 12 if scene["word"] is None else 0
    partner = partner_of(pairs)
    if mode == "train":
        units = ["pair" if rng.random() < pair_share else "lone" for _ in range(rng.randint(1, 2))]
    elif mode == "broken":
        units = ["lone"] * rng.randint(1, 2)
    elif mode == "kept":
        units = ["pair"]
    else:
        raise ValueError(f"unknown scene mode {mode!r}")
    boxes = []
    for unit in units:
        used = {(o["colour"], o["shape"]) for o in scene["objects"]}
        if unit == "pair":
            if len(scene["objects"]) > 1:
                continue  # at most 3 objects
            choices = [p for p in pairs if p[0] not in used and p[1] not in used]
            kinds = list(rng.choice(choices))
        else:  # a lone kind: neither it nor its partner in the scene
            choices = [k for k in partner if k not in used and partner[k] not in used]
            kinds = [rng.choice(choices)]
        placed = _place(rng, kinds, boxes, top)
        if placed is None:
            continue
        if mode == "train" and unit == "pair" and rng.random() < faint_share:
            placed[1][0]["faint"] = faint
            if counted:
                placed[1][0]["counted"] = True  # stage 0's object count sees it (toyworld/scenes.py)
        for obj, box in placed:
            scene["objects"].append(obj)
            boxes.append(box)
    if not scene["objects"]:  # no unit found room: draw again from this rng
        return make_prior_scene(rng, pairs, mode, word, pair_share, faint_share, faint, counted)
    return scene


def absent_partners(scene, partner):
    """The kinds that partner an object of the scene and are not in it."""
    present = {(o["colour"], o["shape"]) for o in scene["objects"]}
    return {partner[k] for k in present} - present


def prior_kind(scene, partner):
    """broken when some object's partner is absent, else kept."""
    return "broken" if absent_partners(scene, partner) else "kept"
