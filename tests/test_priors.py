"""The prior stage: scenes with partner pairs (toyworld/priors.py) and the scoring of prior-driven
hallucination (eval/priors.py), against hand-worked examples."""
import json
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


def test_a_faint_partner_is_drawn_faint_named_and_background_to_stage_0_s_patch_targets():
    from toyworld import scenes as toyscenes
    scene = toypriors.make_prior_scene(random.Random(0), PAIRS, "train", pair_share=1.0, faint_share=1.0)
    anchor, partner = scene["objects"][:2]
    assert partner["faint"] == toypriors.FAINT and "faint" not in anchor
    image = toyscenes.render(scene)
    background = scene["background"]
    pixel = image.getpixel(tuple(partner["center"]))
    expected = [round(toypriors.FAINT * c + (1 - toypriors.FAINT) * b)
                for c, b in zip(toygrammar.COLOURS[partner["colour"]], background)]
    assert list(pixel) == expected  # FAINT of the colour's contrast with the background
    labels = toyscenes.render(scene, label_map=True)
    assert labels.getpixel(tuple(partner["center"])) == 0 and labels.getpixel(tuple(anchor["center"])) == 1
    present = toyscenes.present_pairs(scene)
    assert present.sum() == sum("faint" not in o for o in scene["objects"]) == len(scene["objects"]) - 1
    assert f"{partner['colour']} {partner['shape']}" in toygrammar.caption(scene)  # the caption names it
    assert all("faint" not in o for i in range(50)
               for o in toypriors.make_prior_scene(random.Random(i), PAIRS, "kept", faint_share=1.0)["objects"])


def test_stage_0_counts_no_faint_partner_where_the_stage_leaves_them_uncounted():
    from toyworld import scenes as toyscenes
    scene = toypriors.make_prior_scene(random.Random(0), PAIRS, "train", pair_share=1.0, faint_share=1.0,
                                       counted=False)
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


def test_a_counted_faint_partner_is_counted_by_stage_0_alone_at_its_contrast():
    from toyworld import scenes as toyscenes
    scene = toypriors.make_prior_scene(random.Random(0), PAIRS, "train", pair_share=1.0, faint_share=1.0,
                                       faint=0.1, counted=True)
    assert next(o for o in scene["objects"] if "faint" in o)["faint"] == 0.1
    colour, shape, pair, _, count = toyscenes.patch_targets(scene, 16)
    assert count == len(scene["objects"]) - 1  # the count sees it
    assert toyscenes.present_pairs(scene).sum() == len(scene["objects"]) - 1  # presence does not
    uncounted = toypriors.make_prior_scene(random.Random(0), PAIRS, "train", pair_share=1.0, faint_share=1.0,
                                           faint=0.1, counted=False)
    colour2, shape2, pair2, _, _ = toyscenes.patch_targets(uncounted, 16)
    # the same scene drawn either way: the per-patch targets agree (the faint partner is background in both)
    assert [o["center"] for o in uncounted["objects"]] == [o["center"] for o in scene["objects"]]
    assert all((a == b).all() for a, b in ((colour, colour2), (shape, shape2), (pair, pair2)))


def _rows(setting, arm, rates, chosen=(-2.0, -2.0)):
    return [{"arm": arm, "seed": seed, "setting": setting, "logps": {"chosen": list(chosen)},
             "prior": {"broken": {"partner_rate": rate, "cover": 0.5}, "kept": {"cover": 0.9}}}
            for seed, rate in enumerate(rates)]


def _read(runs):
    from study import priors as studypriors
    start = {"broken": {"partner_rate": 0.30, "cover": 0.50}, "kept": {"cover": 0.90}}
    return "\n".join(studypriors.reading(studypriors.groups(runs), start))


def test_the_reading_at_each_setting():
    controls = lambda setting, own: (_rows(setting, "dpo-own", own) + _rows(setting, "dpo-seva", [0.3] * 3)
                                     + _rows(setting, "sft", [0.3] * 3))
    text = _read(controls("main", [0.3] * 3) + controls("guarded", [0.3] * 3))
    assert "main: no control cell succeeds" in text and "guarded: no control cell succeeds" in text
    # a control works at the guarded setting only: C1-prior is read there, by the guarded seva cell
    text = _read(controls("main", [0.3] * 3) + controls("guarded", [0.2] * 3) + _rows("guarded", "seva", [0.25] * 3))
    assert "main: no control" in text and "guarded: a DPO control succeeds (dpo-own)" in text
    assert "C1-prior" in text and ": supported" in text
    text = _read(controls("main", [0.2] * 3) + _rows("main", "seva", [0.31, 0.2, 0.2]))
    assert "main: a DPO control succeeds" in text and "inconclusive" in text and "guarded" not in text  # not run
    assert "refuted" in _read(controls("main", [0.2] * 3) + _rows("main", "seva", [0.31, 0.31, 0.3]))
    assert "open (fewer" in _read(controls("main", [0.2] * 3) + _rows("main", "seva", [0.2]))
    # the noise step and the likelihood, read at the main setting from seed 0
    extra = (_rows("main", "seva", [0.25], (-1.0, -1.5)) + _rows("main", "seva-step200", [0.29])
             + _rows("main", "seva-step800", [0.28]) + _rows("main", "seva-rpo", [0.3], (-1.0, -1.05))
             + _rows("main", "seva-lr1e-4", [0.3], (-1.0, -1.3)))
    text = _read(controls("main", [0.2] * 3) + extra)
    assert "1.0, 5.0 and 2.0 points" in text and "the shape holds" in text
    assert "seva-rpo keeps it up" in text and "seva-lr1e-4" not in text.split("keeps it up")[0].split(":")[-1]
    extra[2]["prior"]["broken"]["partner_rate"] = 0.26  # step 800 falls 4 points: 500 is not 2 ahead
    assert "not the shape" in _read(controls("main", [0.2] * 3) + extra)


def test_the_guarded_setting_trains_as_the_open_stage_s():
    from study import control, priors as studypriors
    argv = studypriors.training_args("m", "i", "f", "d.jsonl", "dpo-own", 0, "guarded")
    value = lambda flag: argv[argv.index(flag) + 1]
    g = control.SETTINGS["guarded"]
    assert (float(value("--lr")), float(value("--beta")), float(value("--rpo-alpha")), float(value("--ld-alpha"))) == (
        g["lr"], g["beta"], g["rpo_alpha"], g["ld_alpha"])
    assert "--ld-alpha" not in studypriors.training_args("m", "i", "f", "d.jsonl", "dpo-own", 0, "main")
    assert studypriors.SETTINGS["guarded"][1]["seva"][0] == 800  # SeVa's pairs at the guarded noise step
    sft = studypriors.training_args("m", "i", "f", "d.json", "sft", 0, "guarded")
    assert float(sft[sft.index("--lr") + 1]) == g["lr"] and "--beta" not in sft


def test_a_searched_setting_needs_its_confirmation_on_seeds_3_to_5():
    def arm(name, rates, first=0):
        return [dict(r, seed=first + i) for i, r in enumerate(_rows("lr2e-4", name, rates))]
    search = arm("dpo-own", [0.2] * 3) + arm("dpo-seva", [0.3] * 3) + arm("sft", [0.3] * 3) + arm("seva", [0.2] * 3)
    assert "dpo-own succeeds in seeds 0-2; on seeds 3-5: pending." in _read(search)
    assert "a DPO control" not in _read(search)
    # one confirming seed so far meets: still pending, not chance
    assert "on seeds 3-5: pending." in _read(search + arm("dpo-own", [0.2], first=3))
    assert "on seeds 3-5: chance (read as chance)" in _read(search + arm("dpo-own", [0.2, 0.29, 0.2], first=3))
    text = _read(search + arm("dpo-own", [0.2] * 3, first=3) + arm("seva", [0.31] * 3, first=3))
    assert "on seeds 3-5: confirmed." in text
    assert "lr2e-4 (exploratory search): a DPO control succeeds (dpo-own" in text
    assert "supported (its cell succeeds); refuted" in text  # seeds 0-2, then the confirmation's
    assert "Noise step" not in text  # read at the registered main setting only
    # two controls: one confirmed, the other not yet run again; each said apart
    both = search[:3] + arm("dpo-seva", [0.2] * 3) + search[6:] + arm("dpo-own", [0.2] * 3, first=3)
    text = _read(both)
    assert "dpo-own succeeds in seeds 0-2; on seeds 3-5: confirmed." in text
    assert "dpo-seva succeeds in seeds 0-2; on seeds 3-5: pending." in text
    assert "a DPO control succeeds (dpo-own)" in text
    # continual SFT found by the search needs its confirmation too
    sft_only = arm("dpo-own", [0.3] * 3) + arm("dpo-seva", [0.3] * 3) + arm("sft", [0.2] * 3)
    assert "only continual SFT" not in _read(sft_only) and "sft succeeds in seeds 0-2" in _read(sft_only)
    assert "only continual SFT" in _read(sft_only + arm("sft", [0.2] * 3, first=3))


def test_the_report_s_groups_keep_the_confirmation_apart():
    from study import priors as studypriors
    rows = _rows("lr2e-4", "dpo-own", [0.2] * 3) + [dict(r, seed=3 + i) for i, r in enumerate(
        _rows("lr2e-4", "dpo-own", [0.25] * 2))] + _rows("main", "dpo-own", [0.3] * 3)
    found = studypriors.groups(rows)
    assert [r["seed"] for r in found["lr2e-4", "dpo-own", False]] == [0, 1, 2]
    assert [r["seed"] for r in found["lr2e-4", "dpo-own", True]] == [3, 4]
    assert [r["seed"] for r in found["main", "dpo-own", False]] == [0, 1, 2] and ("main", "dpo-own", True) not in found
    assert list(found)[0][0] == "main"  # SETTINGS' order, whatever the rows'


def test_a_share_three_points_down_meets_the_test_in_floating_point():
    from study import priors as studypriors
    start = {"broken": {"partner_rate": 0.145, "cover": 0.5}, "kept": {"cover": 0.9}}
    run = {"prior": {"broken": {"partner_rate": 0.115, "cover": 0.48}, "kept": {"cover": 0.88}}}
    assert 0.115 > 0.145 - 0.03  # what the test must not trip on
    assert studypriors.meets(run, start)


def test_pairs_made_from_another_pool_are_refused_before_anything_runs(tmp_path):
    from study import priors as studypriors
    studypriors.check_pool(str(tmp_path), "pool.json")  # nothing made yet: nothing to refuse
    path = studypriors.pairs_path(str(tmp_path), 500) + ".args.json"
    with open(path, "w") as f:
        json.dump({"args": {"data": "toy-prior/pool.json"}}, f)
    studypriors.check_pool(str(tmp_path), "pool.json")
    with pytest.raises(ValueError, match="made from toy-prior/pool.json, not from --pool pool-prior.json"):
        studypriors.check_pool(str(tmp_path), "pool-prior.json")
