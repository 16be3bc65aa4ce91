"""draft.py: greedy decoding with a draft gives plain greedy decoding's answers token for token, whatever the
draft (right, partly right, wrong, too long, ending early), in batches with left padding; a right draft costs one
forward per answer."""

import pytest
import torch

import diffusion
import draft
from generate import generate_tokens
from helpers import pool_questions


@pytest.fixture(scope="module")
def setting(toy_world, one_thread):
    """(model, processor, images, questions): two turns of the first pool records, prompt lengths differing."""
    return pool_questions(toy_world)


def noise(count):
    ids = [f"q{i}" for i in range(count)]
    return lambda pixels, rows: diffusion.diffusion_noise_rows(pixels, [ids[i] for i in rows], 800, 0)


def plain(setting, max_new_tokens, transform=None):
    model, processor, images, questions = setting
    answers, ids, _ = generate_tokens(model, processor, images, questions, max_new_tokens=max_new_tokens,
                                      batch_size=1, pixel_transform=transform)
    return answers, ids


def drafted(setting, drafts, max_new_tokens, transform=None, batch_size=3, **kwargs):
    model, processor, images, questions = setting
    steps = []
    out = draft.drafted_generate(model, processor, images, questions, drafts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, pixel_transform=transform, steps=steps, **kwargs)
    return out, steps


def test_no_draft_is_plain_greedy_decoding(setting):
    expected = plain(setting, 8)
    out, steps = drafted(setting, [[] for _ in expected[1]], 8)
    assert out == expected
    assert steps == [len(ids) for ids in expected[1]]  # one forward per token, as plain decoding


def test_the_chosen_answers_draft_the_rejected_ones(setting):
    # SeVa: chosen on I, rejected on T(I) drafted by the chosen; the rejected answers are plain decoding's
    chosen = plain(setting, 8)
    count = len(chosen[1])
    rejected = plain(setting, 8, noise(count))
    out, steps = drafted(setting, chosen[1], 8, noise(count), prefill_batch=2)
    assert out == rejected
    same = [c == r for c, r in zip(chosen[1], rejected[1])]
    assert any(same) and not all(same), "the noise must change some answers and not others"
    assert all(s == 1 for s, equal in zip(steps, same) if equal)  # an answer equal to its draft: one forward
    assert sum(steps) < sum(len(ids) for ids in rejected[1])


def test_its_own_answer_as_draft_takes_one_forward(setting):
    expected = plain(setting, 8)
    out, steps = drafted(setting, expected[1], 8, batch_size=8)
    assert out == expected and steps == [1] * len(steps)


def test_wrong_drafts_change_no_answer(setting):
    expected = plain(setting, 8)
    eos = setting[1].tokenizer.eos_token_id
    vocab = len(setting[1].tokenizer)
    generator = torch.Generator().manual_seed(0)
    drafts = []
    for k, ids in enumerate(expected[1]):
        wrong = list(ids)
        kind = k % 4
        if kind == 0:  # one token changed in the middle: the rest realigns (a re-draft)
            wrong[len(wrong) // 2] = (wrong[len(wrong) // 2] + 1) % vocab
        elif kind == 1:  # ends at once
            wrong = [eos]
        elif kind == 2:  # random tokens, longer than max_new_tokens
            wrong = torch.randint(0, vocab, (20,), generator=generator).tolist()
        else:  # another row's answer
            wrong = expected[1][(k + 1) % len(expected[1])]
        drafts.append(wrong)
    assert drafted(setting, drafts, 8)[0] == expected
    assert drafted(setting, drafts, 8, max_redraft=0)[0] == expected


@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_max_new_tokens_cuts_answers_and_drafts(setting, max_new_tokens):
    long = plain(setting, 8)
    expected = plain(setting, max_new_tokens)
    assert any(len(ids) == max_new_tokens and ids[-1] != setting[1].tokenizer.eos_token_id for ids in expected[1])
    out, steps = drafted(setting, long[1], max_new_tokens)  # drafts longer than the limit
    assert out == expected and steps == [1] * len(steps)


def test_redraft_finds_the_draft_again():
    # answer so far ... 7, 8: the draft's tokens after its "7, 8" at or after the start, at most `limit`
    assert draft.redraft([1, 7, 8, 2, 3, 7, 8, 4], [9, 7, 8], 0, 5) == ([2, 3, 7, 8, 4], 3)
    assert draft.redraft([1, 7, 8, 2, 3, 7, 8, 4], [9, 7, 8], 2, 1) == ([4], 7)
    assert draft.redraft([1, 2, 3], [9, 5, 2], 0, 4) == ([3], 2)  # the last token alone where the pair is not there
    assert draft.redraft([1, 2, 3], [9, 5, 6], 0, 4) == ([], 0)
    assert draft.redraft([1, 2, 3], [1], 0, 0) == ([], 0)
