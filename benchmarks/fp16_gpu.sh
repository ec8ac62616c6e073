#!/usr/bin/env bash
# Issue 15 on the GPU, one device call: fp16 gradients of the fused loss at real shapes, then the same two-arm quality
# run in fp16 (the T4 path) and in bf16 (contrast) side by side. Results land in $OUT (or ./runs/fp16_gpu).
#   bash benchmarks/fp16_gpu.sh            (on the device: wheels for datasets carried in .whl/)
set -uo pipefail
OUT="${OUT:-runs/fp16_gpu}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DATE="${DATE:-$(date +%Y-%m-%d)}"; STEPS="${STEPS:-119}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch, transformers, datasets; print(torch.__version__, transformers.__version__, datasets.__version__)'
for p in fp16 bf16; do
  mkdir -p "$OUT/$p"
  timeout 520 python3 benchmarks/quality.py --arms ce_only,kd_only --steps "$STEPS" --precision $p --date "$DATE" \
    --stem "fp16fix-quality-$DATE-$p" --out "$OUT/$p" --work /tmp/kdq_$p --deadline 500 > "$OUT/$p/log.txt" 2>&1 &
done
timeout 300 python3 benchmarks/fp16_grads.py --device cuda --out "$OUT" --date "$DATE" 2>&1 | tee "$OUT/fp16-grads.log"
wait
tail -n 12 "$OUT"/fp16/log.txt "$OUT"/bf16/log.txt
