"""study/control.py: the controls' pairs from SeVa's, the registered test, and one run end to end."""
import json

from study import control, control_why
import common
import seva


def seva_pair(i, chosen, rejected, answer):
    return dict(id=f"q{i}", image="a.png", question="What is shown?", chosen=chosen, rejected=rejected, answer=answer)


def test_control_pairs_put_the_true_answer_first():
    kept = [seva_pair(0, "A red square.", "A blue square.", "A red circle."),   # SFT false: it is rejected
            seva_pair(1, "a red circle", "A red square.", "A red circle."),     # SFT right: its noisy answer
            seva_pair(2, "A red square.", "a red circle.", "A red circle."),    # SeVa's rejected is right
            dict(seva_pair(3, "x", "y", None), answer=None)]                    # no true answer: dropped
    own, dropped = control.control_pairs(kept, "dpo-own")
    assert [(p["chosen"], p["rejected"]) for p in own] == [
        ("A red circle.", "A red square."), ("A red circle.", "A red square."), ("A red circle.", "A red square.")]
    assert dropped == 1
    from_seva, dropped = control.control_pairs(kept, "dpo-seva")
    assert [(p["id"], p["rejected"]) for p in from_seva] == [("q0", "A blue square."), ("q1", "A red square.")]
    assert dropped == 2
    assert all(not seva.same_answer(p["chosen"], p["rejected"], "normalized") for p in own + from_seva)


def test_verdict_needs_the_fall_and_the_cover():
    start = dict(open=dict(chair_i_cap=0.326, cover_cap=0.632, cover_desc=0.571))
    run = lambda chair, cover: dict(open=dict(chair_i_cap=chair, cover_cap=cover, cover_desc=0.57))
    assert control.verdict(run(0.296, 0.612), start)       # 3.0 down, Cover 2.0 down: meets (the bounds)
    assert not control.verdict(run(0.297, 0.70), start)    # 2.9 down
    assert not control.verdict(run(0.20, 0.611), start)    # Cover 2.1 down
    assert control.collapsed(dict(cover_desc=0.57, cover_cap=0.30), start)
    assert not control.collapsed(dict(cover_desc=0.30, cover_cap=0.32), start)


def test_shared_share_is_the_longest_common_subsequence_over_the_longer():
    assert control_why.shared_share([1, 2, 3, 4], [1, 3, 4]) == 0.75   # 1 3 4 of 4
    assert control_why.shared_share([5, 1, 2], [1, 5, 2]) == 2 / 3    # 1 2 or 5 2
    assert control_why.shared_share([1, 2], []) == 0.0
    assert control_why.shared_share([7, 7, 7], [7, 7, 7]) == 1.0


def test_runs_are_recorded_once_and_reported(toy_world, toy_pairs, tmp_path, monkeypatch):
    # SeVa-shaped pairs whose true answers are known: the SFT side wrong, the noisy side wrong in another way
    kept = [dict(p, answer=p["chosen"], chosen=p["rejected"], rejected=p["rejected"] + " and more")
            for p in common.read_jsonl(toy_pairs)[:8]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in kept))
    monkeypatch.setattr(control.ablations, "GLOBAL_BATCH", 4)
    argv = ["--world", toy_world, "--pairs", str(path), "--out", str(tmp_path / "out"), "--controls", "dpo-own",
            "--settings", "main", "--seeds", "0", "--threads", "1", "--study-runs", str(tmp_path / "none")]
    control.main(argv)
    rows = common.read_jsonl(str(tmp_path / "out" / "runs.jsonl"))
    assert [(r["control"], r["trained"], r["dropped"], r["steps"]) for r in rows] == [("dpo-own", 8, 0, 2)]
    trained = common.read_jsonl(str(tmp_path / "out" / "runs" / "dpo-own-main-seed0" / "pairs.jsonl"))
    assert [(p["chosen"], p["rejected"]) for p in trained] == [(p["answer"], p["chosen"]) for p in kept]
    assert rows[0]["logps"]["chosen"][0] < 0
    control.main(argv)  # a rerun finds the run done
    assert len(common.read_jsonl(str(tmp_path / "out" / "runs.jsonl"))) == 1
    report = open(tmp_path / "out" / "report.md").read()
    assert "| dpo-own | 1 |" in report and "seed 0: " in report
    assert "no reading" in report  # 1 of the 6 cells: not every cell is decided


def test_schedule_runs_first_seeds_then_the_cells_that_can_still_succeed():
    start = dict(open=dict(chair_i_cap=0.30, cover_cap=0.60))
    row = lambda c, s, seed, chair: dict(control=c, setting=s, seed=seed, open=dict(chair_i_cap=chair, cover_cap=0.60))
    plan = lambda rows: control.schedule(rows, start, ["a", "b"], ["x"], [0, 1, 2])
    assert plan([]) == ("a", "x", 0)
    rows = [row("a", "x", 0, 0.35)]                  # fails: a's other seeds wait until b's are done
    assert plan(rows) == ("b", "x", 0)
    rows.append(row("b", "x", 0, 0.20))              # meets
    assert plan(rows) == ("b", "x", 1)
    rows += [row("b", "x", 1, 0.20), row("b", "x", 2, 0.20)]
    assert plan(rows) == ("a", "x", 1)
    assert control.cell_state(rows[1:], start) == "succeeds" and control.cell_state(rows[:1], start) == "fails"
    assert control.cell_state(rows[1:2], start).startswith("open")
