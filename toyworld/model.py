"""
The toy world's LLaVA: a tokenizer, a processor and a tiny LLaVA-1.5 built from transformers classes,
and stage 0, the vision tower's pretraining on the scene graphs (LLaVA starts from a pretrained CLIP).
toyworld.py calls these with its sizes and the scenes' probe targets, then fine-tunes the model with
train_ddp.py --objective sft.
"""
import torch
from tqdm import tqdm

import vlm

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


def build_processor(tokenizer, patch_size, image_size):
    from transformers import LlavaProcessor
    from transformers.models.llava import LlavaImageProcessorPil  # the default one wants torchvision
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": image_size},
                                             crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: CLIP's CLS token, dropped by the "default" feature strategy.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, width, vision_layers, text_layers, patch_size, image_size):
    """A random tiny LLaVA-1.5: CLIP vision tower, 2-layer MLP projector, Llama language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch_size) ** 2)
    model = LlavaForConditionalGeneration(config)
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"]:
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


# ----------------------------------------------------------------------------- stage 0: vision pretraining
IMAGE_PROBES = ("count", "present")  # read from the mean of the patches; the others from each patch


def pretrain_vision(model, pixels, targets, classes, steps, batch_size, lr, seed):
    """LLaVA starts from a pretrained CLIP; we pretrain ours with linear probes on the scene graphs:
    per patch, what it shows (like a segmentation-pretrained encoder), reading the same layer (-2,
    patch tokens) that LLaVA feeds its projector; and the object count from the pooled patches.

    pixels (N, C, H, W); targets {probe: (N, patches) class ids, "count": (N,), optionally "present": (N, pairs)
    multi-hot}; classes {probe: classes}."""
    torch.manual_seed(seed)
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, n) for name, n in classes.items()})
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    cross_entropy = torch.nn.functional.cross_entropy
    progress = tqdm(range(steps), desc="stage 0: vision", leave=False)
    for _ in progress:
        idx = torch.randint(len(pixels), (batch_size,), generator=generator)
        hidden = tower(pixels[idx], output_hidden_states=True).hidden_states[-2][:, 1:]  # (B, P, C): no CLS
        loss = sum(cross_entropy(heads[name](hidden).flatten(0, 1), targets[name][idx].flatten())
                   for name in classes if name not in IMAGE_PROBES)  # per patch
        loss = loss + cross_entropy(heads["count"](hidden.mean(1)), targets["count"][idx])  # per image
        if "present" in classes:  # per image, several labels: which (colour, shape) pairs it holds
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(heads["present"](hidden.mean(1)),
                                                                               targets["present"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()
