"""The prior stage: scenes with partner pairs (toyworld/priors.py) and the scoring of prior-driven
hallucination (eval/priors.py), against hand-worked examples."""
import random

import pytest

from eval import priors as evalpriors
from toyworld import datafiles as toydata
from toyworld import grammar as toygrammar
from toyworld import priors as toypriors

PAIRS = toypriors.partner_pairs(0)
PARTNER = toypriors.partner_of(PAIRS)


def kinds(scene):
    return [(o["colour"], o["shape"]) for o in scene["objects"]]


def test_partner_pairs_cover_every_kind_once_and_differ_in_colour_and_shape():
    flat = [k for pair in PAIRS for k in pair]
    assert len(flat) == 24 and len(set(flat)) == 24
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in PAIRS)
    assert toypriors.partner_pairs(0) == PAIRS and toypriors.partner_pairs(1) != PAIRS


def test_a_pair_is_its_anchor_then_its_partner_on_one_row():
    anchors = dict(PAIRS)
    seen = 0
    for i in range(300):
        scene = toypriors.make_prior_scene(random.Random(i), PAIRS, "train")
        assert 1 <= len(scene["objects"]) <= 3
        for k, obj in enumerate(scene["objects"]):
            kind = (obj["colour"], obj["shape"])
            if kind in anchors and anchors[kind] in kinds(scene):
                partner = scene["objects"][k + 1]  # placed right after its anchor
                assert (partner["colour"], partner["shape"]) == anchors[kind]
                assert partner["center"][1] == obj["center"][1] and partner["center"][0] > obj["center"][0]
                caption = toygrammar.caption(scene).lower()
                assert caption.index(f"{obj['colour']} {obj['shape']}") < caption.index(
                    f"{partner['colour']} {partner['shape']}")
                seen += 1
    assert seen > 150  # most training scenes hold a pair (PAIR_SHARE)


def test_broken_and_kept_images():
    for i in range(200):
        broken = toypriors.make_prior_scene(random.Random(i), PAIRS, "broken")
        kept = toypriors.make_prior_scene(random.Random(i), PAIRS, "kept")
        assert toypriors.absent_partners(broken, PARTNER) == {PARTNER[k] for k in kinds(broken)}
        assert toypriors.prior_kind(broken, PARTNER) == "broken"
        assert len(kept["objects"]) == 2 and toypriors.absent_partners(kept, PARTNER) == set()
    with pytest.raises(ValueError, match="unknown scene mode"):
        toypriors.make_prior_scene(random.Random(0), PAIRS, "other")


def scene_of(*objects):
    return {"objects": [dict(colour=c, shape=s, size="small", center=[10 + 20 * i, 30])
                        for i, (c, s) in enumerate(objects)], "word": None, "background": [200, 200, 200]}


def test_prior_metrics_hand_worked():
    anchor, partner = PAIRS[0]
    other = next(k for k in PARTNER if k not in PAIRS[0])
    scene = scene_of(anchor)  # its partner absent
    texts = [f"A small {anchor[0]} {anchor[1]} and a small {partner[0]} {partner[1]}.",  # the partner named, 2nd
             f"A small {other[0]} {other[1]} and a small {anchor[0]} {anchor[1]}.",  # another false object, 1st
             f"A small {anchor[0]} {anchor[1]}."]  # right
    found = evalpriors.prior_metrics(texts, [scene] * 3, PARTNER)
    assert found["partner_rate"] == pytest.approx(1 / 3)
    assert found["mentions"] == 5
    assert found["chair_i"] == pytest.approx(2 / 5)
    assert found["chair_i_partner"] == pytest.approx(1 / 5) and found["chair_i_other"] == pytest.approx(1 / 5)
    assert found["first_false"] == pytest.approx((2 + 1) / 2) and found["first_false_late"] == pytest.approx(1 / 2)
    assert found["cover"] == pytest.approx(1.0)
    # on a kept image nothing is an absent partner
    kept = evalpriors.prior_metrics([texts[0]], [scene_of(anchor, partner)], PARTNER)
    assert kept["partner_rate"] == 0 and kept["chair_i"] == 0


def test_pope_adversarial_asks_about_absent_partners():
    scene = scene_of(PAIRS[0][0], PAIRS[1][1])
    questions = toydata.pope_questions(scene, "adversarial", random.Random(0), {}, PARTNER)
    negatives = {q for q, label in questions if label == "no"}
    for kind in (PAIRS[0][1], PAIRS[1][0]):
        assert f"Is there a {kind[0]} {kind[1]} in the image?" in negatives
    assert len(questions) == 6 and sum(label == "yes" for _, label in questions) == 3


def test_a_faint_partner_is_drawn_faint_named_and_unseen_by_stage_0():
    from toyworld import scenes as toyscenes
    scene = toypriors.make_prior_scene(random.Random(0), PAIRS, "train", pair_share=1.0, faint_share=1.0)
    anchor, partner = scene["objects"][:2]
    assert partner["faint"] == toypriors.FAINT and "faint" not in anchor
    image = toyscenes.render(scene)
    background = scene["background"]
    pixel = image.getpixel(tuple(partner["center"]))
    expected = [round(toypriors.FAINT * c + (1 - toypriors.FAINT) * b)
                for c, b in zip(toygrammar.COLOURS[partner["colour"]], background)]
    assert list(pixel) == expected  # a fifth of the colour's contrast with the background
    labels = toyscenes.render(scene, label_map=True)
    assert labels.getpixel(tuple(partner["center"])) == 0 and labels.getpixel(tuple(anchor["center"])) == 1
    present = toyscenes.present_pairs(scene)
    assert present.sum() == sum("faint" not in o for o in scene["objects"]) == len(scene["objects"]) - 1
    assert f"{partner['colour']} {partner['shape']}" in toygrammar.caption(scene)  # the caption names it
    assert all("faint" not in o for i in range(50)
               for o in toypriors.make_prior_scene(random.Random(i), PAIRS, "kept", faint_share=1.0)["objects"])


def test_stage_0_counts_no_faint_partner():
    from toyworld import scenes as toyscenes
    scene = toypriors.make_prior_scene(random.Random(0), PAIRS, "train", pair_share=1.0, faint_share=1.0)
    faint = sum(bool(o.get("faint")) for o in scene["objects"])
    assert faint >= 1
    assert toyscenes.patch_targets(scene, 16)[4] == len(scene["objects"]) - faint - 1


def test_the_registered_test_of_one_run_and_of_a_cell():
    from study import priors as studypriors
    start = {"broken": {"partner_rate": 0.20, "cover": 0.50}, "kept": {"cover": 0.90}}

    def run(rate, broken_cover=0.50, kept_cover=0.90):
        return {"prior": {"broken": {"partner_rate": rate, "cover": broken_cover}, "kept": {"cover": kept_cover}}}
    assert studypriors.meets(run(0.17), start)  # down 3 points, Covers kept
    assert not studypriors.meets(run(0.175), start)  # down 2.5 points
    assert not studypriors.meets(run(0.10, broken_cover=0.47), start)  # bought with the broken images' Cover
    assert not studypriors.meets(run(0.10, kept_cover=0.87), start)  # or by dropping present partners
    assert studypriors.meets(run(0.10, 0.481, 0.881), start)
    assert studypriors.cell_state([run(0.1)] * 3, start) == "succeeds"
    assert studypriors.cell_state([run(0.1)] * 2, start).startswith("open")
    assert studypriors.cell_state([run(0.1), run(0.19), run(0.1)], start) == "fails"
    assert "A DPO control succeeds" in studypriors.reading({"dpo-own": "succeeds", "seva": "fails"})
    assert "untested" in studypriors.reading({"dpo-own": "fails", "dpo-seva": "fails", "sft": "fails"})
