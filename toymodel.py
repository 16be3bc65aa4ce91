"""
The toy world's LLaVA: a tokenizer, a processor and a tiny LLaVA-1.5 built from transformers classes,
and stage 0, the vision tower's pretraining on the scene graphs (LLaVA starts from a pretrained CLIP).
toyworld.py calls these, then fine-tunes the model with train_ddp.py --objective sft.
"""
import os

import torch
from PIL import Image
from tqdm import tqdm

import vlm
from toyworld import COLOURS, IMAGE_SIZE, SHAPES, WORDS, render

# ----------------------------------------------------------------------------- tokenizer, processor, model
# A chat template that renders exactly the llava_v1 (vicuna_v1) format the model is trained on:
# "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q} ASSISTANT:", so `apply_chat_template` and
# the authors' template give the same tokens (tested).
CHAT_TEMPLATE = (
    "{{ '" + vlm.LLAVA_V1_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{% else %} ASSISTANT: {% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def train_tokenizer(corpus, vocab_size):
    """A byte-level BPE trained on the toy corpus, with Llama's special tokens and LLaVA's <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    # Like Llama's tokenizer, prepend <s> to every text (the toy tokenizer would add nothing by itself).
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer, patch_size):
    from transformers import LlavaProcessor
    from transformers.models.llava import LlavaImageProcessorPil  # the default one wants torchvision
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # num_additional_image_tokens=1: CLIP's CLS token, dropped by the "default" feature strategy.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, width, vision_layers, text_layers, patch_size):
    """A random tiny LLaVA-1.5: CLIP vision tower, 2-layer MLP projector, Llama language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=patch_size)
    text = LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(IMAGE_SIZE // patch_size) ** 2)
    model = LlavaForConditionalGeneration(config)
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"]:
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


# ----------------------------------------------------------------------------- stage 0: vision pretraining
def patch_targets(scene, patch_size):
    """What a pretrained CLIP would know about each patch: the colour, shape, object (colour x shape) and
    word it mostly shows (class 0: none), read off the scene's label map; and the scene's object count."""
    labels = torch.frombuffer(bytearray(render(scene, label_map=True).tobytes()), dtype=torch.uint8)
    side = IMAGE_SIZE // patch_size
    patches = labels.view(side, patch_size, side, patch_size).permute(0, 2, 1, 3).reshape(side * side, -1)
    values = [v for v in patches.unique().tolist() if v > 0]
    colour, shape, pair, word = (torch.zeros(side * side, dtype=torch.long) for _ in range(4))
    if values:
        coverage = torch.stack([(patches == v).sum(1) for v in values], dim=1)  # (P, labels): pixels of each
        best = coverage.argmax(1)
        for p in range(side * side):
            if coverage[p, best[p]] < patch_size ** 2 // 8:  # under 1/8 of the patch: background
                continue
            value = values[best[p]]
            if value == 255:
                word[p] = 1 + WORDS.index(scene["word"])
            else:
                obj = scene["objects"][value - 1]
                colour[p], shape[p] = 1 + list(COLOURS).index(obj["colour"]), 1 + SHAPES.index(obj["shape"])
                pair[p] = (colour[p] - 1) * len(SHAPES) + shape[p]
    return colour, shape, pair, word, len(scene["objects"]) - 1


def pretrain_vision(model, processor, out, scenes, steps, batch_size, lr, seed):
    """LLaVA starts from a pretrained CLIP; we pretrain ours with linear probes on the scene graphs:
    per patch, what it shows (like a segmentation-pretrained encoder), reading the same layer (-2,
    patch tokens) that LLaVA feeds its projector; and the object count from the pooled patches."""
    torch.manual_seed(seed)
    names = sorted(n for n in scenes if n.startswith("sft/"))
    pixels = processor.image_processor([Image.open(os.path.join(out, "images", n)) for n in names],
                                       return_tensors="pt")["pixel_values"]
    patch_size = model.config.vision_config.patch_size
    colour, shape, pair, word, count = (torch.stack(t) if isinstance(t[0], torch.Tensor) else torch.tensor(t)
                                  for t in zip(*(patch_targets(scenes[n], patch_size) for n in names)))
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, 1 + len(COLOURS)),
                                 "shape": torch.nn.Linear(width, 1 + len(SHAPES)),
                                 "pair": torch.nn.Linear(width, 1 + len(COLOURS) * len(SHAPES)),
                                 "word": torch.nn.Linear(width, 1 + len(WORDS)), "count": torch.nn.Linear(width, 3)})
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    cross_entropy = torch.nn.functional.cross_entropy
    progress = tqdm(range(steps), desc="stage 0: vision", leave=False)
    for _ in progress:
        idx = torch.randint(len(names), (batch_size,), generator=generator)
        hidden = tower(pixels[idx], output_hidden_states=True).hidden_states[-2][:, 1:]  # (B, P, C): no CLS
        loss = (cross_entropy(heads["colour"](hidden).flatten(0, 1), colour[idx].flatten())
                + cross_entropy(heads["shape"](hidden).flatten(0, 1), shape[idx].flatten())
                + cross_entropy(heads["pair"](hidden).flatten(0, 1), pair[idx].flatten())
                + cross_entropy(heads["word"](hidden).flatten(0, 1), word[idx].flatten())
                + cross_entropy(heads["count"](hidden.mean(1)), count[idx]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()
