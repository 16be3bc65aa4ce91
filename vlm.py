"""
What differs between vision-language model (VLM) families, in one place.

Every other file asks this one how to load a model, how to write a prompt, how an image becomes model
inputs, which linear layers get LoRA and where the vision tower is. Porting SeVa to a new family means
adding a row to FAMILIES (docs/porting.md); the prompt comes from the processor's chat
template, and the processor expands the image into the family's own image tokens.

LLaVA-1.5 (the authors' code, llava-hf/llava-1.5-7b-hf): the vicuna_v1 template with its system prompt,
`<image>` expanded by the processor into (336/14)^2 = 576 tokens, the image padded to a square with the CLIP
mean colour, LoRA on every linear layer of the language model except lm_head.
"""
import os

import torch
from PIL import Image

import common

# ----------------------------------------------------------------------------- the family table
# The key is the model's config.model_type.
# lora_targets: a regex over module names (`model.named_modules()`), matched in full: the language
#     model's attention and MLP linear layers, never the vision tower, the projector or lm_head.
# vision_tower / projector / decoder_layers: dotted module paths, for freezing and FSDP wrapping.
# fixed_image_tokens: every image becomes the same number of tokens (LLaVA-1.5: 576), so one image tells
#     every example's length; else (any-resolution families) each image is measured before training.
# template: the default prompt template (TEMPLATES). pad_to_square: LLaVA-1.5's expand2square.
# pixels: the layout of the processor's pixel_values (see `image_pixels`): "image" = dim 0 is the image
#     (B, C, H, W) or (B, crops, C, H, W); "patches" = Qwen2-VL's flattened patches (sum of patches,
#     C x T x P x P), each patch repeated over T frames, image_grid_thw telling which rows are whose; "tiles" =
#     InternVL's tiles of every image along dim 0 (sum of tiles, C, H, W), the image's tokens telling how many.
# pair_forwards: the dpo.PAIR_FORWARDS the family was tested with; others fall back to "concatenated".
#     shared_image needs get_image_features + mm_encoder_outputs as LLaVA's; shared_prefix needs a decoder that
#     takes a 4D attention mask and position ids as `positions` makes them; packed (several pairs in one row) also
#     needs each image to fill the image tokens of its own pair, in order. No shared_image for M-RoPE (its
#     positions need image_grid_thw, which a forward on encoder outputs lacks), InternVL's tiles, PaliGemma and
#     Gemma 3 (their get_image_features return no per-image list): their shared_prefix runs the tower once too.
# positions: "1d" (first_position, + 1, + 2, ... along the row: PaliGemma counts from 1) or "mrope" (Qwen2-VL's 3D
#     positions: the model's get_rope_index). An answer scored on a prompt's cache continues them exactly.
# attention: "causal"; "prefix" (PaliGemma: the prompt, token_type_ids 0, attended both ways); "image_blocks"
#     (Gemma 3: each image's tokens, token_type_ids 1, attended both ways). positions.attention_blocks.
# prefill_rows: generate.py can read the prompts a few rows at a time (prefill_batch) and decode them together:
#     every prompt token but the last is computed apart (not PaliGemma's prefix-LM attention, where the prompt's
#     last token is seen by those before it).
_LLAMA_LINEARS = r"\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_ALL = ("concatenated", "shared_image", "shared_prefix", "packed")
FAMILIES = {
    "llava": dict(  # LLaVA-1.5
        lora_targets=r"model\.language_model" + _LLAMA_LINEARS,
        vision_tower="model.vision_tower", projector="model.multi_modal_projector",
        decoder_layers="model.language_model.layers",
        fixed_image_tokens=True, template="llava_v1", pad_to_square=True, pixels="image",
        pair_forwards=_ALL, positions="1d", first_position=0, attention="causal", prefill_rows=True,
    ),
}
FAMILIES["llava_next"] = dict(  # LLaVA-NeXT (1.6): any-resolution crops, image_sizes, image_newline
    FAMILIES["llava"], fixed_image_tokens=False, template="chat", pad_to_square=False)
FAMILIES["llava_onevision"] = dict(FAMILIES["llava_next"])  # LLaVA-OneVision: SigLIP, NeXT's crops, Qwen2
FAMILIES["internvl"] = dict(  # InternVL 3: InternViT, pixel shuffle, Qwen2; tiles of every image along dim 0
    FAMILIES["llava_next"], pixels="tiles", pair_forwards=("concatenated", "shared_prefix", "packed"))
FAMILIES["qwen2_vl"] = dict(  # Qwen2-VL: its own ViT with a patch merger; 3D (M-RoPE) positions
    FAMILIES["llava_next"], vision_tower="model.visual", projector="model.visual.merger", pixels="patches",
    pair_forwards=("concatenated", "shared_prefix", "packed"), positions="mrope")
FAMILIES["qwen2_5_vl"] = dict(FAMILIES["qwen2_vl"])  # Qwen2.5-VL: windowed ViT, same layout (no tiny test model)
FAMILIES["qwen3_vl"] = dict(FAMILIES["qwen2_vl"])  # Qwen3-VL: interleaved M-RoPE, DeepStack features
FAMILIES["idefics3"] = dict(  # Idefics3: SigLIP, pixel-shuffle connector, Llama text model
    FAMILIES["llava_next"], lora_targets=r"model\.text_model" + _LLAMA_LINEARS, vision_tower="model.vision_model",
    projector="model.connector", decoder_layers="model.text_model.layers")
FAMILIES["smolvlm"] = dict(FAMILIES["idefics3"])  # SmolVLM: Idefics3's layout, its own processor
FAMILIES["paligemma"] = dict(  # PaliGemma: SigLIP + Gemma, prefix-LM attention (token_type_ids)
    FAMILIES["llava"], template="chat", pad_to_square=False, pair_forwards=("concatenated", "shared_prefix", "packed"),
    first_position=1, attention="prefix", prefill_rows=False)
FAMILIES["gemma3"] = dict(  # Gemma 3: SigLIP pooled, image tokens attended both ways, sliding-window layers
    FAMILIES["llava"], template="chat", pad_to_square=False, pair_forwards=("concatenated", "shared_prefix", "packed"),
    attention="image_blocks")

# The LLaVA-1.5 (vicuna_v1) conversation template, as in the authors' generation code.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SINGLE_WORD = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalization, as LLaVA-1.5's processor has it
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN_RGB = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104): LLaVA's expand2square colour
# llava_v1: the authors' template; chat: the processor's chat template; plain: LLaVA's stage-1 (feature alignment)
# format, "<image>{caption}\n", the question dropped and no system prompt (the authors' conv_llava_plain).
TEMPLATES = ("llava_v1", "chat", "plain")


def family_of(model_or_config):
    """The FAMILIES key of a model (or its config), or a clear error for a family not ported yet."""
    config = getattr(model_or_config, "config", model_or_config)
    name = config.model_type
    if name not in FAMILIES:
        raise ValueError(f"model type {name!r} is not in vlm.FAMILIES ({', '.join(FAMILIES)}); "
                         f"see docs/porting.md")
    return name


def spec(model_or_config):
    """The model's row of FAMILIES."""
    return FAMILIES[family_of(model_or_config)]


def lora_targets(model):
    return spec(model)["lora_targets"]


def resolve_template(model, template=None):
    """The prompt template to use: the one asked for, else the family's; llava_v1 is LLaVA's alone."""
    template = template or spec(model)["template"]
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    if template in ("llava_v1", "plain") and family_of(model) != "llava":
        raise ValueError(f"the {template} template is LLaVA-1.5's; a {family_of(model)} model takes --template chat")
    return template


def pads_to_square(model):
    return spec(model)["pad_to_square"]


def unwrap(model):
    """The model inside a DDP wrapper (FSDP2 keeps the model itself)."""
    return getattr(model, "module", model)


def pair_forward_problem(model, name):
    """Why pair forward `name` (dpo.PAIR_FORWARDS) cannot run on this model, or None: its family was not
    tested with it (pair_forwards above), or, for shared_prefix, its attention takes no 4D mask."""
    model = unwrap(model)
    if name not in spec(model)["pair_forwards"]:
        return f"the {family_of(model)} family has no {name} in vlm.FAMILIES' pair_forwards"
    attention = model.config.get_text_config()._attn_implementation
    if name in ("shared_prefix", "packed") and attention not in ("sdpa", "eager"):
        return f"attention {attention!r} takes no 4D mask"  # flash, flex
    return None


def disable_dropout(model):
    """Every dropout off (SeVa's DPO): the nn.Dropout modules, and the rates attention layers read from their
    config on every call (Llama's attention_dropout, CLIP's dropout; their names differ per family), which no
    nn.Dropout holds."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    configs = [model.config] + [getattr(model.config, key) for key in ("text_config", "vision_config")
                                if hasattr(model.config, key)]
    for config in configs:  # and in the config, for whatever reads it later (and the saved config.json)
        for name, value in vars(config).items():
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, 0.0)


def freeze_vision(model, train_projector=False):
    """Freeze the vision tower (LLaVA/SeVa never train it); the projector too unless asked."""
    row = spec(model)
    for p in model.get_submodule(row["vision_tower"]).parameters():
        p.requires_grad_(False)
    for p in model.get_submodule(row["projector"]).parameters():
        p.requires_grad_(train_projector)


def unfreeze_vision(model):
    """Train the vision tower too (the toy world's SFT: its small CLIP stands in for a far stronger pretrained
    one). The layers after the one LLaVA reads (vision_feature_layer -2: the last layer and post_layernorm) get
    no gradient and stay frozen, so DDP finds no unused parameter."""
    tower = model.get_submodule(spec(model)["vision_tower"])
    for p in tower.parameters():
        p.requires_grad_(True)
    layer = getattr(model.config, "vision_feature_layer", None)
    if isinstance(layer, int) and layer < 0 and hasattr(tower, "vision_model"):
        for unused in list(tower.vision_model.encoder.layers)[len(tower.vision_model.encoder.layers) + layer + 1:]:
            unused.requires_grad_(False)
        tower.vision_model.post_layernorm.requires_grad_(False)


# ----------------------------------------------------------------------------- loading
def load(model_dir, device="cpu", dtype=torch.float32):
    """Load a local HF VLM folder (never a hub id) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    if not os.path.isdir(model_dir) or not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json). "
                                f"Build the toy world with `python -m toyworld` or pass a local HF folder.")
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
    """Open an image as 8-bit RGB through its real mode (common.to_rgb: 16-bit scaled, transparency on white);
    a missing or corrupt file raises an error naming the file."""
    try:
        with Image.open(path) as img:
            image = common.to_rgb(img)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return pad_to_square(image) if pad else image


# Per-token tensors some processors return beside input_ids, and their value on the tokens after the prompt
# (answers, padding): PaliGemma's token_type_ids (0: the prefix, attended both ways; 1: the suffix), Gemma 3's
# (1 on image tokens, attended both ways) and Qwen2-VL's mm_token_type_ids (1 on image tokens).
TOKEN_KEYS = {"token_type_ids": 0, "mm_token_type_ids": 0}
SUFFIX_TOKEN_TYPE = {"PaliGemmaProcessor": {"token_type_ids": 1}}  # processors whose value after the prompt is not 0


def after_prompt(processor, key):
    """The value of per-token tensor `key` (TOKEN_KEYS) on the tokens after the prompt, for this processor."""
    return SUFFIX_TOKEN_TYPE.get(type(processor).__name__, {}).get(key, TOKEN_KEYS[key])


# ----------------------------------------------------------------------------- image tensors
def image_rows(inputs, config):
    """How many rows of pixel_values each image has: "image" layout 1 (dim 0 is the image); "patches" (Qwen2-VL)
    its patches, from image_grid_thw; "tiles" (InternVL) its tiles, from its image tokens (one image a row)."""
    pixel_values, layout = inputs["pixel_values"], spec(config)["pixels"]
    if layout == "image":
        return [1] * len(pixel_values)
    if layout == "patches":
        return inputs["image_grid_thw"].prod(-1).tolist()
    vision = config.vision_config
    per_tile = int((vision.image_size[0] // vision.patch_size[0]) ** 2 * config.downsample_ratio ** 2)
    return ((inputs["input_ids"] == config.image_token_id).sum(-1) // per_tile).tolist()


def image_inputs(inputs, config, images):
    """The image tensors (pixel_values and whatever else is per image: image_grid_thw, image_sizes, ...) of the
    images numbered `images` (a list), in that order; `inputs` holds one image a row, input_ids included."""
    rows = image_rows(inputs, config)
    per_image = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels", "attention_mask", "pair_index")
                 and k not in TOKEN_KEYS and not k.startswith("reference_")}
    pixels = per_image.pop("pixel_values").split(rows)
    return dict({k: v[images] for k, v in per_image.items()}, pixel_values=torch.cat([pixels[i] for i in images]))


def image_pixels(inputs, config):
    """Each image's own pixels from a processor's output: a list, one tensor per image, each pixel once, for
    transforms such as SeVa's diffusion noise. "image" layout: pixel_values[i] ((C, H, W), or (crops, C, H, W)
    for LLaVA-NeXT and Idefics3); "tiles": image i's tiles (tiles, C, H, W); "patches" layout (Qwen2-VL): image i's
    rows of pixel_values, first of its T identical frames, (patches, C, P x P)."""
    pixel_values, layout = inputs["pixel_values"], spec(config)["pixels"]
    if layout == "image":
        return list(pixel_values)
    if layout == "tiles":
        return list(pixel_values.split(image_rows(inputs, config)))
    vision = config.vision_config
    frames = pixel_values.view(pixel_values.shape[0], vision.in_channels, vision.temporal_patch_size, -1)
    return [rows[:, :, 0] for rows in frames.split(image_rows(inputs, config))]


def with_image_pixels(inputs, config, pixels):
    """`inputs` with pixel_values rebuilt from `image_pixels`' list (the inverse of image_pixels). Crops that
    were all zeros stay so: they pad a batch's images to the same number of crops, and Idefics3 tells them
    from real crops by their zeros."""
    layout = spec(config)["pixels"]
    if layout == "image":
        new = torch.stack(pixels)
        if new.dim() == 5:  # (B, crops, C, H, W)
            new[(inputs["pixel_values"] == 0).flatten(2).all(-1)] = 0
        return dict(inputs, pixel_values=new)
    if layout == "tiles":
        return dict(inputs, pixel_values=torch.cat(pixels))
    frames = config.vision_config.temporal_patch_size
    rows = [p[:, :, None].expand(-1, -1, frames, -1).reshape(p.shape[0], -1) for p in pixels]
    return dict(inputs, pixel_values=torch.cat(rows))


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
    elif template == "plain":  # "<image>{a}\n": one turn, its question replaced by the image, as LLaVA's stage 1
        if len(turns) != 1:
            raise ValueError(f"the plain template takes one turn (an image and its caption), got {len(turns)}")
        pieces.append(("<image>", False))
        if turns[0][1] is not None:
            pieces.append((f"{turns[0][1]}\n", True))
    elif template == "chat":  # the processor's own chat template, rendered prefix by prefix
        messages, rendered, held = [], "", ""  # rendered: the template's text so far
        for i, (question, answer) in enumerate(turns):
            content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            pieces.append((held + continuation(rendered, prompt), False))
            rendered = prompt
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
                full = processor.apply_chat_template(messages, tokenize=False)
                text = continuation(rendered, full).rstrip()
                held = continuation(rendered, full)[len(text):]  # whitespace after the turn: the next prompt's
                pieces.append((text + ("" if text.endswith(eos) else eos), True))  # its end-of-turn token is trained
                rendered = full
    else:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    return pieces


def continuation(before, after):
    if not after.startswith(before):
        raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
    return after[len(before):]


def prompt_text(processor, question, template):
    """The generation prompt for one question on one image."""
    return "".join(text for text, _ in render_turns(processor, [(question, None)], template))


# ----------------------------------------------------------------------------- tokenizing
def encode(processor, image, turns, template, processed=None):
    """Tokenize a conversation on one image for training.

    Returns input_ids (T,), labels (T,) with -100 everywhere but the answers and their end-of-turn
    tokens, the processor's image tensors (pixel_values, ...) and its per-token tensors (TOKEN_KEYS), (T,).

    The first piece, the prompt that holds the image, goes through the processor exactly as generate.py
    sends it, so its image tokens (and whatever the family adds around them) are those the model
    expects; the rest of the conversation follows as the tokenizer splits the whole text.

    processed: a dict shared by the calls on one image (a pair's chosen and rejected answers): the processor's
    output for each prompt, kept there, so that the image is processed once; the examples then share its tensors.
    """
    tokenizer = processor.tokenizer
    pieces = render_turns(processor, turns, template)
    # Tokenize growing prefixes so each piece's tokens are exactly those the full text gives it.
    text, ids, labels = "", [], []
    for k, (piece, is_answer) in enumerate(pieces):
        text += piece
        new = tokenizer(text).input_ids
        if new[:len(ids)] != ids:
            raise ValueError(f"tokenizing {piece!r} changed the tokens before it; the template must "
                             f"split the conversation at token boundaries")
        added = new[len(ids):]
        ids = new
        labels += added if is_answer else [-100] * len(added)
        if k == 0:
            prompt_tokens = len(ids)  # the first piece's tokens: the processor gives the model's own for them
    processed = {} if processed is None else processed
    if pieces[0][0] not in processed:
        processed[pieces[0][0]] = dict(processor(images=[image], text=[pieces[0][0]], return_tensors="pt"))
    inputs = dict(processed[pieces[0][0]])  # a copy: the keys are popped below
    prompt_ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    inputs.pop("labels", None)  # PaliGemma's processor returns labels too: none on a prompt
    rest = torch.tensor(ids[prompt_tokens:], dtype=torch.long)
    example = dict(input_ids=torch.cat([prompt_ids, rest]),
                   labels=torch.tensor([-100] * len(prompt_ids) + labels[prompt_tokens:]))
    for key in TOKEN_KEYS:
        if key in inputs:
            example[key] = torch.cat([inputs.pop(key)[0], torch.full_like(rest, after_prompt(processor, key))])
    return dict(example, **inputs)


def image_extra_tokens(processor, example, turns, template):
    """How many more tokens `encode` gave `example` than the tokenizer gives its text: the image's tokens
    (LLaVA-1.5: 576 - 1 placeholder) and whatever the family's processor adds around them."""
    text = "".join(piece for piece, _ in render_turns(processor, turns, template))
    return len(example["input_ids"]) - len(processor.tokenizer(text).input_ids)


def sequence_length(processor, turns, template, extra_tokens):
    """Tokens of a conversation whose image adds `extra_tokens` (image_extra_tokens), without touching
    the image: cheap enough to check every example's length before training. Exact where every image
    has the same size (LLaVA-1.5 always; the toy world); train_ddp.py checks each encoded example again."""
    return len(processor.tokenizer("".join(text for text, _ in render_turns(processor, turns, template))).input_ids) \
        + extra_tokens

