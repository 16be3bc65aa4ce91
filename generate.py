"""
Batched greedy answers from a local HF vision-language model: Alg. 1 line 2 runs through here.

The authors generated one answer at a time; we batch with left padding and the KV cache, and test that
the batched answers equal batch-size-1 answers token for token. seva.py and eval/ call `generate`.

    python generate.py --model toy/model-sft --image toy/images/coco/000000.png --question "Describe the image in detail."
"""
import argparse

import torch
from tqdm import tqdm
from transformers import DynamicCache

import common
import dpo
import positions
import vlm


@torch.no_grad()
def generate(model, processor, images, questions, template=None, max_new_tokens=16, batch_size=8,
             pixel_transform=None, progress=False, return_ids=False, return_state=False, prefill_batch=None):
    """Greedy-decode one answer per (image, question); returns the answers as strings.

    images: PIL images (already padded to square if wanted, see vlm.load_image).
    template: vlm.TEMPLATES; None: the model family's (LLaVA: llava_v1).
    pixel_transform(pixels, indices) -> pixels: applied to each batch's images, e.g. SeVa's diffusion noise;
        pixels is a list of each image's own tensor (vlm.image_pixels), `indices` their positions in `images`.
    return_ids: also return each answer's new token ids (a list of int lists, up to and including the
        end-of-sequence token, without the padding that batching adds after it): (answers, ids).
    return_state: all questions in one batch, and also what scoring answers on these prompts needs (seva.py
        --reference-logps): (answers, ids, state), state = {cache: the KV cache, cut back to the prompts;
        attention_mask (B, P) of the left-padded prompts; input_ids (B, P); next_position (B,): the position an
        answer's first token takes (positions.next_positions); first_logps (B, V): the log-probs of
        every answer's first token; token_logps (B, new): those of each generated token}.
    prefill_batch: prompts per forward while the prompts are read (None: the whole batch at once); decoding
        still runs the whole batch. On a CPU a few rows at a time keep each layer's activations small: with 32
        LLaVA-shaped prompts (576 image tokens) read 4 at a time the pairs took 0.68x the time
        (bench/seva_pipeline.py --prefill-only). The families with vlm.FAMILIES prefill_rows.
    """
    if return_state and len(images) > batch_size:
        raise ValueError(f"return_state needs one batch: {len(images)} questions > batch_size {batch_size}")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    template = vlm.resolve_template(model, template)
    answers, answer_ids = [], []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(images))))
        prompts = [vlm.prompt_text(processor, questions[i], template) for i in indices]
        # generation appends on the right, so pad on the left (for this call only: the processor is the caller's)
        # one list of images per prompt (Gemma 3's and SmolVLM's processors take no flat list)
        inputs = processor(images=[[images[i]] for i in indices], text=prompts, padding=True, padding_side="left",
                           return_tensors="pt")
        inputs.pop("labels", None)  # PaliGemma's processor returns labels too: none on a prompt
        if pixel_transform is not None:  # on each image's own pixels, whatever the family's tensor layout
            inputs = vlm.with_image_pixels(inputs, model.config,
                                           pixel_transform(vlm.image_pixels(inputs, model.config), indices))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        if prefill_batch and prefill_batch < len(indices):
            inputs = prefilled(model, inputs, prefill_batch)
        elif return_state and positions.sliding_window(model):  # a cache of every position, which can be cut back
            inputs["cache"] = DynamicCache()  # (Gemma 3's own would keep its sliding-window layers' last tokens only)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                return_dict_in_generate=return_state, output_logits=return_state)
        if return_state:
            state = prompt_state(model, output, inputs)
            output = output.sequences
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # (B, new): generate returns prompt + answer
        answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if return_ids or return_state:
            for row in new_tokens.tolist():  # rows that finished early are padded after their EOS
                end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                answer_ids.append(row[:end])
    if return_state:
        return answers, answer_ids, state
    return (answers, answer_ids) if return_ids else answers


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
    """generate(return_state=True)'s state, from a return_dict_in_generate output with output_logits."""
    prompt = inputs["input_ids"].shape[1]
    cache = output.cache
    cache.crop(prompt - cache.get_seq_length())  # the answers' entries dropped: the prompts' remain
    new_tokens = output.sequences[:, prompt:]  # (B, new)
    token_logps = torch.stack([step.float().log_softmax(-1).gather(-1, new_tokens[:, t, None])[:, 0]
                               for t, step in enumerate(output.logits)], 1)  # (B, new), one step at a time
    return dict(cache=cache, attention_mask=inputs["attention_mask"], input_ids=inputs["input_ids"],
                next_position=positions.next_positions(model, inputs),
                first_logps=output.logits[0].float().log_softmax(-1), token_logps=token_logps)


# ----------------------------------------------------------------------------- answers scored on the prompts
@torch.no_grad()
def score_answers(model, processor, state, images, questions, answers, answer_ids=None, template=None):
    """The model's log-probability of answers on the prompts that generate(return_state=True) ran, each scored
    as training scores it (dpo.sequence_logps over vlm.encode's tokens and labels: the text as the processor
    tokenizes it, its end-of-turn token included). seva.py --reference-logps: the reference log-probs.

    answers[i]: the answers to score on prompt i (any number). answer_ids[i]: what generate returned as prompt
    i's ids; the first answer of prompt i whose training tokens equal them takes its log-probs from the
    generation itself, every other answer is teacher-forced in one batch that continues the prompts' KV cache
    (no prompt is computed again). The cache is used up (state["cache"] becomes None). Returns one list of
    floats per prompt, as `answers`."""
    template = vlm.resolve_template(model, template)
    device = state["attention_mask"].device
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
            if generated:  # the greedy answer as generated: its log-probs are already known
                scores[i][j] = float(state["token_logps"][i, :len(tokens)].sum())
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
        logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], 1), position_ids=after,
                       cache=cache, use_cache=True).logits  # (R, A, V): token t + 1 from position t
        for r, (i, j, tokens, labelled) in enumerate(forced):
            first = state["first_logps"][i, tokens[0]]  # the prompt's last position predicts the first token
            rest = logits[r, :len(tokens) - 1].float().log_softmax(-1).gather(-1, ids[r, 1:len(tokens), None])[:, 0]
            scores[i][j] = float((torch.cat([first[None], rest]) * labelled.to(device)).sum())
    return scores


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
