"""generate.py: batched answers equal batch-size-1 answers token for token; the two templates agree."""

import pytest
import torch

import diffusion
import vlm
from generate import generate, generate_tokens
from helpers import pool_questions


@pytest.fixture(scope="module")
def questions(toy_world):
    """(model, processor, images, questions): every turn of the first pool records, lengths differing."""
    return pool_questions(toy_world)


def prompt_lengths(processor, questions):
    return [len(processor.tokenizer(vlm.prompt_text(processor, q, "llava_v1")).input_ids) for q in questions]


def test_batched_equals_batch_size_one_token_for_token(questions):
    model, processor, images, texts = questions
    lengths = prompt_lengths(processor, texts[:4])
    assert len(set(lengths)) > 1, "the first batch must need left padding"
    one, one_ids, _ = generate_tokens(model, processor, images, texts, max_new_tokens=8, batch_size=1)
    batched, batched_ids, _ = generate_tokens(model, processor, images, texts, max_new_tokens=8, batch_size=4)
    assert batched_ids == one_ids
    assert batched == one
    assert generate(model, processor, images[:4], texts[:4], max_new_tokens=8, batch_size=4) == one[:4]  # no ids
    for answer, ids in zip(one, one_ids):  # the ids are the answer's tokens, end-of-sequence at most last
        assert processor.tokenizer.decode(ids, skip_special_tokens=True).strip() == answer
        assert processor.tokenizer.eos_token_id not in ids[:-1] and 1 <= len(ids) <= 8


def test_batched_equals_batch_size_one_under_diffusion_noise(questions):
    # SeVa's rejected answers: each row's noise is seeded by its id, so batching changes nothing either.
    model, processor, images, texts = questions
    ids = [f"q{i}" for i in range(len(texts))]
    noise = lambda pixels, rows: diffusion.diffusion_noise_rows(pixels, [ids[i] for i in rows], 800, 0)
    one = generate_tokens(model, processor, images, texts, max_new_tokens=6, batch_size=1, pixel_transform=noise)
    batched = generate_tokens(model, processor, images, texts, max_new_tokens=6, batch_size=5, pixel_transform=noise)
    assert batched == one


def test_chat_template_and_llava_v1_give_the_same_answers(questions):
    model, processor, images, texts = questions
    assert vlm.prompt_text(processor, texts[0], "chat") == vlm.prompt_text(processor, texts[0], "llava_v1")
    llava = generate_tokens(model, processor, images, texts, "llava_v1", max_new_tokens=6, batch_size=8)
    chat = generate_tokens(model, processor, images, texts, "chat", max_new_tokens=6, batch_size=8)
    assert chat == llava


def test_length_mismatch_raises(questions):
    model, processor, images, texts = questions
    with pytest.raises(ValueError, match="images but"):
        generate(model, processor, images[:2], texts[:3])


def test_pixel_transform_sees_the_batch_rows(questions):
    model, processor, images, texts = questions
    seen = []

    def record_rows(pixel_values, rows):
        seen.append((tuple(rows), len(pixel_values)))
        return pixel_values

    generate(model, processor, images[:5], texts[:5], max_new_tokens=1, batch_size=2, pixel_transform=record_rows)
    assert seen == [((0, 1), 2), ((2, 3), 2), ((4,), 1)]
    assert torch.is_grad_enabled()  # generate's no_grad does not leak
