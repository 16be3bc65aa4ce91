"""A small toy world, built once per test session in a temp dir through the same code as `python -m toyworld`."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from toyworld import grammar as toygrammar  # noqa: E402
from toyworld import build as toyworld  # noqa: E402

torch.set_num_threads(1)  # the tests' models are tiny: one thread is fastest, and subprocess ranks use one too

# Small enough to build in seconds; the model is barely trained: tests check plumbing, not accuracy. Every stage
# runs; at a lower lr than the real world's, so that the model's answers still depend on the image (at 1e-3 its
# three stage-1 steps make it repeat one token, and noise changes no answer of seva's tests).
TINY_WORLD = ["--sft-images", "48", "--pool-size", "12", "--unseen-images", "8", "--val-images", "10",
              "--pope-images", "3", "--vocab-size", "400", "--width", "32", "--vision-layers", "2",
              "--text-layers", "1", "--patch-size", "16", "--vision-steps", "3", "--pretrain-epochs", "1",
              "--sft-epochs", "1", "--sft-batch-size", "16", "--sft-lr", "1e-4", "--noise-check", "8", "--threads", "1"]


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """Path of a built tiny toy world (images, json files, model-init/, model-sft/)."""
    out = str(tmp_path_factory.mktemp("toy"))
    toyworld.build(toyworld.parse_args(["--out", out] + TINY_WORLD))
    return out


def wrong_answer(family, right, index):
    """A plausible wrong answer of the same family (deterministic): another word of its kind; in a caption or a
    description, the first colour named replaced by another."""
    if family in ("caption", "description"):
        colour = next(word for word in right.replace(",", " ").replace(".", " ").split() if word in toygrammar.COLOURS)
        other = [c for c in toygrammar.COLOURS if c != colour][index % (len(toygrammar.COLOURS) - 1)]
        return right.replace(colour, other, 1)
    options = {"colour": list(toygrammar.COLOURS), "shape": toygrammar.SHAPES, "count": ["1", "2", "3"],
               "exist": ["Yes", "No"], "word": toygrammar.WORDS}[family]
    wrong = [o for o in options if o != right]
    return wrong[index % len(wrong)]


@pytest.fixture(scope="session")
def toy_pairs(toy_world):
    """A pairs file in seva.py's format whose preferences are known to be right: chosen = the true
    answer, rejected = a wrong answer of the same family."""
    import json

    from eval import toyvqa
    path = os.path.join(toy_world, "true-pairs.jsonl")
    with open(path, "w") as f:
        for i, record in enumerate(json.load(open(os.path.join(toy_world, "sft.json")))):
            _, question, answer, family = toyvqa.first_question(record)
            f.write(json.dumps({"id": record["id"] + "-0", "image": record["image"], "question": question,
                                "chosen": answer, "rejected": wrong_answer(family, answer, i)}) + "\n")
    return path


def pytest_configure(config):
    # transformers 5.24's PaliGemma processor builds numpy arrays the numpy-2 way it warns about (tests/families.py)
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


@pytest.fixture(scope="module")
def one_thread(toy_world):
    """One torch thread for a module's tests, after the toy world's build (which sets its own thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft(toy_world):
    """The toy world's SFT model as eval/ loads it: (model, processor)."""
    from eval import runner
    return runner.load_model(os.path.join(toy_world, "model-sft"))

