"""toyworld/grammar.py: every sentence the grammar writes parses back into claims that its scene bears out, and a
changed scene contradicts them; positions, parsing and checking by hand."""
import random

import pytest

from toyworld import grammar as toygrammar
from toyworld import scenes as toyscenes

SCENE = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "center": [10, 10]},
                     {"shape": "star", "colour": "blue", "size": "large", "center": [50, 30]}], "word": "cat"}


def test_positions_by_hand():
    # thirds of 64 px: columns 0-21 left, 22-42 middle, 43-63 right (3 * x // 64); rows likewise
    cases = {(10, 10): "top left", (32, 10): "top", (50, 10): "top right", (10, 32): "left", (32, 32): "center",
             (50, 30): "right", (10, 60): "bottom left", (32, 63): "bottom", (63, 63): "bottom right"}
    for center, position in cases.items():
        assert toygrammar.position_of(center) == position, center


def test_sentences_by_hand():
    assert toygrammar.caption(SCENE) == "A small red circle and a large blue star, with the word cat."
    assert toygrammar.description(SCENE) == ("There are two objects. A small red circle is at the top left. "
                                             "A large blue star is at the right. The word cat is written at the bottom.")
    assert toygrammar.sentence_answer("colour", {"shape": "star"}, "blue") == "The star is blue."
    assert toygrammar.sentence_answer("exist", {"shape": "star", "colour": "red"}, "No") == "No, there is no red star."
    assert toygrammar.sentence_answer("count", {}, "1") == "There is one object."


def test_parse_by_hand():
    assert toygrammar.parse("A small red circle and a large blue star, with the word cat.") == [
        dict(kind="object", colour="red", shape="circle", size="small", position=None),
        dict(kind="object", colour="blue", shape="star", size="large", position=None), dict(kind="word", word="cat")]
    assert toygrammar.parse("a large blue star is at the bottom right") == [
        dict(kind="object", colour="blue", shape="star", size="large", position="bottom right")]
    assert toygrammar.parse("The red object is a circle.") == [
        dict(kind="object", colour="red", shape="circle", size=None, position=None)]
    assert toygrammar.parse("There are 3 objects.") == [dict(kind="count", count=3)]
    assert toygrammar.parse("No, there is no green square.") == [dict(kind="absent", colour="green", shape="square")]
    for broken in ("A red.", "There are objects.", "A small red circle, with the word", "The sky is blue.", ""):
        assert toygrammar.parse(broken) is None, broken


def test_false_claims_by_hand():
    wrong = lambda text: [why for _, why in toygrammar.false_claims(toygrammar.parse(text), SCENE)]
    assert wrong("A small red circle is at the top left.") == []
    assert wrong("A large red circle is at the top left.") == ["no such object"]  # the circle is small
    assert wrong("A small red circle is at the center.") == ["not at that position"]
    assert wrong("A small green circle and a large blue star, with the word dog.") == ["no such object",
                                                                                        "the word is cat"]
    assert wrong("No, there is no blue star.") == ["the object is there"]
    assert wrong("There are three objects.") == ["2 objects"]
    green = toygrammar.parse("A small green circle.")[0]
    big = toygrammar.parse("A large red circle.")[0]
    assert toygrammar.hallucinated_object(green, SCENE) and not toygrammar.hallucinated_object(big, SCENE)


@pytest.mark.parametrize("seed", range(3))
def test_every_sentence_of_the_grammar_round_trips(seed):
    rng = random.Random(seed)
    for _ in range(200):
        scene = toyscenes.make_scene(rng)
        texts = [toygrammar.caption(scene)] + toygrammar.split_sentences(toygrammar.description(scene))
        shapes = [o["shape"] for o in scene["objects"]]
        colours = [o["colour"] for o in scene["objects"]]
        for o in scene["objects"]:  # the sentence answers of the closed-set questions
            if shapes.count(o["shape"]) == 1:
                texts.append(toygrammar.sentence_answer("colour", o, o["colour"]))
            if colours.count(o["colour"]) == 1:
                texts.append(toygrammar.sentence_answer("shape", o, o["shape"]))
            texts.append(toygrammar.sentence_answer("exist", o, "Yes"))
        absent = next(dict(colour=c, shape=s) for c in toygrammar.COLOURS for s in toygrammar.SHAPES
                      if (c, s) not in zip(colours, shapes))
        texts += [toygrammar.sentence_answer("exist", absent, "No"),
                  toygrammar.sentence_answer("count", {}, str(len(shapes)))]
        if scene["word"]:
            texts.append(toygrammar.sentence_answer("word", {}, scene["word"]))
        for text in texts:
            claims = toygrammar.parse(text)
            assert claims, text
            assert toygrammar.false_claims(claims, scene) == [], text
        # the caption against the scene with every object in a colour it did not hold: each object is contradicted
        unused = next(c for c in toygrammar.COLOURS if c not in colours)
        recoloured = dict(scene, objects=[dict(o, colour=unused) for o in scene["objects"]])
        objects = [c for c in toygrammar.parse(toygrammar.caption(scene)) if c["kind"] == "object"]
        assert len(toygrammar.false_claims(objects, recoloured)) == len(objects) == len(scene["objects"])
