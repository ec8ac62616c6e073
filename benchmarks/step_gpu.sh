#!/usr/bin/env bash
# Issue 17 on the GPU, one device call: the step benchmark (benchmarks/step.py) and GOLD's step (benchmarks/gold_peer.py)
# on the same random-weight models, side by side on two GPUs when there are two (else one after the other).
#   OUT=... DATE=... STEM=step-2026-11-30 bash benchmarks/step_gpu.sh      (wheels for datasets/dill/multiprocess/trl in .whl/)
set -uo pipefail
OUT="${OUT:-runs/step_gpu}"; mkdir -p "$OUT"; DATE="${DATE:-$(date +%Y-%m-%d)}"; STEM="${STEM:-step-$DATE}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
M=/tmp/kd_step_models
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from step import build_pair; from pathlib import Path; build_pair(Path('$M/0.5b'), '0.5b')" 2>&1 | grep -v Writing
NG=$(nvidia-smi -L | wc -l)
G2=$([ "$NG" -ge 2 ] && echo 1 || echo 0)
CUDA_VISIBLE_DEVICES=0 timeout "${STEP_S:-420}" python3 benchmarks/step.py --out "$OUT" --date "$DATE" --stem "$STEM" --models $M \
  --pairs "${PAIRS:-0.5b}" --batches "${BATCHES:-1,2,4,8,16}" --variants "${VARIANTS:-naive,default,default_eager,cached}" > "$OUT/step.log" 2>&1 &
if [ -z "${SKIP_GOLD:-}" ]; then
  [ "$G2" = 0 ] && wait
  CUDA_VISIBLE_DEVICES=$G2 timeout "${GOLD_S:-400}" python3 benchmarks/gold_peer.py --models $M/0.5b --batches "${GOLD_BATCHES:-1,2,4,8}" \
    --seq 1024 --modes uld,hybrid --t4 --warmup 2 --timed 3 --out "$OUT/gold-$DATE.json" > "$OUT/gold.log" 2>&1
fi
wait
grep -E '^\{' "$OUT/step.log" | cut -c1-400; grep -E '^\{|Error|error' "$OUT/gold.log" | cut -c1-400 | tail -12
