"""Checkpoint integrity: every file is checked against the manifest, a damaged newest checkpoint falls back to the previous one,
old checkpoints without a manifest still load, a full disk or a kill leaves no leftovers that the next save does not remove."""
import errno, json, shutil
from pathlib import Path

import pytest
import torch

import kd_kaggle.checkpoint as ck
from kd_kaggle.checkpoint import (MANIFEST_FILE, STATE_FILE, CheckpointDamaged, TrainState, latest_valid_checkpoint,
                                  list_checkpoints, load_checkpoint, read_manifest, save_checkpoint, verify_checkpoint)

def _model_opt(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3); opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    return net, opt, sched

def _step(net, opt, sched):
    net(torch.randn(2, 4)).sum().backward(); opt.step(); sched.step(); opt.zero_grad()

def _run(root, steps=(10, 20, 30), keep_last=3):
    "Checkpoints of a tiny run at `steps`; returns {step: (path, student weight at that step)}."
    net, opt, sched = _model_opt(); out = {}
    for s in steps:
        _step(net, opt, sched)
        out[s] = (save_checkpoint(root, TrainState(step=s), {'student': net}, opt, sched, keep_last=keep_last), net.weight.detach().clone())
    return out

def _flip(f: Path, at: int = -7):
    b = bytearray(f.read_bytes()); b[at] ^= 0x10; f.write_bytes(bytes(b))

def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

def test_manifest_records_every_file(tmp_path):
    ckpts = _run(tmp_path, steps=(10,))
    files = read_manifest(ckpts[10][0])
    assert set(files) == {'student.safetensors', 'optimizer.pt', 'scheduler.pt', 'rng_0.pt', STATE_FILE}
    assert all(files[f]['bytes'] == (ckpts[10][0]/f).stat().st_size for f in files)
    assert verify_checkpoint(ckpts[10][0]) is True

def test_bit_flip_in_student_falls_back_to_previous_checkpoint(tmp_path):
    ckpts = _run(tmp_path)
    p20, p30 = ckpts[20][0], ckpts[30][0]
    size = (p30/'student.safetensors').stat().st_size
    _flip(p30/'student.safetensors')
    assert (p30/'student.safetensors').stat().st_size == size
    said = []
    assert latest_valid_checkpoint([tmp_path], say=said.append) == p20
    assert said == [f"kd_kaggle: WARNING: checkpoint {p30} is damaged (student.safetensors fails its blake2b checksum (changed on disk "
                    f"after it was saved)); falling back to checkpoint {p20}"]
    net, opt, sched = _model_opt(seed=1)
    st, _ = load_checkpoint(p20, {'student': net}, opt, sched)
    assert st.step == 20 and torch.equal(net.weight, ckpts[20][1])
    assert [s for s, _ in list_checkpoints([tmp_path])] == [10, 20, 30]   # list_checkpoints is unchanged: it does not hash

@pytest.mark.parametrize('name', ['optimizer.pt', 'rng_0.pt', 'student.safetensors', 'scheduler.pt'])
def test_truncated_file_is_detected(tmp_path, name):
    ckpts = _run(tmp_path, steps=(10, 20))
    _truncate(ckpts[20][0]/name)
    for hashes in (True, False):   # the size alone catches a truncation
        with pytest.raises(CheckpointDamaged, match=rf"{name} has [\d,]+ bytes, its manifest.json says [\d,]+ \(truncated\?\)") as e:
            verify_checkpoint(ckpts[20][0], hashes=hashes)
        assert '\n' not in str(e.value) and str(ckpts[20][0]) in str(e.value)
    said = []
    assert latest_valid_checkpoint([tmp_path], say=said.append) == ckpts[10][0] and name in said[0]

@pytest.mark.parametrize('damage,why', [
    (lambda p: (p/'optimizer.pt').unlink(), 'optimizer.pt is missing'),
    (lambda p: (p/STATE_FILE).write_text('{"state": '), 'trainer_state.json is not valid JSON'),
    (lambda p: (p/STATE_FILE).write_text((p/STATE_FILE).read_text().replace('"step": 20', '"step": 90')), 'trainer_state.json fails'),
    (lambda p: (p/MANIFEST_FILE).write_text('{"files": '), 'manifest.json is not a valid manifest'),
])
def test_missing_or_corrupt_files_are_detected(tmp_path, damage, why):
    ckpts = _run(tmp_path, steps=(10, 20))
    damage(ckpts[20][0])
    with pytest.raises(ValueError, match=why): verify_checkpoint(ckpts[20][0])
    said = []
    assert latest_valid_checkpoint([tmp_path], say=said.append) == ckpts[10][0]
    assert why in said[0] and f'falling back to checkpoint {ckpts[10][0]}' in said[0]

def test_no_valid_checkpoint_gives_none(tmp_path):
    ckpts = _run(tmp_path, steps=(10,))
    _flip(ckpts[10][0]/'optimizer.pt')
    said = []
    assert latest_valid_checkpoint([tmp_path], say=said.append) is None
    assert 'optimizer.pt fails its blake2b checksum' in said[0] and 'no older valid checkpoint' in said[0]
    assert latest_valid_checkpoint([tmp_path/'nothing-here'], say=said.append) is None

@pytest.mark.parametrize('name', ['optimizer.pt', 'student.safetensors', 'rng_0.pt', 'scheduler.pt'])
def test_load_checkpoint_refuses_a_damaged_file_and_loads_nothing(tmp_path, name):
    ckpts = _run(tmp_path, steps=(10,))
    _flip(ckpts[10][0]/name)
    net, opt, sched = _model_opt(seed=1); before = net.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"checkpoint .*checkpoint-00000010 is damaged: {name} fails its blake2b checksum") as e:
        load_checkpoint(ckpts[10][0], {'student': net}, opt, sched)
    assert '\n' not in str(e.value) and torch.equal(net.weight, before)   # checked before anything is loaded

def test_old_checkpoint_without_manifest_still_loads(tmp_path):
    ckpts = _run(tmp_path, steps=(10,))
    p = ckpts[10][0]; (p/MANIFEST_FILE).unlink()                  # as written before manifests existed
    assert verify_checkpoint(p) is False
    said = []
    assert latest_valid_checkpoint([tmp_path], say=said.append) == p
    assert said == [f"kd_kaggle: checkpoint {p} has no manifest.json (saved before checksums): loading it unverified"]
    net, opt, sched = _model_opt(seed=1)
    st, _ = load_checkpoint(p, {'student': net}, opt, sched)
    assert st.step == 10 and torch.equal(net.weight, ckpts[10][1])

def test_fallback_prefers_own_dir_then_older_copy_in_resume_dirs(tmp_path):
    "The same step in the run dir and an attached dataset: a damaged first copy falls back to the intact second one."
    own, attached = tmp_path/'run'/'checkpoints', tmp_path/'input'/'ds'/'checkpoints'
    _run(attached, steps=(10, 20)); shutil.copytree(attached, own)
    _flip(own/'checkpoint-00000020'/'student.safetensors')
    said = []
    assert latest_valid_checkpoint([own, tmp_path/'input'], say=said.append) == attached/'checkpoint-00000020'

@pytest.mark.parametrize('writer', ['save_model', 'torch.save', 'atomic_write_text'])
def test_disk_full_leaves_no_tmp_and_one_line_error(tmp_path, monkeypatch, writer):
    ckpts = _run(tmp_path, steps=(10,))
    def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    if writer == 'torch.save': monkeypatch.setattr(ck.torch, 'save', full)
    else: monkeypatch.setattr(ck, writer, full)
    net, opt, sched = _model_opt()
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path, TrainState(step=20), {'student': net}, opt, sched)
    assert str(e.value) == f"no space left on device while writing checkpoint 20 to {tmp_path}: free space or lower keep_last"
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-00000010'] and verify_checkpoint(ckpts[10][0])

def test_failed_resave_of_the_same_step_keeps_the_previous_one(tmp_path, monkeypatch):
    ckpts = _run(tmp_path, steps=(10,))
    real = ck.os.replace
    def fail_second(src, dst):   # the old checkpoint is moved aside, then the rename of the new one fails
        if Path(src).name.startswith('.tmp-'): raise OSError(errno.ENOSPC, 'No space left on device')
        return real(src, dst)
    monkeypatch.setattr(ck.os, 'replace', fail_second)
    net, opt, sched = _model_opt()
    with pytest.raises(OSError, match='no space left on device while writing checkpoint 10'):
        save_checkpoint(tmp_path, TrainState(step=10), {'student': net}, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-00000010'] and verify_checkpoint(ckpts[10][0])

def test_any_exception_during_save_removes_the_tmp_dir(tmp_path, monkeypatch):
    def boom(*a, **k): raise RuntimeError('boom')
    monkeypatch.setattr(ck, 'rng_state', boom)
    net, opt, sched = _model_opt()
    with pytest.raises(RuntimeError, match='boom'): save_checkpoint(tmp_path, TrainState(step=10), {'student': net}, opt, sched)
    assert list(tmp_path.iterdir()) == []

def test_leftovers_are_cleaned_at_the_next_save_only_in_the_run_dir(tmp_path):
    root, other = tmp_path/'run'/'checkpoints', tmp_path/'resume_dir'
    _run(root, steps=(10,))
    (root/'.tmp-checkpoint-00000015').mkdir(); (root/'.tmp-checkpoint-00000015'/'optimizer.pt').write_bytes(b'x')   # killed write
    (root/'checkpoint-00000012').mkdir()                                                                           # emptied by a killed prune
    (root/'checkpoint-00000013').mkdir(); (root/'checkpoint-00000013'/'student.safetensors').write_bytes(b'x')      # partly pruned
    (root/'.trash-checkpoint-00000005').mkdir()
    (other/'checkpoint-00000003').mkdir(parents=True); (other/'.tmp-checkpoint-00000004').mkdir()                  # not ours: untouched
    net, opt, sched = _model_opt()
    save_checkpoint(root, TrainState(step=20), {'student': net}, opt, sched, keep_last=5)
    assert sorted(p.name for p in root.iterdir()) == ['checkpoint-00000010', 'checkpoint-00000020']
    assert sorted(p.name for p in other.iterdir()) == ['.tmp-checkpoint-00000004', 'checkpoint-00000003']

def test_a_kill_mid_prune_leaves_no_partial_checkpoint_that_looks_valid(tmp_path, monkeypatch):
    _run(tmp_path, steps=(10, 20), keep_last=2)
    real = shutil.rmtree
    def killed(p, *a, **k):   # deletes one file of a checkpoint, then the process "dies"
        p = Path(p)
        if (p/'student.safetensors').is_file(): (p/'student.safetensors').unlink(); raise KeyboardInterrupt
        return real(p, *a, **k)
    monkeypatch.setattr(ck.shutil, 'rmtree', killed)
    net, opt, sched = _model_opt()
    with pytest.raises(KeyboardInterrupt): save_checkpoint(tmp_path, TrainState(step=30), {'student': net}, opt, sched, keep_last=2)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints([tmp_path])] == [20, 30]
    assert all(verify_checkpoint(p) for _, p in list_checkpoints([tmp_path]))
    save_checkpoint(tmp_path, TrainState(step=40), {'student': net}, opt, sched, keep_last=2)   # the next save clears the .trash
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-00000030', 'checkpoint-00000040']

def test_a_save_after_a_fallback_prunes_the_abandoned_checkpoint_not_itself(tmp_path):
    "After falling back from a damaged step 30 to 20, saving step 25 with keep_last=1 keeps 25 (not the damaged 30)."
    ckpts = _run(tmp_path, steps=(10, 20, 30))
    _flip(ckpts[30][0]/'optimizer.pt')
    assert latest_valid_checkpoint([tmp_path], say=lambda m: None) == ckpts[20][0]
    net, opt, sched = _model_opt()
    save_checkpoint(tmp_path, TrainState(step=25), {'student': net}, opt, sched, keep_last=1)
    assert [s for s, _ in list_checkpoints([tmp_path])] == [25]
    assert latest_valid_checkpoint([tmp_path], say=lambda m: None).name == 'checkpoint-00000025'
