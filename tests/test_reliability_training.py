"""What a user can rely on in training (docs/reliability.md), through the whole path of train_ddp.py: SIGTERM and
SIGINT mid-run, a damaged newest checkpoint, other base weights, bad bytes and degenerate pairs, a second run on
one folder, a worker whose launcher is gone."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import checkpoint
import common
import runcontrol
import train_ddp
from conftest import ROOT
from eval import runner
from helpers import env, flip, lock_holder
from test_train_dpo import adapter, assert_same_adapter, dpo_args, metrics

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
        if args[3] == 4:
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
