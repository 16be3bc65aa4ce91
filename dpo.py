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
        factory = dict(dtype=base.weight.dtype, device=base.weight.device)
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
        return out + self.scale * self.lora_B(self.lora_A(self.dropout(x)))  # (..., out)

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
    for key in examples[0]:
        if key not in batch:  # pixel_values, and whatever else a family's processor returns
            batch[key] = torch.cat([e[key] for e in examples])
    return batch


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


# The pair forward is one replaceable function: train_ddp.py picks it by name (--pair-forward).
PAIR_FORWARDS = {"concatenated": concatenated_forward}
