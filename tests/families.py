"""
Tiny random vision-language models of five Hugging Face families, built offline from configs.

`build(family, out_dir)` saves an ordinary local HF folder (config, weights, generation config, tokenizer,
image processor, processor config, chat template) that `AutoModelForImageTextToText.from_pretrained(out_dir)`
and `AutoProcessor.from_pretrained(out_dir)` load with `local_files_only=True`. Each model is random and well
under 2M parameters; each tokenizer is a small byte-level BPE trained on a built-in corpus, with the family's
special tokens as single tokens and a chat template in the family's own style whose end-of-turn token is the
tokenizer's eos_token and the generation config's eos_token_id.

Image processors are the PIL backends (torchvision is not installed here). Qwen2-VL's processor also wants a
video processor, which transformers only provides with torchvision: see `allow_qwen2_vl_without_torchvision`.
"""
import os

import numpy as np
import torch
from PIL import Image

import vlm

FAMILY_NAMES = ["llava", "llava_next", "qwen2_vl", "idefics3", "paligemma"]

IMAGE_SIZE = 32  # the vision towers' input size
PATCH_SIZE = 8  # 32 px -> 4 x 4 patches
WIDTH = 32  # hidden size of the towers and language models

CORPUS = [
    "What colour is the square? The square is red.", "What shape is it? It is a circle.",
    "How many objects are there? There are 2 objects.", "Is there a blue triangle in the image? Yes.",
    "Is there a green star in the image? No.", "What word is written in the image? The word is cat.",
    "Describe the image. A small yellow circle next to a large purple square on a white background.",
    "The quick brown fox jumps over the lazy dog.", "Answer the question using a single word or phrase.",
    "red green blue yellow purple orange black white grey pink", "circle square triangle star heart cross",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
    "Where is the object? It is at the top left, bottom right, in the centre.",
    "user assistant system question answer image picture photo", "Yes, there is. No, there is not.",
]


# ----------------------------------------------------------------------------- chat templates
# Shared pieces: a message's content is either a string or a list of {"type": "image"} / {"type": "text"} parts.
_TEXT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
         "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}")


def _images(placeholder):
    return ("{% if message['content'] is not string %}{% for c in message['content'] if c['type'] == 'image' %}"
            + placeholder + "{% endfor %}{% endif %}")


# LLaVA-1.5 / LLaVA-NeXT (vicuna v1): "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:".
# The system prompt is the first message's if it has role "system", LLaVA's default otherwise.
LLAVA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set message = messages[0] %}" + _TEXT + " "
    "{% else %}{{ '" + vlm.LLAVA_V1_SYSTEM.replace("'", "\\'") + " ' }}{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}USER: " + _images("<image>\n") + _TEXT +
    "{% else %} ASSISTANT: " + _TEXT + "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}")

# Qwen2-VL: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n
# {a}<|im_end|>\n" (a system turn only when one is given).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Idefics3 (its own template, less the <|begin_of_text|> that the tokenizer adds here):
# "User:<image>{q}<end_of_utterance>\nAssistant: {a}<end_of_utterance>\n"; the generation prompt ends "Assistant:".
IDEFICS3_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")

# PaliGemma: "<image>{q}" then "{a}<eos>". No newline: the processor puts <bos> after the image tokens and a
# "\n" at the end of the text itself.
PALIGEMMA_TEMPLATE = (
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}" + _images("<image>") + _TEXT +
    "{% else %}" + _TEXT + "<eos>{% endif %}{% endfor %}")


# ----------------------------------------------------------------------------- tokenizers
def train_tokenizer(specials, bos=None, eos=None, pad=None, unk=None, add_bos=False, extra=None,
                    vocab_size=320):
    """A byte-level BPE trained on CORPUS; `specials` become single special tokens (ids 0..), `add_bos`
    prepends `bos` to every text like Llama's tokenizer does. `extra`: tokenizer attributes such as
    {"image_token": "<image>"} (PreTrainedTokenizerFast's extra_special_tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(specials), special_tokens=specials,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    kwargs = {k: v for k, v in dict(bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk).items() if v}
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, extra_special_tokens=extra or {},
                                  model_input_names=["input_ids", "attention_mask"], **kwargs)
    # Registered special tokens are never split, and are skipped by decode(skip_special_tokens=True).
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in kwargs.values()]})
    return tok


def _check_tokenizer(tokenizer, tokens):
    for token in tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{token!r} is not one token: {ids}"


def _check_template(processor, eos):
    """The generation prompt is a string prefix of the conversation with the answer, which ends in eos."""
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    head = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(prompt + answer, tokenize=False)
    assert full.startswith(head), (head, full)
    assert full[len(head):].lstrip().startswith("red" + eos), (head, full)


# ----------------------------------------------------------------------------- Qwen2-VL without torchvision
def allow_qwen2_vl_without_torchvision():
    """Lets Qwen2VLProcessor be built and loaded where torchvision is missing, for images only.

    transformers 5.24 builds Qwen2VLProcessor with a video processor, and its video processors need torchvision:
    without it the processor's class check fails (`transformers.VideoProcessorMixin` is not exported) and
    AutoVideoProcessor.from_pretrained finds no class. This (idempotent, no-op when torchvision is there) exports
    VideoProcessorMixin and makes AutoVideoProcessor fall back to `ImagesOnlyVideoProcessor`, a stand-in that
    keeps the video settings (so a machine with torchvision loads the real Qwen2VLVideoProcessor from the same
    folder) and refuses videos. Call it before loading a Qwen2-VL folder in a process without torchvision;
    importing this module calls it."""
    global ImagesOnlyVideoProcessor
    from transformers.utils import is_torchvision_available
    if is_torchvision_available() or ImagesOnlyVideoProcessor is not None:
        return
    import importlib
    # importlib, not `from transformers... import`: transformers re-imports itself once (processing_utils'
    # direct_transformers_import), and only the modules in sys.modules are the ones its loaders use.
    processing_utils = importlib.import_module("transformers.processing_utils")
    video_processing_auto = importlib.import_module("transformers.models.auto.video_processing_auto")
    VideoProcessorMixin = importlib.import_module("transformers.video_processing_utils").VideoProcessorMixin
    # ProcessorMixin's class check looks the base class up by name in its own import of transformers.
    processing_utils.transformers_module.VideoProcessorMixin = VideoProcessorMixin

    class _ImagesOnlyVideoProcessor(VideoProcessorMixin):
        """Qwen2VLVideoProcessor's settings without its code (which needs torchvision): no videos."""
        defaults = {"merge_size": 2, "patch_size": 14, "temporal_patch_size": 2,
                    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}}
        type_name = "Qwen2VLVideoProcessor"

        def __init__(self, **kwargs):
            kwargs.pop("video_processor_type", None)
            self._settings = {**self.defaults, **kwargs}
            for key, value in self._settings.items():
                setattr(self, key, value)

        def __call__(self, *args, **kwargs):
            raise NotImplementedError("videos need torchvision (ImagesOnlyVideoProcessor stands in for "
                                      f"{self.type_name})")

        def to_dict(self):
            return {**self._settings, "video_processor_type": self.type_name}

        def __repr__(self):
            return f"ImagesOnlyVideoProcessor({self._settings})"

    ImagesOnlyVideoProcessor = _ImagesOnlyVideoProcessor

    class AutoVideoProcessor:
        """What transformers' AutoVideoProcessor (unusable without torchvision) becomes: it reads the saved
        video settings and gives the stand-in, for Qwen2-VL's video processor only."""

        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            keep = {k: v for k, v in kwargs.items() if k in ("local_files_only", "subfolder", "revision",
                                                               "cache_dir", "token")}
            config, _ = VideoProcessorMixin.get_video_processor_dict(path, **keep)
            kind = config.get("video_processor_type")
            if kind not in (None, ImagesOnlyVideoProcessor.type_name):
                raise ImportError(f"{kind} needs torchvision, which is not installed")
            return ImagesOnlyVideoProcessor(**{k: v for k, v in config.items() if not k.startswith("_")})

    # ProcessorMixin looks AutoVideoProcessor up in this module at each load.
    video_processing_auto.AutoVideoProcessor = AutoVideoProcessor


ImagesOnlyVideoProcessor = None  # the stand-in class, once allow_qwen2_vl_without_torchvision has made it
allow_qwen2_vl_without_torchvision()


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
    video_processor = _qwen2_vl_video_processor(image_processor)
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


def _qwen2_vl_video_processor(image_processor):
    """Qwen2-VL's video processor where torchvision is there, the images-only stand-in otherwise."""
    import transformers
    from transformers.utils import is_torchvision_available
    settings = dict(patch_size=image_processor.patch_size, temporal_patch_size=image_processor.temporal_patch_size,
                    merge_size=image_processor.merge_size)
    if is_torchvision_available():
        return transformers.Qwen2VLVideoProcessor(**settings)
    return ImagesOnlyVideoProcessor(**settings)


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


BUILDERS = {"llava": _llava, "llava_next": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3,
            "paligemma": _paligemma}
SPECIAL_TOKENS = {  # besides bos/eos/pad: what each family's processor and template need as single tokens
    "llava": ["<image>"], "llava_next": ["<image>"],
    "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"],
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>",
                 "<end_of_utterance>"],
    "paligemma": ["<image>", "<loc0000>", "<seg127>"],
}


def build(family: str, out_dir: str, seed: int = 0) -> str:
    """Build the tiny random model + processor of `family`, save both into out_dir, return out_dir."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; one of {FAMILY_NAMES}")
    processor, model_class, config = BUILDERS[family](family)
    tokenizer = processor.tokenizer
    _check_tokenizer(tokenizer, SPECIAL_TOKENS[family] + [t for t in (tokenizer.bos_token, tokenizer.eos_token,
                                                                      tokenizer.pad_token) if t])
    _check_template(processor, tokenizer.eos_token)
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


if __name__ == "__main__":  # python tests/families.py OUT: builds the five into OUT/<family>
    import sys
    import time
    for name in FAMILY_NAMES:
        start = time.time()
        path = build(name, os.path.join(sys.argv[1] if len(sys.argv) > 1 else "families", name))
        print(f"{name}: {path} ({time.time() - start:.2f} s)")
