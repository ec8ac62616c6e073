"""Cross-tokenizer knowledge distillation of LLMs inside a Kaggle GPU session: quiet, budgeted, resumable, fp16-safe

Modules:

- `kd_kaggle.losses`: Cross-vocabulary distillation losses: bucketed divergences, sparse teacher targets, a chunked lm_head + CE + KD that never holds an `[N, V]` tensor, normalised auxiliary losses, and the seed's naive KD kept as a benchmark baseline."""

__version__ = "0.1.0"
