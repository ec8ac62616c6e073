"""Issue 16: distillation quality on the T4 path (fp16), 3 seeds, against the student alone and TRL's GOLD trainer.

    PYTHONPATH=. python benchmarks/quality_t4.py --smoke                      # CPU, tiny models, every arm end to end
    PYTHONPATH=$PWD:/tmp/site python benchmarks/quality_t4.py --data-dir .qdata --out $OUT --deadline 560   # GPU(s)

What runs (all numbers come from kd_kaggle's own code paths except GOLD, which is TRL's trainer):
- Teacher: Qwen2 architecture, real Qwen2 tokenizer, pretrained here (bf16, a plain loop: setup, not the product) on the
  five Austen training novels + the WEB Bible (its last 5% of paragraphs kept out) + Dolly's dev split (response-only
  labels), early-stopped on a 3% validation split; saved once and reused by every job.
- Student: Llama architecture, real SmolLM2 tokenizer; one init per seed, shared by every arm of that seed.
- Jobs = (data, arm, seed), each in its own process on one GPU set up as a Kaggle T4 (fp16 autocast + GradScaler, 15 GiB
  cap, SDPA memory-efficient/math only), several per GPU at once (small models leave an H200 host-bound): wall times are
  under that contention and comparable between arms only as such.
  data 'text':  train on Austen train novels + Bible (packed to seq_len), held-out = *Persuasion* (never trained on).
  data 'dolly': train on Dolly dev (1,000 rows; the train split is not available), held-out = Dolly test (500 rows),
                response-only loss, metric = response bits per byte.
  arms: ce_only   KDConfig(curriculum={'ce': 1, 'kd': 0})                         kd_kaggle.train.train
        default   KDConfig() as shipped (CE + aligned projected forward KL)       kd_kaggle.train.train
        naive_kd  the seed's id-indexed KD, T=4 x T^2, + CE                       train(), KDConfig(kd_method='seed_naive')
        gold_uld, gold_hybrid  TRL GOLD off-policy, ULD / hybrid                  benchmarks/gold_peer.train_gold
        ablations of default: kd_w3 / kd_w5 (KD weight 3 / 5), ce_half (CE weight 0.5), t2 (temperature 2),
                              boundary (kd_positions='boundary')
  data 'text_short': text at half the steps and half the batch (where GOLD's text runs fit one device call).
  Same steps x batch x seq_len for every arm of a data set (equal student tokens up to GOLD's own packing and EOS).
  Every student is scored by kd_kaggle.evaluate.evaluate on the same held-out batches (bpb, agreement, KL, retention).
- Results: --out/quality-<date>.json (schema: precision, arms: [{arm, data, seed, heldout_bpb, retention, agreement,
  tokens, wall_s, ...}]), .md (targets met / not met) and .png, rewritten after every finished job; a job's own json
  stays in <work>/results so a second call on a still-warm machine skips what is done.
"""
from __future__ import annotations
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / 'benchmarks'):
    if str(p) not in sys.path: sys.path.insert(0, str(p))
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
T0 = time.monotonic()
MAIN = ('ce_only', 'default', 'naive_kd', 'gold_uld', 'gold_hybrid')
ABLATIONS = ('kd_w3', 'kd_w5', 'ce_half', 't2', 'boundary')
# A data name may stand for a smaller run on another's files: text_short = text at half the steps and half the batch
# (a quarter of the student tokens), where TRL GOLD's text runs fit one device call.
SCALES = {'text_short': ('text', 0.5, 0.5)}


def base_data(data: str) -> str: return SCALES.get(data, (data,))[0]


def scaled(a, S, data: str) -> tuple:
    "(steps, batch) of a job on `data`."
    _, fs, fb = SCALES.get(data, (data, 1.0, 1.0))
    return max(1, int(a.steps * fs)), max(1, int(S['batch'] * fb))
DOLLY_ARMS = ('ce_only', 'default', 'naive_kd', 'gold_uld', 'gold_hybrid')


def say(*a): print(f"[{time.monotonic() - T0:6.1f}s]", *a, flush=True)


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(teacher=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128),
                    student=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),
                    seq_len=128, batch=2, steps=3, eval_every=2, max_train_examples=24, max_eval_examples=4, bible_paras=200, dolly_rows=24,
                    teacher_batch=8, teacher_lr=3e-3, teacher_max_epochs=1, teacher_seconds=30, teacher_eval_every=3)
    return dict(teacher=dict(hidden_size=640, num_hidden_layers=10, num_attention_heads=10, num_key_value_heads=2, intermediate_size=1792),
                student=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
                seq_len=512, batch=16, steps=200, eval_every=50, max_train_examples=None, max_eval_examples=256, bible_paras=None,
                dolly_rows=None, teacher_batch=64, teacher_lr=1e-3, teacher_max_epochs=12, teacher_seconds=230, teacher_eval_every=40)


# ---------------------------------------------------------------------------------------------------------------- data
def prepare_data(work: Path, data_dir: Path, S: dict) -> dict:
    "Training/held-out files in work/data; returns their paths and what was kept out."
    from kd_kaggle.demo import demo_corpus
    d = work / 'data'; d.mkdir(parents=True, exist_ok=True)
    bible = (data_dir / 'web_bible.txt').read_text(encoding='utf-8').rstrip('\n').split('\n\n')
    if S['bible_paras']: bible = bible[:S['bible_paras']]
    cut = int(len(bible) * 0.95)
    files = {'text_train': d / 'austen_bible_train.txt', 'text_heldout': d / 'persuasion_heldout.txt',
             'dolly_train': d / 'dolly_dev.jsonl', 'dolly_heldout': d / 'dolly_test.jsonl'}
    files['text_train'].write_text('\n\n'.join(demo_corpus('train') + bible[:cut]) + '\n', encoding='utf-8')
    files['text_heldout'].write_text('\n\n'.join(demo_corpus('heldout')) + '\n', encoding='utf-8')
    for split, name in (('dev', 'dolly_train'), ('test', 'dolly_heldout')):
        rows = (data_dir / 'dolly' / f'{split}.jsonl').read_text(encoding='utf-8').splitlines()
        if S['dolly_rows']: rows = rows[:S['dolly_rows']]
        files[name].write_text('\n'.join(rows) + '\n', encoding='utf-8')
    return {k: str(v) for k, v in files.items()} | {'bible_paragraphs_kept_out': len(bible) - cut}


def arm_config(a, S, work: Path, files: dict, data: str, arm: str, seed: int, run_dir: Path):
    "The KDConfig of one job (GOLD jobs use the ce_only one for data and evaluation)."
    from kd_kaggle.config import KDConfig
    cur = {'ce': 1.0, 'kd': 1.0}
    over = {'ce_only': dict(curriculum={'ce': 1.0, 'kd': 0.0}), 'default': {}, 'kd_w3': dict(curriculum={'ce': 1.0, 'kd': 3.0}), 'kd_w5': dict(curriculum={'ce': 1.0, 'kd': 5.0}),
            'ce_half': dict(curriculum={'ce': 0.5, 'kd': 1.0}), 't2': dict(curriculum=cur, temperature=2.0),
            'boundary': dict(curriculum=cur, kd_positions='boundary'),
            'naive_kd': dict(curriculum=cur, kd_method='seed_naive', temperature=4.0)}
    o = dict(over.get(arm, over['ce_only']))
    steps, batch = scaled(a, S, data)
    o['batch_size'], o['grad_accum'] = batch, 1
    if arm == 'naive_kd' and getattr(a, 'naive_micro_batch', None):   # the seed's full logits need a smaller micro-batch
        o['batch_size'], o['grad_accum'] = a.naive_micro_batch, batch // a.naive_micro_batch
    base = base_data(data)
    return KDConfig(teacher=str(work / 'teacher'), student=str(work / f'student_s{seed}'), data=files[f'{base}_train'],
                    eval_data=files[f'{base}_heldout'], seq_len=S['seq_len'], max_steps=steps, lr=a.lr,
                    max_train_examples=S['max_train_examples'], max_eval_examples=S['max_eval_examples'], eval_every=a.eval_every,
                    save_every=100_000, log_every=10, print_every=max(1, a.steps // 4), precision=a.precision, seed=seed,
                    compile='off', cache_dir=str(work / 'data_cache'), output_dir=str(run_dir), time_budget='60m', **o)


# ---------------------------------------------------------------------------------------------------------------- setup
def t4_emulation():
    "What a Kaggle T4 has: 15 GiB, no flash/cuDNN attention (fp16 autocast + GradScaler come from precision='fp16')."
    import torch
    if not torch.cuda.is_available(): return None
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from kd_kaggle.env import use_repeat_kv_for_sdpa
    torch.cuda.set_per_process_memory_fraction(min(1.0, 15 * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    use_repeat_kv_for_sdpa()
    ctx = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]); ctx.__enter__()
    return ctx


def setup(a, S, work: Path) -> dict:
    "Data, teacher (pretrained once) and one student init per seed; cached in `work` (a warm machine reuses them)."
    import torch
    from types import SimpleNamespace
    from kd_kaggle.align import load_tokenizer
    from kd_kaggle.data import build_datasets
    import quality
    info_path = work / 'setup.json'
    if info_path.is_file() and (work / 'teacher' / 'config.json').is_file(): return json.loads(info_path.read_text())
    files = prepare_data(work, Path(a.data_dir), S)
    t_tok = load_tokenizer(ROOT / 'tests/fixtures/tokenizers/qwen2'); s_tok = load_tokenizer(ROOT / 'tests/fixtures/tokenizers/smollm2')
    cols = {k: [] for k in ('teacher_input_ids', 'teacher_labels', 'teacher_label_bytes')}
    counts = {}
    for data in ('text', 'dolly'):
        cfg = arm_config(a, S, work, files, data, 'ce_only', 0, work / 'runs' / 'probe')
        tr, ev = build_datasets(cfg, t_tok, s_tok)
        counts[data] = {'train_examples': len(tr), 'heldout_examples': len(ev),
                        'train_student_tokens': sum(map(len, tr['student_input_ids'])), 'heldout_bytes': None}
        for k in cols: cols[k] += tr[k]
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    qa = SimpleNamespace(seed=1234, teacher_patience=3)
    quality.TEACHER_ROWS = 151_936
    teacher = quality.pretrain_teacher(qa, S, cols, t_tok, device, work / 'teacher')
    students = {}
    for seed in a.seeds:
        students[seed] = quality.make_student(SimpleNamespace(seed=seed), S, s_tok, work / f'student_s{seed}')
    info = {'files': files, 'data': counts, 'teacher': teacher, 'student': students[a.seeds[0]], 'seeds': a.seeds}
    info_path.write_text(json.dumps(info, indent=1))
    if device.type == 'cuda': torch.cuda.empty_cache()
    return info


# ---------------------------------------------------------------------------------------------------------------- one job
def _row(data, arm, seed, final, tokens, wall, extra=None) -> dict:
    bpb = final.get('student_bpb')
    return {'arm': arm, 'data': data, 'seed': seed, 'heldout_bpb': bpb, 'teacher_bpb': final.get('teacher_bpb'),
            'retention': final.get('retention'), 'agreement': final.get('agreement'), 'kl': final.get('kl'),
            'tokens': tokens, 'wall_s': round(wall, 1), **(extra or {})}


def run_job(a, S, work: Path, spec: str) -> dict:
    import torch
    data, arm, seed = spec.split(':'); seed = int(seed)
    info = json.loads((work / 'setup.json').read_text())
    t4_emulation()
    torch.set_num_threads(max(1, a.threads))
    run_dir = work / 'runs' / f'{data}-{arm}-s{seed}'
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = arm_config(a, S, work, info['files'], data, arm, seed, run_dir)
    t0 = time.monotonic()
    if arm.startswith('gold_'): return gold_job(a, S, work, info, cfg, data, arm, seed, t0)
    from kd_kaggle.train import train
    import quality
    final = train(cfg)
    recs = quality.read_metrics(run_dir)
    last = [r for r in recs if 'tokens' in r][-1]
    return _row(data, arm, seed, final, int(last['tokens']), time.monotonic() - t0,
                {'steps': last['step'], 'curve': quality.curve_from_records(recs, final.get('student_bpb_before')),
                 'train_tail': {k: last.get(k) for k in ('ce', 'kd_raw', 'loss', 'tok_s', 'peak_mem_gib', 'scaler_skipped', 'grad_scale')},
                 'curriculum': cfg.curriculum, 'temperature': cfg.temperature})


def gold_job(a, S, work, info, cfg, data, arm, seed, t0) -> dict:
    "TRL GOLD on the same pair/data/steps/lr, then kd_kaggle's evaluation of the student it saved."
    import json as _j
    from gold_peer import train_gold
    from kd_kaggle.train import setup_run, _eval_batches
    from kd_kaggle.evaluate import evaluate_saved
    mode = arm.split('_', 1)[1]
    steps, batch = scaled(a, S, data)
    if base_data(data) == 'text':
        from kd_kaggle.data import read_paragraphs
        texts, rows = read_paragraphs(info['files']['text_train']), None
    else:
        texts = None
        from transformers import AutoTokenizer
        tt, st = (AutoTokenizer.from_pretrained(d) for d in (work / 'teacher', cfg.student))
        fits = lambda t: max(len(tt(t).input_ids), len(st(t).input_ids)) < S['seq_len']   # GOLD refuses rows it would truncate
        rows = [{'prompt': r['prompt'], 'completion': r['output']} for r in map(_j.loads, Path(info['files']['dolly_train']).read_text().splitlines())
                if r.get('output', '').strip() and fits(r['prompt'] + r['output'])]
    precision = a.precision if a.precision != 'auto' else ('bf16' if _cuda() else 'fp32')   # GOLD takes an explicit one
    import torch
    tried = []
    for accum in ((2, 4, 8, 16) if batch > 1 else (1,)):   # GOLD holds full fp32 logits/probabilities of both vocabularies: a user lowers the micro-batch
        if batch % accum: continue
        try:
            g = train_gold(work / 'teacher', cfg.student, texts, output_dir=cfg.output_dir, mode=mode, batch_size=batch // accum,
                           grad_accum=accum, seq_len=S['seq_len'], steps=steps, lr=a.lr, seed=seed, precision=precision,
                           max_examples=0, rows=rows)
            break
        except torch.OutOfMemoryError as e:
            tried.append(f"{batch // accum}x{accum}: OutOfMemoryError: {str(e).splitlines()[0][:200]}")
            say(f"GOLD {mode}: out of memory at micro-batch {batch // accum}, trying a smaller one")
            import gc; gc.collect(); torch.cuda.empty_cache()
    else: raise RuntimeError(f"GOLD ran out of memory at every micro-batch: {tried}")
    train_s = g['wall_s']
    r = setup_run(cfg)   # the ce_only arm's run: its held-out batches, vocab map, teacher and precision policy
    final = evaluate_saved(g['student_dir'], r.teacher, _eval_batches(r), r.vocab_map.to(r.acc.device), r.policy,
                           kd_positions=cfg.kd_positions, teacher_vocab_limit=len(r.t_tok))
    return _row(data, arm, seed, final, g['student_tokens'], time.monotonic() - t0,
                {'steps': g['steps'], 'train_s': round(train_s, 1), 'gold_losses': g['losses'][-5:], 'micro_batch': batch // accum,
                 'grad_accum': accum, 'oom_tries': tried, 'gold_rows': len(rows) if rows is not None else None})


def _cuda():
    import torch
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------- driver
def job_list(a) -> list:
    jobs = []
    for group in a.jobs.split(';'):
        data, arms = group.split(':')
        for seed in a.seeds:
            for arm in arms.split(','): jobs.append(f'{data}:{arm}:{seed}')
    return jobs


def drive(a, S, work: Path, out: Path, info: dict):
    "Run every job not yet done in its own process, a.workers at a time over the GPUs; stop starting jobs near the deadline."
    import torch
    res_dir = work / 'results'; res_dir.mkdir(exist_ok=True); logs = work / 'logs'; logs.mkdir(exist_ok=True)
    todo = [j for j in job_list(a) if not (res_dir / f"{j.replace(':', '-')}.json").is_file()]
    n_gpu = torch.cuda.device_count()
    parent = os.environ.get('CUDA_VISIBLE_DEVICES')   # jobs go round the GPUs this process may use, by their names
    visible = [d.strip() for d in parent.split(',')][:n_gpu] if parent else [str(i) for i in range(n_gpu)]
    est = {'gold': a.est_gold, 'ours': a.est_ours}
    durations = {'gold': [], 'ours': []}
    running, k, deadline = {}, 0, T0 + a.deadline
    kind = lambda j: 'gold' if ':gold_' in j else 'ours'
    while todo or running:
        while todo and len(running) < a.workers:
            j = todo[0]; need = max(durations[kind(j)] or [est[kind(j)]]) * 1.1
            if time.monotonic() + need > deadline:
                fit = next((x for x in todo if time.monotonic() + max(durations[kind(x)] or [est[kind(x)]]) * 1.1 <= deadline), None)
                if fit is None: break
                j = fit
            todo.remove(j)
            env = {**os.environ, **({'CUDA_VISIBLE_DEVICES': visible[k % n_gpu]} if n_gpu else {})}; k += 1
            cmd = [sys.executable, __file__, '--job', j, '--work', str(work), *a.passthrough]
            with open(logs / f"{j.replace(':', '-')}.log", 'w') as log:   # the child holds its own copy of the handle
                running[j] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.monotonic())
            say(f"start {j} on gpu {env.get('CUDA_VISIBLE_DEVICES', 'cpu')} ({len(todo)} queued)")
        if not running: break
        time.sleep(1)
        for j, (p, t) in list(running.items()):
            if p.poll() is None:
                if time.monotonic() > deadline - 5: p.kill(); say(f"killed {j} at the deadline")
                continue
            del running[j]
            ok = (res_dir / f"{j.replace(':', '-')}.json").is_file()
            if ok: durations[kind(j)].append(time.monotonic() - t)
            else:   # a row that says why (the next call retries the job: only <job>.json counts as done)
                data, arm, seed = j.split(':'); tail = (logs / f"{j.replace(':', '-')}.log").read_text(errors='replace')[-1500:]
                last = [x for x in tail.splitlines() if x.strip()][-1:] or ['(no output)']
                (res_dir / f"{j.replace(':', '-')}.failed.json").write_text(json.dumps(
                    {'arm': arm, 'data': data, 'seed': int(seed), 'heldout_bpb': None, 'error': f'rc {p.returncode}: {last[0][:400]}'}))
            say(f"{'done' if ok else 'FAILED (rc %s)' % p.returncode} {j} in {time.monotonic() - t:.0f}s")
            write_results(a, work, out, info)
        if not todo and not running: break
    write_results(a, work, out, info, skipped=todo)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--smoke', action='store_true'); ap.add_argument('--job'); ap.add_argument('--render')
    ap.add_argument('--work', default='/tmp/kd_quality_t4'); ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    ap.add_argument('--data-dir', default=str(ROOT.parent / 'shared' / 'data'))
    ap.add_argument('--date', default=time.strftime('%Y-%m-%d')); ap.add_argument('--deadline', type=float, default=560)
    ap.add_argument('--jobs', default=None, help="'data:arm,arm;data:arm' (default: text main arms + ablations, dolly arms)")
    ap.add_argument('--seeds', default='0,1,2'); ap.add_argument('--workers', type=int, default=None)
    ap.add_argument('--threads', type=int, default=2); ap.add_argument('--precision', default='fp16')
    ap.add_argument('--steps', type=int); ap.add_argument('--lr', type=float, default=2e-3); ap.add_argument('--eval-every', type=int)
    ap.add_argument('--naive-micro-batch', type=int, default=None, help='naive_kd: sequences per forward (the seed KD OOMs at 16x512 in 15 GiB)')
    ap.add_argument('--est-gold', type=float, default=420); ap.add_argument('--est-ours', type=float, default=240)
    a = ap.parse_args(argv)
    S = sizes(a.smoke)
    a.seeds = [int(s) for s in a.seeds.split(',')]
    a.steps = a.steps or S['steps']; a.eval_every = a.eval_every or S['eval_every']
    if a.smoke:
        a.precision = 'fp32' if not _cuda() else a.precision
        if not a.work.endswith('_smoke'): a.work += '_smoke'
    a.batch, a.seq_len = S['batch'], S['seq_len']
    a.scale_info = {d: scaled(a, S, d) for d in ('text', 'dolly', *SCALES)}
    a.command = ' '.join(['python benchmarks/quality_t4.py'] + (argv if argv is not None else sys.argv[1:]))
    a.jobs = a.jobs or f"text:{','.join(MAIN + ABLATIONS)};dolly:{','.join(DOLLY_ARMS)}"
    a.passthrough = [x for x in (argv if argv is not None else sys.argv[1:])]
    work = Path(a.work)
    if a.render: return render(Path(a.render))
    if a.job:
        row = run_job(a, S, work, a.job)
        p = work / 'results' / f"{a.job.replace(':', '-')}.json"; p.parent.mkdir(exist_ok=True)
        tmp = p.with_suffix('.tmp'); tmp.write_text(json.dumps(row, indent=1, default=float)); os.replace(tmp, p)
        return say(f"{a.job}: held-out bpb {row['heldout_bpb']:.4f}")
    work.mkdir(parents=True, exist_ok=True)
    info = setup(a, S, work)
    say(f"setup done: teacher {info['teacher']['params'] / 1e6:.0f}M, best val bpb {info['teacher']['best_val_bpb']:.4f}")
    a.workers = a.workers or (2 if a.smoke else 8 * max(1, _n_gpu()))
    drive(a, S, work, Path(a.out), info)


def _n_gpu():
    import torch
    return torch.cuda.device_count()


from quality_t4_report import write_results, render   # noqa: E402  (results, targets and the markdown live beside)

if __name__ == '__main__':
    main()
