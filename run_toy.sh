#!/usr/bin/env bash
# SeVa end to end on the toy world, on CPU, in one command. Every stage skips what is already done,
# so a rerun after a crash continues where it stopped.
#   bash run_toy.sh          (after: python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt)
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# 0. The toy world and the SFT model SeVa starts from (plays LLaVA-1.5).
python -m toyworld

# Alg. 1 lines 1-3: chosen on the original image, rejected under diffusion noise at step 500, equal answers dropped;
# the pool's textvqa (one-sentence captions) and ocr_vqa (reading) records, as the paper's 4.1.
[ -f runs/seva/pairs.jsonl ] || python seva.py --subsets textvqa,ocr_vqa --num-samples 1000 --batch-size 64 \
  --out runs/seva/pairs.jsonl

# Alg. 1 line 4: LoRA-DPO on the pairs, 2 processes (gloo on CPU), the reference = the model with LoRA disabled.
if [ ! -f runs/dpo/adapter/adapter_config.json ]; then
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train_ddp.py \
    --pairs runs/seva/pairs.jsonl --out runs/dpo --save-every 10 --resume
fi
python -m eval.curves runs/dpo/metrics.jsonl --out runs/dpo/curves.png

# Before and after: the SFT model against SFT + SeVa's adapter.
python -m eval.compare --base toy/model-sft --adapter runs/dpo/adapter --pairs runs/seva/pairs.jsonl \
  --out runs/compare --batch-size 64 --temperatures 0.5,1.0

# The gallery: the pairs (images as the model saw them, the answers' differences) and SFT's answers beside SeVa's.
python -m eval.gallery runs/seva/pairs.jsonl --out runs/gallery/pairs.html
python -m eval.gallery --compare runs/compare --out runs/gallery/compare.html
echo "gallery: runs/gallery/pairs.html runs/gallery/compare.html"
