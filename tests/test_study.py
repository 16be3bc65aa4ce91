"""python -m study: one run per (value, seed), recorded once, reported from the records."""
import json
import os

import pytest

import common
import pairs
from study import ablations, analyses, models, settings, tables
from eval import hallucination, toyvqa


def test_runs_are_recorded_once_and_reported(toy_world, tmp_path, monkeypatch):
    monkeypatch.setitem(settings.ABLATIONS, "noise_step", ("Fig. 6", "noise_step", [999]))
    monkeypatch.setattr(settings, "GLOBAL_BATCH", 4)
    argv = ["noise_step", "--seeds", "0", "1", "--world", toy_world, "--out", str(tmp_path), "--threads", "1"]
    ablations.main(argv)
    rows = [json.loads(line) for line in open(tmp_path / "runs.jsonl")]
    assert [(r["setting"]["noise_step"], r["seed"]) for r in rows] == [(999, 0), (999, 1)]
    for r in rows:  # the recorded pair counts are those of the pairs files the runs wrote
        name = settings.run_name(r["setting"], r["seed"])
        pairs = open(tmp_path / "runs" / name / "pairs.jsonl").read().splitlines()
        assert r["pairs"] == len(pairs)
        assert (r["steps"] > 0) == (len(pairs) >= 4)
    ablations.main(argv)  # a rerun finds every run done
    assert len(open(tmp_path / "runs.jsonl").read().splitlines()) == 2
    report = open(tmp_path / "report.md").read()
    assert "| 999 | 2 |" in report
    assert not os.path.exists(tmp_path / "models" / "sft-epochs=1")  # the world's model-sft, not a new one
    trained = [settings.run_name(r["setting"], r["seed"]) for r in rows if r["steps"]]
    assert trained
    ablations.main(["--confusion", "count", "--runs", trained[0], "--world", toy_world, "--out", str(tmp_path)])
    table = open(tmp_path / "confusion-count.md").read()
    questions = sum(toyvqa.first_question(r)[3] == "count" for r in json.load(open(os.path.join(toy_world, "val.json"))))
    for section in table.split("## ")[1:]:  # the SFT model's, then the run's: every count question once
        assert sum(int(line.split("|")[3]) for line in section.splitlines() if line.startswith("| ") and
                   line.split("|")[3].strip().isdigit()) == questions
    mean_kept = sum(r["kept_percent"] for r in rows) / 2
    assert f"{mean_kept:.3f} ±" in report
    # the open stage's protocol metrics: recomputed from the answer files a trained run wrote
    run = next(r for r in rows if r["steps"])
    answers = common.read_jsonl(str(tmp_path / "runs" / trained[0] / "answers" / "description-clean.jsonl"))
    records = common.read_records(os.path.join(toy_world, "val-descriptions.json"))
    scenes = common.read_records(os.path.join(toy_world, "scenes.json"))
    again = hallucination.hallucination(toyvqa.texts_of(records, answers), [scenes[r["image"]] for r in records])
    assert run["open"]["chair_i_desc"] == again["chair_i"] and run["open"]["cover_desc"] == again["cover"]
    assert sum(run["pair_claims"].values()) == run["pairs_trained"]  # one record, one rejected answer each
    assert "CHAIR_i desc (primary)" in report and "| SFT model | - |" in report
    # Fig. 5: the run's answers against the SFT model's, counted again here by hand from both answer files
    start = tmp_path / "models" / "model-sft-answers"
    mine = tmp_path / "runs" / trained[0] / "answers"
    texts = lambda folder, name: {a["question_id"]: a["text"] for a in common.read_jsonl(str(folder / name))}
    before, after = texts(start, "description-clean.jsonl"), texts(mine, "description-clean.jsonl")
    false = {r["id"]: (hallucination.false_count(before[r["id"]], scenes[r["image"]]),
                       hallucination.false_count(after[r["id"]], scenes[r["image"]])) for r in records}
    assert run["pairwise"]["description"]["won"] == sum(b > a for b, a in false.values())
    assert run["pairwise"]["description"]["lost"] == sum(b < a for b, a in false.values())
    val = json.load(open(os.path.join(toy_world, "val.json")))
    before, after = texts(start, "toyvqa-clean.jsonl"), texts(mine, "toyvqa-clean.jsonl")
    right = [(toyvqa.is_right(before[r["id"]], r), toyvqa.is_right(after[r["id"]], r)) for r in val]
    assert run["pairwise"]["short answer"]["won"] == sum(a and not b for b, a in right)
    assert run["pairwise"]["short answer"]["lost"] == sum(b and not a for b, a in right)
    assert abs(run["accuracy"]["overall"] - sum(a for _, a in right) / len(val)) < 1e-9
    for kind, questions in (("description", len(records)), ("short answer", len(val))):
        assert sum(run["pairwise"][kind][o] for o in ("won", "lost", "tied")) == questions
    # fig5 needs the counts: a row without them is run again, and the run gives the same counts and metrics
    monkeypatch.setitem(settings.ABLATIONS, "fig5", ("Fig. 5", "noise_step", [999]))
    older = [{k: v for k, v in r.items() if k != "pairwise"} for r in rows]
    common.write_atomic(str(tmp_path / "runs.jsonl"), [json.dumps(r) for r in older])
    ablations.main(["fig5"] + argv[1:])
    again = [json.loads(line) for line in open(tmp_path / "runs.jsonl")][2:]
    assert [r["ablation"] for r in again] == ["fig5", "fig5"]
    for old, new in zip(rows, again):
        assert new["pairwise"] == old.get("pairwise") and new.get("open") == old.get("open")
    assert "| description | " in open(tmp_path / "report.md").read()
    # runs.jsonl of another toy world (another machine's SFT model) is refused, not mixed
    other = [dict(r, start_open=dict(r["start_open"], chair_i_desc=0.5)) for r in older]
    common.write_atomic(str(tmp_path / "runs.jsonl"), [json.dumps(r) for r in other])
    with pytest.raises(SystemExit):
        ablations.main(argv)


def test_pair_filter_keeps_exactly_its_classes(tmp_path):
    answers = {"rw": ("red", "blue"), "bw": ("green", "blue"), "inv": ("blue", "red"), "none": ("red", "blue")}
    pairs = [dict(id=name, chosen=chosen, rejected=rejected, **({} if name == "none" else {"answer": "Red"}))
             for name, (chosen, rejected) in answers.items()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    kept = lambda used: [json.loads(line)["id"] for line in open(ablations.filter_pairs(str(tmp_path), used))]
    assert kept("all") == ["rw", "bw", "inv", "none"]  # unfiltered: the pairs file itself
    assert kept("right_wrong") == ["rw"]
    assert kept("inverted") == ["inv"]
    assert kept("not_inverted") == ["rw", "bw"]  # a pair without a true answer can't be classed: dropped


def test_pair_quality_fit_recovers_known_costs():
    """Runs whose accuracy change is an exact linear function of the pair counts: the fit gives it back, counts
    a run reused by several ablations once, and leaves out a class no run has."""
    quality = pairs.QUALITY
    true = dict(zip(quality[:3], [0.02, -0.01, -0.05]))
    rows = []
    for i in range(12):
        counts = {q: (7 * i + 13 * k * k + 5) % 40 for k, q in enumerate(quality[:3])}
        change = sum(true[q] * n / 100 for q, n in counts.items())
        rows.append(dict(setting=dict(settings.BASE), seed=i, steps=3, trained_quality=dict(counts, **{quality[3]: 0}),
                         start_accuracy={"overall": 0.5}, accuracy={"overall": 0.5 + change}))
    rows += [dict(rows[0], ablation="reused")] * 5
    lines = "\n".join(analyses.pair_quality_analysis(rows))
    for q, c in true.items():
        assert f"| {q} | {c:+.3f} |" in lines
    assert "Fit over 12 DPO runs" in lines and f"left out: {quality[3]}" in lines


def test_pair_claims_fit_recovers_a_known_line():
    """CHAIR_i changes that lie on a known line of the pair-claims share: the fit gives the line back with R² 1,
    counts a reused run once, and takes the start from base_open for rows without their own."""
    fewer, same, other = hallucination.PAIR_CLASSES
    rows = []
    for i in range(8):
        claims = {fewer: 10 + 7 * i, same: 20, other: 5 + (3 * i) % 11}
        share = 100 * claims[fewer] / sum(claims.values())
        rows.append(dict(setting=dict(settings.BASE), seed=i, steps=3, pair_claims=claims,
                         open=dict(chair_i_desc=0.30 + (2.0 - 4.5 * share / 100) / 100)))
    rows += [dict(rows[0], ablation="reused")] * 4
    lines = "\n".join(analyses.pair_claims_analysis(rows, dict(chair_i_desc=0.30)))
    assert "Over 8 DPO runs" in lines and "| -4.5 | +2.0 | -1.00 | 1.000 |" in lines


def test_sft_strength_starts_from_a_model_trained_for_other_epochs(toy_world, tmp_path, monkeypatch):
    made = json.load(open(os.path.join(toy_world, "sft-run", "args.json")))["epochs"]
    assert models.sft_model(toy_world, str(tmp_path), made) == os.path.join(toy_world, "model-sft")
    weaker = models.sft_model(toy_world, str(tmp_path), 0.5)
    assert weaker == os.path.join(str(tmp_path), "models", "sft-epochs=0.5")
    args = json.load(open(os.path.join(str(tmp_path), "models", "sft-epochs=0.5-run", "args.json")))
    assert args["epochs"] == 0.5 and args["lr"] == json.load(open(os.path.join(toy_world, "sft-run", "args.json")))["lr"]
    a = models.model_accuracy(toy_world, str(tmp_path), weaker)
    assert set(a) >= {"overall"} and os.path.exists(os.path.join(str(tmp_path), "models", "sft-epochs=0.5.accuracy.json"))


def test_a_value_can_set_several_settings(toy_world, tmp_path, monkeypatch):
    """negatives: K rejected answers per instance and the loss that trains them, in one run."""
    value = {"num_negatives": 2, "negatives_loss": "pairwise"}
    monkeypatch.setitem(settings.ABLATIONS, "negatives", ("3.3", "negatives", [value]))
    monkeypatch.setattr(settings, "GLOBAL_BATCH", 4)
    monkeypatch.setitem(settings.BASE, "noise_step", 999)
    ablations.main(["negatives", "--seeds", "0", "--world", toy_world, "--out", str(tmp_path), "--threads", "1"])
    row = json.loads(open(tmp_path / "runs.jsonl").read().splitlines()[0])
    assert settings.matches(row, "negatives", value) and not settings.matches(row, "negatives", {"num_negatives": 1})
    remedies = settings.ABLATIONS["remedies"][2]  # rpo_alpha 0 (plain DPO) is not the LD-DPO run (rpo_alpha 0 too)
    ld = {"setting": dict(settings.BASE, ld_alpha=0.5)}
    assert [settings.matches(ld, "remedy", v, remedies) for v in remedies] == [False, False, False, True]
    name = settings.run_name(row["setting"], 0)
    assert name == "negatives_loss=pairwise-num_negatives=2-seed0"
    kept = common.read_jsonl(str(tmp_path / "runs" / name / "pairs.jsonl"))
    assert kept and all(isinstance(p["rejected"], list) and 1 <= len(p["rejected"]) <= 2 for p in kept)
    trained = json.load(open(tmp_path / "runs" / name / "train" / "args.json"))
    assert trained["negatives_loss"] == "pairwise" and row["steps"] > 0
    assert "| num_negatives 2, negatives_loss pairwise | 1 |" in open(tmp_path / "report.md").read()


def test_a_model_that_names_almost_nothing_is_marked_collapsed():
    """Cover below half the SFT model's: a low CHAIR_i there is silence, not a gain."""
    metrics = {k: 0.5 for k, _, _ in tables.OPEN_COLUMNS}
    start = {"accuracy": {"overall": 0.6}, "open": dict(metrics, cover_desc=0.6)}
    runs = [{"setting": dict(settings.BASE, lora_r=r), "accuracy": {"overall": 0.5}, "start_accuracy": None,
             "open": dict(metrics, cover_desc=cover, chair_i_desc=0.1)} for r, cover in ((8, 0.31), (128, 0.29))]
    lines = tables.open_table(runs, "lora_r", [8, 128], start)
    assert lines[3].startswith("| 8 | 1 |") and lines[4].startswith("| 128 **(collapsed)** | 1 |")


def test_the_search_draws_runnable_settings_of_its_grid():
    """Every searched setting is one train_ddp.py takes (no LD-DPO with several negatives), the default first,
    no setting twice, each inside the grid."""
    drawn = settings.search_settings()
    assert len(drawn) == 1 + settings.SEARCH_DRAWS and drawn[0] == {k: settings.BASE[k] for k in settings.SEARCH}
    assert len({json.dumps(s, sort_keys=True) for s in drawn}) == len(drawn)
    for s in drawn:
        assert s["num_negatives"] == 1 or s["ld_alpha"] is None
        assert s["num_negatives"] > 1 or s["negatives_loss"] == "infonce"
        assert all(s[k] in values for k, values in settings.SEARCH.items())


def test_consistency_and_the_search_with_its_confirmation(toy_world, tmp_path, monkeypatch):
    """C5's sampled agreement is recorded per run and for the SFT model; the exploratory search runs its grid on
    seed 0, makes the confirmation split before its first run, and confirms the lowest-CHAIR guarded setting on
    the confirmation seeds only, scored on that split."""
    monkeypatch.setattr(settings, "GLOBAL_BATCH", 4)
    monkeypatch.setitem(settings.BASE, "noise_step", 999)
    monkeypatch.setitem(settings.ABLATIONS, "consistency", ("Table 5", "noise_step", [999]))
    monkeypatch.setattr(settings, "SEARCH", dict(beta=[0.1, 0.5]))
    monkeypatch.setattr(settings, "SEARCH_DRAWS", 1)
    monkeypatch.setattr(settings, "CONFIRM_SEEDS", [3])
    monkeypatch.setattr(settings, "GUARD", 1.0)  # every setting passes the guard: the best is the lowest CHAIR_i
    ablations.main(["consistency", "search", "--seeds", "0", "--world", toy_world, "--out", str(tmp_path),
                    "--threads", "1"])
    rows = [json.loads(line) for line in open(tmp_path / "runs.jsonl")]
    assert [r["ablation"] for r in rows] == ["consistency", "search", "search", "confirm"]
    shares = rows[0]["consistency"]
    assert set(shares) == {"0.5", "1.0"} and all(0 <= v <= 1 for v in shares.values())
    assert rows[0]["seconds"] > 0
    start = json.load(open(tmp_path / "models" / "model-sft.consistency.json"))
    assert set(start) == {"0"} and set(start["0"]) == {"0.5", "1.0"}
    searched = rows[1:3]
    assert sorted(r["setting"]["beta"] for r in searched) == [0.1, 0.5] and {r["seed"] for r in searched} == {0}
    assert "search" in rows[1]["ablation"] and rows[1]["setting"]["noise_step"] == 999  # the default comes first
    best = min(searched, key=lambda r: r["open"]["chair_i_desc"])
    confirm = rows[3]
    assert confirm["setting"] == best["setting"] and confirm["seed"] == 3
    split = json.load(open(tmp_path / "confirm" / "val-descriptions.json"))
    assert split != json.load(open(os.path.join(toy_world, "val-descriptions.json")))
    answers = common.read_jsonl(str(tmp_path / "runs" / settings.run_name(best["setting"], 3) / "confirm-answers"
                                    / "description-clean.jsonl"))
    assert len(answers) == len(split) and set(confirm["confirm"]) >= {"chair_i_desc", "cover_desc", "accuracy"}
    report = open(tmp_path / "report.md").read()
    assert "## Exploratory" in report and "| searched best | 1 |" in report
    assert ("**found**" in report) != ("**not found**" in report)
    assert "same as greedy at T = 0.5 %" in report
