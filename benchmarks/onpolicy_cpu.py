"""A CPU contrast for issue 20: on-policy vs off-policy on the embedded demo pair (a teacher that already writes Austen,
a 0.5M student), text data, held out on *Persuasion*. Not the T4 path: a check of the mechanism at a scale where the
student learns the data within the run.

    PYTHONPATH=. python benchmarks/onpolicy_cpu.py --out benchmarks/results/onpolicy-cpu-2026-11-30.json

Arms (`kd_kaggle.train.demo_config`, no router, CE + KD; 240 steps x 16 x 128 tokens):
  off_policy                 the shipped recipe
  on_policy_late             + lmbda=0.5 from half-way (onpolicy_start=0.5), 48 new tokens at T=1
  on_policy_late_all         + lmbda=1.0 from half-way
Metrics: held-out bpb (the trainer's final evaluation) and the teacher's bits per byte of the student's own sampled
continuations (T=1, 48 new tokens, fixed seed) of the first half of 64 held-out examples.
"""
import argparse, json, statistics, time
from pathlib import Path
import torch

ARMS = {'off_policy': {}, 'on_policy_late': dict(lmbda=0.5, onpolicy_start=0.5, max_new_tokens=48),
        'on_policy_late_all': dict(lmbda=1.0, onpolicy_start=0.5, max_new_tokens=48),
        'on_policy_late_all_rkl': dict(lmbda=1.0, onpolicy_start=0.5, max_new_tokens=48, divergence='rkl'),
        'on_policy_late_all_jsd': dict(lmbda=1.0, onpolicy_start=0.5, max_new_tokens=48, divergence='jsd', jsd_beta=0.9),
        'on_policy_late_all_onrkl': dict(lmbda=1.0, onpolicy_start=0.5, max_new_tokens=48, onpolicy_divergence='rkl'),
        'on_policy_late_mix_onrkl': dict(lmbda=0.5, onpolicy_start=0.5, max_new_tokens=48, onpolicy_divergence='rkl')}


def samples_bpb(cfg, run_dir: Path, n: int = 64) -> float:
    from kd_kaggle.align import load_tokenizer
    from kd_kaggle.data import build_datasets, make_loader
    from kd_kaggle.evaluate import lm_metrics
    from kd_kaggle.models import load_teacher, resolve_model
    from kd_kaggle.onpolicy import onpolicy_batch
    from transformers import AutoModelForCausalLM
    t_tok, s_tok = load_tokenizer(resolve_model('demo', 'teacher')), load_tokenizer(resolve_model('demo', 'student'))
    _, ev = build_datasets(cfg, t_tok, s_tok, say=None)
    student = AutoModelForCausalLM.from_pretrained(run_dir / 'student').eval()
    batches = []
    for i, b in enumerate(make_loader(ev.select(range(min(n, len(ev)))), 16, s_tok.pad_token_id or 0, t_tok.pad_token_id or 0, shuffle=False)):
        nb, _ = onpolicy_batch(student, b, t_tok, s_tok, cfg.seq_len, max_new_tokens=48, temperature=1.0, seed=10_000 + i, kind='text')
        if nb is not None: batches.append(nb)
    return lm_metrics(load_teacher('demo'), batches, 'teacher')['bpb']


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True); ap.add_argument('--work', default='/tmp/kd_onpolicy_cpu')
    ap.add_argument('--seeds', default='0,1,2'); ap.add_argument('--steps', type=int, default=240)
    ap.add_argument('--arms', default=','.join(ARMS))
    a = ap.parse_args()
    from kd_kaggle.train import demo_config
    torch.set_num_threads(2)
    rows = []
    for seed in map(int, a.seeds.split(',')):
        for arm, over in ((x, ARMS[x]) for x in a.arms.split(',')):
            run = Path(a.work) / f'{arm}-s{seed}'
            cfg = demo_config(run, seed=seed, max_steps=a.steps, resume=None, eval_every=10**6, save_every=10**6, print_every=10**6,
                              cache_dir=str(Path(a.work) / 'data'), **over)
            t = time.monotonic(); final = train_quiet(cfg); wall = time.monotonic() - t
            last = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines() if '"loss"' in l][-1]
            rows.append({'arm': arm, 'seed': seed, 'heldout_bpb': final['student_bpb'], 'teacher_bpb_of_student_samples': samples_bpb(cfg, run),
                         'wall_s': round(wall, 1), 'onpolicy_steps': last.get('onpolicy_steps', 0), 'generate_s': round(last.get('generate_s', 0.0), 1)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {arm: {k: statistics.mean(r[k] for r in rows if r['arm'] == arm) for k in ('heldout_bpb', 'teacher_bpb_of_student_samples', 'wall_s')}
               for arm in a.arms.split(',')}
    Path(a.out).write_text(json.dumps({'machine': 'CPU (2 cores), fp32', 'command': 'python benchmarks/onpolicy_cpu.py --out ' + a.out,
                                       'steps': a.steps, 'arms': rows, 'summary': summary}, indent=1))
    for arm, s in summary.items(): print(arm, {k: round(v, 4) for k, v in s.items()})


def train_quiet(cfg):
    import contextlib, io
    from kd_kaggle.train import train
    import shutil; shutil.rmtree(cfg.output_dir, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()): return train(cfg)


if __name__ == '__main__':
    main()
