"""
The math of SeVa's training side: LoRA, sequence log-probs and the DPO loss (paper Eq. 7).

SeVa (Algorithm 1, step 4) DPO-trains the SFT model on (image, question, chosen, rejected) with LoRA on
every linear layer of the language model except lm_head. The reference model is the SFT model itself:
with LoRA it is the same network with the adapters switched off (`disable_adapter`), so it costs no
memory. LoRA follows torchtune (A Kaiming-initialised, B zero, scale alpha/r); adapters are saved in
PEFT's on-disk layout so `peft.PeftModel.from_pretrained` can load them too. The loss follows
eric-mitchell/direct-preference-optimization: a pure function of four (B,) tensors.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vlm


# ----------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update: y = base(x) + (alpha / r) * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)  # the pretrained layer, frozen
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # LoRA's own weights are at least fp32 (AdamW on bf16 weights loses small updates), whatever the base's
        factory = dict(dtype=torch.promote_types(base.weight.dtype, torch.float32), device=base.weight.device)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: at init the layer equals the base layer
        self.disabled = False  # True inside disable_adapter: the reference model
        self.merged = False  # True after merge_lora: the update lives in base.weight

    def forward(self, x):  # x (..., in)
        out = self.base(x)  # (..., out)
        if self.disabled or self.merged:
            return out
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return out + self.scale * update.to(out.dtype)

    def delta_weight(self):
        return self.scale * self.lora_B.weight @ self.lora_A.weight  # (out, in)


def lora_modules(model):
    """The (name, LoRALinear) pairs of a model."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def apply_lora(model, r, alpha, dropout=0.0, targets=None):
    """Wrap every nn.Linear whose full name matches `targets` in a LoRALinear; train only LoRA params."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers")
    targets = vlm.lora_targets(model) if targets is None else targets
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and re.fullmatch(targets, name)]
    if not names:
        raise ValueError(f"no nn.Linear module name matches the LoRA targets {targets!r}")
    for p in model.parameters():
        p.requires_grad_(False)  # everything frozen; the new LoRA params below are trainable
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), r, alpha, dropout))
    model.lora_target_regex = targets  # remembered for save_lora's adapter_config.json
    return names


def lora_parameters(model):
    """The LoRA parameters of a model, as (name, parameter) pairs."""
    return [(name, p) for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


@contextlib.contextmanager
def disable_adapter(model):
    """Run the model without its LoRA updates (the DPO reference model); restores the flags on exit."""
    modules = [module for _, module in lora_modules(model)]
    if any(module.merged for module in modules):
        raise RuntimeError("cannot disable merged LoRA layers; call unmerge_lora first")
    previous = [module.disabled for module in modules]
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module, was_disabled in zip(modules, previous):
            module.disabled = was_disabled


@torch.no_grad()
def merge_lora(model):
    """Fold each LoRA update into its base weight in place (W += scale * B @ A); no-op if merged."""
    for _, module in lora_modules(model):
        if not module.merged:
            module.base.weight += module.delta_weight().to(module.base.weight.dtype)
            module.merged = True


def remove_lora(model):
    """Merge every LoRA layer and put the plain nn.Linear back: a model any HF code can save and load."""
    merge_lora(model)
    for name, module in lora_modules(model):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, module.base)
    return model


@torch.no_grad()
def unmerge_lora(model):
    """Undo merge_lora (W -= scale * B @ A); no-op if not merged."""
    for _, module in lora_modules(model):
        if module.merged:
            module.base.weight -= module.delta_weight().to(module.base.weight.dtype)
            module.merged = False


# PEFT's adapter_config.json fields that we write as constants and refuse to load otherwise.
PEFT_FIXED = dict(bias="none", fan_in_fan_out=False, modules_to_save=None, use_rslora=False,
                  use_dora=False, layers_to_transform=None)


def peft_key(module_name, param_name):
    """PEFT's safetensors key: `base_model.model.<module>.lora_A.weight` (no adapter name)."""
    return f"base_model.model.{module_name}.{param_name}"


def _atomic_write(path, write):
    tmp = f"{path}.tmp{os.getpid()}"  # same directory, so os.replace is atomic
    write(tmp)
    os.replace(tmp, path)


def save_lora(model, out_dir, base_model_name_or_path=""):
    """Save the LoRA adapter in PEFT's layout: adapter_config.json + adapter_model.safetensors."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers to save")
    settings = {(m.r, m.alpha, getattr(m.dropout, "p", 0.0)) for _, m in modules}
    if len(settings) != 1:
        raise ValueError(f"LoRA layers with different r/alpha/dropout cannot share one config: {settings}")
    r, alpha, dropout = settings.pop()
    names = [name for name, _ in modules]
    # PEFT applies a string target_modules with re.fullmatch over module names, as apply_lora does.
    # If the remembered regex does not reproduce the wrapped names exactly, list them instead.
    regex = getattr(model, "lora_target_regex", None)
    matched = [name for name, _ in model.named_modules() if regex and re.fullmatch(regex, name)]
    if matched != names:
        regex = "|".join(re.escape(name) for name in names)
    config = dict(peft_type="LORA", task_type=None, r=r, lora_alpha=alpha, lora_dropout=dropout,
                  target_modules=regex, base_model_name_or_path=base_model_name_or_path,
                  inference_mode=True, init_lora_weights=True, revision=None, **PEFT_FIXED)
    tensors = {peft_key(name, f"{part}.weight"): getattr(module, part).weight.detach().cpu().contiguous()
               for name, module in modules for part in ("lora_A", "lora_B")}
    os.makedirs(out_dir, exist_ok=True)

    def write_config(path):
        with open(path, "w") as f:
            json.dump(config, f, indent=2)

    _atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                  lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    _atomic_write(os.path.join(out_dir, "adapter_config.json"), write_config)


def load_lora(model, adapter_dir):
    """Load a PEFT-layout LoRA adapter into a model (applying LoRA first if it has none); strict keys."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    for field, value in PEFT_FIXED.items():
        if config.get(field, value) != value:
            raise ValueError(f"{adapter_dir}: {field}={config[field]!r} is not supported (only {value!r})")
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if isinstance(targets, list):  # PEFT: a list of names matches any module name ending in one of them
        targets = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"
    modules = lora_modules(model)
    if not modules:
        apply_lora(model, r, alpha, config.get("lora_dropout", 0.0), targets)
        modules = lora_modules(model)
    elif any((m.r, m.alpha) != (r, alpha) for _, m in modules):
        raise ValueError(f"{adapter_dir}: r={r}, lora_alpha={alpha} differ from the model's LoRA layers")

    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = {peft_key(name, f"{part}.weight"): getattr(module, part).weight
              for name, module in modules for part in ("lora_A", "lora_B")}
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"{adapter_dir}: adapter keys do not match the model; "
                       f"missing {missing[:5]} ({len(missing)} in all), "
                       f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    with torch.no_grad():
        for key, param in params.items():
            if tensors[key].shape != param.shape:  # copy_ would broadcast silently
                raise ValueError(f"{adapter_dir}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(tensors[key])
    return [name for name, _ in modules]


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


# ----------------------------------------------------------------------------- batches
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


def concatenated_forward(model, batch):
    """log pi(chosen|x) and log pi(rejected|x), each (B,), from one forward over the 2B sequences."""
    inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("reference_")}
    logits = model(**inputs).logits  # (2B, T, V)
    logps = sequence_logps(logits, batch["labels"])  # (2B,)
    return logps.chunk(2)


# The prompt (system prompt, 576 image tokens, question) is most of every sequence and is the same in
# chosen and rejected: the two forwards below pay for it once per pair instead of twice.
def unwrap(model):
    """The model inside a DDP wrapper (FSDP2 keeps the model itself)."""
    return getattr(model, "module", model)


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
    image features are computed once and placed into both its chosen and its rejected row."""
    if not forward_supported(model, "shared_image"):
        return concatenated_forward(model, batch)
    image_outputs = unwrap(model).get_image_features(**pair_images(batch), return_dict=True)
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


def forward_supported(model, name):
    """True if the model's family was tested with pair forward `name` (vlm.FAMILIES' pair_forwards) and, for
    shared_prefix, its attention takes a 4D mask; else False, having said why and that the concatenated
    forward runs instead, once (rank 0)."""
    model = unwrap(model)
    why = None
    if name not in vlm.spec(model)["pair_forwards"]:
        why = f"the {vlm.family_of(model)} family has no {name} in vlm.FAMILIES' pair_forwards"
    elif name == "shared_prefix" and model.config.get_text_config()._attn_implementation not in ("sdpa", "eager"):
        why = f"attention {model.config.get_text_config()._attn_implementation!r} takes no 4D mask"  # flash, flex
    if why and not getattr(model, "pair_forward_fallback_logged", False):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{name}: {why}; falling back to the concatenated forward", flush=True)
        model.pair_forward_fallback_logged = True
    return why is None


def shared_prefix_forward(model, batch):
    """log pi(chosen|x) and log pi(rejected|x), each (B,), from one forward over B packed sequences: the
    image features and the prompt are computed once per pair, and the lm_head runs only where an answer
    token is predicted. Equal to concatenated_forward (tests/test_shared_prefix.py)."""
    if not forward_supported(model, "shared_prefix"):
        return concatenated_forward(model, batch)
    packed = pack_pairs(batch)
    allowed = packed["allowed"][:, None]  # (B, 1, L, L): one mask for every head
    if unwrap(model).config.get_text_config()._attn_implementation == "eager":  # eager adds it to the scores
        dtype = unwrap(model).get_input_embeddings().weight.dtype
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
