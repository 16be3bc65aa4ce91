"""
The SFT model against the SeVa model (the same model + the DPO LoRA adapter) on every benchmark given:

  * a table like paper Table 2: rows the models, columns the benchmarks, and a delta row;
  * pair-wise win / lose / tie counts like paper Fig. 5: question by question, with the judge's scores
    (MM-Vet, LLaVA-Bench), or against the labels (win = SeVa right and SFT wrong, lose = the reverse);
  * answer consistency under sampling like paper Table 5: at each temperature, the share of sampled
    answers equal to the model's greedy answer (the paper asks GPT-4 for a 1-10 consistency score; the
    toy world's one-word answers can be compared exactly).

Toy world (the default): POPE (3 splits, accuracy and yes-ratio beside F1), short answers by family, clean and
under diffusion noise at step 500, captions and descriptions (CHAIR_i, CHAIR_s, Cover, SHR-like, length),
sentence answers, consistency, and the pairs trained (which side holds more false claims):
    python -m eval.compare --base toy/model-sft --adapter runs/dpo/adapter --pairs runs/seva/pairs.jsonl
writes OUT/compare.md, OUT/compare.png, OUT/compare.json and every answer file under OUT/answers/{sft,seva}/
(resumable: a rerun generates only what is missing). Under torchrun the questions are shared out.

No headline hides a collapse: a model whose POPE yes-ratio leaves 0.2-0.8 answers nearly always one way, and
its POPE cells (and their delta) are marked degenerate. The table, its sections and the chart are
eval/compare_report.py.
"""
import argparse
import atexit
import json
import os

import checkpoint
import common
import pairs
import runcontrol
from eval import judge as judge_lib
from eval import gqa, hallucination, judge_client, mc_files, multiple_choice, pope, runner, shr, toyvqa
from eval.compare_report import MODELS, bar_chart, degenerate_columns, judged_notes, markdown, table_columns

TEMPERATURES = "0.2,0.4,0.5,0.7,0.9,1.0"  # paper Table 5's rows


# ----------------------------------------------------------------------------- one model, every benchmark
def consistency(model, processor, model_id, records, image_folder, out_dir, temperatures, seed, rank=0,
                world_size=1, **decoding):
    """{temperature: {agreement, accuracy}}: sampled answers (seeded) against the greedy ones (paper Table 5)."""
    questions = toyvqa.toy_questions(records)
    shared = dict(rank=rank, world_size=world_size, **decoding)
    greedy = runner.answer_questions(model, processor, questions, os.path.join(out_dir, "toyvqa-clean.jsonl"),
                                     model_id, image_folder, **shared)
    results = {}
    for t in temperatures:
        sampled = runner.answer_questions(model, processor, questions, os.path.join(out_dir, f"toyvqa-t{t}.jsonl"),
                                          model_id, image_folder, temperature=t, seed=seed, **shared)
        results[str(t)] = dict(agreement=agreement(greedy, sampled),
                               accuracy=toyvqa.vqa_scores(records, sampled)["overall"])
    return results


def agreement(greedy, sampled):
    """The share of questions whose sampled answer equals the greedy one (case-insensitive)."""
    return sum(a["text"].lower() == b["text"].lower() for a, b in zip(greedy, sampled)) / len(greedy)


def evaluate_model(model, processor, model_id, weights, out_dir, args, judge=None, rank=0, world_size=1):
    """Every benchmark the arguments name, for one model (weights: runner.fingerprint); answers under out_dir."""
    decoding = runner.decoding(args, weights)
    shared = dict(rank=rank, world_size=world_size, **decoding)
    results = {}
    if args.pope_dir:
        results["pope"] = pope.evaluate(model, processor, model_id, args.pope_dir, args.image_folder, out_dir,
                                        args.pope_splits, args.prompt_suffix, **shared)
    if args.gqa_dir:
        results["gqa"] = gqa.evaluate(model, processor, model_id, os.path.join(args.gqa_dir, gqa.QUESTIONS_FILE),
                                      os.path.join(args.gqa_dir, "images"), out_dir, **shared)
    if args.val:
        results["toyvqa"] = toyvqa.evaluate(model, processor, model_id, args.val, args.image_folder, out_dir,
                                            args.noise_step, args.seed, **shared)
    for name, path in args.mc:
        results[f"mc/{name}"] = multiple_choice.evaluate(model, processor, model_id, path, args.mc_image_folder,
                                                         out_dir, args.circular, args.lang, name, split=args.mc_split,
                                                         letter_rule=args.letter_rule, **shared)
    if args.mmvet_dir:
        results["mmvet"] = judge_lib.evaluate_mmvet(model, processor, model_id, args.mmvet_dir, out_dir, judge,
                                                    **shared)
    if args.llava_bench_dir:
        results["llava-bench"] = judge_lib.evaluate_llava_bench(model, processor, model_id, args.llava_bench_dir,
                                                                out_dir, judge, **shared)
    if args.shr_dir:
        results["shr"] = shr.evaluate(model, processor, model_id, args.shr_dir, args.vg_dir, out_dir, judge,
                                      **dict(shared, max_new_tokens=args.shr_max_new_tokens,
                                             num_beams=args.shr_num_beams))  # the published baseline's decoding
    if args.world and os.path.exists(os.path.join(args.world, "val-captions.json")):  # the open stage's files
        results["open"] = hallucination.evaluate(model, processor, model_id, args.world, args.image_folder, out_dir,
                                                 **dict(shared, max_new_tokens=args.open_max_new_tokens))
    if args.val and args.temperatures:
        results["consistency"] = consistency(model, processor, model_id, common.read_records(args.val),
                                             args.image_folder, out_dir, args.temperatures, args.seed, **shared)
    return results


# ----------------------------------------------------------------------------- pair-wise outcomes (paper Fig. 5)
def outcomes(out_dir, args, results):
    """{benchmark: {question: score}} of one model: 1.0 / 0.0 (right / wrong) from its answer files and
    the labels, or the judge's score of each answer."""
    per = {}
    if args.pope_dir:
        per["POPE"] = {}
        for split in args.pope_splits:
            rows = pope.read_pope(pope.split_file(args.pope_dir, split))
            answers = runner.read_answers(os.path.join(out_dir, f"pope-{split}.jsonl"), rows)
            per["POPE"].update((f"{split}/{row['question_id']}", float(ok))
                               for row, ok in zip(rows, pope.correctness(rows, answers)))
    if args.gqa_dir:
        records = gqa.read_questions(os.path.join(args.gqa_dir, gqa.QUESTIONS_FILE))
        answers = runner.read_answers(os.path.join(out_dir, gqa.ANSWER_FILE), records)
        per["GQA"] = {r["question_id"]: float(ok) for r, ok in zip(records, gqa.correctness(records, answers))}
    if args.val:
        records = common.read_records(args.val)
        files = {"VQA": "toyvqa-clean.jsonl"}
        if args.noise_step is not None:
            files["VQA-noisy"] = f"toyvqa-noise{args.noise_step}.jsonl"
        for name, file in files.items():
            answers = runner.read_answers(os.path.join(out_dir, file), [{"question_id": r["id"]} for r in records])
            per[name] = {r["id"]: float(ok) for r, ok in zip(records, toyvqa.correctness(records, answers))}
    if results.get("open"):
        records = common.read_records(os.path.join(args.world, "val-sentences.json"))
        scenes = common.read_records(os.path.join(args.world, "scenes.json"))
        texts = toyvqa.texts_of(records, runner.read_answers(os.path.join(out_dir, "sentence-clean.jsonl"),
                                                             [{"question_id": r["id"]} for r in records]))
        per["Sentences"] = {r["id"]: float(hallucination.sentence_right(text, r, scenes[r["image"]]))
                            for r, text in zip(records, texts)}
    for name, path in args.mc:
        questions = mc_files.read_questions(path, args.mc_split)
        answers = runner.read_answers(os.path.join(out_dir, f"{name}.jsonl"),
                                      multiple_choice.runner_questions(questions, args.circular))
        groups = multiple_choice.group_outcomes(questions, answers, args.circular, args.letter_rule)
        per[name] = {group: float(right) for group, (right, _) in groups.items()}  # MMBench: one per question
    for key, column in (("mmvet", "MMVet"), ("llava-bench", "LLaVA-W")):
        if results.get(key):
            per[column] = results[key]["per_question"]
    return per


def win_lose_tie(sft, seva):
    """Counts over the questions both have: win = SeVa scores higher, lose = lower, tie = equal."""
    keys = [k for k in sft if k in seva]
    return dict(win=sum(seva[k] > sft[k] for k in keys), lose=sum(seva[k] < sft[k] for k in keys),
                tie=sum(seva[k] == sft[k] for k in keys))


# ----------------------------------------------------------------------------- what compare.json keeps
def without_per_question(results):
    return {k: ({kk: vv for kk, vv in v.items() if kk != "per_question"} if isinstance(v, dict) else v)
            for k, v in results.items()}


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    g = runner.add_model_args(p, max_new_tokens=16, model_flags=False)
    g.add_argument("--base", default="toy/model-sft", help="the SFT model folder (paper: LLaVA-1.5-7B/13B)")
    g.add_argument("--adapter", default="runs/dpo/adapter", help="SeVa's LoRA adapter (train_ddp.py's OUT/adapter)")
    g.add_argument("--allow-other-base", action="store_true",
                   help="load --adapter onto --base even where its base_model.json names other base weights")
    g = p.add_argument_group("benchmarks (an empty value skips one)")
    g.add_argument("--image-folder", default="toy/images",
                   help="images of POPE and of --val (COCO val2014 for COCO POPE)")
    g.add_argument("--pope-dir", default="toy/pope", help="POPE files (toy/pope, or the POPE repo's coco folder)")
    g.add_argument("--pope-splits", default=",".join(pope.SPLITS), help="comma list of POPE splits")
    g.add_argument("--prompt-suffix", default="",
                   help="appended to POPE questions; 'llava' = LLaVA-1.5's suffix (for COCO POPE)")
    g.add_argument("--val", default="toy/val.json", help="toy-world VQA questions (clean, noisy, consistency)")
    g.add_argument("--noise-step", type=int, default=500,
                   help="diffusion step of the noisy VQA run, -1 to skip (paper: 500 for 13B, 800 for 7B)")
    g.add_argument("--temperatures", default=TEMPERATURES,
                   help=f"sampling temperatures of the consistency study (paper Table 5: {TEMPERATURES}); '' skips it")
    g.add_argument("--world", default="toy",
                   help="the toy world: its open-ended val files (captions, descriptions, sentence answers) and "
                        "scenes, when it has them (python -m toyworld, open stage); '' skips them")
    g.add_argument("--open-max-new-tokens", type=int, default=96,
                   help="answer length limit of the captions, descriptions and sentence answers")
    g.add_argument("--pairs", default="", help="the pairs SeVa trained on (seva.py's OUT): which side holds more "
                                               "false claims, against --world's scenes")
    g.add_argument("--mc", action="append", default=[], metavar="NAME=PATH",
                   help="a multiple-choice benchmark (MMBench tsv, SEED-Bench.json, ScienceQA problems.json, or a "
                        "jsonl of questions), repeatable: --mc MMB=mmbench_dev.tsv")
    g.add_argument("--mc-split", default="test", help="ScienceQA's split (official: test)")
    g.add_argument("--letter-rule", default="official", choices=["official", "loose"],
                   help="how a letter is read from an answer: official (ScienceQA and SEED as LLaVA's scorers, "
                        "MMBench and generic files as VLMEvalKit's can_infer under exact matching) or loose (our "
                        "looser reading everywhere, not comparable with published scores)")
    g.add_argument("--shr-dir", default="", help="HA-DPO's SHR annotations (val_images_final.json, ...); needs "
                                                 "--vg-dir and a judge (--judge-url, --judge-prompt)")
    g.add_argument("--vg-dir", default="", help="Visual Genome (image_data.json, region_descriptions.json, images)")
    g.add_argument("--shr-num-beams", type=int, default=shr.NUM_BEAMS,
                   help=f"beams of SHR's descriptions (default {shr.NUM_BEAMS}, HA-DPO's published LLaVA-1.5 baseline)")
    g.add_argument("--shr-max-new-tokens", type=int, default=512,
                   help="length limit of SHR's descriptions (default 512, HA-DPO's baseline)")
    g.add_argument("--gqa-dir", default="",
                   help=f"GQA folder as LLaVA lays it out (playground/data/eval/gqa/data): {gqa.QUESTIONS_FILE} and "
                        f"images/")
    g.add_argument("--mc-image-folder", default=".", help="folder of the multiple-choice image paths")
    g.add_argument("--circular", action="store_true",
                   help="circular evaluation of the multiple-choice benchmarks (MMBench's)")
    g.add_argument("--lang", default="en", choices=sorted(multiple_choice.SUFFIX),
                   help="multiple-choice prompt language (cn: MMBench-CN)")
    g.add_argument("--mmvet-dir", default="", help="MM-Vet folder (mm-vet.json, images/)")
    g.add_argument("--llava-bench-dir", default="", help="LLaVA-Bench in-the-wild folder (questions.jsonl, ...)")
    judge_client.add_judge_args(p)
    p.add_argument("--out", default="runs/compare",
                   help="output folder: compare.md, compare.png, compare.json, answers/")
    args = p.parse_args(argv)
    args.pope_splits = [s.strip() for s in args.pope_splits.split(",") if s.strip()]
    args.temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    args.noise_step = None if args.noise_step < 0 else args.noise_step
    args.prompt_suffix = pope.LLAVA_SUFFIX if args.prompt_suffix == "llava" else args.prompt_suffix
    mc = []
    for item in args.mc:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--mc {item}: expected NAME=PATH")
        mc.append((name, path))
    args.mc = mc
    if args.noise_step is not None and not 0 <= args.noise_step <= 999:
        p.error(f"--noise-step must be in 0..999 or -1, got {args.noise_step}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(os.path.join(args.adapter, "adapter_config.json")):
        raise ValueError(f"--adapter {args.adapter}: no adapter_config.json (train one with train_ddp.py)")
    rank, world_size, device = common.compute_init(args.seed)
    checkpoint.check_base(args.adapter, args.base, args.allow_other_base)  # before any answer
    lock = runcontrol.lock_output(args.out, rank, world_size)  # one run per --out, released at the end
    if lock:
        atexit.register(lock.release)
    judge = judge_client.judge_from_args(args)
    model_ids = {"SFT": runner.model_id_of(args.base), "SeVa": runner.model_id_of(args.base, args.adapter)}
    answer_dirs = {"SFT": os.path.join(args.out, "answers", "sft"), "SeVa": os.path.join(args.out, "answers", "seva")}

    # ---- the SFT model, then the same weights with SeVa's adapter merged in
    model, processor = runner.load_model(args.base, None, device, common.weight_dtype(device, args.precision))
    weights = {"SFT": runner.fingerprint(args.base), "SeVa": runner.fingerprint(args.base, args.adapter)}
    results = {}
    for name in MODELS:
        if name == "SeVa":
            runner.load_adapter(model, args.adapter)
        common.print0(f"---- {name}: {model_ids[name]}")
        results[name] = evaluate_model(model, processor, model_ids[name], weights[name], answer_dirs[name], args,
                                       judge, rank, world_size)

    # ---- the report (rank 0)
    report = None
    if rank == 0:
        columns = {name: table_columns(results[name]) for name in MODELS}
        names = [c for c in columns["SFT"] if c in columns["SeVa"]]
        table = {"columns": names, **{m: [columns[m][c] for c in names] for m in MODELS}}
        table["delta"] = [b - a for a, b in zip(table["SFT"], table["SeVa"])]
        per = {name: outcomes(answer_dirs[name], args, results[name]) for name in MODELS}
        pairwise = {bench: win_lose_tie(per["SFT"][bench], per["SeVa"][bench]) for bench in per["SFT"]}
        consistency_by_model = {name: results[name].get("consistency", {}) for name in MODELS}
        os.makedirs(args.out, exist_ok=True)
        degenerate = {m: degenerate_columns(results[m]) for m in MODELS}
        pair_table = quality = None
        if args.pairs:
            trained = common.read_jsonl(args.pairs)
            quality = pairs.pair_quality(trained)
            scenes_path = os.path.join(args.world, "scenes.json")
            if args.world and os.path.exists(scenes_path):
                pair_table = hallucination.pair_claims(trained, common.read_records(scenes_path))
        text = markdown(table, pairwise, consistency_by_model, model_ids, args, judged_notes(results), results,
                        pair_table, quality)
        report = dict(args=vars(args), models=model_ids, answers=answer_dirs, table=table, pairwise=pairwise,
                      consistency=consistency_by_model, pairs=dict(claims=pair_table, quality=quality),
                      degenerate={m: sorted(degenerate[m]) for m in MODELS},
                      results={m: without_per_question(results[m]) for m in MODELS})
        common.write_atomic(os.path.join(args.out, "compare.md"), [text])
        common.write_atomic(os.path.join(args.out, "compare.json"), [json.dumps(report, indent=1)])
        bar_chart(table, consistency_by_model, os.path.join(args.out, "compare.png"), degenerate)
        print(text + f"\nwrote {args.out}/compare.md, compare.png, compare.json", flush=True)
    common.finish_distributed()
    return report


if __name__ == "__main__":
    common.run_main(main, "eval.compare", (ValueError, OSError, RuntimeError))
