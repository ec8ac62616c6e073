"""TRL's cross-tokenizer GOLD trainer as a benchmark peer: step speed / memory, and a training run for quality.

    PYTHONPATH=. python benchmarks/gold_peer.py --smoke                                  # CPU, tiny random models
    PYTHONPATH=. python benchmarks/gold_peer.py --models /tmp/kd_models --batches 1,2,4,8,16 --seq 1024 \
        --modes uld,hybrid --t4 --out benchmarks/results/gold_peer.json                 # GPU (T4 emulation)

TRL is a benchmark-only dependency: it is imported from --trl-site / $TRL_SITE (default /tmp/trlsite, an unpacked
trl-1.16.0 wheel), never from the library. Only TRL's public API is called (trl.experimental.gold.GOLDConfig/GOLDTrainer).

Setup, as TRL's GOLD docs describe cross-tokenizer distillation: student (SmolLM2 tokenizer) and teacher (Qwen2
tokenizer) passed as model instances, `use_uld_loss=True` + `teacher_tokenizer_name_or_path=<teacher dir>`, extended
(byte-offset) ULD alignment (`use_extended_uld=True`, GOLD's default). mode='uld': sorted-probability ULD on every
aligned position. mode='hybrid': `uld_use_hybrid_loss=True`, i.e. tokens whose string exists in both vocabularies are
compared directly with GOLD's generalized JSD (here `beta=0.0`, which GOLD computes as KL(teacher || student)) and the
rest with sorted ULD, weighted `uld_hybrid_matched_weight=0.6` / `uld_hybrid_unmatched_weight=0.4` (the weights of TRL's
docs example; hybrid_weights=None selects GOLD's adaptive weighting). `uld_crossentropy_weight=0` (GOLD's default: no CE).

Off-policy only: GOLD draws `random.random() <= lmbda` per batch to decide whether the student generates the
completion; `lmbda=0.0` (+ seq_kd=False, use_vllm=False) makes that (practically) never true, so no step generates and
every step distils on the dataset's own completion. `max_completion_length` only bounds generation, set below seq_len.

Data: the texts are packed exactly as the library packs plain text (kd_kaggle.data.normalize_record + _records_to_texts:
paragraphs joined into ~seq_len-8 student-token windows), the first batch_size*steps windows kept. Each window is given
to GOLD as a non-conversational prompt/completion pair: prompt = the window up to the end of the first word ending at
or after 10% of its characters, completion = the rest (it starts with that whitespace), so prompt + completion is the
window byte for byte. GOLD tokenizes prompt+completion jointly for the student and prompt, completion separately for the
teacher, appends each side's EOS (left out of the loss by GOLD's uld_skip_*_eos defaults); the loss covers the completion. Truncation: GOLDConfig max_length=seq_len (GOLD keeps the last tokens).

Deliberate departures from TRL defaults, to match the library's setup: gradient_checkpointing=False (TRL defaults to
True; --grad-ckpt turns it on), AdamW lr/wd 0.01/cosine/3% warmup/clip 1.0 as KDConfig, fp32 student master weights
with fp16|bf16 autocast (Trainer fp16/bf16), teacher weights stored in the autocast dtype. No wandb, no checkpoints.
"""
import argparse, gc, json, os, platform, re, sys, time, traceback
from pathlib import Path
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path: sys.path.insert(0, str(REPO))
os.environ.setdefault('TRL_EXPERIMENTAL_SILENCE', '1')
# GEMM kernels by name: cuBLAS/cutlass GEMM names (gemm, gemv, cutlass, xmma, wgmma, ampere_*, sm80_/sm90_/sm75_, tensor-core
# tile names s1688/s16816, Hopper's nvjet_*, cublas*, *matmul*). The attention kernels of SDPA's memory-efficient backend
# are named fmha_cutlass*_sm80, so names matching _ATTN are excluded first (they are not GEMMs in the accounting).
_GEMM = re.compile(r'gemm|gemv|cutlass|xmma|wgmma|ampere|cublas|matmul|nvjet|s1688|s16816|sm90_|sm80_|sm75_', re.I)
_ATTN = re.compile(r'fmha|flash|attention|mem_eff', re.I)


def _gold():
    "Import GOLD from the TRL site dir (a benchmark-only dependency)."
    site = os.environ.get('TRL_SITE', '/tmp/trlsite')
    if site and os.path.isdir(site) and site not in sys.path: sys.path.insert(0, site)
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    return GOLDConfig, GOLDTrainer

_WORD_END = re.compile(r'\S(?=\s)')

def split_prompt_completion(text: str, frac: float = 0.1):
    "Cut after the first word ending at or after `frac` of the characters (prompt + completion == text); None if no such word."
    m = _WORD_END.search(text, max(0, int(len(text) * frac) - 1))
    return (text[:m.end()], text[m.end():]) if m else None

def gold_dataset(texts, student_tok, seq_len: int, max_examples=None):
    "Pack `texts` like the library does, then prompt/completion pairs (see the module docstring)."
    from datasets import Dataset
    from kd_kaggle.data import normalize_record, _records_to_texts
    recs = [normalize_record({'text': t, 'response_start': None}) for t in texts if t.strip()]
    rows = []
    for r in _records_to_texts(recs, 'text', student_tok, seq_len):
        # No whitespace to cut at (a hard cut of split_long): a mid-word cut would put the prompt inside the first student
        # token, which GOLD pulls into the completion, leaving an empty prompt (a ValueError in its collator): skip it.
        pc = split_prompt_completion(r['text'])
        if pc and pc[1].strip(): rows.append({'prompt': pc[0], 'completion': pc[1]})
        if max_examples and len(rows) >= max_examples: break
    return Dataset.from_list(rows)

def make_gold_trainer(teacher_dir, student_dir, texts, *, mode='uld', batch_size=2, seq_len=1024, steps=10, lr=3e-4,
                      seed=0, precision='fp32', output_dir='/tmp/gold_peer_out', hybrid_weights=(0.6, 0.4), beta=0.0,
                      ce_weight=0.0, grad_ckpt=False, max_examples=None, logging_steps=None, rows=None, grad_accum=1):
    """A GOLDTrainer distilling teacher_dir -> student_dir (different tokenizers) off-policy on `texts` (packed, see
    gold_dataset; max_examples=0 keeps every window), or on `rows` of {'prompt', 'completion'} given as they are."""
    assert mode in ('uld', 'hybrid') and precision in ('fp16', 'bf16', 'fp32')
    GOLDConfig, GOLDTrainer = _gold()
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from transformers.utils import logging as hf_logging
    import datasets, warnings
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar(); datasets.disable_progress_bars()   # quiet
    warnings.filterwarnings('ignore', message='`gradient_checkpointing` is deprecated')   # TRL's field name, transformers 5.2x
    tok = AutoTokenizer.from_pretrained(student_dir)
    if tok.pad_token is None: tok.pad_token = tok.eos_token           # as in TRL's GOLD docs example
    amp_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}[precision]
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)   # AMP needs fp32 master weights
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=amp_dtype)       # frozen: stored in the AMP dtype
    hybrid = mode == 'hybrid'
    w_m, w_u = hybrid_weights if (hybrid and hybrid_weights) else (None, None)
    args = GOLDConfig(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, max_steps=steps,
        learning_rate=lr, weight_decay=0.01, lr_scheduler_type='cosine', warmup_steps=0.03, max_grad_norm=1.0, seed=seed,
        fp16=precision == 'fp16', bf16=precision == 'bf16', gradient_checkpointing=grad_ckpt,
        max_length=seq_len, max_completion_length=max(1, seq_len // 2),   # the latter only bounds generation (unused)
        lmbda=0.0, seq_kd=False, use_vllm=False,                             # off-policy: the student never generates
        use_uld_loss=True, use_extended_uld=True, teacher_tokenizer_name_or_path=str(teacher_dir),
        uld_use_hybrid_loss=hybrid, uld_hybrid_matched_weight=w_m, uld_hybrid_unmatched_weight=w_u, beta=beta,
        uld_crossentropy_weight=ce_weight,
        include_num_input_tokens_seen='non_padding',                         # student non-pad tokens, counted by Trainer
        dataloader_drop_last=True, dataloader_pin_memory=torch.cuda.is_available(),
        report_to='none', save_strategy='no', disable_tqdm=True, log_level='error',
        logging_strategy='steps' if logging_steps else 'no', logging_steps=logging_steps or 10)
    from datasets import Dataset
    ds = Dataset.from_list(rows) if rows is not None else gold_dataset(texts, tok, seq_len, batch_size * grad_accum * steps if max_examples is None else max_examples)
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok, train_dataset=ds)
    trainer.remove_callback(PrinterCallback)                                # quiet: logs stay in state.log_history
    return trainer


def _step_timer(n_warmup, n_timed, n_prof, cuda):
    "A Trainer callback marking (time, tokens seen) at the end of steps n_warmup and n_warmup+n_timed; profiles the next n_prof."
    from transformers import TrainerCallback
    class StepTimer(TrainerCallback):
        def __init__(self): self.marks, self.prof = {}, None
        def on_train_begin(self, args, state, control, **kw): self._mark(state)   # n_warmup=0: timing starts here
        def on_step_end(self, args, state, control, **kw): self._mark(state)
        def _mark(self, state):
            s = state.global_step
            if s not in (n_warmup, n_warmup + n_timed, n_warmup + n_timed + n_prof): return
            if cuda: torch.cuda.synchronize()
            if s == n_warmup + n_timed + n_prof and self.prof is not None: self.prof.stop()
            if s in (n_warmup, n_warmup + n_timed): self.marks[s] = (time.perf_counter(), state.num_input_tokens_seen)
            if s == n_warmup + n_timed and n_prof:
                from torch.profiler import profile, ProfilerActivity
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]); self.prof.start()
    return StepTimer()

def _kernel_ms(prof, n: int) -> tuple:
    """(device time, its GEMM part) per step in ms, from the profiler's device-side events (device_type CUDA: kernels,
    plus memcpy/memset as benchmarks/step.py counts them), leaving out GPU user-annotation ranges. CPU ops are skipped
    because their self device time repeats that of the kernels they launch."""
    from torch.autograd import DeviceType
    tot = gemm = 0.0
    for e in prof.key_averages():
        if getattr(e, 'device_type', None) != DeviceType.CUDA or getattr(e, 'is_user_annotation', False): continue
        us = e.self_device_time_total or 0
        tot += us
        if _GEMM.search(e.key) and not _ATTN.search(e.key): gemm += us
    return tot / 1e3 / n, gemm / 1e3 / n

def time_gold_steps(trainer, n_warmup: int = 3, n_timed: int = 5, device='cuda') -> dict:
    """Run GOLD's real training loop (`trainer.train()`, max_steps = warm-up + timed [+ profiled]) with a callback that
    marks the end of optimizer steps, so a timed step is everything Trainer does per step: fetch + collate the batch,
    GOLD's _prepare_inputs, teacher re-tokenization, both forwards, the ULD loss, backward, (un)scale + clip, AdamW,
    scheduler, zero_grad. tok_s = student non-pad tokens (Trainer's non_padding count) / wall over the n_timed steps.
    On CUDA, n_timed more steps then run under torch.profiler (kept apart so profiling overhead never enters tok_s):
    kernel_ms = device time of those steps' CUDA kernels / n_timed (see _kernel_ms), gemm_ms = its GEMM part (_GEMM)."""
    cuda = torch.device(device).type == 'cuda'
    n_prof = n_timed if cuda else 0
    timer = _step_timer(n_warmup, n_timed, n_prof, cuda)
    trainer.args.max_steps = n_warmup + n_timed + n_prof
    trainer.add_callback(timer)
    if cuda: torch.cuda.reset_peak_memory_stats()
    try: trainer.train()
    finally: trainer.remove_callback(timer)
    (t0, k0), (t1, k1) = timer.marks[n_warmup], timer.marks[n_warmup + n_timed]
    out = dict(tok_s=(k1 - k0) / (t1 - t0), step_ms=1e3 * (t1 - t0) / n_timed, tokens_per_step=(k1 - k0) / n_timed,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, kernel_ms=None, gemm_ms=None)
    if timer.prof is not None: out['kernel_ms'], out['gemm_ms'] = _kernel_ms(timer.prof, n_prof)
    return out

def train_gold(teacher_dir, student_dir, texts, *, output_dir, mode='uld', batch_size=4, seq_len=1024, steps=100,
               lr=3e-4, seed=0, precision='fp32', **kw) -> dict:
    "Train the student with GOLD for `steps` steps and save it (model + tokenizer) to output_dir/student."
    trainer = make_gold_trainer(teacher_dir, student_dir, texts, mode=mode, batch_size=batch_size, seq_len=seq_len,
                                steps=steps, lr=lr, seed=seed, precision=precision, output_dir=output_dir,
                                logging_steps=max(1, steps // 20), **kw)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    dest = Path(output_dir)/'student'
    trainer.model.save_pretrained(dest); trainer.processing_class.save_pretrained(dest)
    losses = [(h['step'], h['loss']) for h in trainer.state.log_history if 'loss' in h]
    # GOLD's dataloader yields a whole generation batch (batch_size x grad_accum rows) and slices it itself; Trainer counts
    # that batch at every micro-step, so its counter is grad_accum x the tokens trained on.
    tokens = int(trainer.state.num_input_tokens_seen) // max(1, trainer.args.gradient_accumulation_steps)
    return dict(wall_s=wall, student_tokens=tokens, steps=trainer.state.global_step,
                student_dir=str(dest), losses=losses)


def build_tiny_models(root: Path):
    "Tiny random-weight Qwen2 teacher / Llama student with the real tokenizers (vocab = the tokenizer's size)."
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, LlamaConfig, LlamaForCausalLM
    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                tie_word_embeddings=True, max_position_embeddings=2048)
    for name, cls, cfg_cls, tk in (('teacher', Qwen2ForCausalLM, Qwen2Config, 'qwen2'), ('student', LlamaForCausalLM, LlamaConfig, 'smollm2')):
        d = root/name
        if (d/'config.json').is_file(): continue
        tok = AutoTokenizer.from_pretrained(REPO/'tests'/'fixtures'/'tokenizers'/tk)
        torch.manual_seed(0)
        cls(cfg_cls(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id or tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, **dims)).save_pretrained(d)
        tok.save_pretrained(d)

def _free():
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()

def run_row(mode, b, args, models: Path, texts, device, pair) -> dict:
    "One row: GOLD `mode` at batch `b` x args.seq (or its OOM / error)."
    row = dict(variant=f'gold_{mode}', pair=pair, batch=b, seq=args.seq, tok_s=None, peak_gib=None, kernel_ms=None,
               gemm_ms=None, oom=False, error=None)
    trainer = None
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()   # an OOM while loading reports its own peak
    try:
        n = args.warmup + 2 * args.timed
        trainer = make_gold_trainer(models/'teacher', models/'student', texts, mode=mode, batch_size=b, seq_len=args.seq,
                                    steps=n, lr=args.lr, seed=args.seed, precision=args.precision,
                                    output_dir=args.work/f'{mode}-b{b}', grad_ckpt=args.grad_ckpt)
        r = time_gold_steps(trainer, args.warmup, args.timed, device)
        row.update(r)
    except Exception as e:   # OOM (torch.OutOfMemoryError, or wrapped): record it and go on; anything else: record the error
        msg = str(e).split('\n')[0][:300]
        row['oom'] = isinstance(e, torch.OutOfMemoryError) or any(w in msg.lower() for w in ('out of memory', 'alloc_failed'))
        row['error'] = f'{type(e).__name__}: {msg}'
        if row['oom'] and device.type == 'cuda': row['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
        if not row['oom']: traceback.print_exc()
    finally:
        if trainer is not None: trainer.accelerator.free_memory(); trainer.model = trainer.teacher_model = None
        trainer = None; _free()
    return row

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--smoke', action='store_true', help='CPU, tiny random models, batch 2 x seq 64, 2 steps, uld + hybrid')
    ap.add_argument('--models', type=Path, help='dir with teacher/ and student/ (built by train_gpu.build_models if absent)')
    ap.add_argument('--batches', default='1,2,4,8,16'); ap.add_argument('--seq', type=int, default=1024)
    ap.add_argument('--modes', default='uld,hybrid'); ap.add_argument('--t4', action='store_true',
                    help='Kaggle T4 emulation: fp16 AMP, 15 GiB allocator cap, SDPA mem-efficient + math only')
    ap.add_argument('--cap-gib', type=float, default=15.0); ap.add_argument('--precision', choices=('fp16', 'bf16', 'fp32'))
    ap.add_argument('--warmup', type=int, default=3); ap.add_argument('--timed', type=int, default=5)
    ap.add_argument('--lr', type=float, default=3e-4); ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--grad-ckpt', action='store_true', help="TRL's default; off by default here like KDConfig")
    ap.add_argument('--pair', default=None); ap.add_argument('--out', type=Path)
    ap.add_argument('--work', type=Path, default=Path('/tmp/gold_peer_work')); ap.add_argument('--trl-site')
    args = ap.parse_args(argv)
    if args.trl_site: os.environ['TRL_SITE'] = args.trl_site
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    from kd_kaggle.demo import demo_corpus
    texts = demo_corpus('train')
    if args.smoke:
        device = torch.device('cpu')
        args.batches, args.seq, args.warmup, args.timed, args.precision = '2', 64, 1, 1, 'fp32'
        models, pair = Path('/tmp/gold_peer_smoke'), 'tiny-qwen2->tiny-llama (random, real tokenizers)'
        build_tiny_models(models)
    else:
        if args.models is None: ap.error('--models DIR (or --smoke)')
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        models, pair = args.models, args.pair or 'qwen2.5-0.5b->smollm2-135m'
        if not (models/'teacher'/'config.json').is_file():
            from train_gpu import build_models   # benchmarks/ is sys.path[0] when run as a script
            build_models(models)
    args.precision = args.precision or ('fp16' if args.t4 else 'bf16' if device.type == 'cuda' else 'fp32')
    import contextlib
    emulate = contextlib.ExitStack()
    if args.t4 and device.type == 'cuda':
        from torch.nn.attention import sdpa_kernel, SDPBackend
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))
        emulate.enter_context(sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))   # a T4 has no flash/cuDNN attention
    rows = []
    with emulate:
        for mode in args.modes.split(','):
            for b in (int(x) for x in args.batches.split(',')):
                row = run_row(mode, b, args, models, texts, device, pair)
                rows.append(row); print(json.dumps(row), flush=True)
    if args.out:
        import trl
        meta = dict(device=torch.cuda.get_device_name(0) if device.type == 'cuda' else platform.processor() or 'cpu',
                    torch=torch.__version__, trl=trl.__version__, precision=args.precision, t4=args.t4, cap_gib=args.cap_gib if args.t4 else None,
                    warmup=args.warmup, timed=args.timed, grad_ckpt=args.grad_ckpt, models=str(models))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
    return rows

if __name__ == '__main__':
    main()
