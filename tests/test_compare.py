"""compare.py end to end, its numbers recomputed from its answer files; the adapter it loads; its report's marks."""
import json
import os

import pytest
import torch

import lora
import vlm
from eval import compare, compare_report, hallucination, mc_letters, pope, runner
from helpers import read_lines, write_mc_files

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- compare.py end to end
def make_adapter(toy_world, out):
    """A tiny LoRA adapter with random B (LoRA's B = 0 would change nothing), saved in PEFT's layout."""
    model, _ = vlm.load(os.path.join(toy_world, "model-sft"))
    lora.apply_lora(model, 4, 8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in lora.lora_modules(model):
            module.lora_B.weight.copy_(0.5 * torch.randn(module.lora_B.weight.shape, generator=generator))
    lora.save_lora(model, str(out))
    return str(out)


def test_adapter_loads_lora_and_the_projector_beside_it(toy_world, tmp_path):
    """runner.load_model(base, adapter) == the LoRA model by hand (unmerged), projector weights included."""
    from safetensors.torch import save_file
    adapter = make_adapter(toy_world, tmp_path / "adapter")
    base = os.path.join(toy_world, "model-sft")
    by_hand, processor = vlm.load(base)
    lora.load_lora(by_hand, adapter)
    projector = {k: 1.5 * v for k, v in by_hand.state_dict().items() if k.startswith("model.multi_modal_projector.")}
    by_hand.load_state_dict(projector, strict=False)
    save_file(projector, os.path.join(adapter, "non_lora_trainables.safetensors"))  # what --train-projector writes
    loaded, _ = runner.load_model(base, adapter)
    image = vlm.load_image(os.path.join(toy_world, "images", "val", "000000.png"))
    inputs = processor(images=[image], text=[vlm.prompt_text(processor, "How many objects are there?", "llava_v1")],
                       return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, by_hand(**inputs).logits, rtol=1e-4, atol=1e-5)
    run = runner.setup(runner.parse_args(["--model", base, "--adapter", adapter]))  # what the CLIs answer with
    assert run.decoding["weights"] == runner.fingerprint(base, adapter) != runner.fingerprint(base)
    with torch.no_grad():
        torch.testing.assert_close(run.model(**inputs).logits, by_hand(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_compare_end_to_end(toy_world, toy_pairs, tmp_path, monkeypatch):
    adapter = make_adapter(toy_world, tmp_path / "adapter")
    tsv, _ = write_mc_files(toy_world, tmp_path)
    out = tmp_path / "compare"
    images = os.path.join(toy_world, "images")
    argv = ["--base", os.path.join(toy_world, "model-sft"), "--adapter", adapter, "--pope-dir",
            os.path.join(toy_world, "pope"), "--image-folder", images, "--val", os.path.join(toy_world, "val.json"),
            "--noise-step", "999", "--temperatures", "0.0001,1.0", "--mc", f"MMB={tsv}", "--circular",
            "--max-new-tokens", "3", "--open-max-new-tokens", "12", "--world", toy_world, "--pairs", toy_pairs,
            "--batch-size", "8", "--no-progress", "--out", str(out)]
    report = compare.main(argv)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "compare.md").read_text()
    open_columns = [f"{m}-{k}" for k in ("cap", "desc") for m in ("CHAIR_i", "CHAIR_s", "Cover", "SHR")] + ["Sentences"]
    header = "| model | MMB | POPE-rand | POPE-pop | POPE-adv | POPE | VQA | VQA-noisy | " + " | ".join(open_columns)
    assert header in text
    for section in ("## POPE, every metric", "## Short answers by family", "## Open-ended answers",
                    "## The pairs trained: which side holds more false claims"):
        assert section in text, section
    saved = json.load(open(out / "compare.json"))
    assert saved["table"] == report["table"] and saved["pairwise"] == report["pairwise"]

    # ---- every number again, from the answer files and the labels, by hand
    val = json.load(open(os.path.join(toy_world, "val.json")))
    scenes = json.load(open(os.path.join(toy_world, "scenes.json")))
    truth = {r["id"]: r["conversations"][1]["value"].lower() for r in val}
    right = {}  # (model, benchmark) -> {question: bool}
    expected = {}
    for name, folder in (("SFT", "sft"), ("SeVa", "seva")):
        answers = out / "answers" / folder
        f1s = []
        right[name, "POPE"] = {}
        for split in ("random", "popular", "adversarial"):
            pope_file = os.path.join(toy_world, "pope", f"{split}.jsonl")
            labels = {r["question_id"]: r["label"] for r in read_lines(pope_file)}
            said = {r["question_id"]: pope.pope_answer(r["text"]) for r in read_lines(answers / f"pope-{split}.jsonl")}
            tp = sum(said[q] == "yes" and labels[q] == "yes" for q in labels)
            fp = sum(said[q] == "yes" and labels[q] == "no" for q in labels)
            fn = sum(said[q] == "no" and labels[q] == "yes" for q in labels)
            precision, recall = (tp / (tp + fp) if tp + fp else 0), (tp / (tp + fn) if tp + fn else 0)
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0)
            right[name, "POPE"].update((f"{split}/{q}", said[q] == labels[q]) for q in labels)
        for column, file in (("VQA", "toyvqa-clean.jsonl"), ("VQA-noisy", "toyvqa-noise999.jsonl")):
            right[name, column] = {r["question_id"]: r["text"].lower() == truth[r["question_id"]]
                                   for r in read_lines(answers / file)}
        rounds = {}
        for r in read_lines(answers / "MMB.jsonl"):
            letter = mc_letters.mmbench_letter(r["text"], r["options"])  # the official rule (VLMEvalKit's)
            original = r["option_char"][ord(letter) - ord("A")] if letter not in (None, "Z") else None
            rounds.setdefault(r["question_id"], []).append(original == {1: "A", 2: "B"}[r["question_id"]])
        right[name, "MMB"] = {q: all(ok) for q, ok in rounds.items()}
        expected[name] = [100 * sum(right[name, "MMB"].values()) / 2, *(100 * f for f in f1s), 100 * sum(f1s) / 3,
                          100 * sum(right[name, "VQA"].values()) / len(val),
                          100 * sum(right[name, "VQA-noisy"].values()) / len(val)]
        for kind in ("caption", "description"):  # again from the answer files, through hallucination's scorer
            records = json.load(open(os.path.join(toy_world, f"val-{kind}s.json")))
            said = {r["question_id"]: r["text"] for r in read_lines(answers / f"{kind}-clean.jsonl")}
            m = hallucination.hallucination([said[r["id"]] for r in records], [scenes[r["image"]] for r in records])
            expected[name] += [100 * m[k] for k in ("chair_i", "chair_s", "cover", "shr")]
        records = json.load(open(os.path.join(toy_world, "val-sentences.json")))
        said = {r["question_id"]: r["text"] for r in read_lines(answers / "sentence-clean.jsonl")}
        right[name, "Sentences"] = {r["id"]: hallucination.sentence_right(said[r["id"]], r, scenes[r["image"]])
                                    for r in records}
        expected[name].append(100 * sum(right[name, "Sentences"].values()) / len(records))
        greedy = read_lines(answers / "toyvqa-clean.jsonl")
        for t in ("0.0001", "1.0"):
            sampled = read_lines(answers / f"toyvqa-t{t}.jsonl")
            agree = sum(a["text"].lower() == b["text"].lower() for a, b in zip(greedy, sampled)) / len(val)
            assert report["consistency"][name][t]["agreement"] == pytest.approx(agree)
        assert report["consistency"][name]["0.0001"]["agreement"] >= 0.5  # about greedy at a temperature near 0
    assert report["table"]["columns"] == ["MMB", "POPE-rand", "POPE-pop", "POPE-adv", "POPE", "VQA", "VQA-noisy",
                                          *open_columns]
    for name in ("SFT", "SeVa"):
        assert report["table"][name] == pytest.approx(expected[name])
    assert report["table"]["delta"] == pytest.approx([b - a for a, b in zip(expected["SFT"], expected["SeVa"])])
    trained = read_lines(toy_pairs)
    assert report["pairs"]["claims"] == hallucination.pair_claims(trained, scenes)
    assert sum(r["pairs"] for r in report["pairs"]["claims"].values()) == len(trained)
    for bench in ("POPE", "VQA", "VQA-noisy", "MMB", "Sentences"):
        sft, seva = right["SFT", bench], right["SeVa", bench]
        assert report["pairwise"][bench] == dict(win=sum(seva[q] and not sft[q] for q in sft),
                                                 lose=sum(sft[q] and not seva[q] for q in sft),
                                                 tie=sum(sft[q] == seva[q] for q in sft))
    # the adapter changed some answers (else SFT vs SeVa would test nothing)
    clean = "toyvqa-clean.jsonl"
    assert read_lines(out / "answers" / "sft" / clean) != read_lines(out / "answers" / "seva" / clean)

    # ---- a rerun generates nothing (every answer file is reused) and reports the same; sampling is seeded
    monkeypatch.setattr(runner, "answer_chunk", lambda *a, **k: pytest.fail("generated again"))
    assert compare.main(argv)["table"] == report["table"]


def test_a_degenerate_pope_model_is_marked_and_so_is_its_delta():
    # The case a user met: SFT accuracy 0.49 at yes-ratio 0.78, SeVa 0.50 at yes-ratio 1.00; F1 rose 6.5 points.
    def pope_results(accuracy, yes_ratio, f1):
        split = dict(accuracy=accuracy, precision=0.5, recall=0.5, f1=f1, yes_ratio=yes_ratio)
        return {"pope": {"random": split, "popular": split, "adversarial": split, "average": split}}
    results = {"SFT": pope_results(0.49, 0.78, 0.602), "SeVa": pope_results(0.50, 1.00, 0.667)}
    assert compare_report.degenerate_columns(results["SFT"]) == set()  # 0.78 is inside 0.2-0.8
    assert compare_report.degenerate_columns(results["SeVa"]) == {"POPE-rand", "POPE-pop", "POPE-adv", "POPE"}
    columns = {m: compare_report.table_columns(results[m]) for m in compare.MODELS}
    table = {"columns": list(columns["SFT"]), **{m: list(columns[m].values()) for m in compare.MODELS}}
    table["delta"] = [b - a for a, b in zip(table["SFT"], table["SeVa"])]
    args = compare.parse_args(["--noise-step", "-1"])
    text = compare_report.markdown(table, {}, {}, {"SFT": "sft", "SeVa": "seva"}, args, results=results)
    rows = {}  # the main table's rows: the first row of each name
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "60.2 |" in rows["SFT"] and "(degenerate)" not in rows["SFT"]
    assert "66.7 (degenerate)" in rows["SeVa"]
    assert "+6.5 (degenerate)" in rows["delta (SeVa - SFT)"]  # never a bare "POPE +6.5"
    pope_rows = [line for line in text.splitlines() if line.startswith("| SeVa | random")]
    assert pope_rows and "50.0" in pope_rows[0] and "1.00" in pope_rows[0] and "**degenerate**" in pope_rows[0]


def test_the_caption_names_only_the_columns_the_table_has():
    toy = compare_report.caption(["POPE-rand", "POPE", "VQA", "VQA-noisy", "CHAIR_i-cap", "Cover-cap", "Sentences"], 500)
    assert "MMVet" not in toy and "LLaVA-W" not in toy and "step 500" in toy and "lower is better" in toy
    judged = compare_report.caption(["MMVet", "LLaVA-W"], None)
    assert "MMVet" in judged and "LLaVA-W" in judged
    assert not any(word in judged for word in ("POPE", "VQA", "CHAIR", "lower is better"))
