"""The tiny families of tests/families.py: each builds, reloads from its folder with the Auto classes,
renders its generation prompt, runs a forward pass and a left-padded batched greedy generation."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402


def conversation(question, answer=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@pytest.mark.parametrize("family", families.FAMILY_NAMES)
def test_family(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = families.build(family, str(tmp_path / family), seed=0)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = processor.tokenizer
    assert model.config.model_type == family
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config.get_text_config().vocab_size >= len(tokenizer)

    # The template: the generation prompt is a prefix of the conversation, whose answer ends in eos.
    prompt = processor.apply_chat_template(conversation("What colour is it?"), add_generation_prompt=True,
                                           tokenize=False)
    full = processor.apply_chat_template(conversation("What colour is it?", "red"), tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].lstrip().startswith("red" + tokenizer.eos_token)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]) == 1

    # One image: finite logits, one per token.
    inputs = processor(images=[families.image()], text=[prompt], return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma's processor returns labels (all -100 without a suffix)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()

    # A batch of two different prompts, padded on the left, greedy.
    tokenizer.padding_side = "left"
    prompts = [prompt, processor.apply_chat_template(conversation("How many objects are there in the image?"),
                                                     add_generation_prompt=True, tokenize=False)]
    batch = processor(images=[[families.image(1)], [families.image(2)]], text=prompts, padding=True,
                      return_tensors="pt")
    batch.pop("labels", None)
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 4
    assert torch.equal(out[:, :batch["input_ids"].shape[1]], batch["input_ids"])


def test_builds_are_deterministic(tmp_path):
    from safetensors.torch import load_file
    a = load_file(os.path.join(families.build("qwen2_vl", str(tmp_path / "a"), seed=3), "model.safetensors"))
    b = load_file(os.path.join(families.build("qwen2_vl", str(tmp_path / "b"), seed=3), "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert families.image(5).tobytes() == families.image(5).tobytes() != families.image(6).tobytes()
