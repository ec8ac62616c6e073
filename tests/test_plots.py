"Live plot cadence, report counts from the final state, and no empty figures (issue 18)."
import json, re
import IPython.display as ipd
import pytest
from kd_kaggle.plots import LivePlot, write_report, synthetic_history

class Clock:
    "A clock the test moves by hand."
    def __init__(self): self.t = 0.0
    def __call__(self): return self.t

@pytest.fixture
def shown(monkeypatch):
    "A fake notebook display: records 'display' / 'update' calls instead of showing anything."
    calls = []
    class Handle:
        def update(self, obj): calls.append('update')
    def fake_display(obj, display_id=False): calls.append('display'); return Handle()
    monkeypatch.setattr(ipd, 'display', fake_display)
    return calls

def train_rec(step): return {'step': step, 'loss': 3.0 - step / 1000, 'ce': 2.5, 'kd_raw': 1.0}

def test_liveplot_draws_first_record_and_eval_points(shown):
    lp = LivePlot(enabled=True, clock=Clock())
    lp(train_rec(10))
    assert shown == ['display']                      # the first record shows at once, not ~200 steps in
    lp({'step': 20, 'eval_student_bpb': 2.1, 'eval_teacher_bpb': 1.7})
    assert shown == ['display', 'update'] and lp.data['eval_student_bpb'] == ([20], [2.1])
    lp.close()
    assert shown == ['display', 'update']            # nothing new since: no extra redraw

def test_liveplot_at_most_one_redraw_per_interval(shown):
    clock = Clock()
    lp = LivePlot(interval=5, enabled=True, clock=clock)
    lp.render = lambda: b'\x89PNG'                   # drawing time is the clock's business here, not matplotlib's
    for s in range(1, 101):                          # a burst: 100 records over 9.9 s
        clock.t = s * 0.1; lp(train_rec(10 * s))
    assert shown.count('display') == 1 and lp.draws == 1 + 1   # first record, then once 5 s later
    lp.close()
    assert lp.draws == 3 and not lp.dirty            # close draws the final state

def test_liveplot_silent_outside_notebook(shown):
    lp = LivePlot(enabled=False)
    with lp:
        for r in synthetic_history(steps=100): lp(r)
    assert shown == [] and lp.handle is None

def _md_images(run):
    return re.findall(r'!\[[^\]]*\]\(([^)]+)\)', (run / 'report.md').read_text())

def test_report_counts_come_from_final_state(tmp_path):
    hist = synthetic_history(steps=300, eval_every=100)   # last record: step 300
    state = {'step': 307, 'tokens': 307 * 16384, 'train_seconds': 3000.0, 'skipped_steps': 4, 'stop_reason': 'time budget'}
    write_report(tmp_path, hist, {'student_bpb': 1.2}, {}, {'state': state, 'session_s': 600.0, 'budget_s': 7200})
    tr = json.loads((tmp_path / 'report.json').read_text())['training']
    assert (tr['steps'], tr['tokens'], tr['skipped_steps'], tr['elapsed_s']) == (307, 307 * 16384, 4, 3600.0)
    md = (tmp_path / 'report.md').read_text()
    assert '| optimizer steps | 307 |' in md and f'| tokens seen | {307 * 16384:,} |' in md and '1h00m of 2h00m (50 %)' in md

def test_report_without_eval_or_router_has_no_empty_figures(tmp_path):
    hist = [{'step': s, 'loss': 3 - s / 100, 'ce': 2.5 - s / 200, 'kd_raw': 1 - s / 400, 'kd': 1 - s / 400, 'w_ce': 1.0, 'w_kd': 1.0,
             'w_feat': 0.0, 'w_layer': 0.0, 'feat': 0.0, 'lr': 1e-3, 'tok_s': 900.0, 'elapsed_s': 1.0 * s, 'peak_mem_gib': None}
            for s in range(10, 60, 10)]
    (tmp_path / 'eval.png').write_bytes(b'stale')       # from an earlier report of this run
    write_report(tmp_path, hist, {'student_bpb': 2.2}, {}, {'state': {'step': 50, 'tokens': 999, 'train_seconds': 50.0}})
    figs = json.loads((tmp_path / 'report.json').read_text())['figures']
    assert 'eval.png' not in figs and not (tmp_path / 'eval.png').exists()
    assert sorted(_md_images(tmp_path)) == sorted(figs) and all((tmp_path / f).is_file() for f in figs)
