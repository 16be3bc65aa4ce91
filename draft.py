"""
Greedy decoding with a draft: SeVa's rejected answers, drafted by the chosen ones (Alg. 1 line 2).

The rejected answer is generated on T(I) for the same question as the chosen answer on I, and most of the time it
is the chosen answer again, token for token (line 3 then drops the pair: the main command keeps ~20%). So the
chosen answer is a good guess of the rejected one, and greedy speculative decoding checks a guess for free:

  1. the prompt's KV cache is computed as generate.py computes it (generate.prefilled);
  2. one forward feeds the prompt's last token and then the whole draft (the chosen answer's tokens): the model's
     argmax at each position says which token greedy decoding would put there, so the longest prefix of the draft
     that agrees with it is the greedy answer's start, and the argmax after it is the next greedy token;
  3. decoding goes on one token per forward; whenever the last generated tokens occur again in the chosen answer
     further on, the tokens that follow them there are fed as the next draft (a rejected answer that differs by
     one word usually realigns with the chosen one after it).
Every token is the model's own argmax after the greedy tokens before it, so the answers are those of plain greedy
decoding (tests/test_draft.py checks them token for token against generate.generate_tokens); an answer that
equals its draft costs one forward instead of one per token. Rows that end are dropped from the batch, so the
forwards after the first run on the few rows whose answers differ.

In the batch, each row feeds its own number of tokens per forward: the KV cache keeps one column per fed
position, the columns of rejected draft tokens (and of the shorter rows' padding) are masked out of the
attention mask, and every token gets its position from its row's own count of kept tokens, as left padding does.
Needs a family whose prompt can be continued with 1D positions and no per-token inputs (vlm.FAMILIES
prefill_rows: LLaVA, LLaVA-NeXT, Idefics3); `can_draft` says.
"""
import torch

import vlm
from generate import prefilled, prompt_inputs


def can_draft(model):
    """Whether drafted decoding can serve this model's family: prompts read a few rows at a time (vlm.FAMILIES
    prefill_rows), 1D positions from 0 and causal attention, since the draft continues the prompt's KV cache with
    positions and a mask of its own."""
    spec = vlm.spec(vlm.unwrap(model).config)
    return (spec["prefill_rows"] and spec["positions"] == "1d" and spec["first_position"] == 0
            and spec["attention"] == "causal")


@torch.no_grad()
def drafted_generate(model, processor, images, questions, drafts, template=None, max_new_tokens=16, batch_size=8,
                     pixel_transform=None, prefill_batch=None, max_redraft=16, logits_processor=None, steps=None):
    """Greedy answers to (image, question) pairs, as generate.generate_tokens returns them: (answers, ids), ids up
    to and including the end-of-sequence token. drafts[i]: token ids guessed for answer i
    (SeVa: the chosen answer's ids); any guess gives the same answers, a good one fewer forwards.

    max_redraft: at most this many tokens per draft taken again from drafts[i] after a mismatch (0: none).
    logits_processor(rows, done, scores) -> scores: applied before every argmax, rows (N,) the batch-local row,
        done (N,) the answer tokens before the one scored, scores (N, V); e.g. a benchmark's forced lengths.
    steps: a list that receives, per answer, the forwards that decoded it (the prompt's reading not counted; plain
        decoding takes one per token)."""
    if not can_draft(model):
        raise ValueError(f"drafted decoding: {vlm.family_of(vlm.unwrap(model).config)}'s prompts cannot be continued "
                         f"with 1D positions and a causal mask (draft.can_draft); generate without drafts")
    if not len(images) == len(questions) == len(drafts):
        raise ValueError(f"{len(images)} images, {len(questions)} questions, {len(drafts)} drafts")
    template = vlm.resolve_template(model, template)
    tokenizer = processor.tokenizer
    answers, answer_ids = [], []
    for start in range(0, len(images), batch_size):
        indices = list(range(start, min(start + batch_size, len(images))))
        inputs = prompt_inputs(model, processor, [images[i] for i in indices], [questions[i] for i in indices],
                               template, pixel_transform, indices)
        ids, counts = decode(model, inputs, [list(drafts[i]) for i in indices], max_new_tokens,
                             tokenizer.eos_token_id, tokenizer.pad_token_id, prefill_batch, max_redraft,
                             logits_processor)
        answer_ids += ids
        answers += [a.strip() for a in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if steps is not None:
            steps += counts
    return answers, answer_ids


def decode(model, inputs, drafts, max_new_tokens, eos, pad, prefill_batch=None, max_redraft=16,
           logits_processor=None):
    """One batch: (each row's answer ids, each row's forwards). inputs: prompt_inputs' left-padded prompts."""
    rows = len(drafts)
    state = prefilled(model, inputs, prefill_batch or rows)  # the cache of every prompt token but the last
    cache, device = state["cache"], inputs["input_ids"].device
    mask = inputs["attention_mask"][:, :-1]  # (A, cache columns): which columns hold a kept token
    kept = mask.sum(-1)  # (A,): kept tokens of each active row, the position of its next token
    last = inputs["input_ids"][:, -1].tolist()  # each row's next token to feed (not yet in the cache)
    answers, forwards = [[] for _ in range(rows)], [0] * rows
    plans = [draft[:max_new_tokens - 1] for draft in drafts]  # the first draft: all of it that fits
    sources = [0] * rows  # where in its draft each row's plan starts
    active = list(range(rows))  # the rows still decoding, in cache order
    while active:
        width = 1 + max(len(plans[i]) for i in active)
        fed = torch.full((len(active), width), pad, dtype=torch.long, device=device)
        fed_mask = torch.zeros(len(active), width, dtype=mask.dtype, device=device)
        for r, i in enumerate(active):
            fed[r, :1 + len(plans[i])] = torch.tensor([last[i]] + plans[i], device=device)
            fed_mask[r, :1 + len(plans[i])] = 1
        mask = torch.cat([mask, fed_mask], 1)
        positions = kept[:, None] + torch.arange(width, device=device)  # (A, width): after each row's kept tokens
        logits = model(input_ids=fed, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits  # (A, width, V): the token after each fed one
        if logits_processor is not None:
            row = torch.tensor(active, device=device)[:, None].expand(-1, width)  # (A, width)
            done = torch.tensor([len(answers[i]) for i in active], device=device)[:, None] + torch.arange(
                width, device=device)  # (A, width): answer tokens before the one each position predicts
            logits = logits_processor(row.reshape(-1), done.reshape(-1),
                                      logits.reshape(-1, logits.shape[-1])).view(logits.shape)
        greedy = logits.argmax(-1).tolist()  # (A, width): greedy decoding's token after each fed one
        going = []
        for r, i in enumerate(active):
            plan, accepted = plans[i], 0
            while accepted < len(plan) and greedy[r][accepted] == plan[accepted]:
                accepted += 1
            new = (plan[:accepted] + [greedy[r][accepted]])[:max_new_tokens - len(answers[i])]
            if eos in new:
                new = new[:new.index(eos) + 1]
            answers[i] += new
            forwards[i] += 1
            mask[r, mask.shape[1] - width + 1 + accepted:] = 0  # the rejected draft tokens and the padding
            kept[r] += 1 + accepted
            last[i] = new[-1]
            if new[-1] != eos and len(answers[i]) < max_new_tokens:
                going.append(r)
                limit = min(max_redraft, max_new_tokens - len(answers[i]) - 1)
                # search on from the last draft token used (so that a bigram may end on the model's own token)
                after = max(0, sources[i] + accepted - 1) if plan else sources[i]
                plans[i], sources[i] = redraft(drafts[i], answers[i], after, limit)
        if len(going) < len(active):  # ended rows leave the batch
            keep = torch.tensor(going, dtype=torch.long, device=device)
            cache.batch_select_indices(keep)
            mask, kept = mask[keep], kept[keep]
            active = [active[r] for r in going]
    return answers, forwards


def redraft(draft, answer, start, limit):
    """(the next plan, where it starts in the draft): the draft's tokens (at most `limit`) after the first
    occurrence, at or after `start`, of the answer's last two tokens (else of its last one); none where neither
    occurs, the start unchanged."""
    if limit > 0:
        for n in (2, 1):
            tail = answer[-n:]
            for j in range(start, len(draft) - n + 1) if len(answer) >= n else ():
                if draft[j:j + n] == tail:
                    return draft[j + n:j + n + limit], j + n
    return [], start
