"""Which call poisons a later fork for CUDA (what a forked multi-GPU launch needs)? Each step forks a child that asks
torch.cuda._is_in_bad_fork(). Run on a GPU machine: PYTHONPATH=. python benchmarks/fork_probe.py (2026-11-30: get_arch_list did)."""
import os, sys
def poisoned(tag):
    import torch
    r, w = os.pipe(); pid = os.fork()
    if pid == 0: os.write(w, b'1' if torch.cuda._is_in_bad_fork() else b'0'); os._exit(0)
    os.waitpid(pid, 0); print(f'{tag:40s} poisoned={os.read(r, 1) == b"1"}', flush=True)
import torch; poisoned('import torch')
print('nvml count', torch.cuda._device_count_nvml(), 'raw', torch.cuda._raw_device_count_nvml())
from kd_kaggle.env import fork_safe_cuda_available, nvidia_smi_gpus, nvml_cuda_checks
print(fork_safe_cuda_available()); poisoned('fork_safe_cuda_available')
print(torch.cuda.device_count()); poisoned('device_count')
nvidia_smi_gpus(); poisoned('nvidia_smi')
from kd_kaggle.env import cuda_arch_list; print(cuda_arch_list())
poisoned('cuda_arch_list (subprocess)')
import transformers; poisoned('import transformers')
import accelerate; poisoned('import accelerate')
from kd_kaggle.env import doctor; doctor('.'); poisoned('doctor')
