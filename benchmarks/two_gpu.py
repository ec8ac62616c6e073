"""The two-GPU path for real (Kaggle's T4x2 analogue): speed, loss agreement, a 2-GPU checkpoint resumed on 1 GPU, and the
Kaggle notebook's training cell on both GPUs. One device call on `nvidia-h200-x2`:

    python benchmarks/two_gpu.py --out $OUT --date 2026-11-30        # wheels for datasets/nbclient carried (see --site)

Runs `benchmarks/train_gpu.py` (the library's `train()`, T4 emulation: fp16 autocast + GradScaler, 15 GiB cap per GPU,
SDPA memory-efficient/math only) at per-GPU micro-batch 4 x 1024 tokens:
  two      accelerate launch --multi_gpu --num_processes 2, batch 4            (global batch 8 per step)
  one      1 GPU, batch 4 x grad_accum 2                                      (the same 8 sequences per step, same order)
  resumed  1 GPU, batch 4 x grad_accum 2, resumed from `two`'s mid-run checkpoint
  (these three eager, KDConfig(compile='off'): compile time would sit inside a 40-step speed measurement)
  notebook kaggle/kd_kaggle_distill.ipynb executed by nbclient, shipped defaults (compile='auto') (benchmarks/kaggle_notebook_gpu.py), both GPUs visible
speedup = tokens/s of `two` / tokens/s of `one` (medians over logging windows after the first 10 steps);
loss_max_rel_diff = max over steps of |loss_two - loss_one| / loss_one; resumed_on_1gpu = `resumed` ran from the 2-GPU
checkpoint and its steps after it track `two` within 2 %.
"""
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PORTS = {'two': 29511, 'one': 29523, 'resumed': 29537}   # one port per run: no reuse of a port still in TIME_WAIT

def losses(run: Path) -> dict:
    out = {}
    for line in (run/'metrics.jsonl').read_text().splitlines():
        r = json.loads(line)
        if 'loss' in r and r.get('loss') is not None: out[r['step']] = r['loss']
    return out

def tok_s(run: Path, after: int = 10):
    v = [json.loads(l).get('tok_s') for l in (run/'metrics.jsonl').read_text().splitlines()]
    steps = [json.loads(l).get('step', 0) for l in (run/'metrics.jsonl').read_text().splitlines()]
    v = [x for x, s in zip(v, steps) if x and s > after]
    return statistics.median(v) if v else None

def launch(n_proc: int, gpus: str, out: Path, args, extra=(), log=None):
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', *(['--multi_gpu'] if n_proc > 1 else []), '--num_processes', str(n_proc),
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(PORTS[out.name]),
           str(REPO/'benchmarks'/'train_gpu.py'), '--out', str(out), '--models', args.models, '--steps', str(args.steps),
           '--batch-size', '4', '--log-every', '1', '--compile', 'off', '--eval-every', '1000', '--cache-dir', str(Path(args.work)/'data_cache'), *extra]
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': gpus}
    return subprocess.Popen(cmd, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT, cwd=REPO)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='runs/two_gpu'); ap.add_argument('--work', default='/tmp/two_gpu')
    ap.add_argument('--models', default='/tmp/kd_models'); ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--date', default=time.strftime('%Y-%m-%d')); args = ap.parse_args()
    out, work = Path(args.out), Path(args.work); out.mkdir(parents=True, exist_ok=True); work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO/'benchmarks')); from train_gpu import build_models
    build_models(Path(args.models))
    half = args.steps // 2
    t = {}
    for name, n, gpus, extra in (('two', 2, '0,1', ['--save-every', str(half)]), ('one', 1, '0', ['--grad-accum', '2', '--save-every', '1000'])):
        t0 = time.time(); p = launch(n, gpus, work/name, args, extra, out/f'{name}.log'); rc = p.wait(); t[name] = (rc, time.time() - t0)
        print(name, 'rc', rc, f'{t[name][1]:.0f}s', flush=True)
    ckpt = work/'two'/'checkpoints'/f'checkpoint-{half:08d}'
    p_res = launch(1, '1', work/'resumed', args, ['--grad-accum', '2', '--save-every', '1000', '--resume', str(ckpt)], out/'resumed.log')
    nb = subprocess.run([sys.executable, str(REPO/'benchmarks'/'kaggle_notebook_gpu.py'), '--models', args.models, '--out', str(work/'nb'),
                         '--steps', '20'], cwd=REPO, capture_output=True, text=True, env={**os.environ, 'CUDA_VISIBLE_DEVICES': '0,1'})
    (out/'notebook.log').write_text(nb.stdout + nb.stderr)
    rc_res = p_res.wait()
    res = {'date': args.date, 'device': subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True, text=True).stdout.split('\n')[0],
           'setup': 'fp16 autocast + GradScaler, 15 GiB cap per GPU, SDPA efficient/math; random-weight Qwen2.5-0.5B -> SmolLM2-135M, real tokenizers; '
                    f'micro-batch 4 x 1024 per GPU, {args.steps} steps', 'runs': {k: {'rc': v[0], 'wall_s': round(v[1], 1)} for k, v in t.items()}}
    a, b = (losses(work/'one'), losses(work/'two')) if all(v[0] == 0 for v in t.values()) else ({}, {})
    if a and b:
        common = sorted(set(a) & set(b))
        res.update(tok_s_two=tok_s(work/'two'), tok_s_one=tok_s(work/'one'), steps_compared=len(common),
                   loss_max_rel_diff=max(abs(b[s] - a[s]) / a[s] for s in common))
        res['speedup'] = res['tok_s_two'] / res['tok_s_one'] if res['tok_s_one'] else None
        res['loss_first_last'] = {'one': [a[common[0]], a[common[-1]]], 'two': [b[common[0]], b[common[-1]]]}
    c = losses(work/'resumed') if rc_res == 0 else {}
    after = [s for s in sorted(c) if s > half and s in b]
    res['resumed_max_rel_diff'] = max((abs(c[s] - b[s]) / b[s] for s in after), default=None)
    res['resumed_on_1gpu'] = bool(rc_res == 0 and after and res['resumed_max_rel_diff'] < 0.02 and all(c[s] == b[s] for s in range(1, half + 1) if s in c))
    try: s = json.loads((work/'nb'/'summary.json').read_text())
    except (OSError, ValueError): s = {'ran': False, 'errors': [nb.stderr[-2000:]]}
    res['notebook_launcher'] = bool(s.get('ran') and s.get('processes') == '2')
    res['notebook'] = {k: s.get(k) for k in ('ran', 'processes', 'live_plot_images', 'report', 'wall_s', 'errors')}
    res['notebook']['student_bpb'] = (s.get('final_metrics') or {}).get('student_bpb')
    (out/f'{args.date}-2gpu.json').write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))

if __name__ == '__main__':
    main()
