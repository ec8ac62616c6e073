"""Issue 11: does kd_kaggle's recipe beat training the student alone?

One script, one GPU call: pretrain a small Qwen2-architecture teacher (real Qwen2 tokenizer, 151,936 embedding rows)
on the Austen training novels, then train the same Llama-architecture student (real SmolLM2 tokenizer, 49,152 ids)
from the same init, on the same batches in the same order, for the same number of steps, under five recipes:

  ce_only   gold CE only (the student trained alone)                    kd_kaggle.train.train, curriculum ce=1, kd=0
  naive_kd  the seed's id-indexed, position-indexed KD at T=4 (x T^2)   train(), KDConfig(kd_method='seed_naive')
            + CE: KL(softmax(teacher[:, :Vs]/4) || softmax(student/4)) at position i vs i
  kd_only   aligned projected forward KL with tail bucket + CE          train(), curriculum ce=1, kd=1, router terms 0
  default   KDConfig()'s default curriculum (router feat/layer/attn     train(), KDConfig().curriculum
            terms fading out by 60% of the run)
  uld       ULD (sorted-probability L1) + CE, no router terms           train(), divergence='uld', ce=1, kd=1
  (ablations, when time allows: default_no_attn, default_no_feat_layer)

and report held-out bits per byte on Persuasion (never trained on; bpb is comparable across tokenizers), retention
(teacher bpb / student bpb), top-1 agreement at 1:1 aligned positions, tokens seen and eval curves.

    PYTHONPATH=. python benchmarks/quality.py --smoke                    # CPU, tiny models, every arm end to end (~2 min)
    PYTHONPATH=. PYTHONUNBUFFERED=1 python benchmarks/quality.py --out $OUT --deadline 560 2>&1 | tee $OUT/log.txt

The script writes quality-<date>.json/.md/.png into --out after every arm, so a run cut short still leaves its results.
Without `datasets` installed (the GPU image lacks it), carry its wheels (datasets, dill, multiprocess) as
benchmarks/fp16_gpu.sh does; the script stops with that advice otherwise.
"""
from __future__ import annotations
import argparse, json, math, os, platform, shutil, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

T0 = time.monotonic()
MAIN_ARMS = ('ce_only', 'kd_only', 'default', 'uld', 'naive_kd')
ABLATIONS = ('default_no_attn', 'default_no_feat_layer')
ALL_ARMS = MAIN_ARMS + ABLATIONS


def say(*a):
    print(f"[{time.monotonic() - T0:6.1f}s]", *a, flush=True)


def ensure_datasets() -> str:
    "`datasets` is a library dependency: on a GPU image without it, carry its wheels (see benchmarks/fp16_gpu.sh)."
    try: import datasets
    except ImportError as e: raise SystemExit(f"benchmarks/quality.py: `import datasets` failed ({e}): install it or carry its wheels (.whl/)")
    return f'datasets {datasets.__version__}'


# ----------------------------------------------------------------------------------------------------------------
# sizes
def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(teacher=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=128),
                    student=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=64),
                    seq_len=128, batch=4, max_train_examples=48, max_eval_examples=8,
                    teacher_batch=8, teacher_lr=3e-3, teacher_max_epochs=2, teacher_seconds=60, teacher_eval_every=3)
    return dict(teacher=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=1536),
                student=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=768),
                seq_len=512, batch=16, max_train_examples=None, max_eval_examples=1000,
                teacher_batch=32, teacher_lr=8e-4, teacher_max_epochs=10, teacher_seconds=170, teacher_eval_every=30)


TEACHER_ROWS = 151_936      # Qwen2's padded embedding (a multiple of 64 >= len(tok) = 151,646)


# ----------------------------------------------------------------------------------------------------------------
def write_data(work: Path) -> tuple:
    from kd_kaggle.demo import demo_corpus
    d = work / 'data'; d.mkdir(parents=True, exist_ok=True)
    tr, ho = d / 'austen_train.txt', d / 'persuasion_heldout.txt'
    tr.write_text('\n\n'.join(demo_corpus('train')) + '\n', encoding='utf-8')
    ho.write_text('\n\n'.join(demo_corpus('heldout')) + '\n', encoding='utf-8')
    return tr, ho


def base_config(args, S, work, tr, ho, **over):
    from kd_kaggle.config import KDConfig
    kw = dict(teacher=str(work / 'teacher'), student=str(work / 'student_init'), data=str(tr), eval_data=str(ho),
              seq_len=S['seq_len'], batch_size=S['batch'], grad_accum=1, max_steps=args.steps, lr=args.lr,
              warmup_ratio=0.03, max_train_examples=S['max_train_examples'], max_eval_examples=S['max_eval_examples'],
              eval_every=args.eval_every, save_every=10_000, log_every=max(1, min(10, args.eval_every)),
              print_every=max(1, args.steps // 4), precision=args.precision, seed=args.seed,
              cache_dir=str(work / 'data_cache'), output_dir=str(work / 'runs' / 'probe'), time_budget='10m')
    kw.update(over)
    return KDConfig(**kw)


def arm_overrides(arm: str) -> dict:
    from kd_kaggle.config import router_curriculum
    ce_kd = {'ce': 1.0, 'kd': 1.0}
    if arm == 'ce_only': return dict(curriculum={'ce': 1.0, 'kd': 0.0})
    if arm == 'naive_kd': return dict(curriculum=ce_kd, kd_method='seed_naive', temperature=4.0)
    if arm == 'kd_only': return dict(curriculum=ce_kd)
    if arm == 'uld': return dict(curriculum=ce_kd, divergence='uld')
    cur = router_curriculum()   # the 'default' arm = the router recipe (the library default until this experiment moved it to CE + KD)
    if arm == 'default': return dict(curriculum=cur)
    if arm == 'default_no_attn': cur['attn'] = 0.0; return dict(curriculum=cur)
    if arm == 'default_no_feat_layer': cur['feat'] = 0.0; cur['layer'] = 0.0; return dict(curriculum=cur)
    raise ValueError(arm)


# ----------------------------------------------------------------------------------------------------------------
# teacher pretraining (plain loop: this is the "given" teacher, not the product under test)
def _pad_rows(rows, pad, width):
    import torch
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows): out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def pretrain_teacher(args, S, train_ds, t_tok, device, out_dir: Path) -> dict:
    import numpy as np, torch, torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from kd_kaggle.evaluate import lm_metrics
    from kd_kaggle.env import quiet_hf
    torch.manual_seed(args.seed)
    eos = t_tok.eos_token_id
    cfg = Qwen2Config(vocab_size=TEACHER_ROWS, max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, use_cache=False, **S['teacher'])
    model = Qwen2ForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    ids, labels, nbytes = (train_ds['teacher_input_ids'], train_ds['teacher_labels'], train_ds['teacher_label_bytes'])
    n = len(ids); width = max(len(r) for r in ids)
    perm = np.random.default_rng([args.seed, 99]).permutation(n)
    n_val = max(4, int(round(0.03 * n)))
    val_i, tr_i = perm[:n_val], perm[n_val:]
    X = _pad_rows(ids, eos, width).to(device); Y = _pad_rows(labels, -100, width).to(device)
    M = (torch.arange(width)[None] < torch.tensor([len(r) for r in ids])[:, None]).long().to(device)
    B = _pad_rows(nbytes, 0, width).to(device)
    val_batches = [{'teacher_input_ids': X[val_i[s:s + 16]], 'teacher_attention_mask': M[val_i[s:s + 16]],
                    'teacher_labels': Y[val_i[s:s + 16]], 'teacher_label_bytes': B[val_i[s:s + 16]]}
                   for s in range(0, n_val, 16)]
    bs = S['teacher_batch']; steps_per_epoch = max(1, len(tr_i) // bs)
    horizon = steps_per_epoch * S['teacher_max_epochs']; warm = max(1, int(0.05 * horizon))
    decay, no_decay = [], []
    for name, p in model.named_parameters(): (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=S['teacher_lr'], betas=(0.9, 0.95), fused=device.type == 'cuda')
    lr_at = lambda s: S['teacher_lr'] * (s / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, horizon - warm)))))
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == 'cuda' else torch.autocast('cpu', enabled=False)
    t_start, step, best, best_state, curve, bad, tokens, best_step = time.monotonic(), 0, float('inf'), None, [], 0, 0, 0
    stop = ''
    rng = np.random.default_rng([args.seed, 7])

    def val_bpb():
        model.eval()
        with torch.no_grad(), quiet_hf():
            m = lm_metrics(model, val_batches, side='teacher')
        model.train()
        return m['bpb']

    model.train()
    while not stop:
        order = tr_i[rng.permutation(len(tr_i))]
        for s in range(0, len(order) - bs + 1, bs):
            idx = torch.as_tensor(order[s:s + bs], device=device)
            x, y, m = X[idx], Y[idx], M[idx]
            L = int(m.sum(1).max()); x, y, m = x[:, :L], y[:, :L], m[:, :L]
            for g in opt.param_groups: g['lr'] = lr_at(step)
            with amp:
                h = model.model(input_ids=x, attention_mask=m).last_hidden_state
                sel = y != -100
                logits = model.lm_head(h[sel])
            loss = F.cross_entropy(logits.float(), y[sel])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); opt.zero_grad(set_to_none=True)
            step += 1; tokens += int(m.sum())
            if step % S['teacher_eval_every'] == 0 or step >= horizon:
                v = val_bpb(); el = time.monotonic() - t_start
                curve.append({'step': step, 'epoch': round(step / steps_per_epoch, 2), 'train_loss': float(loss.detach()), 'val_bpb': v, 's': round(el, 1)})
                say(f"teacher step {step}/{horizon} ep {step / steps_per_epoch:.2f} loss {float(loss.detach()):.3f} val_bpb {v:.4f} ({el:.0f}s)")
                if v < best - 1e-4:
                    best, bad = v, 0
                    best_state = {k: t.detach().to('cpu', copy=True) for k, t in model.state_dict().items()}
                    best_step = step
                else: bad += 1
                if bad >= args.teacher_patience: stop = 'early_stop'
                elif step >= horizon: stop = 'horizon'
                elif el > S['teacher_seconds']: stop = 'time'
                if stop: break
    model.load_state_dict(best_state)
    seconds = time.monotonic() - t_start
    model.to(torch.bfloat16 if device.type == 'cuda' else torch.float32)
    model.config.use_cache = True
    with quiet_hf():
        model.save_pretrained(out_dir, safe_serialization=True); t_tok.save_pretrained(out_dir)
    say(f"teacher: {n_params / 1e6:.1f}M params ({(n_params - n_embed) / 1e6:.1f}M non-embedding), best val bpb {best:.4f} "
        f"at step {best_step} ({stop}), {tokens:,} tokens in {seconds:.0f}s")
    del model, opt, X, Y, M, B
    if device.type == 'cuda': torch.cuda.empty_cache()
    return {'params': n_params, 'non_embedding_params': n_params - n_embed, 'config': S['teacher'], 'rows': TEACHER_ROWS,
            'best_val_bpb': best, 'best_step': best_step, 'steps': step, 'steps_per_epoch': steps_per_epoch,
            'stop': stop, 'tokens': tokens, 'seconds': round(seconds, 1), 'lr': S['teacher_lr'], 'batch': bs,
            'val_examples': int(n_val), 'curve': curve}


def make_student(args, S, s_tok, out_dir: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from kd_kaggle.env import quiet_hf
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(s_tok), max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=s_tok.bos_token_id, eos_token_id=s_tok.eos_token_id, pad_token_id=s_tok.pad_token_id,
                      **S['student'])
    model = LlamaForCausalLM(cfg)
    from kd_kaggle.models import fix_zero_embedding_rows   # HF zeroes the pad (= bos = eos) row: see 08_models
    fix_zero_embedding_rows(model, (s_tok.bos_token_id, s_tok.eos_token_id, s_tok.pad_token_id), args.seed)
    n = sum(p.numel() for p in model.parameters()); ne = model.get_input_embeddings().weight.numel()
    with quiet_hf():
        model.save_pretrained(out_dir, safe_serialization=True); s_tok.save_pretrained(out_dir)
    return {'params': n, 'non_embedding_params': n - ne, 'config': S['student'], 'vocab': len(s_tok)}


# ----------------------------------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list:
    p = run_dir / 'metrics.jsonl'
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def curve_from_records(records: list, baseline_bpb) -> list:
    tok_at, curve = {0: 0}, []
    for r in records:
        if 'tokens' in r: tok_at[r['step']] = r['tokens']
    if baseline_bpb is not None: curve.append({'step': 0, 'tokens': 0, 'bpb': baseline_bpb})
    steps = sorted(tok_at)
    for r in records:
        if 'eval_student_bpb' in r:
            s = r['step']; prev = max([k for k in steps if k <= s] or [0])
            tok = tok_at.get(s, tok_at[prev] * s / prev if prev else 0)
            if curve and curve[-1]['step'] == s: curve[-1] = {'step': s, 'tokens': int(tok), 'bpb': r['eval_student_bpb']}
            else: curve.append({'step': s, 'tokens': int(tok), 'bpb': r['eval_student_bpb']})
    return curve


def run_trainer_arm(args, S, work, tr, ho, arm, time_budget_s) -> dict:
    from kd_kaggle.train import train
    run_dir = work / 'runs' / arm
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = base_config(args, S, work, tr, ho, output_dir=str(run_dir), time_budget=f'{int(max(60, time_budget_s))}s',
                      **arm_overrides(arm))
    t = time.monotonic()
    final = train(cfg)
    wall = time.monotonic() - t
    recs = read_metrics(run_dir)
    train_recs = [r for r in recs if 'tokens' in r]
    last = train_recs[-1] if train_recs else {}
    return {'final': final, 'wall_s': wall, 'steps': max([r['step'] for r in recs] or [0]),
            'tokens_seen': int(last.get('tokens', 0)), 'curve': curve_from_records(recs, final.get('student_bpb_before')),
            'train_tail': {k: last.get(k) for k in ('ce', 'kd_raw', 'feat', 'layer', 'attn', 'loss', 'tok_s', 'peak_mem_gib', 'skipped', 'scaler_skipped', 'grad_scale')},
            'curriculum': cfg.curriculum, 'divergence': cfg.divergence}


def device_is_cuda():
    import torch
    return torch.cuda.is_available()


def probe_step_time(args, S, work, tr, ho, arm, n=6) -> float:
    "Seconds per optimizer step of `arm` through kd_kaggle's Distiller (median of the last steps; nothing is kept)."
    import torch
    from kd_kaggle.train import setup_run
    from kd_kaggle.data import make_loader
    cfg = base_config(args, S, work, tr, ho, output_dir=str(work / 'runs' / f'probe_{arm}'), **arm_overrides(arm))
    r = setup_run(cfg)
    acc, dev = r.acc, r.acc.device
    times = []
    for i, batch in enumerate(make_loader(r.train_ds, cfg.batch_size, r.s_tok.pad_token_id or 0, r.t_tok.pad_token_id or 0, cfg.seed, 0)):
        if i >= n: break
        if dev.type == 'cuda': torch.cuda.synchronize()
        t = time.monotonic()
        batch = {k: v.to(dev) for k, v in batch.items()}
        loss, _ = r.distiller(batch, r.curriculum.weights(0.0))
        acc.backward(loss); acc.clip_grad_norm_(r.distiller.parameters(), 1.0)
        r.optimizer.step(); r.optimizer.zero_grad(set_to_none=True)
        if dev.type == 'cuda': torch.cuda.synchronize()
        times.append(time.monotonic() - t)
    del r
    if dev.type == 'cuda': torch.cuda.empty_cache()
    tail = sorted(times[2:] or times)
    return tail[len(tail) // 2]


# ----------------------------------------------------------------------------------------------------------------
# results
def arm_row(name, res, teacher_bpb) -> dict:
    f = res['final']
    bpb = f.get('student_bpb')
    return {'arm': name, 'heldout_bpb': bpb, 'tokens_seen': res['tokens_seen'], 'steps': res['steps'],
            'retention': (teacher_bpb / bpb) if (bpb and teacher_bpb) else None, 'agreement': f.get('agreement'),
            'kl_teacher_student': f.get('kl'), 'student_loss_nats_per_token': f.get('student_loss'),
            'student_bpb_before': f.get('student_bpb_before'), 'teacher_bpb_in_run': f.get('teacher_bpb'),
            'eval_tokens': f.get('tokens'), 'eval_bytes': f.get('bytes'), 'wall_s': round(res['wall_s'], 1),
            'curriculum': res.get('curriculum'), 'divergence': res.get('divergence'), 'train_tail': res.get('train_tail'),
            'curve': res['curve'], 'status': res.get('status', 'ok')}


def targets(rows: dict) -> dict:
    g = lambda a: rows.get(a, {}).get('heldout_bpb')
    a, b, c, d, e = (g(x) for x in ('ce_only', 'naive_kd', 'kd_only', 'default', 'uld'))
    rel = lambda x: None if (x is None or a is None) else (a - x) / a
    out = {'kd_only_vs_ce_only_rel': rel(c), 'default_vs_ce_only_rel': rel(d), 'uld_vs_ce_only_rel': rel(e),
           'naive_kd_vs_ce_only_rel': rel(b)}
    out['kd_only_beats_ce_only'] = None if rel(c) is None else rel(c) > 0
    out['default_beats_ce_only'] = None if rel(d) is None else rel(d) > 0
    out['default_5pct_better'] = None if rel(d) is None else rel(d) >= 0.05
    out['default_beats_kd_only'] = None if (c is None or d is None) else d < c
    out['naive_no_better_than_ce_only'] = None if (a is None or b is None) else b >= a
    return out


def fmt(x, p=4):
    return '—' if x is None else f'{x:.{p}f}' if isinstance(x, float) else f'{x:,}' if isinstance(x, int) else str(x)


def write_results(out: Path, stem: str, meta: dict, rows: dict, abl: dict):
    from kd_kaggle.evaluate import to_jsonable
    out.mkdir(parents=True, exist_ok=True)
    tb = meta.get('teacher_bpb')
    doc = {**meta, 'arms': [rows[a] for a in MAIN_ARMS if a in rows], 'ablations': [abl[a] for a in ABLATIONS if a in abl],
           'targets': targets(rows)}
    tmp = out / f'.{stem}.json.tmp'
    tmp.write_text(json.dumps(to_jsonable(doc), indent=1, allow_nan=False)); os.replace(tmp, out / f'{stem}.json')
    try: plot(out / f'{stem}.png', rows, abl, tb)
    except Exception as e: say(f"plot failed: {type(e).__name__}: {e}")
    (out / f'{stem}.md').write_text(markdown(doc, stem))


def plot(path: Path, rows: dict, abl: dict, teacher_bpb):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {'ce_only': ('k', '-'), 'naive_kd': ('tab:gray', ':'), 'kd_only': ('tab:blue', '-'), 'default': ('tab:red', '-'),
              'uld': ('tab:green', '-'), 'default_no_attn': ('tab:orange', '--'), 'default_no_feat_layer': ('tab:purple', '--')}
    allrows = {**rows, **abl}
    for ax, zoom in zip(axes, (False, True)):
        lo, hi = [], []
        for name, r in allrows.items():
            c = r['curve']
            if not c: continue
            xs = [p['tokens'] / 1e6 for p in c]; ys = [p['bpb'] for p in c]
            col, ls = styles.get(name, (None, '-'))
            ax.plot(xs, ys, color=col, ls=ls, marker='.', ms=4, lw=1.5, label=f"{name} ({ys[-1]:.3f})")
            lo.append(min(ys)); hi.append(ys[min(2, len(ys) - 1)] if len(ys) > 2 else max(ys))
        if teacher_bpb: ax.axhline(teacher_bpb, color='tab:brown', ls='-.', lw=1, label=f"teacher ({teacher_bpb:.3f})")
        ax.set_xlabel('student tokens seen (M)'); ax.set_ylabel('held-out bits per byte (Persuasion)'); ax.grid(alpha=0.3)
        if zoom and lo:
            floor = min(lo + ([teacher_bpb] if teacher_bpb else []))
            ax.set_ylim(floor - 0.03, min(hi) if min(hi) > floor + 0.05 else floor + 0.5)
            xmax = max(p['tokens'] for r in allrows.values() for p in r['curve']) / 1e6
            ax.set_xlim(0.35 * xmax, xmax * 1.02); ax.set_title('zoom: from 35% of the run', fontsize=10)
        else:
            ax.set_title('held-out bpb during training', fontsize=10); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def markdown(doc: dict, stem: str) -> str:
    tb = doc.get('teacher_bpb'); t = doc['targets']; a0 = {r['arm']: r for r in doc['arms']}.get('ce_only', {}).get('heldout_bpb')
    L = [f"# Quality benchmark: kd_kaggle recipe vs the student trained alone ({doc.get('date')})", '',
         f"Device: {doc.get('device')} · precision {doc.get('precision')} · torch {doc.get('torch')} · transformers {doc.get('transformers')}"
         f" · {doc.get('datasets')}" + (' · **SMOKE RUN (tiny models, CPU): numbers mean nothing**' if doc.get('smoke') else ''), '',
         '## Setup', '']
    te, st, se = doc.get('teacher', {}), doc.get('student', {}), doc.get('settings', {})
    if te:
        L.append(f"- Teacher: Qwen2 architecture {te.get('config')}, {te.get('rows'):,} embedding rows (tied), real Qwen2 tokenizer; "
                 f"{te.get('params', 0) / 1e6:.1f}M params ({te.get('non_embedding_params', 0) / 1e6:.1f}M non-embedding). "
                 f"Pretrained here on the 5 Austen training novels ({te.get('tokens', 0):,} teacher tokens, {te.get('steps')} steps of "
                 f"{te.get('batch')} sequences, {te.get('seconds')} s, lr {te.get('lr')}), best of {len(te.get('curve', []))} checks on a 3% "
                 f"validation split of the training novels (step {te.get('best_step')}, stop: {te.get('stop')}).")
    if st:
        L.append(f"- Student: Llama architecture {st.get('config')}, {st.get('vocab'):,} ids (tied), real SmolLM2 tokenizer; "
                 f"{st.get('params', 0) / 1e6:.1f}M params ({st.get('non_embedding_params', 0) / 1e6:.1f}M non-embedding); one init (seed "
                 f"{se.get('seed')}) saved once and loaded by every arm.")
    if se:
        L.append(f"- Every arm: {se.get('steps')} optimizer steps × {se.get('batch')} sequences of ≤{se.get('seq_len')} student tokens "
                 f"(same batches, same order: kd_kaggle.data.make_loader, seed {se.get('seed')}), AdamW lr {se.get('lr')} (wd 0.01), 3% warmup + cosine, "
                 f"grad clip 1.0, precision '{se.get('precision_cfg')}' → {doc.get('precision')}. Held-out = Persuasion "
                 f"({se.get('eval_examples')} packed examples, never trained on), evaluated every {se.get('eval_every')} steps with "
                 "kd_kaggle.evaluate.evaluate. Arms other than naive_kd run through `kd_kaggle.train.train(KDConfig(...))`.")
    L += ['', '## Results', '', f"Teacher held-out bpb: **{fmt(tb)}**", '',
          '| arm | recipe | held-out bpb | vs ce_only | retention | top-1 agreement | KL(t‖s) | tokens seen | wall s |',
          '|---|---|---|---|---|---|---|---|---|']
    recipe = {'ce_only': 'CE only (student alone)', 'naive_kd': "seed KD: id i vs id i, pos i vs pos i, T=4·T², + CE",
              'kd_only': 'aligned projected FKL + tail bucket, + CE', 'default': 'KDConfig() default (+ router feat/layer/attn, fading)',
              'uld': 'ULD (sorted L1), + CE', 'default_no_attn': 'default without attn', 'default_no_feat_layer': 'default without feat/layer'}
    for r in doc['arms'] + doc['ablations']:
        b = r['heldout_bpb']
        rel = '—' if (b is None or a0 is None or r['arm'] == 'ce_only') else f"{100 * (a0 - b) / a0:+.1f}%"
        L.append(f"| {r['arm']} | {recipe.get(r['arm'], '')} | {fmt(b)} | {rel} | {fmt(r['retention'], 3)} | {fmt(r['agreement'], 3)} | "
                 f"{fmt(r['kl_teacher_student'], 3)} | {fmt(r['tokens_seen'])} | {fmt(r['wall_s'], 0)} |")
    L += ['', '"vs ce_only": relative bpb reduction (positive = better than the student trained alone). Retention = teacher bpb / '
          'student bpb. Agreement and KL are measured at 1:1-aligned held-out positions on the teacher distribution projected onto '
          'student ids (tail bucket), as kd_kaggle.evaluate reports them.', '', f"![curves]({stem}.png)", '', '## Targets', '']
    pct = lambda x: '—' if x is None else f"{100 * x:+.2f}%"
    yn = lambda x: 'n/a' if x is None else ('**met**' if x else '**not met**')
    L += [f"- kd_only lower bpb than ce_only: {yn(t['kd_only_beats_ce_only'])} ({pct(t['kd_only_vs_ce_only_rel'])})",
          f"- default lower bpb than ce_only: {yn(t['default_beats_ce_only'])} ({pct(t['default_vs_ce_only_rel'])})",
          f"- default ≥5% lower than ce_only: {yn(t['default_5pct_better'])} ({pct(t['default_vs_ce_only_rel'])})",
          f"- default beats kd_only: {yn(t['default_beats_kd_only'])}",
          f"- naive_kd no better than ce_only (expected): {yn(t['naive_no_better_than_ce_only'])} ({pct(t['naive_kd_vs_ce_only_rel'])})"]
    if doc.get('findings'): L += ['', '## Findings (written after the run)', ''] + [f"- {n}" for n in doc['findings']]
    if doc.get('readme_table'): L += ['', '## README table (for the lead)', '', doc['readme_table']]
    if doc.get('notes'): L += ['', '## Notes', ''] + [f"- {n}" for n in doc['notes']]
    if doc.get('skipped'): L += ['', f"Skipped for time: {', '.join(doc['skipped'])}"]
    L += ['', '## Reproduce', '', '```', doc.get('reproduce', doc.get('command', '')), '```', '']
    return '\n'.join(L)


def render(path: Path):
    "Rewrite <stem>.md and <stem>.png from <stem>.json (e.g. after adding 'findings' to it)."
    doc = json.loads(path.read_text())
    rows = {r['arm']: r for r in doc['arms']}; abl = {r['arm']: r for r in doc.get('ablations', [])}
    doc['targets'] = targets(rows)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    plot(path.with_suffix('.png'), rows, abl, doc.get('teacher_bpb'))
    path.with_suffix('.md').write_text(markdown(doc, path.stem))


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--smoke', action='store_true', help='tiny models, a few steps, CPU-friendly: checks every arm end to end')
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    ap.add_argument('--work', default='/tmp/kd_quality')
    ap.add_argument('--date', default='2026-11-24')
    ap.add_argument('--deadline', type=float, default=560.0, help='global wall-clock budget (s) of this script')
    ap.add_argument('--arms', default=','.join(ALL_ARMS))
    ap.add_argument('--steps', type=int, default=None, help='optimizer steps per arm (default: 600, lowered to fit the deadline)')
    ap.add_argument('--max-steps', type=int, default=600)
    ap.add_argument('--lr', type=float, default=2e-3)
    ap.add_argument('--eval-every', type=int, default=None)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--precision', default='auto')
    ap.add_argument('--teacher-seconds', type=float, default=None)
    ap.add_argument('--teacher-patience', type=int, default=4)
    ap.add_argument('--render', default=None, help='re-render the .md/.png next to this results .json (no training)')
    ap.add_argument('--stem', default=None, help='results file stem (default quality-<date>)')
    ap.add_argument('--t4', action=argparse.BooleanOptionalAction, default=True,
                    help='on a GPU, emulate a Kaggle T4: 15 GiB allocator cap, SDPA memory-efficient/math kernels only')
    args = ap.parse_args(argv)
    if args.render: return render(Path(args.render))
    deadline = T0 + args.deadline
    S = sizes(args.smoke)
    if args.teacher_seconds is not None: S['teacher_seconds'] = args.teacher_seconds
    arms = [a.strip() for a in args.arms.split(',') if a.strip()]
    bad = set(arms) - set(ALL_ARMS)
    if bad: ap.error(f'unknown arms {sorted(bad)}; known: {ALL_ARMS}')
    ds_note = ensure_datasets()
    import torch, transformers
    from kd_kaggle.align import load_tokenizer
    from kd_kaggle.data import build_datasets, make_loader
    from kd_kaggle.env import choose_precision
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dev_name = torch.cuda.get_device_name(0) if device.type == 'cuda' else f'CPU ({platform.processor() or platform.machine()})'
    policy = choose_precision(args.precision)
    stem = args.stem or f'quality-{args.date}' + ('-smoke' if args.smoke else '')
    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
    say(f"device {dev_name}, precision {policy.mixed}, torch {torch.__version__}, transformers {transformers.__version__}, {ds_note}")

    tr, ho = write_data(work)
    t_tok = load_tokenizer(ROOT / 'tests/fixtures/tokenizers/qwen2'); s_tok = load_tokenizer(ROOT / 'tests/fixtures/tokenizers/smollm2')
    if args.smoke: args.max_steps = min(args.max_steps, 6)
    auto_steps = args.steps is None
    if auto_steps: args.steps = args.max_steps
    eval_auto = args.eval_every is None
    if eval_auto: args.eval_every = max(1, args.steps // 8)
    cfg0 = base_config(args, S, work, tr, ho)
    train_ds, eval_ds = build_datasets(cfg0, t_tok, s_tok)
    say(f"data: {len(train_ds):,} train / {len(eval_ds):,} held-out examples "
        f"({sum(map(len, eval_ds['student_input_ids'])):,} held-out student tokens)")

    teacher_info = pretrain_teacher(args, S, train_ds, t_tok, device, work / 'teacher')
    import contextlib
    emulation = contextlib.ExitStack()
    if device.type == 'cuda' and args.t4:   # after the teacher's pretraining (setup, not the user's path): what a T4 has
        from torch.nn.attention import sdpa_kernel, SDPBackend
        from kd_kaggle.env import use_repeat_kv_for_sdpa
        torch.cuda.empty_cache(); torch.cuda.set_per_process_memory_fraction(min(1.0, 15 * 2**30 / torch.cuda.get_device_properties(0).total_memory))
        use_repeat_kv_for_sdpa()
        emulation.enter_context(sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
        dev_name += ' (T4 emulation: 15 GiB cap, SDPA memory-efficient/math)'
    student_info = make_student(args, S, s_tok, work / 'student_init')

    # teacher held-out bpb, measured once with the product's evaluate (bf16 teacher as the trainer loads it)
    from kd_kaggle.models import load_teacher
    teacher = load_teacher(str(work / 'teacher'), policy.teacher_dtype, device)
    ev = [{k: v.to(device) for k, v in b.items()} for b in make_loader(eval_ds, S['batch'], s_tok.pad_token_id or 0, t_tok.pad_token_id or 0, shuffle=False)]
    from kd_kaggle.evaluate import lm_metrics
    tm = lm_metrics(teacher, ev, side='teacher', policy=policy)          # first call warms up kernels
    t_eval = time.monotonic()
    tm = lm_metrics(teacher, ev, side='teacher', policy=policy)
    eval_s = time.monotonic() - t_eval
    teacher_bpb = tm['bpb']
    del teacher
    say(f"teacher held-out bpb {teacher_bpb:.4f} (eval {eval_s:.1f}s)")

    meta = {'date': args.date, 'smoke': args.smoke, 'device': dev_name, 'precision': policy.mixed, 'torch': torch.__version__,
            'transformers': transformers.__version__, 'datasets': ds_note, 'teacher_bpb': teacher_bpb, 'teacher': teacher_info,
            'student': student_info, 'notes': [], 'skipped': [], 'teacher_eval_s': eval_s,
            'command': ' '.join(['python', 'benchmarks/quality.py'] + (argv if argv is not None else sys.argv[1:]))}

    # size the run so that every main arm fits the deadline (same steps for all arms); --steps fixes it instead
    step_times = {}
    if auto_steps:
        for arm in ('default', 'uld'):
            if arm in arms:
                try:
                    step_times[arm] = probe_step_time(args, S, work, tr, ho, arm)
                    say(f"probe {arm}: {step_times[arm] * 1e3:.0f} ms/step")
                except Exception as e:
                    import traceback; say(f"probe {arm} failed:\n{traceback.format_exc()}")
                    meta['notes'].append(f"step-time probe of {arm} failed: {type(e).__name__}: {e}")
                import gc; gc.collect()
                if device.type == 'cuda': torch.cuda.empty_cache()
        left = deadline - time.monotonic() - 15
        n_main = len([a for a in arms if a in MAIN_ARMS])
        n_slots = max(1, n_main + (1 if any(a in ABLATIONS for a in arms) else 0))   # main arms + one ablation
        per_arm_overhead = 12 + 10 * 2.0 * eval_s          # setup + ~10 evals (student + teacher + pair stats)
        fit = int((left / n_slots - per_arm_overhead) / (1.1 * max(step_times.values() or [0.15])))
        args.steps = max(min(100, args.max_steps), min(args.max_steps, fit))
        if eval_auto: args.eval_every = max(1, args.steps // 8)
        say(f"steps per arm: {args.steps} (fit {fit} in {left:.0f}s for {n_slots} arm slots, eval {eval_s:.1f}s), eval every {args.eval_every}")
    meta['step_time_probe_s'] = step_times
    meta['settings'] = {'steps': args.steps, 'batch': S['batch'], 'seq_len': S['seq_len'], 'lr': args.lr, 'seed': args.seed,
                        'eval_every': args.eval_every, 'precision_cfg': args.precision, 'eval_examples': len(eval_ds),
                        'train_examples': len(train_ds), 'eval_student_tokens': sum(map(len, eval_ds['student_input_ids']))}
    rows, abl = {}, {}
    write_results(out, stem, meta, rows, abl)
    durations = []
    for arm in arms:
        left = deadline - time.monotonic()
        est = (max(durations) * 1.1 if durations else 0)
        if left < max(est, 45 if not args.smoke else 5):
            say(f"skip {arm}: {left:.0f}s left, needs ~{est:.0f}s"); meta['skipped'].append(arm); continue
        say(f"=== arm {arm} ({left:.0f}s left)")
        t = time.monotonic()
        try:
            res = run_trainer_arm(args, S, work, tr, ho, arm, left - 10)
        except Exception as e:
            import traceback
            tb = traceback.format_exc(); say(f"arm {arm} FAILED:\n{tb}")
            meta['notes'].append(f"{arm} failed: {type(e).__name__}: {e}")
            (out / f'{stem}-{arm}-traceback.txt').write_text(tb)
            if device.type == 'cuda': torch.cuda.empty_cache()
            continue
        durations.append(time.monotonic() - t)
        row = arm_row(arm, res, teacher_bpb)
        if row['steps'] < args.steps: row['status'] = f"stopped early at step {row['steps']} of {args.steps}"
        (rows if arm in MAIN_ARMS else abl)[arm] = row
        say(f"=== {arm}: held-out bpb {row['heldout_bpb']:.4f} (teacher {teacher_bpb:.4f}, retention {row['retention']:.3f}, "
            f"agreement {fmt(row['agreement'], 3)}), {row['tokens_seen']:,} tokens, {row['wall_s']:.0f}s")
        write_results(out, stem, meta, rows, abl)
        import gc; gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache()
    write_results(out, stem, meta, rows, abl)
    say('done')
    print(f"\n{'arm':24s} {'bpb':>8s} {'vs ce':>8s} {'retention':>9s} {'agree':>6s} {'tokens':>10s}")
    a0 = rows.get('ce_only', {}).get('heldout_bpb')
    print(f"{'teacher':24s} {teacher_bpb:8.4f}")
    for name, r in {**rows, **abl}.items():
        rel = f"{100 * (a0 - r['heldout_bpb']) / a0:+.2f}%" if a0 else '—'
        print(f"{name:24s} {r['heldout_bpb']:8.4f} {rel:>8s} {r['retention']:9.3f} {fmt(r['agreement'], 3):>6s} {r['tokens_seen']:10,d}")
    return rows


if __name__ == '__main__':
    main()
