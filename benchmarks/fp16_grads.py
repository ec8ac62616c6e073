"""fp16 numerics of the fused lm_head + CE + KD loss (issue 15): gradients under fp16 autocast vs a float64 reference.

Runs the library's own `fused_distill_loss` as the trainer calls it (fp32 master head weight, hidden states that need a
gradient, the loss multiplied by a GradScaler-sized factor before backward and the gradients divided by it after), under
fp16 autocast, and compares the head-weight and hidden-state gradients with the same loss computed unchunked in float64
without autocast. Also runs the unchunked path (`chunk_size=None`) under the same autocast for contrast.

    PYTHONPATH=. python benchmarks/fp16_grads.py --device cpu --n 4096 --vt 16384        # CPU fp16 autocast (~2 min)
    PYTHONPATH=. python benchmarks/fp16_grads.py --device cuda --out $OUT                  # GPU, real shapes + real vocab map

Reported per term (ce, kd, both): relative Frobenius error of the head and hidden gradients, and `frozen_rows`: the
fraction of head rows that float64 moves but fp16 leaves at exactly zero (ids that are never a label live there).
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from kd_kaggle.losses import fused_distill_loss, OnlineTeacher

SCALER = 2.0 ** 16   # GradScaler's initial scale


def real_vocab_map(vt_rows):
    "The Qwen2 -> SmolLM2 vocab map from the real tokenizer files (tests/fixtures)."
    from kd_kaggle.align import load_tokenizer, build_vocab_map
    tok = ROOT / 'tests' / 'fixtures' / 'tokenizers'
    t, s = load_tokenizer(str(tok / 'qwen2')), load_tokenizer(str(tok / 'smollm2'))
    return build_vocab_map(t, s, teacher_rows=vt_rows), len(t)


def problem(n, d, vs, dt, vt, device, real_map, seed=0):
    "Random inputs with trained-model-like logits (std ~2-3) and Zipf-distributed labels (most ids never a label)."
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vs, d, generator=g) * (2.0 / d ** 0.5)
    ranks = torch.distributions.Categorical(probs=1 / torch.arange(1, vs + 1).float()).sample((n,))
    labels = torch.randperm(vs, generator=g)[ranks]
    kd_mask = torch.rand(n, generator=g) < 0.9
    th, tw = torch.randn(n, dt, generator=g), torch.randn(vt, dt, generator=g) * (3.0 / dt ** 0.5)
    if real_map:
        vmap, limit = real_vocab_map(vt)
    else:
        vmap = torch.randint(-1, vs, (vt,), generator=g); limit = vt
    dev = lambda x: x.to(device)
    return dict(h=dev(h), w=dev(w), labels=dev(labels), kd_mask=dev(kd_mask), th=dev(th), tw=dev(tw.half()),
                vmap=dev(vmap), limit=limit)


def grads(p, term, dtype, autocast, chunk, device):
    "Head and hidden gradients of the chosen term, computed as the trainer does (scaled loss, unscaled grads)."
    h = p['h'].detach().to(dtype, copy=True).requires_grad_(); w = p['w'].detach().to(dtype, copy=True).requires_grad_()
    teacher = OnlineTeacher(p['th'].to(dtype if dtype == torch.float64 else torch.float16),
                            p['tw'].to(dtype if dtype == torch.float64 else torch.float16))
    kw = dict(labels=p['labels'], kd_mask=p['kd_mask'], teacher=teacher, vocab_map=p['vmap'], teacher_vocab_limit=p['limit'],
              ce_weight=1.0 if term in ('ce', 'both') else 0.0, kd_weight=1.0 if term in ('kd', 'both') else 0.0,
              chunk_size=chunk, check_finite=False)
    scale = SCALER if autocast else 1.0
    if device == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.float16, enabled=autocast):
        out = fused_distill_loss(h, w, **kw)
    (out.loss * scale).backward()
    if device == 'cuda': torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == 'cuda' else None
    return w.grad.double() / scale, h.grad.double() / scale, time.perf_counter() - t0, peak


def compare(got, ref):
    gw, gh = got[0], got[1]
    rw, rh = ref[0], ref[1]
    moved = rw.abs().amax(1) > 0
    frozen = ((gw.abs().amax(1) == 0) & moved).sum().item() / max(moved.sum().item(), 1)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    worst_row = ((gw - rw).norm(dim=1) / rw.norm(dim=1).clamp_min(1e-300))[moved].max().item()
    return dict(head_rel_err=rel(gw, rw), hidden_rel_err=rel(gh, rh), frozen_rows=frozen, worst_head_row_rel_err=worst_row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--n', type=int, default=4096); ap.add_argument('--d', type=int, default=576)
    ap.add_argument('--vs', type=int, default=49152); ap.add_argument('--dt', type=int, default=896)
    ap.add_argument('--vt', type=int, default=151936); ap.add_argument('--chunk', type=int, default=1024)
    ap.add_argument('--real-map', action=argparse.BooleanOptionalAction, default=None,
                    help='Qwen2->SmolLM2 map from the real tokenizers (default: when --vt is 151936)')
    ap.add_argument('--out', default=None); ap.add_argument('--date', default=time.strftime('%Y-%m-%d'))
    args = ap.parse_args(argv)
    real_map = args.real_map if args.real_map is not None else args.vt == 151936
    p = problem(args.n, args.d, args.vs, args.dt, args.vt, args.device, real_map)
    name = torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'
    rows = []
    for term in ('ce', 'kd', 'both'):
        ref = grads(p, term, torch.float64, False, None, args.device)
        for variant, chunk in (('fused', args.chunk), ('unchunked', None)):
            got = grads(p, term, torch.float32, True, chunk, args.device)
            row = dict(term=term, variant=variant, **compare(got, ref), seconds=round(got[2], 3), peak_gib=got[3])
            rows.append(row); print(json.dumps(row), flush=True)
        del ref
    doc = dict(device=name, precision='fp16 autocast, loss x 65536 then unscaled (GradScaler)', torch=torch.__version__,
               shapes=dict(n=args.n, d=args.d, vs=args.vs, dt=args.dt, vt=args.vt, chunk=args.chunk, real_map=real_map),
               reference='float64, unchunked, no autocast, same inputs', rows=rows)
    if args.out:
        out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
        (out / f'fp16-grads-{args.date}-{args.device}.json').write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == '__main__':
    main()
