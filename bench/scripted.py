"""
The answers of bench/seva_pipeline.py, scripted: a random model's answers mean nothing and never end, so each
instance's chosen and rejected answers are fixed in advance (`instances`) and forced, token by token, on top of
the model's own logits in every generate call (`Scripted`), in generate.py's generate and draft.py's
drafted_generate alike: every way of making the pairs then makes the same answers at the model's real cost.
"""
import json
import os

import numpy as np
import torch
from PIL import Image

import pool


def instances(args, folder, tokenizer):
    """--pairs instances of the pool as seva.py samples them (textvqa and ocr_vqa, seed 0), a random image each
    (written to `folder`), and the token ids (EOS last) each instance's answers will be: the chosen answer is the
    pool's true answer to the question; the rejected one is the chosen one again (line 3 drops the pair), except
    in a seeded --kept percent of the instances, where its second half is the next instance's answer's (the pair
    is kept: the two answers share a prefix, as kept pairs often do)."""
    rows = pool.sample_instances(json.load(open(args.pool)), ["textvqa", "ocr_vqa"], args.pairs, 0, args.pool)[0]
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        row["image"] = f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)).save(
            os.path.join(folder, row["image"]))
    answers = [tokenizer(row["answer"], add_special_tokens=False).input_ids for row in rows]
    kept = set(rng.permutation(len(rows))[:max(1, round(len(rows) * args.kept / 100))].tolist())
    chosen, rejected = [a + [tokenizer.eos_token_id] for a in answers], []
    for i, (answer, other) in enumerate(zip(answers, answers[1:] + answers[:1])):
        differs = answer[:len(answer) // 2] + other[len(other) // 2:]
        if differs == answer:  # the same tokens again: one more makes them differ
            differs = differs + other[:1] if other[:1] != answer[:1] else differs + answer[-1:] * 2
        rejected.append((differs if i in kept else answer) + [tokenizer.eos_token_id])
    return rows, chosen, rejected


class Scripted:
    """The model, whose answers follow a script: in every generate call, answer i is the token ids script[i] (EOS
    last), each forced by a logits processor (the model's own logits are computed, then overruled); `queue` holds
    the scripts of the coming calls (generate.py's generate and draft.py's drafted_generate), in call order."""

    def __init__(self, model):
        self.model, self.queue = model, []

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def forcing(self):
        """(rows, done, scores) -> scores with the next scripted token of each row on top (draft.py's
        logits_processor), for the next call's script."""
        script = self.queue.pop(0)
        table = torch.tensor([s + s[-1:] * (max(map(len, script)) - len(s)) for s in script])  # (B, longest)

        def force(rows, done, scores):  # (N,), (N,), (N, V)
            token = table[rows, done.clamp(max=table.shape[1] - 1)]  # (N,)
            forced = torch.full_like(scores, torch.finfo(scores.dtype).min)
            return forced.scatter(1, token[:, None], torch.finfo(scores.dtype).max)
        return force

    def generate(self, **kwargs):
        from transformers import LogitsProcessorList
        force, prompt = self.forcing(), kwargs["input_ids"].shape[1]

        def by_step(input_ids, scores):  # (B, prompt + t), (B, V): token t of each answer comes next
            rows = torch.arange(scores.shape[0])
            return force(rows, torch.full_like(rows, input_ids.shape[1] - prompt), scores)
        return self.model.generate(**kwargs, logits_processor=LogitsProcessorList([by_step]))
