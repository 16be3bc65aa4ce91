"""What a user can rely on (docs/reliability.md): checkpoints that prove themselves and fall back, the base weights
a run or an adapter belongs to, one owner per output, clean stops on SIGINT / SIGTERM, and every input named:
images through their real mode, a line that is not UTF-8 skipped and counted, degenerate pairs skipped, answer
files that do not answer each question once refused."""
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

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
from helpers import flip, lock_holder


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

