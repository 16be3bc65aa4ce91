"""eval/hallucination.py by hand: CHAIR_i, CHAIR_s, Cover, the SHR-like ratio, words and unparsed sentences of a
few made-up captions of a made-up scene, and the sentence answers' scores; each number worked out in a comment."""
import pytest

from eval import hallucination

# Two objects: a small red circle at the top left, a large blue star at the right; the word cat.
SCENE = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "center": [10, 10]},
                     {"shape": "star", "colour": "blue", "size": "large", "center": [50, 30]}], "word": "cat"}


def test_chair_cover_and_shr_by_hand():
    texts = [
        # 2 mentions, none hallucinated, both objects covered; 1 sentence, true. 13 words.
        "A small red circle and a large blue star, with the word cat.",
        # 2 mentions: the green square is hallucinated; covers the star only. 1 sentence, false. 7 words.
        "A green square and a blue star.",
        # sentences: count (true), a red circle at the top left (true), a large red star (hallucinated: no red
        # star) at the right, and the word dog (false). 1 mention of 2 hallucinated; covers the circle only (a
        # red star is not the blue star). 4 sentences, 2 false. 4 + 9 + 8 + 8 = 29 words.
        "There are two objects. A small red circle is at the top left. A large red star is at the right. "
        "The word dog is written at the bottom.",
        # a sentence outside the grammar: no mention, nothing covered, 1 sentence counted false. 5 words.
        "The sky is very blue.",
    ]
    m = hallucination.hallucination(texts, [SCENE] * 4)
    # CHAIR_i: hallucinated mentions / mentions = (0 + 1 + 1 + 0) / (2 + 2 + 2 + 0) = 2 / 6
    assert m["chair_i"] == pytest.approx(2 / 6)
    assert m["mentions"] == 6
    # CHAIR_s: answers with a hallucinated object / answers = 2 / 4 (the unparsed one mentions no object)
    assert m["chair_s"] == pytest.approx(2 / 4)
    # Cover: the scene's objects mentioned, pooled: (2 + 1 + 1 + 0) / (2 * 4) = 4 / 8
    assert m["cover"] == pytest.approx(4 / 8)
    # SHR-like: false sentences / sentences = (0 + 1 + 2 + 1) / (1 + 1 + 4 + 1) = 4 / 7
    assert m["shr"] == pytest.approx(4 / 7)
    assert m["sentences"] == pytest.approx(7 / 4)
    assert m["words"] == pytest.approx((13 + 7 + 29 + 5) / 4)
    assert m["unparsed"] == 1 and m["answers"] == 4


def test_a_clean_answer_scores_zero_and_a_silent_one_covers_nothing():
    exact = hallucination.hallucination(["A small red circle and a large blue star, with the word cat."], [SCENE])
    assert (exact["chair_i"], exact["chair_s"], exact["cover"], exact["shr"]) == (0, 0, 1, 0)
    # Saying less is not hallucinating: one true mention of two objects covers half and hallucinates nothing.
    short = hallucination.hallucination(["A small red circle."], [SCENE])
    assert (short["chair_i"], short["cover"], short["shr"]) == (0, 0.5, 0)


def record(family, question, reply):
    return {"families": [family], "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                    {"from": "gpt", "value": reply}]}


def test_sentence_answers_by_hand():
    colour = record("colour", "What color is the star?", "The star is blue.")
    exist = record("exist", "Is there a green circle?", "No, there is no green circle.")
    count = record("count", "How many objects are there?", "There are two objects.")
    assert hallucination.sentence_right("The star is blue.", colour, SCENE)
    assert not hallucination.sentence_right("The star is red.", colour, SCENE)  # false
    assert not hallucination.sentence_right("The circle is red.", colour, SCENE)  # true, but not the answer
    assert not hallucination.sentence_right("The star is blue. The word is dog.", colour, SCENE)  # a false extra
    assert not hallucination.sentence_right("Blue.", colour, SCENE)  # outside the grammar
    assert hallucination.sentence_right("No, there is no green circle.", exist, SCENE)
    assert not hallucination.sentence_right("Yes, there is a green circle.", exist, SCENE)
    # colour: 1 of 2 right; exist: 1 of 1; count: 0 of 1 -> overall 2 of 4
    scores = hallucination.sentence_scores(
        [colour, colour, exist, count],
        ["The star is blue.", "The star is red.", "No, there is no green circle.", "There are three objects."],
        [SCENE] * 4)
    assert scores == {"colour": 0.5, "count": 0.0, "exist": 1.0, "overall": 0.5}


def test_which_side_of_a_pair_holds_more_false_claims_by_hand():
    scenes = {"textvqa/000001.png": SCENE, "coco/000002.png": SCENE}
    pairs = [
        # chosen true (0 false); rejected: a green circle (no such object) and the word dog (false): 2 false
        dict(image="textvqa/000001.png", chosen="A small red circle, with the word cat.",
             rejected="A small green circle, with the word dog."),
        # both 1 false: a wrong count against a sentence outside the grammar
        dict(image="textvqa/000001.png", chosen="There are three objects.", rejected="Shapes everywhere."),
        # chosen 1 false (the star is not at the top), rejected none
        dict(image="coco/000002.png", chosen="A large blue star is at the top.", rejected="There are two objects."),
        dict(image="pope/000003.png", chosen="x", rejected="y"),  # no scene: left out
    ]
    table = hallucination.pair_claims(pairs, scenes)
    assert list(table) == ["coco", "textvqa"]
    text = table["textvqa"]
    assert (text["pairs"], text["chosen fewer false claims"], text["as many"], text["rejected fewer false claims"]) == (
        2, 1, 1, 0)
    assert (text["false_chosen"], text["false_rejected"]) == (0.5, 1.5)  # (0 + 1) / 2, (2 + 1) / 2
    assert (text["words_chosen"], text["words_rejected"]) == (6, 5)  # (8 + 4) / 2, (8 + 2) / 2
    assert table["coco"]["rejected fewer false claims"] == 1 and table["coco"]["false_chosen"] == 1
