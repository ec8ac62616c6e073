"""Results of benchmarks/quality_t4.py: the job rows gathered into one JSON, the issue's targets, a markdown page and a plot."""
from __future__ import annotations
import json, math, os, statistics
from pathlib import Path

RECIPE = {'ce_only': 'CE only (the student alone)', 'default': 'KDConfig() as shipped: CE + aligned projected forward KL, T=1',
          'naive_kd': "the seed's KD: id i vs id i, position i vs i, T=4 ×T², + CE", 'gold_uld': 'TRL GOLD, ULD (sorted L1), off-policy',
          'gold_hybrid': 'TRL GOLD, hybrid (matched tokens JSD/KL + ULD), off-policy', 'gold_best': 'better of gold_uld / gold_hybrid per seed',
          'kd_w3': 'default with KD weight 3', 'kd_w5': 'default with KD weight 5', 'ce_half': 'default with CE weight 0.5', 't2': 'default at temperature 2 (×T²)',
          'boundary': "default with kd_positions='boundary' (every shared byte prefix, not only one-to-one tokens)"}
ORDER = ('ce_only', 'default', 'naive_kd', 'gold_uld', 'gold_hybrid', 'gold_best', 'kd_w3', 'kd_w5', 'ce_half', 't2', 'boundary')


def load_rows(work: Path) -> list:
    rows = []
    for p in sorted((work / 'results').glob('*.json')):
        if p.name.endswith('.failed.json') and p.with_name(p.name.replace('.failed', '')).is_file(): continue   # retried, and done
        try: rows.append(json.loads(p.read_text()))
        except (OSError, ValueError): pass
    return rows


def with_gold_best(rows: list) -> list:
    "Adds a gold_best row per (data, seed) that has both GOLD settings: the one with the lower held-out bpb."
    out = [r for r in rows if r['arm'] != 'gold_best']
    for data in sorted({r['data'] for r in rows}):
        for seed in sorted({r['seed'] for r in rows}):
            g = [r for r in out if r['data'] == data and r['seed'] == seed and r['arm'] in ('gold_uld', 'gold_hybrid') and _ok(r['heldout_bpb'])]
            if len(g) == 2:
                b = min(g, key=lambda r: r['heldout_bpb'])
                out.append({**{k: v for k, v in b.items() if k not in ('curve',)}, 'arm': 'gold_best', 'from': b['arm']})
    return out


def _ok(x): return isinstance(x, (int, float)) and math.isfinite(x)


def summary(rows: list) -> dict:
    "{data: {arm: {n, mean, sd, seeds: {seed: bpb}, tokens, wall_s}}}"
    out = {}
    for r in rows:
        if not _ok(r.get('heldout_bpb')): continue
        s = out.setdefault(r['data'], {}).setdefault(r['arm'], {'seeds': {}, 'tokens': [], 'wall_s': [], 'agreement': [], 'retention': []})
        s['seeds'][r['seed']] = r['heldout_bpb']; s['tokens'].append(r['tokens']); s['wall_s'].append(r['wall_s'])
        s['agreement'].append(r.get('agreement')); s['retention'].append(r.get('retention'))
    for d in out.values():
        for s in d.values():
            v = list(s['seeds'].values())
            s.update(n=len(v), mean=statistics.fmean(v), sd=statistics.stdev(v) if len(v) > 1 else None)
            for k in ('tokens', 'wall_s', 'agreement', 'retention'):
                xs = [x for x in s[k] if _ok(x)]; s[k] = statistics.fmean(xs) if xs else None
    return out


def targets(summ: dict, data: str = 'text') -> dict:
    d = summ.get(data, {})
    ce, de, nv, gb = (d.get(k) for k in ('ce_only', 'default', 'naive_kd', 'gold_best'))
    t = {}
    if ce and de:
        t['default_over_ce_only'] = de['mean'] / ce['mean']
        t['default_le_0.92_ce_only'] = t['default_over_ce_only'] <= 0.92
        common = set(ce['seeds']) & set(de['seeds'])
        t['every_default_seed_beats_every_ce_only_seed'] = max(de['seeds'].values()) < min(ce['seeds'].values())
        t['paired_gain_per_seed'] = {s: (ce['seeds'][s] - de['seeds'][s]) / ce['seeds'][s] for s in sorted(common)}
    if de and gb:
        t['default_minus_gold_best_bpb'] = de['mean'] - gb['mean']
        t['default_beats_gold_best'] = de['mean'] < gb['mean']
        t['default_vs_gold_best_rel'] = (gb['mean'] - de['mean']) / gb['mean']
        t['wall_s'] = {'default': de['wall_s'], 'gold_best': gb['wall_s']}
        t['tokens'] = {'default': de['tokens'], 'gold_best': gb['tokens']}
    if ce and nv:
        t['naive_over_ce_only'] = nv['mean'] / ce['mean']
        t['naive_no_better_than_ce_only'] = nv['mean'] >= ce['mean']
    return t


def write_results(a, work: Path, out: Path, info: dict, skipped=None):
    import torch, transformers
    rows = with_gold_best(load_rows(work))
    summ = summary(rows)
    doc = {'date': a.date, 'precision': a.precision, 'smoke': a.smoke,
           'device': (torch.cuda.get_device_name(0) + ' (T4 emulation: fp16 autocast + GradScaler, 15 GiB cap, SDPA memory-efficient/math)')
                     if torch.cuda.is_available() else 'CPU', 'gpus': torch.cuda.device_count(), 'torch': torch.__version__,
           'transformers': transformers.__version__, 'workers': a.workers, 'threads_per_job': a.threads,
           'settings': {'steps': a.steps, 'batch': a.batch, 'seq_len': a.seq_len, 'lr': a.lr, 'eval_every': a.eval_every, 'seeds': a.seeds,
                        'steps_batch_per_data': getattr(a, 'scale_info', {})},
           'setup': info, 'arms': rows, 'summary': summ, 'targets': {d: targets(summ, d) for d in summ},
           'skipped': list(skipped or []), 'command': a.command}
    old = out / f'quality-{a.date}{"-smoke" if a.smoke else ""}.json'
    if old.is_file():   # findings written by hand after a run survive a re-render
        try: doc['findings'] = json.loads(old.read_text()).get('findings', [])
        except ValueError: pass
    out.mkdir(parents=True, exist_ok=True)
    tmp = old.with_suffix('.tmp'); tmp.write_text(json.dumps(doc, indent=1, default=float)); os.replace(tmp, old)
    render(old)


def render(path: Path):
    doc = json.loads(path.read_text())
    try: plot(doc, path.with_suffix('.png'))
    except Exception as e: print(f'plot failed: {type(e).__name__}: {e}')
    path.with_suffix('.md').write_text(markdown(doc, path.stem))


def plot(doc: dict, path: Path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    summ = doc['summary']
    fig, axes = plt.subplots(1, max(1, len(summ)), figsize=(6 * max(1, len(summ)), 4), squeeze=False)
    for ax, (data, d) in zip(axes[0], summ.items()):
        arms = [x for x in ORDER if x in d]
        for i, arm in enumerate(arms):
            v = list(d[arm]['seeds'].values())
            ax.bar(i, d[arm]['mean'], color='tab:red' if arm == 'default' else 'tab:gray' if arm != 'ce_only' else 'k', alpha=0.6)
            ax.plot([i] * len(v), v, 'o', color='k', ms=4)
        ax.set_xticks(range(len(arms))); ax.set_xticklabels(arms, rotation=30, fontsize=8)
        lo = min(min(d[x]['seeds'].values()) for x in arms); hi = max(max(d[x]['seeds'].values()) for x in arms)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        tb = [r.get('teacher_bpb') for r in doc['arms'] if r['data'] == data and _ok(r.get('teacher_bpb'))]
        ax.set_title(f"{data}: held-out bpb, mean and seeds" + (f" (teacher {tb[0]:.3f})" if tb else ''), fontsize=10)
        ax.grid(axis='y', alpha=0.3)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def _f(x, p=4): return '—' if not _ok(x) else f'{x:.{p}f}'


def markdown(doc: dict, stem: str) -> str:
    L = [f"# Quality on the T4 path: kd_kaggle vs the student alone vs TRL GOLD ({doc['date']})", '',
         f"Device: {doc['device']}, {doc['gpus']} GPU(s), {doc['workers']} jobs at a time (≤{doc['threads_per_job']} CPU threads each) · "
         f"precision **{doc['precision']}** · torch {doc['torch']} · transformers {doc['transformers']}"
         + (' · **SMOKE RUN (tiny models): numbers mean nothing**' if doc.get('smoke') else ''), '']
    su = doc['setup']; te = su.get('teacher', {}); st = su.get('student', {}); se = doc['settings']
    L += ['## Setup', '',
          f"- Teacher: Qwen2 architecture {te.get('config')}, real Qwen2 tokenizer, {te.get('params', 0) / 1e6:.1f}M params "
          f"({te.get('non_embedding_params', 0) / 1e6:.1f}M non-embedding); pretrained here on the Austen training novels + WEB Bible "
          f"(last {su['files'].get('bible_paragraphs_kept_out')} paragraphs kept out) + Dolly dev responses: {te.get('tokens', 0):,} tokens, "
          f"{te.get('steps')} steps of {te.get('batch')}, {te.get('seconds')} s (bf16), best validation bpb {_f(te.get('best_val_bpb'))} "
          f"at step {te.get('best_step')} (stop: {te.get('stop')}).",
          f"- Student: Llama architecture {st.get('config')}, real SmolLM2 tokenizer, {st.get('params', 0) / 1e6:.1f}M params; one init per seed "
          f"({se['seeds']}), shared by every arm of that seed.",
          f"- Every arm: {se['steps']} steps × {se['batch']} sequences of ≤{se['seq_len']} student tokens, lr {se['lr']} "
          "(AdamW wd 0.01, 3% warmup, cosine, clip 1.0), fp16 autocast + GradScaler; our arms through `kd_kaggle.train.train`, "
          "GOLD through `trl.experimental.gold.GOLDTrainer` (benchmarks/gold_peer.py); every student scored by `kd_kaggle.evaluate.evaluate` "
          "on the same held-out batches.",
          f"- Data: text = {su['data'].get('text', {}).get('train_examples')} packed training windows "
          f"({su['data'].get('text', {}).get('train_student_tokens', 0):,} student tokens), held-out *Persuasion* "
          f"({su['data'].get('text', {}).get('heldout_examples')} windows); dolly = Dolly dev rows "
          f"({su['data'].get('dolly', {}).get('train_examples')}), held-out Dolly test ({su['data'].get('dolly', {}).get('heldout_examples')}), "
          "response-only loss and response bits per byte.", '']
    for data, d in doc['summary'].items():
        ce = d.get('ce_only', {}).get('mean')
        sb = (doc['settings'].get('steps_batch_per_data') or {}).get(data)
        L += [f"## {data}: held-out bits per byte (lower is better)" + (f" — {sb[0]} steps × {sb[1]} sequences" if sb else ''), '',
              '| arm | recipe | mean ± sd | vs ce_only | per seed | retention | agreement | student tokens | wall s |', '|---|---|---|---|---|---|---|---|---|']
        runs = {r['arm']: r['run'] for r in doc['arms'] if r['data'] == data and r.get('run')}
        for arm in [x for x in ORDER if x in d] + [x for x in d if x not in ORDER]:
            s = d[arm]
            rel = '—' if (ce is None or arm == 'ce_only') else f"{100 * (ce - s['mean']) / ce:+.1f}%"
            L.append(f"| {arm}{' †' if arm in runs else ''} | {RECIPE.get(arm, '')} | {_f(s['mean'])} ± {_f(s['sd'], 3)} | {rel} | "
                     f"{', '.join(_f(v, 3) for _, v in sorted(s['seeds'].items()))} | {_f(s['retention'], 3)} | {_f(s['agreement'], 3)} | "
                     f"{int(s['tokens'] or 0):,} | {_f(s['wall_s'], 0)} |")
        if runs: L += ['', f"† from an earlier device call of the same script ({', '.join(sorted(set(runs.values())))}): see Notes."]
        t = doc['targets'].get(data, {})
        yn = lambda x: 'n/a' if x is None else ('**met**' if x else '**not met**')
        L += ['', f"Targets ({data}):", '',
              f"- default mean ≤ 0.92 × ce_only: {yn(t.get('default_le_0.92_ce_only'))} (ratio {_f(t.get('default_over_ce_only'))})",
              f"- every default seed better than every ce_only seed: {yn(t.get('every_default_seed_beats_every_ce_only_seed'))}",
              f"- default better than gold_best: {yn(t.get('default_beats_gold_best'))} ({_pct(t.get('default_vs_gold_best_rel'))} lower bpb; "
              f"wall s default {_f((t.get('wall_s') or {}).get('default'), 0)} vs gold_best {_f((t.get('wall_s') or {}).get('gold_best'), 0)})",
              f"- naive_kd no better than ce_only: {yn(t.get('naive_no_better_than_ce_only'))} (ratio {_f(t.get('naive_over_ce_only'))})", '']
    if doc.get('before_fix'):
        L += ['## Before the fp16 fix (same script, same seeds; a contrast, not a result)', '',
              '| data | arm | mean ± sd | per seed |', '|---|---|---|---|']
        for data, d in doc['before_fix'].items():
            for arm in [x for x in ORDER if x in d]:
                L.append(f"| {data} | {arm} | {_f(d[arm]['mean'])} ± {_f(d[arm]['sd'], 3)} | "
                         f"{', '.join(_f(v, 3) for _, v in sorted(d[arm]['seeds'].items()))} |")
        L.append('')
    L += [f"![held-out bpb]({stem}.png)", '']
    if doc.get('findings'): L += ['## Findings', ''] + [f"- {x}" for x in doc['findings']] + ['']
    if doc.get('notes'): L += ['## Notes', ''] + [f"- {x}" for x in doc['notes']] + ['']
    fails = [r for r in doc['arms'] if not _ok(r.get('heldout_bpb'))]
    if doc.get('skipped') or fails: L += ['## Not run / failed', '', f"- not run (time): {', '.join(doc.get('skipped') or []) or 'none'}"] + \
        [f"- {r['data']}:{r['arm']}:{r['seed']}: {r.get('error')}" for r in fails] + ['']
    L += ['## Reproduce', '', '```', doc.get('command', ''), '```', '']
    return '\n'.join(L)


def merge(main_json: Path, extra: list, before=None, out=None) -> dict:
    """One results file from several device calls of the same script: `main_json`'s rows, plus the rows of (json, arms)
    pairs in `extra` (each marked with the file they came from), plus `before` (a json whose rows are shown as a
    'before the fix' contrast only). The targets are recomputed over the merged rows."""
    doc = json.loads(Path(main_json).read_text())
    key = lambda r: (r['data'], r['arm'], r['seed'])
    rows = {key(r): r for r in doc['arms'] if r['arm'] != 'gold_best'}              # failed rows too: the md lists them
    for path, arms in extra:                                                        # an extra file's finished rows win
        src = json.loads(Path(path).read_text())
        rows.update({key(r): {**r, 'run': Path(path).name} for r in src['arms'] if r['arm'] in arms and _ok(r.get('heldout_bpb'))})
    doc['arms'] = with_gold_best(list(rows.values()))
    doc['summary'] = summary(doc['arms']); doc['targets'] = {d: targets(doc['summary'], d) for d in doc['summary']}
    if before:
        b = json.loads(Path(before).read_text())
        doc['before_fix'] = summary([r for r in b['arms'] if r['arm'] != 'gold_best' and not r['arm'].startswith('gold')])
    doc['skipped'] = [s for s in doc.get('skipped', []) if not any(f"{r['data']}:{r['arm']}:{r['seed']}" == s for r in doc['arms'])]
    if out: Path(out).write_text(json.dumps(doc, indent=1, default=float)); render(Path(out))
    return doc


def _pct(x): return '—' if not _ok(x) else f"{100 * x:+.1f}%"


if __name__ == '__main__':   # python benchmarks/quality_t4_report.py render RESULTS.json
    import sys
    render(Path(sys.argv[2])) if sys.argv[1] == 'render' else None
