"""seva.py (Alg. 1, data side): sampling, filtering, 1 process == 2 processes == killed and resumed,
bad input skipped and counted, exports, pair quality. Each against a second, independent computation."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import augment
import common
import diffusion
import pairs
import pool
import seva
import vlm
from generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIX = "Answer the question using a single word or phrase."


def argv(world, out, *extra, samples=16, tokens=6):
    # Step 999 so that enough answers change on the barely trained fixture model to keep some pairs.
    return ["--model", f"{world}/model-sft", "--data", f"{world}/pool.json", "--image-folder", f"{world}/images",
            "--noise-step", "999", "--max-new-tokens", str(tokens), "--batch-size", "2", "--num-samples", str(samples),
            "--seed", "0", "--no-progress", "--out", str(out), *extra]


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(toy_world, tmp_path_factory):
    """An uninterrupted 1-process run: (pairs path, summary)."""
    out = tmp_path_factory.mktemp("reference") / "pairs.jsonl"
    summary = seva.main(argv(toy_world, out, "--export", "trl,authors"))
    assert summary["pairs"] > 0, "pick arguments that keep some pairs"
    return str(out), summary


# ----------------------------------------------------------------------------- sampling
def turns(*qa):
    return [{"from": who, "value": text} for question, answer in qa for who, text in
            (("human", question), ("gpt", answer))]


def pool_records(n=40):
    records = []
    for i in range(n):
        records.append(dict(id=f"ocr{i}", image=f"ocr_vqa/images/{i}.jpg", conversations=turns(
            (f"<image>\nWho wrote book {i}?\n{SUFFIX}", f"author {i}"), (f"What is the title?\n{SUFFIX}", "t"),
            ("Is this a novel?", "Yes"), ("What genre is it?", "g"))))
        records.append(dict(id=f"text{i}", image=f"textvqa/train_images/{i}.jpg", conversations=turns(
            ("<image>\nProvide a one-sentence caption for the provided image.\nReference OCR token: A, B", "c"),)))
        records.append(dict(id=f"coco{i}", image=f"coco/train2017/{i}.jpg", conversations=turns(("<image>\nWhat?", "x"))))
    return records


def test_clean_question_by_hand():
    assert pool.clean_question(f"<image>\nWho wrote this book?\n{SUFFIX}") == "Who wrote this book?"
    assert pool.clean_question(f"What is the title of this book?\n<image>\n{SUFFIX}") == "What is the title of this book?"
    assert (pool.clean_question("<image>\nProvide a one-sentence caption for the provided image.\nReference OCR token: A")
            == "Provide a one-sentence caption for the provided image. Reference OCR token: A")
    # the authors keep textvqa's caption prompts as they are, but for the <image> placeholder
    assert (pool.clean_question("<image>\nProvide a one-sentence caption for the provided image.\nReference OCR token: A",
                                "textvqa") == "Provide a one-sentence caption for the provided image.\nReference OCR token: A")


def test_sampling_two_turns_per_image_cleaned_by_subset_and_seeded():
    records = pool_records()
    instances, skipped, _ = pool.sample_instances(records, ["textvqa", "ocr_vqa"], 30, seed=0)
    assert len(instances) == 30 and not skipped
    assert sum(i["image"].startswith("textvqa/") for i in instances) == 15  # evenly over the subsets
    assert sum(i["image"].startswith("ocr_vqa/") for i in instances) == 15
    by_record = {}
    for instance in instances:
        record_id, turn = instance["id"].rsplit("-", 1)
        by_record.setdefault(record_id, []).append(int(turn))
        question = instance["question"]
        assert "<image>" not in question and SUFFIX not in question and question
        record = next(r for r in records if r["id"] == record_id)  # the instance is that turn, cleaned
        human = [t["value"] for t in record["conversations"] if t["from"] == "human"][int(turn)]
        if instance["image"].startswith("textvqa/"):  # the authors' textvqa: only <image> goes
            assert question == human.replace("<image>\n", "")
        else:
            assert "\n" not in question and question == " ".join(human.replace("<image>", "").replace(SUFFIX, "").split())
        assert instance["answer"] == record["conversations"][2 * int(turn) + 1]["value"]
    assert all(len(t) <= 2 and len(set(t)) == len(t) for t in by_record.values())
    assert any(len(t) == 2 for t in by_record.values())
    again, _, _ = pool.sample_instances(records, ["textvqa", "ocr_vqa"], 30, seed=0)
    other, _, _ = pool.sample_instances(records, ["textvqa", "ocr_vqa"], 30, seed=1)
    assert again == instances and [i["id"] for i in other] != [i["id"] for i in instances]
    everything, _, _ = pool.sample_instances(records, ["all"], 0, seed=0)
    assert len(everything) == 40 * (2 + 1 + 1)  # 0 = all: every record, up to 2 turns each
    assert {i["id"] for i in everything} >= {i["id"] for i in instances}


def test_malformed_records_are_named_and_counted():
    records = pool_records(3) + [{"id": "no-conv", "image": "coco/x.jpg"}, {"id": "no-human", "image": "coco/y.jpg",
                                                                   "conversations": [{"from": "gpt", "value": "a"}]}]
    instances, skipped, messages = pool.sample_instances(records, ["coco"], 0, seed=0, source="d.json")
    assert len(instances) == 3 and skipped == {"malformed record": 2}
    assert any("d.json" in m and "no-conv" in m and "conversations" in m for m in messages)
    assert any("d.json" in m and "no-human" in m and "no human turn" in m for m in messages)


# ----------------------------------------------------------------------------- filtering
def test_filter_exact_vs_normalized_by_hand():
    cases = [  # (chosen, rejected, same when exact, same when normalized)
        ("yes", "yes", True, True), ("Yes", "yes", False, True), ("A cat.", "a cat", False, True),
        ("a  cat\n", "A cat!", False, True), ("cat", "cats", False, False), ("yes", "no", False, False),
        ("1.5", "1,5", False, False), ("e.g. a cat", "eg a cat", False, False), ("", "", True, True),
    ]
    for chosen, rejected, exact, normalized in cases:
        assert seva.same_answer(chosen, rejected, "exact") == exact, (chosen, rejected)
        assert seva.same_answer(chosen, rejected, "normalized") == normalized, (chosen, rejected)


# ----------------------------------------------------------------------------- the pairs are the model's answers
def test_pairs_are_alg1_on_the_model(reference, toy_world):
    out, summary = reference
    kept = read_lines(out)
    assert len(kept) == summary["pairs"] > 0
    model, processor = vlm.load(f"{toy_world}/model-sft")
    images = [vlm.load_image(f"{toy_world}/images/{p['image']}") for p in kept]
    questions = [p["question"] for p in kept]
    ids = [p["id"] for p in kept]
    noise = lambda pixels, rows: diffusion.diffusion_noise_rows(pixels, [ids[i] for i in rows], 999, 0)  # by hand
    assert [p["chosen"] for p in kept] == generate(model, processor, images, questions, max_new_tokens=6, batch_size=1)
    assert [p["rejected"] for p in kept] == generate(model, processor, images, questions, max_new_tokens=6,
                                                      batch_size=1, pixel_transform=noise)
    for p in kept:
        assert p["chosen"] != p["rejected"] and p["augmentation"] == "diffusion" and p["noise_step"] == 999
        assert {"id", "image", "question", "chosen", "rejected", "answer"} <= set(p)


def test_image_level_augmentation(toy_world, tmp_path):
    out = tmp_path / "invert.jsonl"
    summary = seva.main(argv(toy_world, out, "--augmentation", "rand_invert", samples=6))
    assert summary["instances"] == 6
    kept = read_lines(out)
    model, processor = vlm.load(f"{toy_world}/model-sft")
    for p in kept:
        image = vlm.load_image(f"{toy_world}/images/{p['image']}")
        inverted = augment.rand_invert(image, common.sample_seed(0, p["id"]))
        assert generate(model, processor, [inverted], [p["question"]], max_new_tokens=6) == [p["rejected"]]
        assert p["augmentation"] == "rand_invert" and "noise_step" not in p


# ----------------------------------------------------------------------------- 1 == 2 processes == resumed
def test_two_ranks_equal_one_process_byte_for_byte(reference, toy_world, tmp_path):
    out = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "seva.py",
                    *argv(toy_world, out)], cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
    assert out.read_bytes() == open(reference[0], "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl", "pairs.jsonl.args.json"]  # partial files merged, removed


def test_same_seed_same_file(reference, toy_world, tmp_path):
    out = tmp_path / "again.jsonl"
    seva.main(argv(toy_world, out))
    assert out.read_bytes() == open(reference[0], "rb").read()


def test_killed_and_resumed_equals_uninterrupted(toy_world, tmp_path, capsys):
    # More work than the reference (every instance, longer answers), so the kill lands mid-run.
    uninterrupted, out = tmp_path / "uninterrupted.jsonl", tmp_path / "pairs.jsonl"
    seva.main(argv(toy_world, uninterrupted, samples=0, tokens=24))
    partial = f"{out}.partial-rank0-of-1.jsonl"
    process = subprocess.Popen([sys.executable, "seva.py", *argv(toy_world, out, samples=0, tokens=24)], cwd=ROOT,
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(partial) and open(partial, "rb").read().count(b"\n") >= 2:  # header + a chunk
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "the run finished before it was killed"
    capsys.readouterr()
    seva.main(argv(toy_world, out, samples=0, tokens=24))
    assert "chunk(s) done before" in capsys.readouterr().out
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert not os.path.exists(partial)


def test_torn_last_line_is_dropped(reference, toy_world, tmp_path, capsys):
    out = str(tmp_path / "pairs.jsonl")
    args = seva.parse_args(argv(toy_world, out))
    instances, _, _ = pool.sample_instances(json.load(open(args.data)), ["all"], 16, 0)
    model, processor = vlm.load(args.model)
    args.template = vlm.resolve_template(model, args.template)  # as main records it: the family's
    rows = seva.answer_chunk(model, processor, instances[:2], args.image_folder,
                             seva.AnswerSettings(noise_step=999, max_new_tokens=6))
    rows = [dict(index=i, id=instances[i]["id"], **row) for i, row in enumerate(rows)]
    torn = json.dumps(dict(index=2, id=instances[2]["id"], chosen="x", rejected="y"))[:25]
    output = seva.sharded_output(args, instances, 0, 1)
    with open(output.path, "w") as f:  # as if killed in the middle of writing chunk 1
        f.write("".join(json.dumps(line) + "\n" for line in [output.header] + rows) + torn)
    seva.main(argv(toy_world, out))
    assert "1 chunk(s) done before" in capsys.readouterr().out
    assert open(out, "rb").read() == open(reference[0], "rb").read()


def test_refuses_to_resume_other_arguments(toy_world, tmp_path):
    out = str(tmp_path / "pairs.jsonl")
    instances = [dict(id="any")]  # the header holds the arguments, not the instances
    other = seva.sharded_output(seva.parse_args(argv(toy_world, out, "--seed", "1")), instances, 0, 1).header
    with open(f"{out}.partial-rank0-of-1.jsonl", "w") as f:
        f.write(json.dumps(other) + "\n")
    with pytest.raises(ValueError, match="other arguments.*seed"):
        seva.main(argv(toy_world, out))
    two = seva.sharded_output(seva.parse_args(argv(toy_world, out)), instances, 0, 2).header
    with open(f"{out}.partial-rank0-of-1.jsonl", "w") as f:
        f.write(json.dumps(two) + "\n")
    with pytest.raises(ValueError, match="number of processes"):
        seva.main(argv(toy_world, out))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_skipped_named_and_counted(toy_world, tmp_path, capsys):
    images = tmp_path / "images"
    records = json.load(open(f"{toy_world}/pool.json"))[:3]
    for record in records:
        os.makedirs(images / os.path.dirname(record["image"]), exist_ok=True)
        shutil.copy(f"{toy_world}/images/{record['image']}", images / record["image"])
    (images / "corrupt.png").write_bytes(b"not a png")
    one_turn = lambda rid, image, question: dict(id=rid, image=image, conversations=turns((question, "a")))
    records += [one_turn("gone", "missing.png", "What?"), one_turn("broken", "corrupt.png", "What?"),
                one_turn("long", records[0]["image"], "What " * 2100 + "?"),
                {"id": "no-conv", "image": records[0]["image"]}, {"id": "no-human", "image": "x.png", "conversations": []}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "pairs.jsonl"
    summary = seva.main(["--model", f"{toy_world}/model-sft", "--data", str(data), "--image-folder", str(images),
                         "--max-new-tokens", "4", "--no-progress", "--out", str(out)])
    good = sum(min(2, len(r["conversations"]) // 2) for r in records[:3])
    assert summary["skipped"] == {"malformed record": 2, "missing or corrupt image": 2, "longer than --max-length": 1}
    assert summary["instances"] == good + 3 and summary["answered"] == good
    printed = capsys.readouterr().out
    for rid, words in [("gone", "missing.png"), ("broken", "corrupt.png"), ("long", "--max-length 2048"),
                       ("no-conv", str(data)), ("no-human", "no human turn")]:
        assert any(rid in line and words in line for line in printed.splitlines()), rid
    assert not {"gone", "broken", "long"} & {p["id"].rsplit("-", 1)[0] for p in read_lines(out)}
    sidecar = json.load(open(f"{out}.args.json"))
    assert sidecar["summary"]["skipped"] == summary["skipped"] and sidecar["args"]["max_new_tokens"] == 4


def test_malformed_json_names_the_file_and_line(toy_world, tmp_path):
    bad_json, bad_jsonl = tmp_path / "bad.json", tmp_path / "bad.jsonl"
    bad_json.write_text('[{"id": 1,')
    bad_jsonl.write_text('{"id": 1}\n{"id": \n')
    base = ["--model", f"{toy_world}/model-sft", "--image-folder", f"{toy_world}/images", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="bad.json"):
        seva.main(base + ["--data", str(bad_json)])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        seva.main(base + ["--data", str(bad_jsonl)])


def test_bad_arguments_fail_before_any_work(toy_world, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    monkeypatch.setattr(seva.vlm, "load", no_work)
    monkeypatch.setattr(seva.common, "read_records", no_work)
    out = tmp_path / "pairs.jsonl"
    for extra, message in [(["--augmentation", "blur"], "unknown augmentation 'blur'"),
                           (["--noise-step", "1000"], "noise-step must be in 0..999"),
                           (["--noise-step", "-1"], "noise-step must be in 0..999"),
                           (["--model", str(tmp_path / "nowhere")], "not a model folder")]:
        with pytest.raises(ValueError, match=message):
            seva.main(argv(toy_world, out, *extra))
    assert os.listdir(tmp_path) == []
    result = subprocess.run([sys.executable, "seva.py", *argv(toy_world, out, "--noise-step", "1000")], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode != 0 and "noise-step must be in 0..999" in result.stderr


# ----------------------------------------------------------------------------- exports and the summary
def test_exports_have_the_right_fields(reference, toy_world):
    out, _ = reference
    kept = read_lines(out)
    trl = read_lines(out.replace(".jsonl", ".trl.jsonl"))
    authors = json.load(open(out.replace(".jsonl", ".authors.json")))
    assert len(trl) == len(authors) == len(kept)
    for pair, row, old in zip(kept, trl, authors):
        assert set(row) == {"images", "prompt", "chosen", "rejected"}
        assert row["images"] == [os.path.join(f"{toy_world}/images", pair["image"])] and os.path.exists(row["images"][0])
        assert row["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pair["question"]}]}]
        assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]}]
        assert row["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": pair["rejected"]}]}]
        assert old == dict(chosen=pair["chosen"], reject=pair["rejected"], question=pair["question"], image_id=pair["image"])


def test_summary_equals_a_recount_of_the_file(reference):
    out, summary = reference
    kept = read_lines(out)
    counts = [0, 0, 0, 0]  # chosen right & rejected wrong, both wrong, chosen wrong & rejected right, both right
    for p in kept:
        chosen_right = p["chosen"].strip().lower() == p["answer"].strip().lower()
        rejected_right = p["rejected"].strip().lower() == p["answer"].strip().lower()
        counts[0 if chosen_right and not rejected_right else 1 if not chosen_right and not rejected_right
               else 2 if rejected_right and not chosen_right else 3] += 1
    assert list(summary["pair_quality"].values()) == counts
    assert summary["pairs"] == len(kept) and summary["instances"] == 16
    assert summary["kept_percent"] == round(100 * len(kept) / summary["answered"], 1)
    assert summary["mean_words_chosen"] == round(sum(len(p["chosen"].split()) for p in kept) / len(kept), 2)
    assert json.load(open(out + ".args.json"))["summary"] == summary


def test_pair_quality_by_hand():
    kept = [dict(chosen="Red", rejected="blue", answer="red "), dict(chosen="blue", rejected="green", answer="red"),
            dict(chosen="blue", rejected="red", answer="Red"), dict(chosen="red", rejected="Red", answer="red"),
            dict(chosen="red", rejected="blue"), dict(chosen="2", rejected="3", answer="2")]
    assert pairs.pair_quality(kept) == {"chosen right, rejected wrong": 2, "both wrong": 1,
                                        "chosen wrong, rejected right": 1, "both right but different": 1}
    assert pairs.pair_quality([dict(chosen="a", rejected="b")]) is None
