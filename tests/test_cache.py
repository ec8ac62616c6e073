"""The offline teacher cache on the embedded demo models: cached loss == online top-k loss, kill + resume gives the
same bytes, mismatched caches are refused, corrupted shards are detected."""
import dataclasses, io, json, os, shutil, signal, subprocess, sys, time, contextlib
from pathlib import Path

os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')   # with deterministic=True: bitwise-reproducible shards on a GPU too
import numpy as np
import pytest
import torch

from kd_kaggle.align import build_vocab_map, load_tokenizer
from kd_kaggle.cache import (MANIFEST, TeacherCache, cache_teacher, cache_teacher_main, file_sha256,
                             kd_counts)
from kd_kaggle.checkpoint import Budget
from kd_kaggle.config import KDConfig, config_to_dict
from kd_kaggle.data import build_datasets, make_loader
from kd_kaggle.demo import make_demo_student
from kd_kaggle.models import load_teacher, resolve_model
from kd_kaggle.data import kd_position_mask
from kd_kaggle.distill import Distiller

REPO = Path(__file__).resolve().parents[1]
SHARD, BATCH = 8, 4          # 62 examples (of 64 texts; two 'her.' pieces score no byte) -> 8 shards of <= 8, batches of 4


@contextlib.contextmanager
def one_thread():
    "CPU matmuls reduce in a thread-count dependent order: every run compared byte for byte uses one thread."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    try: yield
    finally: torch.set_num_threads(old)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp('cache')
    cfg = KDConfig(teacher='demo', student='demo', data='demo', seq_len=64, max_train_examples=64, max_eval_examples=8,
                   top_k=64, batch_size=BATCH, precision='fp32', output_dir=str(root/'run'), cache_dir=str(root/'data'))
    t_tok, s_tok = load_tokenizer(resolve_model('demo', 'teacher')), load_tokenizer(resolve_model('demo', 'student'))
    train_ds, _ = build_datasets(cfg, t_tok, s_tok)
    t = time.perf_counter()
    with one_thread(): summary = cache_teacher(cfg, root/'ref', shard_examples=SHARD, batch_size=BATCH, deterministic=True)
    summary['wall_s'] = time.perf_counter() - t
    return dict(root=root, cfg=cfg, t_tok=t_tok, s_tok=s_tok, train_ds=train_ds, ref=root/'ref', summary=summary)


def shard_hashes(d):
    return {f.name: file_sha256(f) for f in sorted(Path(d).glob('shard-*.safetensors'))}


def test_reference_cache(env):
    s, cfg = env['summary'], env['cfg']
    assert len(env['train_ds']) == 64 and s['complete'] and s['shards_done'] == s['shards_total'] == 8 and s['rows'] == s['total_rows'] > 0
    assert s['bytes_per_position'] == 64 * (2 + 2) + 2           # uint16 ids (2,048-id student) + fp16 log-probs
    assert s['teacher_metrics']['bpb'] > 0
    man = json.loads((env['ref']/MANIFEST).read_text())
    assert man['ids_dtype'] == 'uint16' and man['logp_dtype'] == 'float16' and man['k'] == 64
    assert [sh['sha256'] for sh in man['shards']] == list(shard_hashes(env['ref']).values())
    assert s['rows'] == int(kd_counts(env['train_ds'], cfg.kd_positions).sum())
    assert not list(env['ref'].glob('.*tmp'))
    print(f"\ndemo cache: {s['rows']} KD positions / {len(env['train_ds'])} examples, {s['bytes']:,} B on disk = {s['bytes'] / s['rows']:.1f} B per "
          f"position incl. headers+counts ({s['bytes_per_position']} B payload), {s['wall_s']:.2f}s")


@pytest.mark.parametrize('dtype,tol', [('float16', 1e-3), ('float32', 1e-6)])
def test_online_top_k_loss_equals_cached_loss(env, dtype, tol):
    cfg, t_tok, s_tok = env['cfg'], env['t_tok'], env['s_tok']
    out = env['ref'] if dtype == 'float16' else env['root']/'fp32'
    if dtype == 'float32': cache_teacher(cfg, out, shard_examples=32, batch_size=8, logp_dtype='float32')
    cache = TeacherCache.open(out, cfg, t_tok, s_tok, verify='open')
    teacher, student = load_teacher('demo'), make_demo_student(0)
    vmap = build_vocab_map(t_tok, s_tok, teacher.get_output_embeddings().weight.shape[0])
    head = student.get_output_embeddings().weight
    for batch in list(cache.make_loader(env['train_ds'], 8, seed=5))[:2]:
        tt = batch['teacher_targets']                    # read back from disk by the collate function
        assert len(tt) == int(kd_position_mask(batch, cfg.kd_positions).sum())
        w = {'ce': 1.0, 'kd': 1.0}   # the trainer's own forward, with the teacher online and from the cache
        (on_loss, on), (off_loss, off) = Distiller(student, teacher, cfg, vmap, len(t_tok))(batch, w), Distiller(student, None, cfg, None, len(t_tok))(batch, w)
        assert on['n_kd'] == off['n_kd'] == len(tt)
        for a, b in ((on['kd_raw'], off['kd_raw']), (on_loss, off_loss)):
            assert abs(a.item() - b.item()) <= tol * abs(a.item()), (dtype, a.item(), b.item())
        g_on, = torch.autograd.grad(on_loss, head, retain_graph=True)
        g_off, = torch.autograd.grad(off_loss, head)
        assert ((g_on - g_off).norm() / g_on.norm()).item() <= 10 * tol


def _spawn(cfg, out, mode):
    script = f"""
import json, os, signal, sys, time, torch
torch.set_num_threads(1)
from kd_kaggle.config import config_from_dict
from kd_kaggle.cache import cache_teacher
if {mode!r} == 'in-write':          # die between writing shard 3 and renaming it into place
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith('shard-00003.safetensors'): os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
cb = (lambda info: time.sleep(0.4)) if {mode!r} == 'slow' else None
cache_teacher(config_from_dict(json.loads(sys.argv[1])), sys.argv[2], shard_examples={SHARD}, batch_size={BATCH}, callback=cb, deterministic=True)
"""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    return subprocess.Popen([sys.executable, '-c', script, json.dumps(config_to_dict(cfg)), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listed(out):
    try: return len(json.loads((Path(out)/MANIFEST).read_text())['shards'])
    except (FileNotFoundError, json.JSONDecodeError, KeyError): return 0


def test_sigkill_mid_run_then_resume_gives_identical_shards(env):
    cfg, out = env['cfg'], env['root']/'killed'
    p = _spawn(cfg, out, 'slow')
    deadline = time.monotonic() + 120
    while _listed(out) < 1 and p.poll() is None and time.monotonic() < deadline: time.sleep(0.05)
    assert p.poll() is None, f"the caching process ended before it could be killed: {p.communicate()[1][-2000:]}"
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    done = _listed(out)
    assert 1 <= done < 8
    with pytest.raises(ValueError, match='incomplete'): TeacherCache.open(out, cfg, env['t_tok'], env['s_tok'])
    with one_thread(): r = cache_teacher(cfg, out, deterministic=True)       # shard_examples / batch_size come from the manifest
    assert r['complete'] and r['new_shards'] == 8 - done
    assert shard_hashes(out) == shard_hashes(env['ref'])
    assert sorted(os.listdir(out)) == sorted(os.listdir(env['ref']))


def test_kill_during_a_shard_write_leaves_nothing_readable(env):
    cfg, out = env['cfg'], env['root']/'killed_in_write'
    p = _spawn(cfg, out, 'in-write'); p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert _listed(out) == 3 and list(out.glob('.shard-00003.safetensors.*.tmp'))   # complete bytes, never renamed nor listed
    assert not (out/'shard-00003.safetensors').exists()
    with one_thread(): r = cache_teacher(cfg, out, deterministic=True)
    assert r['complete'] and r['new_shards'] == 5 and not list(out.glob('.*.tmp'))
    assert shard_hashes(out) == shard_hashes(env['ref'])


def test_time_budget_stops_between_shards_and_the_next_call_continues(env):
    cfg, out, now = env['cfg'], env['root']/'budget', [0.0]
    def tick(info): now[0] += 30
    with one_thread():
        r = cache_teacher(cfg, out, time_budget=Budget(100, 0, clock=lambda: now[0]), shard_examples=SHARD, batch_size=BATCH, callback=tick,
                          deterministic=True)
        assert (r['complete'], r['stop_reason'], r['shards_done']) == (False, 'budget', 4)
        assert cache_teacher(cfg, out, deterministic=True)['complete']
    assert shard_hashes(out) == shard_hashes(env['ref'])


@pytest.mark.parametrize('change,match', [
    (dict(seq_len=128), 'seq_len=64'),
    (dict(kd_positions='boundary'), "kd_positions='one_to_one'"),
    (dict(temperature=2.0), 'temperature=1.0'),
    (dict(top_k=128), 'top_k <= 64'),
    (dict(top_k=None), 'top_k=None'),
    (dict(max_train_examples=32), 'training data'),
    (dict(data=str(REPO/'tests/fixtures/text/austen_excerpt.txt')), 'training data'),
])
def test_mismatched_cache_is_refused(env, change, match):
    cfg = dataclasses.replace(env['cfg'], **change)
    with pytest.raises(ValueError, match=match) as e: TeacherCache.open(env['ref'], cfg, env['t_tok'], env['s_tok'])
    assert 'cache-teacher' in str(e.value) or 'top_k' in str(e.value)   # says how to fix it


def test_cache_built_with_another_data_format_is_refused(env, monkeypatch):
    "A cache whose labels came from an older data layer (DATA_FORMAT_VERSION is in data_cache_key) is not used."
    import kd_kaggle.data as kd_data
    monkeypatch.setattr(kd_data, 'DATA_FORMAT_VERSION', kd_data.DATA_FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match='training data.*cache-teacher'): TeacherCache.open(env['ref'], env['cfg'], env['t_tok'], env['s_tok'])


def test_other_teacher_weights_with_the_same_tokenizer_are_refused(env):
    other = env['root']/'other_teacher'
    shutil.copytree(resolve_model('demo', 'teacher'), other)
    cfg = dataclasses.replace(env['cfg'], teacher=str(other))
    assert len(TeacherCache.open(env['ref'], cfg, env['t_tok'], env['s_tok'])) == len(env['train_ds'])   # an identical copy is the same teacher
    w = next(other.glob('*.safetensors')); raw = bytearray(w.read_bytes()); raw[-5] ^= 0x10; w.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match='teacher weights'): TeacherCache.open(env['ref'], cfg, env['t_tok'], env['s_tok'])


def test_other_student_tokenizer_is_refused(env):
    gpt2 = load_tokenizer(REPO/'tests/fixtures/tokenizers/gpt2')
    with pytest.raises(ValueError, match='tokenizer pair'): TeacherCache.open(env['ref'], env['cfg'], env['t_tok'], gpt2)


def test_smaller_top_k_is_accepted_and_writer_refuses_other_config(env):
    assert len(TeacherCache.open(env['ref'], dataclasses.replace(env['cfg'], top_k=16), env['t_tok'], env['s_tok'])) == len(env['train_ds'])
    with pytest.raises(ValueError, match='seq_len'): cache_teacher(dataclasses.replace(env['cfg'], seq_len=128), env['ref'])
    with pytest.raises(ValueError, match='shard_examples=8'): cache_teacher(env['cfg'], env['ref'], shard_examples=16)
    with pytest.raises(ValueError, match='set top_k'): cache_teacher(dataclasses.replace(env['cfg'], top_k=None), env['root']/'x')


def test_corrupted_shard_is_detected_and_recomputed(env):
    cfg, t_tok, s_tok, bad = env['cfg'], env['t_tok'], env['s_tok'], env['root']/'corrupt'
    shutil.copytree(env['ref'], bad)
    f = bad/'shard-00002.safetensors'
    raw = bytearray(f.read_bytes()); raw[len(raw) // 2] ^= 0x01; f.write_bytes(bytes(raw))     # one flipped bit
    cache = TeacherCache.open(bad, cfg, t_tok, s_tok)                                           # lazy: opens fine
    cache.targets_for(range(0, 16))                                                             # shards 0, 1 are intact
    with pytest.raises(ValueError, match='shard-00002.safetensors is corrupt'): cache.targets_for([17])
    with pytest.raises(ValueError, match='sha256'): TeacherCache.open(bad, cfg, t_tok, s_tok, verify='open')
    f.write_bytes(bytes(raw[:-10]))                                                             # truncated: caught at open
    with pytest.raises(ValueError, match='missing or has'): TeacherCache.open(bad, cfg, t_tok, s_tok, verify='none')
    f.unlink()                                                                                  # the fix the error names
    with one_thread(): r = cache_teacher(cfg, bad, deterministic=True)
    assert r['complete'] and r['new_shards'] == 1 and shard_hashes(bad) == shard_hashes(env['ref'])


def test_loader_adds_index_and_targets_and_matches_data_loader(env):
    from accelerate.utils import send_to_device
    cache = TeacherCache.open(env['ref'], env['cfg'], env['t_tok'], env['s_tok'])
    plain = list(make_loader(env['train_ds'], 8, seed=2, epoch=3))
    cached = list(cache.make_loader(env['train_ds'], 8, seed=2, epoch=3))
    assert len(plain) == len(cached)
    seen = []
    for p, c in zip(plain, cached):
        assert all(torch.equal(p[k], c[k]) for k in p)
        idx = c['example_index']; seen += idx.tolist()
        kd = kd_position_mask(c, 'one_to_one')
        per_ex = [cache.targets_for([i]) for i in idx.tolist()]
        assert torch.equal(c['teacher_targets'].ids, torch.cat([t.ids for t in per_ex]))   # row-major = example by example
        assert len(c['teacher_targets']) == int(kd.sum())
        moved = send_to_device(c, 'cpu')                                                      # what accelerate does
        assert type(moved['teacher_targets']).__name__ == 'TeacherTargets'
    assert sorted(seen) == list(range(len(env['train_ds'])))
    with pytest.raises(ValueError, match='KD positions'):
        cache.targets_for([0, 1], kd_counts=[cache.counts[0], cache.counts[1] + 1])
    with pytest.raises(ValueError, match=str(len(env['train_ds']))): cache.make_loader(env['train_ds'].select(range(10)), 4)


def test_cli_main_prints_at_most_five_lines(env, capsys):
    assert cache_teacher_main(env['cfg'], str(env['ref'])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert 1 <= len(lines) <= 5 and 'complete' in lines[-1]


def test_teacher_split_over_cpu_and_disk_gives_the_same_cache(env):
    "A teacher that does not fit its memory limit (here: CPU RAM, the rest streamed from disk) writes byte-identical shards."
    cfg = dataclasses.replace(env['cfg'], teacher_max_memory='cpu=4MB,disk=1GB')   # the demo teacher has 7.2 MB of fp32 weights
    out, buf = env['root']/'split', io.StringIO()
    with one_thread(), contextlib.redirect_stdout(buf):
        s = cache_teacher(cfg, out, shard_examples=SHARD, batch_size=BATCH, deterministic=True)
    assert s['complete'] and set(s['teacher_placement']) == {'cpu', 'disk'}, s['teacher_placement']
    assert shard_hashes(out) == shard_hashes(env['ref'])
    assert s['teacher_metrics'] == env['summary']['teacher_metrics']


def test_a_teacher_too_big_to_train_online_points_to_the_cache(env, monkeypatch, tmp_path):
    import kd_kaggle.train as tr
    def oom(*a, **k): raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.00 GiB")
    monkeypatch.setattr(tr, 'load_teacher', oom)
    cfg = dataclasses.replace(env['cfg'], top_k=None, output_dir=str(tmp_path/'run'))
    with pytest.raises(RuntimeError, match=r"does not fit in .*kd-kaggle cache-teacher .* --teacher-cache DIR"):
        tr.train(cfg)


def test_teacher_max_memory_on_an_online_run_is_said_not_silently_ignored(env, tmp_path, capsys):
    from kd_kaggle.train import setup_run
    setup_run(dataclasses.replace(env['cfg'], teacher_max_memory='cpu=1GiB', output_dir=str(tmp_path/'run')))
    assert "teacher_max_memory='cpu=1GiB' is for cache-teacher" in capsys.readouterr().out
