"Foundation: sync checks really fail, bad config values and a simulated GPU/torch mismatch give clear errors."
import json, shutil, subprocess, sys
from pathlib import Path
import pytest
from kd_kaggle.config import KDConfig, load_config, save_config
from kd_kaggle.env import DeviceInfo, checks_exit_code, choose_precision, doctor, gpu_mismatch_message

REPO = Path(__file__).resolve().parents[1]

def _copy_repo(dst: Path) -> Path:
    for name in ('nbs', 'kd_kaggle', '.ci'):
        shutil.copytree(REPO/name, dst/name, ignore=shutil.ignore_patterns('__pycache__', 'demo_assets'))
    for name in ('pyproject.toml', 'README.md', 'setup.py'): shutil.copy(REPO/name, dst/name)
    return dst

def _sync(repo):
    return subprocess.run([sys.executable, '.ci/check_sync.py'], cwd=repo, capture_output=True, text=True)

def test_sync_check_passes_then_fails_on_drift(tmp_path):
    repo = _copy_repo(tmp_path)
    r = _sync(repo); assert r.returncode == 0, r.stdout + r.stderr
    lib = repo/'kd_kaggle'/'config.py'
    lib.write_text(lib.read_text() + '\nHAND_EDIT = 1\n')
    r = _sync(repo)
    assert r.returncode == 1 and 'out of sync' in r.stdout and 'kd_kaggle/config.py' in r.stdout

def test_sync_check_fails_on_unclean_notebook(tmp_path):
    repo = _copy_repo(tmp_path)
    nb_path = repo/'nbs'/'00_config.ipynb'
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb['cells'] if c['cell_type'] == 'code')
    code['outputs'] = [{'output_type': 'stream', 'name': 'stdout', 'text': ['left over\n']}]
    code['execution_count'] = 7
    nb_path.write_text(json.dumps(nb, indent=1))
    r = _sync(repo)
    assert r.returncode == 1 and 'not clean' in r.stdout

@pytest.mark.parametrize('kwargs,field', [
    (dict(lr=-1e-4), 'lr'), (dict(seq_len=0), 'seq_len'), (dict(divergence='kl'), 'divergence'),
    (dict(top_k=0), 'top_k'), (dict(time_budget='20s'), 'time_budget'), (dict(batch_size=0), 'batch_size'),
    (dict(precision='int8'), 'precision'), (dict(curriculum={'kd': {'kind': 'exp'}}), 'curriculum'),
    (dict(temperature=0), 'temperature'), (dict(time_budget='tomorrow'), 'time_budget'),
])
def test_bad_config_value_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as e: KDConfig(**kwargs)
    assert f'{field}' in str(e.value) and 'e.g.' in str(e.value)

def test_config_roundtrip_and_unknown_key(tmp_path):
    c = KDConfig(batch_size=4, time_budget='2h', curriculum={'kd': 0.7, 'feat': {'kind': 'linear', 'start': 0.1, 'end': 0}})
    assert load_config(save_config(c, tmp_path/'c.yaml')) == c
    (tmp_path/'typo.json').write_text('{"batchsize": 4}')
    with pytest.raises(ValueError, match="unknown config keys \\['batchsize'\\]"): load_config(tmp_path/'typo.json')

def test_simulated_p100_with_new_torch_is_one_clear_error():
    p100 = DeviceInfo('cuda', 'Tesla P100-PCIE-16GB', 1, (6, 0), 16.0, '2.9.0+cu128', '12.8',
                      ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120'])
    msg = gpu_mismatch_message(p100)
    assert 'sm_60' in msg and 'no kernel image' in msg and 'cu126' in msg
    checks = doctor('.', info=p100, check_network=False)
    assert checks_exit_code(checks) == 1 and [c.name for c in checks if c.status == 'fail'] == ['kernels']
    assert choose_precision('auto', p100).mixed == 'fp16'

def test_no_gpu_with_fp16_requested():
    with pytest.raises(ValueError, match='needs a GPU'): choose_precision('fp16', DeviceInfo('cpu'))
