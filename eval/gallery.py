"""
A gallery of what SeVa made and what it changed: one self-contained HTML page (images inlined as PNG data URIs,
no server, no network, a few lines of inline script for the filters), to read the pairs and answers behind the
counts.

The pairs seva.py made (several files make one page, e.g. one per augmentation):
    python -m eval.gallery runs/seva/pairs.jsonl --out runs/gallery/pairs.html
  each pair: the original image and each augmented view as the model saw them (the processor's pixels, noised as
  seva.answer_chunk noised them, mapped back to RGB), remade from the pair's id and seva.py's arguments in
  PAIRS.args.json; the question; chosen and rejected with their word-level difference marked; the data's answer
  and the pair's quality class (pairs.QUALITY); on the toy world, for open-ended answers, the false claims of each
  side with the hallucinated objects marked; the reference margin where the pairs carry reference log-probs
  (seva.py --reference-logps).

What SeVa changed (eval.compare's OUT: compare.json, answers/{sft,seva}/):
    python -m eval.gallery --compare runs/compare --out runs/gallery/compare.html
  each toy-world question: SFT's answer beside SeVa's, won / lost / tied by the rule of its kind (RULES), the
  hallucinated objects of each answer marked.
"""
import argparse
import base64
import difflib
import html
import io
import os
import re
from collections import Counter

import numpy as np
import torch
from PIL import Image

import augment
import common
import pairs
import seva
from toyworld import grammar as toygrammar
import vlm
from eval import hallucination, pope, toyvqa

PAIR_KEYS = ("id", "image", "question", "chosen", "rejected", "augmentation")
OUTCOMES = ("won", "lost", "tied")
RIGHT_WRONG = "; won = SeVa right where SFT is wrong"
RULES = {  # how SeVa's answer to a question wins against SFT's, by kind of question
    "caption": "fewer false claims against the scene graph wins (eval/hallucination.py false_count)",
    "description": "fewer false claims against the scene graph wins (eval/hallucination.py false_count)",
    "sentence": "right = the expected claim and no false one (eval/hallucination.py)" + RIGHT_WRONG,
    "short answer": "right = exact match with the label, case-insensitive (eval/toyvqa.py)" + RIGHT_WRONG,
    "POPE": "right = the yes/no read from the answer equals the label (eval/pope.py)" + RIGHT_WRONG,
}


# ----------------------------------------------------------------------------- HTML pieces
def esc(text):
    """Text made safe inside HTML (answers are model output: any character may come)."""
    return html.escape(str(text), quote=True)


def slug(label):
    """A filter value for a label: lowercase words joined by '-' (labels hold spaces and commas)."""
    return re.sub(r"[^a-z0-9]+", "-", str(label).lower()).strip("-")


def figure(image, caption, max_side):
    """An image as a base64 PNG data URI, downscaled to max_side pixels (0: never) to keep the page light; None
    (the patch layout of Qwen2-VL, no image) is said so."""
    caption = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    if image is None:
        return f'<figure><div class="none">not drawn: the pixels are patches</div>{caption}</figure>'
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<figure><img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">{caption}</figure>'


def changed_words(words, other):
    """Indices of `words` that a word-level diff (difflib) against the word list `other` does not match; words
    compared lowercased, without the punctuation that ends them."""
    key = lambda ws: [w.rstrip(".,;:!?").lower() for w in ws]
    matcher = difflib.SequenceMatcher(None, key(words), key(other), autojunk=False)
    return {i for tag, i1, i2, _, _ in matcher.get_opcodes() if tag != "equal" for i in range(i1, i2)}


def hallucinated_words(text, scene):
    """Indices of text.split()'s words that name an object the scene lacks (CHAIR's hallucinated objects,
    toygrammar.hallucinated_object): the claim's "colour shape" where the sentence says it so, else its colour
    and shape words in that sentence."""
    marked, offset = set(), 0
    for sentence in toygrammar.split_sentences(text):
        words = [word.strip(".,").lower() for word in sentence.split()]
        for claim in toygrammar.parse(sentence) or []:
            if toygrammar.hallucinated_object(claim, scene):
                names = [name for name in (claim["colour"], claim["shape"]) if name]
                starts = [k for k in range(len(words)) if words[k:k + len(names)] == names]
                marked.update(offset + k + j for k in starts for j in range(len(names)))
                if not starts:
                    marked.update(offset + k for k, word in enumerate(words) if word in names)
        offset += len(words)
    return marked


def marked(text, others=(), scene=None):
    """An answer as HTML: a word that no answer of `others` keeps is marked (class diff), a word naming a
    hallucinated object underlined (class halluc)."""
    words = text.split()
    changed = set.intersection(*[changed_words(words, o.split()) for o in others]) if others else set()
    wrong = hallucinated_words(text, scene) if scene else set()
    out = []
    for i, word in enumerate(words):
        classes = " ".join(name for name, on in (("diff", i in changed), ("halluc", i in wrong)) if on)
        out.append(f'<span class="{classes}">{esc(word)}</span>' if classes else esc(word))
    return " ".join(out) or "<i>(empty)</i>"


def answer_box(title, text, others, scene):
    """One answer in its box: a title line, then the marked words (`marked`)."""
    return f'<div class="answer"><h4>{esc(title)}</h4><p>{marked(text, others, scene)}</p></div>'


def claims_text(count):
    """The count of false claims in words: 1 false claim, 2 false claims."""
    return f"{count} false claim" + ("" if count == 1 else "s")


def table(header, rows):
    """An HTML table of a header row and rows of cells (already HTML)."""
    cells = lambda tag, row: "".join(f"<{tag}>{cell}</{tag}>" for cell in row)
    return f"<table><tr>{cells('th', header)}</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) + "</table>"


def stratified(items, key, cap):
    """Up to cap items (0: all), taken in turn from each group of key(item), so that every kind and class shows
    before any shows twice; returned in the items' order."""
    if not cap or cap >= len(items):
        return list(items)
    groups = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    queues, taken = list(groups.values()), []
    while len(taken) < cap:
        for queue in queues:
            if queue and len(taken) < cap:
                taken.append(queue.pop(0))
    return [items[i] for i in sorted(taken)]


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:16px 24px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 8px}table{border-collapse:collapse;margin:8px 0;font-size:13px}th{background:#f3f3f3}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top;overflow-wrap:break-word}
.tables{display:flex;flex-wrap:wrap;gap:0 16px;align-items:flex-start}
.filters{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ccc;z-index:1}
.filters label{margin-right:16px}.entry{display:flex;gap:16px;border-bottom:1px solid #ddd;padding:12px 0}
[hidden]{display:none!important}.images{display:flex;gap:8px;flex:none}figure{margin:0;width:160px}
figure img{width:160px;image-rendering:pixelated;display:block}.none{width:160px;height:160px;background:#eee}
figcaption{font-size:12px;color:#555;overflow-wrap:anywhere}.body{flex:1;min-width:0}
.answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:8px}
.answer{border:1px solid #ddd;border-radius:4px;padding:4px 8px}.answer h4{margin:0;font-size:12px;color:#555}
p{margin:4px 0;overflow-wrap:anywhere;white-space:pre-wrap}.meta{font-size:12px;color:#555}
.diff{background:#ffe58a}.halluc{text-decoration:underline wavy #d00;color:#b00}
.tag{display:inline-block;border-radius:3px;padding:0 6px;margin-right:4px;background:#eee;font-size:12px}
.won{background:#c8efc8}.lost{background:#f6c6c6}.note{color:#555}"""
SCRIPT = """const menus=[...document.querySelectorAll('select[data-filter]')];
function apply(){let shown=0;for(const e of document.querySelectorAll('.entry')){
const ok=menus.every(m=>!m.value||(e.dataset[m.dataset.filter]||'').split(' ').includes(m.value));
e.hidden=!ok;shown+=ok;}document.getElementById('shown').textContent=shown;}
menus.forEach(m=>m.onchange=apply);"""


def page(title, summary, filters, entries, note):
    """The whole page: title, summary, a menu per filter ({attribute: (label, values)}: the values an entry
    holds, space-separated, in its data-ATTRIBUTE), the entries, and the script that hides what a menu leaves out."""
    menus = "".join(f'<label>{esc(label)} <select data-filter="{name}"><option value="">all</option>' + "".join(
        f'<option value="{slug(value)}">{esc(value)} ({count})</option>' for value, count in Counter(values).items())
        + "</select></label>" for name, (label, values) in filters.items() if values)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{summary}"
            f'<div class="filters">{menus} showing <span id="shown">{len(entries)}</span> '
            f'<span class="note">{esc(note)}</span></div>{"".join(entries)}<script>{SCRIPT}</script></body></html>')


def cap_note(shown, total, what, flag, groups):
    """What the page shows of all: every entry, or how the cap chose them."""
    if shown < total:
        return f"(of {total} {what}: capped by {flag}, taken in turn from each {groups})"
    return f"(all {total} {what})"


# ----------------------------------------------------------------------------- the pairs seva.py made
def read_pairs(path):
    """(pairs, seva.py's {args, summary}) of a pairs file and its OUT.args.json; errors name the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows = common.read_jsonl(path)
    for number, row in enumerate(rows, 1):
        missing = [key for key in PAIR_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"{path}: record {number}: missing {', '.join(missing)} (not a seva.py pairs file?)")
    if not os.path.isfile(path + ".args.json"):
        raise ValueError(f"{path}.args.json: no such file (seva.py writes it beside the pairs; the augmented views "
                         f"are remade from its arguments)")
    return rows, common.read_records(path + ".args.json")


def load_processor(model_dir):
    """(processor, config) of a local model folder: all the views need, no weights."""
    from transformers import AutoConfig, AutoProcessor
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir}: not a model folder (no config.json); pass the folder seva.py used as --model")
    return (AutoProcessor.from_pretrained(model_dir, local_files_only=True),
            AutoConfig.from_pretrained(model_dir, local_files_only=True))


def picture(pixels, processor, config):
    """Normalized pixels back to an RGB image (x * std + mean with the processor's image_mean / image_std,
    clipped to 0..1), crops (or tiles) side by side; None for the patch layout, which is no image."""
    if vlm.spec(config)["pixels"] == "patches":
        return None
    image_processor = processor.image_processor
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in
                 (image_processor.image_mean, image_processor.image_std))
    rgb = pixels.float() * std + mean  # (C, H, W) or (crops, C, H, W)
    if rgb.dim() == 4:
        rgb = torch.cat(list(rgb), dim=-1)  # crops side by side: (C, H, crops x W)
    return Image.fromarray((rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def view_steps(run):
    """The noise step of each augmented view seva.py made of an instance (one, or --num-negatives K)."""
    return run.get("negative_steps") or [run["noise_step"]]


def pair_views(pair, run, processor, config, image_folder):
    """[(caption, image)]: the original and each augmented view of a pair as the model saw them, remade as
    seva.answer_chunk made them (the same padding, prompt, augmentation, seeds view_ids(id, view) and noise)."""
    image = vlm.load_image(os.path.join(image_folder, pair["image"]), pad=run["pad"])
    prompt = vlm.prompt_text(processor, pair["question"], run["template"])
    pixels_of = lambda shown: vlm.image_pixels(processor(images=[shown], text=[prompt], return_tensors="pt"), config)[0]
    views, steps = [("original", picture(pixels_of(image), processor, config))], view_steps(run)
    for view, step in enumerate(steps):
        augmented, pixel_transform = augment.augmented_batch(run["augmentation"], [image],
                                                             seva.view_ids([pair["id"]], view), run["seed"], step,
                                                             run.get("noise_schedule", "sigmoid"))
        pixels = pixels_of(augmented[0])
        if pixel_transform is not None:  # diffusion: on the processor's pixels, as generate.py applies it
            pixels = pixel_transform([pixels], [0])[0]
        caption = run["augmentation"] + (f" t={step}" if run["augmentation"] == "diffusion" else "")
        views.append((caption + (f", view {view + 1}" if len(steps) > 1 else ""), picture(pixels, processor, config)))
    return views


def augmentation_label(run):
    """The filter label of a run's augmentation, with its noise step(s) and number of views."""
    steps = view_steps(run)
    label = run["augmentation"] + (f", step {', '.join(str(s) for s in sorted(set(steps)))}"
                                   if run["augmentation"] == "diffusion" else "")
    return label + (f", {len(steps)} views" if len(steps) > 1 else "")


def open_ended(pair):
    """Is the pair's answer (the data's, else chosen) sentences of the toy grammar, whose claims can be checked?
    One-word answers are not: their false claims would only count them unparsed."""
    sentences = toygrammar.split_sentences(pair.get("answer", pair["chosen"]))
    return bool(sentences) and all(toygrammar.parse(s) is not None for s in sentences)


def pair_classes(pair, scene):
    """(quality classes, false-claims classes) of a pair, one per rejected answer: pairs.quality_of where it has
    the data's answer; hallucination.PAIR_CLASSES where its image has a scene and its answers are open-ended."""
    single = pairs.expand([pair])
    quality = [pairs.quality_of(p) for p in single if "answer" in p]
    if scene is None or not open_ended(pair):
        return quality, []
    counts = [(hallucination.false_count(p["chosen"], scene), hallucination.false_count(p["rejected"], scene))
              for p in single]
    return quality, [hallucination.PAIR_CLASSES[(c >= r) + (c > r)] for c, r in counts]


def reference_margin(pair):
    """log ref(chosen) - log ref(rejected j) of each rejected answer where the pair carries the reference
    log-probs (seva.py --reference-logps), else None."""
    if "reference_chosen_logps" not in pair:
        return None
    return [pair["reference_chosen_logps"] - r for r in pairs.rejected_list(pair["reference_rejected_logps"])]


def pair_entry(item, views, max_side):
    """One pair's div: its views, then the question, chosen beside each rejected answer, the data's answer."""
    pair, scene = item["pair"], item["scene"] if item["claims"] else None
    rejected = pairs.rejected_list(pair["rejected"])
    claims = lambda text: f" · {claims_text(hallucination.false_count(text, scene))}" if scene else ""
    steps = [f" · step {step}" for step in pair["noise_steps"]] if "noise_steps" in pair else [""] * len(rejected)
    boxes = [answer_box("chosen (original image)" + claims(pair["chosen"]), pair["chosen"], rejected, scene)]
    boxes += [answer_box((f"rejected {j + 1}" if len(rejected) > 1 else "rejected (augmented image)") + steps[j]
                         + claims(text), text, [pair["chosen"]], scene) for j, text in enumerate(rejected)]
    tags = "".join(f'<span class="tag">{esc(name)}</span>' for name in dict.fromkeys(item["quality"] + item["claims"]))
    lines = [f'<p class="meta"><b>{esc(pair["id"])}</b> · {esc(pair["image"])} · {esc(item["label"])} {tags}</p>',
             f'<p><b>Q:</b> {esc(pair["question"])}</p>', f'<div class="answers">{"".join(boxes)}</div>']
    if "answer" in pair:
        lines.append(f'<p class="meta">the data\'s answer (never used to make the pair): {esc(pair["answer"])}</p>')
    if reference_margin(pair):
        lines.append('<p class="meta">reference margin, log ref(chosen) - log ref(rejected): '
                     + ", ".join(f"{m:+.3f}" for m in reference_margin(pair)) + "</p>")
    values = lambda names: " ".join(slug(name) for name in dict.fromkeys(names))
    figures = "".join(figure(image, caption, max_side) for caption, image in views)
    return (f'<div class="entry" data-quality="{values(item["quality"])}" data-claims="{values(item["claims"])}" '
            f'data-augmentation="{slug(item["label"])}"><div class="images">{figures}</div>'
            f'<div class="body">{"".join(lines)}</div></div>')


SUMMARY = {  # the summary's tables, side by side: their rows
    "the run": ["augmentation", "model, seed", "instances", "answered", "pairs kept", "mean words, chosen",
                "mean words, rejected", "with reference log-probs"],
    "quality, vs the data's answer": list(pairs.QUALITY),
    "false claims, vs the scene": list(hallucination.PAIR_CLASSES),
}


def pairs_summary(rows, run, items):
    """One file's column of each SUMMARY table: its run, the pairs kept of the answers, lengths, classes."""
    single, args, summary = pairs.expand(rows), run["args"], run.get("summary", {})
    words = lambda key: f"{sum(len(p[key].split()) for p in single) / max(len(single), 1):.1f}"
    quality, claims = [q for i in items for q in i["quality"]], [c for i in items for c in i["claims"]]
    share = lambda names, name: f"{names.count(name)} ({100 * names.count(name) / len(names):.0f}%)" if names else "-"
    return [[esc(augmentation_label(args)), esc(f"{args['model']}, {args['seed']}"), summary.get("instances", "-"),
             summary.get("answered", "-"), len(rows), words("chosen"), words("rejected"),
             sum(reference_margin(pair) is not None for pair in rows)],
            [share(quality, name) for name in pairs.QUALITY],
            [share(claims, name) for name in hallucination.PAIR_CLASSES]]


def pairs_page(args):
    """The pairs page and how many pairs it shows."""
    items, columns, processors = [], [], {}
    for path in args.pairs:
        rows, run = read_pairs(path)
        scenes_path = os.path.join(os.path.dirname(run["args"]["data"]), "scenes.json") if args.scenes is None \
            else args.scenes
        scenes = common.read_records(scenes_path) if scenes_path and os.path.isfile(scenes_path) else {}
        label, mine = augmentation_label(run["args"]), []
        for pair in rows:
            quality, claims = pair_classes(pair, scenes.get(pair["image"]))
            mine.append(dict(pair=pair, run=run["args"], label=label, quality=quality, claims=claims, file=path,
                             scene=scenes.get(pair["image"])))
        items += mine
        columns.append(pairs_summary(rows, run, mine))
    shown = stratified(items, lambda i: (i["file"], tuple(i["quality"]), tuple(i["claims"])), args.max_pairs)
    entries = []
    for item in shown:
        model = args.model or item["run"]["model"]
        processors.setdefault(model, load_processor(model))
        folder = args.image_folder or item["run"]["image_folder"]
        views = pair_views(item["pair"], item["run"], *processors[model], folder)
        entries.append(pair_entry(item, views, args.image_size))
    tables = [table([esc(title)] + [esc(path) for path in args.pairs],
                    [[name] + [column[t][k] for column in columns] for k, name in enumerate(names)])
              for t, (title, names) in enumerate(SUMMARY.items())]
    summary = (f'<div class="tables">{"".join(tables)}</div><p class="note">Images: the processor\'s pixels as the '
               'model saw them, mapped back to RGB, each augmented view remade from its pair\'s seed. Quality and '
               'false claims count each rejected answer once; false claims: open-ended answers on the toy world. '
               'Marked words: a word of one answer the other does not keep (word-level diff); underlined: an object '
               'the scene lacks (hallucinated).</p>')
    filters = {"quality": ("quality", [q for i in items for q in dict.fromkeys(i["quality"])]),
               "claims": ("false claims", [c for i in items for c in dict.fromkeys(i["claims"])]),
               "augmentation": ("augmentation", [i["label"] for i in items])}
    note = cap_note(len(shown), len(items), "pairs", f"--max-pairs {args.max_pairs}", "file and class")
    return page("SeVa pairs: chosen on the image, rejected on its augmented view", summary, filters, entries,
                note), len(shown)


# ----------------------------------------------------------------------------- what SeVa changed (eval.compare)
def compared_questions(compare_dir):
    """(model ids, image folder, questions): every toy-world question eval.compare answered, each a dict of kind,
    family, id, image, question, truth, record, scene, answers, verdicts and outcome (SeVa's against SFT's)."""
    path = os.path.join(compare_dir, "compare.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (eval.compare writes it into its --out)")
    report = common.read_records(path)
    args, world = report["args"], report["args"].get("world") or ""
    for flag, value in (("--world", world), ("--val", args.get("val")), ("--pope-dir", args.get("pope_dir"))):
        if value and not os.path.exists(value):
            raise ValueError(f"{path}: its {flag} {value}: no such file or folder (run from where eval.compare ran)")
    sources = toy_sources(world, args.get("val"), args.get("pope_dir"), args.get("pope_splits"))
    dirs = {name: os.path.join(compare_dir, "answers", name.lower()) for name in ("SFT", "SeVa")}
    questions = answered_questions(sources, dirs, common.read_records(os.path.join(world, "scenes.json"))
                                   if world else {})
    return report.get("models", {}), args.get("image_folder") or ".", questions


def toy_sources(world, val=None, pope_dir=None, pope_splits=()):
    """[(kind, answer file, records)] of the toy-world questions a model answered: the world's open-ended and
    sentence files, the short answers of `val`, and POPE's splits, as eval.compare names their answer files."""
    sources = []
    for kind in hallucination.KINDS + ("sentence",):
        if world and os.path.isfile(os.path.join(world, f"val-{kind}s.json")):
            sources.append((kind, f"{kind}-clean.jsonl", common.read_records(os.path.join(world, f"val-{kind}s.json"))))
    if val:
        sources.append(("short answer", "toyvqa-clean.jsonl", common.read_records(val)))
    for split in (pope_splits or []) if pope_dir else []:
        sources.append(("POPE", f"pope-{split}.jsonl", pope.read_pope(pope.split_file(pope_dir, split))))
    return sources


def answered_questions(sources, answer_dirs, scenes):
    """Every question of `sources` with both models' answers (answer_dirs: {"SFT": folder, "SeVa": folder}), its
    verdicts by its kind's rule and SeVa's outcome against SFT's."""
    questions = []
    for kind, file, records in sources:
        fields = [question_fields(kind, file, record, scenes) for record in records]
        answers = {}
        for name, folder in answer_dirs.items():
            answer_path = os.path.join(folder, file)
            answers[name] = {row["question_id"]: row["text"] for row in common.read_jsonl(answer_path)}
            missing = [q["question_id"] for q in fields if q["question_id"] not in answers[name]]
            if missing:
                raise ValueError(f"{answer_path}: no answer for question ids {missing[:5]}")
        for question in fields:
            question["answers"] = {name: answers[name][question["question_id"]] for name in answers}
            question["verdicts"] = {name: verdict(question, text) for name, text in question["answers"].items()}
            question["outcome"] = outcome(kind, question["verdicts"]["SFT"], question["verdicts"]["SeVa"])
            questions.append(question)
    return questions


def question_fields(kind, file, record, scenes):
    """A compared question's kind, family, ids, image, question text, truth, its record and its scene."""
    if kind == "POPE":
        split, qid = file[len("pope-"):-len(".jsonl")], record["question_id"]
        return dict(kind=kind, family=split, question_id=qid, id=f"{split}/{qid}", image=record["image"],
                    question=record["text"], truth=record["label"], record=record, scene=scenes.get(record["image"]))
    image, question, truth, family = toyvqa.first_question(record)
    return dict(kind=kind, family=family, question_id=record["id"], id=record["id"], image=image,
                question=question.replace(vlm.SINGLE_WORD, "").strip(), truth=truth, record=record,
                scene=scenes.get(image))


def verdict(question, text):
    """What one answer scored by its kind's rule (RULES): right (bool), or its false claims (int)."""
    kind, record, scene = question["kind"], question["record"], question["scene"]
    if kind == "short answer":
        return toyvqa.is_right(text, record)
    if kind == "sentence":
        return scene is not None and hallucination.sentence_right(text, record, scene)
    if kind == "POPE":
        return pope.correctness([record], [dict(question_id=record["question_id"], text=text)])[0]
    return hallucination.false_count(text, scene)


def outcome(kind, sft, seva_verdict):
    """won / lost / tied: SeVa's verdict against SFT's (fewer false claims, or right where SFT is wrong)."""
    better, worse = (seva_verdict < sft, seva_verdict > sft) if kind in hallucination.KINDS else (
        seva_verdict and not sft, sft and not seva_verdict)
    return OUTCOMES[0 if better else 1 if worse else 2]


def compare_entry(question, image, max_side):
    """One question's div: the image, the question, SFT's answer beside SeVa's, the truth, the outcome."""
    counted = question["kind"] in hallucination.KINDS
    boxes = [answer_box(f"{name} · " + (claims_text(question["verdicts"][name]) if counted else
                                        "right" if question["verdicts"][name] else "wrong"),
                        question["answers"][name], [question["answers"][other]], question["scene"])
             for name, other in (("SFT", "SeVa"), ("SeVa", "SFT"))]
    kind = question["kind"] + (f" ({question['family']})" if question["family"] != question["kind"] else "")
    lines = [(f'<p class="meta"><b>{esc(question["id"])}</b> · {esc(kind)} · {esc(question["image"])} '
              f'<span class="tag {question["outcome"]}">SeVa {question["outcome"]}</span></p>'),
             f'<p><b>Q:</b> {esc(question["question"])}</p>', f'<div class="answers">{"".join(boxes)}</div>',
             f'<p class="meta">{"reference" if counted else "truth"}: {esc(question["truth"])}</p>']
    return (f'<div class="entry" data-kind="{slug(question["kind"])}" data-outcome="{question["outcome"]}">'
            f'<div class="images">{figure(image, "", max_side)}</div><div class="body">{"".join(lines)}</div></div>')


def kind_row(kind, questions):
    """The summary row of one kind: questions, won / lost / tied, each model's score and mean answer length."""
    counted, count = kind in hallucination.KINDS, len(questions)
    score = lambda name: sum(q["verdicts"][name] for q in questions) / count
    words = lambda name: sum(len(q["answers"][name].split()) for q in questions) / count
    scores = " / ".join(f"{score(n):.2f}" if counted else f"{100 * score(n):.1f}%" for n in ("SFT", "SeVa"))
    return [esc(kind), count] + [sum(q["outcome"] == o for q in questions) for o in OUTCOMES] + [
        ("mean false claims " if counted else "right ") + scores, f"{words('SFT'):.1f} / {words('SeVa'):.1f}",
        esc(RULES[kind])]


def compare_page(args):
    """The comparison page and how many questions it shows."""
    models, image_folder, questions = compared_questions(args.compare)
    if not questions:
        raise ValueError(f"{args.compare}: no toy-world answers (captions, descriptions, sentences, short answers, "
                         f"POPE)")
    kinds = list(dict.fromkeys(q["kind"] for q in questions))
    summary = (f'<p>SFT: <code>{esc(models.get("SFT", "?"))}</code> · '
               f'SeVa: <code>{esc(models.get("SeVa", "?"))}</code> · from {esc(args.compare)}</p>'
               + table(["kind", "questions", *OUTCOMES, "SFT / SeVa", "mean words SFT / SeVa", "rule"],
                       [kind_row(kind, [q for q in questions if q["kind"] == kind]) for kind in kinds])
               + '<p class="note">Won / lost: SeVa\'s answer against SFT\'s on the same question. Marked words: where '
                 'the two answers differ; underlined: an object the scene lacks (hallucinated).</p>')
    shown = stratified(questions, lambda q: (q["kind"], q["outcome"]), args.max_questions)
    shown.sort(key=lambda q: (kinds.index(q["kind"]), OUTCOMES.index(q["outcome"])))  # what changed first
    folder, images = args.image_folder or image_folder, {}
    for q in shown:
        if q["image"] not in images:
            images[q["image"]] = vlm.load_image(os.path.join(folder, q["image"]), pad=False)
    entries = [compare_entry(q, images[q["image"]], args.image_size) for q in shown]
    filters = {"kind": ("kind", [q["kind"] for q in questions]), "outcome": ("SeVa", [q["outcome"] for q in questions])}
    note = cap_note(len(shown), len(questions), "questions", f"--max-questions {args.max_questions}",
                    "kind and outcome")
    return page("SeVa against SFT, question by question", summary, filters, entries, note), len(shown)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="*", help="seva.py pairs files, each with its OUT.args.json beside it; several "
                                            "make one page (e.g. one per augmentation)")
    p.add_argument("--compare", default="", help="eval.compare's OUT folder (compare.json, answers/{sft,seva}/): "
                                                 "the page of SFT's and SeVa's answers instead of a pairs page")
    p.add_argument("--out", required=True, help="the HTML page to write")
    p.add_argument("--max-pairs", type=int, default=200,
                   help="pairs shown at most (0: all), taken in turn from each file and class; the summary counts all")
    p.add_argument("--max-questions", type=int, default=200,
                   help="compared questions shown at most (0: all), taken in turn from each kind and outcome")
    p.add_argument("--model", default="", help="the model folder whose processor remakes the views "
                                               "(default: seva.py's --model, from the args file)")
    p.add_argument("--image-folder", default="", help="the folder of the image paths (default: the one seva.py's or "
                                                      "eval.compare's arguments name)")
    p.add_argument("--scenes", default=None, help="the toy world's scenes.json, for the false claims of each pair "
                                                  "(default: scenes.json beside seva.py's --data, if any; '': none)")
    p.add_argument("--image-size", type=int, default=256,
                   help="largest side of an image in the page, in pixels; larger ones are downscaled (0: never)")
    args = p.parse_args(argv)
    if bool(args.pairs) == bool(args.compare):
        p.error("give pairs files or --compare FOLDER, one of the two")
    return args


def main(argv=None):
    args = parse_args(argv)
    text, count = compare_page(args) if args.compare else pairs_page(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.write_atomic(args.out, [text])
    print(f"wrote {args.out} ({count} {'questions' if args.compare else 'pairs'})", flush=True)
    return text


if __name__ == "__main__":
    common.run_main(main, "eval.gallery")
