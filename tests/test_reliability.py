"""What a user can rely on (docs/reliability.md): checkpoints that prove themselves and fall back, the base weights
a run or an adapter belongs to, one owner per output, clean stops on SIGINT / SIGTERM, and every input named:
images through their real mode, a line that is not UTF-8 skipped and counted, degenerate pairs skipped, answer
files that do not answer each question once refused."""
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb

import checkpoint
import common
import data
import runcontrol
import vlm
from eval import runner


# ----------------------------------------------------------------------------- images through their real mode
def test_a_16_bit_png_reads_as_its_8_bit_twin_not_white(tmp_path):
    eight = np.random.default_rng(0).integers(0, 256, (24, 32)).astype(np.uint8)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # the same picture in 16 bits
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")  # PIL opens it in a 16/32-bit integer mode
    read = np.asarray(vlm.load_image(str(tmp_path / "sixteen.png"), pad=False))  # (24, 32, 3)
    assert read.dtype == np.uint8 and read.shape == (24, 32, 3)
    assert (read == eight[:, :, None]).all()  # each channel the 8-bit value (PIL's convert("RGB") clips to 255)


def test_transparency_is_composited_on_white_as_the_processor_does(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))  # left half: colour 0, the transparent one
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    read = vlm.load_image(str(tmp_path / "palette.png"), pad=False)
    with Image.open(tmp_path / "palette.png") as img:
        expected = np.asarray(convert_to_rgb(img, return_numpy=True))  # transformers' own conversion
    assert (np.asarray(read) == expected).all()
    assert tuple(np.asarray(read)[0, 0]) == (255, 255, 255) and tuple(np.asarray(read)[0, 7]) == (200, 30, 30)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 100, 128  # half transparent red-ish: (100*128 + 255*127) / 255 = 177
    assert tuple(np.asarray(common.to_rgb(Image.fromarray(rgba, "RGBA")))[0, 0]) == (177, 127, 127)


# ----------------------------------------------------------------------------- jsonl: a bad byte is a bad record
def test_a_line_that_is_not_utf8_is_named_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n{"a": 3}\n')
    skipped = []
    assert common.read_jsonl(str(path), skipped=skipped) == [{"a": 1}, {"a": 3}]
    assert skipped == [(str(path), 2, "not UTF-8 (byte 0xe9 at column 11)")]
    assert f"{path}:2: not UTF-8 (byte 0xe9 at column 11); skipped" in capsys.readouterr().out
    assert common.read_records(str(path)) == [{"a": 1}, {"a": 3}]


# ----------------------------------------------------------------------------- degenerate pairs
def test_degenerate_pairs_are_named():
    pair = dict(image="x.png", question="q?", chosen="A red cube.", rejected="A blue cube.")
    assert data.degenerate_problem(pair) is None
    assert data.degenerate_problem(dict(pair, rejected=" A red cube. ")) == "chosen equals rejected"
    assert data.degenerate_problem(dict(pair, rejected=["A blue cube.", "A red cube."])) == "chosen equals rejected"
    assert data.degenerate_problem(dict(pair, chosen="  ")) == "an empty answer"
    assert data.degenerate_problem(dict(pair, rejected=["A blue cube.", ""])) == "an empty answer"


# ----------------------------------------------------------------------------- answer files: each question once
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_answer_ids_are_checked_one_to_one(tmp_path):
    questions = [{"question_id": i} for i in (1, 2, 3)]
    good = [{"question_id": i, "text": "yes"} for i in (1, 2, 3)]
    assert runner.check_answer_ids("a.jsonl", good, questions) == good
    bad = good[:2] + [{"question_id": 2, "text": "no"}, {"question_id": 9, "text": "no"}]
    with pytest.raises(ValueError) as refused:
        runner.check_answer_ids("a.jsonl", bad, questions)
    message = str(refused.value)
    assert message == ("a.jsonl: not one answer per question: 1 duplicate id(s) 2; 1 missing id(s) 3; "
                       "1 unknown id(s) 9") and "\n" not in message
    rounds = [{"question_id": 1, "fields": {"round_id": r}} for r in (0, 1)]  # circular multiple choice
    assert runner.check_answer_ids("m.jsonl", [{"question_id": 1, "round_id": r} for r in (0, 1)], rounds)
    with pytest.raises(ValueError, match="1 missing id.s. 1/round 1"):
        runner.check_answer_ids("m.jsonl", [{"question_id": 1, "round_id": 0}] * 2, rounds)


def test_pope_answers_with_duplicate_or_unknown_ids_are_refused(tmp_path):
    from types import SimpleNamespace

    from eval import compare
    pope_dir, out = tmp_path / "pope", tmp_path / "out"
    pope_dir.mkdir(), out.mkdir()
    rows = [dict(question_id=i, image="a.png", text="Is there a cube?", label=label)
            for i, label in enumerate(["yes", "no", "yes"])]
    write_jsonl(pope_dir / "random.jsonl", rows)
    args = SimpleNamespace(pope_dir=str(pope_dir), pope_splits=["random"], gqa_dir=None, val=None, mc=[])
    answers = [dict(question_id=i, text=t) for i, t in enumerate(["Yes", "No", "Yes"])]
    write_jsonl(out / "pope-random.jsonl", answers)
    assert compare.outcomes(str(out), args, {})["POPE"] == {"random/0": 1.0, "random/1": 1.0, "random/2": 1.0}
    # a duplicate with another text, and an answer of another file: the score would change in silence
    write_jsonl(out / "pope-random.jsonl", answers + [dict(question_id=1, text="Yes"), dict(question_id=7, text="No")])
    with pytest.raises(ValueError, match=r"pope-random.jsonl: not one answer per question: 1 duplicate id\(s\) 1; "
                                         r"1 unknown id\(s\) 7"):
        compare.outcomes(str(out), args, {})


def test_judged_answers_with_unknown_ids_are_refused_before_judging(tmp_path):
    from eval import judge
    bench = tmp_path / "bench"
    bench.mkdir()
    write_jsonl(bench / "questions.jsonl", [dict(question_id=i, image="a.png", text="Describe.", category="detail")
                                            for i in (0, 1)])
    write_jsonl(bench / "context.jsonl", [dict(image="a.png", caption="a cube")])
    write_jsonl(bench / "answers_gpt4.jsonl", [dict(question_id=i, text="A cube.") for i in (0, 1)])
    answers = write_jsonl(tmp_path / "answers.jsonl", [dict(question_id=i, text="A cube.") for i in (0, 5)])
    with pytest.raises(ValueError, match=r"answers.jsonl: not one answer per question: 1 missing id\(s\) 1; "
                                         r"1 unknown id\(s\) 5"):
        judge.evaluate_llava_bench(None, None, "m", str(bench), str(tmp_path / "out"), judge=None,
                                   answers_file=answers)


# ----------------------------------------------------------------------------- one owner per output
def lock_holder(out):
    """Another process holding OUT's lock (it has printed that it holds it); the caller kills it."""
    holder = ("import sys, time, runcontrol\n"
              "lock = runcontrol.OutputLock(sys.argv[1]).acquire()\n"
              "print('held', flush=True)\n"
              "time.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", holder, out], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    if other.stdout.readline().strip() != "held":
        other.kill()
        pytest.fail("the other process could not take the lock")
    return other


def test_a_second_owner_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = str(tmp_path / "run")
    other = lock_holder(out)
    try:
        with pytest.raises(ValueError, match=f"run.lock: this output is in use by pid {other.pid} on "):
            runcontrol.OutputLock(out).acquire()
    finally:
        other.kill()
        other.wait()
    with runcontrol.OutputLock(out) as lock:  # killed: its lock is stale and taken over
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert not os.path.exists(lock.path)  # released
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that has ended: its lock is stale (a kill -9)
    with open(lock.path, "w") as f:
        json.dump(dict(pid=gone.pid, host=socket.gethostname(), started=None, since="then"), f)
    with runcontrol.OutputLock(out):
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert f"stale lock of pid {gone.pid}" in capsys.readouterr().out
    with open(lock.path, "w") as f:
        json.dump(dict(pid=1, host="another-host", since="then"), f)
    with pytest.raises(ValueError, match="in use by pid 1 on another-host .*another host"):
        runcontrol.OutputLock(out).acquire()


# ----------------------------------------------------------------------------- checkpoints that prove themselves
SHARDED_FILES = ((".metadata", 900), ("__0_0.distcp", 5000), ("__1_0.distcp", 5000), ("rng-rank0.pt", 300),
                 ("rng-rank1.pt", 300), ("state.json", 200))


def fake_checkpoint(out, step, files=SHARDED_FILES):
    """A checkpoint folder as save_checkpoint writes it for 2 ranks, with made-up contents (`files`: another
    layout's)."""
    folder = os.path.join(out, f"checkpoint-{step:06d}")
    os.makedirs(folder)
    for name, size in files:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(np.random.default_rng(step).bytes(size))
    checkpoint.write_manifest(folder)
    with open(os.path.join(out, "latest"), "w") as f:
        f.write(os.path.basename(folder))
    return folder


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        block = f.read(64)
        f.seek(os.path.getsize(path) // 3)
        f.write(bytes(b ^ 0xFF for b in block))


@pytest.mark.parametrize("name", [".metadata", "__1_0.distcp", "rng-rank1.pt", "state.json", "manifest.json"])
@pytest.mark.parametrize("damage", [truncate, flip, os.remove])
def test_a_damaged_checkpoint_is_named_and_the_one_before_used(tmp_path, capsys, name, damage):
    out = str(tmp_path)
    older, newest = fake_checkpoint(out, 2), fake_checkpoint(out, 4)
    assert checkpoint.good_checkpoint(out) == newest
    damage(os.path.join(newest, name))
    assert checkpoint.good_checkpoint(out) == older
    printed = capsys.readouterr().out.splitlines()
    refused = [line for line in printed if line.startswith("--resume: ")]
    assert len(refused) == 1 and os.path.join(newest, name) in refused[0], printed
    assert f"falling back to {older}" in printed
    damage(os.path.join(older, name))  # nothing good left: refused, naming both
    with pytest.raises(ValueError, match="no good checkpoint") as refused:
        checkpoint.good_checkpoint(out)
    assert os.path.join(older, name) in str(refused.value) and os.path.join(newest, name) in str(refused.value)


def test_a_checkpoint_of_the_gathered_format_is_refused_in_one_line(tmp_path, capsys):
    """The format before sharded checkpoints (the weights gathered whole by rank 0) is not read: refused, naming it."""
    out = str(tmp_path)
    old = fake_checkpoint(out, 2, (("trainable.safetensors", 5000), ("optimizer.pt", 9000), ("rng-rank0.pt", 300),
                                   ("state.json", 200)))
    with pytest.raises(ValueError) as refused:
        checkpoint.good_checkpoint(out)
    assert str(refused.value) == (f"--resume: no good checkpoint in {out} ({old}: an earlier format (the weights "
                                  f"gathered whole in trainable.safetensors), which this version does not read); "
                                  f"rerun without --resume to start over")
    assert capsys.readouterr().out.count("checkpoint refused") == 1


def test_a_foreign_metadata_is_refused_before_it_runs_anything(tmp_path):
    """DCP's index is a pickle: read into its own classes only, so a forged one cannot call a function."""
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(print, f)  # any callable: unpickling it would import and call it
    with pytest.raises(ValueError, match=r"\.metadata: holds builtins\.print, not one of "
                                         r"torch\.distributed\.checkpoint's metadata classes; refused"):
        checkpoint.SafeReader(str(tmp_path)).read_metadata()


def test_an_empty_latest_falls_back_to_the_newest_good_checkpoint(tmp_path, capsys):
    out = str(tmp_path)
    fake_checkpoint(out, 2)
    newest = fake_checkpoint(out, 4)
    open(os.path.join(out, "latest"), "w").close()  # a crash left it empty
    assert checkpoint.good_checkpoint(out) == newest
    assert f"{os.path.join(out, 'latest')}: names no checkpoint" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the base weights
def test_the_base_digest_sees_other_weights_under_the_same_path(toy_world, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(os.path.join(toy_world, "model-sft"), base)
    before = checkpoint.base_digest(str(base))
    assert before == checkpoint.base_digest(os.path.join(toy_world, "model-sft"))  # content, not path
    (base / "notes.txt").write_text("not a weight file")  # other files do not count
    assert checkpoint.base_digest(str(base)) == before
    shutil.copy(os.path.join(toy_world, "model-init", "model.safetensors"), base / "model.safetensors")
    assert checkpoint.base_digest(str(base)) != before


# ----------------------------------------------------------------------------- training: the whole path
from test_train_dpo import adapter, assert_same_adapter, dpo_args, metrics  # noqa: E402

import train_ddp  # noqa: E402
from conftest import ROOT  # noqa: E402

FLAGS = ("--batch-size", "4", "--max-steps", "6", "--save-every", "2")


def train(toy_world, toy_pairs, out, *flags):
    return train_ddp.train(train_ddp.parse_args(dpo_args(toy_world, toy_pairs, out, *flags)))


@pytest.fixture(scope="module")
def straight(toy_world, toy_pairs, tmp_path_factory):
    """An uninterrupted run of FLAGS: what every resumed run must equal bit for bit."""
    out = tmp_path_factory.mktemp("straight")
    train(toy_world, toy_pairs, out, *FLAGS)
    return out


def test_sigterm_mid_run_finishes_the_step_checkpoints_and_resumes_exactly(toy_world, toy_pairs, tmp_path,
                                                                           monkeypatch, straight, capsys):
    step = train_ddp.dpo_micro_step
    calls = []

    def signalled(*args, **kwargs):  # SIGTERM arrives in the middle of step 3 (between its forward passes)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*args, **kwargs)
    monkeypatch.setattr(train_ddp, "dpo_micro_step", signalled)
    with pytest.raises(common.Stopped) as stopped:
        train(toy_world, toy_pairs, tmp_path, *FLAGS)
    monkeypatch.setattr(train_ddp, "dpo_micro_step", step)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value) == (f"stopped by SIGTERM after step 3 of 6; checkpoint {tmp_path}/checkpoint-000003 "
                                  f"written: rerun the same command with --resume to continue exactly")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]  # the step in progress was finished
    assert not os.path.exists(f"{tmp_path}.lock")  # released
    train(toy_world, toy_pairs, tmp_path, *FLAGS, "--resume")
    assert_same_adapter(adapter(straight), adapter(tmp_path), rtol=0, atol=0)
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(tmp_path)]


def test_a_damaged_newest_checkpoint_falls_back_and_still_resumes_exactly(toy_world, toy_pairs, tmp_path,
                                                                          monkeypatch, straight, capsys):
    save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        if args[4] == 4:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 4
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(toy_world, toy_pairs, tmp_path, *FLAGS)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    flip(str(tmp_path / "checkpoint-000004" / "__0_0.distcp"))  # 64 bytes flipped in the newest's shard
    capsys.readouterr()
    train(toy_world, toy_pairs, tmp_path, *FLAGS, "--resume")
    printed = capsys.readouterr().out
    assert f"--resume: {tmp_path}/checkpoint-000004/__0_0.distcp: damaged" in printed
    assert f"resumed from {tmp_path}/checkpoint-000002 at step 2" in printed
    assert_same_adapter(adapter(straight), adapter(tmp_path), rtol=0, atol=0)


def test_other_base_weights_are_refused_on_resume_and_for_an_adapter(toy_world, toy_pairs, tmp_path, monkeypatch,
                                                                       straight):
    base = tmp_path / "base"
    shutil.copytree(os.path.join(toy_world, "model-sft"), base)
    flags = ("--model", str(base)) + FLAGS[:4]
    save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(toy_world, toy_pairs, tmp_path / "run", *flags, "--save-every", "2")
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    shutil.copy(os.path.join(toy_world, "model-init", "model.safetensors"), base / "model.safetensors")  # same path
    with pytest.raises(ValueError, match=r"other base weights \(--model's content; --allow-other-base"):
        train(toy_world, toy_pairs, tmp_path / "run", *flags, "--save-every", "2", "--resume")
    train(toy_world, toy_pairs, tmp_path / "run", *flags, "--save-every", "2", "--resume", "--allow-other-base")
    # an adapter on another base: refused in eval, unless asked for on purpose
    made = json.load(open(straight / "adapter" / "base_model.json"))
    assert made["base_digest"] == checkpoint.base_digest(os.path.join(toy_world, "model-sft"))
    with pytest.raises(ValueError, match="adapter: trained on the base weights of .*--allow-other-base"):
        runner.load_model(os.path.join(toy_world, "model-init"), str(straight / "adapter"))
    runner.load_model(os.path.join(toy_world, "model-init"), str(straight / "adapter"), allow_other_base=True)
    runner.load_model(os.path.join(toy_world, "model-sft"), str(straight / "adapter"))


def test_bad_bytes_and_degenerate_pairs_are_skipped_and_counted_in_training(toy_world, toy_pairs, tmp_path, capsys):
    good = common.read_jsonl(toy_pairs)[:8]
    lines = [json.dumps(r).encode() for r in good[:4]]
    lines += [json.dumps(dict(good[0], id="bad-byte")).encode().replace(b"bad-byte", b"bad-\xff"),
              json.dumps(dict(good[1], id="equal", rejected=good[1]["chosen"])).encode(),
              json.dumps(dict(good[2], id="empty", chosen="")).encode()]
    lines += [json.dumps(r).encode() for r in good[4:]]
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_bytes(b"\n".join(lines) + b"\n")
    train(toy_world, str(pairs_path), tmp_path / "out", "--batch-size", "4", "--max-steps", "1")
    printed = capsys.readouterr().out
    assert f"{pairs_path}:5: not UTF-8 (byte 0xff at column 13); skipped" in printed
    assert f"{pairs_path}: line 6, record equal: chosen equals rejected; skipped" in printed
    assert f"{pairs_path}: line 7, record empty: an empty answer; skipped" in printed
    assert json.load(open(tmp_path / "out" / "args.json"))["skipped"] == {
        "degenerate pair (equal or empty answers)": 2, "line not UTF-8": 1}


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def test_a_second_run_on_the_same_out_is_refused_in_one_line(toy_world, toy_pairs, tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        with open(f"{out}.lock", "w") as f:
            json.dump(dict(pid=owner.pid, host=socket.gethostname(), started=runcontrol.process_start(owner.pid),
                           since="now", command="train_ddp.py"), f)
        result = subprocess.run([sys.executable, "train_ddp.py", *dpo_args(toy_world, toy_pairs, out)], cwd=ROOT,
                                env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and result.stderr.strip() == (
            f"train_ddp.py: error: {out}.lock: this output is in use by pid {owner.pid} on {socket.gethostname()} "
            f"since now (train_ddp.py); wait for it or use another output")
        assert not os.path.exists(out)  # nothing written
    finally:
        owner.kill()
        owner.wait()


def test_a_worker_stops_when_its_launcher_is_gone(tmp_path):
    """A launcher (the middle process) killed with -9: its worker, which checks after each step, stops."""
    worker = ("import os, sys, time, runcontrol\n"
              "stop = runcontrol.StopSignals()\n"
              "open(sys.argv[1], 'w').write('started')\n"
              "for step in range(600):\n"
              "    time.sleep(0.05)\n"
              "    if stop.check(1) == 0:\n"
              "        open(sys.argv[1], 'w').write(f'stopped at step {step}'); sys.exit(0)\n")
    flag = tmp_path / "flag"
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                                 sys.executable, "-c", worker, str(flag)], cwd=ROOT,
                                env=dict(env(), LOCAL_RANK="0"))
    for _ in range(600):
        if flag.exists():
            break
        time.sleep(0.05)
    launcher.kill()
    launcher.wait()
    for _ in range(600):
        if flag.read_text().startswith("stopped"):
            break
        time.sleep(0.05)
    assert flag.read_text().startswith("stopped at step")


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_its_checkpoint(toy_world, toy_pairs, tmp_path):
    """A scheduler's SIGTERM to torchrun: it passes it on to its workers, which agree on the step to stop after,
    write its checkpoint, and say in one line how to resume (that a resume from such a checkpoint is exact:
    test_sigterm_mid_run_finishes_the_step_checkpoints_and_resumes_exactly, and test_train_dpo's 2-process
    tests for the checkpoints of N processes)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py"]
    out = tmp_path / "stopped"
    run = subprocess.Popen(torchrun + dpo_args(toy_world, toy_pairs, out, "--batch-size", "2", "--max-steps", "40",
                                               "--save-every", "10"),
                           cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_path = out / "metrics.jsonl"
    for _ in range(3000):  # until the run has done two steps
        if metrics_path.exists() and metrics_path.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    stopped = [line for line in (stdout + stderr).splitlines() if line.startswith("train_ddp.py: ")]
    assert len(stopped) == 1 and stopped[0].startswith("train_ddp.py: stopped by SIGTERM after step "), stderr[-3000:]
    assert 'train_ddp.py", line' not in stdout + stderr  # no traceback of ours
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert step < 40 and stopped[0].endswith(f"checkpoint {out}/checkpoint-{step:06d} written: rerun the same "
                                             f"command with --resume to continue exactly")
    assert json.load(open(out / f"checkpoint-{step:06d}" / "state.json"))["step"] == step
    assert checkpoint.checkpoint_problem(str(out / f"checkpoint-{step:06d}")) is None
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))  # both ranks stopped after that step
    assert not os.path.exists(f"{out}.lock")


@pytest.mark.parametrize("script", ["seva", "eval.pope"])
def test_seva_and_eval_refuse_a_second_owner(toy_world, tmp_path, script):
    import seva
    from eval import pope
    out = str(tmp_path / ("pairs.jsonl" if script == "seva" else "pope"))
    other = lock_holder(out)
    try:
        model = ["--model", os.path.join(toy_world, "model-sft"), "--image-folder", os.path.join(toy_world, "images")]
        main = (lambda: seva.main(model + ["--data", os.path.join(toy_world, "pool.json"), "--out", out])) \
            if script == "seva" else (lambda: pope.main(model + ["--pope-dir", os.path.join(toy_world, "pope"),
                                                                  "--out", out]))
        with pytest.raises(ValueError, match=f"{out}.lock: this output is in use by pid {other.pid} "):
            main()
    finally:
        other.kill()
        other.wait()
    assert not os.path.exists(out)  # nothing written
