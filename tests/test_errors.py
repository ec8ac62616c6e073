"Issue 19 (bad input): every user-caused error is one line naming the field or file (and line), never a traceback."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
from kd_kaggle.cli import main, COMMANDS
from kd_kaggle.config import KDConfig, load_config
from kd_kaggle.data import build_datasets

REPO = Path(__file__).resolve().parents[1]
TOK = REPO/'tests'/'fixtures'/'tokenizers'
DEMO = REPO/'kd_kaggle'/'demo_assets'

def cli(capsys, *argv):
    "Run `kd-kaggle argv` in-process: (exit code, stdout, stderr)."
    try: code = main([str(a) for a in argv])
    except SystemExit as e: code = e.code
    except KeyboardInterrupt: code = 'uncaught KeyboardInterrupt'   # never let it stop the test session
    out, err = capsys.readouterr()
    return code, out, err

def train(capsys, tmp_path, *extra):
    return cli(capsys, 'train', '--output-dir', tmp_path/'run', '--seq-len', '64', '--max-steps', '2', '--time-budget', '5m', *extra)

def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]

def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode()); return path

# --- bad data rows and files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('content,needle', [
    ('{"text": "fine"}\n[1, 2]\n', 'rows.jsonl:2: a row must be a JSON object'),
    ('{"text": "fine"}\n"just a string"\n', 'rows.jsonl:2: a row must be a JSON object'),
    ('{"text": null}\n', "rows.jsonl:1: field 'text' must be a string, got null"),
    ('{"text": 3.5}\n', "rows.jsonl:1: field 'text' must be a string, got a number"),
    ('{"prompt": 5, "output": "x"}\n', "rows.jsonl:1: field 'prompt' must be a string, got a number"),
    ('{"prompt": "q", "output": null}\n', "rows.jsonl:1: field 'output' must be a string, got null")])
def test_bad_jsonl_row_is_one_line_naming_file_and_line(capsys, tmp_path, content, needle):
    code, _, err = train(capsys, tmp_path, '--data', write(tmp_path/'rows.jsonl', content))
    assert code == 2 and needle in one_line(err) and one_line(err).startswith('kd-kaggle train: error: ')

def test_bad_json_list_row_names_index(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path, '--data', write(tmp_path/'rows.json', '[{"text": "ok"}, {"text": null}]'))
    assert code == 2 and "rows.json[1]: field 'text' must be a string" in one_line(err)

def test_non_utf8_data_names_file_and_line(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path, '--data', write(tmp_path/'latin.txt', b'first paragraph\n\nsecond caf\xe9\n'))
    assert code == 2 and 'latin.txt:3: not UTF-8 text (byte 0xe9)' in one_line(err)

def test_non_utf8_jsonl_names_file_and_line(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path, '--data', write(tmp_path/'rows.jsonl', b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    assert code == 2 and 'rows.jsonl:2: not UTF-8 text' in one_line(err)

def test_align_report_bad_rows_are_one_line(capsys, tmp_path):
    code, _, err = cli(capsys, 'align-report', '--teacher', TOK/'qwen2', '--student', TOK/'smollm2',
                       '--text', write(tmp_path/'rows.jsonl', '{"text": null}\n'))
    assert code == 2 and "rows.jsonl:1: field 'text' must be a string" in one_line(err)

# --- config files ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,content,needle', [('bad.yaml', 'lr: [1, 2\nseq_len: :\n', 'bad.yaml:2: not valid YAML'),
                                                 ('bad.json', '{"lr": 0.1,\n}', 'bad.json:2: not valid JSON'),
                                                 ('bin.yaml', b'lr: 0.1\nname: \xff\n', 'bin.yaml:2: not UTF-8')])
def test_malformed_config_file_is_one_line(capsys, tmp_path, name, content, needle):
    code, _, err = train(capsys, tmp_path, '--config', write(tmp_path/name, content))
    assert code == 2 and needle in one_line(err)

def test_allow_resume_changes_field_and_flag(capsys):
    assert KDConfig().allow_resume_changes is False
    code, out, _ = cli(capsys, 'train', '--help')
    assert code == 0 and '--allow-resume-changes' in out
    from kd_kaggle.cli import build_parser
    from kd_kaggle.config import config_from_args
    args = build_parser().parse_args(['train', '--allow-resume-changes', 'true'])
    assert config_from_args(args).allow_resume_changes is True
    with pytest.raises(ValueError, match='allow_resume_changes'): KDConfig(allow_resume_changes='yes')

# --- errors that named the wrong thing ---------------------------------------------------------------------------------------

def test_missing_eval_data_names_eval_data(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path, '--eval-data', tmp_path/'missing.txt')
    assert code == 2 and f"KDConfig.eval_data='{tmp_path/'missing.txt'}'" in one_line(err) and 'KDConfig.data=' not in err

def test_text_shorter_than_one_sequence_says_what_helps(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path, '--data', write(tmp_path/'short.txt', 'Only a short paragraph.\n'))
    line = one_line(err)
    assert code == 2 and 'KDConfig.data=' in line and 'eval_data' in line and 'seq_len' in line and 'eval_fraction' not in line

def test_teacher_folder_without_tokenizer_names_the_folder(capsys, tmp_path):
    teacher = tmp_path/'teacher'; teacher.mkdir()
    for f in ('config.json', 'model.safetensors'): shutil.copy(DEMO/'teacher'/f, teacher)
    code, _, err = train(capsys, tmp_path, '--teacher', teacher)
    line = one_line(err)
    assert code == 2 and str(teacher) in line and 'no tokenizer files' in line and 'COMPLETE' not in line

def test_student_vocab_smaller_than_tokenizer(capsys, tmp_path):
    student = tmp_path/'student'; shutil.copytree(DEMO/'student', student)
    cfg = json.loads((student/'config.json').read_text()); cfg['vocab_size'] = 100
    (student/'config.json').write_text(json.dumps(cfg))
    code, _, err = train(capsys, tmp_path, '--student', student)
    line = one_line(err)
    assert code == 2 and 'KDConfig.student=' in line and 'vocab_size=100 is smaller than its tokenizer (2048 tokens)' in line

def test_unspellable_data_names_the_cause(tmp_path):
    tq, ts = (pytest.importorskip('kd_kaggle.align').load_tokenizer(TOK/n) for n in ('qwen2', 'smollm2'))
    bad, good = write(tmp_path/'bad.txt', '\x04\x06 \x13\x14\n'), write(tmp_path/'good.txt', 'A fine held-out paragraph.\n')
    with pytest.raises(ValueError) as e: build_datasets(KDConfig(data=str(bad), eval_data=str(good), output_dir=str(tmp_path)), tq, ts)
    msg = str(e.value)
    assert 'KDConfig.data=' in msg and 'all 1 rows were dropped' in msg and 'cannot spell' in msg and 'COMPLETE' not in msg
    assert '\n' not in msg and not list((tmp_path/'data_cache').glob('.tmp-*'))   # no half-written cache left behind

# --- silent acceptance: dropped rows and a damaged cache --------------------------------------------------------------------

@pytest.fixture
def dropping_rows(tmp_path):
    rows = [{'prompt': f'Q{i}: say hello\n', 'output': 'hello there'} for i in range(10)] + [{'prompt': 'Q: bad\n', 'output': 'x \x04 y'}] * 2
    return write(tmp_path/'rows.jsonl', '\n'.join(json.dumps(r) for r in rows))

def test_dropped_rows_reach_the_console_also_from_cache(tmp_path, dropping_rows, capsys):
    from kd_kaggle.align import load_tokenizer
    tq, ts = load_tokenizer(TOK/'qwen2'), load_tokenizer(TOK/'smollm2')
    cfg = KDConfig(data=str(dropping_rows), seq_len=64, eval_fraction=0.2, output_dir=str(tmp_path))
    build_datasets(cfg, tq, ts)
    first = one_line(capsys.readouterr().out)
    assert first.startswith('kd_kaggle: data: dropped 2 of 12 rows (2 with bytes a tokenizer cannot spell)'), first
    meta = json.loads(next((tmp_path/'data_cache').glob('*/COMPLETE')).read_text())
    assert meta['dropped']['unspellable'] == 2 and meta['dropped']['rows'] == 12
    build_datasets(cfg, tq, ts)                       # cached: the same line again
    assert one_line(capsys.readouterr().out) == first

def test_damaged_cache_is_rebuilt_with_one_message(tmp_path, dropping_rows):
    from kd_kaggle.align import load_tokenizer
    from kd_kaggle.data import cache_problem
    tq, ts = load_tokenizer(TOK/'qwen2'), load_tokenizer(TOK/'smollm2')
    cfg = KDConfig(data=str(dropping_rows), seq_len=64, eval_fraction=0.2, output_dir=str(tmp_path))
    said = []
    expected = build_datasets(cfg, tq, ts, say=said.append)[0][:]   # a copy: the dataset itself maps the file damaged below
    root = next((tmp_path/'data_cache').glob('*/COMPLETE')).parent
    arrow = next((root/'train').glob('*.arrow'))
    b = bytearray(arrow.read_bytes()); b[len(b) // 2] ^= 0xff; arrow.write_bytes(bytes(b))
    assert cache_problem(root) == f"file {arrow.relative_to(root)} changed"
    said.clear()
    again, _ = build_datasets(cfg, tq, ts, say=said.append)
    assert said[0] == f"kd_kaggle: data cache {root} is damaged (file {arrow.relative_to(root)} changed); rebuilding"
    assert again[:] == expected and cache_problem(root) is None

# --- CLI: one line, exit codes, prog name, --version, eval --help -------------------------------------------------------------

def test_usage_error_prog_name(capsys):
    code, _, err = cli(capsys, 'nope')
    assert code == 2 and one_line(err).startswith('kd-kaggle: error: ') and 'kd-kaggle kd-kaggle' not in err
    code, _, err = cli(capsys, 'train', '--seq-len', 'long')
    assert code == 2 and one_line(err).startswith('kd-kaggle train: error: ')

def test_version(capsys):
    from kd_kaggle import __version__
    code, out, _ = cli(capsys, '--version')
    assert code == 0 and out.strip() == f'kd-kaggle {__version__}'

def test_eval_help_lists_only_eval_flags(capsys):
    code, out, _ = cli(capsys, 'eval', '--help')
    assert code == 0 and all(f in out for f in ('--run', '--student-dir', '--teacher', '--data', '--eval-data', '--seq-len', '--batch-size'))
    assert not any(f in out for f in ('--lr ', '--curriculum', '--divergence', '--router-lr', '--save-every', '--time-budget'))

@pytest.mark.parametrize('exc,code,needle', [(KeyboardInterrupt(), 130, 'kd-kaggle train: interrupted (Ctrl-C)'),
                                             (PermissionError("cannot write '/x'\nsecond line"), 2, "kd-kaggle train: error: cannot write '/x' second line"),
                                             (OSError('disk full'), 1, 'kd-kaggle train: error: disk full'),
                                             (RuntimeError('CUDA out of memory'), 1, 'kd-kaggle train: error: CUDA out of memory')])
def test_cli_maps_errors_to_one_line_and_exit_code(capsys, monkeypatch, exc, code, needle):
    def boom(args): raise exc
    monkeypatch.setitem(COMMANDS, 'train', boom); monkeypatch.delenv('KD_KAGGLE_DEBUG', raising=False)
    got, _, err = cli(capsys, 'train')
    assert got == code and one_line(err).startswith(needle)
    with pytest.raises(type(exc)): main(['train', '--debug'])         # the escape hatch: the real exception and its traceback
    monkeypatch.setenv('KD_KAGGLE_DEBUG', '1')
    with pytest.raises(type(exc)): main(['train'])

def test_console_script_prints_no_traceback(tmp_path):
    "The real console script, end to end: one stderr line, exit 2."
    exe = Path(sys.executable).parent/'kd-kaggle'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}; env.pop('KD_KAGGLE_DEBUG', None)
    r = subprocess.run([str(exe), 'train', '--data', str(write(tmp_path/'rows.jsonl', '{"text": null}\n')), '--output-dir', str(tmp_path/'run')],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "rows.jsonl:1: field 'text' must be a string" in one_line(r.stderr)


def test_truncated_model_weights_are_one_line(tmp_path):
    "A student (or teacher) folder whose model.safetensors is cut short: one line naming the model, not a traceback."
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from kd_kaggle.models import load_student
    d = tmp_path/'student'
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    AutoTokenizer.from_pretrained(str(Path(__file__).parent/'fixtures'/'tokenizers'/'smollm2')).save_pretrained(d)
    f = d/'model.safetensors'; f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"KDConfig.student=.*could not be read.*attach or download the model again"):
        load_student(str(d))
