"""train_ddp.py's flags: grouped, each with its default and the paper's value; the defaults run the toy world.
`python train_ddp.py --help` prints them."""
import argparse

import common
import dpo
import plan
import vlm

# Defaults that run the toy world; the paper's values are named in each flag's help.
OBJECTIVE_DEFAULTS = {
    "dpo": dict(model="toy/model-sft", data="runs/seva/pairs.jsonl", out="runs/dpo", lr=5e-4, lora_r=32,
                lora_alpha=64),
    "sft": dict(model="toy/model-init", data="toy/sft.json", out="runs/sft", lr=1e-3, lora_r=0, lora_alpha=0),
}


def parse_args(argv=None, description=None):
    """The parsed flags, with the objective's defaults filled in where not given (OBJECTIVE_DEFAULTS)."""
    p = argparse.ArgumentParser(prog="train_ddp.py", description=description, formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--objective", default="dpo", choices=["dpo", "sft"],
                   help="dpo: SeVa's preference training on seva.py pairs; sft: supervised fine-tuning")
    g.add_argument("--model", help="local HF model folder to start from (dpo: toy/model-sft; sft: toy/model-init)")
    g.add_argument("--data", "--pairs", dest="data",
                   help="dpo: pairs jsonl from seva.py (runs/seva/pairs.jsonl); sft: LLaVA-665k json (toy/sft.json)")
    g.add_argument("--image-folder", default="toy/images", help="folder the records' image paths are relative to")
    g.add_argument("--template", choices=vlm.TEMPLATES,
                   help="prompt template (default: the family's; LLaVA-1.5: llava_v1, the authors'; others: chat)")
    g.add_argument("--max-length", type=int, default=2048, help="longer examples are skipped (paper: 2048)")
    g.add_argument("--cache-data", action="store_true", help="keep tokenized examples in memory (small data sets)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="prepare the next step's batches (images, tokens) in a background thread while a step "
                        "computes: the same batches, one step's more in memory (default: on; --no-prefetch: on the "
                        "training thread)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length, so batches pad less (LLaVA's group_by_modality_length); "
                        "the order stays a function of --seed, and resumes stay exact")
    g.add_argument("--out", help="output folder: metrics.jsonl, args.json, checkpoints, adapter/ or model/")
    g = p.add_argument_group("LoRA and DPO")
    g.add_argument("--lora-r", type=int, help="LoRA rank, 0 = full fine-tuning (paper: 1024; toy: 32)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (paper: 2048, i.e. 2r; toy: 64)")
    g.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout, sft only: dpo turns every dropout off (paper config 0.05, effectively 0)")
    g.add_argument("--train-projector", action="store_true",
                   help="also train the multimodal projector (the authors' code does; the paper does not say)")
    g.add_argument("--train-vision", action="store_true",
                   help="also train the vision tower (the toy world's SFT, whose small CLIP stands in for a "
                        "pretrained one; LLaVA and SeVa keep it frozen)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta (paper: 0.1)")
    g.add_argument("--loss-type", default="sigmoid", choices=dpo.LOSS_TYPES, help="sigmoid is Eq. 7 (paper)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (paper: 0)")
    g.add_argument("--negatives-loss", default="infonce", choices=dpo.NEGATIVE_LOSSES,
                   help="pairs with several rejected answers (seva.py --num-negatives): infonce, paper 3.3's "
                        "contrastive form (Eq. 12-13), or pairwise, the mean of K Eq. 7 losses; both are Eq. 7 at K=1")
    g.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="RPO (Pang et al. 2024, TRL's rpo_alpha): add alpha x the chosen answer's NLL per token, "
                        "against the chosen log-prob falling during DPO (paper: 0, off)")
    g.add_argument("--ld-alpha", type=float, default=None,
                   help="LD-DPO (Liu et al. 2024, TRL's ld_alpha): weight the log-probs of the tokens beyond the "
                        "shorter answer of a pair by alpha (0-1), against DPO's pull towards length "
                        "(paper: off; 1 = plain DPO); one rejected answer per pair only")
    g.add_argument("--reference", default="adapter", choices=["adapter", "precomputed", "pairs"],
                   help="adapter: the policy with LoRA disabled (a frozen copy for full fine-tuning); "
                        "precomputed: log-probs computed once, stored beside the pairs; pairs: those seva.py "
                        "--reference-logps wrote into the pairs while making them (no reference forward at all)")
    g.add_argument("--pair-forward", default="shared_prefix", choices=list(dpo.PAIR_FORWARDS),
                   help="how a pair is scored, all equal (tests/test_shared_prefix.py): shared_prefix packs prompt + "
                        "chosen + rejected into one sequence (families without it fall back to concatenated); "
                        "packed puts every pair of a micro-batch in one row, no padding (best with "
                        "--max-tokens-per-batch); shared_image runs the vision tower once per pair; concatenated runs "
                        "chosen and rejected as 2B full sequences (the naive way)")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged/, the LoRA merged into the model")
    g.add_argument("--merge-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="the dtype OUT/merged/ is saved in, the one you will evaluate it in (auto: the base's, as its "
                        "config.json says; LLaVA-1.5: float16); a line says how much of the update it rounds away, a "
                        "warning where it loses it (small updates, as at SeVa's lr 2e-6, can vanish in bf16: "
                        "then evaluate the base with OUT/adapter)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=8, help="examples per device per micro-step (paper: 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (paper: 1)")
    g.add_argument("--max-tokens-per-batch", type=int, default=0,
                   help="dpo: cut each device's share of a step (batch x accumulation pairs) into micro-batches of at "
                        "most this many packed tokens (prompt once + every answer, as --pair-forward packed computes "
                        "them) instead of --grad-accum equal ones; the step is still the same global batch of pairs")
    g.add_argument("--global-batch", type=int, default=0,
                   help="if set, checked against batch x accumulation x world size (paper: 128)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (paper: 1, over pairs listed twice)")
    g.add_argument("--max-steps", type=int, default=0, help="if set, train exactly this many steps")
    g.add_argument("--lr", type=float, help="peak learning rate (paper: 2e-6; toy dpo: 5e-4, toy sft: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="warmup fraction of the steps (paper: 0.03)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (paper: 1.0)")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"],
                   help="bf16 autocast on CUDA (paper: bf16); CPUs run fp32 (with SEVA_CPU_BF16=1 in the "
                        "environment bf16 autocast, as a GPU: for tests); fp16 is refused")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (paper: on)")
    g.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="ddp, or fsdp (FSDP2, one unit per decoder layer; the paper used DeepSpeed ZeRO-3)")
    g.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, help="write a checkpoint every N steps (0: only the end)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT's newest good checkpoint if there is one (a damaged one is named and the "
                        "one before it used)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest; 2: one to fall back to)")
    g.add_argument("--allow-other-base", action="store_true",
                   help="--resume even where --model's weights are not those the checkpoint was trained on")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    plan.add_arguments(p)
    args = p.parse_args(argv)
    if args.keep < 1:
        p.error("--keep must be >= 1")
    for key, value in OBJECTIVE_DEFAULTS[args.objective].items():  # the objective's defaults, where not given
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
