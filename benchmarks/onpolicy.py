"""Issue 20: on-policy vs off-policy distillation on Dolly, T4 path (fp16), 3 seeds.

    PYTHONPATH=. python benchmarks/onpolicy.py --smoke                                   # CPU, tiny models
    PYTHONPATH=$PWD:/tmp/site python benchmarks/onpolicy.py --data-dir .qdata --out $OUT  # GPU(s)

Teacher, student inits, data files and the T4 emulation are those of benchmarks/quality_t4.py (the teacher pretrained
here on Austen + Bible + Dolly dev; Dolly dev = training prompts/responses, Dolly test = held-out). Arms (each
`kd_kaggle.train.train`, the shipped default recipe otherwise):
  off_policy      KDConfig() as shipped, `steps` steps
  off_policy_x15  the same with 1.5x the steps (a bracket for equal wall time: on-policy steps also sample)
  on_policy       + lmbda=0.5, max_new_tokens=64, sampling_temperature=1.0 (forward KL, as the default)
  on_policy_jsd   + lmbda=0.5, max_new_tokens=64, divergence='jsd' (beta 0.5, as TRL GKD's default)
  on_policy_late  + lmbda=0.5 from half-way (onpolicy_start=0.5): the student first learns to write the data's text
  on_policy_late_rkl, on_policy_rkl   the same with reverse KL (mode-seeking: text the teacher finds likely)
  on_policy_late_full, on_policy_end  lmbda=1 (every step on-policy) from half-way / from 75% of the run
  *_onrkl         the same, reverse KL on the student's samples only (onpolicy_divergence='rkl'; the data's steps keep
                  forward KL + CE): on_policy_late_onrkl / on_policy_end_onrkl (lmbda=1 from 50% / 75%), on_policy_mix_onrkl
                  (lmbda=0.5 from 50%)
  off_policy_x2, on_policy_x2_end_onrkl   twice the steps: a student that writes the data better before its samples count
Metrics per trained student, on the first `--eval-prompts` held-out Dolly examples:
  heldout_bpb                     response bits per byte (the trainer's final evaluation, all held-out examples)
  teacher_bpb_of_student_samples  the teacher's bits per byte of the student's own sampled continuations (T=1, 64 new
                                  tokens, fixed seed) of the held-out prompts: `onpolicy_batch` + `lm_metrics(teacher)`
  rougeL                          ROUGE-L F1 (whitespace tokens, LCS) of greedy continuations vs the reference responses
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / 'benchmarks'):
    if str(p) not in sys.path: sys.path.insert(0, str(p))
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
ARMS = ('off_policy', 'off_policy_x15', 'on_policy', 'on_policy_jsd', 'on_policy_late', 'on_policy_late_rkl', 'on_policy_rkl',
        'on_policy_late_full', 'on_policy_end', 'on_policy_late_onrkl', 'on_policy_end_onrkl', 'on_policy_mix_onrkl', 'off_policy_x2',
        'on_policy_x2_end_onrkl')
LATE = dict(lmbda=0.5, max_new_tokens=64, onpolicy_start=0.5)   # (NEW_TOKENS)
NEW_TOKENS = 64


def rouge_l(candidate: str, reference: str) -> float:
    "ROUGE-L F1 over whitespace tokens (longest common subsequence)."
    c, r = candidate.split(), reference.split()
    if not c or not r: return 0.0
    prev = [0] * (len(r) + 1)
    for x in c:
        cur = [0]
        for j, y in enumerate(r): cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0: return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def arm_config(a, S, work: Path, info: dict, arm: str, seed: int, run_dir: Path):
    import dataclasses, quality_t4
    cfg = quality_t4.arm_config(a, S, work, info['files'], 'dolly', 'default', seed, run_dir)
    over = {'off_policy': {}, 'off_policy_x15': dict(max_steps=int(a.steps * 1.5)),
            'on_policy': dict(lmbda=0.5, max_new_tokens=NEW_TOKENS), 'on_policy_jsd': dict(lmbda=0.5, max_new_tokens=NEW_TOKENS, divergence='jsd'),
            'on_policy_late': LATE, 'on_policy_late_rkl': dict(LATE, divergence='rkl'),
            'on_policy_rkl': dict(lmbda=0.5, max_new_tokens=NEW_TOKENS, divergence='rkl'),
            'on_policy_late_full': dict(LATE, lmbda=1.0), 'on_policy_end': dict(LATE, lmbda=1.0, onpolicy_start=0.75),
            'on_policy_late_onrkl': dict(LATE, lmbda=1.0, onpolicy_divergence='rkl'),
            'on_policy_end_onrkl': dict(LATE, lmbda=1.0, onpolicy_start=0.75, onpolicy_divergence='rkl'),
            'on_policy_mix_onrkl': dict(LATE, onpolicy_divergence='rkl'),
            'off_policy_x2': dict(max_steps=a.steps * 2),
            'on_policy_x2_end_onrkl': dict(LATE, max_steps=a.steps * 2, lmbda=1.0, onpolicy_start=0.75, onpolicy_divergence='rkl')}
    return dataclasses.replace(cfg, **over[arm])


def sample_metrics(cfg, run_dir: Path, n_prompts: int, seed: int) -> dict:
    "Teacher bpb of the trained student's sampled continuations and ROUGE-L of its greedy ones, on held-out prompts."
    import torch
    from kd_kaggle.align import load_tokenizer
    from kd_kaggle.data import build_datasets, make_loader
    from kd_kaggle.env import choose_precision, detect_device
    from kd_kaggle.evaluate import lm_metrics
    from kd_kaggle.models import load_teacher
    from kd_kaggle.onpolicy import onpolicy_batch, prompt_lengths, prompt_texts
    from transformers import AutoModelForCausalLM
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    policy = choose_precision(cfg.precision, detect_device())
    t_tok, s_tok = load_tokenizer(cfg.teacher), load_tokenizer(cfg.student)
    _, ev = build_datasets(cfg, t_tok, s_tok, say=None)
    ev = ev.select(range(min(n_prompts, len(ev))))
    teacher = load_teacher(cfg.teacher, policy.teacher_dtype, dev)
    student = AutoModelForCausalLM.from_pretrained(run_dir / 'student').to(dev).eval()
    sampled, rouge, examples, stats = [], [], [], {'kept': 0, 'examples': 0, 'new_tokens': 0}
    ac = torch.autocast(dev.type, dtype=policy.autocast_dtype) if policy.autocast_dtype else torch.autocast(dev.type, enabled=False)
    for i, b in enumerate(make_loader(ev, 16, s_tok.pad_token_id or 0, t_tok.pad_token_id or 0, shuffle=False)):
        b = {k: v.to(dev) for k, v in b.items()}
        with ac:
            nb, st = onpolicy_batch(student, b, t_tok, s_tok, cfg.seq_len, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=10_000 + i)
            gb, _ = onpolicy_batch(student, b, t_tok, s_tok, cfg.seq_len, max_new_tokens=NEW_TOKENS, temperature=0.0, seed=0)
        for k in stats: stats[k] += st[k]
        if nb is not None: sampled.append(nb)
        lengths = prompt_lengths(b)
        prompts = prompt_texts(b, s_tok, lengths)
        refs = [full[len(p):] for full, p in zip(prompt_texts(b, s_tok, b['student_attention_mask'].sum(1).tolist()), prompts)]
        gens = {}
        if gb is not None:
            for full in prompt_texts(gb, s_tok, gb['student_attention_mask'].sum(1).tolist()):
                p = next((p for p in prompts if full.startswith(p)), None)
                if p is not None: gens[p] = full[len(p):]
        rouge += [rouge_l(gens.get(p, ''), r) for p, r in zip(prompts, refs)]
        examples += [(gens.get(p, ''), r) for p, r in zip(prompts, refs)]
    tb = lm_metrics(teacher, sampled, 'teacher', policy)['bpb'] if sampled else float('nan')
    return {'teacher_bpb_of_student_samples': tb, 'rougeL': statistics.mean(rouge) if rouge else float('nan'),
            'sample_prompts': stats['examples'], 'sample_kept': stats['kept'], 'sample_new_tokens': stats['new_tokens'],
            'greedy_empty': sum(not g.strip() for g, _ in examples), 'greedy_examples': [g[:160] for g, _ in examples[:3]],
            'references': [r[:160] for _, r in examples[:3]]}


def run_job(a, S, work: Path, spec: str) -> dict:
    import torch, quality_t4, quality
    from kd_kaggle.train import train
    arm, seed = spec.split(':'); seed = int(seed)
    info = json.loads((work / 'setup.json').read_text())
    quality_t4.t4_emulation(); torch.set_num_threads(2)
    run_dir = work / 'onpolicy_runs' / f'{arm}-s{seed}'
    import shutil; shutil.rmtree(run_dir, ignore_errors=True)
    cfg = arm_config(a, S, work, info, arm, seed, run_dir)
    t0 = time.monotonic()
    final = train(cfg)
    wall = time.monotonic() - t0
    last = [r for r in quality.read_metrics(run_dir) if 'tokens' in r][-1]
    m = sample_metrics(cfg, run_dir, a.eval_prompts, seed)
    return {'arm': arm, 'seed': seed, 'heldout_bpb': final.get('student_bpb'), **m, 'wall_s': round(wall, 1),
            'steps': last['step'], 'tokens': int(last['tokens']), 'onpolicy_steps': last.get('onpolicy_steps', 0),
            'generate_s': round(last.get('generate_s', 0.0), 1), 'teacher_bpb': final.get('teacher_bpb'),
            'lmbda': cfg.lmbda, 'divergence': cfg.divergence, 'max_new_tokens': cfg.max_new_tokens, 'onpolicy_start': cfg.onpolicy_start,
            'onpolicy_divergence': cfg.onpolicy_divergence}


def summarize(rows: list) -> dict:
    by = {}
    for r in rows:
        if r.get('heldout_bpb') is not None: by.setdefault(r['arm'], []).append(r)
    mean = lambda arm, k: statistics.mean(r[k] for r in by[arm]) if arm in by else None
    s = {arm: {k: mean(arm, k) for k in ('heldout_bpb', 'teacher_bpb_of_student_samples', 'rougeL', 'wall_s', 'generate_s')} | {'seeds': len(by[arm])}
         for arm in by}
    on = [x for x in ARMS if x.startswith('on_policy') and x in s]
    ref = lambda x: 'off_policy_x2' if '_x2' in x else 'off_policy'   # each on-policy arm against off-policy at its own steps
    on = [x for x in on if ref(x) in s]
    if on:
        drop = lambda x: 1 - s[x]['teacher_bpb_of_student_samples'] / s[ref(x)]['teacher_bpb_of_student_samples']
        best = max(on, key=drop)
        worse = s[best]['heldout_bpb'] / s[ref(best)]['heldout_bpb'] - 1
        s['target'] = {'best_on_policy': best, 'against': ref(best), 'teacher_bpb_of_samples_lower_by': drop(best),
                       'heldout_bpb_worse_by': worse, 'met': drop(best) >= 0.10 and worse <= 0.02}
    return s


def render(path: Path) -> Path:
    r = json.loads(path.read_text()); s = r['summary']
    f = lambda v, d=4: '—' if v is None else f'{v:.{d}f}'
    lines = [f"# On-policy vs off-policy distillation on Dolly (issue 20), {r['date']}, {r['device']}", '',
             f"Command: `{r['command']}`. Precision fp16 (T4 emulation: 15 GiB cap, SDPA memory-efficient/math), {r['steps']} steps x "
             f"{r['batch']} x {r['seq_len']} (off_policy_x15: 1.5x the steps), seeds {r['seeds']}. Teacher {r['teacher_params'] / 1e6:.0f}M "
             f"(Qwen2 arch, real tokenizer), student {r['student_params'] / 1e6:.1f}M (Llama arch, real SmolLM2 tokenizer). Held-out = Dolly test; "
             f"sample metrics on its first {r['eval_prompts']} prompts, {NEW_TOKENS} new tokens. Jobs share the GPUs: wall times are under that contention.", '',
             '| arm | seeds | held-out bpb | teacher bpb of student samples | ROUGE-L (greedy) | wall s | sampling s |', '|---|---|---|---|---|---|---|']
    for arm in ARMS:
        if arm in s:
            x = s[arm]
            lines.append(f"| {arm} | {x['seeds']} | {f(x['heldout_bpb'])} | {f(x['teacher_bpb_of_student_samples'])} | {f(x['rougeL'])} | "
                         f"{f(x['wall_s'], 0)} | {f(x['generate_s'], 0)} |")
    lines += ['', '| arm | seed | held-out bpb | teacher bpb of samples | ROUGE-L | wall s | steps | on-policy steps |', '|---|---|---|---|---|---|---|---|']
    for x in sorted(r['arms'], key=lambda x: (ARMS.index(x['arm']) if x['arm'] in ARMS else 9, x['seed'])):
        if x.get('heldout_bpb') is None: lines.append(f"| {x['arm']} | {x['seed']} | failed: {x.get('error', '?')} |||||"); continue
        lines.append(f"| {x['arm']} | {x['seed']} | {f(x['heldout_bpb'])} | {f(x['teacher_bpb_of_student_samples'])} | {f(x['rougeL'])} | "
                     f"{x['wall_s']:.0f} | {x['steps']} | {x['onpolicy_steps']} |")
    t = s.get('target')
    if t:
        lines += ['', f"**Target** (on-policy lowers the teacher's bpb of student samples by >= 10% vs off-policy at the same steps, held-out bpb no more "
                  f"than 2% worse): best on-policy arm `{t['best_on_policy']}` (vs `{t.get('against', 'off_policy')}`): samples' teacher bpb {-t['teacher_bpb_of_samples_lower_by']:+.1%}, held-out bpb "
                  f"{t['heldout_bpb_worse_by']:+.1%}: **{'met' if t['met'] else 'not met'}**."]
    md = path.with_suffix('.md'); md.write_text('\n'.join(lines) + '\n'); return md


def main(argv=None):
    import quality_t4
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--smoke', action='store_true'); ap.add_argument('--job'); ap.add_argument('--render')
    ap.add_argument('--work', default='/tmp/kd_onpolicy'); ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    ap.add_argument('--data-dir', default=str(ROOT.parent / 'shared' / 'data')); ap.add_argument('--date', default=time.strftime('%Y-%m-%d'))
    ap.add_argument('--seeds', default='0,1,2'); ap.add_argument('--arms', default=','.join(ARMS))
    ap.add_argument('--steps', type=int); ap.add_argument('--lr', type=float, default=2e-3); ap.add_argument('--precision', default='fp16')
    ap.add_argument('--eval-prompts', type=int, default=128); ap.add_argument('--teacher-seconds', type=float, default=None)
    ap.add_argument('--deadline', type=float, default=560)
    a = ap.parse_args(argv)
    if a.render: return print(render(Path(a.render)))
    S = quality_t4.sizes(a.smoke)
    if a.teacher_seconds: S['teacher_seconds'] = a.teacher_seconds
    a.seeds = [int(x) for x in a.seeds.split(',')]
    a.steps = a.steps or S['steps']; a.eval_every = 10**6; a.naive_micro_batch = None
    if a.smoke and not quality_t4._cuda(): a.precision = 'fp32'
    work = Path(a.work)
    if a.job:
        row = run_job(a, S, work, a.job)
        p = work / 'onpolicy_results' / f"{a.job.replace(':', '-')}.json"; p.parent.mkdir(parents=True, exist_ok=True)
        return p.write_text(json.dumps(row, indent=1, default=float))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    info = quality_t4.setup(a, S, work)
    print(f"setup {time.monotonic() - t0:.0f}s: teacher {info['teacher']['params'] / 1e6:.0f}M, val bpb {info['teacher']['best_val_bpb']:.4f}", flush=True)
    import torch
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    jobs = [f'{arm}:{seed}' for seed in a.seeds for arm in a.arms.split(',')]
    procs = {}
    for k, j in enumerate(jobs):   # all at once: small models leave a big GPU host-bound
        env = {**os.environ, **({'CUDA_VISIBLE_DEVICES': str(k % n_gpu)} if n_gpu else {})}
        log = open(work / f"job-{j.replace(':', '-')}.log", 'w')
        procs[j] = subprocess.Popen([sys.executable, __file__, '--job', j, '--work', str(work)] + [x for x in (argv or sys.argv[1:])],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    for j, p in procs.items():
        try: p.wait(timeout=max(1, a.deadline - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired: p.kill()
        f = work / 'onpolicy_results' / f"{j.replace(':', '-')}.json"
        if f.is_file(): rows.append(json.loads(f.read_text()))
        else:
            tail = (work / f"job-{j.replace(':', '-')}.log").read_text(errors='replace').strip().splitlines()[-1:] or ['?']
            rows.append({'arm': j.split(':')[0], 'seed': int(j.split(':')[1]), 'heldout_bpb': None, 'error': f'rc {p.returncode}: {tail[0][:300]}'})
        print(j, json.dumps(rows[-1])[:300], flush=True)
    res = {'date': a.date, 'device': f"{torch.cuda.get_device_name(0)} x{n_gpu}" if n_gpu else 'cpu', 'precision': a.precision,
           'command': 'python benchmarks/onpolicy.py ' + ' '.join(argv or sys.argv[1:]), 'steps': a.steps, 'batch': S['batch'],
           'seq_len': S['seq_len'], 'seeds': a.seeds, 'eval_prompts': a.eval_prompts, 'teacher_params': info['teacher']['params'],
           'student_params': info['student']['params'], 'teacher_val_bpb': info['teacher']['best_val_bpb'], 'arms': rows, 'summary': summarize(rows)}
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    p = out / f'onpolicy-{a.date}.json'; p.write_text(json.dumps(res, indent=1, default=float)); print(render(p))


if __name__ == '__main__':
    main()
