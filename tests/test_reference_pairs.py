"""Reference log-probs from generation (seva.py --reference-logps): scored on the original image while the pairs
are made, they equal what train_ddp.py's precompute gives (fp32, within 1e-4 per sequence) for every pair forward
and for K negatives; train_ddp.py --reference pairs trains as --reference precomputed does, with no reference pass
of its own, and refuses pairs without them."""
import json
import os
import shutil

import pytest
import torch

import collate
import common
import data
import dpo
import train_ddp
import seva
import vlm
from generate import generate_tokens, score_answers
from test_seva import argv
from test_train_dpo import adapter, assert_same_adapter, dpo_args


@pytest.fixture(scope="module")
def model(toy_world):
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    model.eval()
    return model, processor


def test_scores_from_the_generation_equal_teacher_forcing_and_the_naive_forward(toy_world, model):
    """One prompt batch (left-padded, different lengths): the chosen answers' log-probs taken from the generation,
    the same answers teacher-forced on the prompts' cache, and dpo.concatenated_forward on training's batch agree."""
    model, processor = model
    records = json.load(open(os.path.join(toy_world, "pool.json")))[:4]
    images = [vlm.load_image(os.path.join(toy_world, "images", r["image"])) for r in records]
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
    questions[1] += " Answer the question in full."  # prompts of different lengths: left padding in the batch
    answers, ids, state = generate_tokens(model, processor, images, questions, max_new_tokens=24, batch_size=4,
                                          keep_state=True)
    others = ["a red circle", "Two"] * 2  # rejected-like answers: teacher-forced
    fast = score_answers(model, processor, state, images, questions, [[a, o] for a, o in zip(answers, others)], ids)
    _, _, state = generate_tokens(model, processor, images, questions, max_new_tokens=24, batch_size=4, keep_state=True)
    forced = score_answers(model, processor, state, images, questions, [[a, o] for a, o in zip(answers, others)])
    template = vlm.resolve_template(model)
    encoded = [collate.encode_pair(processor, image, q, a, o, template)
               for image, q, a, o in zip(images, questions, answers, others)]
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_forward(model, collate.collate_pairs(encoded, processor.tokenizer.pad_token_id))
    naive = [v for pair in zip(chosen.tolist(), rejected.tolist()) for v in pair]
    flat = lambda scores: [v for pair in scores for v in pair]
    assert flat(fast) == pytest.approx(naive, abs=1e-4) and flat(forced) == pytest.approx(naive, abs=1e-4)


@pytest.mark.parametrize("negatives", [1, 2])
def test_pairs_carry_the_reference_that_training_precomputes(toy_world, model, tmp_path, negatives):
    model, processor = model
    out = tmp_path / "pairs.jsonl"
    seva.main(argv(toy_world, out, "--reference-logps", "--num-negatives", str(negatives), samples=24, tokens=24))
    kept = common.read_jsonl(str(out))
    assert kept and all(isinstance(p["reference_rejected_logps"], list) == (negatives > 1) for p in kept)
    if negatives > 1:
        assert any(len(p["rejected"]) == 2 for p in kept)
        assert all(len(p["rejected"]) == len(p["reference_rejected_logps"]) for p in kept)
    mine = [(p["reference_chosen_logps"], p["reference_rejected_logps"]) for p in kept]
    for forward in dpo.PAIR_FORWARDS:
        dataset = data.TrainDataset(data.pairs_reference(kept, str(out), False), "dpo",
                                    os.path.join(toy_world, "images"), processor, "llava_v1", 2048)
        assert "reference_chosen_logps" not in dataset.records[0]  # not asked for: dropped, then precomputed
        path = str(tmp_path / f"reference-{forward}.jsonl")
        data.precompute_reference(model, dataset, path, dpo.PAIR_FORWARDS[forward], 4, 0, 1, torch.device("cpu"), None)
        theirs = [(r["reference_chosen_logps"], r["reference_rejected_logps"]) for r in dataset.records]
        assert len(theirs) == len(mine)  # no pair skipped
        for (c, r), (want_c, want_r) in zip(mine, theirs):
            assert c == pytest.approx(want_c, abs=1e-4), forward
            assert r == pytest.approx(want_r, abs=1e-4), forward


def test_training_on_the_pairs_reference_runs_no_reference_pass(toy_world, tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    seva.main(argv(toy_world, pairs, "--reference-logps", samples=24, tokens=24))
    flags = ("--batch-size", "4", "--max-steps", "2")
    shutil.copy(pairs, tmp_path / "copy.jsonl")
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, str(tmp_path / "copy.jsonl"), tmp_path / "precomputed",
                                                  *flags, "--reference", "precomputed")))
    calls = []
    monkeypatch.setattr(data, "precompute_reference", lambda *a, **k: calls.append("precompute"))
    real = train_ddp.reference_logps
    monkeypatch.setattr(train_ddp, "reference_logps", lambda model, ref, batch, forward: (
        calls.append("forward") if "reference_chosen_logps" not in batch else None, real(model, ref, batch, forward))[1])
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, str(pairs), tmp_path / "pairs", *flags,
                                                  "--reference", "pairs")))
    assert calls == []  # neither a precompute pass nor a reference forward
    assert_same_adapter(adapter(tmp_path / "precomputed"), adapter(tmp_path / "pairs"))
    assert not list(tmp_path.glob("pairs.reference-*.jsonl"))


def test_pairs_without_a_reference_are_refused_by_name(tmp_path):
    records = [dict(id="a", reference_chosen_logps=-1.0, reference_rejected_logps=-2.0), dict(id="b")]
    with pytest.raises(ValueError, match=r"pairs.jsonl: line 2, record b: no reference log-probs"):
        data.pairs_reference(records, str(tmp_path / "pairs.jsonl"), True)
    with pytest.raises(ValueError, match="LD-DPO"):
        data.pairs_reference(records[:1], "p.jsonl", True, ld_alpha=0.5)
    assert data.pairs_reference(records[:1], "p.jsonl", False) == [{"id": "a"}]


def test_prompts_read_a_few_at_a_time_make_the_same_pairs(toy_world, tmp_path):
    """seva.py --prefill-batch-size: each batch's prompts read 2 at a time, then decoded together, make the same
    pairs, with the same reference log-probs (within float rounding), as the whole batch read at once."""
    made = {}
    for rows in (0, 2):
        out = tmp_path / f"pairs-{rows}.jsonl"
        seva.main(argv(toy_world, out, "--reference-logps", "--batch-size", "5", "--prefill-batch-size", str(rows),
                       samples=15, tokens=12))
        made[rows] = common.read_jsonl(str(out))
    assert made[0] and [(p["id"], p["chosen"], p["rejected"]) for p in made[2]] == \
        [(p["id"], p["chosen"], p["rejected"]) for p in made[0]]
    for ours, whole in zip(made[2], made[0]):
        for key in ("reference_chosen_logps", "reference_rejected_logps"):
            assert ours[key] == pytest.approx(whole[key], abs=1e-5)
