"""Peak memory of the chunked (fused) distillation loss vs the naive one at the reference vocabulary sizes.

    PYTHONPATH=. python benchmarks/losses_cpu_memory.py                 # CPU, all arms, a markdown table
    PYTHONPATH=. python benchmarks/losses_cpu_memory.py --device cuda   # same on a GPU (fp16 autocast too)

Setting (defaults): N = 4,096 positions, all with a label and a KD target; teacher dt = 896, Vt = 151,936 rows of
which 151,665 are tokens; student ds = 576, Vs = 49,152; a random vocab map reaching 42,000 student ids with 30% of
teacher rows unmapped; float32; forward + backward (grads w.r.t. the student hidden states and head); forward KL.

How memory is measured. Each arm runs in a fresh process after its inputs exist.
- CPU: the kernel's peak resident set (VmHWM) is reset by writing 5 to /proc/self/clear_refs once the inputs are
  built, and read after forward + backward; the number reported is that peak minus the resident set at the reset,
  i.e. the extra memory the loss needed. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_=65536) so large
  tensors are returned to the OS when freed and RSS follows tensor memory. Where clear_refs is refused the script
  falls back to ru_maxrss (peak over the whole process) minus the RSS after the inputs: an upper bound.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory allocated for inputs.
"""
import argparse, json, os, resource, subprocess, sys, time

import torch

ARMS = ('seed_naive', 'naive', 'fused_c1024', 'fused_c256', 'fused_c256_topk64')


def rss_bytes():
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def hwm_bytes():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))


def reset_peak():
    "Reset the kernel's peak-RSS counter; False where not allowed."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError:
        return False


def build(args, device):
    from kd_kaggle.losses import OnlineTeacher, bucket_map
    g = torch.Generator().manual_seed(0)
    n, vs, vt, limit = args.n, args.vs, args.vt, args.limit
    perm, student_ids = torch.randperm(limit, generator=g), torch.randperm(vs, generator=g)[:args.reach]
    n_mapped_rows = int(0.7 * limit)                                     # 30% of teacher tokens unmapped
    vmap = torch.full((vt,), -1, dtype=torch.long)
    vmap[perm[:n_mapped_rows]] = student_ids[torch.randint(0, args.reach, (n_mapped_rows,), generator=g)]
    vmap[perm[:args.reach]] = student_ids                                # every reached student id at least once
    bmap = bucket_map(vmap, vs, limit).to(device)
    std = 1 / args.ds ** 0.5
    h = (torch.randn(n, args.ds, generator=g) * 1.0).to(device).requires_grad_()
    w = (torch.randn(vs, args.ds, generator=g) * std).to(device).requires_grad_()          # student logits ~ N(0, 1)
    teacher = OnlineTeacher(torch.randn(n, args.dt, generator=g).to(device),
                            (torch.randn(vt, args.dt, generator=g) * 3 / args.dt ** 0.5).to(device))
    labels = torch.randint(0, vs, (n,), generator=g).to(device)
    kd_mask = torch.ones(n, dtype=torch.bool, device=device)
    return h, w, teacher, labels, kd_mask, bmap


def run_child(arm, args):
    from kd_kaggle.losses import fused_distill_loss, head_logits, naive_distill_loss, seed_naive_kd_loss
    device = torch.device(args.device)
    torch.manual_seed(0)
    h, w, teacher, labels, kd_mask, bmap = build(args, device)
    cuda = device.type == 'cuda'
    autocast = torch.autocast('cuda', dtype=torch.float16) if (cuda and args.fp16) else torch.autocast('cpu', enabled=False)
    kw = dict(labels=labels, kd_mask=kd_mask, teacher=teacher, vocab_map=bmap, teacher_vocab_limit=args.limit)

    def step():
        with autocast:
            if arm == 'seed_naive':
                s_logits = head_logits(h, w)
                with torch.no_grad(): t_logits = head_logits(teacher.hidden, teacher.head_weight)
                loss = torch.nn.functional.cross_entropy(s_logits, labels) + seed_naive_kd_loss(s_logits, t_logits).loss
            elif arm == 'naive':
                loss = naive_distill_loss(h, w, **kw).loss
            else:
                chunk = int(arm.split('_c')[1].split('_')[0])
                loss = fused_distill_loss(h, w, chunk_size=chunk, top_k=64 if 'topk' in arm else None, **kw).loss
        torch.autograd.grad(loss, [h, w])
        return loss.item()

    if cuda:
        torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    else:
        base, exact = rss_bytes(), reset_peak()
    t0 = time.perf_counter()
    loss = step()
    if cuda: torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda: peak, how = torch.cuda.max_memory_allocated() - base, 'cuda max_memory_allocated'
    elif exact: peak, how = hwm_bytes() - base, 'VmHWM after clear_refs'
    else: peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 'ru_maxrss (upper bound)'
    print(json.dumps(dict(arm=arm, peak_gib=peak / 2 ** 30, seconds=seconds, loss=loss, how=how,
                          threads=torch.get_num_threads(), device=args.device + (' fp16-autocast' if cuda and args.fp16 else ''))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=4096)
    ap.add_argument('--vs', type=int, default=49152)
    ap.add_argument('--vt', type=int, default=151936)
    ap.add_argument('--limit', type=int, default=151665)
    ap.add_argument('--reach', type=int, default=42000, help='student ids reached by the map')
    ap.add_argument('--ds', type=int, default=576)
    ap.add_argument('--dt', type=int, default=896)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--fp16', action='store_true', help='CUDA only: run under fp16 autocast')
    ap.add_argument('--arms', default=','.join(ARMS))
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child: return run_child(args.child, args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    rows = []
    for arm in args.arms.split(','):
        cmd = [sys.executable, __file__, '--child', arm] + [a for a in sys.argv[1:] if not a.startswith('--arms')]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            print(f'{arm}: failed\n{res.stderr[-2000:]}', file=sys.stderr); continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f'\nN={args.n}, Vt={args.vt} (limit {args.limit}), Vs={args.vs}, dt={args.dt}, ds={args.ds}, '
          f'device={rows[0]["device"] if rows else args.device}, threads={rows[0]["threads"] if rows else "?"}, '
          f'measured by {rows[0]["how"] if rows else "?"}\n')
    print('| arm | peak memory above inputs (GiB) | forward + backward (s) | loss |\n|---|---|---|---|')
    for r in rows: print(f"| {r['arm']} | {r['peak_gib']:.2f} | {r['seconds']:.2f} | {r['loss']:.4f} |")


if __name__ == '__main__':
    main()
