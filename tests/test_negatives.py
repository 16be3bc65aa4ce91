"""Several negatives (paper 3.3) and the DPO remedies: the losses against hand-worked numbers, K = 1 against
Eq. 7, the packed forward against the naive one for K up to 4, seva.py's K views, and training with K = 3 on
2 processes against 1."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import data
import dpo
import lora
import pairs
import pool
import seva
from helpers import lora_parameters
from test_seva import argv as seva_argv
from test_shared_prefix import lora_model  # noqa: F401 (a fixture: the SFT model with random LoRA B)
from test_seva import subprocess_env
from test_train_dpo import adapter, assert_same_adapter, dpo_args, metrics, run
from conftest import ROOT, wrong_answer


# ----------------------------------------------------------------------------- the losses by hand
def test_multi_negative_losses_by_hand():
    """dpo.py's worked example: beta 1, log-ratios chosen 1.0, rejected 0.0 and 1.0 (pair 0, K = 2); pair 1 has
    one rejected answer, log-ratios chosen 0.5, rejected -0.5 (K = 1: both forms are Eq. 7)."""
    policy_chosen, reference_chosen = torch.tensor([1.0, 0.5]), torch.zeros(2)
    policy_rejected, reference_rejected = torch.tensor([0.0, 1.0, -0.5]), torch.zeros(3)
    index = torch.tensor([0, 0, 1])
    infonce, chosen_rewards, rejected_rewards = dpo.multi_negative_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, index, beta=1.0, form="infonce")
    # pair 0: log(e + 1 + e) - 1 = 0.8620; pair 1: -log sigmoid(0.5 - (-0.5)) = log(1 + e^-1) = 0.3133
    assert infonce.tolist() == pytest.approx([math.log(2 * math.e + 1) - 1, math.log(1 + math.exp(-1))], abs=1e-6)
    assert infonce[0].item() == pytest.approx(0.8620, abs=1e-4)
    pairwise, _, _ = dpo.multi_negative_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                             index, beta=1.0, form="pairwise")
    # pair 0: (-log sigmoid(1) - log sigmoid(0)) / 2 = (0.3133 + 0.6931) / 2 = 0.5032; pair 1 as above
    assert pairwise.tolist() == pytest.approx([0.5032, 0.3133], abs=1e-4)
    assert chosen_rewards.tolist() == [1.0, 0.5] and rejected_rewards.tolist() == [0.0, 1.0, -0.5]


@pytest.mark.parametrize("form", dpo.NEGATIVE_LOSSES)
def test_one_negative_is_eq7(form):
    torch.manual_seed(0)
    pc, rc, pr, rr = (torch.randn(6) * 3 for _ in range(4))
    losses, chosen, rejected = dpo.multi_negative_loss(pc, pr, rc, rr, torch.arange(6), beta=0.1, form=form)
    eq7, chosen7, rejected7 = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(losses, eq7)
    torch.testing.assert_close(chosen, chosen7)
    torch.testing.assert_close(rejected, rejected7)


def test_infonce_is_softmax_cross_entropy_over_the_answers():
    """A second code path: InfoNCE is the cross-entropy of the chosen answer's class among 1 + K rewards."""
    torch.manual_seed(1)
    pc, rc = torch.randn(3), torch.randn(3)
    pr, rr = torch.randn(12), torch.randn(12)  # K = 4 for each of 3 pairs
    index = torch.arange(3).repeat_interleave(4)
    losses, _, _ = dpo.multi_negative_loss(pc, pr, rc, rr, index, beta=0.5)
    rewards = torch.cat([0.5 * (pc - rc)[:, None], 0.5 * (pr - rr).view(3, 4)], 1)
    torch.testing.assert_close(losses, F.cross_entropy(rewards, torch.zeros(3, dtype=torch.long), reduction="none"))


def test_rpo_and_ld_by_hand():
    # RPO: log pi(c) = -6.0 over 3 tokens, alpha 0.5: 0.5 x 6.0 / 3 = 1.0
    assert dpo.rpo_term(torch.tensor([-6.0]), torch.tensor([3]), 0.5).item() == pytest.approx(1.0)
    # LD-DPO: one row, answer tokens with log-probs log(1/2), log(1/4), log(1/8) (uniform logits over 2, 4, 8
    # classes); public length 1, alpha 0.5: log(1/2) + 0.5 (log(1/4) + log(1/8)) = -0.6931 - 0.5 x 3.4657 = -2.4260
    logits = torch.full((1, 4, 8), -1e9)
    logits[0, 0, :2], logits[0, 1, :4], logits[0, 2, :8] = 0.0, 0.0, 0.0
    labels = torch.tensor([[-100, 1, 2, 3]])  # position t's logits predict label t + 1
    full = dpo.sequence_logps(logits, labels)
    assert full.item() == pytest.approx(math.log(1 / 64), abs=1e-5)
    ld = dpo.sequence_logps(logits, labels, public=torch.tensor([1]), ld_alpha=0.5)
    assert ld.item() == pytest.approx(-2.4260, abs=1e-4)
    same = dpo.sequence_logps(logits, labels, public=torch.tensor([1]), ld_alpha=1.0)
    assert torch.equal(same, full)  # alpha 1 is plain DPO, exactly


# ----------------------------------------------------------------------------- the packed forward, K up to 4
REJECTED = ["a deep blue square in the corner", "2", "No, there is none", "dog dog"]


def k_batch(toy_world, toy_pairs, processor, negatives):
    """3 pairs with negatives[i] rejected answers each (a list: several negatives), of varied lengths."""
    records = common.read_records(toy_pairs)[:3]
    records = [dict(r, chosen=["red", "There are three circles here", "Yes"][i],
                    rejected=[REJECTED[(i + j) % 4] for j in range(k)]) for i, (r, k) in enumerate(zip(records, negatives))]
    dataset = data.TrainDataset(records, "dpo", os.path.join(toy_world, "images"), processor, "llava_v1", 2048)
    return dataset.collate([dataset[i] for i in range(3)])


def k_scores(model, batch, name):
    model.zero_grad(set_to_none=True)
    forward = dpo.PAIR_FORWARDS[name]
    with torch.no_grad(), lora.disable_adapter(model):
        reference = forward(model, batch)
    policy = forward(model, batch)
    losses, _, _ = dpo.multi_negative_loss(*policy, *reference, batch["pair_index"])
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in lora_parameters(model)}
    model.zero_grad(set_to_none=True)
    return [t.detach() for t in (*policy, *reference, losses)], grads


@pytest.mark.parametrize("negatives", [(1, 1, 1), (2, 2, 2), (4, 1, 3), (4, 4, 4)])
@pytest.mark.parametrize("name", ["shared_prefix", "shared_image", "packed"])
def test_packed_forwards_equal_naive_for_k_negatives(toy_world, toy_pairs, lora_model, negatives, name):
    model, processor = lora_model
    batch = k_batch(toy_world, toy_pairs, processor, negatives)
    assert batch["pair_index"].tolist() == [i for i, k in enumerate(negatives) for _ in range(k)]
    (values_a, grads_a), (values_b, grads_b) = k_scores(model, batch, "concatenated"), k_scores(model, batch, name)
    for a, b in zip(values_a, values_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["shared_prefix", "shared_image", "packed"])
def test_ld_dpo_weights_alike_in_every_forward(toy_world, toy_pairs, lora_model, name):
    """LD-DPO's weighting (alpha 0.5) gives the packed forwards the naive forward's numbers, and it changes them."""
    model, processor = lora_model
    batch = {k: v for k, v in k_batch(toy_world, toy_pairs, processor, (1, 1, 1)).items() if k != "pair_index"}
    naive = dpo.concatenated_forward(model, batch, ld_alpha=0.5)
    torch.testing.assert_close(dpo.PAIR_FORWARDS[name](model, batch, ld_alpha=0.5), naive, rtol=1e-5, atol=1e-5)
    plain = dpo.concatenated_forward(model, batch)
    assert not torch.allclose(torch.cat(naive), torch.cat(plain))  # the answers differ in length: weights bite


def test_a_list_of_one_negative_scores_as_a_string(toy_world, toy_pairs, lora_model):
    """Records with rejected: [r] (seva.py --num-negatives K where one answer survived) give Eq. 7's numbers."""
    model, processor = lora_model
    listed = k_batch(toy_world, toy_pairs, processor, (1, 1, 1))
    plain = {k: v for k, v in listed.items() if k != "pair_index"}
    for name in dpo.PAIR_FORWARDS:
        a, b = dpo.PAIR_FORWARDS[name](model, listed), dpo.PAIR_FORWARDS[name](model, plain)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- seva.py with K views
@pytest.fixture(scope="module")
def k3(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("k3") / "pairs.jsonl"
    summary = seva.main(seva_argv(toy_world, out, "--num-negatives", "3", "--export", "trl"))
    return out, summary


def test_one_negative_writes_the_pairs_file_as_before(toy_world, tmp_path):
    default, one = tmp_path / "default.jsonl", tmp_path / "one.jsonl"
    seva.main(seva_argv(toy_world, default))
    seva.main(seva_argv(toy_world, one, "--num-negatives", "1"))
    assert one.read_bytes() == default.read_bytes() and default.read_bytes()
    assert all(isinstance(json.loads(line)["rejected"], str) for line in open(default))


def test_k_views_keep_the_distinct_rejected_answers(toy_world, k3):
    """Each kept record: 1-3 distinct rejected answers, none equal to chosen, in view order, each equal to the
    model's answer on that view (view 0 = the one-negative run's noise); instances with none are dropped."""
    out, summary = k3
    kept = common.read_jsonl(str(out))
    assert kept and summary["pairs"] == len(kept)
    import vlm
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    instances, _, _ = pool.sample_instances(common.read_records(os.path.join(toy_world, "pool.json")), ["all"], 16, 0)
    settings = seva.AnswerSettings(noise_step=999, max_new_tokens=6, negative_steps=[999, 999, 999])
    rows = seva.answer_chunk(model, processor, instances, os.path.join(toy_world, "images"), settings)
    expected = {i["id"]: seva.distinct_rejected(r["chosen"], r["rejected"]) for i, r in zip(instances, rows)}
    assert {p["id"]: p["rejected"] for p in kept} == {k: v for k, v in expected.items() if v}
    for pair in kept:
        assert 1 <= len(pair["rejected"]) <= 3 and pair["chosen"] not in pair["rejected"]
        assert len(set(pair["rejected"])) == len(pair["rejected"]) and pair["noise_steps"] == [999] * len(pair["rejected"])
    assert any(len(set(r["rejected"])) > 1 for r in rows)  # the views differ: their noise is their own
    trl = [json.loads(line) for line in open(str(out)[:-len(".jsonl")] + ".trl.jsonl")]
    assert len(trl) == sum(len(p["rejected"]) for p in kept) == len(pairs.expand(kept))


def test_k3_two_ranks_equal_one_process(toy_world, k3, tmp_path):
    out = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "seva.py",
                    *seva_argv(toy_world, out, "--num-negatives", "3", "--export", "trl")], cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True)
    assert out.read_bytes() == k3[0].read_bytes()


def test_bad_negative_arguments_are_refused(toy_world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        seva.parse_args(["--num-negatives", "2", "--negative-steps", "300,500,800"])
    assert "3 steps but --num-negatives is 2" in capsys.readouterr().err
    args = seva.parse_args(["--negative-steps", "300,800"])
    assert args.negative_steps == [300, 800] and args.num_negatives == 2
    with pytest.raises(ValueError, match="diffusion"):
        seva.check_args(seva.parse_args(["--negative-steps", "300,800", "--augmentation", "rand_flip"]))


# ----------------------------------------------------------------------------- training with K = 3
@pytest.fixture(scope="module")
def k_pairs(toy_world, toy_pairs, tmp_path_factory):
    """The fixture's right-way pairs with 3 wrong answers each (1 for every 4th pair: K varies in a batch)."""
    path = tmp_path_factory.mktemp("kpairs") / "pairs.jsonl"
    records = common.read_records(os.path.join(toy_world, "sft.json"))
    from eval import toyvqa
    with open(path, "w") as f:
        for i, (line, record) in enumerate(zip(common.read_jsonl(toy_pairs), records)):
            _, _, answer, family = toyvqa.first_question(record)
            wrong = list(dict.fromkeys(wrong_answer(family, answer, i + j) for j in range(3 if i % 4 else 1)))
            f.write(json.dumps(dict(line, rejected=wrong)) + "\n")
    return str(path)


@pytest.mark.parametrize("form", dpo.NEGATIVE_LOSSES)
def test_k3_two_processes_equal_one(toy_world, k_pairs, tmp_path, form):
    steps = ("--max-steps", "2", "--global-batch", "8", "--grad-accum", "2", "--negatives-loss", form)
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, k_pairs, tmp_path / "one", "--batch-size", "4", *steps)])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py",
         *dpo_args(toy_world, k_pairs, tmp_path / "two", "--batch-size", "2", *steps)])
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)
    assert_same_adapter(one, two)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["negatives"] == pytest.approx(b["negatives"]) and 1 < a["negatives"] <= 3
        assert a["neg3/pairs"] == pytest.approx(b["neg3/pairs"]) and 0 < a["neg3/pairs"] < 1
        assert a["neg1/rewards/margins"] == pytest.approx(b["neg1/rewards/margins"], rel=1e-4, abs=1e-6)


def test_remedies_at_their_off_values_train_as_plain_dpo(toy_world, toy_pairs, tmp_path):
    base = ("--max-steps", "2", "--batch-size", "4")
    train_ddp_main = [sys.executable, "train_ddp.py"]
    run(train_ddp_main + dpo_args(toy_world, toy_pairs, tmp_path / "plain", *base))
    run(train_ddp_main + dpo_args(toy_world, toy_pairs, tmp_path / "off", *base, "--rpo-alpha", "0", "--ld-alpha", "1"))
    plain, off = adapter(tmp_path / "plain"), adapter(tmp_path / "off")
    assert all(torch.equal(plain[k], off[k]) for k in plain)


def test_rpo_adds_the_chosen_nll_and_ld_refuses_several_negatives(toy_world, toy_pairs, k_pairs, tmp_path):
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, toy_pairs, tmp_path / "rpo", "--max-steps", "1",
                                                   "--batch-size", "4", "--rpo-alpha", "0.5")])
    row = metrics(tmp_path / "rpo")[0]
    assert row["rpo/nll_chosen"] > 0
    plain = tmp_path / "plain"
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, toy_pairs, plain, "--max-steps", "1", "--batch-size", "4")])
    # the first step's loss: DPO's (the same weights) + 0.5 x the chosen NLL per token
    assert row["loss"] == pytest.approx(metrics(plain)[0]["loss"] + 0.5 * row["rpo/nll_chosen"], rel=1e-5)
    result = subprocess.run([sys.executable, "train_ddp.py", *dpo_args(toy_world, k_pairs, tmp_path / "ld",
                                                                       "--max-steps", "1", "--ld-alpha", "0.5")],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and "several rejected answers" in result.stderr
    assert "Traceback" not in result.stderr


def test_k3_precomputed_reference_trains_as_the_adapter_reference(toy_world, k_pairs, tmp_path):
    import shutil
    own = str(tmp_path / "pairs.jsonl")  # the precomputed reference is stored beside the pairs
    shutil.copy(k_pairs, own)
    flags = ("--max-steps", "2", "--batch-size", "4")
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, own, tmp_path / "adapter", *flags)])
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, own, tmp_path / "pre", *flags, "--reference",
                                                   "precomputed")])
    stored = common.read_jsonl(next(str(p) for p in tmp_path.glob("pairs.reference-*.jsonl")))
    lengths = {r["id"]: len(r["rejected"]) for r in common.read_jsonl(own)}
    assert all(len(row["reference_rejected_logps"]) == lengths[row["id"]] for row in stored)
    assert_same_adapter(adapter(tmp_path / "adapter"), adapter(tmp_path / "pre"))
