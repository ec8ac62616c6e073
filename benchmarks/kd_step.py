"""Speed and peak memory of one kd_kaggle training step at real model shapes, against the seed's naive step.

    PYTHONPATH=. python benchmarks/kd_step.py --smoke                      # CPU, tiny models, 1 step per variant
    PYTHONPATH=. python benchmarks/kd_step.py --out benchmarks/results     # GPU: the full grid (about 3 minutes on an H100)
    PYTHONPATH=. python benchmarks/kd_step.py --attn-fix --suffix=-attnfix --bucket-microbench   # with the proposed fixes
    PYTHONPATH=. python benchmarks/kd_step.py --render benchmarks/results/X.json --out benchmarks/results   # redo a .md

Results and their reading: benchmarks/results/README.md.

Models are random-weight copies of the real architectures, built from their configs (nothing is downloaded):
Qwen2.5-0.5B -> SmolLM2-135M and Qwen2.5-1.5B -> SmolLM2-360M. Batches come from the real tokenizers in
tests/fixtures/tokenizers and real prose (the Austen corpus embedded in kd_kaggle/demo_assets), through
kd_kaggle.data.encode_examples (truncation at max_length=seq) and kd_kaggle.data.collate, so sequence lengths,
1:1 positions and the vocabulary map are what a real run sees.

Kaggle T4 emulation on a bigger card: fp16 autocast + torch.amp.GradScaler, teacher stored in fp16, student fp32 master
weights with AdamW, torch.cuda.set_per_process_memory_fraction so the allocator cap is --mem-cap-gib (15 GiB),
SDPA restricted to the memory-efficient kernel with math as fallback (no flash or cuDNN attention: a T4 has neither), no torch.compile.
Speeds are those of the card the script runs on (see the JSON's `device`), not a T4's.

Variants (same batches, same seed, student reset to the same initial weights for every configuration):
  naive    the seed's step: student [B,T,Vs] and teacher [B,T,Vt] logits, id-truncated dense KL at T=4 x T^2
           (kd_kaggle.losses.seed_naive_kd_loss, positions truncated to the shorter side) + CE
  default  kd_kaggle.train.Distiller with KDConfig() defaults, curriculum weights at 50% progress and a Router
  kd_only  Distiller with ce=1, kd=1 and no router
  cached   no teacher on the GPU: KD from kd_kaggle.losses.TeacherTargets (top-64 student ids + log-probs + rest),
           passed as teacher= to fused_distill_loss (the same call Distiller.forward makes). The targets are computed
           once per batch with the teacher outside the timed region (kd_kaggle.cache.batch_targets), written as a
           kd_kaggle.cache shard (uint16 ids, fp16 log-probs) and read back through kd_kaggle.cache.TeacherCache.targets_for
           inside the timed step (host gather from the memory-mapped shard + copy to the GPU), as the cache's loader does.
           The teacher is moved off the GPU before these steps run. Without kd_kaggle/cache.py this falls back to
           cached_gpu's targets (and says so in the row's note).
  cached_gpu  as cached, but the targets are precomputed and already on the GPU: the step without any cache I/O.
"""
from __future__ import annotations
import argparse, contextlib, gc, json, math, os, platform, re, statistics, sys, time, traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path: sys.path.insert(0, str(REPO))

VARIANTS = ('naive', 'default', 'kd_only', 'cached', 'cached_gpu')
CACHED = ('cached', 'cached_gpu')
TOP_K_CACHE = 64

# Real configs (architecture fields only), as dicts: no download.
QWEN25_05B = dict(arch='qwen2', hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643)
QWEN25_15B = dict(QWEN25_05B, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960)
SMOLLM2_135M = dict(arch='llama', hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
SMOLLM2_360M = dict(SMOLLM2_135M, hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                    intermediate_size=2560)
PAIRS = {'qwen2.5-0.5b->smollm2-135m': (QWEN25_05B, SMOLLM2_135M),
         'qwen2.5-1.5b->smollm2-360m': (QWEN25_15B, SMOLLM2_360M)}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
SMOKE_PAIRS = {'tiny-qwen2->tiny-llama': (dict(QWEN25_05B, **TINY), dict(SMOLLM2_135M, **TINY))}

FLOPS_FORMULA = (
    "flops/step = student: 6*N_s*tok_s + 6*L_s*(H_s*hd_s)*sum_rows(T_s^2) [causal attention, QK^T + PV, fwd+bwd] "
    "+ 6*d_s*V_s*tok_s [lm_head fwd+bwd] ; teacher (not 'cached'/'cached_gpu'): 2*N_t*tok_t + 2*L_t*(H_t*hd_t)*sum_rows(T_t^2) "
    "+ 2*d_t*V_t*R_t [lm_head fwd; R_t = all teacher tokens for 'naive', KD positions for 'default'/'kd_only'] ; "
    "N = non-embedding matmul weights per token = L*(d*H*hd + 2*d*KV*hd + H*hd*d + 3*d*I); tok = real (unpadded) "
    "tokens. Not counted: norms, softmax/KL elementwise work, router projections and attention-probability "
    "recomputation of 'default', activation recompute (none here). MFU = flops/step / step time / measured fp16 "
    "matmul peak of the same card (8192^3 torch.matmul, median of 10).")


# --------------------------------------------------------------------------------------------------------- models
def hf_config(d: dict):
    from transformers import LlamaConfig, Qwen2Config
    d = dict(d); arch = d.pop('arch')
    cls = Qwen2Config if arch == 'qwen2' else LlamaConfig
    return cls(**d, use_cache=False)

def build_model(d: dict, dtype, device, seed: int):
    from transformers import AutoModelForCausalLM
    from kd_kaggle.env import quiet_hf
    torch.manual_seed(seed)
    with quiet_hf(), torch.device(device):
        m = AutoModelForCausalLM.from_config(hf_config(d), dtype=dtype, attn_implementation='sdpa')
    return m

def matmul_params(d: dict) -> int:
    "Non-embedding matmul weights used per token (attention q,k,v,o + SwiGLU MLP), all layers."
    h, H, kv, I, L = d['hidden_size'], d['num_attention_heads'], d['num_key_value_heads'], d['intermediate_size'], d['num_hidden_layers']
    hd = h // H
    return L * (h * H * hd + 2 * h * kv * hd + H * hd * h + 3 * h * I)

def step_flops(variant, s_cfg, t_cfg, batch, n_kd) -> float:
    "Model FLOPs of one optimizer step (see FLOPS_FORMULA)."
    s_len = batch['student_attention_mask'].sum(1).double(); t_len = batch['teacher_attention_mask'].sum(1).double()
    tok_s, tok_t = float(s_len.sum()), float(t_len.sum())
    def attn(cfg, lens): return cfg['num_hidden_layers'] * cfg['hidden_size'] * float((lens ** 2).sum())  # H*hd = d here
    f = 6 * matmul_params(s_cfg) * tok_s + 6 * attn(s_cfg, s_len) + 6 * s_cfg['hidden_size'] * s_cfg['vocab_size'] * tok_s
    if variant not in CACHED:
        rows_t = tok_t if variant == 'naive' else n_kd
        f += 2 * matmul_params(t_cfg) * tok_t + 2 * attn(t_cfg, t_len) + 2 * t_cfg['hidden_size'] * t_cfg['vocab_size'] * rows_t
    return f


# --------------------------------------------------------------------------------------------------------- data
def text_windows(n: int, min_chars: int, offset: int = 0) -> list:
    "`n` texts of consecutive corpus paragraphs, each longer than `min_chars` characters (so truncation decides the length)."
    from kd_kaggle.demo import demo_corpus
    paras = demo_corpus('train')
    out, cur, size, i = [], [], 0, offset
    while len(out) < n:
        p = paras[i % len(paras)]; i += 1
        cur.append(p); size += len(p) + 2
        if size > min_chars: out.append('\n\n'.join(cur)); cur, size = [], 0
    return out

def make_batches(t_tok, s_tok, seq: int, batch_sizes, n_distinct: int) -> dict:
    "(batch, seq) -> list of `n_distinct` collated batches (CPU), all built from distinct text windows."
    from kd_kaggle.data import encode_examples, collate
    need = max(batch_sizes) * n_distinct
    texts = text_windows(need + 8, int(seq * 6.5))         # ~4.3 chars/token on this prose: always > seq tokens
    ex = encode_examples([{'text': t, 'response_start': None} for t in texts], t_tok, s_tok, seq)
    rows = [{k: v[i] for k, v in ex.items()} for i in range(len(ex['student_input_ids']))]
    assert len(rows) >= need, (len(rows), need)
    sp, tp = s_tok.pad_token_id or 0, t_tok.pad_token_id or 0
    return {b: [collate(rows[k * b:(k + 1) * b], sp, tp) for k in range(n_distinct)] for b in batch_sizes}


# --------------------------------------------------------------------------------------------------------- proposed fixes
def _rope_in_autocast_dtype(module, args, kwargs, out):
    "Forward hook on a HF rotary embedding: return cos/sin in the autocast dtype while autocast is on."
    x = args[0] if args else kwargs.get('x', kwargs.get('hidden_states'))
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(o.to(dt) for o in out)
    return out

def add_rope_fix(model):
    """The library's fix (kd_kaggle.models.keep_rotary_in_autocast_dtype; load_student/load_teacher apply it): rotary cos/sin
    follow the autocast dtype, so an fp32 student under fp16 autocast feeds SDPA q, k, v of one dtype."""
    from kd_kaggle.models import keep_rotary_in_autocast_dtype
    keep_rotary_in_autocast_dtype(model)

def force_repeat_kv():
    """The library's fix (kd_kaggle.env.use_repeat_kv_for_sdpa; the trainer applies it on sm < 80): transformers repeats K/V
    heads instead of passing enable_gqa=True, which the memory-efficient SDPA kernel refuses (flash, sm80+, accepts it).
    On the H100 emulating a T4 it must be forced, since the card itself has flash."""
    from kd_kaggle.env import use_repeat_kv_for_sdpa
    return use_repeat_kv_for_sdpa()

@torch.no_grad()
def bucket_logp_gather(teacher_logits, rows_of_bucket, tail_mask, limit, temperature=1.0):
    "teacher_bucket_logp for an injective map (one teacher row per mapped bucket): a column gather + a masked logsumexp, no index_add_."
    z = teacher_logits[:, :limit].float() / temperature
    lse = z.logsumexp(-1, keepdim=True)
    return torch.cat([z.index_select(1, rows_of_bucket), z.masked_fill(~tail_mask, -math.inf).logsumexp(-1, keepdim=True)], 1) - lse

def bucket_microbench(bench, dev, reps=20, sizes=(1024, 4096)) -> dict:
    "kd_kaggle.losses.teacher_bucket_logp (index_add_ over the teacher vocabulary) vs a gather for the injective vocab map."
    from kd_kaggle.losses import teacher_bucket_logp
    bm = bench.bmap
    counts = torch.bincount(bm.teacher_bucket, minlength=bm.n_mapped + 1)
    out = {'n_mapped': bm.n_mapped, 'tail_rows': int(counts[-1]), 'max_teacher_rows_per_mapped_bucket': int(counts[:-1].max())}
    if out['max_teacher_rows_per_mapped_bucket'] != 1: return {**out, 'skipped': 'map is not injective'}
    rows = torch.empty(bm.n_mapped, dtype=torch.long, device=dev)
    mapped = (bm.teacher_bucket < bm.n_mapped).nonzero().squeeze(1)
    rows[bm.teacher_bucket[mapped]] = mapped
    tail_mask = bm.teacher_bucket == bm.n_mapped
    g = torch.Generator(device=dev).manual_seed(0)
    for n in sizes:
        logits = torch.randn(n, bm.teacher_rows, device=dev, generator=g) * 3
        a, b = teacher_bucket_logp(logits, bm), bucket_logp_gather(logits, rows, tail_mask, bm.teacher_vocab_limit)
        diff = float((a.exp() - b.exp()).abs().max())
        ref = teacher_bucket_logp(logits[:64].double(), bm).exp()     # float64 reference on 64 rows
        err = {k: float((x[:64].double().exp() - ref).abs().max()) for k, x in (('index_add_', a), ('gather', b))}
        times = {}
        for name, fn in (('index_add_', lambda: teacher_bucket_logp(logits, bm)),
                         ('gather', lambda: bucket_logp_gather(logits, rows, tail_mask, bm.teacher_vocab_limit))):
            for _ in range(3): fn()
            ts = []
            for _ in range(reps):
                if dev.type == 'cuda':
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record(); fn(); e1.record(); e1.synchronize(); ts.append(e0.elapsed_time(e1))
                else:
                    t0 = time.perf_counter(); fn(); ts.append(1e3 * (time.perf_counter() - t0))
            times[name] = statistics.median(ts)
        out[f'rows_{n}'] = {'ms_index_add_': times['index_add_'], 'ms_gather': times['gather'], 'speedup': times['index_add_'] / times['gather'],
                            'max_abs_prob_diff': diff, 'max_abs_prob_err_vs_fp64': err}
        del logits, a, b
    return out


# --------------------------------------------------------------------------------------------------------- steps
class Bench:
    "Everything one model pair needs: models, tokenizers, vocab map, batches, initial student weights."
    def __init__(self, name, t_cfg, s_cfg, args, dev):
        from kd_kaggle.align import load_tokenizer, build_vocab_map
        from kd_kaggle.config import KDConfig
        from kd_kaggle.losses import bucket_map
        self.name, self.t_cfg, self.s_cfg, self.args, self.dev = name, t_cfg, s_cfg, args, dev
        tok_dir = REPO / 'tests' / 'fixtures' / 'tokenizers'
        self.t_tok, self.s_tok = load_tokenizer(str(tok_dir / 'qwen2')), load_tokenizer(str(tok_dir / 'smollm2'))
        self.limit = len(self.t_tok)
        self.vocab_map = build_vocab_map(self.t_tok, self.s_tok, teacher_rows=t_cfg['vocab_size']).to(dev)
        self.bmap = bucket_map(self.vocab_map, s_cfg['vocab_size'], self.limit).to(dev)
        self.cfg = KDConfig()
        t0 = time.perf_counter()
        self.teacher = build_model(t_cfg, args.teacher_dtype, dev, seed=1).eval().requires_grad_(False)
        self.student = build_model(s_cfg, torch.float32, dev, seed=0).train()
        if args.rope_fix: self.hooks = [add_rope_fix(self.student), add_rope_fix(self.teacher)]
        self.init_state = {k: v.detach().to('cpu', copy=True) for k, v in self.student.state_dict().items()}
        self.build_s = time.perf_counter() - t0
        self.n_student = sum(p.numel() for p in self.student.parameters())
        self.n_teacher = sum(p.numel() for p in self.teacher.parameters())
        t0 = time.perf_counter()
        self.batches = {seq: make_batches(self.t_tok, self.s_tok, seq, args.batches, args.n_distinct) for seq in args.seqs}
        self.data_s = time.perf_counter() - t0
        self.targets = {}   # (batch, seq) -> list of TeacherTargets on the CPU (one per distinct batch)
        self.kd_counts = {}  # (batch, seq) -> list of per-example KD counts
        self.caches = {}    # (batch, seq) -> kd_kaggle.cache.TeacherCache over those targets
        self.cache_error = None

    def reset_student(self):
        self.student.load_state_dict(self.init_state)
        self.student.zero_grad(set_to_none=True)

    def teacher_to(self, device):
        self.teacher.to(device)

    @torch.no_grad()
    def precompute_targets(self, b, seq):
        "Top-k TeacherTargets at the KD positions of each batch of (b, seq), and a kd_kaggle.cache shard holding them."
        from kd_kaggle.losses import teacher_targets_from_logits, head_logits, TeacherTargets
        from kd_kaggle.models import final_hidden_states, head_spec
        from kd_kaggle.train import kd_position_mask
        try: from kd_kaggle.cache import batch_targets
        except Exception: batch_targets = None
        out, counts = [], []
        for batch in self.batches[seq][b]:
            bt = {k: v.to(self.dev) for k, v in batch.items()}
            if batch_targets is not None:
                t, c = batch_targets(self.teacher, bt, self.bmap, TOP_K_CACHE, self.cfg.temperature, self.cfg.kd_positions,
                                     torch.float16 if self.args.fp16 else None, self.cfg.loss_chunk)
            else:
                with self.args.autocast():
                    t_last, _ = final_hidden_states(self.teacher, bt['teacher_input_ids'], bt['teacher_attention_mask'])
                kd = kd_position_mask(bt, self.cfg.kd_positions)
                bi, si = kd.nonzero(as_tuple=True)
                h = t_last[bi, bt['s2t'][bi, si]]
                th = head_spec(self.teacher)
                parts = [teacher_targets_from_logits(head_logits(h[i:i + 1024], th.weight, th.bias, th.scale, th.softcap), self.bmap,
                                                     self.s_cfg['vocab_size'], top_k=TOP_K_CACHE, teacher_vocab_limit=self.limit)
                         for i in range(0, len(h), 1024)]
                t = TeacherTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in ('ids', 'logp', 'rest_logp')))
                c = kd.sum(1)
            out.append(TeacherTargets(t.ids.cpu(), t.logp.float().cpu(), t.rest_logp.float().cpu())); counts.append(c.cpu())
        self.targets[(b, seq)], self.kd_counts[(b, seq)] = out, counts
        if batch_targets is not None and self.cache_error is None:
            try: self.caches[(b, seq)] = self._write_cache(b, seq, out, counts)
            except Exception as e:
                self.cache_error = f'{type(e).__name__}: {e}'[:300]; traceback.print_exc()

    def _write_cache(self, b, seq, targets, counts):
        "One kd_kaggle.cache shard (the cache's on-disk format) with the examples of (b, seq), opened as a TeacherCache."
        import numpy as np
        from kd_kaggle.cache import write_shard, TeacherCache, ids_dtype_for, bytes_per_position, CACHE_FORMAT
        d = Path(self.args.cache_root) / f"{re.sub(r'[^a-z0-9]+', '-', self.name)}-{b}x{seq}"
        d.mkdir(parents=True, exist_ok=True)
        vs, n = self.s_cfg['vocab_size'], sum(len(c) for c in counts)
        cat = lambda f: torch.cat([getattr(t, f) for t in targets]).numpy()
        ids, logp, rest = cat('ids'), cat('logp'), cat('rest_logp')
        rec = write_shard(d / 'shard-00000.safetensors', {'ids': ids.astype(ids_dtype_for(vs)), 'logp': logp.astype(np.float16),
                                                          'rest_logp': rest.astype(np.float16),
                                                          'counts': torch.cat(counts).numpy().astype(np.int32)},
                          {'format': CACHE_FORMAT, 'start': 0, 'stop': n})
        k = ids.shape[1]
        man = {'format': CACHE_FORMAT, 'k': k, 'top_k': TOP_K_CACHE, 'kd_positions': self.cfg.kd_positions, 'teacher_metrics': None,
               'logp_dtype': 'float16', 'bytes_per_position': bytes_per_position(k, vs, 'float16'),
               'shards': [{'index': 0, 'start': 0, 'stop': n, 'rows': len(ids), **rec}]}
        return TeacherCache(d, man, verify='lazy')


def make_step(variant, bench: Bench, args):
    "(step(batch_idx) -> None, params, extra objects to keep alive) for one variant."
    from kd_kaggle.curriculum import Curriculum
    from kd_kaggle.losses import fused_distill_loss, seed_naive_kd_loss
    from kd_kaggle.models import final_hidden_states, head_spec
    from kd_kaggle.router import Router
    from kd_kaggle.train import Distiller, kd_position_mask
    student, teacher, cfg = bench.student, bench.teacher, bench.cfg
    torch.manual_seed(0)
    router = None
    if variant == 'default':
        router = Router.from_config(cfg, student, teacher).to(bench.dev)
        weights = Curriculum(cfg.curriculum).weights(0.5)
    else:
        weights = {'ce': 1.0, 'kd': 1.0, 'feat': 0.0, 'layer': 0.0, 'attn': 0.0, 'contr': 0.0}
    groups = [{'params': [p for p in student.parameters() if p.requires_grad], 'lr': cfg.lr}]
    if router is not None: groups.append({'params': list(router.parameters()), 'lr': cfg.router_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(bench.dev.type, enabled=args.fp16)
    params = [p for g in groups for p in g['params']]
    distiller = None
    if variant in ('default', 'kd_only'):
        distiller = Distiller(student, teacher, cfg, bench.vocab_map, bench.limit, router)
    sh = head_spec(student)

    def loss_of(batch, targets):
        if variant == 'naive':   # the seed: full logits on both sides, ids truncated to the student vocab, T=4
            s_logits = student(input_ids=batch['student_input_ids'], attention_mask=batch['student_attention_mask'],
                               use_cache=False).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=batch['teacher_input_ids'], attention_mask=batch['teacher_attention_mask'],
                                   use_cache=False).logits
            T = min(s_logits.shape[1], t_logits.shape[1])
            mask = batch['student_attention_mask'][:, :T].bool() & batch['teacher_attention_mask'][:, :T].bool()
            kd = seed_naive_kd_loss(s_logits[:, :T], t_logits[:, :T], temperature=4.0, mask=mask).loss
            ce = F.cross_entropy(s_logits.float().reshape(-1, s_logits.shape[-1]), batch['student_labels'].reshape(-1),
                                 ignore_index=-100)
            return ce + kd
        if variant in CACHED:  # no teacher: KD from precomputed top-k TeacherTargets over student ids
            s_last, _ = final_hidden_states(student, batch['student_input_ids'], batch['student_attention_mask'])
            labels = batch['student_labels']
            kd_mask = kd_position_mask(batch, cfg.kd_positions)
            rows = (labels != -100) | kd_mask
            out = fused_distill_loss(s_last[rows], sh.weight, labels[rows], kd_mask[rows], teacher=targets,
                                     divergence=cfg.divergence, temperature=cfg.temperature, scale_t2=cfg.t2_scaling,
                                     ce_weight=1.0, kd_weight=1.0, chunk_size=cfg.loss_chunk, student_head_bias=sh.bias,
                                     logit_softcap=sh.softcap, logit_scale=sh.scale, check_finite=False)
            return out.loss
        loss, _ = distiller(batch, weights)
        return loss

    def step(batch, targets=None):
        with args.autocast():
            loss = loss_of(batch, targets)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(opt); scaler.update()
        opt.zero_grad(set_to_none=True)

    return step, scaler, (opt, router, distiller)


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

def free(dev):
    gc.collect()
    if dev.type == 'cuda': torch.cuda.empty_cache()


def run_config(variant, bench: Bench, b, seq, args, peak_tflops, profile_steps=0):
    "One row: median step time, tokens/s, peak memory and MFU of `variant` at batch `b` x `seq` (or its OOM)."
    dev = bench.dev
    row = dict(variant=variant, model_pair=bench.name, batch=b, seq=seq, tok_s=None, peak_gib=None, mfu=None, oom=False)
    if variant in CACHED and (b, seq) not in bench.targets:
        return {**row, 'error': 'no teacher targets: the teacher pass that precomputes them ran out of memory'}, None
    bench.reset_student()
    free(dev)
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    batches = [{k: v.to(dev) for k, v in x.items()} for x in bench.batches[seq][b]]
    reader, note = None, None
    if variant == 'cached' and (b, seq) in bench.caches:
        reader = bench.caches[(b, seq)]
        targets = [(torch.arange(j * b, (j + 1) * b), bench.kd_counts[(b, seq)][j]) for j in range(len(batches))]
    elif variant in CACHED:
        targets = [t.to(dev) for t in bench.targets[(b, seq)]]
        if variant == 'cached': note = f"kd_kaggle.cache unusable ({bench.cache_error or 'not importable'}): targets preloaded on the GPU"
    else: targets = [None] * len(batches)
    from kd_kaggle.train import kd_position_mask
    n_kd = [int(kd_position_mask(x, bench.cfg.kd_positions).sum()) for x in batches]
    tokens = [int(x['student_attention_mask'].sum()) for x in batches]
    flops = [step_flops(variant, bench.s_cfg, bench.t_cfg, x, k) for x, k in zip(batches, n_kd)]
    times, skipped, err, prof_out = [], 0, None, None
    step = scaler = keep = None
    try:
        step, scaler, keep = make_step(variant, bench, args)
        if reader is not None:   # the cache read (host gather from the memory-mapped shard + copy to the GPU) is part of the step
            inner = step
            def step(batch, t): return inner(batch, reader.targets_for(t[0], t[1], device=dev))
        n = args.warmup + args.steps
        for i in range(n):
            j = i % len(batches)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            sync(dev); t0 = time.perf_counter()
            step(batches[j], targets[j])
            sync(dev); dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append((dt, j))
                if scaler.is_enabled() and scaler.get_scale() < scale: skipped += 1
        if profile_steps:
            prof_out = profile_steps_of(step, batches, targets, profile_steps, dev)
    except torch.OutOfMemoryError as e:
        row['oom'] = True; err = str(e).split('\n')[0][:200]
    except Exception as e:  # a bug in a variant must not lose the other rows
        row['error'] = f'{type(e).__name__}: {str(e)[:300]}'; traceback.print_exc()
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else None
    step = scaler = keep = None; batches = targets = None
    bench.student.zero_grad(set_to_none=True)
    free(dev)
    if row['oom']:
        row['note'] = f'OOM under the {args.mem_cap_gib:g} GiB cap ({err})'
        row['peak_gib_at_oom'] = peak
        return row, None
    if 'error' in row: return row, None
    if note: row['note'] = note
    if reader is not None: row['note'] = 'targets read through kd_kaggle.cache.TeacherCache.targets_for inside the timed step'
    med = statistics.median(dt for dt, _ in times)
    row.update(tok_s=statistics.median(tokens[j] / dt for dt, j in times), peak_gib=peak,
               step_ms=1e3 * med, step_ms_all=[round(1e3 * dt, 2) for dt, _ in times],
               tokens_per_step=statistics.mean(tokens), n_kd_per_step=statistics.mean(n_kd),
               flops_per_step=statistics.mean(flops), tflops=statistics.median(flops[j] / dt for dt, j in times) / 1e12,
               scaler_skipped_steps=skipped)
    if peak_tflops: row['mfu'] = row['tflops'] / peak_tflops
    return row, prof_out


# --------------------------------------------------------------------------------------------------------- profile
_CATS = [('gemm (matmul)', re.compile(r'gemm|nvjet|cutlass|xmma|wgmma|cublas|s1688|s16816|sm90_|sm80_|sm75_', re.I)),
         ('attention (SDPA mem-efficient)', re.compile(r'fmha|attention|flash|mem_eff', re.I)),
         ('optimizer (AdamW foreach) / grad clip', re.compile(r'multi_tensor|foreach|adam|norm_kernel', re.I)),
         ('copy / cast / cat / index', re.compile(r'copy|memcpy|memset|cat|index|gather|scatter|fill', re.I)),
         ('softmax / logsumexp / reductions', re.compile(r'softmax|logsumexp|reduce|sum|max|min', re.I)),
         ('other elementwise', re.compile(r'.'))]

def profile_steps_of(step, batches, targets, n, dev):
    "Top kernels by self device time over `n` steps, per-category totals, and the GPU-busy fraction of the wall time."
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
    sync(dev)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(n): step(batches[i % len(batches)], targets[i % len(batches)])
        sync(dev); wall = time.perf_counter() - t0
    ev = prof.key_averages()
    dself = lambda e: getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0) or 0
    kernels = [e for e in ev if dself(e) > 0 and not e.key.startswith(('aten::', 'autograd::', 'torch::', 'Optimizer.', 'cuda'))] \
        or [e for e in ev if dself(e) > 0]
    total = sum(dself(e) for e in kernels)
    top = sorted(kernels, key=dself, reverse=True)[:15]
    cats = {}
    for e in kernels:
        name = next(c for c, rx in _CATS if rx.search(e.key))
        cats[name] = cats.get(name, 0) + dself(e)
    ops = sorted([e for e in ev if e.key.startswith('aten::')], key=lambda e: getattr(e, 'device_time_total', 0) or getattr(e, 'cuda_time_total', 0), reverse=True)[:12]
    return {'steps': n, 'wall_ms_per_step': 1e3 * wall / n, 'kernel_ms_per_step': total / 1e3 / n,
            'gpu_busy_fraction': (total / 1e6) / wall if wall else None,
            'categories_ms_per_step': {k: v / 1e3 / n for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            'top_kernels': [{'name': e.key[:110], 'ms_per_step': dself(e) / 1e3 / n, 'share': dself(e) / total if total else None,
                             'calls_per_step': e.count / n} for e in top],
            'top_aten_ops': [{'name': e.key, 'device_ms_per_step': (getattr(e, 'device_time_total', 0) or getattr(e, 'cuda_time_total', 0)) / 1e3 / n,
                              'calls_per_step': e.count / n} for e in ops]}


# --------------------------------------------------------------------------------------------------------- eval check
def eval_check(bench: Bench, args) -> dict:
    "kd_kaggle.evaluate.evaluate in fp16 (choose_precision('fp16', detect_device())) with the fp32 student: the seed crashed here."
    from kd_kaggle.env import choose_precision, detect_device
    from kd_kaggle.evaluate import evaluate, to_jsonable
    dev = bench.dev
    try:
        policy = choose_precision('fp16' if dev.type == 'cuda' else 'fp32', detect_device())
        b = 4 if 4 in bench.batches[args.seqs[0]] else min(bench.batches[args.seqs[0]])
        batches = [{k: v.to(dev) for k, v in x.items()} for x in bench.batches[args.seqs[0]][b][:2]]
        t0 = time.perf_counter()
        m = evaluate(bench.student, bench.teacher, batches, bench.vocab_map, policy, kd_positions=bench.cfg.kd_positions)
        keep = ('student_bpb', 'teacher_bpb', 'student_loss', 'teacher_loss', 'agreement', 'kl', 'tail_mass', 'aligned_positions',
                'tokens', 'batches', 'examples')
        return {'ok': True, 'model_pair': bench.name, 'policy': {'mixed': policy.mixed, 'teacher_dtype': str(policy.teacher_dtype),
                'autocast_dtype': str(policy.autocast_dtype)}, 'student_param_dtype': str(next(bench.student.parameters()).dtype),
                'teacher_param_dtype': str(next(bench.teacher.parameters()).dtype), 'batch': b, 'seq': args.seqs[0],
                'seconds': time.perf_counter() - t0, 'metrics': to_jsonable({k: m[k] for k in keep if k in m})}
    except Exception as e:
        traceback.print_exc()
        return {'ok': False, 'model_pair': bench.name, 'error': f'{type(e).__name__}: {e}'[:500]}


def matmul_peak(dev, n=8192, reps=10) -> float | None:
    "Measured fp16 matmul TFLOP/s of this card (median of `reps` n^3 products on random data)."
    if dev.type != 'cuda': return None
    a, b = torch.randn(n, n, device=dev, dtype=torch.float16), torch.randn(n, n, device=dev, dtype=torch.float16)
    for _ in range(3): a @ b
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
    del a, b; torch.cuda.empty_cache()
    return 2 * n ** 3 / statistics.median(ts) / 1e12


# --------------------------------------------------------------------------------------------------------- report
def fmt(x, spec, none='–'):
    return none if x is None else format(x, spec)

def summarize(rows) -> dict:
    "Ratios against the issue's targets, per model pair."
    out = {}
    for pair in dict.fromkeys(r['model_pair'] for r in rows):
        R = [r for r in rows if r['model_pair'] == pair]
        ok = lambda v, s=None: [r for r in R if r['variant'] == v and r['tok_s'] and (s is None or r['seq'] == s)]
        best = {v: max(ok(v), key=lambda r: r['tok_s'], default=None) for v in VARIANTS}
        mem = []
        for a in ok('naive'):
            bdef = next((r for r in ok('default') if r['batch'] == a['batch'] and r['seq'] == a['seq']), None)
            if bdef and bdef['peak_gib'] and a['peak_gib']: mem.append({'batch': a['batch'], 'seq': a['seq'], 'ratio': bdef['peak_gib'] / a['peak_gib']})
        fits = {v: max(((r['batch'], r['seq']) for r in ok(v)), key=lambda bs: bs[0] * bs[1], default=None) for v in VARIANTS}
        s = {'peak_default_over_naive_equal_batch': mem,
             'max_batch_x_seq_that_fits': {v: f'{x[0]}x{x[1]}' if x else None for v, x in fits.items()},
             'default_fits_8x1024': any(r['batch'] >= 8 and r['seq'] >= 1024 for r in ok('default')),
             'best': {v: ({'batch': r['batch'], 'seq': r['seq'], 'tok_s': r['tok_s'], 'mfu': r['mfu'], 'peak_gib': r['peak_gib']} if r else None)
                      for v, r in best.items()}}
        if best['default'] and best['naive']: s['tok_s_best_default_over_best_naive'] = best['default']['tok_s'] / best['naive']['tok_s']
        if best['cached'] and best['default']: s['tok_s_best_cached_over_best_default'] = best['cached']['tok_s'] / best['default']['tok_s']
        if best['cached_gpu'] and best['default']: s['tok_s_best_cached_gpu_over_best_default'] = best['cached_gpu']['tok_s'] / best['default']['tok_s']
        if best['kd_only']: s['mfu_kd_only_best'] = best['kd_only']['mfu']
        out[pair] = s
    return out

def _jsonable(o):
    "NaN/inf -> None, unknown objects -> str, so the JSON is strict."
    if isinstance(o, dict): return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)): return [_jsonable(v) for v in o]
    if isinstance(o, float): return o if math.isfinite(o) else None
    if isinstance(o, (int, str, bool)) or o is None: return o
    return str(o)

def write_results(out_dir: Path, meta: dict, rows: list, extras: dict):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}-{meta['gpu_slug']}{meta.get('suffix', '')}"
    summary = summarize(rows)
    doc = {'meta': meta, 'rows': rows, 'summary': summary, **extras}
    (out_dir / f'{stem}.json').write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + '\n')
    L = [f"# kd_kaggle training step: {meta['device']} ({meta['date']})" + (' — with the proposed attention fix (RoPE dtype + no enable_gqa)' if meta.get('attn_fix')
         else ' — with the RoPE-dtype hook only' if meta.get('rope_fix') else ''), '',
         f"{meta['setup']}", '',
         *([('**--rope-fix**: a forward hook casts the rotary cos/sin of both models to the autocast dtype, emulating the library '
             'change proposed in the report. On its own it does not change the attention kernel: unpadded batches still reach SDPA '
             'with enable_gqa=True, which the memory-efficient kernel refuses (see force_repeat_kv / --attn-fix).'), ''] if meta.get('rope_fix') else []),
         f"Measured fp16 matmul peak of this card: **{fmt(meta.get('peak_tflops'), '.0f')} TFLOP/s** (MFU denominator). "
         f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['elapsed_s']:.0f} s for this run.", '',
         '| pair | variant | batch×seq | tok/s | step ms | peak GiB | MFU | note |', '|---|---|---|---:|---:|---:|---:|---|']
    for r in rows:
        note = 'OOM' + (' (inferred: a smaller batch OOMed)' if r.get('oom_inferred') else '') if r['oom'] else \
            r.get('error') or r.get('note') or ''
        if r.get('scaler_skipped_steps'): note = (note + f"; {r['scaler_skipped_steps']} fp16 steps skipped by GradScaler").lstrip('; ')
        L.append(f"| {r['model_pair']} | {r['variant']} | {r['batch']}×{r['seq']} | {fmt(r['tok_s'], ',.0f')} | "
                 f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r['peak_gib'], '.2f')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {note} |")
    L += ['', '## Against the targets', '']
    for pair, s in summary.items():
        L.append(f"**{pair}**")
        mem = ', '.join(f"{m['batch']}×{m['seq']}: {m['ratio']:.2f}" for m in s['peak_default_over_naive_equal_batch']) or 'no batch where both ran'
        L.append(f"- peak memory default / naive at equal batch (target ≤ 0.5): {mem}")
        L.append(f"- largest batch×seq that fits under the cap: " + ', '.join(f"{v} {x or 'none'}" for v, x in s['max_batch_x_seq_that_fits'].items()))
        if 'tok_s_best_default_over_best_naive' in s:
            L.append(f"- tok/s default (best batch) / naive (best batch) (target ≥ 1.5): {s['tok_s_best_default_over_best_naive']:.2f}")
        if 'tok_s_best_cached_over_best_default' in s:
            L.append(f"- tok/s cached (best) / default (best) (target ≥ 2): {s['tok_s_best_cached_over_best_default']:.2f}")
        if 'tok_s_best_cached_gpu_over_best_default' in s:
            L.append(f"- tok/s cached_gpu (best, no cache I/O) / default (best): {s['tok_s_best_cached_gpu_over_best_default']:.2f}")
        if s.get('mfu_kd_only_best') is not None:
            L.append(f"- MFU of kd_only at its best batch (target ≥ 40%): {100 * s['mfu_kd_only_best']:.1f}%")
        L.append('')
    for key, prof in extras.get('profiles', {}).items():
        L += [f"## Profile: {key}", '',
              f"{prof['steps']} steps under torch.profiler: wall {prof['wall_ms_per_step']:.1f} ms/step, GPU kernels "
              f"{prof['kernel_ms_per_step']:.1f} ms/step (GPU busy {100 * (prof['gpu_busy_fraction'] or 0):.0f}% of the wall time).", '',
              '| category | ms/step | share of kernel time |', '|---|---:|---:|']
        for c, ms in prof['categories_ms_per_step'].items():
            L.append(f"| {c} | {ms:.2f} | {100 * ms / prof['kernel_ms_per_step']:.1f}% |")
        L += ['', '| top kernels by self CUDA time | ms/step | share | calls/step |', '|---|---:|---:|---:|']
        for k in prof['top_kernels']:
            L.append(f"| `{k['name'][:90]}` | {k['ms_per_step']:.2f} | {100 * (k['share'] or 0):.1f}% | {k['calls_per_step']:.0f} |")
        L += ['', '| top aten ops by CUDA time (inclusive) | ms/step | calls/step |', '|---|---:|---:|']
        for k in prof['top_aten_ops']:
            L.append(f"| `{k['name']}` | {k['device_ms_per_step']:.2f} | {k['calls_per_step']:.0f} |")
        L.append('')
    mb = extras.get('bucket_microbench')
    if mb:
        L += ['## Teacher bucket projection: index_add_ (library) vs gather (proposed)', '', '```', json.dumps(mb, indent=1), '```', '']
    ev = extras.get('eval_check')
    if ev:
        L += ['## Evaluation path in fp16 (fp32 master student, fp16 teacher)', '',
              ('works: ' + json.dumps({k: ev[k] for k in ('model_pair', 'policy', 'student_param_dtype', 'teacher_param_dtype', 'batch', 'seq')}) +
               ' → ' + json.dumps(ev['metrics'])) if ev.get('ok') else f"FAILED: {ev.get('error')}", '']
    L += ['## How the numbers are made', '', f"- FLOPs: {FLOPS_FORMULA}",
          '- tok/s: student tokens (attention mask) per second, median over the timed optimizer steps (each step timed '
          'wall-clock between torch.cuda.synchronize() calls, so host overhead and host-device syncs count); '
          f"{meta['warmup']} warm-up + {meta['steps']} timed steps cycling over {meta['n_distinct']} distinct batches.",
          '- peak GiB: torch.cuda.max_memory_allocated() over warm-up + timed steps, reset per configuration; it includes '
          'the weights (teacher fp16, student fp32), AdamW state and gradients.',
          f"- OOM: torch.OutOfMemoryError under set_per_process_memory_fraction = {meta['mem_cap_gib']} GiB; once a batch OOMs, "
          'larger batches of the same variant/pair/seq are recorded as OOM without running (marked inferred).', '']
    (out_dir / f'{stem}.md').write_text('\n'.join(L))
    return out_dir / f'{stem}.md'


# --------------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--smoke', action='store_true', help='CPU, tiny models, batch 1-2 x 64, 1 step per variant')
    ap.add_argument('--out', default=os.environ.get('OUT') or str(REPO / 'benchmarks' / 'results'))
    ap.add_argument('--date', default='2026-11-24')
    ap.add_argument('--budget-s', type=float, default=480, help='stop starting new configurations when less than 60 s are left')
    ap.add_argument('--mem-cap-gib', type=float, default=15.0)
    ap.add_argument('--batches', default='1,2,4,8,16')
    ap.add_argument('--seqs', default='1024,2048')
    ap.add_argument('--pairs', default=','.join(PAIRS))
    ap.add_argument('--variants', default=','.join(VARIANTS))
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--n-distinct', type=int, default=3, help='distinct batches cycled per configuration')
    ap.add_argument('--no-profile', action='store_true')
    ap.add_argument('--rope-fix', action='store_true', help='cast rotary cos/sin to the autocast dtype (the library change proposed in the report)')
    ap.add_argument('--attn-fix', action='store_true', help='--rope-fix and force_repeat_kv(): the full attention fix proposed in '
                    'the report (NOT yet measured on a GPU when this script was written)')
    ap.add_argument('--bucket-microbench', action='store_true', help='also time teacher_bucket_logp (index_add_) against a gather')
    ap.add_argument('--suffix', default='', help='appended to the result file names')
    ap.add_argument('--smoke-autocast', action='store_true', help='with --smoke: bf16 CPU autocast and a bf16 teacher')
    ap.add_argument('--cache-root', default='/tmp/kd_step_cache', help='where the cached variant writes its kd_kaggle.cache shards')
    ap.add_argument('--render', default=None, metavar='JSON', help='only rewrite the markdown of an existing results JSON (into --out)')
    args = ap.parse_args()
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        extras = {k: v for k, v in doc.items() if k not in ('meta', 'rows', 'summary')}
        print(write_results(Path(args.out), doc['meta'], doc['rows'], extras)); return
    T0 = time.perf_counter()
    if args.attn_fix:
        args.rope_fix = True
        force_repeat_kv()
    args.batches = [int(x) for x in args.batches.split(',')]; args.seqs = [int(x) for x in args.seqs.split(',')]
    pairs = SMOKE_PAIRS if args.smoke else {k: PAIRS[k] for k in args.pairs.split(',')}
    variants = [v for v in args.variants.split(',') if v]
    if args.smoke:
        args.batches, args.seqs, args.warmup, args.steps, args.n_distinct = [1, 2], [64], 0, 1, 1
    dev = torch.device('cuda' if torch.cuda.is_available() and not args.smoke else 'cpu')
    args.fp16 = dev.type == 'cuda'
    args.teacher_dtype = torch.float16 if args.fp16 else torch.float32
    args.autocast = (lambda: torch.autocast('cuda', dtype=torch.float16)) if args.fp16 else contextlib.nullcontext
    if args.smoke_autocast and dev.type == 'cpu':   # exercise the mixed-precision code paths on a CPU (bf16: CPU autocast has no fp16 matmul)
        args.teacher_dtype, args.autocast = torch.bfloat16, (lambda: torch.autocast('cpu', dtype=torch.bfloat16))
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from torch.nn.attention import sdpa_kernel, SDPBackend
    # what a T4 can dispatch to: flash and cuDNN attention need sm80+, so memory-efficient, else math (transformers passes
    # enable_gqa=True when a batch has no padding; where the efficient kernel refuses that, SDPA falls back to math, as on a T4)
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if dev.type == 'cuda' else [SDPBackend.MATH]
    import transformers
    name = torch.cuda.get_device_name(0) if dev.type == 'cuda' else f'cpu ({platform.processor() or platform.machine()})'
    meta = {'date': args.date, 'device': name, 'gpu_slug': re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:40] if dev.type == 'cuda' else 'cpu-smoke',
            'torch': torch.__version__, 'transformers': transformers.__version__, 'mem_cap_gib': args.mem_cap_gib,
            'warmup': args.warmup, 'steps': args.steps, 'n_distinct': args.n_distinct, 'sdpa_backends': [str(b) for b in backends],
            'flops_formula': FLOPS_FORMULA, 'smoke': args.smoke, 'cached_targets_source': None, 'suffix': args.suffix,
            'rope_fix': args.rope_fix, 'attn_fix': args.attn_fix,
            'setup': ('Kaggle-T4 emulation: fp16 autocast + GradScaler, teacher fp16, student fp32 + AdamW (lr 3e-4, wd 0.01, clip 1.0), '
                      f'allocator capped at {args.mem_cap_gib:g} GiB, SDPA limited to the memory-efficient kernel + math fallback (what sm_75 has), no torch.compile. '
                      'Random-weight Qwen2.5 teachers and SmolLM2 students built from the real configs; real tokenizers '
                      '(tests/fixtures) and real prose (Austen, kd_kaggle/demo_assets) through encode_examples + collate. '
                      "'cached': top-64 TeacherTargets computed per batch with the teacher outside the timed region, written as a "
                      "kd_kaggle.cache shard and read through TeacherCache.targets_for inside the timed step; 'cached_gpu': the same targets "
                      "preloaded on the GPU; for both the teacher is moved to the CPU first.")}
    if dev.type == 'cuda':
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / total))
        meta['card_memory_gib'] = total / 2**30
    try:
        import importlib.util
        has_cache = importlib.util.find_spec('kd_kaggle.cache') is not None
    except Exception: has_cache = False
    meta['cached_targets_source'] = ('kd_kaggle.cache: batch_targets (teacher pass, outside the timed region) -> write_shard -> '
                                     'TeacherCache.targets_for (inside the timed step)') if has_cache else \
        'kd_kaggle/cache.py absent: TeacherTargets precomputed with kd_kaggle.losses.teacher_targets_from_logits(top_k=64), preloaded on the GPU'
    import hashlib
    meta['library_sha256'] = hashlib.sha256(b''.join(f.read_bytes() for f in sorted((REPO / 'kd_kaggle').glob('*.py')))).hexdigest()[:16]
    meta['peak_tflops'] = matmul_peak(dev)
    print(f"device {name}, fp16 matmul peak {meta['peak_tflops']} TFLOP/s", flush=True)
    out_dir = Path(args.out)
    rows, extras = [], {'profiles': {}, 'eval_check': None, 'pair_info': {}}
    left = lambda: args.budget_s - (time.perf_counter() - T0)

    def save():
        meta['elapsed_s'] = time.perf_counter() - T0
        return write_results(out_dir, meta, rows, extras)

    def record(row):
        rows.append(row)
        print(f"{row['model_pair']:28s} {row['variant']:8s} {row['batch']:3d}x{row['seq']:<5d} tok/s {fmt(row['tok_s'], '10,.0f')} "
              f"peak {fmt(row['peak_gib'], '6.2f')} GiB mfu {fmt(row['mfu'] and 100 * row['mfu'], '5.1f')} "
              f"{'OOM' if row['oom'] else row.get('error', '')} [{time.perf_counter() - T0:.0f}s]", flush=True)
        save()

    def sweep(bench, variant, seq, peak):
        oomed = False
        for b in args.batches:
            base = dict(variant=variant, model_pair=bench.name, batch=b, seq=seq, tok_s=None, peak_gib=None, mfu=None)
            if oomed or (seq != args.seqs[0] and any(r['oom'] and r['variant'] == variant and r['model_pair'] == bench.name
                                                     and r['seq'] < seq and r['batch'] <= b for r in rows)):
                record({**base, 'oom': True, 'oom_inferred': True}); continue
            if left() < 60:
                record({**base, 'oom': False, 'note': 'not run: time budget of this GPU call exhausted'}); continue
            row, _ = run_config(variant, bench, b, seq, args, peak)
            record(row)
            oomed = oomed or row['oom']

    with sdpa_kernel(backends):
        for pname, (t_cfg, s_cfg) in pairs.items():
            if left() < 60:
                print(f'skipping pair {pname}: time budget', flush=True); continue
            try:
                bench = Bench(pname, t_cfg, s_cfg, args, dev)
            except torch.OutOfMemoryError as e:
                print(f'{pname}: models do not fit: {e}', flush=True); free(dev); continue
            extras['pair_info'][pname] = {'student_params': bench.n_student, 'teacher_params': bench.n_teacher,
                                          'student_matmul_params': matmul_params(s_cfg), 'teacher_matmul_params': matmul_params(t_cfg),
                                          'teacher_vocab_limit': bench.limit, 'build_s': bench.build_s, 'data_s': bench.data_s,
                                          'one_to_one_fraction': {seq: float(torch.cat([(x['one_to_one'] & (x['student_labels'] != -100)).flatten() for x in bench.batches[seq][max(args.batches)]]).float().sum()
                                                                           / torch.cat([(x['student_labels'] != -100).flatten() for x in bench.batches[seq][max(args.batches)]]).float().sum())
                                                                  for seq in args.seqs}}
            print(f"{pname}: built in {bench.build_s:.1f}s, data {bench.data_s:.1f}s, student {bench.n_student / 1e6:.1f}M, "
                  f"teacher {bench.n_teacher / 1e6:.1f}M", flush=True)
            if extras['eval_check'] is None:
                extras['eval_check'] = eval_check(bench, args); print('eval check:', extras['eval_check'], flush=True); save()
            if args.bucket_microbench and 'bucket_microbench' not in extras:
                try: extras['bucket_microbench'] = bucket_microbench(bench, dev, *((2, (256,)) if args.smoke else ()))
                except Exception as e: extras['bucket_microbench'] = {'error': f'{type(e).__name__}: {e}'[:300]}; traceback.print_exc()
                print('bucket microbench:', extras['bucket_microbench'], flush=True); save(); free(dev)
            seq0 = args.seqs[0]
            for v in [v for v in variants if v not in CACHED]: sweep(bench, v, seq0, meta['peak_tflops'])
            # profile kd_only (and default) at its best batch of the first seq
            if not args.no_profile and (not extras['profiles'] or args.smoke):
                for v in [v for v in ('kd_only', 'default') if v in variants]:
                    ok = [r for r in rows if r['model_pair'] == pname and r['variant'] == v and r['seq'] == seq0 and r['tok_s']]
                    if not ok or left() < 90: continue
                    best = max(ok, key=lambda r: r['tok_s'])
                    _, prof = run_config(v, bench, best['batch'], seq0, args, meta['peak_tflops'], profile_steps=3)
                    if prof: extras['profiles'][f"{pname} {v} {best['batch']}x{seq0}"] = prof; save()
            if any(v in variants for v in CACHED) and left() > 60:
                for seq in args.seqs:
                    for b in args.batches:
                        try: bench.precompute_targets(b, seq)
                        except torch.OutOfMemoryError as e: print(f'{pname}: precomputing targets for {b}x{seq} OOMed: {str(e)[:200]}', flush=True)
                        free(dev)
                bench.teacher_to('cpu'); free(dev)
                meta['cache_error'] = bench.cache_error
                for seq in args.seqs:
                    for v in [v for v in CACHED if v in variants]: sweep(bench, v, seq, meta['peak_tflops'])
                bench.teacher_to(dev)
            for seq in args.seqs[1:]:
                for v in [v for v in variants if v not in CACHED]: sweep(bench, v, seq, meta['peak_tflops'])
            del bench; free(dev)
    md = save()
    print(f'\nwrote {md} and its .json ({time.perf_counter() - T0:.0f} s)\n')
    print(md.read_text())


if __name__ == '__main__':
    main()
