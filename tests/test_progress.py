"Progress bars: bounded in logs, within the terminal width, no widgets in notebooks, main process only; the ETA warning."
import io, sys
import pytest
from tqdm import tqdm
import kd_kaggle.progress as pg
from kd_kaggle.progress import progress_bar, LogBar, NotebookBar

class FakeTTY(io.StringIO):
    def isatty(self): return True

def _run(bar, n):
    with bar:
        for _ in range(n): bar.update()

def test_log_stream_gets_few_lines(monkeypatch):
    "1,000 updates into a non-tty stream: a handful of whole lines, even when the phase is slow."
    s = io.StringIO(); _run(progress_bar(1000, 'data', 'text', is_main=True, file=s), 1000)
    assert isinstance(progress_bar(1, file=io.StringIO()), LogBar) and '\r' not in s.getvalue()
    assert 1 <= len(s.getvalue().splitlines()) <= 6
    s = io.StringIO(); _run(progress_bar(1000, 'slow', is_main=True, file=s, quiet_s=0), 1000)
    assert 4 <= len(s.getvalue().splitlines()) <= 6, s.getvalue()

def test_narrow_terminal(monkeypatch):
    "On an 80-column terminal no drawn line is wider than the terminal."
    monkeypatch.setenv('COLUMNS', '80')
    s = FakeTTY(); bar = progress_bar(1000, 'train', 'step', is_main=True, file=s, mininterval=0)
    assert type(bar) is tqdm
    with bar:
        for _ in range(1000): bar.set_postfix(loss='2.345', refresh=False); bar.update()
    lines = [l for chunk in s.getvalue().split('\n') for l in chunk.split('\r') if l.strip()]
    assert lines and max(map(len, lines)) <= 80

def test_notebook_uses_no_widgets(monkeypatch):
    "In a notebook kernel the bar is a text display output, never tqdm.notebook's widget."
    from tqdm.notebook import tqdm_notebook
    shown = []
    monkeypatch.setattr(pg, 'in_notebook', lambda: True)
    monkeypatch.setattr(NotebookBar, 'display', lambda self, msg=None, pos=None: shown.append(str(self)) or True)
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    bar = progress_bar(10, 'eval', 'batch', is_main=True)
    assert isinstance(bar, NotebookBar) and not isinstance(bar, tqdm_notebook)
    _run(bar, 10)
    assert shown and 'eval' in shown[-1] and sys.stderr.getvalue() == ''

def test_only_main_process_shows_bars(monkeypatch):
    s = io.StringIO(); monkeypatch.setenv('RANK', '1')
    _run(progress_bar(8, 'x', file=s, quiet_s=0), 8)
    assert s.getvalue() == ''
    monkeypatch.setenv('RANK', '0'); _run(progress_bar(8, 'x', file=s, quiet_s=0), 8)
    assert s.getvalue()

def test_phases_show_progress_on_main_only(tmp_path, monkeypatch, capsys):
    "build_datasets, evaluate and cache_teacher each draw a bar on stderr, and none on rank 1."
    from kd_kaggle.cache import cache_teacher
    from kd_kaggle.train import demo_config
    def phases(out):
        cfg = demo_config(out, max_steps=2, max_train_examples=16, max_eval_examples=8, batch_size=4, top_k=8,
                          curriculum={'ce': 1.0, 'kd': 1.0}, teacher_cache=str(out/'cache'))
        cache_teacher(cfg)
        return capsys.readouterr().err
    err = phases(tmp_path/'a')
    assert all(f'{d}:' in err for d in ('data', 'eval', 'teacher cache')), err
    monkeypatch.setenv('RANK', '1')
    err = phases(tmp_path/'b')
    assert not any(f'{d}:' in err for d in ('data', 'eval', 'teacher cache')), err

def test_eta_warning_once(tmp_path, monkeypatch, capsys):
    "A budget too small for max_steps at the measured speed: one warning line; a roomy budget: none."
    import kd_kaggle.checkpoint as ck
    from kd_kaggle.train import train, demo_config
    cfg = lambda d: demo_config(tmp_path/d, max_steps=16, max_train_examples=64, max_eval_examples=8, batch_size=4,
                                eval_every=100, save_every=100)
    train(cfg('roomy'))
    assert 'warning: at the current speed' not in capsys.readouterr().out
    record = ck.Budget.record
    def slow(self, what, seconds): record(self, what, 300.0 if what == 'step' else seconds)   # 300 s a step, 30m budget
    monkeypatch.setattr(ck.Budget, 'record', slow)
    monkeypatch.setattr(ck.Budget, 'should_stop', lambda self: False)
    train(cfg('tight'))
    out = capsys.readouterr().out
    assert out.count('warning: at the current speed') == 1 and 'raise time_budget or lower max_steps' in out, out
