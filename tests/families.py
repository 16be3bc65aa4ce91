"""
Tiny random vision-language models of ten Hugging Face families, built offline from configs.

`build(family, out_dir)` saves an ordinary local HF folder (config, weights, generation config, tokenizer,
image processor, processor config, chat template) that `AutoModelForImageTextToText.from_pretrained(out_dir)`
and `AutoProcessor.from_pretrained(out_dir)` load with `local_files_only=True`. Each model is random, of one or two
layers of width 32 (under 100k parameters, most of them the embeddings); each tokenizer is a small byte-level BPE
trained on a built-in corpus, with the family's special tokens as single tokens and a chat template in the family's
own style whose end-of-turn token is the tokenizer's eos_token and the generation config's eos_token_id.

Image processors are the PIL backends (torchvision is not installed here). Six processors also want a video
processor, which transformers only provides with torchvision: see tests/no_torchvision.py. SmolVLM's processor
needs the num2words package (requirements.txt).
"""
import os

import numpy as np
import torch
from PIL import Image

import no_torchvision  # noqa: F401  (lets the processors load without torchvision)
from family_text import (  # noqa: F401  (CORPUS: the tokenizers' text, for readers of this module)
    CORPUS, LLAVA_TEMPLATE, QWEN2_VL_TEMPLATE, IDEFICS3_TEMPLATE, PALIGEMMA_TEMPLATE,
    GEMMA3_TEMPLATE, INTERNVL_TEMPLATE, ONEVISION_TEMPLATE, train_tokenizer, check_tokenizer, check_template)

FAMILY_NAMES = ["llava", "llava_next", "qwen2_vl", "idefics3", "paligemma", "qwen3_vl", "gemma3", "internvl",
                "llava_onevision", "smolvlm"]

IMAGE_SIZE = 32  # the vision towers' input size
PATCH_SIZE = 8  # 32 px -> 4 x 4 patches
WIDTH = 32  # hidden size of the towers and language models


# ----------------------------------------------------------------------------- the families
def _llama(tokenizer, layers=2):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
                       max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _clip():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                            projection_dim=WIDTH)


def _llava(family):
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor)
    from transformers.models.llava import LlavaImageProcessorPil
    from transformers.models.llava_next import LlavaNextImageProcessorPil
    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>",
                                pad="<pad>", unk="<unk>", add_bos=True, extra={"image_token": "<image>"})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    common = dict(vision_config=_clip(), text_config=_llama(tokenizer), image_token_index=image_token,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    # num_additional_image_tokens=1: CLIP's CLS token, which the "default" strategy drops.
    processor_kwargs = dict(tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    if family == "llava":
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = LlavaProcessor(image_processor=image_processor, **processor_kwargs)
        config = LlavaConfig(image_seq_length=patches, **common)
        return processor, LlavaForConditionalGeneration, config
    # LLaVA-NeXT: any-resolution crops of 32 px on a small grid, plus the whole image resized to 32 px.
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, **processor_kwargs)
    config = LlavaNextConfig(image_grid_pinpoints=pinpoints, image_seq_length=patches, **common)
    return processor, LlavaNextForConditionalGeneration, config


def _qwen2_vl(family):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    # Like Qwen's: no bos added; eos is the end of a turn, pad the end of text.
    tokenizer = train_tokenizer(specials, eos="<|im_end|>", pad="<|endoftext|>",
                                extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    merge = 2
    # Patches of 8 px merged 2 x 2: a 32 x 32 image is 4 x 4 patches, 4 tokens; 64 x 64, 16 tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=(PATCH_SIZE * merge) ** 2, max_pixels=64 * 64,
                                               patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=merge)
    video_processor = no_torchvision.video_processor(
        "Qwen2VLVideoProcessor", patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=merge,
        size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768})
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=QWEN2_VL_TEMPLATE)
    heads = 2
    head_dim = WIDTH // heads  # 16: rotary halves 8 = temporal 2 + height 3 + width 3
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=WIDTH, hidden_size=WIDTH, num_heads=2, mlp_ratio=2,
                           patch_size=PATCH_SIZE, spatial_merge_size=merge, temporal_patch_size=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    assert head_dim // 2 == sum(config.text_config.rope_parameters["mrope_section"])
    return processor, Qwen2VLForConditionalGeneration, config


def _idefics3(family):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil
    rows_cols = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<end_of_utterance>",
                "<fake_token_around_image>", "<image>", "<global-img>"] + rows_cols
    tokenizer = train_tokenizer(specials, bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<pad>",
                                unk="<unk>", add_bos=True)
    scale = 2
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // scale ** 2  # pixel shuffle: 16 patches -> 4 tokens
    # Images are resized to a longest edge of 64 px and split into 32-px crops, plus the whole image at 32 px:
    # a 32 x 32 image gives 2 x 2 crops + 1 (the processor upscales it to 64 first), each of 4 tokens.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE},
                                                max_image_size={"longest_edge": IMAGE_SIZE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len, chat_template=IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        text_config=_llama(tokenizer), scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    return processor, Idefics3ForConditionalGeneration, config


def _paligemma(family):
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipVisionConfig)
    from transformers.models.siglip import SiglipImageProcessorPil
    # Like Gemma's, except that no <bos> is added by the tokenizer: the PaliGemma processor inserts it.
    tokenizer = train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>", eos="<eos>",
                                pad="<pad>", unk="<unk>", extra={"image_token": "<image>"})
    image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_seq_length=image_seq_length)
    # The processor adds PaliGemma's 1024 <locXXXX> and 128 <segXXX> tokens: the vocabulary comes after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=PALIGEMMA_TEMPLATE)
    text = GemmaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=WIDTH // 2,
                       max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                                num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                projection_dim=WIDTH)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=WIDTH,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             pad_token_id=tokenizer.pad_token_id)
    return processor, PaliGemmaForConditionalGeneration, config


def _qwen2_tokenizer(extra_specials=(), extra=None):
    """Qwen2's style, as InternVL, LLaVA-OneVision and the Qwen-VLs have it: no bos added; eos is the end of a
    turn, pad the end of text."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(extra_specials)
    return train_tokenizer(specials, eos="<|im_end|>", pad="<|endoftext|>", extra=extra)


def _qwen2_text(tokenizer, **kwargs):
    return dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **kwargs)


def _qwen3_vl(family):
    """Qwen3-VL: Qwen2-VL's patches and M-RoPE (interleaved), a ViT with learned position embeddings and
    DeepStack features fed into the first decoder layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = _qwen2_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                                 extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>")}
    merge = 2
    image_processor = Qwen2VLImageProcessorPil(min_pixels=(PATCH_SIZE * merge) ** 2, max_pixels=64 * 64,
                                               patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=merge)
    video_processor = no_torchvision.video_processor("Qwen3VLVideoProcessor", patch_size=PATCH_SIZE,
                                                     temporal_patch_size=2, merge_size=merge)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                 chat_template=QWEN2_VL_TEMPLATE)
    config = Qwen3VLConfig(
        vision_config=dict(depth=1, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_heads=2, patch_size=PATCH_SIZE,
                           spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=WIDTH,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=_qwen2_text(tokenizer, head_dim=WIDTH // 2, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return processor, Qwen3VLForConditionalGeneration, config


def _gemma3(family):
    """Gemma 3: SigLIP pooled to a few tokens per image, attended both ways (token_type_ids 1 on them)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3 import Gemma3ImageProcessorPil
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tokenizer = train_tokenizer(specials, bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>", add_bos=True,
                                extra={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                       "eoi_token": "<end_of_image>"})
    tokens_per_image = 4  # SigLIP's 4 x 4 patches average-pooled to 2 x 2
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=tokens_per_image)
    text = dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=WIDTH // 2, query_pre_attn_scalar=WIDTH // 2,
                max_position_embeddings=1024, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    return processor, Gemma3ForConditionalGeneration, config


def _internvl(family):
    """InternVL 3: InternViT, pixel shuffle, Qwen2; any resolution as tiles of 32 px (plus a thumbnail)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil
    tokenizer = _qwen2_tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>"], extra={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    tokens_per_tile = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4  # pixel shuffle 0.5: 16 patches -> 4 tokens
    image_processor = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True,
                                               min_patches=1, max_patches=3)
    video_processor = no_torchvision.video_processor("InternVLVideoProcessor",
                                                     size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                  image_seq_length=tokens_per_tile, chat_template=INTERNVL_TEMPLATE)
    vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH_SIZE, PATCH_SIZE])
    config = InternVLConfig(vision_config=vision, text_config=dict(_qwen2_text(tokenizer), model_type="qwen2"),
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=tokens_per_tile, downsample_ratio=0.5)
    return processor, InternVLForConditionalGeneration, config


def _llava_onevision(family):
    """LLaVA-OneVision: SigLIP, LLaVA-NeXT's any-resolution crops, Qwen2."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil
    tokenizer = _qwen2_tokenizer(["<image>", "<video>"], extra={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                      image_grid_pinpoints=pinpoints)
    video_processor = no_torchvision.video_processor("LlavaOnevisionVideoProcessor",
                                                     size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, num_image_tokens=patches,
                                        vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE)
    vision = dict(model_type="siglip_vision_model", hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                  num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                  vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=dict(_qwen2_text(tokenizer), model_type="qwen2"),
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1)
    return processor, LlavaOnevisionForConditionalGeneration, config


def _smolvlm(family):
    """SmolVLM: Idefics3's model and crops, its own processor (which needs the num2words package)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm import SmolVLMImageProcessorPil
    processor, _, config = _idefics3(family)
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE},
                                               max_image_size={"longest_edge": IMAGE_SIZE})
    video_processor = no_torchvision.video_processor("SmolVLMVideoProcessor", num_frames=8, fps=1,
                                                     size={"longest_edge": 2 * IMAGE_SIZE})
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=processor.tokenizer,
                                 video_processor=video_processor, image_seq_len=processor.image_seq_len,
                                 chat_template=IDEFICS3_TEMPLATE)
    config = SmolVLMConfig(vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict(),
                           scale_factor=config.scale_factor, image_token_id=config.image_token_id,
                           pad_token_id=config.pad_token_id)
    return processor, SmolVLMForConditionalGeneration, config


BUILDERS = {"llava": _llava, "llava_next": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3,
            "paligemma": _paligemma, "qwen3_vl": _qwen3_vl, "gemma3": _gemma3, "internvl": _internvl,
            "llava_onevision": _llava_onevision, "smolvlm": _smolvlm}
SPECIAL_TOKENS = {  # besides bos/eos/pad: what each family's processor and template need as single tokens
    "llava": ["<image>"], "llava_next": ["<image>"],
    "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"],
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>",
                 "<end_of_utterance>"],
    "paligemma": ["<image>", "<loc0000>", "<seg127>"],
    "qwen3_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>", "<end_of_image>"],
    "internvl": ["<|im_start|>", "<|im_end|>", "<img>", "<IMG_CONTEXT>", "</img>"],
    "llava_onevision": ["<|im_start|>", "<|im_end|>", "<image>"],
    "smolvlm": ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<end_of_utterance>"],
}


def build(family: str, out_dir: str, seed: int = 0) -> str:
    """Build the tiny random model + processor of `family`, save both into out_dir, return out_dir."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; one of {FAMILY_NAMES}")
    processor, model_class, config = BUILDERS[family](family)
    tokenizer = processor.tokenizer
    check_tokenizer(tokenizer, SPECIAL_TOKENS[family] + [t for t in (tokenizer.bos_token, tokenizer.eos_token,
                                                                      tokenizer.pad_token) if t])
    check_template(processor, tokenizer.eos_token)
    assert config.model_type == family, (config.model_type, family)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.bos_token_id = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                            else tokenizer.pad_token_id)  # Qwen has no bos: its <|endoftext|>
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def image(seed: int = 0, size: int = 32) -> Image.Image:
    """A deterministic random RGB test image: blocks of 8 x 8 px of random colours."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(-(-size // 8), -(-size // 8), 3), dtype=np.uint8)
    pixels = blocks.repeat(8, axis=0).repeat(8, axis=1)[:size, :size]
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


if __name__ == "__main__":  # python tests/families.py OUT: builds every family into OUT/<family>
    import sys
    import time
    for name in FAMILY_NAMES:
        start = time.time()
        path = build(name, os.path.join(sys.argv[1] if len(sys.argv) > 1 else "families", name))
        print(f"{name}: {path} ({time.time() - start:.2f} s)")
