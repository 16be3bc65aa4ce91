"""
Multiple-choice benchmarks of paper Table 2: MMBench (en and cn), SEED-Bench-Image, ScienceQA-IMG, from
their official files. The options go into the prompt as LLaVA-1.5 writes them (model_vqa_mmbench.py):

    {hint}
    {question}
    A. {option A}
    B. {option B}
    ...
    Answer with the option's letter from the given choices directly.

and for ScienceQA as LLaVA-1.5's llava_test_CQM-A question file (convert_sqa_to_llava.py, format CQM-A):

    Context: {hint, or N/A}
    Question: {question}
    Options: (A) {choice A} (B) {choice B} ...
    Answer with the option's letter from the given choices directly.

The benchmark is told from the file's format (tsv: MMBench; problems.json: ScienceQA; SEED-Bench.json:
SEED; anything else: generic) and decides the letter rule (`--letter-rule official`, eval/mc_letters.py):
ScienceQA as LLaVA's eval_science_qa.py, SEED as its convert_seed_for_submission.py (the answer must be the
letter exactly), MMBench and generic files as VLMEvalKit's can_infer; an answer without a letter is wrong
(MMBench: unless the optional matcher, eval/mc_matcher.py, reads one, as VLMEvalKit's ChatGPT matcher does).

Circular evaluation (MMBench's CircularEval): a question counts as right only if it is right with its options
in every rotation. The official tsv holds the rotations as extra rows (index + k x 1,000,000): those are asked
as given and grouped by index mod 1,000,000; a file without them is rotated here.

Files: MMBench's tsv (index, question, hint, A, B, C, D, answer, category, image as base64); ScienceQA's
problems.json (+ pid_splits.json beside it; --split; images at IMAGE_FOLDER/{pid}/image.png; text-only
problems skipped and counted); SEED-Bench.json ("questions"; video questions skipped); or a generic jsonl /
json list: question_id, question, options (a list) or A/B/C/D... (or choice_a...), answer (a letter or an
option index), image (a path under --image-folder) or image_base64, optional hint and category.

    python -m eval.multiple_choice --model /models/llava-1.5-7b-hf --data /data/mmbench/mmbench_dev_20230712.tsv \
        --circular
    python -m eval.multiple_choice --model ... --data /data/mmbench/mmbench_dev_cn_20231003.tsv --lang cn --circular
    python -m eval.multiple_choice --model ... --data /data/scienceqa/problems.json \
        --image-folder /data/scienceqa/images/test
    python -m eval.multiple_choice --model ... --data /data/seed/SEED-Bench.json \
        --image-folder /data/seed/SEED-Bench-image
"""
import argparse
import os
from collections import defaultdict

import common
from eval import mc_letters, mc_matcher, runner
from eval.mc_files import LETTERS, group_of, read_benchmark
from eval.mc_letters import answer_letter

SUFFIX = {"en": "Answer with the option's letter from the given choices directly.",
          "cn": "请直接回答选项字母。"}  # LLaVA's two single-prediction prompts


# ----------------------------------------------------------------------------- prompts and rotations
def mc_prompt(question, hint, options, lang="en"):
    """LLaVA-1.5's multiple-choice prompt (model_vqa_mmbench.py with --single-pred-prompt)."""
    text = f"{hint}\n{question}" if hint else question
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return text + "\n" + SUFFIX[lang]


def scienceqa_prompt(question, hint, options, lang="en"):
    """LLaVA-1.5's ScienceQA prompt: llava_test_CQM-A.json as convert_sqa_to_llava.py builds it (format CQM-A,
    no caption), then model_vqa_science.py's single-prediction suffix."""
    context = (hint or "").strip() or "N/A"  # get_context_text: the hint, the caption unused
    choices = " ".join(f"({letter}) {option}" for letter, option in zip(LETTERS, options))
    text = f"Context: {context}\nQuestion: {question}\nOptions: {choices}\n"
    return text.replace("  ", " ").strip() + "\n" + SUFFIX[lang]  # create_one_example_chatbot: one pass


PROMPTS = {"scienceqa": scienceqa_prompt}  # every other benchmark: mc_prompt


def rotations(options, circular):
    """[(round, shown options, their original letters)]: round r shows option (j + r) % n at letter j."""
    n = len(options)
    return [(r, options[r:] + options[:r], list(LETTERS[r:n] + LETTERS[:r])) for r in range(n if circular else 1)]


def has_circular_copies(questions):
    return any(q["question_id"] != group_of(q) for q in questions)


def asked(questions, circular):
    """[(question, round, shown options, their original letters)]: what the model is asked. A file holding
    MMBench's circular copies is never rotated again: circular asks every row once as given, plain only the
    rows with index < 1e6 (the official non-circular accuracy). Other files are rotated here when circular."""
    copies = has_circular_copies(questions)
    out = []
    for q in questions:
        if circular or q["question_id"] == group_of(q):  # plain: no copy is asked
            out += [(q, *rotation) for rotation in rotations(q["options"], circular and not copies)]
    return out


def runner_questions(questions, circular=False, lang="en"):
    """One runner question per (question, round) asked, with LLaVA's round_id / options / option_char fields."""
    out = []
    for q, round_id, shown, letters in asked(questions, circular):
        prompt = PROMPTS.get(q.get("benchmark"), mc_prompt)(q["question"], q["hint"], shown, lang)
        item = dict(question_id=q["question_id"], text=prompt,
                    fields=dict(round_id=round_id, options=shown, option_char=letters))
        if q.get("benchmark") == "scienceqa":  # model_vqa_science.py's prompt field: eval_science_qa.py counts
            item["prompt"] = "<image>\n" + prompt  # a problem as IMG by this marker
        item.update({k: q[k] for k in ("image", "image_base64") if k in q})
        out.append(item)
    return out


# ----------------------------------------------------------------------------- scoring
def original_letter(answer_row, letter):
    """The letter, in the file's own option order, of what a round's letter picks (None: no option, e.g. 'Z')."""
    shown = LETTERS[:len(answer_row["options"])]
    return answer_row["option_char"][shown.index(letter)] if letter is not None and letter in shown else None


def round_right(answer_row, truth, benchmark=None, letter_rule="official"):
    """Is one round's answer right? Its letter is mapped back through the round's rotation."""
    return original_letter(answer_row, answer_letter(answer_row["text"], answer_row["options"], benchmark,
                                                     letter_rule)) == truth


def group_outcomes(questions, answers, circular=False, letter_rule="official", matcher=None):
    """{group: (right in every row and round asked, right in the first round of its question)} of the labeled
    questions; a group is a question and its MMBench circular copies (CircularEval: all must be right).

    As VLMEvalKit's circular evaluation: each row's letter is read by the rule; a group with a row whose letter
    is wrong is wrong; a row without a letter is wrong under exact matching (matcher None), or, when no row of
    its group is wrong, asked of `matcher(question, answer_row) -> letter or None` (eval/mc_matcher.py)."""
    by_key = {(a["question_id"], a["round_id"]): a for a in answers}
    members = defaultdict(list)  # group -> [(question, its answer row, is the first round)]
    for q, round_id, _, _ in asked([q for q in questions if q["answer"] is not None], circular):
        members[group_of(q)].append((q, by_key[(q["question_id"], round_id)],
                                     round_id == 0 and q["question_id"] == group_of(q)))
    results = {}
    for group, rows in members.items():
        letters = [answer_letter(a["text"], a["options"], q.get("benchmark"), letter_rule) for q, a, _ in rows]
        wrong = [letter is not None and original_letter(a, letter) != q["answer"]
                 for letter, (q, a, _) in zip(letters, rows)]
        for i, (q, a, first) in enumerate(rows):  # the matcher: only rows without a letter, in a group not lost
            if matcher is not None and letters[i] is None and (first or not any(wrong)):
                letters[i] = matcher(q, a)
                wrong[i] = original_letter(a, letters[i]) != q["answer"]
        rights = [original_letter(a, letter) == q["answer"] for letter, (q, a, _) in zip(letters, rows)]
        results[group] = (all(rights), next(r for r, (_, _, first) in zip(rights, rows) if first))
    return results


def outcomes(questions, answers, circular=False, letter_rule="official", matcher=None):
    """[(right, right in the first round)] of each labeled question: its group's outcome."""
    groups = group_outcomes(questions, answers, circular, letter_rule, matcher)
    return [groups[group_of(q)] for q in questions if q["answer"] is not None]


def protocol(questions, circular):
    if has_circular_copies(questions):
        return "circular: the file's own copies, grouped" if circular else "plain: rows with index < 1e6 only"
    return "circular: options rotated here" if circular else "plain"


def score(questions, answers, circular=False, letter_rule="official", matcher=None):
    """Accuracy over questions (circular: a question with all its rotations or copies right), accuracy of the
    first round alone, per category."""
    labeled = [q for q in questions if q["answer"] is not None]
    if not labeled:
        return None  # e.g. MMBench's test split: submit the answer file instead
    benchmark = labeled[0].get("benchmark", "generic")
    groups = group_outcomes(labeled, answers, circular, letter_rule, matcher)
    category = {group_of(q): q["category"] for q in labeled if q["question_id"] == group_of(q)}
    per_category = defaultdict(list)
    for group, (right, _) in groups.items():
        per_category[category[group] or "all"].append(right)
    results = dict(accuracy=sum(r for r, _ in groups.values()) / len(groups),
                   first_round_accuracy=sum(f for _, f in groups.values()) / len(groups), num_questions=len(groups),
                   circular=circular, protocol=protocol(questions, circular), benchmark=benchmark,
                   letter_rule=mc_letters.rule_name(benchmark, letter_rule),
                   matcher=getattr(matcher, "name", None) or "none: exact matching, a row without a letter is wrong",
                   unparsed=sum(answer_letter(a["text"], a["options"], benchmark, letter_rule) is None
                                for a in answers),
                   categories={c: sum(v) / len(v) for c, v in sorted(per_category.items())})
    if has_circular_copies(questions) and not circular:
        results["note"] = ("the file holds MMBench's circular copies: this is the plain accuracy over the rows with "
                           "index < 1,000,000; --circular scores CircularEval")
    return results


# ----------------------------------------------------------------------------- the benchmark
def evaluate(model, processor, model_id, path, image_folder, out_dir, circular=False, lang="en", name=None,
             rank=0, world_size=1, split="test", letter_rule="official", matcher=None, **decoding):
    """Answer and score one file; answers in OUT_DIR/{name}.jsonl (LLaVA's MMBench answer fields)."""
    data = read_benchmark(path, split)
    name = name or os.path.splitext(os.path.basename(path))[0]
    answers = runner.answer_questions(model, processor, runner_questions(data["questions"], circular, lang),
                                      os.path.join(out_dir, f"{name}.jsonl"), model_id, image_folder,
                                      rank=rank, world_size=world_size, **decoding)
    results = score(data["questions"], answers, circular, letter_rule, matcher if rank == 0 else None)
    if results is not None and data["benchmark"] == "scienceqa":
        results.update(split=split, skipped_text_only=data["skipped_text_only"])
    return results


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    runner.add_model_args(p, max_new_tokens=16)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="MMBench tsv, ScienceQA problems.json, SEED-Bench.json, or a jsonl / json of questions")
    g.add_argument("--image-folder", default=".",
                   help="folder the image paths are relative to (ScienceQA: e.g. scienceqa/images/test; "
                        "unused for base64 images)")
    g.add_argument("--split", default="test",
                   help="ScienceQA's split (official: test): its pids from pid_splits.json beside problems.json, "
                        "else from each problem's split field")
    g.add_argument("--circular", action="store_true",
                   help="MMBench's CircularEval (official for MMBench): a question is right only if right with its "
                        "options in every rotation; the official tsv's own copies are used, other files rotated")
    g.add_argument("--letter-rule", default="official", choices=mc_letters.RULES,
                   help="official (default): ScienceQA as LLaVA's eval_science_qa.py, SEED as its "
                        "convert_seed_for_submission.py (exact letter), MMBench and generic files as VLMEvalKit's "
                        "can_infer; loose: our looser reading for every file (not comparable with published scores)")
    g.add_argument("--lang", default="en", choices=sorted(SUFFIX), help="prompt language (cn: MMBench-CN)")
    g.add_argument("--name", default=None, help="benchmark name for the answer file (default: the data file's name)")
    g.add_argument("--out", default="runs/eval/multiple_choice", help="folder for the answer file and NAME.json")
    mc_matcher.add_matcher_args(p)
    return p.parse_args(argv)


def summary(name, model_id, results):
    """The lines main prints."""
    lines = [f"{name} ({results['benchmark']}), {model_id}: accuracy {100 * results['accuracy']:.1f} "
             f"({results['protocol']}) over {results['num_questions']} questions, {results['unparsed']} answer(s) "
             f"without a letter ({results['letter_rule']})"]
    if "skipped_text_only" in results:
        lines.append(f"{name}: skipped {results['skipped_text_only']} text-only problem(s) of split "
                     f"{results['split']} (ScienceQA-IMG counts problems with an image)")
    if "note" in results:
        lines.append(f"{name}: note: {results['note']}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    run = runner.setup(args)
    name = args.name or os.path.splitext(os.path.basename(args.data))[0]
    results = evaluate(run.model, run.processor, run.model_id, args.data, args.image_folder, args.out, args.circular,
                       args.lang, name, run.rank, run.world_size, args.split, args.letter_rule,
                       mc_matcher.matcher_from_args(args), **run.decoding)
    if run.rank == 0:
        runner.write_results(args, run, name, results)
        if results is None:
            print(f"{name}: no answers in the data; the answer file is {os.path.join(args.out, name + '.jsonl')}")
        else:
            print("\n".join(summary(name, run.model_id, results)))
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.multiple_choice")
