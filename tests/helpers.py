"""Small helpers the tests share that the library itself does not need."""
import base64
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import lora
import vlm
from conftest import ROOT


def lora_parameters(model):
    """The LoRA parameters of a model, as (name, parameter) pairs."""
    return [(name, p) for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


@torch.no_grad()
def unmerge_lora(model):
    """Undo lora.merge_lora (W -= scale * B @ A); no-op if not merged."""
    for _, module in lora.lora_modules(model):
        if module.merged:
            module.base.weight -= module.delta_weight().to(module.base.weight.dtype)
            module.merged = False


def count_image_tokens(input_ids, processor):
    """How many image placeholder tokens a sequence holds."""
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((torch.as_tensor(input_ids) == image_token_id).sum())


# ----------------------------------------------------------------------------- a tiny LLaVA from configs
IMAGE_TOKEN = 299
NUM_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches; the default strategy drops CLS
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llava(seed=0):
    """A 0.2 M-parameter LLaVA built from configs (no hub); the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=300),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def tiny_inputs(batch=2, text_tokens=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    image = torch.full((batch, NUM_IMAGE_TOKENS), IMAGE_TOKEN)  # (B, 16)
    text = torch.randint(1, IMAGE_TOKEN, (batch, text_tokens), generator=generator)  # (B, 8)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], dim=1)  # (B, 25): bos, image, text
    pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)  # (B, 3, 32, 32)
    return dict(input_ids=input_ids, pixel_values=pixel_values)


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits  # (B, T, V)


def randomize_lora_B(model, std=0.1):
    """Give every lora_B a non-zero value so that the adapter changes the model."""
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if "lora_B" in name:
                p.normal_(0, std)


def read_lines(path):
    """The rows of a jsonl file, every line parsed."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pool_questions(toy_world):
    """(model, processor, images, questions): every turn of the toy world's first 4 pool records, the second
    question made much longer than the rest, so a batch of them needs left padding."""
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    images, questions = [], []
    for record in json.load(open(os.path.join(toy_world, "pool.json")))[:4]:
        image = vlm.load_image(os.path.join(toy_world, "images", record["image"]))
        for human in record["conversations"][0::2]:
            images.append(image)
            questions.append(human["value"].replace("<image>", "").strip())
    questions[1] += " Look at the whole image, then answer in one word."
    return model.eval(), processor, images, questions


def write_mc_files(toy_world, folder):
    """A hand-made MMBench-style tsv (base64 images, a 'nan' hint, a 3-option question) and a jsonl."""
    images = os.path.join(toy_world, "images")
    b64 = [base64.b64encode(open(os.path.join(images, f"val/00000{i}.png"), "rb").read()).decode() for i in range(2)]
    tsv = os.path.join(folder, "mmb.tsv")
    with open(tsv, "w") as f:
        f.write("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n")
        f.write(f"1\tWhat color is the circle?\tnan\tred\tgreen\tblue\tyellow\tA\tcolour\t{b64[0]}\n")
        f.write(f"2\tHow many objects are there?\tCount carefully.\t1\t2\t3\t\tB\tcount\t{b64[1]}\n")
    jsonl = os.path.join(folder, "seed.jsonl")
    with open(jsonl, "w") as f:
        f.write(json.dumps(dict(question_id="q1", question="What shape is red?", options=["circle", "star"],
                                answer="B", image="val/000000.png")) + "\n")
        f.write(json.dumps(dict(question_id="q2", question="How many?", choice_a="1", choice_b="2", choice_c="3",
                                answer="A", data_id="val/000001.png", hint="Look.")) + "\n")
    return tsv, jsonl

def env():
    """A subprocess's environment: one thread, the repository on its path, offline."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def lock_holder(out):
    """Another process holding OUT's lock (it has printed that it holds it); the caller kills it."""
    holder = ("import sys, time, runcontrol\n"
              "lock = runcontrol.OutputLock(sys.argv[1]).acquire()\n"
              "print('held', flush=True)\n"
              "time.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", holder, out], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    if other.stdout.readline().strip() != "held":
        other.kill()
        pytest.fail("the other process could not take the lock")
    return other


def flip(path):
    """Damage a file in place: 64 bytes a third of the way in, each bit inverted."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        block = f.read(64)
        f.seek(os.path.getsize(path) // 3)
        f.write(bytes(b ^ 0xFF for b in block))
