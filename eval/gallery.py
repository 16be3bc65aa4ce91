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
  each toy-world question: SFT's answer beside SeVa's, won / lost / tied by the rule of its kind
  (eval/gallery_compare.py RULES), the hallucinated objects of each answer marked.
The page's HTML pieces are eval/gallery_html.py.
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image

import augment
import common
import pairs
import seva
from toyworld import grammar as toygrammar
import vlm
from eval import hallucination
from eval.gallery_compare import compare_page
from eval.gallery_html import answer_box, cap_note, claims_text, esc, figure, page, slug, stratified, table

PAIR_KEYS = ("id", "image", "question", "chosen", "rejected", "augmentation")
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


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
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
