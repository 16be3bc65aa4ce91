"""
The toy world's language: the sentences its data is written in, and a parser that reads any of them back into
claims about a scene, so that every open-ended answer can be scored exactly (CHAIR, Cover, SHR-like ratios).

The grammar is small on purpose. An object phrase is "a [size] [colour] shape" (size and colour optional when
parsing). Sentences:

    caption         A small red circle, a large blue star and a small green square[, with the word cat].
    count           There is one object. / There are three objects.
    position        A small red circle is at the top left.     (3 x 3 grid: top left ... center ... bottom right)
    word            The word cat is written at the bottom. / The word is cat.
    colour answer   The circle is red.
    shape answer    The red object is a circle.
    existence       Yes, there is a red circle. / No, there is no red circle.

`parse` turns a sentence into claims, `false_claims` checks them against a scene graph; a sentence that does
not parse has no claims and is reported as unparsed, never silently counted right.
"""
import re

# ----------------------------------------------------------------------------- the vocabulary
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 30), "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle", "star"]
SIZES = {"small": 9, "large": 12}  # half-width in pixels at 64 px
WORDS = ["cat", "dog", "sun", "map", "key", "cup", "hat", "pen", "bus", "egg"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
ROWS, COLUMNS = ("top", "", "bottom"), ("left", "", "right")  # the 3 x 3 grid of positions
POSITIONS = [" ".join(p for p in (row, column) if p) or "center" for row in ROWS for column in COLUMNS]


def position_of(center, image_size=64):
    """The 3 x 3 grid cell of a point: "top left", "top", ..., "center", ..., "bottom right"."""
    column, row = (min(2, 3 * c // image_size) for c in center)
    return POSITIONS[3 * row + column]


# ----------------------------------------------------------------------------- writing sentences
def object_phrase(obj, article="a"):
    return f"{article} {obj['size']} {obj['colour']} {obj['shape']}"


def sentence(text):
    return text[0].upper() + text[1:] + "."


def listing(phrases):
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene):
    """One sentence naming every object (size, colour, shape), left to right, and the word."""
    objects = sorted(scene["objects"], key=lambda o: tuple(o["center"]))
    text = listing([object_phrase(o) for o in objects])
    return sentence(text + (f", with the word {scene['word']}" if scene["word"] else ""))


def count_sentence(count):
    return sentence(f"there is {NUMBERS[count]} object" if count == 1 else f"there are {NUMBERS[count]} objects")


def description(scene):
    """A few sentences: the count, each object with its size, colour, shape and position, and the word."""
    sentences = [count_sentence(len(scene["objects"]))]
    for obj in sorted(scene["objects"], key=lambda o: (o["center"][1], o["center"][0])):  # in reading order
        sentences.append(sentence(f"{object_phrase(obj)} is at the {position_of(obj['center'])}"))
    if scene["word"]:
        sentences.append(sentence(f"the word {scene['word']} is written at the bottom"))
    return " ".join(sentences)


def sentence_answer(family, slots, answer):
    """The full-sentence answer to a closed-set question (LLaVA-Instruct's style, no single-word suffix)."""
    if family == "colour":
        return sentence(f"the {slots['shape']} is {answer}")
    if family == "shape":
        return sentence(f"the {slots['colour']} object is a {answer}")
    if family == "count":
        return count_sentence(int(answer))
    if family == "exist":
        thing = f"{slots['colour']} {slots['shape']}"
        return sentence(f"yes, there is a {thing}" if answer == "Yes" else f"no, there is no {thing}")
    if family == "word":
        return sentence(f"the word is {answer}")
    raise ValueError(f"unknown question family {family!r}")


# ----------------------------------------------------------------------------- reading sentences back
def alternatives(words):
    return "|".join(sorted(words, key=len, reverse=True))


OBJECT = (rf"an? (?:(?P<size>{alternatives(SIZES)}) )?(?:(?P<colour>{alternatives(COLOURS)}) )?"
          rf"(?P<shape>{alternatives(SHAPES)})")
PATTERNS = [  # (kind, regex over the lowercased sentence without its final period)
    ("count", re.compile(rf"there (?:is|are) (?P<count>{alternatives(NUMBERS)}|\d+) objects?")),
    ("position", re.compile(rf"{OBJECT} is at the (?P<position>{alternatives(POSITIONS)})")),
    ("word", re.compile(r"the word (?P<word>[a-z]+) is written at the bottom|the word is (?P<word2>[a-z]+)")),
    ("colour", re.compile(rf"the (?P<shape>{alternatives(SHAPES)}) is (?P<colour>{alternatives(COLOURS)})")),
    ("shape", re.compile(rf"the (?P<colour>{alternatives(COLOURS)}) object is an? (?P<shape>{alternatives(SHAPES)})")),
    ("exist", re.compile(rf"yes, there is an? (?P<colour>{alternatives(COLOURS)}) (?P<shape>{alternatives(SHAPES)})")),
    ("absent", re.compile(rf"no, there is no (?P<colour>{alternatives(COLOURS)}) (?P<shape>{alternatives(SHAPES)})")),
]
OBJECT_ALONE = re.compile(OBJECT)
WITH_WORD = re.compile(r"(?P<rest>.*), with the word (?P<word>[a-z]+)")


def split_sentences(text):
    """The sentences of an answer, split after each period."""
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def mention(match, position=None):
    """An object claim from a regex match: colour and shape, and size and position where said."""
    groups = match.groupdict()
    return dict(kind="object", colour=groups.get("colour"), shape=groups["shape"], size=groups.get("size"),
                position=position)


def parse(text):
    """The claims of one sentence, or None if it is not a sentence of the grammar. Claims are dicts:
    object (colour, shape, size, position; None where not said), absent (colour, shape), count, word."""
    text = text.strip().lower().rstrip(".").strip()
    for kind, pattern in PATTERNS:
        match = pattern.fullmatch(text)
        if not match:
            continue
        if kind == "count":
            count = match["count"]
            return [dict(kind="count", count=int(count) if count.isdigit() else NUMBERS.index(count))]
        if kind == "word":
            return [dict(kind="word", word=match["word"] or match["word2"])]
        if kind == "absent":
            return [dict(kind="absent", colour=match["colour"], shape=match["shape"])]
        return [mention(match, match.groupdict().get("position"))]
    claims = []  # a caption: object phrases joined by ", " and " and ", maybe ", with the word W"
    with_word = WITH_WORD.fullmatch(text)
    if with_word:
        text = with_word["rest"]
        claims.append(dict(kind="word", word=with_word["word"]))
    parts = re.split(r", | and ", text)
    matches = [OBJECT_ALONE.fullmatch(part) for part in parts]
    if not all(matches):
        return None
    return [mention(m) for m in matches] + claims


# ----------------------------------------------------------------------------- checking claims
def matching(scene, claim):
    """The scene's objects a claim could be about: same shape, and colour and size where the claim says."""
    return [o for o in scene["objects"] if o["shape"] == claim["shape"]
            and (claim.get("colour") is None or o["colour"] == claim["colour"])
            and (claim.get("size") is None or o["size"] == claim["size"])]


def false_claims(claims, scene):
    """The claims a scene graph contradicts, each with why: an object that is not there (the wrong colour,
    shape or size), at another position, a present object said absent, a wrong count or word."""
    wrong = []
    for claim in claims:
        if claim["kind"] == "object":
            found = matching(scene, claim)
            if not found:
                wrong.append((claim, "no such object"))
            elif claim["position"] and not any(position_of(o["center"]) == claim["position"] for o in found):
                wrong.append((claim, "not at that position"))
        elif claim["kind"] == "absent" and matching(scene, claim):
            wrong.append((claim, "the object is there"))
        elif claim["kind"] == "count" and claim["count"] != len(scene["objects"]):
            wrong.append((claim, f"{len(scene['objects'])} objects"))
        elif claim["kind"] == "word" and claim["word"] != scene["word"]:
            wrong.append((claim, f"the word is {scene['word']}"))
    return wrong


def hallucinated_object(claim, scene):
    """CHAIR's hallucinated object: an object claim whose (colour, shape) is not in the scene."""
    return claim["kind"] == "object" and not any(
        o["shape"] == claim["shape"] and (claim["colour"] is None or o["colour"] == claim["colour"])
        for o in scene["objects"])
