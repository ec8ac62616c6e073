"""One distillation step on the T4 path: the library's own `train_step` against the seed's naive step (and GOLD's, from
benchmarks/gold_peer.py), per batch size, with CUDA kernel time as the T4 proxy.

    python benchmarks/step.py --out $OUT --date 2026-11-30                         # GPU (T4 emulation), 0.5B->135M
    python benchmarks/step.py --pairs 0.5b,1.5b --batches 1,2,4,8,16 ...           # and 1.5B->360M
    python benchmarks/step.py --smoke                                              # CPU: the embedded demo pair, tiny batches

T4 emulation (as benchmarks/train_gpu.py): the library's fp16 policy (autocast + GradScaler, fp16 teacher, fp32 student),
a 15 GiB allocator cap, SDPA limited to the memory-efficient and math kernels, the repeat-KV attention fix. Models are
random-weight copies of the real configs with the real tokenizers; data = Austen prose through the library's data path.

Variants (same model files, same data, same batch sizes):
  default  `kd_kaggle.train.setup_run(KDConfig(...))` + `kd_kaggle.train.train_step`: exactly the trainer's step
  cached   the same with `teacher_cache` (built first by `kd_kaggle.cache.cache_teacher`, top-64): no teacher on the GPU
  *_eager  the same with KDConfig(compile='off') (default and cached compile their decoder layers on a CUDA GPU)
  *_masked the same with the attention masks passed to the models, as before 2026-11-30 (today right-padded batches run
           without them: SDPA's causal kernel); the contrast that measures that change
  *_gathers the same with the student's head rows in id order (its KD buckets gathered per chunk and scattered back in
           backward), as before the bucket order of 2026-11-30; the contrast for that change
  naive    the seed's step: full student and teacher logits, id-truncated KL at T=4 x T^2 (KDConfig(kd_method='seed_naive'),
           through the same train_step)
           + CE, on the same models, optimizer, scaler and autocast as `default` (the loss is the only difference)
Rows: {variant, pair, batch, seq, tok_s, peak_gib, kernel_ms, gemm_ms, oom, ...}: tok_s = real (non-pad) student tokens per
wall second; kernel_ms = summed CUDA kernel time of one step (torch.profiler), gemm_ms its GEMM part; host_syncs = calls
of cudaStreamSynchronize/cudaDeviceSynchronize/cudaMemcpy (D2H) per step; pad_frac = padded share of the student batch.
"""
import argparse, contextlib, gc, json, re, statistics, sys, tempfile, time, traceback
from functools import partial
from unittest import mock
from pathlib import Path
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO/'benchmarks'))
QWEN15 = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
              vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6)
SMOL360 = dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560,
               vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=8192, rms_norm_eps=1e-5)
GEMM = re.compile(r'gemm|gemv|nvjet|cutlass|xmma|wgmma|cublas|s1688|s16816|sm90_|sm80_|sm75_', re.I)
ATTN = re.compile(r'fmha|flash|attention|mem_eff', re.I)   # cutlass-based attention kernels are not GEMMs
CATS = [('gemm', lambda k: GEMM.search(k) and not ATTN.search(k)), ('attention', lambda k: ATTN.search(k)),
        ('copy/cast/index', lambda k: re.search(r'copy|memcpy|memset|cat|index|gather|scatter|fill|Memcpy|Memset', k)),
        ('reduce/softmax', lambda k: re.search(r'softmax|logsumexp|reduce|sum|max|min|norm', k, re.I)),
        ('optimizer', lambda k: re.search(r'multi_tensor|foreach|adam', k, re.I)), ('elementwise/other', lambda k: True)]
SYNC = re.compile(r'cudaStreamSynchronize|cudaDeviceSynchronize|cudaMemcpy(?!Async)|cudaEventSynchronize')

def build_pair(root: Path, pair: str):
    "Save random-weight teacher/student dirs for `pair` (0.5b: Qwen2.5-0.5B->SmolLM2-135M, 1.5b: Qwen2.5-1.5B->SmolLM2-360M)."
    import train_gpu
    if pair == '0.5b': train_gpu.build_models(root); return
    saved = train_gpu.QWEN05.copy(), train_gpu.SMOL135.copy()
    train_gpu.QWEN05.clear(); train_gpu.QWEN05.update(QWEN15); train_gpu.SMOL135.clear(); train_gpu.SMOL135.update(SMOL360)
    try: train_gpu.build_models(root)
    finally: train_gpu.QWEN05.clear(); train_gpu.QWEN05.update(saved[0]); train_gpu.SMOL135.clear(); train_gpu.SMOL135.update(saved[1])

def run_for(cfg):
    from kd_kaggle.train import setup_run
    return setup_run(cfg)

def batches_of(r, b: int, n: int) -> list:
    "The first `n` training batches of size `b` as the trainer's loader yields them, on the device."
    from kd_kaggle.data import make_loader
    pads = (r.s_tok.pad_token_id or 0, r.t_tok.pad_token_id or 0)
    loader = (r.cache.make_loader if r.cache else make_loader)(r.train_ds, b, *pads, r.cfg.seed, 0)
    out = []
    for batch in loader:
        out.append({k: v.to(r.acc.device) if hasattr(v, 'to') else v for k, v in batch.items()})
        if len(out) == n: break
    return out

def library_step(r):
    "The trainer's own step (kd_kaggle.train.train_step) with the curriculum's weights at 50 % progress."
    from kd_kaggle.checkpoint import TrainState
    from kd_kaggle.train import train_step
    state, weights = TrainState(), r.curriculum.weights(0.5)
    return lambda batch: train_step(r, state, [batch], weights)

def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()

def profile(step, batches, n):
    "Kernel ms per step, by category, and host syncs per step, over `n` profiled steps."
    from torch.profiler import profile as prof_ctx, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with prof_ctx(activities=acts) as prof:
        for i in range(n): step(batches[i % len(batches)])
        sync()
    ev = prof.key_averages()
    dself = lambda e: getattr(e, 'self_device_time_total', 0) or 0
    kernels = [e for e in ev if dself(e) > 0 and not e.key.startswith(('aten::', 'autograd::', 'torch::', 'Optimizer.', 'cuda', 'ProfilerStep'))]
    cats = {}
    for e in kernels:
        c = next(name for name, f in CATS if f(e.key)); cats[c] = cats.get(c, 0) + dself(e) / 1e3 / n
    syncs = sum(e.count for e in ev if SYNC.search(e.key)) / n
    top = sorted(kernels, key=dself, reverse=True)[:12]
    return {'kernel_ms': sum(cats.values()), 'gemm_ms': cats.get('gemm', 0.0), 'host_syncs': syncs,
            'categories_ms': {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            'top_kernels': [{'name': e.key[:100], 'ms': round(dself(e) / 1e3 / n, 3), 'calls': e.count / n} for e in top]}

def measure(variant, pair, r, step, b, args) -> dict:
    row = dict(variant=variant, pair=pair, batch=b, seq=args.seq, tok_s=None, peak_gib=None, kernel_ms=None, gemm_ms=None, oom=False)
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    try:
        batches = batches_of(r, b, args.warmup + args.steps)
        tokens = [int(x['student_attention_mask'].sum()) for x in batches]
        row['tokens_per_step'] = statistics.mean(tokens)
        row['pad_frac'] = 1 - sum(tokens) / sum(x['student_attention_mask'].numel() for x in batches)
        for x in batches[:args.warmup]: step(x)
        sync(); t0 = time.perf_counter()
        for x in batches[args.warmup:]: step(x)
        sync(); wall = time.perf_counter() - t0
        row['tok_s'] = sum(tokens[args.warmup:]) / wall
        row['step_ms'] = 1e3 * wall / args.steps
        if torch.cuda.is_available(): row['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
        if args.profile_steps: row.update(profile(step, batches, args.profile_steps))
        if row.get('kernel_ms'): row['kernel_us_per_token'] = 1e3 * row['kernel_ms'] / row['tokens_per_step']
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError) or 'out of memory' in str(e):   # train_step re-raises an OOM with advice
            row['oom'] = True; row['note'] = str(e).split('\n')[0][:160]
        else: row['error'] = f'{type(e).__name__}: {str(e)[:300]}'; traceback.print_exc()
    r.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in ('top_kernels', 'categories_ms')}), flush=True)
    return row

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='runs/step'); ap.add_argument('--date', default=time.strftime('%Y-%m-%d'))
    ap.add_argument('--models', default='/tmp/kd_step_models'); ap.add_argument('--pairs', default='0.5b')
    ap.add_argument('--variants', default='naive,default,cached'); ap.add_argument('--batches', default='1,2,4,8,16')
    ap.add_argument('--seq', type=int, default=1024); ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--steps', type=int, default=4); ap.add_argument('--profile-steps', type=int, default=2)   # warmup: compiles
    ap.add_argument('--cap-gib', type=float, default=15.0); ap.add_argument('--smoke', action='store_true')
    ap.add_argument('--stem', default=None, help='file name stem (default step-<date>)')
    args = ap.parse_args()
    from kd_kaggle.config import KDConfig
    from kd_kaggle.models import final_hidden_states
    from kd_kaggle.demo import demo_corpus
    from kd_kaggle.train import demo_config
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='kd_step_'))
    if args.smoke: args.batches, args.seq, args.pairs, args.profile_steps = '1,2', 64, 'demo', 1
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))
        from kd_kaggle.env import use_repeat_kv_for_sdpa
        use_repeat_kv_for_sdpa()
    from torch.nn.attention import sdpa_kernel, SDPBackend
    rows, batch_sizes = [], [int(x) for x in args.batches.split(',')]
    meta = {'date': args.date, 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
            'torch': torch.__version__, 'cap_gib': args.cap_gib, 'seq': args.seq, 'warmup': args.warmup, 'steps': args.steps,
            'profile_steps': args.profile_steps, 't4_emulation': torch.cuda.is_available(), 'command': ' '.join(sys.argv)}
    dest = out/f"{args.stem or f'step-{args.date}'}.json"
    def save():   # after every row: a run cut short by a time limit keeps what it measured
        tmp = dest.with_suffix('.tmp'); tmp.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1)); tmp.replace(dest)
    for pair in args.pairs.split(','):
        if pair == 'demo': base = dict(demo_config(str(work/'base')).__dict__)
        else:
            root = Path(args.models)/pair; build_pair(root, pair)
            data = root/'austen_train.txt'
            if not data.is_file(): data.write_text('\n\n'.join(demo_corpus('train')))
            base = dict(teacher=str(root/'teacher'), student=str(root/'student'), data=str(data), precision='fp16')
        base.update(seq_len=args.seq, batch_size=max(batch_sizes), max_steps=10_000, resume=None, max_eval_examples=8,
                    max_train_examples=max(batch_sizes) * (args.warmup + args.steps) + 64, cache_dir=str(work/f'data-{pair}'))
        for variant in args.variants.split(','):
            cfg_kw = {**base, 'output_dir': str(work/f'{pair}-{variant}'), 'compile': 'off' if variant.endswith('_eager') else 'auto'}
            if variant.startswith('naive'):   # the seed's KD through the trainer's own step (KDConfig.kd_method)
                cfg_kw.update(kd_method='seed_naive', temperature=4.0, curriculum={'ce': 1.0, 'kd': 1.0})
            if variant.startswith('cached'):
                from kd_kaggle.cache import cache_teacher
                cfg_kw['top_k'] = 64
                cache_teacher(KDConfig(**cfg_kw), str(work/f'cache-{pair}'), batch_size=8)
                cfg_kw['teacher_cache'] = str(work/f'cache-{pair}')
            try: r = run_for(KDConfig(**cfg_kw))
            except Exception as e:
                rows.append(dict(variant=variant, pair=pair, error=f'setup: {type(e).__name__}: {e}'[:300])); traceback.print_exc(); continue
            step = library_step(r)
            masked = mock.patch('kd_kaggle.distill.final_hidden_states', partial(final_hidden_states, right_padded=False)) \
                if '_masked' in variant else contextlib.nullcontext()
            gathers = mock.patch('kd_kaggle.losses._student_bucket_order', lambda batch: None) \
                if '_gathers' in variant else contextlib.nullcontext()
            with masked, gathers, sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                for b in batch_sizes:
                    row = measure(variant, pair, r, step, b, args); rows.append(row); save()
                    if row['oom']: break                      # larger batches will not fit either
            del r, step; gc.collect()
            if torch.cuda.is_available(): torch.cuda.empty_cache()
    save()
    print('wrote', dest)

if __name__ == '__main__':
    main()
