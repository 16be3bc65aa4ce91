"""
The gallery's HTML pieces (eval/gallery.py, eval/gallery_compare.py): escaping, inlined images, answers with
their differences and hallucinated objects marked, tables, and the self-contained page with its filter menus.
"""
import base64
import difflib
import html
import io
import re
from collections import Counter

from PIL import Image

from toyworld import grammar as toygrammar


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
