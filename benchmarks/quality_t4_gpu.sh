#!/bin/bash
# One device call of issue 16's quality run (benchmarks/quality_t4.py); NB=1 also runs the Kaggle notebook on both GPUs
# (issue 18, benchmarks/kaggle_notebook_gpu.py) alongside. Carry .whl (datasets, dill, multiprocess, trl, .whl/nb/*) and
# .qdata (a copy of ../shared/data: web_bible.txt, dolly/). A second call on the still-warm machine continues the run
# (same --work: teacher, students and finished jobs are reused).
#   DEADLINE=540 NB=1 bash benchmarks/quality_t4_gpu.sh
#   DEADLINE=560 JOBS='dolly:gold_uld,gold_hybrid' EXTRA='--est-gold 200' bash benchmarks/quality_t4_gpu.sh   # a second call
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/nb/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site TRL_SITE=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/q16}; mkdir -p "$OUT"
if [ "$NB" = 1 ]; then
  ( python3 -c "
import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from train_gpu import build_models
from kd_kaggle.demo import demo_corpus
build_models(Path('/tmp/kd_models')); Path('/tmp/kd_models/austen_train.txt').write_text('\n\n'.join(demo_corpus('train')) + '\n')" &&
    CUDA_VISIBLE_DEVICES=0,1 python3 benchmarks/kaggle_notebook_gpu.py --models /tmp/kd_models --out /tmp/nb --steps 12 ) > "$OUT/nb.log" 2>&1 &
  NBPID=$!
fi
python3 benchmarks/quality_t4.py --data-dir .qdata --out "$OUT" --deadline "${DEADLINE:-540}" --work /tmp/kdq16 ${WORKERS:+--workers $WORKERS} \
  ${JOBS:+--jobs "$JOBS"} --naive-micro-batch 8 $EXTRA 2>&1 | tee -a "$OUT/quality.log"
if [ -n "$NBPID" ]; then wait $NBPID; echo "notebook rc $?"; cp /tmp/nb/summary.json "$OUT/nb_summary.json"; cp /tmp/nb/executed.ipynb "$OUT/nb_executed.ipynb"; fi
nvidia-smi --query-gpu=memory.used --format=csv
