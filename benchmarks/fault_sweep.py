"""Fault sweep (issue 19): kills at random points, kills inside checkpoint writes and pruning, a full disk, and one
flipped bit in each kind of file a run writes. After each fault the run is simply started again (resume='auto'), as a
user would. A case is
  good  the run ends with exactly the uninterrupted run's losses, and any damage was announced (fallback, rebuild), or
        the restart refused with one clear line;
  weak  the run recovered but printed a traceback, or needed more than one restart;
  bad   damaged data was used silently (losses differ, nothing said) or the run restarted from step 0 silently.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/fault_sweep.py --kills 10 --out benchmarks/results   # CPU, ~15 min
"""
from __future__ import annotations
import argparse, json, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import errno, json, os, signal, sys
out, fault = sys.argv[1], json.loads(sys.argv[2])
import kd_kaggle.checkpoint as ck
kind = fault.get('kind')
def die(): os.kill(os.getpid(), signal.SIGKILL)
if kind in ('kill_in_save', 'enospc'):
    def hook(path):
        if f"checkpoint-{fault['step']:08d}" in str(path) and str(path).endswith(fault['file']):
            if kind == 'kill_in_save': die()
            raise OSError(errno.ENOSPC, 'No space left on device', str(path))
    real_torch_save, real_save_model = ck.torch.save, ck.save_model
    def torch_save(obj, path, *a, **k): real_torch_save(obj, path, *a, **k); hook(path)
    def save_model(m, path, *a, **k): real_save_model(m, path, *a, **k); hook(path)
    ck.torch.save, ck.save_model = torch_save, save_model
if kind == 'kill_in_prune':
    real_rmtree, calls = ck.shutil.rmtree, [0]
    def rmtree(path, *a, **k):
        if __import__('pathlib').Path(path).name.startswith('.trash-checkpoint-') and __import__('pathlib').Path(path).is_dir():
            p = __import__('pathlib').Path(path)
            files = sorted(p.rglob('*')) if p.is_dir() else []
            for f in files[:len(files) // 2]:                    # half deleted, then the power goes
                if f.is_file(): f.unlink()
            die()
        return real_rmtree(path, *a, **k)
    ck.shutil.rmtree = rmtree
if kind == 'kill_in_final_eval':                             # after the final checkpoint, before the final evaluation ends
    import kd_kaggle.train as tr
    real_eval, n_eval = tr._evaluate, [0]
    def evaluate(*a, **k):
        n_eval[0] += 1
        if n_eval[0] > 1: die()                               # call 1 is the baseline (eval_every exceeds the run)
        return real_eval(*a, **k)
    tr._evaluate = evaluate
if kind == 'kill_at_step':
    real_write = ck.RunLog.write
    def write(self, rec):
        real_write(self, rec)
        if rec.get('step') == fault['step'] and 'loss' in rec: die()
    ck.RunLog.write = write
from kd_kaggle.train import demo_config
from kd_kaggle.config import save_config
from kd_kaggle.cli import main
cfg = demo_config(out, max_steps=16, log_every=1, eval_every=100, save_every=4, keep_last=2, max_train_examples=160,
                  max_eval_examples=8, batch_size=8)
save_config(cfg, out + '.config.json')
sys.exit(main(['train', '--config', out + '.config.json']))    # as a user runs it: the CLI's errors and exit codes
'''


def run(out, fault=None, kill_after=None, sig=signal.SIGKILL):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONHASHSEED': '0', 'PYTHONPATH': str(ROOT)}
    p = subprocess.Popen([sys.executable, '-c', CHILD, str(out), json.dumps(fault or {})], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_after is not None:
        try: p.wait(kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
            if sig != signal.SIGKILL:                      # a polite signal: give it time to save, then insist
                try: p.wait(60)
                except subprocess.TimeoutExpired: p.kill()
    text = p.communicate()[0]
    return p.returncode, text


def losses(out):
    f = Path(out) / 'metrics.jsonl'
    if not f.is_file(): return {}
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    return {r['step']: r['loss'] for r in recs if 'loss' in r}


def newest_checkpoint_step(out):
    ck = sorted((Path(out) / 'checkpoints').glob('checkpoint-*'))
    return max([int(p.name.split('-')[1]) for p in ck if (p / 'trainer_state.json').is_file()] or [0])


def flip_bit(path, rng):
    data = bytearray(path.read_bytes())
    if not data: return False
    i = rng.randrange(len(data) // 4, max(len(data) // 4 + 1, 3 * len(data) // 4))   # the body, not just the header
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return True


ANNOUNCED = ('falling back', 'damaged', 'rebuilding', 'corrupt', 'WARNING', 'unverified')


def judge(out, ref, texts, had_checkpoint):
    "good / weak / bad for one case, with the reason."
    got = losses(out)
    said = any(w in t for t in texts for w in ANNOUNCED)
    trace = any('Traceback' in t for t in texts)
    same = sorted(got) == sorted(ref) and all(abs(got[s] - ref[s]) <= 1e-5 * max(1.0, abs(ref[s])) for s in ref)
    restarted_silently = had_checkpoint and not any('resumed from' in t or 'already finished' in t for t in texts[1:]) and not said
    if restarted_silently: return 'bad', 'restarted from step 0 without a word'
    if not same and not said: return 'bad', 'losses differ from the uninterrupted run and nothing was said'
    if trace: return 'weak', 'recovered, but a traceback was printed'
    if not same: return 'good', 'damage announced; the run continued from an earlier point'
    return ('good', 'identical losses' + (' after the damage was announced' if said else '')) if len(texts) <= 3 else ('weak', 'needed several restarts')


def finish(out, first_text, max_restarts=3):
    texts = [first_text]
    for _ in range(max_restarts):
        rc, text = run(out)
        texts.append(text)
        if rc == 0: break
    return texts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--kills', type=int, default=10, help='random-time kills (SIGKILL/SIGINT/SIGTERM)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--work', default='/tmp/kd_fault_sweep')
    ap.add_argument('--out', default=None)
    ap.add_argument('--date', default=time.strftime('%Y-%m-%d'))
    args = ap.parse_args(argv)
    rng, work = random.Random(args.seed), Path(args.work)
    shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
    t0 = time.monotonic()
    rc, text = run(work / 'reference')
    assert rc == 0, text
    ref, ref_s = losses(work / 'reference'), time.monotonic() - t0
    ck_files = sorted({p.name for p in (work / 'reference' / 'checkpoints').glob('checkpoint-*/*') if p.is_file()})
    print(f"reference: {len(ref)} steps in {ref_s:.0f}s; checkpoint files {ck_files}", flush=True)
    cases = []

    def record(name, verdict, why, texts):
        cases.append({'case': name, 'verdict': verdict, 'why': why,
                      'last_lines': [l for t in texts for l in t.strip().splitlines()[-2:]][-4:]})
        print(f"{verdict:5s} {name}: {why}", flush=True)

    for i in range(args.kills):                          # kills at random moments, any phase of the run
        sig = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
        at = rng.uniform(2, ref_s)
        out = work / f'kill-{i}'
        _, first = run(out, kill_after=at, sig=sig)
        had = newest_checkpoint_step(out) > 0
        texts = finish(out, first)
        record(f"{signal.Signals(sig).name} at {at:.1f}s", *judge(out, ref, texts, had), texts)

    for f in ck_files:                                   # killed right after each file of checkpoint 8 is written
        out = work / f'kill-in-save-{f}'
        _, first = run(out, {'kind': 'kill_in_save', 'step': 8, 'file': f})
        texts = finish(out, first)
        record(f"SIGKILL after writing {f} of checkpoint 8", *judge(out, ref, texts, True), texts)

    out = work / 'kill-in-prune'                          # killed half-way through deleting an old checkpoint
    _, first = run(out, {'kind': 'kill_in_prune'})
    texts = finish(out, first)
    leftovers = [p.name for p in (out / 'checkpoints').iterdir() if not (p / 'trainer_state.json').is_file()] \
        if (out / 'checkpoints').is_dir() else []
    v, why = judge(out, ref, texts, True)
    if leftovers and v == 'good': v, why = 'weak', f'left {leftovers} behind'
    record('SIGKILL while pruning', v, why, texts)

    out = work / 'kill-in-final-eval'                     # killed after the final checkpoint, during the final evaluation
    _, first = run(out, {'kind': 'kill_in_final_eval'})
    texts = finish(out, first)
    v, why = judge(out, ref, texts, True)
    fm = out / 'final_metrics.json'
    done = fm.is_file() and json.loads(fm.read_text()).get('step') == max(ref) and (out / 'report.md').is_file()
    if not done: v, why = 'bad', 'the next run did not complete the final evaluation and report'
    elif not any('finishing it' in t for t in texts[1:]): v, why = 'weak', 'finished without saying so'
    record('SIGKILL during the final evaluation', v, why, texts)

    out = work / 'disk-full'                              # ENOSPC while writing optimizer.pt of checkpoint 8
    rc, first = run(out, {'kind': 'enospc', 'step': 8, 'file': 'optimizer.pt'})
    err = [l for l in first.splitlines() if 'space' in l.lower()]
    tmp_left = list((out / 'checkpoints').glob('.tmp-*')) if (out / 'checkpoints').is_dir() else []
    texts = finish(out, first)
    v, why = judge(out, ref, texts, True)
    if rc == 0: v, why = 'bad', 'the write error was swallowed'
    elif 'Traceback' in first or not err: v, why = 'weak', 'disk full was not reported in one line'
    elif tmp_left: v, why = 'weak', f'left {[p.name for p in tmp_left]} behind'
    record('disk full during a checkpoint write', v, why, texts)

    base = work / 'base'                                  # a run killed after step 9: checkpoints 4 and 8 on disk
    run(base, {'kind': 'kill_at_step', 'step': 9})
    targets = [('checkpoint-00000008/' + f) for f in ck_files]
    cache = next((base / 'data_cache').iterdir(), None) if (base / 'data_cache').is_dir() else None
    if cache is not None: targets += [str(p.relative_to(base)) for p in sorted(cache.rglob('*')) if p.is_file()]
    targets += ['vocab_map.safetensors']
    for rel in targets:
        out = work / ('flip-' + rel.replace('/', '_'))
        shutil.copytree(base, out)
        path = out / ('checkpoints/' + rel if rel.startswith('checkpoint-') else rel)
        if not path.is_file() or not flip_bit(path, rng): continue
        texts = finish(out, '')
        record(f"bit flip in {rel}", *judge(out, ref, texts, True), texts)

    counts = {k: sum(c['verdict'] == k for c in cases) for k in ('good', 'weak', 'bad')}
    doc = {'date': args.date, 'machine': 'CPU (2 cores)', 'reference_steps': len(ref), 'counts': counts, 'cases': cases,
           'seconds': round(time.monotonic() - t0)}
    print(json.dumps(counts))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f'fault-sweep-{args.date}.json').write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == '__main__':
    main()
