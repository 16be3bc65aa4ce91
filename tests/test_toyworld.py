"""The toy world: answers agree with the pixels, builds are deterministic, the model folder is a real HF folder."""
import filecmp
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data
from toyworld import datafiles as toydata
from toyworld import grammar as toygrammar
from toyworld import scenes as toyscenes
from toyworld import build as toyworld
import vlm
from helpers import count_image_tokens


def scenes(n=200):
    return [toyscenes.make_scene(random.Random(i)) for i in range(n)]


def object_pixels(scene, k):
    """The RGB values of object k, read from the rendered image through the label map."""
    image = np.asarray(toyscenes.render(scene))
    labels = np.asarray(toyscenes.render(scene, label_map=True))
    return image[labels == k + 1]


# ----------------------------------------------------------------------------- answers vs pixels
def test_colour_answers_match_the_pixels():
    checked = 0
    for scene in scenes():
        for slots in toydata.askable(scene, "colour"):
            k = next(i for i, o in enumerate(scene["objects"]) if o["shape"] == slots["shape"])
            pixels = object_pixels(scene, k)
            assert len(pixels) > 20
            assert (pixels == toygrammar.COLOURS[toydata.answer(scene, "colour", slots)]).all()
            checked += 1
    assert checked > 100


def test_shape_answers_are_unique_and_match_the_drawn_area():
    # A square fills its box, a circle ~pi/4 of it, a triangle ~1/2, a star less: the area tells them apart.
    fill = {"square": 1.0, "circle": 0.785, "triangle": 0.5, "star": 0.3}
    for scene in scenes():
        for slots in toydata.askable(scene, "shape"):
            same_colour = [i for i, o in enumerate(scene["objects"]) if o["colour"] == slots["colour"]]
            assert len(same_colour) == 1
            obj = scene["objects"][same_colour[0]]
            box = (2 * toygrammar.SIZES[obj["size"]] + 1) ** 2
            measured = len(object_pixels(scene, same_colour[0])) / box
            closest = min(fill, key=lambda s: abs(fill[s] - measured))
            assert closest == toydata.answer(scene, "shape", slots)


def test_count_exist_and_word_answers():
    for scene in scenes():
        labels = np.asarray(toyscenes.render(scene, label_map=True))
        drawn = {int(v) for v in np.unique(labels)} - {0, 255}
        assert toydata.answer(scene, "count", {}) == str(len(drawn))
        for slots in toydata.askable(scene, "exist"):
            present = any(o["colour"] == slots["colour"] and o["shape"] == slots["shape"] for o in scene["objects"])
            assert toydata.answer(scene, "exist", slots) == ("Yes" if present else "No")
        # the word band holds dark text pixels exactly when the scene has a word
        band = np.asarray(toyscenes.render(scene))[toyscenes.IMAGE_SIZE - 16:]
        assert ((band.sum(-1) < 200).any()) == (scene["word"] is not None)
        if scene["word"]:
            assert toydata.answer(scene, "word", {}) == scene["word"]


def test_pope_splits(toy_world):
    scene_graphs = json.load(open(os.path.join(toy_world, "scenes.json")))
    for split in ["random", "popular", "adversarial"]:
        rows = [json.loads(line) for line in open(os.path.join(toy_world, "pope", f"{split}.jsonl"))]
        assert [r["question_id"] for r in rows] == list(range(len(rows)))
        assert sum(r["label"] == "yes" for r in rows) == sum(r["label"] == "no" for r in rows)
        for r in rows:
            colour, shape = r["text"].removeprefix("Is there a ").removesuffix(" in the image?").split(" ")
            present = any(o["colour"] == colour and o["shape"] == shape for o in scene_graphs[r["image"]]["objects"])
            assert r["label"] == ("yes" if present else "no")
            if split == "adversarial" and r["label"] == "no":
                near = [o for o in scene_graphs[r["image"]]["objects"] if o["colour"] == colour or o["shape"] == shape]
                assert near, "adversarial negatives share a colour or a shape with a present object"


def test_records_are_llava_665k_format(toy_world):
    for name in ["sft.json", "pool.json", "pool-unseen.json", "val.json"]:
        records = json.load(open(os.path.join(toy_world, name)))
        assert records
        for r in records:
            assert os.path.exists(os.path.join(toy_world, "images", r["image"]))
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in turns[1:])
    sft_ids = {r["id"] for r in json.load(open(os.path.join(toy_world, "sft.json")))}
    assert {r["id"] for r in json.load(open(os.path.join(toy_world, "pool.json")))} <= sft_ids  # paper: pool = SFT data


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("stage", ["open", "closed"])
def test_same_seed_gives_identical_files(tmp_path, stage):
    if stage == "open":
        build, sizes = toydata.build_open, dict(sft=12, shares=(0.25, 0.25, 0.25, 0.25), pool=2, unseen=1, pope=2,
                                                val=dict(short=5, sentence=3, caption=2, description=2))
    else:
        build, sizes = toydata.build_closed, dict(sft=12, unseen=4, val=5, pope=2, pool=4)
    build(str(tmp_path / "a"), 7, sizes)
    build(str(tmp_path / "b"), 7, sizes)
    build(str(tmp_path / "c"), 8, sizes)
    compared = 0
    for root, _, files in os.walk(tmp_path / "a"):
        for f in files:
            a = os.path.join(root, f)
            assert filecmp.cmp(a, a.replace(str(tmp_path / "a"), str(tmp_path / "b")), shallow=False), a
            compared += 1
    assert compared > 20
    assert not filecmp.cmp(tmp_path / "a" / "sft.json", tmp_path / "c" / "sft.json", shallow=False)


# ----------------------------------------------------------------------------- the model folder
def test_model_folder_round_trips_offline(toy_world, tmp_path):
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again, processor_again = vlm.load(str(tmp_path / "copy"))
    image = Image.open(os.path.join(toy_world, "images", "val", "000000.png")).convert("RGB")
    prompt = vlm.prompt_text(processor, "How many objects are there?", "llava_v1")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    inputs_again = processor_again(images=[image], text=[prompt], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], inputs_again["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs_again).logits)


def test_processor_emits_the_image_tokens_the_model_expects(toy_world):
    model, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    image = Image.open(os.path.join(toy_world, "images", "val", "000001.png")).convert("RGB")
    inputs = processor(images=[image], text=[vlm.prompt_text(processor, "q", "llava_v1")], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    n_features = sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[-2]
    vision = model.config.vision_config
    assert count_image_tokens(inputs["input_ids"], processor) == (vision.image_size // vision.patch_size) ** 2
    assert count_image_tokens(inputs["input_ids"], processor) == n_features


def test_chat_template_renders_the_trained_format(toy_world):
    """apply_chat_template gives exactly the llava_v1 tokens and labels the model was trained on."""
    _, processor = vlm.load(os.path.join(toy_world, "model-sft"))
    image = Image.open(os.path.join(toy_world, "images", "val", "000002.png")).convert("RGB")
    turns = [("What color is the star?", "red"), ("How many objects are there?", "2")]
    ours, chat = vlm.encode(processor, image, turns, "llava_v1"), vlm.encode(processor, image, turns, "chat")
    assert torch.equal(ours["input_ids"], chat["input_ids"]) and torch.equal(ours["labels"], chat["labels"])
    trained = processor.tokenizer.decode(ours["input_ids"][ours["labels"] != -100])
    assert trained == " red</s> 2</s>"  # the answers and their end-of-turn tokens, nothing else
    assert vlm.prompt_text(processor, "q?", "chat") == vlm.prompt_text(processor, "q?", "llava_v1")


def test_plain_template_is_llava_stage_one_format(toy_world):
    """Stage 1 (toy/pretrain.json): "<image>{caption}\n", the prompt dropped, no system prompt, only the caption
    and its newline trained, as the authors' conv_llava_plain."""
    _, processor = vlm.load(os.path.join(toy_world, "model-init"))
    record = json.load(open(os.path.join(toy_world, "pretrain.json")))[0]
    image = Image.open(os.path.join(toy_world, "images", record["image"])).convert("RGB")
    caption = record["conversations"][1]["value"]
    example = vlm.encode(processor, image, data.sft_turns(record), "plain")
    tokenizer = processor.tokenizer
    image_tokens = count_image_tokens(example["input_ids"][None], processor)
    expected = [tokenizer.bos_token_id] + [tokenizer.convert_tokens_to_ids("<image>")] * image_tokens + \
        tokenizer(caption + "\n", add_special_tokens=False).input_ids
    assert example["input_ids"].tolist() == expected
    assert tokenizer.decode(example["input_ids"][example["labels"] != -100]) == caption + "\n"
    with pytest.raises(ValueError, match="one turn"):
        vlm.render_turns(processor, [("q", "a"), ("q", "a")], "plain")


def test_build_is_idempotent(toy_world, capsys):
    before = os.path.getmtime(os.path.join(toy_world, "model-sft", "config.json"))
    from conftest import TINY_WORLD
    toyworld.build(toyworld.parse_args(["--out", toy_world] + TINY_WORLD))
    assert os.path.getmtime(os.path.join(toy_world, "model-sft", "config.json")) == before
    assert "band short answers: exact match overall 55-90%" in capsys.readouterr().out


def test_validation_split_alone_equals_the_worlds_own_and_another_seed_differs(toy_world, tmp_path):
    """toydata.build_validation (the exploratory search's confirmation split) draws the held-out splits as the
    world build does: with the world's seed, the same files; with another seed, new images and questions."""
    names = ["val.json", "val-sentences.json", "val-captions.json", "val-descriptions.json"]
    sizes = {kind: len(json.load(open(os.path.join(toy_world, name))))
             for kind, name in zip(("short", "sentence", "caption", "description"), names)}
    toydata.build_validation(str(tmp_path / "same"), 0, sizes)
    for name in names:
        assert open(tmp_path / "same" / name).read() == open(os.path.join(toy_world, name)).read()
    record = json.load(open(os.path.join(toy_world, "val-descriptions.json")))[0]
    assert (open(tmp_path / "same" / "images" / record["image"], "rb").read()
            == open(os.path.join(toy_world, "images", record["image"]), "rb").read())
    toydata.build_validation(str(tmp_path / "other"), 1, sizes)
    other = json.load(open(tmp_path / "other" / "val-descriptions.json"))
    assert len(other) == sizes["description"] and other != json.load(open(os.path.join(toy_world, names[3])))
    scenes = json.load(open(tmp_path / "other" / "scenes.json"))
    assert all(r["image"] in scenes for r in other)
