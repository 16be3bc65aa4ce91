"""The pair forwards of dpo.py against each other: shared image features, the shared prefix (one packed
sequence per pair) and packing across pairs (every pair in one row) give the same log-probs, DPO losses and LoRA gradients as the naive concatenated forward,
with the adapter on and off, under sdpa and eager attention; an unsupported family falls back and says so;
train_ddp.py trains the same adapter with each (and with shared_image on 2 FSDP2 processes)."""
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import dpo
import lora
import train_ddp
import trainable
import vlm
from helpers import lora_parameters
from test_train_dpo import adapter, assert_same_adapter, dpo_args, run

# Hand-varied answers: chosen and rejected of different lengths, one longer than the other either way.
ANSWERS = [("red", "a deep blue square in the corner"), ("There are three circles here", "2"),
           ("Yes", "No, there is none"), ("the word is cat", "dog dog")]


@pytest.fixture(scope="module")
def lora_model(toy_world):
    """The fixture's SFT model with LoRA whose B is random, so that policy != reference."""
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    lora.apply_lora(model, r=8, alpha=16)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    return model, processor


@pytest.fixture(scope="module")
def batch(toy_world, toy_pairs, lora_model):
    """3 pairs of the fixture's pairs file with the answers above: padding in both halves of the batch."""
    records = [dict(r, chosen=c, rejected=rj) for r, (c, rj) in zip(common.read_records(toy_pairs), ANSWERS)]
    dataset = data.TrainDataset(records[:3], "dpo", os.path.join(toy_world, "images"), lora_model[1],
                                     "llava_v1", 2048)
    batch = dataset.collate([dataset[i] for i in range(3)])
    lengths = batch["attention_mask"].sum(-1)
    assert (lengths[:3] != lengths[3:]).all() and len(set(lengths.tolist())) >= 4  # answers of varied lengths
    return batch


def scores(model, batch, name):
    """Per-pair log-probs (policy and reference), DPO losses and the LoRA gradients of their sum."""
    model.zero_grad(set_to_none=True)
    forward = dpo.PAIR_FORWARDS[name]
    with torch.no_grad(), lora.disable_adapter(model):
        reference_chosen, reference_rejected = forward(model, batch)
    policy_chosen, policy_rejected = forward(model, batch)
    losses, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in lora_parameters(model)}
    model.zero_grad(set_to_none=True)
    return dict(policy_chosen=policy_chosen.detach(), policy_rejected=policy_rejected.detach(),
                reference_chosen=reference_chosen, reference_rejected=reference_rejected,
                losses=losses.detach()), grads


def assert_same_scores(a, b):
    (values_a, grads_a), (values_b, grads_b) = a, b
    for key in values_a:
        torch.testing.assert_close(values_a[key], values_b[key], rtol=1e-5, atol=1e-5, msg=key)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_pack_pairs_by_hand():
    """Prompt [5 6 7], chosen [8 9], rejected [10]; a second pair with rejected longer than chosen."""
    rows = [([5, 6, 7, 8, 9], 3), ([5, 6, 11], 2), ([5, 6, 7, 10], 3), ([5, 6, 12, 13], 2)]  # (ids, prompt)
    batch = {"input_ids": torch.zeros(4, 5, dtype=torch.long), "labels": torch.full((4, 5), -100),
             "attention_mask": torch.zeros(4, 5, dtype=torch.long)}
    for i, (ids, prompt) in enumerate(rows):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["labels"][i, prompt:len(ids)] = torch.tensor(ids[prompt:])
        batch["attention_mask"][i, :len(ids)] = 1
    packed = dpo.pack_pairs(batch)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 11, 12, 13, 6]]  # last: padding
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 0]]
    assert packed["allowed"][0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                                   [1, 1, 0, 0, 0, 0],
                                                   [1, 1, 1, 0, 0, 0],
                                                   [1, 1, 1, 1, 0, 0],  # chosen: prompt + itself
                                                   [1, 1, 1, 1, 1, 0],
                                                   [1, 1, 1, 0, 0, 1]]  # rejected: prompt + itself, not chosen
    assert packed["allowed"][1, 5].int().tolist() == [1, 1, 0, 0, 0, 0]  # padding sees the prompt only
    # Column j's logits predict label j + 1 (sequence_logps shifts); column 0 is the prompt's last position.
    assert packed["positions"][0].tolist() == [[2, 3, 4], [1, 2, 1]]  # slot 0: chosen
    assert packed["labels"][0].tolist() == [[-100, 8, 9], [-100, 11, -100]]
    assert packed["positions"][1].tolist() == [[2, 5, 2], [1, 3, 4]]  # slot 1: rejected
    assert packed["labels"][1].tolist() == [[-100, 10, -100], [-100, 12, 13]]


def test_pack_rows_puts_every_pair_in_one_row_without_padding(batch):
    """Packing across pairs: the row is each pair's packed sequence less its padding, one after another; the
    mask is block-diagonal (no token of one pair sees another pair's), each pair's positions start at 0."""
    per_pair = dpo.pack_pairs(batch)
    row = dpo.pack_rows(per_pair)
    length = per_pair["length"].tolist()
    assert len(set(length)) > 1 and row["input_ids"].shape == (1, sum(length))  # no padding token is left
    starts = [sum(length[:i]) for i in range(len(length))]
    for i, (start, n) in enumerate(zip(starts, length)):
        assert torch.equal(row["input_ids"][0, start:start + n], per_pair["input_ids"][i, :n])
        assert row["position_ids"][0, start] == 0
        assert torch.equal(row["allowed"][0, start:start + n, start:start + n], per_pair["allowed"][i, :n, :n])
        outside = torch.ones(sum(length), dtype=torch.bool)
        outside[start:start + n] = False
        assert not row["allowed"][0, start:start + n][:, outside].any()  # never another pair's tokens
        for moved, positions in zip(row["positions"], per_pair["positions"]):
            assert torch.equal(moved[i], positions[i] + start)


def test_shared_forwards_refuse_what_they_cannot_share(lora_model, batch):
    broken = dict(batch, input_ids=batch["input_ids"].clone())
    broken["input_ids"][3, 1] += 1  # rejected row of pair 0: one prompt token changed
    with pytest.raises(ValueError, match="share their prompt"):
        dpo.pack_pairs(broken)
    broken = dict(batch, pixel_values=batch["pixel_values"].clone())
    broken["pixel_values"][4] += 1  # rejected row of pair 1: another image
    for name in ("shared_image", "shared_prefix", "packed"):
        with pytest.raises(ValueError, match="same image"):
            dpo.PAIR_FORWARDS[name](lora_model[0], broken)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pair_forwards_agree(lora_model, batch, attention):
    model, _ = lora_model
    model.set_attn_implementation(attention)
    try:
        naive = scores(model, batch, "concatenated")
        assert naive[0]["losses"].abs().sum() > 0 and any(g.abs().sum() > 0 for g in naive[1].values())
        assert not torch.allclose(naive[0]["policy_chosen"], naive[0]["reference_chosen"])  # LoRA is non-zero
        for name in ("shared_image", "shared_prefix", "packed"):
            assert_same_scores(naive, scores(model, batch, name))
    finally:
        model.set_attn_implementation("sdpa")


def test_unsupported_family_falls_back_and_says_so_once(lora_model, batch, monkeypatch, capsys):
    model, _ = lora_model
    monkeypatch.setitem(vlm.FAMILIES, "llava", dict(vlm.FAMILIES["llava"], pair_forwards=("concatenated",)))
    forward = trainable.pair_forward_for(model, "shared_prefix")  # chosen once per run, where it is said
    with torch.no_grad():
        first, second = forward(model, batch), forward(model, batch)
        naive = dpo.concatenated_forward(model, batch)
    assert capsys.readouterr().out.count("falling back to the concatenated forward") == 1
    for a, b, c in zip(first, second, naive):
        assert torch.equal(a, c) and torch.equal(b, c)
    monkeypatch.undo()
    assert trainable.pair_forward_for(model, "shared_prefix") is dpo.shared_prefix_forward
    with torch.no_grad():
        dpo.shared_prefix_forward(model, batch)
    assert capsys.readouterr().out == ""  # the math module prints nothing


@pytest.mark.parametrize("reference", ["adapter", "precomputed"])
@pytest.mark.parametrize("pair_forward", ["shared_image", "shared_prefix", "packed"])
def test_training_with_each_pair_forward_gives_the_same_adapter(toy_world, toy_pairs, tmp_path, pair_forward,
                                                                 reference):
    pairs = str(tmp_path / "pairs.jsonl")  # own copy: the precomputed reference is stored beside the pairs
    shutil.copy(toy_pairs, pairs)
    flags = ("--batch-size", "4", "--max-steps", "3", "--reference", reference)
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, pairs, tmp_path / "naive", *flags,
                                                  "--pair-forward", "concatenated")))
    train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, pairs, tmp_path / pair_forward, *flags,
                                                  "--pair-forward", pair_forward)))
    naive = adapter(tmp_path / "naive")
    assert any(v.abs().sum() > 0 for k, v in naive.items() if "lora_B" in k)
    assert_same_adapter(naive, adapter(tmp_path / pair_forward))


def test_fsdp_shared_image_trains_the_projector_as_one_process(toy_world, toy_pairs, tmp_path):
    """shared_image calls get_image_features outside the model's forward: FSDP2 must gather its weights."""
    steps = ("--max-steps", "2", "--global-batch", "4", "--train-projector")
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, toy_pairs, tmp_path / "one", "--batch-size", "4",
                                                   "--pair-forward", "concatenated", *steps)])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py",
         *dpo_args(toy_world, toy_pairs, tmp_path / "two", "--batch-size", "2", "--parallel", "fsdp",
                   "--pair-forward", "shared_image", *steps)])
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"))
    projector = [load_file(os.path.join(tmp_path, name, "adapter", "non_lora_trainables.safetensors"))
                 for name in ("one", "two")]
    assert_same_adapter(*projector, rtol=1e-4, atol=1e-5)


def test_budget_micro_batches_keep_order_budget_and_count():
    lengths = {0: 50, 1: 30, 2: 80, 3: 10, 4: 10, 5: 200, 6: 40}
    micro = data.budget_micro_batches(list(lengths), lengths, 100)
    assert micro == [[0, 1], [2, 3, 4], [5], [6]]  # in order; 5 is longer than the budget: alone
    assert all(sum(lengths[i] for i in m) <= 100 for m in micro if len(m) > 1)
    more = data.budget_micro_batches(list(lengths), lengths, 100, count=6)  # another rank needs 6
    assert len(more) == 6 and [i for m in more for i in m] == list(lengths)
    with pytest.raises(ValueError, match="cannot make"):
        data.budget_micro_batches([0, 1], lengths, 100, count=3)


def test_packed_length_counts_the_prompt_once(batch, toy_world, toy_pairs, lora_model):
    records = [dict(r, chosen=c, rejected=rj) for r, (c, rj) in zip(common.read_records(toy_pairs), ANSWERS)]
    dataset = data.TrainDataset(records[:3], "dpo", os.path.join(toy_world, "images"), lora_model[1], "llava_v1", 2048)
    assert [data.packed_length(dataset[i]) for i in range(3)] == dpo.pack_pairs(batch)["length"].tolist()


def test_packed_pairs_to_a_token_budget_train_as_one_batch_on_one_and_two_processes(toy_world, toy_pairs, tmp_path):
    """--max-tokens-per-batch: the step is still the global batch of pairs, however the budget cuts it, on 1
    process and on 2 (whose ranks may need different numbers of micro-batches: they run the same)."""
    steps = ("--max-steps", "2", "--global-batch", "8")
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, toy_pairs, tmp_path / "one", "--batch-size", "8",
                                                   "--pair-forward", "concatenated", *steps)])
    dataset = data.TrainDataset(common.read_records(toy_pairs), "dpo", os.path.join(toy_world, "images"),
                                vlm.load(os.path.join(toy_world, "model-sft"))[1], "llava_v1", 2048)
    lengths = sorted(data.packed_length(dataset[i]) for i in range(len(dataset)))
    assert lengths[0] + lengths[1] <= 350 < lengths[-1] + lengths[-2]  # a micro-batch holds 1 pair or several
    by_index = {i: data.packed_length(dataset[i]) for i in range(len(dataset))}
    counts = [[len(data.budget_micro_batches(data.rank_micro_batches(data.step_indices(step, len(dataset), 8, 0),
                                                                     rank, 2, 1)[0], by_index, 350))
               for rank in (0, 1)] for step in (0, 1)]
    assert any(a != b for a, b in counts), counts  # the ranks' own cuts differ: training evens them out
    budget = ("--pair-forward", "packed", "--max-tokens-per-batch", "350")
    run([sys.executable, "train_ddp.py", *dpo_args(toy_world, toy_pairs, tmp_path / "budget", "--batch-size", "8",
                                                   *budget, *steps)])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py",
         *dpo_args(toy_world, toy_pairs, tmp_path / "two", "--batch-size", "4", *budget, *steps)])
    one = adapter(tmp_path / "one")
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)
    assert_same_adapter(one, adapter(tmp_path / "budget"))
    assert_same_adapter(one, adapter(tmp_path / "two"))
    for name in ("budget", "two"):
        want = [m["loss"] for m in common.read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))]
        got = [m["loss"] for m in common.read_jsonl(str(tmp_path / name / "metrics.jsonl"))]
        assert got == pytest.approx(want, abs=1e-5)
