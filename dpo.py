"""
The math of SeVa's training side (Alg. 1 line 4): sequence log-probs, the DPO loss (paper Eq. 7), and the
pair forwards that score chosen and rejected, both on the ORIGINAL image.

    L = -log sigmoid( beta * [ (log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x)) ] )

with log pi(y|x) the sum of the answer tokens' log-probabilities (`sequence_logps`: answer + end-of-turn
token; image, system prompt and question masked out). As eric-mitchell/direct-preference-optimization has it,
the loss is a pure function of four (B,) tensors, and chosen and rejected go through one forward. Read the
naive forward (`concatenated_forward`) first; `shared_image_forward` and `shared_prefix_forward` compute the
same numbers paying for the image and the prompt once per pair. Nothing here prints, reads the environment
or stores anything on the model: train_ddp.py decides which forward runs (and says so).
"""
import torch
import torch.nn.functional as F

import vlm


# ----------------------------------------------------------------------------- log-probs
def sequence_logps(logits, labels, average=False):
    """Log-probability of each sequence's labelled tokens: the sum (or mean) over labels != -100."""
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1; fp32 before log_softmax
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != -100  # (B, T-1): answer tokens (and their end-of-turn token)
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T-1): any valid index; masked out below
    token_logps = logits.log_softmax(-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    total = (token_logps * mask).sum(-1)  # (B,)
    if average:
        return total / mask.sum(-1).clamp(min=1)  # (B,); a row with no labels gives 0, not nan
    return total  # (B,): Eq. 7 uses the sum


# ----------------------------------------------------------------------------- DPO loss
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1, label_smoothing=0.0, loss_type="sigmoid"):
    """The DPO loss of each pair and the implicit rewards: (losses, chosen_rewards, rejected_rewards), each (B,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing applies to the sigmoid loss only")
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # (B,)
    ref_logratios = reference_chosen_logps - reference_rejected_logps  # (B,)
    logits = pi_logratios - ref_logratios  # (B,): (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    if loss_type == "sigmoid":
        # Eq. 7: L = -log sigmoid(beta * logits). With label_smoothing = eps the preference is assumed
        # flipped with probability eps (conservative DPO): the flipped term is weighted by eps.
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)  # (B,)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2  # (B,): IPO (Azar et al. 2023), not in the SeVa paper
    else:
        losses = torch.relu(1 - beta * logits)  # (B,): hinge (SLiC), not in the SeVa paper
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- pairs as batches
# A DPO batch holds the B chosen sequences, then the B rejected ones, each on the pair's ORIGINAL image
# (Alg. 1 line 4: the augmented image only produced the rejected answer).
def encode_pair(processor, image, question, chosen, rejected, template):
    """A preference pair as two training sequences; labels cover each answer and its end-of-turn token."""
    return {"chosen": vlm.encode(processor, image, [(question, chosen)], template),
            "rejected": vlm.encode(processor, image, [(question, rejected)], template)}


def collate(examples, pad_token_id):
    """Right-pad encoded examples (vlm.encode) into one batch; image tensors are concatenated."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_token_id),
             "labels": torch.full((len(examples), length), -100),
             "attention_mask": torch.zeros(len(examples), length, dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = e["input_ids"], e["labels"], 1
    for key, after in vlm.TOKEN_KEYS.items():  # per-token tensors of some families, padded like input_ids
        if key in examples[0]:
            batch[key] = torch.full((len(examples), length), after)
            for i, e in enumerate(examples):
                batch[key][i, :len(e[key])] = e[key]
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
    """A batch of 2B sequences: rows 0..B-1 chosen, rows B..2B-1 rejected (one forward for both)."""
    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_token_id)
    for key in ("reference_chosen_logps", "reference_rejected_logps"):
        if key in pairs[0]:  # precomputed reference log-probs travel with the batch
            batch[key] = torch.tensor([p[key] for p in pairs], dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------- the naive pair forward
def concatenated_forward(model, batch):
    """log pi(chosen|x) and log pi(rejected|x), each (B,), from one forward over the 2B sequences."""
    inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("reference_")}
    logits = model(**inputs).logits  # (2B, T, V)
    logps = sequence_logps(logits, batch["labels"])  # (2B,)
    return logps.chunk(2)


# ----------------------------------------------------------------------------- the prompt once per pair
# The prompt (system prompt, 576 image tokens, question) is most of every sequence and is the same in
# chosen and rejected: the two forwards below pay for it once per pair instead of twice.
def pair_images(batch):
    """The image tensors (pixel_values, ...) of each pair once: both rows of a pair show the same image."""
    pairs = batch["input_ids"].shape[0] // 2
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")
              and k not in vlm.TOKEN_KEYS and not k.startswith("reference_")}
    for key, value in images.items():
        if not torch.equal(value[:pairs], value[pairs:]):  # Alg. 1 line 4: both answers on the original image
            raise ValueError(f"{key}: the chosen and rejected rows of a pair must show the same image")
    return {k: v[:pairs] for k, v in images.items()}


def shared_image_forward(model, batch):
    """As concatenated_forward, but the vision tower and projector run on B images, not 2B: each pair's
    image features are computed once and placed into both its chosen and its rejected row. Only for a model
    that vlm.pair_forward_problem(model, "shared_image") finds no problem with (train_ddp.pair_forward_for)."""
    image_outputs = vlm.unwrap(model).get_image_features(**pair_images(batch), return_dict=True)
    features = list(image_outputs.pooler_output)  # B tensors (image tokens, D): one per pair
    encoded = {"image": type(image_outputs)(pooler_output=features + features)}  # rows: chosen, then rejected
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   mm_encoder_outputs=encoded).logits  # (2B, T, V)
    return sequence_logps(logits, batch["labels"]).chunk(2)


def pack_pairs(batch):
    """One sequence per pair, prompt + chosen answer + rejected answer, from a collate_pairs batch.

    The prompt is everything before a row's first labelled token and must be the same in both rows.
    Returns input_ids and position_ids (B, L), the block mask `allowed` (B, L, L) (True: query may
    attend to key) and, per answer, the packed positions whose logits score it and its labels, each
    (B, 1 + longest answer): column 0 is the prompt's last position (it predicts both answers' first
    token) with label -100, so that sequence_logps' shift pairs column j's logits with label j + 1.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]  # (2B, T)
    pairs, device = input_ids.shape[0] // 2, input_ids.device
    lengths = batch["attention_mask"].sum(-1)  # (2B,): right padding
    labelled = labels != -100  # (2B, T)
    if not labelled.any(-1).all():
        raise ValueError("every sequence of a pair needs labelled answer tokens")
    prompt = labelled.int().argmax(-1)  # (2B,): index of the first labelled token = prompt length
    column = torch.arange(input_ids.shape[1], device=device)  # (T,)
    same_prompt = (input_ids[:pairs] == input_ids[pairs:]) | (column >= prompt[:pairs, None])  # (B, T)
    if not (torch.equal(prompt[:pairs], prompt[pairs:]) and same_prompt.all()):
        raise ValueError("chosen and rejected must share their prompt to be packed into one sequence")
    prompt, chosen, rejected = prompt[:pairs], lengths[:pairs] - prompt[:pairs], lengths[pairs:] - prompt[:pairs]

    # Packed index k of pair i: segment 0 = prompt, 1 = chosen, 2 = rejected, 3 = padding.
    end = (prompt + chosen + rejected)[:, None]  # (B, 1)
    k = torch.arange(int(end.max()), device=device)[None]  # (1, L)
    segment = ((k >= prompt[:, None]).long() + (k >= (prompt + chosen)[:, None]).long()
               + (k >= end).long())  # (B, L)
    # Rejected tokens sit `chosen` places later than in their own row; both answers continue the prompt's
    # positions. Padding copies the prompt's last token (any non-image token will do: it is masked out).
    source_row = torch.arange(pairs, device=device)[:, None] + pairs * (segment == 2)  # (B, L)
    source_col = torch.where(segment == 2, k - chosen[:, None], k)  # (B, L)
    source_col = torch.where(segment == 3, prompt[:, None] - 1, source_col)
    packed_ids = input_ids[source_row, source_col]  # (B, L)
    position_ids = torch.where(segment == 3, 0, source_col)  # (B, L)

    # Prompt causal; each answer sees the prompt and itself causally, never the other answer. Padding
    # queries see the prompt, so no row of the mask is empty (an empty row would give nan gradients).
    query, key = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = k[0][None, :, None] >= k[0][None, None, :]  # (1, L, L)
    allowed = causal & ((key == 0) | ((key == query) & (key != 3)))  # (B, L, L)

    def score(first, length, row_offset):  # packed positions and labels of one answer, (B, 1 + A)
        j = torch.arange(int(length.max()) + 1, device=device)[None]  # (1, 1 + A)
        inside = (j >= 1) & (j <= length[:, None])  # (B, 1 + A): column j >= 1 holds answer token j - 1
        positions = torch.where(inside, first[:, None] + j - 1, prompt[:, None] - 1)  # (B, 1 + A)
        rows = torch.arange(pairs, device=device)[:, None] + row_offset
        answer_labels = labels[rows, (prompt[:, None] + j - 1).clamp(max=labels.shape[1] - 1)]  # (B, 1 + A)
        return positions, answer_labels.masked_fill(~inside, -100)

    chosen_positions, chosen_labels = score(prompt, chosen, 0)
    rejected_positions, rejected_labels = score(prompt + chosen, rejected, pairs)
    return dict(input_ids=packed_ids, position_ids=position_ids, allowed=allowed,
                chosen_positions=chosen_positions, chosen_labels=chosen_labels,
                rejected_positions=rejected_positions, rejected_labels=rejected_labels)


def shared_prefix_forward(model, batch):
    """log pi(chosen|x) and log pi(rejected|x), each (B,), from one forward over B packed sequences: the
    image features and the prompt are computed once per pair, and the lm_head runs only where an answer
    token is predicted. Equal to concatenated_forward (tests/test_shared_prefix.py). Only for a model that
    vlm.pair_forward_problem(model, "shared_prefix") finds no problem with (train_ddp.pair_forward_for)."""
    packed = pack_pairs(batch)
    allowed = packed["allowed"][:, None]  # (B, 1, L, L): one mask for every head
    if vlm.unwrap(model).config.get_text_config()._attn_implementation == "eager":  # eager adds it to the scores
        dtype = vlm.unwrap(model).get_input_embeddings().weight.dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    keep = torch.cat([packed["chosen_positions"], packed["rejected_positions"]], 1)  # (B, K)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=allowed,
                   logits_to_keep=keep, **pair_images(batch)).logits  # (B, K, V)
    split = packed["chosen_positions"].shape[1]
    return (sequence_logps(logits[:, :split], packed["chosen_labels"]),
            sequence_logps(logits[:, split:], packed["rejected_labels"]))


# The pair forward is one replaceable function: train_ddp.py picks it by name (--pair-forward).
PAIR_FORWARDS = {"concatenated": concatenated_forward, "shared_image": shared_image_forward,
                 "shared_prefix": shared_prefix_forward}
