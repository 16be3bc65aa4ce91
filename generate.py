"""
Batched greedy answers from a local HF vision-language model: Alg. 1 line 2 runs through here.

The authors generated one answer at a time; we batch with left padding and the KV cache, and test that
the batched answers equal batch-size-1 answers token for token. seva.py and eval/ call `generate` (the answers);
`generate_tokens` returns their token ids too, and the state `score_answers` needs to score answers on the same
prompts (seva.py --reference-logps).

    python generate.py --model toy/model-sft --image toy/images/coco/000000.png --question "Describe the image in detail."
"""
import argparse
from typing import NamedTuple

import torch
from tqdm import tqdm
from transformers import DynamicCache

import common
import dpo
import positions
import vlm


def prompt_inputs(model, processor, images, questions, template, pixel_transform=None, indices=None):
    """The model inputs of a batch of prompts, one image each: left-padded (generation appends on the right; for
    this call only, the processor is the caller's), one list of images per prompt (Gemma 3's and SmolVLM's
    processors take no flat list), the pixels transformed on each image's own pixels whatever the family's tensor
    layout (pixel_transform(pixels, indices)), on the model's device in its dtype."""
    prompts = [vlm.prompt_text(processor, question, template) for question in questions]
    inputs = processor(images=[[image] for image in images], text=prompts, padding=True, padding_side="left",
                       return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma's processor returns labels too: none on a prompt
    if pixel_transform is not None:
        inputs = vlm.with_image_pixels(inputs, model.config,
                                       pixel_transform(vlm.image_pixels(inputs, model.config), indices))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def generate(model, processor, images, questions, template=None, max_new_tokens=16, batch_size=8,
             pixel_transform=None, progress=False, prefill_batch=None):
    """Greedy-decode one answer per (image, question); returns the answers as strings.

    images: PIL images (already padded to square if wanted, see vlm.load_image).
    template: vlm.TEMPLATES; None: the model family's (LLaVA: llava_v1).
    pixel_transform(pixels, indices) -> pixels: applied to each batch's images, e.g. SeVa's diffusion noise;
        pixels is a list of each image's own tensor (vlm.image_pixels), `indices` their positions in `images`.
    prefill_batch: prompts per forward while the prompts are read (None: the whole batch at once); decoding
        still runs the whole batch. On a CPU a few rows at a time keep each layer's activations small: with 32
        LLaVA-shaped prompts (576 image tokens) read 4 at a time the pairs took 0.68x the time
        (bench/seva_pipeline.py --prefill-only). The families with vlm.FAMILIES prefill_rows.
    """
    return generate_tokens(model, processor, images, questions, template, max_new_tokens, batch_size,
                           pixel_transform, progress, prefill_batch=prefill_batch).answers


class Generation(NamedTuple):
    """What generate_tokens returns."""
    answers: list  # the answers as strings
    ids: list  # each answer's new token ids (int lists), up to and including its end-of-sequence token
    state: dict | None  # keep_state: what score_answers needs (prompt_state); else None


@torch.no_grad()
def generate_tokens(model, processor, images, questions, template=None, max_new_tokens=16, batch_size=8,
                    pixel_transform=None, progress=False, keep_state=False, prefill_batch=None):
    """generate's answers as a Generation(answers, ids, state): also each answer's new token ids (without the
    padding that batching adds after its end-of-sequence token), and with keep_state (all questions in one
    batch) what scoring answers on these prompts needs (seva.py --reference-logps): state = {cache: the KV
    cache, cut back to the prompts; attention_mask (B, P) of the left-padded prompts; input_ids (B, P);
    next_position (B,): the position an answer's first token takes (positions.next_positions); logits:
    the logits of each generation step, new tensors (B, V)}. The other arguments are generate's."""
    if keep_state and len(images) > batch_size:
        raise ValueError(f"keep_state needs one batch: {len(images)} questions > batch_size {batch_size}")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tokenizer = processor.tokenizer
    template = vlm.resolve_template(model, template)
    answers, answer_ids = [], []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(images))))
        inputs = prompt_inputs(model, processor, [images[i] for i in indices], [questions[i] for i in indices],
                               template, pixel_transform, indices)
        if prefill_batch and prefill_batch < len(indices):
            inputs = prefilled(model, inputs, prefill_batch)
        elif keep_state and positions.sliding_window(model):  # a cache of every position, which can be cut back
            inputs["cache"] = DynamicCache()  # (Gemma 3's own would keep its sliding-window layers' last tokens only)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                return_dict_in_generate=keep_state, output_logits=keep_state)
        state = None
        if keep_state:
            state = prompt_state(model, output, inputs)
            output = output.sequences
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # (B, new): generate returns prompt + answer
        answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        for row in new_tokens.tolist():  # rows that finished early are padded after their EOS
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            answer_ids.append(row[:end])
    return Generation(answers, answer_ids, state)


def prefilled(model, inputs, rows):
    """`inputs` for model.generate with the prompts' KV cache already computed, `rows` prompts at a time, for
    every prompt token but the last (generate computes that one and goes on): the pixels are then not needed.
    Positions as the model's own forward makes them (positions.row_positions). The cache keeps every position, also
    in sliding-window layers (Gemma 3's own would keep the window's last tokens only, which cannot be joined)."""
    if not vlm.spec(model.config)["prefill_rows"]:
        raise ValueError(f"prefill_batch: {model.config.model_type}'s prompts cannot be read apart from their last "
                         f"token (vlm.FAMILIES prefill_rows); generate them a whole batch at a time")
    config, prompts = model.config, len(inputs["input_ids"])
    row_positions = positions.row_positions(model, inputs)  # (B, P), or M-RoPE's (3, B, P)
    parts = []
    for start in range(0, prompts, rows):
        part = list(range(start, min(start + rows, prompts)))
        per_token = ("input_ids", "attention_mask") + tuple(vlm.TOKEN_KEYS)
        tokens = {k: v[part, :-1] for k, v in inputs.items() if k in per_token}  # every prompt token but the last
        parts.append(model(**tokens, **vlm.image_inputs(inputs, config, part), use_cache=True, logits_to_keep=1,
                           position_ids=row_positions[..., part, :-1], cache=DynamicCache()).cache)
    if hasattr(getattr(model, "model", None), "rope_deltas"):  # M-RoPE: the deltas kept from an earlier batch are
        model.model.rope_deltas = None  # not these prompts'; generate makes them again from the prompts
    cache = DynamicCache()
    for layer in range(len(parts[0].layers)):
        cache.update(torch.cat([p.layers[layer].keys for p in parts]),
                     torch.cat([p.layers[layer].values for p in parts]), layer)
    return dict({k: v for k, v in inputs.items() if k != "pixel_values"}, cache=cache)


def prompt_state(model, output, inputs):
    """generate_tokens(keep_state=True)'s state, from a return_dict_in_generate output with output_logits."""
    prompt = inputs["input_ids"].shape[1]
    cache = output.cache
    cache.crop(prompt - cache.get_seq_length())  # the answers' entries dropped: the prompts' remain
    return dict(cache=cache, attention_mask=inputs["attention_mask"], input_ids=inputs["input_ids"],
                next_position=positions.next_positions(model, inputs), logits=output.logits)  # logits: one (B, V) per step, as generate computed them


# ----------------------------------------------------------------------------- answers scored on the prompts
@torch.no_grad()
def score_answers(model, processor, state, images, questions, answers, answer_ids=None, template=None):
    """The model's log-probability of answers on the prompts that generate_tokens(keep_state=True) ran, each
    scored as training scores it (dpo.sequence_logps over vlm.encode's tokens and labels: the text as the
    processor tokenizes it, its end-of-turn token included). seva.py --reference-logps: the reference log-probs.

    answers[i]: the answers to score on prompt i (any number). answer_ids[i]: what generate_tokens returned as
    prompt i's ids; the first answer of prompt i whose training tokens equal them takes its logits from the
    generation itself, every other answer is teacher-forced in one batch that continues the prompts' KV cache
    (no prompt is computed again). The cache is used up (state["cache"] becomes None). Returns one list of
    floats per prompt, as `answers`."""
    template = vlm.resolve_template(model, template)
    device = state["attention_mask"].device
    steps = state["logits"]  # new tensors (B, V): step t's logits predict each answer's token t
    scores = [[None] * len(a) for a in answers]
    forced = []  # (prompt, answer position, tokens, labelled)
    for i, (image, question) in enumerate(zip(images, questions)):
        prompt_ids = state["input_ids"][i][state["attention_mask"][i].bool()]  # left padding off
        for j, answer in enumerate(answers[i]):
            example = vlm.encode(processor, image, [(question, answer)], template)
            start = int(dpo.prompt_length(example["labels"]))
            if not torch.equal(example["input_ids"][:start], prompt_ids.cpu()):
                raise ValueError(f"{question!r}: training's prompt tokens differ from generation's; score the "
                                 f"pairs in training instead (train_ddp.py --reference precomputed)")
            tokens, labelled = example["input_ids"][start:], example["labels"][start:] != -100
            generated = answer_ids is not None and j == 0 and tokens.tolist() == answer_ids[i] and labelled.all()
            if generated:  # the greedy answer as generated: the logits that predicted it are already known
                scores[i][j] = answer_logps(torch.stack([step[i] for step in steps[:len(tokens)]]), tokens, labelled)
            else:
                forced.append((i, j, tokens, labelled))
    if forced:
        rows = torch.tensor([i for i, _, _, _ in forced], device=device)
        length = max(len(t) for _, _, t, _ in forced)
        ids = torch.full((len(forced), length), processor.tokenizer.pad_token_id, device=device)
        mask = torch.zeros(len(forced), length, dtype=torch.long, device=device)
        for r, (_, _, tokens, _) in enumerate(forced):
            ids[r, :len(tokens)], mask[r, :len(tokens)] = tokens.to(device), 1
        cache, state["cache"] = state["cache"], None
        cache.batch_select_indices(rows)  # each forced answer continues its own prompt's cache
        prompt_mask = state["attention_mask"][rows]  # (R, P)
        after = state["next_position"][rows, None] + torch.arange(length, device=device)  # positions.next_positions
        # use_cache=False: the prompts' cache is read (each layer appends the answers to it to attend over both),
        # and nothing is kept for a next token
        logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], 1), position_ids=after,
                       cache=cache, use_cache=False).logits  # (R, A, V): token t + 1 from position t
        for r, (i, j, tokens, labelled) in enumerate(forced):
            # the prompt's last position (generation's first step) predicts the first token
            predicting = torch.cat([steps[0][i, None], logits[r, :len(tokens) - 1]])  # (n, V)
            scores[i][j] = answer_logps(predicting, tokens, labelled)
    return scores


def answer_logps(predicting, tokens, labelled):
    """dpo.sequence_logps of one answer: `predicting` (n, V) holds the logits that predict each of its n tokens
    (row t: token t); the labelled tokens count. sequence_logps pairs position t's logits with label t + 1, so
    the labels are shifted by one, and a last row (predicting nothing) is added."""
    labels = torch.full((len(tokens) + 1,), -100, device=predicting.device)  # (n + 1,)
    labels[1:] = tokens.to(predicting.device).masked_fill(~labelled.to(predicting.device), -100)
    logits = torch.cat([predicting, predicting[-1:]])  # (n + 1, V): the last row is never scored
    return float(dpo.sequence_logps(logits[None], labels[None])[0])


# ----------------------------------------------------------------------------- beam search (SHR's baseline)
@torch.no_grad()
def generate_beam(model, processor, images, questions, template=None, num_beams=5, max_new_tokens=512,
                  batch_size=8, length_penalty=1.0, pixel_transform=None, progress=False):
    """Beam-search one answer per (image, question), batched; returns the answers as strings. HA-DPO's SHR
    baseline was generated so (LLaVA-1.5 with 5 beams, 512 new tokens); generate() above stays greedy.

    The search is transformers' (beam_search below; tested token for token against model.generate with
    num_beams on a tiny model), the prompts batched and left-padded as generate() batches them."""
    row = vlm.spec(model.config)
    if not row["prefill_rows"] or row["positions"] != "1d" or row["attention"] != "causal":
        raise ValueError(f"generate_beam: {model.config.model_type}'s positions or attention are not the attention "
                         f"mask's (vlm.FAMILIES); use model.generate(num_beams=...) for this family")
    tokenizer = processor.tokenizer
    template = vlm.resolve_template(model, template)
    answers = []
    for start in tqdm(range(0, len(images), batch_size), desc="beam search", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(images))))
        inputs = prompt_inputs(model, processor, [images[i] for i in indices], [questions[i] for i in indices],
                               template, pixel_transform, indices)
        ids = beam_search(model, inputs, num_beams, max_new_tokens, tokenizer.eos_token_id, length_penalty)
        answers += [a.strip() for a in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return answers


def beam_search(model, inputs, num_beams, max_new_tokens, eos_token_id, length_penalty=1.0):
    """The best beam's new token ids (its end-of-sequence token included) for each left-padded prompt of
    `inputs`, searched as transformers' beam search (early_stopping False) searches:
    - each step, the 2K best continuations of the K running beams by summed log-probability (at the first step
      only beam 0's, the others starting at -1e9);
    - a continuation that ends (end-of-sequence, or the length limit) and ranks among the first K is a finished
      hypothesis, scored sum / length ** length_penalty (length: new tokens, the end token included); the K best
      finished ones are kept; the K best continuations that do not end run on;
    - a prompt stops taking finished hypotheses once it has K and its best running beam, normalised by the current
      length, no longer beats the worst of them; the search stops when every prompt has, or at the length limit.
    The prompts are read once and their KV cache repeated K times (transformers reads K copies)."""
    mask = inputs["attention_mask"]
    B, K, device = mask.shape[0], num_beams, mask.device
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate makes them from the left padding
    output = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = output.cache
    cache.batch_repeat_interleave(K)  # (B*K, ...): beam k of prompt b is row b*K + k
    mask = mask.repeat_interleave(K, 0)  # (B*K, P)
    logits = output.logits[:, -1].float().repeat_interleave(K, 0)  # (B*K, V)
    running = torch.zeros(B, K, max_new_tokens, dtype=torch.long, device=device)  # the running beams' tokens
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = -1e9  # only beam 0 at the first step: no K copies of one continuation
    finished = torch.zeros(B, K, max_new_tokens, dtype=torch.long, device=device)
    finished_scores = torch.full((B, K), -1e9, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    first_k = torch.arange(2 * K, device=device) < K  # (2K,): only these ranks may finish
    offsets = torch.arange(B, device=device)[:, None] * K  # (B, 1): a prompt's first row in the cache
    for t in range(max_new_tokens):
        logps = logits.log_softmax(-1).view(B, K, -1) + running_scores[..., None]  # (B, K, V)
        vocab = logps.shape[-1]
        scores, flat = logps.view(B, -1).topk(2 * K)  # (B, 2K): the best continuations of all beams
        origin, tokens = flat // vocab, flat % vocab  # (B, 2K): the beam continued, the token added
        sequences = running.gather(1, origin[..., None].expand(-1, -1, max_new_tokens)).clone()  # (B, 2K, N)
        sequences[:, :, t] = tokens
        ends = (tokens == eos_token_id) | (t + 1 == max_new_tokens)  # (B, 2K)
        # the K best continuations that do not end run on
        open_scores = scores + ends.float() * -1e9
        keep = open_scores.topk(K)[1]  # (B, K)
        running = sequences.gather(1, keep[..., None].expand(-1, -1, max_new_tokens))
        running_scores = open_scores.gather(1, keep)
        beam_origin = origin.gather(1, keep)  # (B, K): which old beam each new one continues
        # the K best finished hypotheses, old and new (a new one: ended, among the first K, prompt improvable)
        new = ends & first_k
        normalised = scores / (t + 1) ** length_penalty + (~new).float() * -1e9 + (~improvable).float() * -1e9
        merged = torch.cat([finished_scores, normalised], 1)  # (B, 3K)
        best = merged.topk(K)[1]  # (B, K)
        finished = torch.cat([finished, sequences], 1).gather(1, best[..., None].expand(-1, -1, max_new_tokens))
        finished_scores = merged.gather(1, best)
        lengths = torch.cat([finished_lengths, torch.full_like(tokens, t + 1)], 1)
        finished_lengths, is_finished = lengths.gather(1, best), torch.cat([is_finished, new], 1).gather(1, best)
        # can a running beam still beat the worst finished one? (transformers' heuristic, early_stopping False)
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], -1e9)  # (B, K)
        improvable = improvable & (running_scores[:, :1] / (t + 1) ** length_penalty > worst).any(-1, keepdim=True)
        if not improvable.any() or ends.all():
            break
        cache.reorder_cache((beam_origin + offsets).view(-1))  # each row's cache follows its beam
        mask = torch.cat([mask, mask.new_ones(B * K, 1)], 1)  # (B*K, P + t + 1)
        logits = model(input_ids=running[:, :, t].reshape(-1, 1), attention_mask=mask,
                       position_ids=mask.sum(-1, keepdim=True) - 1, cache=cache,
                       use_cache=True).logits[:, -1].float()  # (B*K, V)
    return [finished[b, 0, :finished_lengths[b, 0]].tolist() for b in range(B)]


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--model", default="toy/model-sft", help="local HF model folder")
    p.add_argument("--image", required=True, nargs="+", help="image file(s); one question is asked of each")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--template", choices=vlm.TEMPLATES,
                   help="prompt template (default: the family's; LLaVA-1.5: llava_v1, the authors'; others: chat)")
    p.add_argument("--no-pad", dest="pad", action="store_false",
                   help="no square padding with the CLIP mean colour (LLaVA-1.5 pads; other families never do)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (authors: 512)")
    p.add_argument("--batch-size", type=int, default=8, help="answers generated at once")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, processor = vlm.load(args.model)
    images = [vlm.load_image(path, pad=args.pad and vlm.pads_to_square(model)) for path in args.image]
    answers = generate(model, processor, images, [args.question] * len(images), args.template,
                       args.max_new_tokens, args.batch_size)
    for path, answer in zip(args.image, answers):
        print(f"{path}: {answer}")


if __name__ == "__main__":
    common.run_main(main, "generate.py")
