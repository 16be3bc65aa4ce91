"""
Batched greedy answers from a local HF vision-language model: Alg. 1 line 2 runs through here.

The authors generated one answer at a time; we batch with left padding and the KV cache, and test that
the batched answers equal batch-size-1 answers token for token. seva.py and eval/ call `generate`.

    python generate.py --model toy/model-sft --image toy/images/coco/000000.png --question "Describe the image in detail."
"""
import argparse

import torch
from tqdm import tqdm

import common
import vlm


@torch.no_grad()
def generate(model, processor, images, questions, template=None, max_new_tokens=16, batch_size=8,
             pixel_transform=None, progress=False, return_ids=False):
    """Greedy-decode one answer per (image, question); returns the answers as strings.

    images: PIL images (already padded to square if wanted, see vlm.load_image).
    template: vlm.TEMPLATES; None: the model family's (LLaVA: llava_v1).
    pixel_transform(pixels, indices) -> pixels: applied to each batch's images, e.g. SeVa's diffusion noise;
        pixels is a list of each image's own tensor (vlm.image_pixels), `indices` their positions in `images`.
    return_ids: also return each answer's new token ids (a list of int lists, up to and including the
        end-of-sequence token, without the padding that batching adds after it): (answers, ids).
    """
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
        inputs = processor(images=[images[i] for i in indices], text=prompts, padding=True, padding_side="left",
                           return_tensors="pt")
        inputs.pop("labels", None)  # PaliGemma's processor returns labels too: none on a prompt
        if pixel_transform is not None:  # on each image's own pixels, whatever the family's tensor layout
            inputs = vlm.with_image_pixels(inputs, model.config,
                                           pixel_transform(vlm.image_pixels(inputs, model.config), indices))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # (B, new): generate returns prompt + answer
        answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if return_ids:
            for row in new_tokens.tolist():  # rows that finished early are padded after their EOS
                end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                answer_ids.append(row[:end])
    return (answers, answer_ids) if return_ids else answers


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
