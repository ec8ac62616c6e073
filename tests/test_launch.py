"The notebook's multi-GPU path (launch.launch_train) for real: a child `accelerate launch` with 2 processes (gloo on CPU)."
from kd_kaggle.launch import launch_train
from kd_kaggle.train import demo_config

def test_two_process_launch_from_a_notebook_call(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    cfg = demo_config(str(tmp_path/'run'), max_steps=4, log_every=1, eval_every=100, save_every=100, max_train_examples=128,
                      max_eval_examples=8, batch_size=4)
    seen = []
    class Plot:   # stands in for LivePlot: what the notebook would draw
        def __init__(self, enabled=None): pass
        def __enter__(self): return self
        def __exit__(self, *a): pass
        update = lambda self, rec: seen.append(rec)
    monkeypatch.setattr('kd_kaggle.launch.LivePlot', Plot)
    final = launch_train(cfg, 2, poll_s=0.5)
    out = capsys.readouterr().out
    assert 'x2, precision' in out and '4x1x2 sequences' in out and out.count('kd_kaggle: done') == 1   # the child's lines, echoed once
    assert final['student_bpb'] > 0 and 'bpb_gain' in final
    assert [r['step'] for r in seen if 'loss' in r] == [1, 2, 3, 4] and 'eval_student_bpb' in seen[-1]   # plotted from metrics.jsonl

WORKER = '''import signal, sys, time
def stop(*_): open(sys.argv[1], 'a').write('worker saved\\n'); sys.exit(0)
signal.signal(signal.SIGINT, stop); open(sys.argv[1] + '.ready', 'w').close(); time.sleep(60)
'''
LAUNCHER = '''import signal, subprocess, sys
signal.signal(signal.SIGINT, lambda *_: open(sys.argv[1], 'a').write('launcher interrupted\\n'))
sys.exit(subprocess.call([sys.executable, sys.argv[2], sys.argv[1]]))
'''

def test_ctrl_c_goes_to_the_workers_not_the_launcher(tmp_path):
    "The launcher's agent would SIGKILL workers 30 s after its own SIGINT: only the workers get it, and may take their time."
    import subprocess, sys, time
    from kd_kaggle.launch import _interrupt
    (tmp_path/'w.py').write_text(WORKER); (tmp_path/'l.py').write_text(LAUNCHER); log = tmp_path/'log'
    proc = subprocess.Popen([sys.executable, str(tmp_path/'l.py'), str(log), str(tmp_path/'w.py')], start_new_session=True)
    for _ in range(200):
        if (tmp_path/'log.ready').exists(): break
        time.sleep(0.05)
    _interrupt(proc, grace_s=30)
    assert proc.returncode == 0 and log.read_text() == 'worker saved\n'
