"""eval/gallery.py: the pairs page and the comparison page, parsed back with html.parser. One entry per pair and per
question; every image decodes and the augmented views equal an independent recomputation of what the model saw
(the image processor and diffusion noise called by hand); the filters name the classes present; the outcomes and
hallucination marks against hand-made answers; bad input in one line."""
import argparse
import base64
import io
import json
import os
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import common
import diffusion
import pairs
import seva
from toyworld import grammar as toygrammar
import vlm
from conftest import wrong_answer
from eval import compare, gallery, gallery_html, hallucination, toyvqa

pytestmark = pytest.mark.usefixtures("one_thread")
VOID = {"img", "meta", "br", "hr", "input", "link"}


# ----------------------------------------------------------------------------- the page read back
class Node:
    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children, self.text = tag, dict(attrs), [], ""

    def all(self, test):
        """This node's descendants (depth first) for which test(node) holds."""
        found = []
        for child in self.children:
            found += ([child] if test(child) else []) + child.all(test)
        return found

    def classes(self):
        return self.attrs.get("class", "").split()

    def words(self):
        return self.text + "".join(" " + child.words() for child in self.children)


class TreeBuilder(HTMLParser):
    """The page as a tree; every end tag must close the element open last (a malformed page fails)."""

    def __init__(self):
        super().__init__()
        self.root = Node("root", [])
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, text):
        self.stack[-1].text += text


def parse(path):
    builder = TreeBuilder()
    with open(path, encoding="utf-8") as f:
        builder.feed(f.read())
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


def entries(root):
    return root.all(lambda n: n.tag == "div" and "entry" in n.classes())


def images(entry):
    """The decoded images of an entry, as uint8 arrays."""
    arrays = []
    for img in entry.all(lambda n: n.tag == "img"):
        prefix, payload = img.attrs["src"].split(",", 1)
        assert prefix == "data:image/png;base64"
        arrays.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")))
    return arrays


def menu(root, name):
    """{value: option text} of the filter menu for data-NAME (the empty 'all' option left out)."""
    select = root.all(lambda n: n.tag == "select" and n.attrs.get("data-filter") == name)
    assert len(select) == 1, name
    return {o.attrs["value"]: o.text for o in select[0].all(lambda n: n.tag == "option") if o.attrs["value"]}


def spans(node, name):
    return [s.text for s in node.all(lambda n: n.tag == "span" and name in n.classes())]


def boxes(entry):
    return entry.all(lambda n: n.tag == "div" and "answer" in n.classes())


# ----------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def diffusion_pairs(toy_world, tmp_path_factory):
    """seva.py's pairs on the tiny world: diffusion noise at step 999 (so that some answers change)."""
    out = tmp_path_factory.mktemp("seva") / "pairs.jsonl"
    summary = seva.main(["--model", f"{toy_world}/model-sft", "--data", f"{toy_world}/pool.json", "--image-folder",
                         f"{toy_world}/images", "--noise-step", "999", "--max-new-tokens", "6", "--batch-size", "8",
                         "--num-samples", "16", "--seed", "0", "--no-progress", "--out", str(out)])
    assert summary["pairs"] >= 2, "pick arguments that keep some pairs"
    return str(out)


@pytest.fixture(scope="module")
def crop_pairs(diffusion_pairs, tmp_path_factory):
    """A second pairs file, built by hand: the same instances as made by rr_crop with 2 views (seva.py
    --augmentation rr_crop --num-negatives 2), two rejected answers each, reference log-probs on the first."""
    rows, run = gallery.read_pairs(diffusion_pairs)
    made = []
    for k, row in enumerate(rows):
        pair = {key: value for key, value in row.items() if key != "noise_step"}
        pair.update(augmentation="rr_crop", rejected=[row["rejected"], row["chosen"] + " too"])
        if k == 0:
            pair.update(reference_chosen_logps=-3.0, reference_rejected_logps=[-5.0, -4.5])
        made.append(pair)
    out = str(tmp_path_factory.mktemp("crop") / "pairs.jsonl")
    common.write_atomic(out, [json.dumps(pair) for pair in made])
    run["args"].update(augmentation="rr_crop", num_negatives=2, negative_steps=[500, 500], out=out)
    common.write_atomic(out + ".args.json", [json.dumps(run)])
    return out


def pixels_by_hand(processor, image):
    """The image processor's normalized pixels of one image, (C, H, W): the second path to what the model saw."""
    return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def rgb_by_hand(processor, pixels):
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    return ((pixels * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- the pairs page
def test_pairs_page_entries_views_and_filters(toy_world, diffusion_pairs, crop_pairs, tmp_path):
    page = tmp_path / "pairs.html"
    gallery.main([diffusion_pairs, crop_pairs, "--max-pairs", "0", "--out", str(page)])
    root = parse(page)
    noised, cropped = common.read_jsonl(diffusion_pairs), common.read_jsonl(crop_pairs)
    found = entries(root)
    assert len(found) == len(noised) + len(cropped)  # one entry per pair
    labels = {gallery_html.slug("diffusion, step 999"): noised, gallery_html.slug("rr_crop, 2 views"): cropped}
    assert set(menu(root, "augmentation")) == set(labels)
    processor = gallery.load_processor(f"{toy_world}/model-sft")[0]
    for label, rows in labels.items():
        mine = [e for e in found if e.attrs["data-augmentation"] == label]
        assert [e.all(lambda n: n.tag == "b")[0].text for e in mine] == [p["id"] for p in rows]  # in file order
        for entry, pair in zip(mine, rows):
            image = vlm.load_image(os.path.join(toy_world, "images", pair["image"]))  # seva.py pads (LLaVA-1.5)
            drawn, clean = images(entry), pixels_by_hand(processor, image)
            np.testing.assert_array_equal(drawn[0], rgb_by_hand(processor, clean))  # the original, as the model saw it
            if label.startswith("diffusion"):
                assert len(drawn) == 2
                generator = torch.Generator().manual_seed(common.sample_seed(0, pair["id"]))
                noisy = diffusion.diffusion_noise(clean, 999, generator)
                np.testing.assert_array_equal(drawn[1], rgb_by_hand(processor, noisy))
                assert np.abs(drawn[1].astype(int) - drawn[0]).mean() > 20  # the noise is there to see
            else:  # view j seeded by the instance id, then id/view1 (seva.view_ids)
                assert len(drawn) == 3
                for view, sample in enumerate([pair["id"], pair["id"] + "/view1"]):
                    crop = augment.rr_crop(image, common.sample_seed(0, sample))
                    by_hand = rgb_by_hand(processor, pixels_by_hand(processor, crop))
                    np.testing.assert_array_equal(drawn[1 + view], by_hand)
                assert not np.array_equal(drawn[1], drawn[2])
            shown = boxes(entry)
            assert len(shown) == 1 + len(pairs.rejected_list(pair["rejected"]))
    # the filters name the classes present, counted by the entries that hold them
    single = pairs.expand(noised + cropped)
    quality = menu(root, "quality")
    assert set(quality) == {gallery_html.slug(pairs.quality_of(p)) for p in single if "answer" in p}
    for value, text in quality.items():
        assert text.endswith(f"({sum(value in e.attrs['data-quality'].split() for e in found)})")
    # false claims: the pairs whose data answer is sentences of the grammar (one-word answers have none to check)
    scenes = common.read_records(os.path.join(toy_world, "scenes.json"))
    sentences = lambda rows: [p for p in rows
                              if all(toygrammar.parse(s) for s in toygrammar.split_sentences(p["answer"]))]
    assert 0 < len(sentences(noised)) < len(noised), "the tiny pairs should hold both kinds"
    counts = lambda rows: {c: sum(row[c] for row in hallucination.pair_claims(rows, scenes).values())
                           for c in hallucination.PAIR_CLASSES}
    assert set(menu(root, "claims")) == {gallery_html.slug(c) for c, n in counts(sentences(noised + cropped)).items() if n}
    noised_entries = [e for e in found if e.attrs["data-augmentation"].startswith("diffusion")]
    for c, n in counts(sentences(noised)).items():  # single negatives: one class per entry
        assert sum(e.attrs["data-claims"] == gallery_html.slug(c) for e in noised_entries) == n
    assert sum(e.attrs["data-claims"] == "" for e in noised_entries) == len(noised) - len(sentences(noised))
    # the reference margin only where the pairs carry reference log-probs
    margins = [e for e in found if "reference margin" in e.words()]
    assert len(margins) == 1 and "+2.000, +1.500" in margins[0].words()
    assert "2 views" in found[len(noised)].words() or "rr_crop" in found[len(noised)].words()


def test_views_pad_a_wide_image_as_seva_did(toy_world, tmp_path):
    """seva.py pads each image to a square before the processor (LLaVA-1.5); the views do too, and its noise."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    processor, config = gallery.load_processor(f"{toy_world}/model-sft")
    run = dict(pad=True, template="llava_v1", augmentation="diffusion", noise_step=300, seed=3)
    pair = dict(id="wide-0", image="wide.png", question="Describe the image in detail.")
    (_, original), (caption, noisy) = gallery.pair_views(pair, run, processor, config, str(tmp_path))
    padded = vlm.pad_to_square(Image.open(tmp_path / "wide.png").convert("RGB"))
    clean = pixels_by_hand(processor, padded)
    np.testing.assert_array_equal(np.asarray(original), rgb_by_hand(processor, clean))
    generator = torch.Generator().manual_seed(common.sample_seed(3, "wide-0"))
    by_hand = rgb_by_hand(processor, diffusion.diffusion_noise(clean, 300, generator))
    np.testing.assert_array_equal(np.asarray(noisy), by_hand)
    assert caption == "diffusion t=300"


def test_pairs_page_is_capped_and_says_so(diffusion_pairs, tmp_path):
    page = tmp_path / "capped.html"
    gallery.main([diffusion_pairs, "--max-pairs", "1", "--out", str(page)])
    root = parse(page)
    assert len(entries(root)) == 1
    assert "capped by --max-pairs 1" in root.words()
    total = len(common.read_jsonl(diffusion_pairs))
    assert f"of {total} pairs" in root.words()


def test_word_diff_and_hallucinated_objects_by_hand():
    scene = dict(objects=[dict(shape="circle", colour="red", size="small", center=[10, 10])], word="cat")
    html = gallery_html.marked("A small red circle and a small blue circle.", ["A small red circle."], scene)
    root = TreeBuilder()
    root.feed(f"<p>{html}</p>")
    paragraph = root.root.children[0]
    assert spans(paragraph, "diff") == ["and", "a", "small", "blue", "circle."]  # what the other answer lacks
    assert spans(paragraph, "halluc") == ["blue", "circle."]  # a blue circle is not in the scene
    assert gallery_html.hallucinated_words("The circle is blue. The circle is red.", scene) == {1, 3}
    assert gallery_html.hallucinated_words("A small red circle.", scene) == set()
    assert gallery_html.changed_words(["a", "b", "c"], ["a", "x", "c"]) == {1}
    assert gallery_html.stratified(list("aabbbc"), lambda x: x, 3) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- the comparison page
@pytest.fixture(scope="module")
def compare_dir(toy_world, tmp_path_factory):
    """An eval.compare OUT folder built by hand: compare.json and the answer files of both models. SFT answers
    right on even questions, SeVa on every third; a wrong caption names a colour the scene may lack."""
    out = tmp_path_factory.mktemp("compare")
    val, world = os.path.join(toy_world, "val.json"), toy_world
    sources = [("toyvqa-clean.jsonl", common.read_records(val))]
    sources += [(f"{kind}-clean.jsonl", common.read_records(os.path.join(world, f"val-{kind}s.json")))
                for kind in ("sentence", "caption", "description")]
    for name, right_when in (("sft", lambda i: i % 2 == 0), ("seva", lambda i: i % 3 == 0)):
        os.makedirs(out / "answers" / name)
        for file, records in sources:
            rows = []
            for i, record in enumerate(records):
                _, question, truth, family = toyvqa.first_question(record)
                text = truth if right_when(i) else wrong_answer(family if "caption" not in file and "description"
                                                                not in file else "caption", truth, i)
                rows.append(dict(question_id=record["id"], prompt=question, text=text))
            common.write_atomic(str(out / "answers" / name / file), [json.dumps(r) for r in rows])
        for split in ("random", "popular"):
            rows = common.read_jsonl(os.path.join(world, "pope", f"{split}.jsonl"))
            said = [dict(question_id=r["question_id"], prompt=r["text"],
                         text=("Yes" if r["label"] == "yes" else "No") if right_when(i) else
                         ("No" if r["label"] == "yes" else "Yes")) for i, r in enumerate(rows)]
            common.write_atomic(str(out / "answers" / name / f"pope-{split}.jsonl"), [json.dumps(r) for r in said])
    args = dict(val=val, world=world, pope_dir=os.path.join(world, "pope"), pope_splits=["random", "popular"],
                image_folder=os.path.join(world, "images"))
    common.write_atomic(str(out / "compare.json"), [json.dumps(dict(args=args, models=dict(SFT="sft", SeVa="seva")))])
    return str(out)


def false_claims(text, scene):
    """Each claim the scene contradicts, and each sentence outside the grammar."""
    parsed = [toygrammar.parse(s) for s in toygrammar.split_sentences(text)]
    return sum(1 if claims is None else len(toygrammar.false_claims(claims, scene)) for claims in parsed)


def expected_outcomes(compare_dir, toy_world):
    """{(kind, question id): outcome} from the answer files, by the rules written out again here."""
    scenes = common.read_records(os.path.join(toy_world, "scenes.json"))
    said = lambda name, file: {r["question_id"]: r["text"] for r in
                               common.read_jsonl(os.path.join(compare_dir, "answers", name, file))}
    decide = lambda sft, seva: "won" if seva and not sft else "lost" if sft and not seva else "tied"
    expected = {}
    for kind, path in (("short answer", "val.json"), ("sentence", "val-sentences.json"),
                       ("caption", "val-captions.json"), ("description", "val-descriptions.json")):
        file = "toyvqa-clean.jsonl" if kind == "short answer" else f"{kind}-clean.jsonl"
        sft, seva_said = said("sft", file), said("seva", file)
        for record in common.read_records(os.path.join(toy_world, path)):
            truth, scene, q = record["conversations"][1]["value"], scenes[record["image"]], record["id"]
            if kind == "short answer":
                expected[kind, q] = decide(sft[q].lower() == truth.lower(), seva_said[q].lower() == truth.lower())
            elif kind == "sentence":
                expected[kind, q] = decide(sft[q] == truth, seva_said[q] == truth)  # wrong ones are one word
            else:
                a, b = false_claims(sft[q], scene), false_claims(seva_said[q], scene)
                expected[kind, q] = "won" if b < a else "lost" if b > a else "tied"
    for split in ("random", "popular"):
        rows = common.read_jsonl(os.path.join(toy_world, "pope", f"{split}.jsonl"))
        labels = {r["question_id"]: r["label"] for r in rows}
        sft, seva_said = said("sft", f"pope-{split}.jsonl"), said("seva", f"pope-{split}.jsonl")
        for q, label in labels.items():
            expected["POPE", f"{split}/{q}"] = decide(sft[q].lower() == label, seva_said[q].lower() == label)
    return expected


def test_compare_page_outcomes_marks_and_filters(toy_world, compare_dir, tmp_path):
    page = tmp_path / "compare.html"
    gallery.main(["--compare", compare_dir, "--max-questions", "0", "--out", str(page)])
    root = parse(page)
    expected = expected_outcomes(compare_dir, toy_world)
    found = entries(root)
    assert len(found) == len(expected)  # one entry per compared question
    kind_of = {gallery_html.slug(kind): kind for kind, _ in expected}
    got = {(kind_of[e.attrs["data-kind"]], e.all(lambda n: n.tag == "b")[0].text): e.attrs["data-outcome"]
           for e in found}
    assert got == {(kind, str(q)): result for (kind, q), result in expected.items()}
    assert set(menu(root, "kind")) == set(kind_of) and len(kind_of) == 5
    assert set(menu(root, "outcome")) == set(expected.values()) == {"won", "lost", "tied"}
    # the summary's won / lost / tied per kind
    rows = {r.all(lambda n: n.tag == "td")[0].text: [c.text for c in r.all(lambda n: n.tag == "td")[1:5]]
            for r in root.all(lambda n: n.tag == "tr") if r.all(lambda n: n.tag == "td")}
    for kind in kind_of.values():
        mine = [o for (k, _), o in expected.items() if k == kind]
        assert rows[kind] == [str(len(mine))] + [str(mine.count(o)) for o in ("won", "lost", "tied")]
    # ... and they are compare.md's pair-wise counts (eval.compare's own path from the same answer files)
    settings = argparse.Namespace(pope_dir=os.path.join(toy_world, "pope"), pope_splits=["random", "popular"],
                                  gqa_dir="", val=os.path.join(toy_world, "val.json"), noise_step=None, mc=[],
                                  world=toy_world)
    per = {name: compare.outcomes(os.path.join(compare_dir, "answers", name), settings, {"open": True})
           for name in ("sft", "seva")}
    for kind, bench in (("short answer", "VQA"), ("sentence", "Sentences"), ("POPE", "POPE")):
        counts = compare.win_lose_tie(per["sft"][bench], per["seva"][bench])
        assert rows[kind][1:] == [str(counts[k]) for k in ("win", "lose", "tie")]
    # hallucinated objects marked in exactly the answers that name one, with only those objects' words
    scenes, hallucinating = common.read_records(os.path.join(toy_world, "scenes.json")), 0
    for kind in ("caption", "description"):
        records = {r["id"]: r for r in common.read_records(os.path.join(toy_world, f"val-{kind}s.json"))}
        said = {name: {r["question_id"]: r["text"] for r in
                       common.read_jsonl(os.path.join(compare_dir, "answers", name, f"{kind}-clean.jsonl"))}
                for name in ("sft", "seva")}
        for entry in (e for e in found if e.attrs["data-kind"] == kind):
            record = records[entry.all(lambda n: n.tag == "b")[0].text]
            scene = scenes[record["image"]]
            for box, name in zip(boxes(entry), ("sft", "seva")):
                claims = hallucination.answer_claims(said[name][record["id"]])[0]
                wrong = [c for c in claims if toygrammar.hallucinated_object(c, scene)]
                names = {word for c in wrong for word in (c["colour"], c["shape"]) if word}
                marks = [w.strip(".,").lower() for w in spans(box, "halluc")]
                assert bool(marks) == bool(wrong) and set(marks) <= names
                hallucinating += bool(wrong)
            image = vlm.load_image(os.path.join(toy_world, "images", record["image"]), pad=False)
            np.testing.assert_array_equal(images(entry)[0], np.asarray(image))
    assert hallucinating > 0, "some wrong captions should name an object the scene lacks"


# ----------------------------------------------------------------------------- the command line
def run_cli(monkeypatch, *argv):
    """The script as `python -m eval.gallery` runs it: its exit message (a user error is one line)."""
    monkeypatch.setattr(sys, "argv", ["eval.gallery", *argv])
    with pytest.raises(SystemExit) as stop:
        common.run_main(gallery.main, "eval.gallery")
    return str(stop.value.code)


def test_bad_input_is_one_line_naming_file_and_line(diffusion_pairs, tmp_path, monkeypatch):
    out = str(tmp_path / "page.html")
    message = run_cli(monkeypatch, str(tmp_path / "nothing.jsonl"), "--out", out)
    assert message == f"eval.gallery: error: {tmp_path / 'nothing.jsonl'}: no such file"
    bad = tmp_path / "bad.jsonl"
    with open(diffusion_pairs) as f:
        first = f.readline()
    bad.write_text(first + "{not json\n")
    message = run_cli(monkeypatch, str(bad), "--out", out)
    assert message.startswith(f"eval.gallery: error: {bad}:2: malformed json line") and "\n" not in message
    bad.write_text(first)
    assert f"{bad}.args.json: no such file" in run_cli(monkeypatch, str(bad), "--out", out)
    assert "compare.json: no such file" in run_cli(monkeypatch, "--compare", str(tmp_path), "--out", out)
    assert not os.path.exists(out)


def test_every_flag_has_help(monkeypatch):
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: parsers.append(self) or parse_args(self, *a, **k))
    gallery.parse_args(["--compare", "x", "--out", "y"])
    assert len(parsers) == 1 and len(parsers[0]._actions) == 10
    assert all(action.help for action in parsers[0]._actions)
