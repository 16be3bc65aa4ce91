"""
The text side of the tests' tiny families (tests/families.py): a small corpus, a byte-level BPE tokenizer trained
on it with a family's special tokens, and chat templates in each family's own style.
"""
import vlm

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


# Gemma 3: "<bos><start_of_turn>user\n<start_of_image>{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n"
# (<bos> added by the tokenizer); the processor expands <start_of_image> into the image's tokens.
GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    + _images("<start_of_image>") + _TEXT + "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# InternVL 3 (Qwen2's turns): "<|im_start|>user\n<IMG_CONTEXT>\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n";
# the processor expands <IMG_CONTEXT> into "<img>" + the tiles' tokens + "</img>".
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _images("<IMG_CONTEXT>\n") + _TEXT +
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# LLaVA-OneVision (Qwen2's turns): "<|im_start|>user <image>\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n".
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ ' ' if message['role'] == 'user' else '\n' }}"
    + _images("<image>\n") + _TEXT +
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


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


def check_tokenizer(tokenizer, tokens):
    for token in tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{token!r} is not one token: {ids}"


def check_template(processor, eos):
    """The generation prompt is a string prefix of the conversation with the answer, which ends in eos."""
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    head = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(prompt + answer, tokenize=False)
    assert full.startswith(head), (head, full)
    assert full[len(head):].lstrip().startswith("red" + eos), (head, full)
