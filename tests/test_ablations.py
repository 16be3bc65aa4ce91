"""ablations.py: one run per (value, seed), recorded once, reported from the records."""
import json
import os

import ablations


def test_runs_are_recorded_once_and_reported(toy_world, tmp_path, monkeypatch):
    monkeypatch.setitem(ablations.ABLATIONS, "noise_step", ("Fig. 6", "noise_step", [999]))
    monkeypatch.setattr(ablations, "GLOBAL_BATCH", 4)
    argv = ["noise_step", "--seeds", "0", "1", "--world", toy_world, "--out", str(tmp_path), "--threads", "1"]
    ablations.main(argv)
    rows = [json.loads(line) for line in open(tmp_path / "runs.jsonl")]
    assert [(r["setting"]["noise_step"], r["seed"]) for r in rows] == [(999, 0), (999, 1)]
    for r in rows:  # the recorded pair counts are those of the pairs files the runs wrote
        name = "-".join(f"{k}={v}" for k, v in sorted(r["setting"].items())) + f"-seed{r['seed']}"
        pairs = open(tmp_path / "runs" / name / "pairs.jsonl").read().splitlines()
        assert r["pairs"] == len(pairs)
        assert (r["steps"] > 0) == (len(pairs) >= 4)
    ablations.main(argv)  # a rerun finds every run done
    assert len(open(tmp_path / "runs.jsonl").read().splitlines()) == 2
    report = open(tmp_path / "report.md").read()
    assert "| 999 | 2 |" in report
    mean_kept = sum(r["kept_percent"] for r in rows) / 2
    assert f"{mean_kept:.3f} ±" in report
