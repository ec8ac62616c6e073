"Trainer (issue 6): learning, exact resume after SIGKILL, quiet console, and one clear error per bad input."
import json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest, torch
from kd_kaggle.config import KDConfig
from kd_kaggle.train import train, demo_config

REPO = Path(__file__).resolve().parents[1]

def _losses(run_dir):
    recs = [json.loads(l) for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines() if l.strip()]
    return {r['step']: r['loss'] for r in recs if 'loss' in r}

def test_demo_distillation_lowers_heldout_bpb(tmp_path):
    "The full default recipe (router + curriculum) on the embedded pair: held-out student bpb goes down."
    m = train(demo_config(tmp_path/'run', max_steps=200, eval_every=100, save_every=200, max_train_examples=1600))
    assert m['student_bpb'] < m['student_bpb_before'] - 0.3, m
    assert m['teacher_bpb'] < m['student_bpb']
    assert (tmp_path/'run'/'report.md').is_file() and json.loads((tmp_path/'run'/'report.json').read_text())
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path/'run'/'student')     # the student loads with plain transformers

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    out, kill_at, kill_in_save = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import kd_kaggle.checkpoint as ck
    if kill_in_save:
        real_save = ck.torch.save
        def dying_save(obj, path, *a, **k):   # die after the optimizer file of checkpoint `kill_in_save` is written
            real_save(obj, path, *a, **k)
            if f"checkpoint-{kill_in_save:08d}" in str(path) and str(path).endswith('optimizer.pt'): os.kill(os.getpid(), signal.SIGKILL)
        ck.torch.save = dying_save
    if kill_at:
        import kd_kaggle.checkpoint as c2
        real_write = c2.RunLog.write
        def write(self, rec):
            real_write(self, rec)
            if rec.get('step') == kill_at and 'loss' in rec: os.kill(os.getpid(), signal.SIGKILL)
        c2.RunLog.write = write
    from kd_kaggle.train import train, demo_config
    from kd_kaggle.config import router_curriculum   # the router's weights, optimizer group and hooks must resume exactly too
    train(demo_config(out, max_steps=24, log_every=1, eval_every=12, save_every=5, max_train_examples=400, batch_size=8,
                      curriculum=router_curriculum()))
''')

def _run(out, kill_at=0, kill_in_save=0):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONHASHSEED': '0'}
    return subprocess.run([sys.executable, '-c', SCRIPT, str(out), str(kill_at), str(kill_in_save)], env=env,
                          capture_output=True, text=True, timeout=600)

def test_sigkill_then_resume_continues_exactly(tmp_path):
    "Kill at a random step and again mid-checkpoint-write; the resumed loss sequence equals an uninterrupted run (bit-equal on CPU)."
    ref = _run(tmp_path/'ref'); assert ref.returncode == 0, ref.stderr[-2000:]
    kill_at = int(torch.randint(6, 20, (1,)))
    r1 = _run(tmp_path/'cut', kill_at=kill_at); assert r1.returncode == -signal.SIGKILL
    r2 = _run(tmp_path/'cut', kill_in_save=20); assert r2.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (tmp_path/'cut'/'checkpoints').iterdir())
    assert 'checkpoint-00000015' in ckpts and 'checkpoint-00000020' not in ckpts   # the previous checkpoint survived the kill
    r3 = _run(tmp_path/'cut'); assert r3.returncode == 0, r3.stderr[-2000:]
    assert 'resumed from' in r3.stdout and 'router' in r3.stdout
    want, got = _losses(tmp_path/'ref'), _losses(tmp_path/'cut')
    assert sorted(got) == sorted(want) == list(range(1, 25))
    assert got == want, {s: (want[s], got[s]) for s in want if want[s] != got[s]}

def test_console_stays_within_print_budget(tmp_path, capsys):
    "Header + one line per print_every + the final line; evaluation prints nothing per batch."
    seen = []
    train(demo_config(tmp_path/'run', max_steps=60, print_every=20, eval_every=10, max_train_examples=400, max_eval_examples=32, batch_size=8),
          callback=seen.append)
    assert seen[-1]['step'] == 60 and 'eval_student_bpb' in seen[-1]   # the callback (live plot) also gets the final evaluation
    assert sum('eval_student_bpb' in r for r in seen) == 5 + 1   # steps 10..50, then the final one at 60
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert len(lines) <= 3 + 60 // 20 + 1, lines   # header (3 with a router), one per print_every, final
    assert sum(l.startswith('step ') for l in lines) == 3

def _cfg(tmp_path, **kw):
    kw = {'output_dir': str(tmp_path/'run'), 'max_steps': 2, 'max_train_examples': 64, 'max_eval_examples': 8, 'batch_size': 4, **kw}
    return demo_config(**kw)

BAD_INPUTS = {
    'empty dataset':            (lambda t: _cfg(t, data=str(_write(t/'empty.txt', '\n\n'))), ValueError, 'gave no training examples'),
    'missing data file':        (lambda t: _cfg(t, data=str(t/'nope.jsonl')), FileNotFoundError, 'KDConfig.data'),
    'bad jsonl line':           (lambda t: _cfg(t, data=str(_write(t/'bad.jsonl', '{"prompt": "a", "output": "b"}\n{oops\n'))), ValueError, 'bad.jsonl:2'),
    'missing teacher path':     (lambda t: _cfg(t, teacher=str(t/'no_teacher')), FileNotFoundError, 'KDConfig.teacher'),
    'student hub id offline':   (lambda t: _cfg(t, student='HuggingFaceTB/SmolLM2-135M'), FileNotFoundError, 'HF_HUB_OFFLINE'),
    'seq_len beyond positions': (lambda t: _cfg(t, seq_len=1_000_000), ValueError, "max_position_embeddings"),
    'top_k beyond vocab':       (lambda t: _cfg(t, top_k=100_000), ValueError, 'larger than the student vocabulary'),
    'fp16 without a GPU':       (lambda t: _cfg(t, precision='fp16'), ValueError, 'needs a GPU'),
    'unwritable output dir':    (lambda t: _cfg(t, output_dir=str(_write(t/'a_file', 'x')/'run')), PermissionError, 'not writable'),
    'no held-out examples':     (lambda t: _cfg(t, data=str(_write(t/'one.txt', 'Only one paragraph here.')), eval_fraction=0.0), ValueError, 'no held-out examples'),
    'fresh run over old checkpoints': (lambda t: (train(_cfg(t, resume=None)), _cfg(t, resume=None))[1], ValueError, 'already holds checkpoints'),
    'unsupported data file':    (lambda t: _cfg(t, data=str(_write(t/'rows.csv', 'a,b\n1,2\n'))), ValueError, 'unsupported file type'),
    'resume from missing dir':  (lambda t: _cfg(t, resume=str(t/'no_ckpt')), FileNotFoundError, 'KDConfig.resume'),
}

def _write(path, text):
    path.write_text(text); return path

@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_gives_one_clear_error(tmp_path, name):
    make, exc, msg = BAD_INPUTS[name]
    if name == 'fp16 without a GPU' and torch.cuda.is_available(): pytest.skip('a GPU is present')
    with pytest.raises(exc, match=msg): train(make(tmp_path))

def test_disk_nearly_full(tmp_path, monkeypatch):
    import kd_kaggle.guards as guards
    monkeypatch.setattr(guards, 'free_disk_gib', lambda p: 0.2)
    with pytest.raises(OSError, match='GiB free'): train(_cfg(tmp_path))

def test_corrupt_checkpoint_and_mismatched_resume(tmp_path):
    train(_cfg(tmp_path, save_every=1))
    ckpts = sorted((tmp_path/'run'/'checkpoints').iterdir())
    (ckpts[-1]/'trainer_state.json').write_text('{"state": ')
    with pytest.raises(ValueError, match='corrupt'): train(_cfg(tmp_path, resume=str(ckpts[-1])))
    with pytest.raises(ValueError, match='seq_len: checkpoint 128 vs now 64'): train(_cfg(tmp_path, resume=str(ckpts[0]), seq_len=64))
    meta = json.loads((ckpts[0]/'trainer_state.json').read_text()); meta['num_processes'] = 2     # saved by a 2-GPU run
    (ckpts[0]/'trainer_state.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='keep the global batch the same, e.g. grad_accum=2'): train(_cfg(tmp_path, resume=str(ckpts[0])))

def test_nonfinite_losses_are_skipped_then_abort(tmp_path, monkeypatch):
    "A NaN loss skips the step (counted); max_bad_steps in a row aborts with a clear message."
    import kd_kaggle.train as tr
    real = tr.Distiller.forward
    def nan_forward(self, batch, weights, **kw):
        loss, parts = real(self, batch, weights, **kw)
        return loss * float('nan'), parts
    monkeypatch.setattr(tr.Distiller, 'forward', nan_forward)
    with pytest.raises(FloatingPointError, match='3 non-finite losses in a row'): train(_cfg(tmp_path, max_bad_steps=3, max_steps=5))

DDP_SCRIPT = textwrap.dedent('''
    import sys
    from kd_kaggle.train import train, demo_config
    out, bs = sys.argv[1], int(sys.argv[2])
    train(demo_config(out, max_steps=8, log_every=1, eval_every=100, save_every=4, max_train_examples=256, max_eval_examples=8, batch_size=bs))
''')

def test_two_process_ddp_matches_single_process(tmp_path):
    "accelerate launch with 2 CPU processes (gloo) at per-process batch 4 tracks 1 process at batch 8 (same global batch)."
    import random
    script = tmp_path/'run.py'; script.write_text(DDP_SCRIPT)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    one = subprocess.run([sys.executable, str(script), str(tmp_path/'one'), '8'], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    # accelerate 1.x launches multi-process CPU jobs only through mpirun with --cpu; --multi_gpu on a machine without
    # GPUs uses torchrun, and the Accelerator (cpu=True) then runs DDP over gloo.
    two = subprocess.run([sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                          '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(random.randint(20000, 40000)),
                          str(script), str(tmp_path/'two'), '4'], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert '4x1x2 sequences' in two.stdout and two.stdout.count('kd_kaggle: done') == 1   # 2 processes, one console
    a, b = _losses(tmp_path/'one'), _losses(tmp_path/'two')
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a: assert abs(a[s] - b[s]) / a[s] < 0.02, (s, a[s], b[s])
    assert a[8] < a[1] - 0.5 and b[8] < b[1] - 0.5
    # the 2-process run's step-4 checkpoint continues in ONE process at the same global batch (4 x grad_accum 2)
    resume = textwrap.dedent('''
        import sys
        from kd_kaggle.train import train, demo_config
        train(demo_config(sys.argv[1], max_steps=8, log_every=1, eval_every=100, save_every=100, max_train_examples=256,
                          max_eval_examples=8, batch_size=4, grad_accum=2, resume=sys.argv[2]))
    ''')
    one_gpu = subprocess.run([sys.executable, '-c', resume, str(tmp_path/'three'), str(tmp_path/'two'/'checkpoints'/'checkpoint-00000004')],
                             env=env, capture_output=True, text=True, timeout=600)
    assert one_gpu.returncode == 0, one_gpu.stderr[-3000:]
    c = _losses(tmp_path/'three')
    assert sorted(c) == list(range(1, 9)) and all(c[s] == b[s] for s in range(1, 5))   # history up to the checkpoint kept
    for s in range(5, 9): assert abs(c[s] - b[s]) / b[s] < 0.02, (s, b[s], c[s])

def test_budget_stop_saves_everything_and_next_session_resumes(tmp_path, monkeypatch, capsys):
    "When the budget says stop: final eval, checkpoint, student and report are written; the next call continues to the end."
    import kd_kaggle.checkpoint as ck
    calls = {'n': 0}
    def should_stop(self):
        calls['n'] += 1; return calls['n'] >= 7
    monkeypatch.setattr(ck.Budget, 'should_stop', should_stop)
    cfg = _cfg(tmp_path, max_steps=20, save_every=100, eval_every=100)
    m = train(cfg)
    run = tmp_path/'run'
    assert (run/'checkpoints'/'checkpoint-00000007').is_dir() and (run/'student'/'config.json').is_file() and (run/'report.md').is_file()
    assert 'budget at step 7' in capsys.readouterr().out and m['student_bpb'] > 0
    monkeypatch.undo()
    train(cfg)
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'done at step 20' in out
    train(_cfg(tmp_path, max_steps=24, save_every=100, eval_every=100))     # a finished run given more steps continues
    assert 'done at step 24' in capsys.readouterr().out
    assert sorted(_losses(run)) == [10, 20, 24]   # log_every=10 plus the last step; nothing logged twice across sessions

def test_training_from_the_teacher_cache(tmp_path):
    "cache-teacher once, then train with no teacher in memory: the student learns and the report has the teacher's bpb."
    from kd_kaggle.cache import cache_teacher
    no_router = {'ce': 1.0, 'kd': 1.0}   # terms not listed are off
    cfg = _cfg(tmp_path, top_k=32, curriculum=no_router, max_steps=30, max_train_examples=128, teacher_cache=str(tmp_path/'cache'))
    summary = cache_teacher(cfg)
    assert summary['complete']
    m = train(cfg)
    assert m['student_bpb'] < m['student_bpb_before'] and 0 < m['teacher_bpb'] < m['student_bpb']
    import kd_kaggle.train as tr
    from kd_kaggle.config import router_curriculum
    with pytest.raises(ValueError, match="router terms"):   # the cache stores no hidden states for the router
        train(_cfg(tmp_path, top_k=32, teacher_cache=str(tmp_path/'cache'), output_dir=str(tmp_path/'run2'), curriculum=router_curriculum()))

def _student_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir)/'student'/'model.safetensors'))

def test_step_is_token_weighted_whatever_the_micro_batching(tmp_path):
    "Batch 8 x accumulation 1 and batch 4 x accumulation 2 (micro-batches of unequal token counts) take the same steps."
    kw = dict(max_steps=3, log_every=1, eval_every=100, save_every=100, max_train_examples=64, curriculum={'ce': 1.0, 'kd': 1.0})
    train(demo_config(tmp_path/'one', batch_size=8, grad_accum=1, **kw))
    train(demo_config(tmp_path/'two', batch_size=4, grad_accum=2, **kw))
    a, b = _losses(tmp_path/'one'), _losses(tmp_path/'two')
    assert sorted(a) == [1, 2, 3] and all(abs(a[s] - b[s]) < 1e-5 * abs(a[s]) for s in a), (a, b)
    wa, wb = _student_weights(tmp_path/'one'), _student_weights(tmp_path/'two')
    worst = max(((wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-12)).item() for k in wa)
    assert worst < 1e-5, worst

def test_lr_schedule_waits_on_steps_the_scaler_skipped(tmp_path, monkeypatch):
    "An fp16 step GradScaler skipped (overflow) does not advance the lr schedule: warmup is not eaten by overflow steps."
    import accelerate
    monkeypatch.setattr(accelerate.Accelerator, 'optimizer_step_was_skipped', property(lambda self: True))
    train(_cfg(tmp_path, max_steps=4, log_every=1, warmup_ratio=0.5, save_every=100, eval_every=100))
    recs = [json.loads(l) for l in (tmp_path/'run'/'metrics.jsonl').read_text().splitlines() if '"lr"' in l]
    assert [r['lr'] for r in recs] == [0.0] * 4, [r['lr'] for r in recs]   # still at the start of warmup

def test_failing_final_eval_keeps_student_and_checkpoint(tmp_path, monkeypatch, capsys):
    "An exception in the final evaluation (e.g. an OOM in the teacher pass) costs neither the student nor the checkpoint."
    import kd_kaggle.train as tr
    real, calls = tr._evaluate, {'n': 0}
    def evaluate_then_fail(*a, **k):
        calls['n'] += 1
        if calls['n'] > 1: raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return real(*a, **k)
    monkeypatch.setattr(tr, '_evaluate', evaluate_then_fail)
    m = train(_cfg(tmp_path, max_steps=3, save_every=100, eval_every=100))
    run = tmp_path/'run'
    assert (run/'student'/'model.safetensors').is_file() and (run/'checkpoints'/'checkpoint-00000003').is_dir()
    assert 'OutOfMemoryError' in m['error'] and (run/'report.md').is_file()
    assert 'final evaluation failed' in capsys.readouterr().out

def test_resume_finds_a_run_saved_as_a_kaggle_dataset(tmp_path, capsys):
    "Next session on Kaggle: the old output is attached read-only under /kaggle/input/<name>/ with the run folder nested."
    train(_cfg(tmp_path, max_steps=4, save_every=2, eval_every=100, output_dir=str(tmp_path/'working'/'kd_run')))
    attached = tmp_path/'input'/'my-kd-output'/'kd_run'
    shutil.copytree(tmp_path/'working'/'kd_run', attached)
    for p in attached.rglob('*'): p.chmod(0o555 if p.is_dir() else 0o444)   # /kaggle/input is read-only
    capsys.readouterr()
    cfg = _cfg(tmp_path, max_steps=6, save_every=2, eval_every=100, output_dir=str(tmp_path/'next'/'kd_run'),
               resume_dirs=[str(tmp_path/'input'/'my-kd-output')])
    train(cfg)
    out = capsys.readouterr().out
    assert f"resumed from {attached/'checkpoints'/'checkpoint-00000004'} at step 4" in out and 'done at step 6' in out
    assert sorted(_losses(tmp_path/'next'/'kd_run'))[-1] == 6

def test_resume_dirs_that_do_not_exist_or_hold_nothing(tmp_path, capsys):
    "A missing resume_dirs entry is one clear error; an entry with no checkpoint is a loud warning, not a silent restart."
    with pytest.raises(FileNotFoundError, match=r"resume_dirs: .*nope.* does not exist"):
        train(_cfg(tmp_path, resume_dirs=[str(tmp_path/'nope')]))
    (tmp_path/'empty').mkdir()
    train(_cfg(tmp_path, resume_dirs=[str(tmp_path/'empty')], eval_every=100, save_every=100))
    assert 'WARNING: resume=\'auto\' found no valid checkpoint' in capsys.readouterr().out

def test_second_run_into_the_same_folder_is_refused(tmp_path):
    "A run holds a lock on its output folder: a second one started there stops at once instead of interleaving files."
    from kd_kaggle.train import lock_run_dir
    (tmp_path/'run').mkdir()
    held = lock_run_dir(tmp_path/'run')
    with pytest.raises(RuntimeError, match='is in use by another run'): train(_cfg(tmp_path))
    held.close()
    train(_cfg(tmp_path, eval_every=100, save_every=100))          # free again: runs

def test_resume_refuses_a_changed_loss_unless_asked(tmp_path, capsys):
    "Resuming with another divergence/temperature/top-k/kd_positions/curriculum is refused; allow_resume_changes says so."
    train(_cfg(tmp_path, max_steps=2, save_every=2, eval_every=100))
    for change in (dict(temperature=2.0), dict(divergence='rkl'), dict(kd_positions='boundary'), dict(curriculum={'ce': 1.0})):
        with pytest.raises(ValueError, match='the loss differs in ' + next(iter(change))):
            train(_cfg(tmp_path, max_steps=4, save_every=2, eval_every=100, **change))
    train(_cfg(tmp_path, max_steps=4, save_every=2, eval_every=100, temperature=2.0, allow_resume_changes=True))
    assert "resuming with a changed loss (allow_resume_changes): temperature: checkpoint 1.0 vs now 2.0" in capsys.readouterr().out

def test_resume_from_another_run_into_a_folder_with_its_own_checkpoints(tmp_path):
    "--resume <checkpoint of run A> with output_dir = run B that has checkpoints would replace B's metrics: refused."
    train(_cfg(tmp_path, max_steps=2, save_every=2, eval_every=100, output_dir=str(tmp_path/'a')))
    train(_cfg(tmp_path, max_steps=2, save_every=2, eval_every=100, output_dir=str(tmp_path/'b')))
    before = (tmp_path/'b'/'metrics.jsonl').read_text()
    with pytest.raises(ValueError, match='is a checkpoint of another run'):
        train(_cfg(tmp_path, max_steps=4, output_dir=str(tmp_path/'b'), resume=str(tmp_path/'a'/'checkpoints'/'checkpoint-00000002')))
    assert (tmp_path/'b'/'metrics.jsonl').read_text() == before

def test_ctrl_c_saves_a_checkpoint_and_the_next_run_continues(tmp_path, monkeypatch, capsys):
    "The first Ctrl-C stops after the current step with a checkpoint (no final eval); resume='auto' continues from it."
    import kd_kaggle.checkpoint as ck
    real_write = ck.RunLog.write
    def write(self, rec):
        real_write(self, rec)
        if rec.get('step') == 3 and 'loss' in rec: os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(ck.RunLog, 'write', write)
    cfg = _cfg(tmp_path, max_steps=6, log_every=1, save_every=100, eval_every=100)
    with pytest.raises(KeyboardInterrupt): train(cfg)
    assert (tmp_path/'run'/'checkpoints'/'checkpoint-00000003').is_dir() and not (tmp_path/'run'/'student').exists()
    assert 'interrupted at step 3' in capsys.readouterr().out
    monkeypatch.undo()
    train(cfg)
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'at step 3' in out and 'done at step 6' in out

def test_a_kill_during_the_final_evaluation_is_finished_by_the_next_run(tmp_path, monkeypatch, capsys):
    "Killed after the final checkpoint but before its evaluation: the next run does not say 'finished', it finishes."
    import kd_kaggle.train as tr
    real, calls = tr._evaluate, {'n': 0}
    def evaluate_then_die(*a, **k):
        calls['n'] += 1
        if calls['n'] > 1: raise KeyboardInterrupt   # not an Exception: as a kill would, it skips the failure handling
        return real(*a, **k)
    monkeypatch.setattr(tr, '_evaluate', evaluate_then_die)
    with pytest.raises(KeyboardInterrupt): train(_cfg(tmp_path, max_steps=3, save_every=100, eval_every=100))
    monkeypatch.undo()
    m = train(_cfg(tmp_path, max_steps=3, save_every=100, eval_every=100))
    assert 'before its final evaluation completed: finishing it' in capsys.readouterr().out and m['student_bpb'] > 0
    m2 = train(_cfg(tmp_path, max_steps=3, save_every=100, eval_every=100))
    assert 'already finished at step 3' in capsys.readouterr().out and m2['student_bpb'] == m['student_bpb']

def test_resume_refuses_to_add_or_drop_the_router_even_when_asked(tmp_path):
    "The router's weights and optimizer state cannot appear or vanish mid-run: refused up front, not as a 'damaged' checkpoint."
    from kd_kaggle.config import router_curriculum
    train(_cfg(tmp_path, max_steps=2, save_every=2, eval_every=100))
    with pytest.raises(ValueError, match='trained without the router'):
        train(_cfg(tmp_path, max_steps=4, save_every=2, eval_every=100, curriculum=router_curriculum(), allow_resume_changes=True))
