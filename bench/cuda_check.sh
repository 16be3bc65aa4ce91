#!/usr/bin/env bash
# The CUDA paths on one GPU, in one short run (a few minutes): the toy world's SFT, seva.py's pairs, LoRA-DPO
# under torchrun and eval/, all with bf16 autocast, each checked against its fp32 run; then bench/dpo_step.py at
# GPU size. The tests never need a GPU; this is what a GPU machine adds.
#
#   bash bench/cuda_check.sh [WORK_DIR]        (python3 with torch+CUDA and requirements.txt's packages)
#
# Every step runs even if one before it fails; the failed steps are listed at the end (exit status 1).
# QUICK=1 runs a tiny world and skips the benchmark: a dry run of this script on a CPU. BENCH=0 skips the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
W=${1:-/tmp/seva-cuda-check}
FAILED=()
step() {  # step NAME COMMAND...: run, time, and remember a failure
  local name=$1; shift
  echo; echo "=== $name"; local t0=$SECONDS
  "$@" || { echo "!!! $name failed"; FAILED+=("$name"); }
  echo "--- $name: $((SECONDS - t0)) s"
}

step versions $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

# 1. A small toy world; its SFT runs on the GPU (bf16 autocast), stage 0 and the accuracy check on the CPU.
WORLD=(--sft-images 3000 --pool-size 400 --unseen-images 50 --val-images 300 --pope-images 10 --vision-steps 400
       --sft-epochs 5 --noise-check 100 --threads 8)
[ "${QUICK:-0}" = 1 ] && WORLD=(--sft-images 200 --pool-size 100 --unseen-images 8 --val-images 20 --pope-images 3
       --vision-steps 5 --sft-epochs 1 --noise-check 8 --threads 2 --width 32 --vision-layers 1 --text-layers 1)
step world $PY -m toyworld --out "$W" "${WORLD[@]}"

# 2. Alg. 1's pairs on the GPU, bf16 and fp32: how many pairs does bf16 generation change?
for p in bf16 fp32; do
  step "seva $p" $PY seva.py --model "$W/model-sft" --data "$W/pool.json" --image-folder "$W/images" \
    --num-samples "${SAMPLES:-400}" --batch-size 64 --precision $p --out "$W/pairs-$p.jsonl" --no-progress
done
step "pairs bf16 vs fp32" $PY - "$W" <<'EOF'
import json, sys
rows = {p: {r["id"]: (r["chosen"], r["rejected"]) for r in map(json.loads, open(f"{sys.argv[1]}/pairs-{p}.jsonl"))}
        for p in ("bf16", "fp32")}
same = sum(rows["bf16"].get(k) == v for k, v in rows["fp32"].items())
print(f"pairs: bf16 {len(rows['bf16'])}, fp32 {len(rows['fp32'])}, identical {same}")
EOF
# The dry run's barely trained model answers alike on both images, so its DPO trains on made-up pairs.
[ "${QUICK:-0}" = 1 ] && $PY -c "import json, sys; [print(json.dumps(dict(id=r['id'], image=r['image'], \
question=r['conversations'][0]['value'].replace('<image>', '').strip(), chosen=r['conversations'][1]['value'], \
rejected='no ' + r['conversations'][1]['value']))) for r in json.load(open(sys.argv[1]))]" "$W/pool.json" > "$W/pairs-fp32.jsonl"

# 3. LoRA-DPO on the GPU under torchrun: every pair forward in bf16, the reference precomputed, gradient
#    checkpointing, and fp32; the same pairs, seed and steps, so the losses should agree to bf16's precision.
DPO=(--model "$W/model-sft" --pairs "$W/pairs-fp32.jsonl" --image-folder "$W/images" --max-steps 8 --batch-size 8
     --save-every 4 --no-progress)
run_dpo() { local name=$1; shift; $PY -m torch.distributed.run --standalone --nproc_per_node=1 train_ddp.py "${DPO[@]}" --out "$W/dpo-$name" "$@"; }
step "dpo fp32" run_dpo fp32 --precision fp32
for fwd in shared_prefix shared_image concatenated; do step "dpo bf16 $fwd" run_dpo "bf16-$fwd" --pair-forward $fwd; done
step "dpo bf16 precomputed" run_dpo bf16-precomputed --reference precomputed
step "dpo bf16 checkpointing merge" run_dpo bf16-ckpt --gradient-checkpointing --merge
resume_from_step_4() {  # the bf16 run's folder as a crash after step 4 leaves it (its last checkpoint is step 4's)
  rm -rf "$W/dpo-bf16-resumed" && cp -r "$W/dpo-bf16-shared_prefix" "$W/dpo-bf16-resumed" \
    && rm -rf "$W/dpo-bf16-resumed/adapter" && [ "$(cat "$W/dpo-bf16-resumed/latest")" = checkpoint-000004 ] \
    && run_dpo bf16-resumed --resume
}
step "dpo bf16 resume" resume_from_step_4
step "dpo losses" $PY - "$W" <<'EOF'
import glob, json, os, sys
runs = {os.path.basename(d)[4:]: [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
        for d in sorted(glob.glob(f"{sys.argv[1]}/dpo-*")) if os.path.exists(f"{d}/metrics.jsonl")}
ref = runs["fp32"]
for name, rows in runs.items():
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref))
    print(f"{name:28s} steps {len(rows)}  losses " + " ".join(f"{r['loss']:.4f}" for r in rows)
          + f"  max |loss - fp32| {gap:.2e}  final margin {rows[-1]['rewards/margins']:.4f}")
assert all(len(r) == 8 for r in runs.values()), "a run did not train 8 steps"
for name, rows in runs.items():  # bf16 against fp32: an H200 gave at most 9.2e-4 over these 8 steps
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref)) < 5e-3, f"{name} left fp32"
resumed = max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["bf16-resumed"], runs["bf16-shared_prefix"]))
print(f"resumed from step 4 against uninterrupted: max |loss difference| {resumed:.2e}")
assert resumed < 1e-3, "the resumed run left the uninterrupted one"
EOF

# 4. eval/ on the GPU: the SFT model against SFT + the adapter (toy VQA clean and noisy, POPE).
step "eval compare" $PY -m eval.compare --base "$W/model-sft" --adapter "$W/dpo-bf16-shared_prefix/adapter" \
  --image-folder "$W/images" --pope-dir "$W/pope" --val "$W/val.json" --out "$W/compare" --batch-size 64 \
  --temperatures ""

# 5. Speed at GPU size: the pair forwards' step time and peak memory.
[ "${QUICK:-0}" = 1 ] || [ "${BENCH:-1}" = 0 ] || step "bench dpo_step" $PY bench/dpo_step.py --width 1024 --layers 8 --vision-width 512 --vision-layers 8 --pairs 8 \
  --rounds 5

echo; echo "failed steps: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
