"""
SHR, the sentence-level hallucination ratio of HA-DPO (Zhao et al. 2023), a column of paper Table 2 (lower is
better; LLaVA-1.5-7B 36.7, SeVa 34.9): the model describes Visual Genome images in detail; each sentence of a
description is judged against the image's annotations (region descriptions with their boxes, and HA-DPO's
factual notes) as "hallucination", "correct" or "cannot judge"; SHR = hallucinated sentences / judged ones.

As HA-DPO's shr_eval (json_eval.py, shr_utils.py, gpt_utils.py):
- a description is split at every "." into stripped sentences; a sentence that repeats an earlier one (or
  is part of one) is dropped; the rest are numbered "1. ...";
- the regions are "[x1, y1, x2, y2]: phrase" lines, the box divided by the image's width and height, 2 decimals;
- the descriptions are generated as HA-DPO's LLaVA-1.5 script (llava-v1_5/shr_eval.py) generated the published
  baseline: beam search with 5 beams, up to 512 new tokens (--num-beams, --max-new-tokens; generate.generate_beam);
- the judge's request is gpt_utils.py's, field for field and in its order (gpt-4, temperature 0.7, max_tokens 800,
  top_p 1, n 1, stream false, stop "###", both penalties 0, logit_bias {"50256": -100}); it is asked until its
  reply holds "Judgement"; after it, one line per sentence, "N. <class>: <reason>"; a reply whose lines do not
  match the sentences leaves that description unjudged (out of the ratio, as HA-DPO's); an image whose request
  text is longer than 15,000 characters is skipped, as shr_eval.py skips it;
- sentences and words per image, hallucinated ones per image, and their ratios.
The judge's prompt is HA-DPO's GPT_JUDGE_PROMPT, which this project does not copy: pass your copy with
--judge-prompt (three {} slots: regions, factual notes, numbered sentences). Without it a paraphrase judges and
every output is marked "not comparable with published scores".

On the toy world every sentence is judged exactly from the scene graph instead (toyworld/grammar.py): a sentence is
a hallucination if the scene contradicts any of its claims (object, size, position, count, word), or if it is
not a sentence of the toy grammar; "correct" otherwise.

    python -m eval.shr --model /models/llava-1.5-7b-hf --shr-dir /data/shr --vg-dir /data/vg \
        --judge-url https://api.openai.com/v1 --judge-prompt shr_prompt.txt --out runs/eval/shr-7b
"""
import argparse
import os

import common
from toyworld import grammar as toygrammar
from eval import judge_client, runner

PROMPT = "Describe this image in detail."  # what HA-DPO asks for
CLASSES = ("hallucination", "correct", "cannot judge")
# gpt_utils.py's request: openai.ChatCompletion.create(messages=..., model=..., **its decoding arguments, logit_bias),
# whose body holds these fields in this order (logit_bias: never the <|endoftext|> token)
JUDGE_SETTINGS = dict(temperature=0.7, max_tokens=800, extra=dict(
    top_p=1.0, n=1, stream=False, stop=["###"], presence_penalty=0.0, frequency_penalty=0.0,
    logit_bias={"50256": -100}), key_order=("messages", "model", "max_tokens", "temperature", "top_p", "n", "stream",
                                           "stop", "presence_penalty", "frequency_penalty", "logit_bias"))
MAX_PROMPT_CHARS = 15_000  # shr_eval.py skips an image whose judge prompt is longer
NUM_BEAMS = 5  # shr_eval.py: num_beams=5, max_new_tokens 512
JUDGE_TRIES = 5  # HA-DPO asks until the reply holds "Judgement"; we stop after this many and leave it unjudged
# Our own wording of the judge's instructions, used only without --judge-prompt (three slots, as HA-DPO's).
BUILTIN_PROMPT = (
    "Decide for each numbered sentence below whether it describes the image correctly. You know the image only "
    "through the region descriptions (a box [x1, y1, x2, y2] in fractions of the width and height, then what the "
    "region shows) and the factual notes, which are all true. A sentence that states something these contradict "
    "or do not support is a hallucination; one about mood, style or anything else they cannot settle gets "
    "\"cannot judge\".\nAnswer in this form:\nJudgement:\n1. hallucination or correct or cannot judge: <why>\n"
    "2. ...\n\nRegion descriptions:\n{}\n\nFactual notes:\n{}\n\nSentences to judge:\n{}\n")


# ----------------------------------------------------------------------------- sentences (shr_utils.py)
def sentences(description):
    """A description's sentences as HA-DPO splits them: at every ".", stripped, repeats (and parts of earlier
    sentences) dropped."""
    kept = []
    for part in description.split("."):
        sentence = part.strip()
        if sentence and sentence not in kept and not any(sentence in earlier for earlier in kept):
            kept.append(sentence)
    return kept


def numbered(kept):
    return "".join(f"{i}. {sentence}\n" for i, sentence in enumerate(kept, 1))


def regions_text(image, regions):
    """The region descriptions as HA-DPO writes them for the judge: the box in fractions of the image, 2 decimals."""
    lines = []
    for r in regions:
        box = [float(f"{v:.2f}") for v in (r["x"] / image["width"], r["y"] / image["height"],
                                          (r["x"] + r["width"]) / image["width"],
                                          (r["y"] + r["height"]) / image["height"])]
        if r["phrase"]:
            lines.append(f"{box}: {r['phrase']}\n")
    return "".join(lines)


def parse_judgement(reply, count):
    """The class of each of `count` sentences from a judge's reply (HA-DPO's post_process_no_revise), or None
    when its lines after "Judgement:" are not one per sentence."""
    lines = [line for line in reply.split("\n") if line]
    starts = [i for i, line in enumerate(lines) if "Judgement:" in line]
    if not starts:
        return None
    judged = [" ".join(line.split(" ")[1:]).strip() for line in lines[starts[0] + 1:]]  # "1. correct: ..." -> "correct: ..."
    judged = [line for line in judged if line]
    if len(judged) != count:
        return None
    return [line.split(":")[0].lower() for line in judged]


# ----------------------------------------------------------------------------- the ratio (shr_utils.get_metric)
def metrics(judged):
    """judged: per description, [(sentence, class or None)]. Sentences and words per image (all of them), the
    hallucinated ones per image, and SHR: hallucinated / the sentences whose class is one of CLASSES."""
    images = len(judged)
    flat = [(s, c) for description in judged for s, c in description]
    words = lambda rows: sum(len(s.split(" ")) for s, _ in rows)
    classed = [(s, c) for s, c in flat if c in CLASSES]
    hallucinated = [(s, c) for s, c in classed if c == "hallucination"]
    return dict(images=images, sentences_per_image=len(flat) / images, words_per_image=words(flat) / images,
                hallucinated_sentences_per_image=len(hallucinated) / images,
                hallucinated_words_per_image=words(hallucinated) / images,
                shr=len(hallucinated) / max(1, len(classed)), hallucinated_words_ratio=words(hallucinated) / max(
                    1, words(classed)), unjudged_sentences=len(flat) - len(classed))


# ----------------------------------------------------------------------------- the toy world: judged exactly
def toy_class(sentence, scene):
    """hallucination or correct, from the scene graph (toygrammar): a sentence outside the grammar is wrong."""
    claims = toygrammar.parse(sentence)
    return "hallucination" if claims is None or toygrammar.false_claims(claims, scene) else "correct"


def judge_toy(descriptions):
    """[(sentence, class)] per description; descriptions: [(text, scene)]."""
    return [[(s, toy_class(s + ".", scene)) for s in sentences(text)] for text, scene in descriptions]


# ----------------------------------------------------------------------------- Visual Genome: judged by the judge
def read_vg(shr_dir, vg_dir):
    """HA-DPO's SHR images (val_images_final.json) with their VG record, regions and factual notes."""
    images = common.read_records(os.path.join(shr_dir, "val_images_final.json"))
    vg = {row["image_id"]: row for row in common.read_records(os.path.join(vg_dir, "image_data.json"))}
    regions = {r["regions"][0]["image_id"]: r["regions"]
               for r in common.read_records(os.path.join(vg_dir, "region_descriptions.json")) if r["regions"]}
    factual = {}
    for part in ("shr_factual_part1.jsonl", "shr_factual_part2.jsonl"):
        for row in common.read_jsonl(os.path.join(shr_dir, part)):
            factual.update(row)  # {image_id: [notes]}
    items = []
    for row in images:
        image_id = int(row["image_id"])
        record = vg[image_id]
        items.append(dict(question_id=image_id, image="/".join(record["url"].split("/")[-2:]), text=PROMPT,
                          regions=regions_text(record, regions.get(image_id, [])),
                          factual="".join(f"{note}\n" for note in factual.get(str(image_id), []))))
    return items


def judge_vg(items, answers, client, prompt):
    """[(sentence, class or None)] per image, each description judged by the judge model (client:
    judge_client.client_settings); an image whose request is over MAX_PROMPT_CHARS is left out (shr_eval.py's)."""
    given = {a["question_id"]: a["text"] for a in answers}
    judged = []
    for item in items:
        kept = sentences(given[item["question_id"]])
        text = prompt.format(item["regions"], item["factual"], numbered(kept))
        if len(text) > MAX_PROMPT_CHARS:
            continue
        messages = [{"role": "user", "content": text}]
        classes = None
        for attempt in range(JUDGE_TRIES):
            reply = judge_client.chat_completion(messages=messages, attempt=attempt, **JUDGE_SETTINGS, **client)
            if "Judgement" in reply:
                classes = parse_judgement(reply, len(kept))
                break
        judged.append([(s, c) for s, c in zip(kept, classes or [None] * len(kept))])
    return judged


def evaluate(model, processor, model_id, shr_dir, vg_dir, out_dir, judge=None, rank=0, world_size=1, **decoding):
    """Describe every SHR image (OUT_DIR/shr-answers.jsonl) and, with a judge, score them; None without one."""
    items = read_vg(shr_dir, vg_dir)
    questions = [dict(question_id=i["question_id"], image=i["image"], text=i["text"]) for i in items]
    answers = runner.answer_questions(model, processor, questions, os.path.join(out_dir, "shr-answers.jsonl"),
                                      model_id, vg_dir, rank=rank, world_size=world_size, **decoding)
    if rank != 0 or not judge:
        return None
    path = judge.get("judge_prompt")
    prompt = judge_client.read_text(path) if path else BUILTIN_PROMPT
    client = judge_client.client_settings(judge, judge_client.SHR_JUDGE_MODEL)
    results = metrics(judge_vg(items, answers, client, prompt))
    results.update(judge_client.comparability([] if path else ["--judge-prompt not given: a paraphrase judged"],
                                              client["model"], judge_client.SHR_JUDGE_MODEL))
    results["prompt_files"] = judge_client.prompt_files({"--judge-prompt": path})
    return results


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = runner.add_model_args(p, max_new_tokens=512, batch_size=8)
    g.add_argument("--num-beams", type=int, default=NUM_BEAMS,
                   help=f"beams of the descriptions' beam search (default {NUM_BEAMS}, HA-DPO's published LLaVA-1.5 "
                        f"baseline; 1: greedy)")
    g = p.add_argument_group("data")
    g.add_argument("--shr-dir", required=True,
                   help="HA-DPO's SHR annotation folder: val_images_final.json, shr_factual_part{1,2}.jsonl")
    g.add_argument("--vg-dir", required=True,
                   help="Visual Genome: image_data.json, region_descriptions.json and the image folders (VG_100K*)")
    g.add_argument("--out", default="runs/eval/shr", help="folder for shr-answers.jsonl and shr.json")
    judge_client.add_judge_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = runner.setup(args)
    results = evaluate(run.model, run.processor, run.model_id, args.shr_dir, args.vg_dir, args.out,
                       judge_client.judge_from_args(args), run.rank, run.world_size, **run.decoding)
    if run.rank == 0:
        if results is None:
            print(f"shr: descriptions written to {args.out}; no --judge-url, so no score")
        else:
            runner.write_results(args, run, "shr", results)
            print(f"SHR {100 * results['shr']:.1f} (lower is better), {results['sentences_per_image']:.2f} "
                  f"sentences per image" + ("" if results["comparable"] else f"; NOTE: {results['note']}"))
    common.finish_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main, "eval.shr", (ValueError, OSError, RuntimeError, KeyError))
