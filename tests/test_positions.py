"""positions.py: M-RoPE's 3D positions worked by hand, and what the shared-prefix forward would get wrong without
each of the family rules it takes from there (the battery in test_families.py checks that with them it equals the
naive forward)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402

import collate  # noqa: E402
import dpo  # noqa: E402
import positions  # noqa: E402
import vlm  # noqa: E402
from test_families import pair_batch, sharpen  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("positions")
    return {name: families.build(name, str(root / name)) for name in ("qwen2_vl", "qwen3_vl", "paligemma", "gemma3")}


def loaded(folders, name):
    model, processor = vlm.load(folders[name])
    return sharpen(model.eval()), processor


def test_mrope_positions_by_hand(folders):
    """Qwen2-VL, a 32 x 32 image: 4 x 4 patches of 8 px, merged 2 x 2 into 2 x 2 tokens. Text counts 0, 1, ...; the
    image's tokens starting at s have temporal s, height s + row, width s + column; the text after it goes on at
    s + 2 (the grid's larger side), not s + 4, and every answer token at the prompt's largest position + 1."""
    model, processor = loaded(folders, "qwen2_vl")
    example = vlm.encode(processor, families.image(0), [("What colour is it?", "red")], "chat")
    batch = collate.collate([example], processor.tokenizer.pad_token_id)
    got = positions.row_positions(model, batch)[:, 0]  # (3, T)
    ids = example["input_ids"].tolist()
    s, n = ids.index(model.config.image_token_id), len(ids)
    assert ids[s:s + 4] == [model.config.image_token_id] * 4 and model.config.image_token_id not in ids[s + 4:]
    text = torch.arange(s)
    want = torch.stack([torch.cat([text, s + torch.tensor(t), s + 2 + torch.arange(n - s - 4)])
                        for t in ([0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1])])
    assert torch.equal(got, want)
    prompt = int(dpo.prompt_length(example["labels"]))
    inputs = {k: v[:, :prompt] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in batch.items()}
    assert positions.next_positions(model, inputs).tolist() == [int(want[:, prompt - 1].max()) + 1]
    assert int(want[:, prompt - 1].max()) + 1 == prompt - 2  # two positions fewer than tokens


def gap(model, batch):
    """The largest difference between shared_prefix_forward's log-probs and the naive forward's."""
    with torch.no_grad():
        naive = dpo.concatenated_forward(model, batch)
        return max((a - b).abs().max().item() for a, b in zip(dpo.shared_prefix_forward(model, batch), naive))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_mrope_packed_with_1d_positions_differs(folders, name, monkeypatch):
    model, processor = loaded(folders, name)
    batch = pair_batch(model, processor)
    assert gap(model, batch) < 1e-4  # the model's own positions
    ones = lambda model, inputs: (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # 0, 1, ... as text
    monkeypatch.setattr(positions, "row_positions", ones)
    assert gap(model, batch) > 1e-2


@pytest.mark.parametrize("name", ["paligemma", "gemma3"])
def test_causal_prompt_differs_from_the_models_own_mask(folders, name, monkeypatch):
    """PaliGemma's prefix and Gemma 3's images attend both ways: a causal prompt changes every answer's
    log-prob, so the shared prefix keeps the model's blocks (positions.attention_blocks)."""
    model, processor = loaded(folders, name)
    batch = pair_batch(model, processor)
    assert gap(model, batch) < 1e-4
    monkeypatch.setattr(positions, "attention_blocks", lambda model, inputs: None)
    assert gap(model, batch) > 1e-2


def test_gemma3_sliding_window_follows_the_positions(folders, monkeypatch):
    """The tiny Gemma 3 has a window of 8 tokens on its first layer, its prompts ~30: without the sliding mask the
    answers' queries see keys beyond the window that the model's own mask hides."""
    model, processor = loaded(folders, "gemma3")
    assert positions.sliding_window(model) == 8
    batch = pair_batch(model, processor)
    monkeypatch.setattr(positions, "sliding_window", lambda model: None)
    assert gap(model, batch) > 1e-2
