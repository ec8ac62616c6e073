#!/usr/bin/env bash
# Issue 15 on the GPU, one device call: fp16 gradients of the fused loss at real shapes (unless SKIP_GRADS=1), then the
# same two-arm quality run in fp16 (the T4 path) and in bf16 (contrast), one process per precision and seed, side by side.
#   RUNS="fp16:0 bf16:0 fp16:1" bash benchmarks/fp16_gpu.sh   (on the device; wheels for datasets carried in .whl/)
# Each run pretrains its own teacher (~35 GiB at its peak on the GPU): three at a time fit an H200.
set -uo pipefail
OUT="${OUT:-runs/fp16_gpu}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DATE="${DATE:-$(date +%Y-%m-%d)}"; STEPS="${STEPS:-119}"; RUNS="${RUNS:-fp16:0 bf16:0}"; DEADLINE="${DEADLINE:-500}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch, transformers, datasets; print(torch.__version__, transformers.__version__, datasets.__version__)'
for run in $RUNS; do p=${run%%:*}; s=${run##*:}
  d=/tmp/kdq_out/$p-$s; mkdir -p $d
  timeout $((DEADLINE + 40)) python3 benchmarks/quality.py --arms ce_only,kd_only --steps "$STEPS" --precision $p --seed $s \
    --date "$DATE" --stem "fp16fix-quality-$DATE-$p-seed$s" --out $d --work /tmp/kdq_$p-$s --deadline "$DEADLINE" > $d/log.txt 2>&1 &
done
[ -n "${SKIP_GRADS:-}" ] || timeout 300 python3 benchmarks/fp16_grads.py --device cuda --out "$OUT" --date "$DATE" 2>&1 | tee "$OUT/fp16-grads.log"
wait
cp /tmp/kdq_out/*/*.json "$OUT"/ 2>/dev/null
for f in /tmp/kdq_out/*/log.txt; do echo "== $f"; grep -E "^(ce_only|kd_only|teacher) |FAILED|Error" $f | head -5; done | tee "$OUT/summary.txt"
