"""
What SeVa changed, question by question: every toy-world question eval.compare answered, SFT's answer beside
SeVa's, won / lost / tied by the rule of its kind (RULES; paper Fig. 5's pair-wise outcomes), and the gallery
page of them (python -m eval.gallery --compare OUT).
"""
import os

import common
import vlm
from eval import hallucination, pope, toyvqa
from eval.gallery_html import answer_box, cap_note, claims_text, esc, figure, page, slug, stratified, table

OUTCOMES = ("won", "lost", "tied")
RIGHT_WRONG = "; won = SeVa right where SFT is wrong"
RULES = {  # how SeVa's answer to a question wins against SFT's, by kind of question
    "caption": "fewer false claims against the scene graph wins (eval/hallucination.py false_count)",
    "description": "fewer false claims against the scene graph wins (eval/hallucination.py false_count)",
    "sentence": "right = the expected claim and no false one (eval/hallucination.py)" + RIGHT_WRONG,
    "short answer": "right = exact match with the label, case-insensitive (eval/toyvqa.py)" + RIGHT_WRONG,
    "POPE": "right = the yes/no read from the answer equals the label (eval/pope.py)" + RIGHT_WRONG,
}


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
