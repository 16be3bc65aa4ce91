"""
What differs between vision-language model (VLM) families, in one place.

Every other file asks this one how to load a model, how to write a prompt, how many image tokens an
image becomes, which linear layers get LoRA and where the vision tower is. Porting SeVa to a new
family means adding a row to FAMILIES (and, if its prompt is special, a branch in `render_turns`).

LLaVA-1.5 facts (REFERENCE.md): the vicuna_v1 template with its system prompt, `<image>` expanded by
the processor into (336/14)^2 = 576 tokens, the image padded to a square with the CLIP mean colour,
LoRA on every linear layer of the language model except lm_head.
"""
import os

import torch
from PIL import Image

# ----------------------------------------------------------------------------- the family table
# lora_targets: a regex over module names (`model.named_modules()`), matched in full.
# vision_tower / projector / decoder_layers: dotted module paths, for freezing and FSDP wrapping.
FAMILIES = {
    "llava": dict(
        lora_targets=r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        vision_tower="model.vision_tower",
        projector="model.multi_modal_projector",
        decoder_layers="model.language_model.layers",
        shared_prefix=True,  # its Llama takes a 4D attention mask: dpo.shared_prefix_forward can pack pairs
    ),
}

# The LLaVA-1.5 (vicuna_v1) conversation template, as in the authors' generation code.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CLIP_MEAN_RGB = (122, 116, 104)  # LLaVA pads images to a square with this colour
TEMPLATES = ("llava_v1", "chat")  # llava_v1: the authors' template; chat: the processor's chat template


def family_of(model_or_config):
    """The FAMILIES key of a model (or its config), or a clear error for a family not ported yet."""
    config = getattr(model_or_config, "config", model_or_config)
    name = config.model_type
    if name not in FAMILIES:
        raise ValueError(f"model type {name!r} is not in vlm.FAMILIES ({', '.join(FAMILIES)}); "
                         f"see README 'Porting to a new VLM'")
    return name


def get_module(model, dotted_path):
    return model.get_submodule(dotted_path)


def lora_targets(model):
    return FAMILIES[family_of(model)]["lora_targets"]


def freeze_vision(model, train_projector=False):
    """Freeze the vision tower (LLaVA/SeVa never train it); the projector too unless asked."""
    spec = FAMILIES[family_of(model)]
    for p in get_module(model, spec["vision_tower"]).parameters():
        p.requires_grad_(False)
    for p in get_module(model, spec["projector"]).parameters():
        p.requires_grad_(train_projector)


# ----------------------------------------------------------------------------- loading
def load(model_dir, device="cpu", dtype=torch.float32):
    """Load a local HF VLM folder (never a hub id) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    if not os.path.isdir(model_dir) or not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json). "
                                f"Build the toy world with `python toyworld.py` or pass a local HF folder.")
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    family_of(model)
    return model.to(device), processor


# ----------------------------------------------------------------------------- images
def pad_to_square(image, color=CLIP_MEAN_RGB):
    """LLaVA-1.5's `expand2square`: pad the short side, image centred."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(path, pad=True):
    """Open an image as RGB; a missing or corrupt file raises an error naming the file."""
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return pad_to_square(image) if pad else image


# ----------------------------------------------------------------------------- prompts
def render_turns(processor, turns, template):
    """A conversation as text pieces: [(text, is_answer), ...].

    turns: [(question, answer), ...]; the image goes before the first question; the last answer may be
    None (a generation prompt). Answer pieces end with the end-of-turn token, which is trained too.
    """
    eos = processor.tokenizer.eos_token
    pieces = []
    if template == "llava_v1":  # "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q} ASSISTANT:"
        for i, (question, answer) in enumerate(turns):
            user = f"{LLAVA_V1_SYSTEM} USER: <image>\n{question}" if i == 0 else f"USER: {question}"
            pieces.append((user + " ASSISTANT:", False))
            if answer is not None:
                pieces.append((f" {answer}{eos}", True))
    elif template == "chat":  # the processor's own chat template, rendered prefix by prefix
        messages, rendered = [], ""
        for i, (question, answer) in enumerate(turns):
            content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            pieces.append((prompt[len(rendered):], False))
            rendered = prompt
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
                full = processor.apply_chat_template(messages, tokenize=False).rstrip()
                full += "" if full.endswith(eos) else eos  # the answer's end-of-turn token is trained
                if not full.startswith(rendered):
                    raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
                pieces.append((full[len(rendered):], True))
                rendered = full
    else:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    return pieces


def prompt_text(processor, question, template):
    """The generation prompt for one question on one image."""
    return "".join(text for text, _ in render_turns(processor, [(question, None)], template))


# ----------------------------------------------------------------------------- tokenizing
def encode(processor, image, turns, template):
    """Tokenize a conversation on one image for training.

    Returns input_ids (T,), labels (T,) with -100 everywhere but the answers and their end-of-turn
    tokens, and the processor's image tensors (pixel_values, ...). The image placeholder is expanded
    by the processor, so the number of image tokens is always the one the model expects.
    """
    tokenizer = processor.tokenizer
    pieces = render_turns(processor, turns, template)
    # Tokenize growing prefixes so each piece's tokens are exactly those the full text gives it.
    text, ids, labels = "", [], []
    for piece, is_answer in pieces:
        text += piece
        new = tokenizer(text).input_ids
        if new[:len(ids)] != ids:
            raise ValueError(f"tokenizing {piece!r} changed the tokens before it; the template must "
                             f"split the conversation at token boundaries")
        added = new[len(ids):]
        ids = new
        labels += added if is_answer else [-100] * len(added)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    expanded = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    labels = expand_labels(processor, ids, labels, expanded)
    return dict(input_ids=expanded, labels=labels, **inputs)


def sequence_length(processor, turns, template, image_tokens):
    """Tokens of a conversation once its image placeholder becomes `image_tokens` tokens, without
    touching the image: cheap enough to check every example's length before training. (LLaVA-1.5 gives
    every image the same count; a family with per-image counts is checked again when encoded.)"""
    ids = processor.tokenizer("".join(text for text, _ in render_turns(processor, turns, template))).input_ids
    return len(ids) + ids.count(image_token_id(processor)) * (image_tokens - 1)


def image_token_id(processor):
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def expand_labels(processor, ids, labels, expanded):
    """Labels for the processor's ids, in which each image placeholder became a run of image tokens
    (never trained: -100). Anything else differing from the tokenizer's ids is an error."""
    image_id = image_token_id(processor)
    expanded = expanded.tolist()
    out, pos = [], 0
    for tok, label in zip(ids, labels):
        if tok == image_id:
            start = pos
            while pos < len(expanded) and expanded[pos] == image_id:
                pos += 1
            out += [-100] * (pos - start)
        elif pos < len(expanded) and expanded[pos] == tok:
            out.append(label)
            pos += 1
        else:
            raise ValueError("the processor's ids differ from the tokenizer's by more than image tokens")
    if pos != len(expanded):
        raise ValueError("the processor's ids differ from the tokenizer's by more than image tokens")
    return torch.tensor(out)


def count_image_tokens(input_ids, processor):
    return int((torch.as_tensor(input_ids) == image_token_id(processor)).sum())
