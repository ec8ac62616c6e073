"""Heavier checks of kd_kaggle.losses: float64 formulas, chunked vs naive gradients, bad inputs, memory shape."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from kd_kaggle.losses import (
    BUCKET_DIVERGENCES, DIVERGENCES, LOG_FLOOR, OnlineTeacher, TeacherTargets, attention_alignment_loss,
    bucket_map, feature_loss, forward_kl, fused_distill_loss, info_nce, jsd, kd_loss, layer_loss,
    naive_distill_loss, reverse_kl, seed_naive_kd_loss, skew_kl, skew_reverse_kl, sorted_l1,
    student_target_logp, teacher_bucket_logp, teacher_targets_from_logits, tvd,
)

F64 = torch.float64
torch.set_num_threads(1)  # the CI box is shared; these tensors are tiny


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def kl(a, b):
    "Direct float64 KL on probabilities, 0·log 0 = 0."
    return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)


def direct(name, P, Q, beta=0.5, alpha=0.1):
    "Each divergence written from its definition on probabilities."
    if name == 'fkl': return kl(P, Q)
    if name == 'rkl': return kl(Q, P)
    if name == 'jsd':
        M = beta * P + (1 - beta) * Q
        return beta * kl(P, M) + (1 - beta) * kl(Q, M)
    if name == 'skl': return kl(P, alpha * P + (1 - alpha) * Q)
    if name == 'srkl': return kl(Q, alpha * Q + (1 - alpha) * P)
    if name == 'tvd': return 0.5 * (P - Q).abs().sum(-1)
    raise KeyError(name)


def rand_logp(n, b, scale, gen):
    return torch.log_softmax(torch.randn(n, b, dtype=F64, generator=gen) * scale, -1)


def toy_map(vt, vs, limit, gen, unmapped=0.3, reach=0.8):
    "teacher→student map: some rows unmapped, student ids ≥ reach·vs never reached, padding rows ≥ limit."
    vmap = torch.randint(0, max(1, int(vs * reach)), (vt,), generator=gen)
    vmap[torch.rand(vt, generator=gen) < unmapped] = -1
    vmap[limit:] = 0  # must be ignored whatever it says
    return vmap


def problem(n=23, ds=6, dt=9, vs=31, vt=57, limit=53, seed=0, dtype=F64, kd_frac=0.7, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    vmap = toy_map(vt, vs, limit, g)
    h = (torch.randn(n, ds, dtype=dtype, generator=g)).requires_grad_()
    w = (torch.randn(vs, ds, dtype=dtype, generator=g) * 0.7).requires_grad_()
    b = (torch.randn(vs, dtype=dtype, generator=g) * 0.1).requires_grad_()
    teacher = OnlineTeacher(torch.randn(n, dt, dtype=dtype, generator=g), torch.randn(vt, dt, dtype=dtype, generator=g))
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    kd_mask = torch.rand(n, generator=g) < kd_frac
    return dict(h=h, w=w, b=b, teacher=teacher, labels=labels, kd_mask=kd_mask, vmap=vmap, limit=limit)


def compare(p, chunk_size=4, with_bias=False, **kw):
    "Run fused and naive on the same inputs; check loss, parts and gradients (float64)."
    args = dict(labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], vocab_map=p['vmap'],
                teacher_vocab_limit=p['limit'])
    args.update(kw)
    if with_bias: args['student_head_bias'] = p['b']
    leaves = [p['h'], p['w']] + ([p['b']] if with_bias else [])
    fo = fused_distill_loss(p['h'], p['w'], chunk_size=chunk_size, **args)
    no = naive_distill_loss(p['h'], p['w'], **args)
    for k in ('loss', 'ce', 'kd_raw', 'kd'):
        assert torch.allclose(getattr(fo, k), getattr(no, k), rtol=1e-10, atol=1e-12), k
    assert fo.n_ce.item() == no.n_ce.item() and fo.n_kd.item() == no.n_kd.item()
    gf = torch.autograd.grad(fo.loss, leaves, allow_unused=True)
    gn = torch.autograd.grad(no.loss, leaves, allow_unused=True)
    for a, b in zip(gf, gn):
        assert (a is None) == (b is None)
        if a is not None: assert rel_err(a, b) <= 1e-5, rel_err(a, b)
    return fo, no


# ---------------------------------------------------------------- divergences vs float64 formulas
@pytest.mark.parametrize('name', list(BUCKET_DIVERGENCES))
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_divergence_matches_direct_formula(name, seed):
    g = torch.Generator().manual_seed(seed)
    p, q = rand_logp(7, 40, 3.0, g), rand_logp(7, 40, 3.0, g)
    kw = dict(beta=0.3) if name == 'jsd' else dict(alpha=0.2) if name in ('skl', 'srkl') else {}
    got = BUCKET_DIVERGENCES[name](p, q, **kw)
    want = direct(name, p.exp(), q.exp(), **{('beta' if name == 'jsd' else 'alpha'): v for v in kw.values()})
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 30), st.floats(0.1, 6.0), st.floats(0.01, 0.99))
def test_divergence_bounds(seed, b, scale, w):
    g = torch.Generator().manual_seed(seed)
    p, q = rand_logp(3, b, scale, g), rand_logp(3, b, scale, g)
    for name, f in BUCKET_DIVERGENCES.items():
        assert (f(p, q) >= -1e-12).all() and f(p, p).abs().max() < 1e-12, name
    assert (tvd(p, q) <= 1 + 1e-12).all()
    assert (jsd(p, q, w) <= -(w * math.log(w) + (1 - w) * math.log(1 - w)) + 1e-12).all()  # ≤ H(β)
    assert (skew_kl(p, q, w) <= math.log(1 / w) + 1e-12).all()
    assert (skew_reverse_kl(p, q, w) <= math.log(1 / w) + 1e-12).all()


def test_jsd_scaled_limits_and_endpoints():
    g = torch.Generator().manual_seed(3)
    p, q = rand_logp(5, 12, 2.0, g), rand_logp(5, 12, 2.0, g)
    assert torch.equal(jsd(p, q, 0.0), forward_kl(p, q)) and torch.equal(jsd(p, q, 1.0), reverse_kl(p, q))
    for eps in (1e-9, 1e-11):
        assert torch.allclose(jsd(p, q, eps) / eps, forward_kl(p, q), rtol=1e-5)
        assert torch.allclose(jsd(p, q, 1 - eps) / eps, reverse_kl(p, q), rtol=1e-4)
    assert (jsd(p, q, 1e-3) < 1e-2 * forward_kl(p, q)).all()  # the unscaled JSD itself vanishes
    assert torch.equal(skew_kl(p, q, 0.0), forward_kl(p, q)) and torch.equal(skew_reverse_kl(p, q, 0.0), reverse_kl(p, q))


def test_empty_buckets_are_finite_with_finite_grads():
    p = torch.tensor([[math.log(0.6), math.log(0.4), -math.inf, -math.inf]], dtype=F64)
    q = torch.tensor([[math.log(0.3), math.log(0.3), math.log(0.4), -math.inf]], dtype=F64, requires_grad=True)
    for name, f in BUCKET_DIVERGENCES.items():
        v = f(p, q)
        (g,) = torch.autograd.grad(v.sum(), q)
        assert torch.isfinite(v).all() and torch.isfinite(g).all(), name
    # teacher empty where the student has mass: forward KL exact, reverse KL capped by the floor
    assert torch.allclose(forward_kl(p, q), direct('fkl', p.exp(), q.exp()))
    assert reverse_kl(p, q).item() <= 0.4 * (math.log(0.4) - LOG_FLOOR) + 1.0


def test_sorted_l1():
    g = torch.Generator().manual_seed(4)
    P, Q = torch.softmax(torch.randn(3, 9, dtype=F64, generator=g), -1), torch.softmax(torch.randn(3, 5, dtype=F64, generator=g), -1)
    Qp = F.pad(Q.sort(-1, descending=True).values, (0, 4))
    assert torch.allclose(sorted_l1(P, Q), (P.sort(-1, descending=True).values - Qp).abs().sum(-1), rtol=1e-12)
    assert torch.allclose(sorted_l1(P, P[:, torch.randperm(9)]), torch.zeros(3, dtype=F64))
    assert (sorted_l1(P, Q) <= 2).all()


# ---------------------------------------------------------------- buckets, targets, top-k
def test_bucket_projection_matches_loop():
    g = torch.Generator().manual_seed(5)
    vt, vs, limit = 40, 15, 36
    vmap = toy_map(vt, vs, limit, g)
    bm = bucket_map(vmap, vs, limit)
    tl, sl = torch.randn(6, vt, dtype=F64, generator=g) * 3, torch.randn(6, vs, dtype=F64, generator=g) * 3
    T = 1.7
    pt = torch.softmax(tl[:, :limit] / T, -1)
    qs = torch.softmax(sl / T, -1)
    M = sorted({int(s) for s in vmap[:limit] if s >= 0})
    assert bm.mapped_ids.tolist() == M
    ref_p = torch.stack([pt[:, [t for t in range(limit) if vmap[t] == s]].sum(1) for s in M]
                        + [pt[:, [t for t in range(limit) if vmap[t] < 0]].sum(1)], 1)
    ref_q = torch.stack([qs[:, s] for s in M] + [qs[:, [s for s in range(vs) if s not in M]].sum(1)], 1)
    assert torch.allclose(teacher_bucket_logp(tl, bm, T).exp(), ref_p, rtol=1e-12)
    tt = teacher_targets_from_logits(tl, vmap, vs, temperature=T, teacher_vocab_limit=limit)
    assert torch.allclose(student_target_logp(torch.log_softmax(sl / T, -1), tt.ids).exp(), ref_q, rtol=1e-12)
    for name in BUCKET_DIVERGENCES:
        got = kd_loss(sl, tl, vmap, teacher_vocab_limit=limit, temperature=T, divergence=name).raw
        assert torch.allclose(got, direct(name, ref_p, ref_q).mean(), rtol=1e-11), name


def test_teacher_padding_rows_are_ignored():
    g = torch.Generator().manual_seed(6)
    vmap = toy_map(30, 12, 26, g)
    tl, sl = torch.randn(4, 30, dtype=F64, generator=g), torch.randn(4, 12, dtype=F64, generator=g)
    tl2 = tl.clone(); tl2[:, 26:] = 50.0  # huge logits on padding rows change nothing
    a = kd_loss(sl, tl, vmap, teacher_vocab_limit=26).raw
    assert torch.equal(a, kd_loss(sl, tl2, vmap, teacher_vocab_limit=26).raw)
    assert not torch.allclose(a, kd_loss(sl, tl2, torch.cat([vmap[:26], torch.full((4,), -1)])).raw)


@pytest.mark.parametrize('divergence', DIVERGENCES)
def test_fused_loss_ignores_the_teacher_heads_padding_rows(divergence):
    "Head rows past teacher_vocab_limit carry no mass in the fused loss, even with huge logits (they join the tail at −inf)."
    p = problem(seed=9)
    t = p['teacher']
    loud = t.head_weight.clone(); loud[p['limit']:] *= 1e3
    run = lambda w: fused_distill_loss(p['h'], p['w'], labels=p['labels'], kd_mask=p['kd_mask'], teacher=OnlineTeacher(t.hidden, w),
                                       vocab_map=p['vmap'], teacher_vocab_limit=p['limit'], divergence=divergence, chunk_size=4)
    a, b = run(t.head_weight), run(loud)
    assert torch.allclose(a.kd_raw, b.kd_raw, rtol=1e-12) and torch.isfinite(b.kd_raw)
    ref = kd_loss(p['h'] @ p['w'].T, t.hidden @ t.head_weight.T, p['vmap'], mask=p['kd_mask'], teacher_vocab_limit=p['limit'],
                  divergence=divergence).raw
    assert torch.allclose(a.kd_raw, ref, rtol=1e-10)


@pytest.mark.parametrize('name', list(BUCKET_DIVERGENCES))
def test_topk_with_k_at_least_M_equals_dense(name):
    g = torch.Generator().manual_seed(7)
    vmap = toy_map(50, 20, 47, g)
    m = bucket_map(vmap, 20, 47).n_mapped
    tl, sl = torch.randn(5, 50, dtype=F64, generator=g) * 2, torch.randn(5, 20, dtype=F64, generator=g) * 2
    kw = dict(divergence=name, teacher_vocab_limit=47, temperature=1.3)
    dense = kd_loss(sl, tl, vmap, **kw).raw
    for k in (m, m + 5):
        assert torch.allclose(kd_loss(sl, tl, vmap, top_k=k, **kw).raw, dense, rtol=1e-12, atol=1e-15)
    # the explicit top-k path with k = |M| (rows sorted by probability, not by id)
    full = teacher_targets_from_logits(tl, vmap, 20, temperature=1.3, teacher_vocab_limit=47)
    logp, idx = full.logp.topk(m, -1)
    sorted_targets = TeacherTargets(full.ids.gather(1, idx), logp, full.rest_logp)
    assert torch.allclose(kd_loss(sl, sorted_targets, divergence=name, temperature=1.3).raw, dense, rtol=1e-12, atol=1e-15)
    # k < |M| is a different (coarser) loss
    assert not torch.allclose(kd_loss(sl, tl, vmap, top_k=2, **kw).raw, dense)


def test_topk_targets_are_normalised_and_cache_consistent():
    g = torch.Generator().manual_seed(8)
    vmap = toy_map(50, 20, 50, g)
    tl = torch.randn(6, 50, dtype=F64, generator=g) * 2
    for k in (1, 3, 7):
        t = teacher_targets_from_logits(tl, vmap, 20, top_k=k)
        assert t.ids.shape == (6, k) and (t.ids.sort(1).values.diff(dim=1) > 0).all()
        assert torch.allclose(t.logp.exp().sum(1) + t.rest_logp.exp(), torch.ones(6, dtype=F64), rtol=1e-12)
        assert (t.logp.min(1).values >= t.rest_logp.exp().log().clamp_max(0) - 100).all()
        dense = teacher_targets_from_logits(tl, vmap, 20)
        re = dense.top_k(k)
        assert torch.allclose(re.logp, t.logp) and torch.equal(re.ids, t.ids) and torch.allclose(re.rest_logp, t.rest_logp)


# ---------------------------------------------------------------- fused vs naive (float64)
@pytest.mark.parametrize('case', ['ce_only', 'kd_only', 'both', 'bias', 'softcap_scale', 'sum', 'T2', 'topk', 'n_kd_rows'])
@pytest.mark.parametrize('chunk_size', [1, 5, 1000])
def test_fused_matches_naive(case, chunk_size):
    p = problem(seed=len(case) * 7 + chunk_size)
    kw = {}
    if case == 'ce_only': kw = dict(teacher=None, kd_mask=None)
    if case == 'kd_only': kw = dict(labels=None)
    if case == 'softcap_scale': kw = dict(logit_softcap=3.0, logit_scale=0.8,
                                          teacher=OnlineTeacher(p['teacher'].hidden, p['teacher'].head_weight, logit_softcap=4.0, logit_scale=1.1))
    if case == 'sum': kw = dict(reduction='sum', ce_weight=0.3, kd_weight=2.0)
    if case == 'T2': kw = dict(temperature=2.5, scale_t2=True)
    if case == 'topk': kw = dict(top_k=4, divergence='jsd', beta=0.2)
    if case == 'n_kd_rows':  # teacher rows given only for the kd positions
        t = p['teacher']
        kw = dict(teacher=OnlineTeacher(t.hidden[p['kd_mask']], t.head_weight))
    fo, no = compare(p, chunk_size=chunk_size, with_bias=(case == 'bias'), **kw)
    if case == 'ce_only':
        assert fo.kd_raw.item() == 0 and fo.n_kd.item() == 0
        ref = F.cross_entropy(p['h'] @ p['w'].T, p['labels'], ignore_index=-100)
        assert torch.allclose(fo.loss, ref, rtol=1e-12)
    if case == 'T2': assert torch.allclose(fo.kd, fo.kd_raw * 6.25)


@pytest.mark.parametrize('temperature', [1.0, 2.0])
@pytest.mark.parametrize('divergence', ['fkl', 'rkl', 'jsd', 'tvd', 'hybrid'])
def test_fused_at_t1_equals_separate_ce_and_kd(divergence, temperature):
    "At T=1 CE and KD share one log-softmax per chunk; loss and gradients still equal cross_entropy + kd_loss on logits (bias too)."
    p = problem(seed=5)
    out = fused_distill_loss(p['h'], p['w'], labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], vocab_map=p['vmap'],
                             teacher_vocab_limit=p['limit'], divergence=divergence, temperature=temperature, chunk_size=4,
                             kd_weight=0.7, student_head_bias=p['b'])
    logits, t_logits = p['h'] @ p['w'].T + p['b'], p['teacher'].hidden @ p['teacher'].head_weight.T
    ce = F.cross_entropy(logits, p['labels'], ignore_index=-100)
    kd = kd_loss(logits[p['kd_mask']], t_logits[p['kd_mask']], p['vmap'], teacher_vocab_limit=p['limit'], divergence=divergence,
                 temperature=temperature).loss
    assert torch.allclose(out.ce, ce, rtol=1e-12) and torch.allclose(out.kd_raw, kd, rtol=1e-12)
    leaves = [p['h'], p['w'], p['b']]
    for a, b in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(ce + 0.7 * kd, leaves)):
        assert rel_err(a, b) <= 1e-10
    from kd_kaggle.losses import kd_rows, KDSpec
    with pytest.raises(ValueError, match='temperature'): kd_rows(logits.log_softmax(-1), t_logits, None, KDSpec(temperature=2.0), normalized=True)


def test_bucket_order_equals_gathered_buckets_and_is_refused_elsewhere():
    "Student columns in bucket order (mapped ids first, then the rest): the same KD as the gathers; refused where it cannot hold."
    from kd_kaggle.losses import kd_rows, KDSpec
    p = problem(seed=8)
    bm = bucket_map(p['vmap'], p['w'].shape[0], p['limit'])
    order = torch.cat([bm.mapped_ids, bm.student_unmapped])
    s_logits, t_logits = (p['h'] @ p['w'].T).detach(), p['teacher'].hidden @ p['teacher'].head_weight.T
    for div in BUCKET_DIVERGENCES:
        ref = kd_rows(s_logits, t_logits, bm, KDSpec(div))
        assert torch.allclose(kd_rows(s_logits[:, order], t_logits, bm, KDSpec(div), bucket_order=True), ref, rtol=1e-12, atol=1e-14)
    for bad in (KDSpec('fkl', top_k=3), KDSpec('hybrid'), KDSpec('uld')):
        with pytest.raises(ValueError, match='bucket_order'): kd_rows(s_logits[:, order], t_logits, bm, bad, bucket_order=True)


def test_bucket_layouts_are_built_once_per_map():
    "The padded-tail map and the student's bucket order are made on the first call and reused (the loss runs per micro-batch)."
    p = problem(seed=3)
    bm = bucket_map(p['vmap'], p['w'].shape[0], p['limit'])
    kw = dict(labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], vocab_map=bm, teacher_vocab_limit=p['limit'], chunk_size=4)
    a = fused_distill_loss(p['h'], p['w'], **kw)
    wide = bm.derived['padding_in_tail']; order = wide.derived['student_order']
    b = fused_distill_loss(p['h'], p['w'], **kw)
    assert bm.derived['padding_in_tail'] is wide and wide.derived['student_order'] is order and torch.equal(a.loss, b.loss)
    assert bm.to(bm.teacher_bucket.device) is bm


@pytest.mark.parametrize('divergence', DIVERGENCES)
def test_fused_matches_naive_every_divergence(divergence):
    p = problem(seed=11)
    compare(p, chunk_size=4, divergence=divergence, temperature=1.5, uld_top_m=(10 if divergence == 'uld' else None))


def test_fused_gradcheck_against_finite_differences():
    "Independent of the naive reference: the custom Function's grads vs central differences (float64)."
    p = problem(n=7, ds=3, dt=4, vs=9, vt=14, limit=13, seed=30)
    b = p['b']
    for div in ('fkl', 'jsd', 'hybrid'):
        def f(h, w, bias):
            return fused_distill_loss(h, w, labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], vocab_map=p['vmap'],
                                      teacher_vocab_limit=p['limit'], student_head_bias=bias, divergence=div, chunk_size=3,
                                      logit_softcap=4.0, temperature=1.7, scale_t2=True).loss
        assert torch.autograd.gradcheck(f, (p['h'], p['w'], b), eps=1e-6, atol=1e-7)


def test_fused_uld_without_map():
    p = problem(seed=12)
    fo, no = compare(p, chunk_size=3, divergence='uld', vocab_map=None)
    t = p['teacher']
    tl = (t.hidden @ t.head_weight.T)[p['kd_mask'], :p['limit']]
    sl = (p['h'] @ p['w'].T)[p['kd_mask']]
    ref = sorted_l1(torch.softmax(tl, -1), torch.softmax(sl, -1)).mean()
    assert torch.allclose(fo.kd_raw, ref, rtol=1e-12)


def test_fused_sparse_teacher_targets_equal_online():
    "A cached TeacherTargets (rows for kd positions only) gives the same loss and grads as the online teacher."
    p = problem(seed=13)
    t = p['teacher']
    with torch.no_grad():
        tl = (t.hidden @ t.head_weight.T)[p['kd_mask']]
    for k in (3, None):
        cached = teacher_targets_from_logits(tl, p['vmap'], 31, top_k=k, temperature=2.0, teacher_vocab_limit=p['limit'])
        cached = TeacherTargets(cached.ids.contiguous(), cached.logp.float(), cached.rest_logp.float()) if k else cached
        common = dict(labels=p['labels'], kd_mask=p['kd_mask'], temperature=2.0)
        online = fused_distill_loss(p['h'], p['w'], teacher=t, vocab_map=p['vmap'], teacher_vocab_limit=p['limit'], top_k=k, chunk_size=4, **common)
        sparse = fused_distill_loss(p['h'], p['w'], teacher=cached, chunk_size=4, **common)
        tol = 1e-6 if k else 1e-12  # k: the cache stored float32 log-probs
        assert torch.allclose(online.loss, sparse.loss, rtol=tol)
        for a, b in zip(torch.autograd.grad(online.loss, [p['h'], p['w']]), torch.autograd.grad(sparse.loss, [p['h'], p['w']])):
            assert rel_err(a, b) < tol * 10
        compare(p, chunk_size=4, teacher=cached, vocab_map=None, temperature=2.0)


def test_tied_embeddings_accumulate():
    "The head weight IS the embedding: its gradient = embedding-path grad + head-path grad, as with an untied copy."
    vs, d, n = 31, 6, 19
    p = problem(n=n, ds=d, vs=vs, seed=14)
    ids = torch.randint(0, vs, (n,), generator=torch.Generator().manual_seed(1))
    common = dict(labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], vocab_map=p['vmap'], teacher_vocab_limit=p['limit'])

    def grads(fn, tied, **kw):
        torch.manual_seed(0)
        emb, mix = torch.nn.Embedding(vs, d).double(), torch.nn.Linear(d, d).double()
        head = emb.weight if tied else torch.nn.Parameter(emb.weight.detach().clone())
        fn(torch.tanh(mix(emb(ids))), head, **common, **kw).loss.backward()
        return emb.weight.grad, mix.weight.grad, head.grad

    e_f, m_f, _ = grads(fused_distill_loss, True, chunk_size=4)
    e_n, m_n, _ = grads(naive_distill_loss, True)
    e_u, m_u, h_u = grads(fused_distill_loss, False, chunk_size=4)
    assert rel_err(e_f, e_n) <= 1e-10 and rel_err(m_f, m_n) <= 1e-10
    assert rel_err(e_f, e_u + h_u) <= 1e-10 and rel_err(m_f, m_u) <= 1e-12
    assert (e_u - e_f).abs().max() > 1e-3  # the head path really contributes


def test_gradient_accumulation_with_sum_reduction():
    "Two micro-batches with reduction='sum', divided by the global counts, equal one big mean."
    p = problem(n=30, seed=15)
    halves = [slice(0, 11), slice(11, 30)]
    common = dict(vocab_map=p['vmap'], teacher_vocab_limit=p['limit'], chunk_size=4)
    outs = [fused_distill_loss(p['h'][s], p['w'], labels=p['labels'][s], kd_mask=p['kd_mask'][s],
                               teacher=OnlineTeacher(p['teacher'].hidden[s], p['teacher'].head_weight), reduction='sum', **common)
            for s in halves]
    n_ce, n_kd = sum(o.n_ce for o in outs), sum(o.n_kd for o in outs)
    total = sum(o.ce for o in outs) / n_ce + sum(o.kd for o in outs) / n_kd
    whole = fused_distill_loss(p['h'], p['w'], labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], **common)
    assert torch.allclose(total, whole.loss.detach(), rtol=1e-12)


def test_double_backward_is_refused():
    p = problem(seed=31)
    out = fused_distill_loss(p['h'], p['w'], labels=p['labels'], chunk_size=4)
    (gh,) = torch.autograd.grad(out.loss, p['h'], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gh.sum(), p['w'])


def test_eval_mode_and_frozen_inputs():
    p = problem(seed=16)
    kw = dict(labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], vocab_map=p['vmap'], teacher_vocab_limit=p['limit'])
    train = fused_distill_loss(p['h'], p['w'], **kw)
    with torch.no_grad():
        ev = fused_distill_loss(p['h'], p['w'], **kw)
    assert ev.loss.grad_fn is None and torch.allclose(ev.loss, train.loss.detach(), rtol=1e-12)
    # only the head trains (hidden detached): gradient w.r.t. the weight only
    out = fused_distill_loss(p['h'].detach(), p['w'], **kw)
    (gw,) = torch.autograd.grad(out.loss, p['w'])
    assert rel_err(gw, torch.autograd.grad(naive_distill_loss(p['h'].detach(), p['w'], **kw).loss, p['w'])[0]) < 1e-10


def test_low_precision_inputs_stay_finite_and_close():
    "fp16 hidden/head on CPU and bf16 autocast: probabilities in float32, finite, close to the float32 result."
    p = problem(seed=17, dtype=torch.float32)
    kw = dict(labels=p['labels'], kd_mask=p['kd_mask'], vocab_map=p['vmap'], teacher_vocab_limit=p['limit'], chunk_size=4)
    ref = fused_distill_loss(p['h'], p['w'], teacher=p['teacher'], **kw)
    h16, w16 = p['h'].detach().half().requires_grad_(), p['w'].detach().half().requires_grad_()
    t16 = OnlineTeacher(p['teacher'].hidden.half(), p['teacher'].head_weight.half())
    out = fused_distill_loss(h16, w16, teacher=t16, **kw)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(h16.grad).all() and h16.grad.dtype == torch.float16
    assert torch.allclose(out.loss, ref.loss, rtol=2e-2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ac = fused_distill_loss(p['h'], p['w'], teacher=p['teacher'], **kw)
    (gw,) = torch.autograd.grad(ac.loss, p['w'])
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all() and torch.allclose(ac.loss, ref.loss, rtol=5e-2)


class _LargestTensor(TorchDispatchMode):
    "Records the largest number of elements of any tensor an op produces."
    def __init__(self):
        super().__init__(); self.largest = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor): self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_chunk_times_vocab():
    "No op of the fused loss (forward + backward) produces more than chunk × Vt elements; the naive one makes N × Vt."
    n, chunk, vs, vt, d = 96, 8, 300, 500, 4
    p = problem(n=n, ds=d, dt=d, vs=vs, vt=vt, limit=vt, seed=18, dtype=torch.float32, kd_frac=1.0)
    kw = dict(labels=p['labels'], kd_mask=p['kd_mask'], teacher=p['teacher'], vocab_map=bucket_map(p['vmap'], vs))
    sizes = {}
    for name, fn in (('fused', fused_distill_loss), ('naive', naive_distill_loss)):
        with _LargestTensor() as rec:
            out = fn(p['h'], p['w'], chunk_size=chunk, **kw)
            torch.autograd.grad(out.loss, [p['h'], p['w']])
        sizes[name] = rec.largest
    assert sizes['fused'] <= chunk * vt, sizes
    assert sizes['naive'] >= n * vt, sizes


# ---------------------------------------------------------------- bad input
def test_all_masked_batch_is_a_zero_loss_with_grad_fn():
    p = problem(seed=19)
    for fn in (fused_distill_loss, naive_distill_loss):
        out = fn(p['h'], p['w'], labels=torch.full_like(p['labels'], -100), kd_mask=torch.zeros_like(p['kd_mask']),
                 teacher=p['teacher'], vocab_map=p['vmap'], teacher_vocab_limit=p['limit'])
        assert out.loss.item() == 0 and out.loss.grad_fn is not None and out.n_ce.item() == 0 and out.n_kd.item() == 0
        gh, gw = torch.autograd.grad(out.loss, [p['h'], p['w']])
        assert gh.abs().sum() == 0 and gw.abs().sum() == 0
    out = fused_distill_loss(p['h'][:0], p['w'], labels=p['labels'][:0])  # zero positions at all
    assert out.loss.item() == 0 and out.loss.grad_fn is not None


def test_non_finite_inputs_raise():
    p = problem(seed=20)
    kw = dict(labels=p['labels'], kd_mask=p['kd_mask'], vocab_map=p['vmap'], teacher_vocab_limit=p['limit'])
    for bad in (math.nan, math.inf, -math.inf):
        h = p['h'].detach().clone(); h[0, 0] = bad
        with pytest.raises(FloatingPointError, match='loss is'):
            fused_distill_loss(h, p['w'], teacher=p['teacher'], **kw)
        tw = p['teacher'].head_weight.clone(); tw[3, 1] = bad
        with pytest.raises(FloatingPointError, match='KD loss is'):
            fused_distill_loss(p['h'], p['w'], teacher=OnlineTeacher(p['teacher'].hidden, tw), **kw)
    with pytest.raises(FloatingPointError, match='KD loss is'):
        kd_loss(torch.full((2, 31), math.nan, dtype=F64), torch.randn(2, 57, dtype=F64), p['vmap'])
    with pytest.raises(FloatingPointError):
        seed_naive_kd_loss(torch.full((2, 5), math.inf), torch.randn(2, 8))
    # -inf teacher logits on some rows (masked vocab) are legitimate: no error
    t = p['teacher']
    fused_distill_loss(p['h'], p['w'], teacher=OnlineTeacher(t.hidden, t.head_weight, head_bias=torch.where(
        torch.arange(57) % 5 == 0, -math.inf, 0.0).double()), **kw)


@pytest.mark.parametrize('mutate, error, match', [
    (lambda a: a.update(w=a['w'][:, :3]), ValueError, 'disagree'),
    (lambda a: a.update(labels=a['labels'][:-1]), ValueError, 'one per position'),
    (lambda a: a.update(labels=a['labels'].float()), TypeError, 'long'),
    (lambda a: a.update(labels=a['labels'] + 31), ValueError, 'labels must be'),
    (lambda a: a.update(labels=a['labels'].clamp_min(-5)), ValueError, 'labels must be'),
    (lambda a: a.update(kd_mask=a['kd_mask'].long()), ValueError, 'kd_mask must be bool'),
    (lambda a: a.update(vmap=a['vmap'][:-1]), ValueError, 'teacher head has'),
    (lambda a: a.update(vmap=a['vmap'] + 40), ValueError, 'vocab_map values'),
    (lambda a: a.update(vmap=a['vmap'].double()), TypeError, 'integer'),
    (lambda a: a.update(vmap=None), ValueError, 'needs a vocab_map'),
    (lambda a: a.update(teacher=OnlineTeacher(a['teacher'].hidden[:5], a['teacher'].head_weight)), ValueError, 'teacher has 5 rows'),
    (lambda a: a.update(teacher=OnlineTeacher(a['teacher'].hidden[:, :4], a['teacher'].head_weight)), ValueError, 'teacher hidden'),
    (lambda a: a.update(teacher=None), ValueError, 'no teacher'),
    (lambda a: a.update(extra=dict(divergence='kl')), ValueError, 'not in'),
    (lambda a: a.update(extra=dict(divergence='uld', top_k=5)), ValueError, 'top_k'),
    (lambda a: a.update(extra=dict(temperature=0.0)), ValueError, 'temperature'),
    (lambda a: a.update(extra=dict(chunk_size=0)), ValueError, 'chunk_size'),
    (lambda a: a.update(extra=dict(reduction='none')), ValueError, 'reduction'),
    (lambda a: a.update(extra=dict(student_head_bias=torch.zeros(3, dtype=F64))), ValueError, 'bias'),
])
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    a = problem(seed=21); a['extra'] = {}
    mutate(a)
    with pytest.raises(error, match=match):
        fused_distill_loss(a['h'], a['w'], labels=a['labels'], kd_mask=a['kd_mask'], teacher=a['teacher'], vocab_map=a['vmap'],
                           teacher_vocab_limit=a['limit'], **a['extra'])


def test_bad_teacher_targets():
    p = problem(seed=22)
    n_kd = int(p['kd_mask'].sum())
    with pytest.raises(ValueError, match='shapes'):
        TeacherTargets(torch.zeros(n_kd, 3, dtype=torch.long), torch.zeros(n_kd, 2), torch.zeros(n_kd))
    with pytest.raises(TypeError, match='integer'):
        TeacherTargets(torch.zeros(n_kd, 3), torch.zeros(n_kd, 3), torch.zeros(n_kd))
    assert TeacherTargets(torch.zeros(n_kd, 3, dtype=torch.int32), torch.zeros(n_kd, 3), torch.zeros(n_kd)).ids.dtype == torch.long
    bad_ids = TeacherTargets(torch.full((n_kd, 3), 31), torch.zeros(n_kd, 3), torch.zeros(n_kd))
    with pytest.raises(ValueError, match='student vocab'):
        fused_distill_loss(p['h'], p['w'], kd_mask=p['kd_mask'], teacher=bad_ids)
    ok = TeacherTargets(torch.zeros(n_kd, 3, dtype=torch.long) + torch.arange(3), torch.zeros(n_kd, 3) - 2, torch.zeros(n_kd) - 1)
    with pytest.raises(ValueError, match='OnlineTeacher'):
        fused_distill_loss(p['h'], p['w'], kd_mask=p['kd_mask'], teacher=ok, divergence='hybrid')
    with pytest.raises(ValueError, match='no tail bucket'):
        bucket_map(torch.tensor([0, 1, 2, -1]), 3)
    with pytest.raises(ValueError, match='teacher_vocab_limit'):
        bucket_map(torch.tensor([0, 1, 2, -1]), 4, teacher_vocab_limit=9)


# ---------------------------------------------------------------- auxiliary losses and the seed baseline
def test_aux_losses_formulas_invariance_and_zero():
    g = torch.Generator().manual_seed(23)
    s, t = torch.randn(2, 20, 48, dtype=F64, generator=g), torch.randn(2, 20, 48, dtype=F64, generator=g) * 30
    t[0, :3, 5] = 400  # a massive channel: raw MSE would be dominated by it
    mask = torch.rand(2, 20, generator=g) < 0.6
    S, Tt = s[mask], t[mask]
    cos = 1 - (S * Tt).sum(1) / S.norm(dim=1) / Tt.norm(dim=1)
    assert torch.allclose(feature_loss(s, t, mask=mask), cos.mean(), rtol=1e-12)
    assert torch.allclose(feature_loss(s, t, 'nmse', mask), ((S - Tt) ** 2).sum(1).div((Tt ** 2).sum(1)).mean(), rtol=1e-12)
    assert torch.allclose(layer_loss([s, t], [t, s], 'cosine', mask), cos.mean(), rtol=1e-12)
    for f in (lambda a, b: feature_loss(a, b, 'cosine', mask), lambda a, b: feature_loss(a, b, 'nmse', mask),
              lambda a, b: layer_loss([a], [b], 'nmse', mask), lambda a, b: info_nce(a, b, 0.1, mask)):
        assert torch.allclose(f(s * 100, t * 100), f(s, t), rtol=1e-9)
        assert 0.2 < f(s, t).item() < 8
    assert feature_loss(t, t, 'nmse').item() == 0 and feature_loss(t, t).abs().item() < 1e-12
    assert feature_loss(s, t, mask=torch.zeros_like(mask)).item() == 0
    with pytest.raises(ValueError): feature_loss(s, t[..., :3])
    with pytest.raises(ValueError): feature_loss(s, t, kind='mse')
    with pytest.raises(ValueError): layer_loss([s], [t, t])


def test_info_nce_magnitudes():
    g = torch.Generator().manual_seed(24)
    n, d, tau = 128, 576, 0.1
    s, t = torch.randn(n, d, dtype=F64, generator=g), torch.randn(n, d, dtype=F64, generator=g)
    assert abs(info_nce(s, t, tau).item() - (math.log(n) + 1 / (2 * tau ** 2 * d))) < 0.1
    tn = F.normalize(t, dim=-1)
    cos = tn @ tn.T
    floor = torch.log1p(((cos - 1) / tau).exp().sum(1) - 1).mean()  # the minimum at student = target
    assert torch.allclose(info_nce(t, t, tau), floor, rtol=1e-9) and floor < 1e-2
    assert info_nce(s, t, mask=torch.zeros(n, dtype=torch.bool)).item() == 0


def test_attention_alignment():
    g = torch.Generator().manual_seed(25)
    s = torch.softmax(torch.randn(2, 4, 6, 10, dtype=F64, generator=g), -1)
    t = torch.softmax(torch.randn(2, 2, 6, 10, dtype=F64, generator=g) * 2, -1)
    mask = torch.rand(2, 6, generator=g) < 0.7
    ref = kl(t.mean(1), s.mean(1))[mask].mean()
    assert torch.allclose(attention_alignment_loss(s, t, mask), ref, rtol=1e-12)
    assert torch.allclose(attention_alignment_loss(s * 100, t * 0.01, mask), ref, rtol=1e-12)
    assert attention_alignment_loss(t, t, mask).item() == 0
    t4 = torch.softmax(torch.randn(2, 4, 6, 10, dtype=F64, generator=g), -1)
    assert torch.allclose(attention_alignment_loss(s, t4, heads='matched'), kl(t4, s).mean(), rtol=1e-12)
    # pooled rows that lost mass are renormalised; rows with no mass are skipped
    lossy = t4.clone(); lossy[0, :, 0] *= 0.5; lossy[1, :, 1] = 0
    keep = torch.ones(2, 6, dtype=torch.bool); keep[1, 1] = False
    ref2 = kl(t4.mean(1), s.mean(1))[keep].mean()
    assert torch.allclose(attention_alignment_loss(s, lossy), ref2, rtol=1e-12)
    with pytest.raises(ValueError, match='matched'): attention_alignment_loss(s, t, heads='matched')
    with pytest.raises(ValueError, match='shapes'): attention_alignment_loss(s[..., :3], t)


def test_seed_naive_kd_loss():
    g = torch.Generator().manual_seed(26)
    sl, tl = torch.randn(3, 4, 20, dtype=F64, generator=g), torch.randn(3, 4, 70, dtype=F64, generator=g) * 2
    mask = torch.rand(3, 4, generator=g) < 0.5
    out = seed_naive_kd_loss(sl, tl, 4.0, mask)
    ref = kl(torch.softmax(tl[..., :20] / 4, -1), torch.softmax(sl / 4, -1))[mask].mean()
    assert torch.allclose(out.raw, ref, rtol=1e-12) and torch.allclose(out.loss, ref * 16, rtol=1e-12)
    with pytest.raises(ValueError, match='cover'): seed_naive_kd_loss(tl, sl)


def _fp16_problem(n=2048, d=64, vs=4096, dt=48, vt=4096, seed=0):
    "Trained-model-like logits: std ~2, and 60% of the ids pushed ~12 nats down (the rarely used ids of a real head)."
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g); h[:, 0] = 1.0
    w = torch.randn(vs, d, generator=g) * (2.0 / d ** 0.5)
    w[:, 0] = torch.where(torch.rand(vs, generator=g) < 0.6, -12.0, 0.0)
    labels = torch.randint(0, vs, (n,), generator=g); labels[w[labels, 0] < 0] = -100   # rare ids are never a label
    teacher = OnlineTeacher(torch.randn(n, dt, generator=g).half(), (torch.randn(vt, dt, generator=g) * (3.0 / dt ** 0.5)).half())
    vmap = torch.randint(-1, vs, (vt,), generator=g)
    return dict(h=h, w=w, labels=labels, kd_mask=torch.rand(n, generator=g) < 0.9, teacher=teacher, vmap=vmap)


def _scaled_grads(p, term, chunk, autocast, dtype=torch.float32, scale=2.0 ** 16):
    "Head/hidden gradients as the trainer gets them: under fp16 autocast, loss × GradScaler's factor, then unscaled."
    h, w = p['h'].to(dtype, copy=True).requires_grad_(), p['w'].to(dtype, copy=True).requires_grad_()
    t = p['teacher'] if dtype != F64 else OnlineTeacher(p['teacher'].hidden.double(), p['teacher'].head_weight.double())
    with torch.autocast('cpu', dtype=torch.float16, enabled=autocast):
        out = fused_distill_loss(h, w, labels=p['labels'], kd_mask=p['kd_mask'], teacher=t, vocab_map=p['vmap'],
                                 ce_weight=float(term != 'kd'), kd_weight=float(term != 'ce'), chunk_size=chunk)
    (out.loss * (scale if autocast else 1.0)).backward()
    return [x.grad.double() / (scale if autocast else 1.0) for x in (w, h)]


@pytest.mark.parametrize('term', ['ce', 'kd', 'both'])
def test_fused_gradients_under_fp16_autocast(term):
    "The T4 path: fused (chunked) gradients under fp16 autocast are as exact as unchunked autocast; no head row frozen."
    p = _fp16_problem()
    ref = _scaled_grads(p, term, None, autocast=False, dtype=F64)
    fused, plain = _scaled_grads(p, term, 512, autocast=True), _scaled_grads(p, term, None, autocast=True)
    for got, base, want in zip(fused, plain, ref):
        assert rel_err(got, want) <= 1.1 * rel_err(base, want) + 1e-4, (rel_err(got, want), rel_err(base, want))
    moved = ref[0].abs().amax(1) > 0
    assert ((fused[0].abs().amax(1) == 0) & moved).sum() == 0                     # every row fp64 moves, fp16 moves
    row_err = ((fused[0] - ref[0]).norm(dim=1) / ref[0].norm(dim=1).clamp_min(1e-300))[moved]
    assert row_err.max() < 2e-2, row_err.max()                                    # rare rows too, not just the norm


def test_mean_over_gives_token_weighted_micro_batches():
    "Two micro-batches with `mean_over` = the step's counts sum to the loss and gradients of one batch of both."
    p = problem(seed=21, dtype=F64)
    kw = dict(teacher=p['teacher'], vocab_map=p['vmap'], teacher_vocab_limit=p['limit'], chunk_size=3, ce_weight=0.6, kd_weight=1.4)
    whole = fused_distill_loss(p['h'], p['w'], labels=p['labels'], kd_mask=p['kd_mask'], **kw)
    (gw_whole,) = torch.autograd.grad(whole.loss, p['w'])
    cut = 5                                   # an uneven cut: micro-batch means would weigh its tokens differently
    counts = ((p['labels'] != -100).sum(), p['kd_mask'].sum())
    total, gw = 0, 0
    for sl in (slice(0, cut), slice(cut, None)):
        t = OnlineTeacher(p['teacher'].hidden[sl], p['teacher'].head_weight)
        out = fused_distill_loss(p['h'][sl], p['w'], labels=p['labels'][sl], kd_mask=p['kd_mask'][sl], mean_over=counts,
                                 **{**kw, 'teacher': t})
        total = total + out.loss.detach(); gw = gw + torch.autograd.grad(out.loss, p['w'])[0]
    assert torch.allclose(total, whole.loss.detach(), rtol=1e-12) and rel_err(gw, gw_whole) < 1e-12
