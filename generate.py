"""
Batched greedy answers from a local HF vision-language model: Alg. 1 line 2 runs through here.

The authors generated one answer at a time; we batch with left padding and the KV cache, and test that
the batched answers equal batch-size-1 answers token for token. seva.py and eval/ call `generate`.

    python generate.py --model toy/model-sft --image toy/images/000000.png --question "What color is the star?"
"""
import argparse

import torch
from tqdm import tqdm

import vlm


@torch.no_grad()
def generate(model, processor, images, questions, template="llava_v1", max_new_tokens=16, batch_size=8,
             pixel_transform=None, progress=False):
    """Greedy-decode one answer per (image, question); returns the answers as strings.

    images: PIL images (already padded to square if wanted, see vlm.load_image).
    pixel_transform(pixel_values, indices) -> pixel_values: applied to each batch's image tensor, e.g.
        SeVa's diffusion noise; `indices` are the positions of the batch's rows in `images`.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    device = next(model.parameters()).device
    answers = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(images))))
        prompts = [vlm.prompt_text(processor, questions[i], template) for i in indices]
        inputs = processor(images=[images[i] for i in indices], text=prompts, padding=True, return_tensors="pt")
        if pixel_transform is not None:
            inputs["pixel_values"] = pixel_transform(inputs["pixel_values"], indices)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # (B, new): generate returns prompt + answer
        answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers
