"""A teacher too big for one Kaggle GPU (issue 21): a random-weight Qwen2.5-7B-shaped teacher (its real config, the real
Qwen2 tokenizer) cached with `kd_kaggle.cache.cache_teacher` under a 15 GiB cap per GPU, then SmolLM2-135M trained from
that cache alone with `kd_kaggle.train.train`.

    python benchmarks/bigteacher.py --out $OUT                 # GPU: needs 2 GPUs for the `two_gpus` phase
    python benchmarks/bigteacher.py --render RESULT.json       # writes RESULT.md beside it

Phases, each its own process (host RAM peaks are per process), T4 emulation as benchmarks/train_gpu.py (fp16 policy,
15 GiB `set_per_process_memory_fraction` per GPU, SDPA limited to the memory-efficient and math kernels):
  build      save the random fp16 teacher (~15.2 GB safetensors) and the student config (no weights: seeded init)
  two_gpus   cache with the automatic placement (KDConfig.teacher_max_memory unset) over both GPUs; stopped after two
             shards by a callback, then continued by a second call (resume with a split teacher)
  offload    the same teacher on ONE GPU + CPU offload (teacher_max_memory='0=10GiB,cpu=48GiB'), a smaller cache
  train      the student trained from the two_gpus cache on one GPU (no teacher in memory), report written
"""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Qwen/Qwen2.5-7B config.json (as published on the Hub), the fields the architecture reads
QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
              vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
              hidden_act='silu', use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)
SMOL135 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
               vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=8192, rms_norm_eps=1e-5)
CAP_GIB = 15.0
SMOKE = os.environ.get('BIGTEACHER_SMOKE') == '1'   # CPU: a tiny teacher of the same shape family, fp32, disk offload
if SMOKE: QWEN7B.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
if SMOKE: SMOL135.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)


def build(root: Path) -> dict:
    "Random fp16 teacher written shard by shard from the GPU; student config + tokenizer only."
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, LlamaConfig
    t0 = time.time()
    if not (root/'teacher'/'config.json').is_file():
        torch.manual_seed(0)
        with torch.device('cpu' if SMOKE else 'cuda:0'): m = Qwen2ForCausalLM(Qwen2Config(**QWEN7B)).half()
        for p in m.parameters(): p.data.normal_(0, 0.02)   # random weights, the scale of a trained model's init
        m.save_pretrained(root/'teacher', max_shard_size='4GB')
        AutoTokenizer.from_pretrained(REPO/'tests'/'fixtures'/'tokenizers'/'qwen2').save_pretrained(root/'teacher')
        del m
    (root/'student').mkdir(parents=True, exist_ok=True)
    LlamaConfig(**SMOL135).save_pretrained(root/'student')
    AutoTokenizer.from_pretrained(REPO/'tests'/'fixtures'/'tokenizers'/'smollm2').save_pretrained(root/'student')
    return {'build_s': time.time() - t0, 'teacher_bytes': sum(f.stat().st_size for f in (root/'teacher').glob('*.safetensors'))}


def _emulate_t4():
    import torch
    if SMOKE: return
    for i in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * 2**30 / torch.cuda.get_device_properties(i).total_memory), i)
    from kd_kaggle.env import use_repeat_kv_for_sdpa
    use_repeat_kv_for_sdpa()


def _cfg(root: Path, **kw):
    from kd_kaggle.config import KDConfig
    return KDConfig(**{**dict(teacher=str(root/'teacher'), student=str(root/'student'), data=str(root/'austen.txt'), seq_len=1024,
                              batch_size=4, top_k=64, precision='fp32' if SMOKE else 'fp16', max_eval_examples=16, time_budget='30m',
                              output_dir=str(root/'run'), cache_dir=str(root/'data')), **kw})


def _gpu_peaks() -> list:
    import torch
    return [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def _host_peak_gib() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


class RssSampler:
    "Peak anonymous and file-backed RSS of this process (sampled every 50 ms): safetensors' mmap pages count in ru_maxrss but are page cache."
    def __init__(self):
        import threading
        self.peak, self.stop = {'RssAnon': 0, 'RssFile': 0}, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True); self.t.start()
    def run(self):
        while not self.stop.is_set():
            for line in open('/proc/self/status'):
                k, _, v = line.partition(':')
                if k in self.peak: self.peak[k] = max(self.peak[k], int(v.split()[0]) * 1024)
            self.stop.wait(0.05)
    def gib(self) -> dict:
        self.stop.set(); self.t.join()
        return {'host_peak_anon_gib': round(self.peak['RssAnon'] / 2**30, 2), 'host_peak_file_gib': round(self.peak['RssFile'] / 2**30, 2)}


def cache_phase(root: Path, name: str, max_memory, examples: int, stop_after: int = 0) -> dict:
    "Build the cache `name` (optionally stopped after `stop_after` new shards, then continued in this process)."
    import torch
    from torch.nn.attention import sdpa_kernel, SDPBackend
    import kd_kaggle.cache as kc
    from kd_kaggle.cache import cache_teacher
    placed, real_place = [], kc._place_teacher
    def place(*a, **k):   # every call's placement (the stopped call returns no summary)
        t, p = real_place(*a, **k); placed.append(p); return t, p
    kc._place_teacher = place
    _emulate_t4()
    rss = RssSampler()
    cfg = _cfg(root, max_train_examples=examples, teacher_max_memory=max_memory)
    out, runs = root/name, []

    class Stop(Exception): pass
    def stopper(info):
        if stop_after and info['done'] >= stop_after and not runs: raise Stop()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        t = time.time()
        try: s = cache_teacher(cfg, out, shard_examples=16, callback=stopper)
        except Stop: runs.append({'stopped_after_shards': stop_after, 'wall_s': time.time() - t, 'gpu_peak_gib': _gpu_peaks()})
        if runs:   # stopped: a second call continues (re-places the teacher, keeps the listed shards)
            t = time.time(); s = cache_teacher(cfg, out, shard_examples=16)
        runs.append({'wall_s': time.time() - t, 'new_shards': s['new_shards']})
    man = json.loads((out/'manifest.json').read_text())
    from kd_kaggle.cache import TeacherCache
    from kd_kaggle.align import load_tokenizer
    TeacherCache.open(out, cfg, load_tokenizer(str(root/'teacher')), load_tokenizer(str(root/'student')), verify='open')   # every shard's checksum
    return {'phase': name, 'teacher_max_memory': max_memory or 'auto', 'teacher_placement': s['teacher_placement'] or placed[-1],
            'complete': s['complete'], 'examples': examples, 'cache_positions': s['rows'], 'cache_seconds': man['seconds'],
            'cache_positions_per_s': s['rows'] / man['seconds'], 'bytes': s['bytes'], 'bytes_per_position': s['bytes'] / s['rows'], 'payload_bytes_per_position': s['bytes_per_position'],
            'teacher_bpb': (s['teacher_metrics'] or {}).get('bpb'), 'per_gpu_peak_gib': _gpu_peaks(), 'host_peak_gib': round(_host_peak_gib(), 2), **rss.gib(),
            'runs': [{**r, 'placement': p} for r, p in zip(runs, placed)], 'verified': True}


def train_phase(root: Path, steps: int, examples: int) -> dict:
    import torch
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from kd_kaggle.train import train
    _emulate_t4()
    cfg = _cfg(root, max_train_examples=examples, teacher_cache=str(root/'two_gpus'), batch_size=8, max_steps=steps, log_every=5,
               eval_every=10**6, save_every=10**6, output_dir=str(root/'train'), lr=3e-4)
    t = time.time()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]): final = train(cfg)
    wall = time.time() - t
    recs = [json.loads(l) for l in (root/'train'/'metrics.jsonl').read_text().splitlines() if l.strip()]
    tok_s = [r['tok_s'] for r in recs if r.get('tok_s')]
    return {'phase': 'train', 'steps': steps, 'batch': 8, 'seq_len': 1024, 'wall_s': wall, 'tok_s_last': tok_s[-1] if tok_s else None,
            'student_bpb_before': final.get('student_bpb_before'), 'student_bpb': final.get('student_bpb'),
            'report': (root/'train'/'report.md').is_file(), 'gpu0_peak_gib': (_gpu_peaks() or [0])[0], 'host_peak_gib': round(_host_peak_gib(), 2)}


def render(path: Path) -> Path:
    r = json.loads(path.read_text())
    ph = {p['phase']: p for p in r['phases']}
    lines = [f"# A teacher too big for one GPU: {r['teacher']} -> SmolLM2-135M from a cache ({r['date']}, {r['device']})", '',
             f"Teacher: random weights, real Qwen2.5-7B config, {r['teacher_params'] / 1e9:.2f}B parameters, "
             f"{r['teacher_bytes'] / 1e9:.1f} GB fp16 on disk. T4 emulation: fp16, {CAP_GIB:g} GiB cap per GPU, SDPA memory-efficient/math. "
             f"Command: `python benchmarks/bigteacher.py --out $OUT` on `nvidia-h200-x2`.", '',
             '| phase | placement | positions | positions/s | GiB per GPU (peak) | host GiB (peak: anonymous + mapped files) | B/position on disk |', '|---|---|---|---|---|---|---|']
    for name in ('two_gpus', 'offload'):
        if name in ph:
            p = ph[name]
            lines.append(f"| {name} | {', '.join(f'{d}: {n}' for d, n in p['teacher_placement'].items())} | {p['cache_positions']:,} | "
                         f"{p['cache_positions_per_s']:,.0f} | {' / '.join(map(str, p['per_gpu_peak_gib']))} | {p.get('host_peak_anon_gib', '?')} + {p.get('host_peak_file_gib', '?')} | {p['bytes_per_position']:.1f} |")
    if 'train' in ph:
        t = ph['train']
        lines += ['', f"Training from the two_gpus cache on one GPU (no teacher loaded): {t['steps']} steps x {t['batch']} x {t['seq_len']}, "
                  f"{t['tok_s_last']:,.0f} tokens/s, peak {t['gpu0_peak_gib']} GiB, student bpb {t['student_bpb_before']:.3f} -> {t['student_bpb']:.3f}, "
                  f"report written: {t['report']}."]
    lines += ['', '## Extrapolation', '', *r.get('extrapolation_lines', []), '', f"`student_trained_from_cache`: {r['student_trained_from_cache']}"]
    md = path.with_suffix('.md'); md.write_text('\n'.join(lines) + '\n'); return md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='runs/bigteacher'); ap.add_argument('--root', default='/tmp/bigteacher')
    ap.add_argument('--phase', default=None); ap.add_argument('--examples', type=int, default=192)
    ap.add_argument('--offload-examples', type=int, default=32); ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--render', default=None)
    a = ap.parse_args()
    if a.render: print(render(Path(a.render))); return
    root, out = Path(a.root), Path(a.out); root.mkdir(parents=True, exist_ok=True); out.mkdir(parents=True, exist_ok=True)
    if a.phase:   # one phase in this process; its result as the last stdout line
        if a.phase == 'build': res = build(root)
        elif a.phase == 'two_gpus': res = cache_phase(root, 'two_gpus', None, a.examples, stop_after=2)
        elif a.phase == 'offload': res = cache_phase(root, 'offload', 'cpu=0.2MB,disk=1GB' if SMOKE else '0=10GiB,cpu=48GiB', a.offload_examples)
        else: res = train_phase(root, a.steps, a.examples)
        print('RESULT ' + json.dumps(res), flush=True); return
    from kd_kaggle.demo import demo_corpus
    (root/'austen.txt').write_text('\n\n'.join(demo_corpus('train')) + '\n')
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = {'date': time.strftime('%Y-%m-%d'), 'device': f"{torch.cuda.get_device_name(0)} x{gpus}" if gpus else 'cpu (smoke)',
              'teacher': 'tiny (smoke)' if SMOKE else 'Qwen2.5-7B-shaped', 'gpus': gpus, 'cap_gib_per_gpu': CAP_GIB, 'phases': []}
    for phase in ('build', 'two_gpus', 'train', 'offload'):
        t = time.time()
        p = subprocess.run([sys.executable, __file__, '--phase', phase, '--root', str(root), '--examples', str(a.examples),
                            '--offload-examples', str(a.offload_examples), '--steps', str(a.steps)], capture_output=True, text=True)
        (out/f'{phase}.log').write_text(p.stdout[-20000:] + '\n--- stderr ---\n' + p.stderr[-20000:])
        got = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
        res = json.loads(got[-1][7:]) if got else {'phase': phase, 'error': (p.stderr.strip().splitlines() or ['?'])[-1][:500]}
        res['phase_wall_s'] = time.time() - t
        if phase == 'build': result.update(res)
        else: result['phases'].append(res)
        print(phase, json.dumps(res)[:600], flush=True)
        (out/'bigteacher.json').write_text(json.dumps(result, indent=1))
    from transformers import Qwen2Config
    with torch.device('meta'):
        from transformers import Qwen2ForCausalLM
        result['teacher_params'] = sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**QWEN7B)).parameters())
    ph = {p['phase']: p for p in result['phases']}
    two = ph.get('two_gpus', {})
    result.update(per_gpu_peak_gib=two.get('per_gpu_peak_gib'), host_peak_gib=two.get('host_peak_gib'),
                  cache_positions_per_s=two.get('cache_positions_per_s'), bytes_per_position=two.get('bytes_per_position'),
                  student_trained_from_cache=bool(ph.get('train', {}).get('report')))
    (out/'bigteacher.json').write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
