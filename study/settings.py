"""
What the study runs: each ablation's setting and values (ABLATIONS), the settings every run shares (BASE), a run's
name, and the exploratory search's grid (study/protocol.md, "Exploratory").
"""
import itertools
import random

import augment
import pairs


# name -> (what the paper calls it, the setting that varies, its values)
ABLATIONS = {
    "table2": ("Table 2 in small: SeVa against the SFT model, the default setting", "noise_step", [500]),
    "fig5": ("Fig. 5: answer length and pair-wise win / lose / tie, SeVa's answers against the SFT model's, the "
             "default setting", "noise_step", [500]),
    "augmentation": ("Table 1: the source of rejected answers", "augmentation", augment.ALL_AUGMENTATIONS),
    "noise_step": ("Fig. 6: diffusion noise step", "noise_step", [100, 200, 300, 400, 500, 600, 700, 800, 900]),
    "consistency": ("Table 5 in small: consistency under sampling, the default setting (short answers sampled at "
                    "temperature 0.5 and 1.0 that equal the greedy one)", "noise_step", [500]),
    "pool_size": ("Table 4: unlabeled instances sampled", "num_samples", [250, 500, 1000, 2000]),
    "subsets": ("Table 4: the pool's subsets (textvqa: captions, ocr_vqa: short reading questions, gqa: short "
                "questions, coco: descriptions)", "subsets",
                ["textvqa,ocr_vqa", "textvqa", "ocr_vqa", "gqa", "coco", "textvqa,ocr_vqa,gqa,coco"]),
    "lora_rank": ("Table 6: LoRA rank (alpha = 2r)", "lora_r", [8, 32, 128]),
    "pool_source": ("pool: SFT images (as the paper) or images the model never saw", "data",
                    ["pool.json", "pool-unseen.json"]),
    "objective": ("Table 3: SeVa against continual SFT on the same questions with the true answers",
                  "objective", ["dpo", "sft"]),
    "sft_strength": ("The strength of the SFT model: SeVa from SFT models trained for fewer or more epochs",
                     "sft_epochs", [1, 2, 3, 6, 10]),
    "pair_filter": ("Pair quality against gain: DPO on the kept pairs filtered by their true answers (an oracle "
                    "no real run has; for analysis only)", "pairs_used", ["all", "right_wrong", "not_inverted",
                                                                          "inverted"]),
    "dpo_lr": ("DPO learning rate (added after the runs above: not in the paper's ablations)", "lr",
               [5e-5, 1e-4, 2e-4, 5e-4]),
    "beta": ("DPO beta (added after the runs above: not in the paper's ablations)", "beta", [0.05, 0.1, 0.5, 1.0]),
    # Values that are dicts set several settings at once (their label names them).
    "negatives": ("Paper 3.3: K negatives (K noise seeds at the step), InfoNCE against K pairwise losses", "negatives",
                  [{"num_negatives": 1}, {"num_negatives": 2, "negatives_loss": "infonce"},
                   {"num_negatives": 4, "negatives_loss": "infonce"}, {"num_negatives": 2, "negatives_loss": "pairwise"},
                   {"num_negatives": 4, "negatives_loss": "pairwise"}]),
    "remedies": ("The DPO remedies: RPO's NLL on the chosen answer, LD-DPO's length weighting", "remedy",
                 [{"rpo_alpha": 0.0}, {"rpo_alpha": 0.5}, {"rpo_alpha": 1.0}, {"ld_alpha": 0.5}]),
}


# The settings every run shares unless its ablation varies one (chosen with the pipeline, see the report).
# main() sets sft_epochs to the world's own (toy/model-sft itself) and subsets to --subsets.
BASE = dict(augmentation="diffusion", noise_step=500, num_samples=1000, lora_r=32, data="pool.json", objective="dpo",
            sft_epochs=6, pairs_used="all", lr=5e-4, beta=0.1, subsets="textvqa,ocr_vqa", num_negatives=1,
            negatives_loss="infonce", rpo_alpha=0.0, ld_alpha=None)


# What rows written before a setting existed ran with: the closed stage, its 6-epoch SFT model, the whole pool.
LEGACY = dict(sft_epochs=6, subsets="all")


# Which kept pairs pair_filter trains on, by pairs.pair_quality's classes (the true answer is never used otherwise).
PAIR_FILTERS = {"all": pairs.QUALITY, "right_wrong": pairs.QUALITY[:1], "inverted": pairs.QUALITY[2:3],
                "not_inverted": pairs.QUALITY[:2] + pairs.QUALITY[3:]}


GLOBAL_BATCH = 16  # as run_toy.sh's 2 processes x 8


def setting_of(key, value):
    """The settings one value of an ablation sets: {key: value}, or the value itself when it is a dict."""
    return dict(value) if isinstance(value, dict) else {key: value}


def label(value):
    """A value as the report's tables show it."""
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def matches(run, key, value, values=()):
    """Whether a run is that value of that ablation's setting: with dict values, every setting any of the
    ablation's `values` sets is the value's or else BASE's (rpo_alpha 0 is not the LD-DPO run, whose rpo_alpha
    is 0 too)."""
    keys = {k for v in values for k in setting_of(key, v)} | set(setting_of(key, value))
    expected = {k: BASE[k] for k in keys if k in BASE} | setting_of(key, value)
    return all(run["setting"].get(k) == v for k, v in expected.items())


def run_name(setting, seed):
    """A run's folder under OUT/runs: the settings that differ from BASE, and the seed."""
    changed = [f"{k}={v}" for k, v in sorted(setting.items()) if BASE.get(k) != v]
    return "-".join(changed or ["base"]) + f"-seed{seed}"


# study/protocol.md, "Exploratory": the grid, and how much of it is run (its dated section of 2026-12-02).
SEARCH = dict(num_negatives=[1, 2, 4], negatives_loss=["infonce", "pairwise"], rpo_alpha=[0.0, 0.5],
              ld_alpha=[None, 0.5], lr=[1e-4, 5e-4], beta=[0.1, 0.5], noise_step=[500, 800])


SEARCH_DRAWS = 15  # settings drawn at random from the grid, beside the default


CONFIRM_SEEDS = [3, 4, 5]


CONFIRM_DATA_SEED = 1  # the confirmation split's images and questions; the world's own are seed 0


GUARD = 0.02  # Cover and short-answer accuracy within 2 points of the SFT model's


def search_settings():
    """The default and SEARCH_DRAWS settings drawn (seeded) from the grid's runnable settings: with one negative
    the InfoNCE and pairwise losses are the same loss, so those settings count once; LD-DPO takes one rejected
    answer per pair (train_ddp.py refuses it with several), so K > 1 goes without it."""
    grid = [dict(zip(SEARCH, values)) for values in itertools.product(*SEARCH.values())]
    grid = [g for g in grid if runnable(g)]
    default = {k: BASE[k] for k in SEARCH}
    return [default] + random.Random("search/0").sample([g for g in grid if g != default], SEARCH_DRAWS)


def runnable(setting):
    """Whether train_ddp.py takes a searched setting (see search_settings)."""
    negatives = setting.get("num_negatives", 1)
    return (negatives > 1 or setting.get("negatives_loss", "infonce") == "infonce") and \
        (negatives == 1 or setting.get("ld_alpha") is None)


TEMPERATURES = (0.5, 1.0)  # study/protocol.md, C5
