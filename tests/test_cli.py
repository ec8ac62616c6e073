"CLI and Kaggle notebook (issue 8): the demo as a subprocess, one-line errors, the notebook top to bottom in demo mode."
import json, os, subprocess, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}

def kd(*args, cwd=None, timeout=600):
    exe = Path(sys.executable).parent/'kd-kaggle'   # the console script a user runs (pip install puts it beside python)
    return subprocess.run([str(exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)

def test_demo_subprocess_prints_headline_and_writes_report(tmp_path):
    r = kd('demo', '--output-dir', str(tmp_path/'demo'), '--max-steps', '60')
    assert r.returncode == 0, r.stderr[-2000:]
    head = [l for l in r.stdout.splitlines() if l.startswith('demo: student bpb')]
    assert len(head) == 1 and 'teacher bpb' in head[0] and 'retention' in head[0] and 'report.md' in head[0]
    before, after = (float(x) for x in head[0].split('student bpb ')[1].split(' |')[0].split(' -> '))
    assert after < before
    rep = json.loads((tmp_path/'demo'/'report.json').read_text())
    assert rep and (tmp_path/'demo'/'report.md').read_text().count('bits per byte') >= 1
    assert len([l for l in r.stdout.splitlines() if l.strip()]) <= 10

@pytest.mark.parametrize('args,needle', [(['train', '--lr', '-1'], 'KDConfig.lr'), (['train', '--seq-len', 'long'], '--seq-len'),
                                         (['train', '--divergence', 'kl'], 'KDConfig.divergence'), (['train', '--nope', '1'], 'unrecognized')])
def test_bad_flag_exits_2_with_one_line(args, needle):
    r = kd(*args, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

def test_help_lists_every_config_field():
    from dataclasses import fields
    from kd_kaggle.config import KDConfig
    out = kd('train', '--help', timeout=120).stdout
    assert all('--' + f.name.replace('_', '-') in out for f in fields(KDConfig))

def test_doctor_and_align_report_json():
    r = kd('doctor', timeout=120); assert r.returncode == 0 and '[ok]   precision' in r.stdout
    tok = REPO/'tests'/'fixtures'/'tokenizers'
    r = kd('align-report', '--teacher', str(tok/'qwen2'), '--student', str(tok/'smollm2'),
           '--text', str(REPO/'tests'/'fixtures'/'text'/'austen_excerpt.txt'), '--json', timeout=120)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats['student_tokens'] > 1000 and stats['boundary_fraction'] > 0.9 and stats['one_to_one_fraction'] > 0.8
    assert stats['vocab_map_size'] == 39237

def test_kaggle_notebook_runs_top_to_bottom_in_demo_mode(tmp_path):
    nbformat = pytest.importorskip('nbformat'); nbclient = pytest.importorskip('nbclient')
    nb = nbformat.read(REPO/'kaggle'/'kd_kaggle_distill.ipynb', as_version=4)
    assert 'kaggle' in nb.metadata and all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code')
    os.environ['KD_KAGGLE_DEMO_STEPS'] = '30'
    try: nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    finally: os.environ.pop('KD_KAGGLE_DEMO_STEPS', None)
    assert (tmp_path/'runs'/'kaggle_demo'/'report.md').is_file() and (tmp_path/'runs'/'kaggle_demo'/'student'/'config.json').is_file()
    text = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    assert 'running the embedded demo' in text and 'one_to_one' in text.lower().replace(' ', '_') or '1:1' in text
