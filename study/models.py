"""
The start models' numbers, each computed once into OUT/models (NAME.accuracy.json, NAME.open.json,
NAME.consistency.json, NAME.confirm.json, NAME-answers/) and read back after: `once` is that pattern; and the
SFT models of other strengths the sft_strength ablation starts from.
"""
import json
import os

from toyworld import datafiles as toydata
import train_ddp
from eval import runner
from study.scores import compared_sources, confirm_scores, sampling_consistency, score_open, short_answers


def once(out, model_dir, suffix, compute, keys=None):
    """The json of a start model's numbers, OUT/models/NAME + suffix, computed once and read back after:
    compute(model, processor, name, weights) when the file is missing (the model loaded only then). With keys, the
    json is {key: ...} completed key by key: compute(model, processor, name, weights, key) for each key it lacks."""
    name = os.path.basename(os.path.normpath(model_dir))
    path = os.path.join(out, "models", name + suffix)
    found = json.load(open(path)) if os.path.exists(path) else None
    todo = [] if found is not None and keys is None else [None] if keys is None else \
        [k for k in keys if k not in (found or {})]
    if todo:
        model, processor = runner.load_model(model_dir)
        weights = runner.fingerprint(model_dir)
        if keys is None:
            found = compute(model, processor, name, weights)
        else:
            found = found or {}
            for key in todo:
                found[key] = compute(model, processor, name, weights, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        toydata.write_json(found, path)
    return found


def model_accuracy(world, out, model_dir):
    """A model's accuracy on toy/val.json, computed once (OUT/models/NAME.accuracy.json); its answers go to
    OUT/models/NAME-answers, where start_answers looks for them."""
    return once(out, model_dir, ".accuracy.json", lambda model, processor, name, weights: short_answers(
        model, processor, world, os.path.join(out, "models", name + "-answers")))


def open_scores(world, out, model_dir):
    """A start model's open-stage metrics, computed once (OUT/models/NAME.open.json)."""
    return once(out, model_dir, ".open.json", lambda model, processor, name, weights: score_open(
        model, processor, world, os.path.join(out, "models", name + "-answers"), name, weights))


def start_consistency(world, out, model_dir, seeds):
    """A start model's sampling_consistency, per seed (the seed sets the sampling), computed once."""
    return once(out, model_dir, ".consistency.json", lambda model, processor, name, weights, seed: sampling_consistency(
        model, processor, world, os.path.join(out, "models", f"{name}-answers-seed{seed}"), name, weights, int(seed)),
        keys=[str(seed) for seed in seeds])


def confirm_start(out, model_dir):
    """The SFT model's scores on the confirmation split, computed once (OUT/models/NAME.confirm.json)."""
    return once(out, model_dir, ".confirm.json", lambda model, processor, name, weights: confirm_scores(
        model, processor, os.path.join(out, "confirm"), os.path.join(out, "models", name + "-confirm-answers"), name,
        weights))


def start_answers(world, out, model_dir):
    """The folder of a start model's answers to compared_sources (OUT/models/NAME-answers), made once."""
    name = os.path.basename(os.path.normpath(model_dir))
    folder = os.path.join(out, "models", name + "-answers")
    if not all(os.path.exists(os.path.join(folder, file)) for _, file, _ in compared_sources(world)):
        model, processor = runner.load_model(model_dir)
        score_open(model, processor, world, folder, name, runner.fingerprint(model_dir))  # resumes its answer files
        short_answers(model, processor, world, folder)
    return folder


def sft_model(world, out, epochs):
    """The SFT model SeVa starts from: the world's own (toy/model-sft) when `epochs` is the epochs it was trained
    for, else one trained the same way (same initial model, data, batch, lr and seed) for `epochs` epochs."""
    made = json.load(open(os.path.join(world, "sft-run", "args.json")))
    if epochs == made["epochs"]:
        return os.path.join(world, "model-sft")
    folder = os.path.join(out, "models", f"sft-epochs={epochs}")
    if not os.path.exists(folder):
        run = os.path.join(out, "models", f"sft-epochs={epochs}-run")
        train_ddp.train(train_ddp.parse_args([
            "--objective", "sft", "--model", os.path.join(world, "model-init"),
            "--data", os.path.join(world, "sft.json"),
            "--image-folder", os.path.join(world, "images"), "--out", run, "--batch-size", str(made["batch_size"]),
            "--epochs", str(epochs), "--lr", str(made["lr"]), "--seed", str(made["seed"]), "--cache-data",
            "--max-length", str(made["max_length"]), "--no-progress", "--resume"]
            + ["--group-by-length"] * bool(made.get("group_by_length")) + ["--train-vision"] * bool(made.get("train_vision"))))
        os.replace(os.path.join(run, "model"), folder)
    return folder
