"""
The math of SeVa's training side (Alg. 1 line 4): sequence log-probs, the DPO loss (paper Eq. 7), and the
pair forwards that score chosen and rejected, both on the ORIGINAL image.

    L = -log sigmoid( beta * [ (log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x)) ] )

with log pi(y|x) the sum of the answer tokens' log-probabilities (`sequence_logps`: answer + end-of-turn
token; image, system prompt and question masked out). As eric-mitchell/direct-preference-optimization has it,
the loss is a pure function of four (B,) tensors, and chosen and rejected go through one forward. Read the
naive forward (`concatenated_forward`) first; `shared_image_forward` and `shared_prefix_forward` compute the
same numbers paying for the image and the prompt once per pair. Each forward also takes pairs with several
rejected answers (paper 3.3: `multi_negative_loss`), and LD-DPO's length weighting; `rpo_term` is RPO's NLL.
Nothing here prints, reads the environment or stores anything on the model: train_ddp.py decides which forward
runs (and says so). The batches come from collate.py (chosen rows, then rejected rows).
"""
import torch
import torch.nn.functional as F

import collate
import positions
import vlm


# ----------------------------------------------------------------------------- log-probs
def sequence_logps(logits, labels, average=False, public=None, ld_alpha=None):
    """Log-probability of each sequence's labelled tokens: the sum (or mean) over labels != -100.

    public, ld_alpha (LD-DPO, Liu et al. 2024): a row's first public[i] answer tokens count fully, the tokens
    after them (the "verbose" part beyond the shorter answer of its pair) are weighted by ld_alpha."""
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1; fp32 before log_softmax
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != -100  # (B, T-1): answer tokens (and their end-of-turn token)
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T-1): any valid index; masked out below
    token_logps = logits.log_softmax(-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if public is not None:
        index = mask.cumsum(-1) - 1  # (B, T-1): the answer token's index within its answer
        token_logps = torch.where(index < public[:, None], token_logps, ld_alpha * token_logps)
    total = (token_logps * mask).sum(-1)  # (B,)
    if average:
        return total / mask.sum(-1).clamp(min=1)  # (B,); a row with no labels gives 0, not nan
    return total  # (B,): Eq. 7 uses the sum


def prompt_length(labels):
    """(...,): the index of each sequence's first labelled token, i.e. the length of the prompt before its answer."""
    return (labels != -100).int().argmax(-1)


def answer_tokens(labels):
    """(B,) the number of labelled (scored) tokens of each row, as sequence_logps counts them."""
    return (labels[:, 1:] != -100).sum(-1)


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


# Paper 3.3: SeVa as contrastive learning. With K rejected answers r_1..r_K of one chosen answer c, and the
# implicit rewards r = beta * (log pi - log ref):
#   infonce   L = -log( exp(r_c) / (exp(r_c) + sum_j exp(r_j)) ) = logsumexp(r_c, r_1..r_K) - r_c   (Eq. 12-13)
#   pairwise  L = mean_j dpo_loss(c, r_j)                                                     (K separate pairs)
# With K = 1 both are Eq. 7: logsumexp(r_c, r_1) - r_c = log(1 + exp(r_1 - r_c)) = -log sigmoid(r_c - r_1).
# Worked example, beta 1, log-ratios (log pi - log ref): chosen 1.0, rejected 0.0 and 1.0 (K = 2):
#   infonce   logsumexp(1, 0, 1) - 1 = log(e + 1 + e) - 1 = log(6.4366) - 1 = 0.8620
#   pairwise  (-log sigmoid(1) - log sigmoid(0)) / 2 = (0.3133 + 0.6931) / 2 = 0.5032
NEGATIVE_LOSSES = ("infonce", "pairwise")


def negative_counts(pair_index, pairs):
    """(B,) float: how many rejected answers each pair has, from the pair of each rejected row (R,)."""
    return torch.zeros(pairs, device=pair_index.device).index_add_(
        0, pair_index, torch.ones_like(pair_index, dtype=torch.float32))


def negative_slots(pair_index):
    """(R,): each rejected row's place among its pair's rejected answers (0, 1, ...); a pair's rows are contiguous."""
    return torch.arange(pair_index.shape[0], device=pair_index.device) - torch.searchsorted(pair_index, pair_index)


def multi_negative_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                        pair_index, beta=0.1, form="infonce", label_smoothing=0.0, loss_type="sigmoid"):
    """The loss of each pair of chosen against its K rejected answers (K may differ from pair to pair).

    The chosen tensors are (B,); the rejected ones are flat (R,), rejected answer j belonging to pair
    pair_index[j] (R,): no padding answer is ever scored. Returns (losses (B,), chosen_rewards (B,),
    rejected_rewards (R,))."""
    if form not in NEGATIVE_LOSSES:
        raise ValueError(f"unknown multi-negative loss {form!r}; choose from {NEGATIVE_LOSSES}")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # (R,)
    pairs = policy_chosen_logps.shape[0]
    counts = negative_counts(pair_index, pairs)  # (B,): K of each pair
    if form == "pairwise":
        each, _, _ = dpo_loss(policy_chosen_logps[pair_index], policy_rejected_logps,
                              reference_chosen_logps[pair_index], reference_rejected_logps, beta, label_smoothing,
                              loss_type)  # (R,): one DPO loss per (chosen, rejected j)
        losses = torch.zeros_like(chosen_rewards).index_add(0, pair_index, each) / counts  # (B,)
    else:
        if label_smoothing or loss_type != "sigmoid":
            raise ValueError("the infonce loss has no label smoothing and no ipo or hinge form; use pairwise")
        # (B, 1 + K_max): each pair's chosen reward, then its rejected rewards, -inf where a pair has fewer
        slot = negative_slots(pair_index)  # (R,)
        logits = torch.full((pairs, 1 + int(counts.max())), float("-inf"), device=chosen_rewards.device,
                            dtype=chosen_rewards.dtype)
        logits[:, 0] = chosen_rewards
        logits[pair_index, 1 + slot] = rejected_rewards
        losses = torch.logsumexp(logits, -1) - chosen_rewards  # (B,)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def rpo_term(policy_chosen_logps, chosen_tokens, alpha):
    """RPO (Pang et al. 2024; TRL's rpo_alpha): alpha x the chosen answer's negative log-likelihood per token,
    added to each pair's preference loss, so that the chosen answer's probability is pulled up, not only apart
    from the rejected one. Example: log pi(c) = -6.0 over 3 tokens, alpha 0.5: 0.5 x 6.0 / 3 = 1.0."""
    return alpha * -policy_chosen_logps / chosen_tokens.clamp(min=1)


# ----------------------------------------------------------------------------- a batch's parts (collate.collate_pairs)
def model_inputs(batch):
    """What the model is called with: the batch less labels, reference log-probs and pair_index."""
    return {k: v for k, v in batch.items() if k not in ("labels", "pair_index") and not k.startswith("reference_")}


def ld_public(labels, pairs, pair_index):
    """LD-DPO's public length of each row: the shorter of its pair's two answers, in scored tokens."""
    tokens = answer_tokens(labels)  # (B + R,)
    public = torch.minimum(tokens[:pairs][pair_index], tokens[pairs:])  # (R,)
    return torch.cat([public, public])


# ----------------------------------------------------------------------------- the naive pair forward
def concatenated_forward(model, batch, ld_alpha=None):
    """log pi(chosen|x) (B,) and log pi(rejected|x) (B,), or (R,) in pair order with several rejected answers per
    pair, from one forward over every sequence. ld_alpha: LD-DPO's weight of the tokens beyond the shorter answer
    (one rejected answer per pair only)."""
    logits = model(**model_inputs(batch), use_cache=False).logits  # (B + R, T, V)
    pairs, pair_index = collate.split_rows(batch)
    public = ld_public(batch["labels"], pairs, pair_index) if ld_alpha is not None else None
    logps = sequence_logps(logits, batch["labels"], public=public, ld_alpha=ld_alpha)  # (B + R,)
    return logps[:pairs], logps[pairs:]


# ----------------------------------------------------------------------------- the prompt once per pair
# The prompt (system prompt, 576 image tokens, question) is most of every sequence and is the same in
# chosen and rejected: the two forwards below pay for it once per pair instead of twice.
def pair_images(model, batch):
    """The image tensors (pixel_values, ...) of each pair once: every row of a pair shows the same image."""
    pairs, pair_index = collate.split_rows(batch)
    config = vlm.unwrap(model).config
    chosen_of_each = vlm.image_inputs(batch, config, pair_index.tolist())  # the chosen row's image, per rejected row
    for key, value in vlm.image_inputs(batch, config, list(range(pairs, len(batch["input_ids"])))).items():
        if not torch.equal(chosen_of_each[key], value):  # Alg. 1 line 4: all on the original image
            raise ValueError(f"{key}: the chosen and rejected rows of a pair must show the same image")
    return vlm.image_inputs(batch, config, list(range(pairs)))


def shared_image_forward(model, batch, ld_alpha=None):
    """As concatenated_forward, but the vision tower and projector run on B images, not B + R: each pair's
    image features are computed once and placed into its chosen row and its rejected rows. Only for a model
    that vlm.pair_forward_problem(model, "shared_image") finds no problem with (trainable.pair_forward_for)."""
    pairs, pair_index = collate.split_rows(batch)
    image_outputs = vlm.unwrap(model).get_image_features(**pair_images(model, batch), return_dict=True)
    features = list(image_outputs.pooler_output)  # B tensors (image tokens, D): one per pair
    rows = features + [features[i] for i in pair_index.tolist()]  # rows: chosen, then rejected
    encoded = {"image": type(image_outputs)(pooler_output=rows)}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_encoder_outputs=encoded,
                   use_cache=False, **{k: batch[k] for k in vlm.TOKEN_KEYS if k in batch}).logits  # (B + R, T, V)
    public = ld_public(batch["labels"], pairs, pair_index) if ld_alpha is not None else None
    logps = sequence_logps(logits, batch["labels"], public=public, ld_alpha=ld_alpha)
    return logps[:pairs], logps[pairs:]


def pack_pairs(batch, row_positions=None, blocks=None):
    """One sequence per pair, prompt + chosen answer + its rejected answer(s), from a collate.collate_pairs batch.

    row_positions: the positions of the batch's rows ((B + R, T), or M-RoPE's (3, B + R, T); positions.py), each
    packed token taking its own row's; None: 0, 1, ... along each row. blocks: the rows' blocks attended both ways
    (B + R, T) (positions.attention_blocks), or None.

    The prompt is everything before a row's first labelled token and must be the same in every row of a pair.
    Returns input_ids and position_ids (B, L), the block mask `allowed` (B, L, L) (True: query may attend to
    key), `slot` (R,): which rejected answer of its pair each rejected row is, and per answer slot (0: chosen,
    1..K: rejected) the packed positions whose logits score it and its labels, each (B, 1 + longest answer):
    column 0 is the prompt's last position (it predicts every answer's first token) with label -100, so that
    sequence_logps' shift pairs column j's logits with label j + 1. A pair with fewer than K rejected answers
    has no labels in its missing slots.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]  # (B + R, T)
    pairs, pair_index = collate.split_rows(batch)
    device, rejected_rows = input_ids.device, input_ids.shape[0] - pairs
    lengths = batch["attention_mask"].sum(-1)  # (B + R,): right padding
    labelled = labels != -100  # (B + R, T)
    if not labelled.any(-1).all():
        raise ValueError("every sequence of a pair needs labelled answer tokens")
    prompt_all = prompt_length(labels)  # (B + R,)
    prompt = prompt_all[:pairs]  # (B,)
    column = torch.arange(input_ids.shape[1], device=device)  # (T,)
    same_prompt = (input_ids[pairs:] == input_ids[:pairs][pair_index]) | (column >= prompt_all[pairs:, None])
    if not (torch.equal(prompt[pair_index], prompt_all[pairs:]) and same_prompt.all()):
        raise ValueError("chosen and rejected must share their prompt to be packed into one sequence")

    # Each pair's answers in slots 0 (chosen), 1..K (rejected, in order): their rows and lengths.
    slot = negative_slots(pair_index)  # (R,)
    negatives = int(slot.max()) + 1
    answer_row = torch.arange(pairs, device=device)[:, None].repeat(1, 1 + negatives)  # (B, 1 + K)
    answer_row[pair_index, 1 + slot] = pairs + torch.arange(rejected_rows, device=device)
    answer_length = torch.zeros(pairs, 1 + negatives, dtype=torch.long, device=device)  # 0: no such answer
    answer_length[:, 0] = lengths[:pairs] - prompt
    answer_length[pair_index, 1 + slot] = lengths[pairs:] - prompt[pair_index]
    first = prompt[:, None] + answer_length.cumsum(1) - answer_length  # (B, 1 + K): where each answer starts

    # Packed index k of pair i: segment 0 = prompt, a + 1 = answer slot a, K + 2 = padding. A rejected answer
    # sits after the answers before it; every answer continues the prompt's positions. Padding copies the
    # prompt's last token (any non-image token will do: it is masked out).
    end = (prompt + answer_length.sum(1))[:, None]  # (B, 1)
    k = torch.arange(int(end.max()), device=device)[None]  # (1, L)
    segment = (k >= prompt[:, None]).long() + (k[:, :, None] >= first[:, None, 1:]).sum(-1) + (k >= end).long()
    padding = 2 + negatives
    answer = (segment - 1).clamp(0, negatives)  # (B, L): the answer slot of an answer position
    inside = (segment >= 1) & (segment < padding)
    source_row = torch.where(inside, answer_row.gather(1, answer), torch.arange(pairs, device=device)[:, None])
    source_col = torch.where(inside, k - first.gather(1, answer) + prompt[:, None], k)  # (B, L)
    source_col = torch.where(segment == padding, prompt[:, None] - 1, source_col)
    packed_ids = input_ids[source_row, source_col]  # (B, L)
    if row_positions is None:
        row_positions = column.expand(input_ids.shape)  # (B + R, T)
    position_ids = torch.where(segment == padding, 0, row_positions[..., source_row, source_col])  # (B, L) or (3, B, L)

    # Prompt causal; each answer sees the prompt and itself causally, never another answer. Padding queries
    # see the prompt, so no row of the mask is empty (an empty row would give nan gradients).
    query, key = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = k[0][None, :, None] >= k[0][None, None, :]  # (1, L, L)
    allowed = causal & ((key == 0) | ((key == query) & (key != padding)))  # (B, L, L)
    if blocks is not None:  # and the prompt's blocks both ways (PaliGemma's prefix, Gemma 3's images)
        block = torch.where(segment == 0, blocks[source_row, source_col], -1)  # (B, L)
        allowed = allowed | ((block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0))

    def score(a):  # packed positions and labels of answer slot a, (B, 1 + A)
        length = answer_length[:, a]
        j = torch.arange(int(length.max()) + 1, device=device)[None]  # (1, 1 + A)
        inside = (j >= 1) & (j <= length[:, None])  # (B, 1 + A): column j >= 1 holds answer token j - 1
        positions = torch.where(inside, first[:, a, None] + j - 1, prompt[:, None] - 1)  # (B, 1 + A)
        answer_labels = labels[answer_row[:, a, None], (prompt[:, None] + j - 1).clamp(max=labels.shape[1] - 1)]
        return positions, answer_labels.masked_fill(~inside, -100)

    scored = [score(a) for a in range(1 + negatives)]
    return dict(input_ids=packed_ids, position_ids=position_ids, allowed=allowed, slot=slot, length=end[:, 0],
                positions=[p for p, _ in scored], labels=[lab for _, lab in scored])


def attention_mask_for(model, allowed, position_ids=None):
    """A boolean (B, 1, L, L) mask as the model's attention takes it: as is for SDPA; eager adds it to the
    scores, so there it becomes 0 where allowed and the dtype's minimum elsewhere. A model with sliding-window
    layers (Gemma 3) gets one mask per kind of layer (positions.masks_for_layers)."""
    window = positions.sliding_window(model)
    if window is not None and position_ids is not None:
        return {kind: attention_mask_for(model, mask) for kind, mask in
                positions.masks_for_layers(allowed, position_ids, window).items()}
    if vlm.unwrap(model).config.get_text_config()._attn_implementation != "eager":
        return allowed
    dtype = vlm.unwrap(model).get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def slot_logps(logits, packed, pair_index, ld_alpha=None):
    """From the logits kept at every answer slot's positions (B, sum over slots of 1 + A, V): log pi(chosen)
    (B,) and log pi(rejected) (B,) or (R,), in the rows' order."""
    public = None
    if ld_alpha is not None:
        public = torch.minimum(answer_tokens(packed["labels"][0]), answer_tokens(packed["labels"][1]))
    logps, start = [], 0
    for labels in packed["labels"]:  # slot by slot: (B,) each
        logps.append(sequence_logps(logits[:, start:start + labels.shape[1]], labels, public=public,
                                    ld_alpha=ld_alpha))
        start += labels.shape[1]
    rejected = torch.stack(logps[1:], 1)[pair_index, packed["slot"]]  # (R,): back to the rows' order
    return logps[0], rejected


def shared_prefix_forward(model, batch, ld_alpha=None):
    """log pi(chosen|x) (B,) and log pi(rejected|x) (B,), or (R,) with several rejected answers per pair, from
    one forward over B packed sequences: the image features and the prompt are computed once per pair, and the
    lm_head runs only where an answer token is predicted. Equal to concatenated_forward
    (tests/test_shared_prefix.py). Only for a model that vlm.pair_forward_problem(model, "shared_prefix") finds
    no problem with (trainable.pair_forward_for)."""
    packed = pack_pairs(batch, positions.row_positions(model, batch), positions.attention_blocks(model, batch))
    _, pair_index = collate.split_rows(batch)
    keep = torch.cat(packed["positions"], 1)  # (B, sum over slots of 1 + A)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                   attention_mask=attention_mask_for(model, packed["allowed"][:, None], packed["position_ids"]),
                   logits_to_keep=keep, use_cache=False, **pair_images(model, batch)).logits  # (B, kept, V)
    return slot_logps(logits, packed, pair_index, ld_alpha)


# ----------------------------------------------------------------------------- every pair in one row
# Packing across pairs: shared_prefix_forward's B sequences still pad to the longest pair. Here they follow one
# another in ONE row of sum(length) tokens: no padding token is computed. Each pair keeps its own mask (on the
# diagonal of one block mask: no pair attends to another) and its own positions (each starts at 0), and its
# image fills its own image tokens (the images are in pair order, as the image tokens are). train_ddp.py
# --max-tokens-per-batch sizes such micro-batches by their packed tokens.
def pack_rows(packed):
    """pack_pairs' B sequences, less their padding, in one row: input_ids and position_ids (1, N), the block mask
    `allowed` (1, N, N), and each slot's scored positions moved to where its pair starts in the row."""
    length = packed["length"]  # (B,)
    offset = length.cumsum(0) - length  # (B,): where each pair starts in the row
    real = torch.arange(packed["input_ids"].shape[1], device=length.device)[None] < length[:, None]  # (B, L)
    blocks = [packed["allowed"][i, :n, :n] for i, n in enumerate(length.tolist())]
    return dict(packed, input_ids=packed["input_ids"][real][None],
                position_ids=packed["position_ids"][..., real].unsqueeze(-2),  # (1, N), or (3, 1, N)
                allowed=torch.block_diag(*[b.to(torch.uint8) for b in blocks]).bool()[None],
                positions=[p + offset[:, None] for p in packed["positions"]])


def packed_forward(model, batch, ld_alpha=None):
    """shared_prefix_forward's numbers from one row holding every pair of the batch (pack_rows): no padding
    computed. Equal to concatenated_forward (tests/test_shared_prefix.py). Only for a model that
    vlm.pair_forward_problem(model, "packed") finds no problem with."""
    packed = pack_rows(pack_pairs(batch, positions.row_positions(model, batch),
                                  positions.attention_blocks(model, batch)))
    _, pair_index = collate.split_rows(batch)
    pairs = packed["length"].shape[0]
    keep = torch.cat([p.reshape(1, -1) for p in packed["positions"]], 1)  # (1, sum over slots of B (1 + A))
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                   attention_mask=attention_mask_for(model, packed["allowed"][:, None], packed["position_ids"]),
                   logits_to_keep=keep, use_cache=False, **pair_images(model, batch)).logits  # (1, kept, V)
    per_slot = [p.shape[1] for p in packed["positions"]]  # 1 + A of each slot
    logits = torch.cat([chunk.reshape(pairs, width, -1) for chunk, width in
                        zip(logits[0].split([pairs * w for w in per_slot]), per_slot)], 1)  # (B, kept / B, V)
    return slot_logps(logits, packed, pair_index, ld_alpha)


# The pair forward is one replaceable function: train_ddp.py picks it by name (--pair-forward).
PAIR_FORWARDS = {"concatenated": concatenated_forward, "shared_image": shared_image_forward,
                 "shared_prefix": shared_prefix_forward, "packed": packed_forward}
