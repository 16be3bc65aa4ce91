"""The prior stage's why (study/priors_why.py) on hand-worked cases, and its pool drawn as the held-out images
(toyworld/datafiles.py prior_pool)."""
import filecmp
import json
import os
import statistics

import pytest

import pool
from study import priors_why
from toyworld import datafiles as toydata
from toyworld import priors as toypriors
from test_priors import PAIRS, PARTNER, scene_of


def said(*kinds):
    return " ".join(f"A small {c} {s}." for c, s in kinds)


def test_partner_trials_hits_and_false_alarms_by_hand():
    (a, b), (c, d) = PAIRS[0], PAIRS[1]
    kept, broken = scene_of(a, b), scene_of(a, c)
    texts = [said(a, b), said(a), said(b), said(a, b, d), said(a)]
    scenes = [kept, kept, kept, broken, broken]
    trials = priors_why.partner_trials(texts, scenes, PARTNER)
    # kept: (a and b named: two hits), (a named, b not: a miss), (b named, a not: a miss);
    # broken: a named with its partner b absent and named (a false alarm); b and d are not in the scene, so
    # they give no trial; a named alone (a correct rejection); c never named, no trial
    assert sorted(trials) == sorted([(True, True), (True, True), (True, False), (True, False), (False, True),
                                     (False, False)])


def test_detection_by_the_formula():
    trials = [(True, True)] * 8 + [(True, False)] * 2 + [(False, True)] * 2 + [(False, False)] * 8
    found = priors_why.detection(trials)
    z = statistics.NormalDist().inv_cdf
    assert found["hit"] == pytest.approx(0.8) and found["false_alarm"] == pytest.approx(0.2)
    assert found["d"] == pytest.approx(2 * z(0.8)) and found["c"] == pytest.approx(0.0, abs=1e-12)
    # all hits and no false alarm: the shares are clipped to 1 - 1/2n and 1/2n, so d' stays finite
    perfect = priors_why.detection([(True, True)] * 4 + [(False, False)] * 5)
    assert perfect["hit"] == pytest.approx(1 - 1 / 8) and perfect["false_alarm"] == pytest.approx(1 / 10)
    assert perfect["d"] == pytest.approx(z(7 / 8) - z(1 / 10))


def test_the_prior_pool_is_drawn_as_the_held_out_images(tmp_path):
    scenes = {}
    records = toydata.prior_pool(str(tmp_path), 0, 20, scenes, PAIRS)
    assert len(records) == 20 and len({r["id"] for r in records}) == 20
    assert all(r["image"].startswith("textvqa/") and (tmp_path / "images" / r["image"]).exists() for r in records)
    assert pool.subset_of(records[0], ["textvqa", "ocr_vqa"]) == "textvqa"  # seva.py's --subsets takes them
    kinds = [toypriors.prior_kind(scenes[r["image"]], PARTNER) for r in records]
    assert kinds == ["broken"] * 10 + ["kept"] * 10
    assert not any("faint" in o for s in scenes.values() for o in s["objects"])
    assert all(scenes[r["image"]]["word"] for r in records)  # the caption question's OCR token
    again = toydata.prior_pool(str(tmp_path / "again"), 0, 20, {}, PAIRS)
    assert again == records  # the same seed draws the same pool


def test_the_prior_pool_changes_nothing_else_the_stage_writes(tmp_path):
    sizes = dict(sft=12, shares=(0.25, 0.25, 0.25, 0.25), pool=2, unseen=1, pope=2, prior=3, prior_pool=0,
                 val=dict(short=5, sentence=3, caption=2, description=2), pair_share=0.7, faint_share=0.5, faint=0.1,
                 faint_counted=True)
    toydata.build_open(str(tmp_path / "without"), 7, sizes, PAIRS)
    toydata.build_open(str(tmp_path / "with"), 7, dict(sizes, prior_pool=8), PAIRS)
    compared = 0
    for root, _, files in os.walk(tmp_path / "without"):
        for f in files:
            a = os.path.join(root, f)
            if f not in ("scenes.json", "pool-prior.json"):
                assert filecmp.cmp(a, a.replace("without", "with"), shallow=False), a
                compared += 1
    assert compared > 30
    without, with_pool = (json.load(open(tmp_path / name / "scenes.json")) for name in ("without", "with"))
    added = {name: scene for name, scene in with_pool.items() if name not in without}
    assert {name: with_pool[name] for name in without} == without and len(added) == 8
    pool_scenes = [json.dumps(scene, sort_keys=True) for scene in added.values()]
    held_out = {json.dumps(without[r["image"]], sort_keys=True)
                for r in json.load(open(tmp_path / "without" / "val-prior.json"))}
    assert not held_out & set(pool_scenes)  # drawn as the held-out images are, never one of them
    assert [r["image"] for r in json.load(open(tmp_path / "with" / "pool-prior.json"))] == list(added)


def test_detection_needs_trials_on_both_sides():
    with pytest.raises(ValueError, match="present"):
        priors_why.detection([(False, True), (False, False)])
    with pytest.raises(ValueError, match="absent"):
        priors_why.detection([(True, True)])


def test_a_pair_set_s_content():
    (a, b), (c, _) = PAIRS[0], PAIRS[1]
    scenes = {"x.png": scene_of(a, c), "y.png": dict(scene_of(a, b), objects=[
        dict(o, faint=0.1) if i == 1 else o for i, o in enumerate(scene_of(a, b)["objects"])])}
    pairs = [dict(image="x.png", chosen=said(a, c), rejected=said(a, b, c), answer=said(a, c)),
             dict(image="y.png", chosen=said(a, b), rejected=said(a), answer=said(a, b))]
    assert priors_why.pair_content(scenes, pairs, PARTNER) == dict(pairs=2, chosen=0, rejected=1)
    assert priors_why.pool_content(scenes, pairs, PARTNER) == dict(instances=2, faint=1, named=1)
