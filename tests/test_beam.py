"""generate.py's beam search (SHR's decoding): token for token transformers' own beam search
(model.generate(num_beams=...)), batched equal to batch size 1, and not greedy decoding."""
import json
import os

import pytest

import vlm
from generate import beam_search, generate, generate_beam

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def described(toy_world):
    """(model, processor, images, questions): open-ended questions on 6 images, prompts of differing lengths."""
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    records = json.load(open(os.path.join(toy_world, "pool.json")))[:6]
    images = [vlm.load_image(os.path.join(toy_world, "images", r["image"])) for r in records]
    asks = ["Describe the image in detail.", "What is in the image?", "Describe the image briefly, then count the shapes.",
            "Describe the image in detail.", "What colours are there?", "Where is each shape?"]
    return model, processor, images, asks


def transformers_beams(model, processor, image, question, num_beams, max_new_tokens):
    """transformers' beam search on one prompt: its new token ids, cut after the end-of-sequence token."""
    inputs = processor(images=[image], text=[vlm.prompt_text(processor, question, "llava_v1")], return_tensors="pt")
    inputs.pop("labels", None)
    tokenizer = processor.tokenizer
    output = model.generate(**inputs, num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    ids = output[0, inputs["input_ids"].shape[1]:].tolist()
    return ids[:ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids


@pytest.mark.parametrize("num_beams, max_new_tokens", [(5, 24), (3, 6)])  # 6: the length limit ends most beams
def test_beam_search_equals_transformers(described, num_beams, max_new_tokens):
    model, processor, images, questions = described
    tokenizer = processor.tokenizer
    for image, question in zip(images, questions):
        inputs = processor(images=[image], text=[vlm.prompt_text(processor, question, "llava_v1")], return_tensors="pt")
        inputs.pop("labels", None)
        ours = beam_search(model, dict(inputs), num_beams, max_new_tokens, tokenizer.eos_token_id)[0]
        assert ours == transformers_beams(model, processor, image, question, num_beams, max_new_tokens), question


def test_beam_search_batched_equals_batch_size_one(described):
    model, processor, images, questions = described
    lengths = [len(processor.tokenizer(vlm.prompt_text(processor, q, "llava_v1")).input_ids) for q in questions]
    assert len(set(lengths)) > 1, "the batch must need left padding"
    one = generate_beam(model, processor, images, questions, num_beams=5, max_new_tokens=24, batch_size=1)
    batched = generate_beam(model, processor, images, questions, num_beams=5, max_new_tokens=24, batch_size=6)
    assert batched == one
    # and the strings are transformers' ids decoded
    tokenizer = processor.tokenizer
    assert one == [tokenizer.decode(transformers_beams(model, processor, i, q, 5, 24), skip_special_tokens=True).strip()
                   for i, q in zip(images, questions)]


def test_one_beam_is_greedy_and_five_beams_are_not(described):
    model, processor, images, questions = described
    greedy = generate(model, processor, images, questions, max_new_tokens=24, batch_size=6)
    assert generate_beam(model, processor, images, questions, num_beams=1, max_new_tokens=24) == greedy
    five = generate_beam(model, processor, images, questions, num_beams=5, max_new_tokens=24)
    assert five != greedy  # on these prompts beam search changes at least one answer
