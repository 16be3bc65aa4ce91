"""
Pairs as batches: the encoded chosen and rejected sequences of DPO's pairs (and SFT's examples) right-padded into
one batch, as train_ddp.py feeds them to the pair forwards of dpo.py.

A DPO batch holds the B chosen sequences, then the rejected ones, each on the pair's ORIGINAL image (Alg. 1
line 4: the augmented image only produced the rejected answer). With one rejected answer per pair (Eq. 7) rows
B..2B-1 are the rejected; with several (paper 3.3) they follow in pair order and `pair_index` says whose each is.
"""
import torch
import torch.nn.functional as F

import vlm
from pairs import REFERENCE_KEYS, rejected_list


def encode_pair(processor, image, question, chosen, rejected, template):
    """A preference pair as training sequences; labels cover each answer and its end-of-turn token. rejected: one
    answer, or a list of them (then "rejected" is a list of sequences). The image is processed once for all of them
    (Alg. 1 line 4: every answer is scored on the same original image)."""
    processed = {}
    encode = lambda answer: vlm.encode(processor, image, [(question, answer)], template, processed)
    return {"chosen": encode(chosen),
            "rejected": [encode(r) for r in rejected] if isinstance(rejected, list) else encode(rejected)}


def collate(examples, pad_token_id):
    """Right-pad encoded examples (vlm.encode) into one batch; image tensors are concatenated."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_token_id),
             "labels": torch.full((len(examples), length), -100),
             "attention_mask": torch.zeros(len(examples), length, dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = e["input_ids"], e["labels"], 1
    for key in vlm.TOKEN_KEYS:  # per-token tensors of some families, padded with their value after the prompt
        if key in examples[0]:
            batch[key] = torch.stack([F.pad(e[key], (0, length - len(e[key])), value=int(e[key][-1]))
                                      for e in examples])
    for key in examples[0]:
        if key not in batch:  # pixel_values, and whatever else a family's processor returns for the image
            batch[key] = cat_padded([e[key] for e in examples])
    return batch


def cat_padded(tensors):
    """Concatenate along dim 0, zero-padding the other dims to the largest (LLaVA-NeXT's and Idefics3's
    images of different sizes make different numbers of crops; the model masks the padding out)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


def collate_pairs(pairs, pad_token_id):
    """A batch of B chosen rows, then the rejected rows (B of them with one per pair: one forward for all).
    Pairs with several rejected answers add `pair_index` (R,): the pair of each rejected row."""
    negatives = [rejected_list(p["rejected"]) for p in pairs]
    batch = collate([p["chosen"] for p in pairs] + [n for group in negatives for n in group], pad_token_id)
    if any(isinstance(p["rejected"], list) for p in pairs):
        batch["pair_index"] = torch.tensor([i for i, group in enumerate(negatives) for _ in group])
    for key in REFERENCE_KEYS:
        if key in pairs[0]:  # precomputed reference log-probs travel with the batch (flat, as the rows)
            values = [v for p in pairs for v in rejected_list(p[key])]
            batch[key] = torch.tensor(values, dtype=torch.float32)
    return batch


def split_rows(batch):
    """(B, pair_index (R,)): the number of pairs and the pair of each rejected row."""
    pairs = batch["input_ids"].shape[0] // 2
    if "pair_index" in batch:
        pairs = batch["input_ids"].shape[0] - batch["pair_index"].shape[0]
        return pairs, batch["pair_index"]
    return pairs, torch.arange(pairs, device=batch["input_ids"].device)
