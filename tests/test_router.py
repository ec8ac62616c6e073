"Router: attention capture equals eager attention, every term is finite at init, vanishes on identical features, decreases when optimised, trains the mixtures, costs nothing when off, and bad inputs fail clearly."
import math, warnings
import pytest, torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from kd_kaggle.config import KDConfig
from kd_kaggle.router import (AttentionCapture, Router, aligned_positions, aligned_rows, check_alignment, fake_aligned_batch,
                              pool_by_chunk)

torch.set_num_threads(1)  # tiny shapes; the CI cores are shared
ALL = {'feat': 1.0, 'layer': 1.0, 'attn': 1.0, 'contr': 1.0}

def tiny_teacher(seed=0, **kw):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128, **kw)).eval()

def tiny_student(seed=1, **kw):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128, **kw))

def forward_terms(router, student, teacher, batch, weights=ALL, teacher_mode=torch.no_grad):
    with router.capture(teacher, 'teacher', weights) as tcap, teacher_mode():
        t_hs = teacher.model(input_ids=batch['teacher_input_ids'], attention_mask=batch['teacher_attention_mask'],
                             output_hidden_states=True).hidden_states
    with router.capture(student, 'student', weights) as scap:
        s_hs = student.model(input_ids=batch['student_input_ids'], attention_mask=batch['student_attention_mask'],
                             output_hidden_states=True).hidden_states
    return router.loss_terms(s_hs, t_hs, batch, weights, scap, tcap), s_hs, t_hs

@pytest.fixture(scope='module')
def pair(): return tiny_student(), tiny_teacher()

@pytest.fixture(scope='module')
def batch(): return fake_aligned_batch(4, n_chunks=(12, 20), seed=0)

def identity_batch(B=3, T=12, V=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g); ids[:, 0] = 0
    chunk = torch.arange(T).expand(B, T) - 1
    ones = torch.ones(B, T, dtype=torch.long)
    return {'student_input_ids': ids, 'teacher_input_ids': ids, 'student_attention_mask': ones, 'teacher_attention_mask': ones,
            's2t': torch.arange(T).expand(B, T).clone(), 's_chunk': chunk, 't_chunk': chunk.clone()}

# --- alignment -------------------------------------------------------------------------------------------------------------

def test_fake_alignment_is_consistent():
    for seed in range(5):
        b = fake_aligned_batch(3, seed=seed)
        check_alignment(b)
        bi, i, j = aligned_positions(b)
        assert (b['s_chunk'][bi, i] == b['t_chunk'][bi, j]).all()
        assert (b['student_attention_mask'][bi, i] == 1).all() and (b['teacher_attention_mask'][bi, j] == 1).all()
        rs, rt, valid = aligned_rows(b)
        assert torch.equal(rs[valid], i) and torch.equal(rt[valid], j)
        # every text chunk has exactly one compared pair (its end); the doc-start special has none
        assert len(bi) == int((b['s_chunk'].max(1).values + 1).sum())

@pytest.mark.parametrize('change,msg', [
    (lambda b: {**b, 's_chunk': b['s_chunk'][:, :-1]}, "batch['s_chunk'] has shape"),
    (lambda b: {**b, 'teacher_attention_mask': b['teacher_attention_mask'][:1]}, "batch['teacher_attention_mask'] has shape"),
    (lambda b: {**b, 't_chunk': b['t_chunk'][1:]}, "need [B, Tt] with the same B"),
    (lambda b: {k: v for k, v in b.items() if k != 's2t'}, 'lacks alignment arrays'),
])
def test_bad_alignment_arrays(change, msg):
    with pytest.raises(ValueError, match=msg.replace('[', r'\[').replace(']', r'\]')): check_alignment(change(fake_aligned_batch(2)))

def test_hidden_states_from_another_batch(pair, batch):
    student, teacher = pair
    router = Router.from_models(student, teacher)
    _, s_hs, t_hs = forward_terms(router, student, teacher, batch, {})
    other = fake_aligned_batch(4, n_chunks=(3, 4), seed=9)
    with pytest.raises(ValueError, match='different batches'): router.loss_terms(s_hs, t_hs, other, {'feat': 1.0})
    with pytest.raises(ValueError, match='expected 4 hidden states'): router.loss_terms(s_hs[1:], t_hs, batch, {'feat': 1.0})
    with pytest.raises(ValueError, match=r'must be \[B, T, 64\]'): router.loss_terms(s_hs, [h[..., :32] for h in t_hs], batch, {'feat': 1.0})

# --- attention capture -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('which', ['teacher', 'student'])
def test_capture_matches_eager(which):
    model = tiny_teacher() if which == 'teacher' else tiny_student().eval()
    b = fake_aligned_batch(3, seed=2)
    ids, mask = b[f'{which}_input_ids'], b[f'{which}_attention_mask']
    assert model.config._attn_implementation == 'sdpa'
    layers = list(range(model.config.num_hidden_layers))
    with AttentionCapture(model, layers) as cap, torch.no_grad(): model(input_ids=ids, attention_mask=mask)
    assert cap.calls == len(layers)
    model.set_attn_implementation('eager')
    with torch.no_grad(): ref = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()
    for l in layers:
        p = cap.probs(l, key_mask=mask)
        assert p.shape == ref[l].shape
        err = (p - ref[l]).abs().amax(-1).transpose(1, 2)[real].max().item()
        assert err < 1e-5, (l, err)
        rows = torch.tensor([[3, 1], [0, 2], [4, 4]])  # a subset of query rows gives the same rows
        sub = cap.probs(l, rows, key_mask=mask)
        assert torch.allclose(sub, p.gather(2, rows[:, None, :, None].expand(-1, p.shape[1], -1, p.shape[-1])), atol=1e-6)

def test_capture_errors():
    s = tiny_student()
    with pytest.raises(ValueError, match=r'LlamaForCausalLM has 3 layers \(valid indices 0..2.*attention layer 5|attention layer 5 does not exist: LlamaForCausalLM has 3 layers'):
        AttentionCapture(s, [5])
    class Fused(nn.Module):
        def __init__(self): super().__init__(); self.qkv_proj = nn.Linear(48, 144)
    s.model.layers[2].self_attn = Fused()
    with pytest.raises(ValueError, match='layer 2 .*does not expose self_attn.q_proj'): AttentionCapture(s, [2])
    with pytest.raises(ValueError, match='no `model.layers`'): AttentionCapture(nn.Linear(2, 2), [0])
    sw = tiny_teacher(use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(ValueError, match='sliding-window'): AttentionCapture(sw, [2])
    with pytest.raises(RuntimeError, match='run the model'): AttentionCapture(tiny_student(), [0]).probs(0)

def test_pool_by_chunk_sums_to_one():
    b = fake_aligned_batch(2, seed=3)
    s = tiny_student().eval()
    with AttentionCapture(s, [0]) as cap, torch.no_grad(): s(input_ids=b['student_input_ids'], attention_mask=b['student_attention_mask'])
    rows, _, valid = aligned_rows(b)
    pooled = pool_by_chunk(cap.probs(0, rows), b['s_chunk'], int(b['s_chunk'].max()) + 2)
    assert torch.allclose(pooled.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5)
    # at a query ending chunk c, no mass on later chunks
    c = b['s_chunk'].gather(1, rows)
    later = torch.arange(pooled.shape[-1])[None, None] > (c + 1)[..., None]
    assert pooled[later & valid[..., None]].abs().max() == 0

# --- terms ---------------------------------------------------------------------------------------------------------------

def test_terms_finite_and_order_one_at_init(pair, batch):
    student, teacher = pair
    router = Router.from_models(student, teacher)
    terms, s_hs, t_hs = forward_terms(router, student, teacher, batch)
    n = len(aligned_positions(batch)[0])
    assert set(terms) == set(ALL)
    for k, v in terms.items(): assert v.ndim == 0 and torch.isfinite(v), k
    assert 0.8 < terms['feat'].item() < 1.2 and 0.8 < terms['layer'].item() < 1.2   # 1 − cos of unrelated directions
    assert 0 < terms['attn'].item() < 2
    assert abs(terms['contr'].item() - math.log(n)) < 2                               # chance level ≈ ln N
    calib = fake_aligned_batch(16, n_chunks=(30, 40), seed=1)
    _, cs, ct = forward_terms(router, student, teacher, calib, {})
    r2 = router.calibrate(cs, ct, calib)
    assert set(r2) == set(router.slots) and all(0 <= v <= 1 for v in r2.values())
    after = forward_terms(router, student, teacher, batch)[0]
    assert after['feat'] < terms['feat'] and bool(router.calibrated)

def test_calibrate_warns_on_a_small_batch(pair, batch):
    student, teacher = pair
    router = Router.from_models(student, teacher)
    _, s_hs, t_hs = forward_terms(router, student, teacher, batch, {})
    with pytest.warns(UserWarning, match='mostly noise'): router.calibrate(s_hs, t_hs, batch)

def test_zero_on_identical_features():
    model = tiny_student(seed=3).eval()
    router = Router.from_models(model, model, layer_map=[0, 1], attn_layers=[0, 1, 2])
    with torch.no_grad():
        for s in router.slots:
            router.proj[s].weight.copy_(torch.eye(48)); router.proj[s].bias.zero_(); router.mix[s].mul_(10)
    b = identity_batch()
    for kind in ('cosine', 'nmse'):
        router.feature_kind = kind
        terms = forward_terms(router, model, model, b)[0]
        for k in ('feat', 'layer', 'attn'): assert abs(terms[k].item()) < 1e-5, (kind, k, terms[k])
    with torch.no_grad(): router.proj['final'].weight.copy_(torch.eye(48)[torch.randperm(48, generator=torch.Generator().manual_seed(0))])
    assert forward_terms(router, model, model, b, {'contr': 1.0})[0]['contr'] > terms['contr'] + 1

@pytest.mark.parametrize('term,steps', [('feat', 150), ('layer', 150), ('attn', 200), ('contr', 150)])
def test_each_term_decreases_when_optimised(term, steps):
    student, teacher = tiny_student(seed=0), tiny_teacher(seed=0)
    b = fake_aligned_batch(4, n_chunks=(12, 20), seed=4)
    router = Router.from_models(student, teacher)
    opt = torch.optim.Adam([*student.parameters(), *router.parameters()], lr=3e-3)
    hist = []
    for _ in range(steps):
        loss = forward_terms(router, student, teacher, b, {term: 1.0})[0][term]
        opt.zero_grad(); loss.backward(); opt.step(); hist.append(loss.item())
    assert all(math.isfinite(h) for h in hist)
    assert hist[-1] < 0.5 * hist[0], (term, hist[0], hist[-1])

def test_gradients_reach_mixtures_and_student(pair, batch):
    student, teacher = pair
    router = Router.from_models(student, teacher)
    student.zero_grad()
    terms = forward_terms(router, student, teacher, batch)[0]
    sum(terms.values()).backward()
    for s in router.slots: assert router.mix[s].grad is not None and router.mix[s].grad.abs().sum() > 0, s
    for s in router.slots: assert router.proj[s].weight.grad.abs().sum() > 0, s
    attn = student.model.layers[router.attn_pairs[0][0]].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()

def test_frozen_projector_option(pair, batch):
    student, teacher = pair
    router = Router.from_models(student, teacher, learn_projector=False)
    sum(forward_terms(router, student, teacher, batch, {'feat': 1.0, 'layer': 1.0})[0].values()).backward()
    assert all(p.grad is None for p in router.proj.parameters())
    assert all(router.mix[s].grad is not None for s in router.slots)
    student.zero_grad()

def test_zero_weight_costs_nothing(pair, batch, monkeypatch):
    student, teacher = pair
    router = Router.from_models(student, teacher)
    calls = {s: 0 for s in router.slots}
    handles = [router.proj[s].register_forward_hook(lambda m, a, o, s=s: calls.__setitem__(s, calls[s] + 1)) for s in router.slots]
    stacks = []
    orig_stack = router.teacher_stack
    monkeypatch.setattr(router, 'teacher_stack', lambda *a: stacks.append(1) or orig_stack(*a))
    probs = []
    orig_probs = AttentionCapture.probs
    monkeypatch.setattr(AttentionCapture, 'probs', lambda self, *a, **k: probs.append(1) or orig_probs(self, *a, **k))
    hooks = lambda m: sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())
    base = hooks(student), hooks(teacher)
    off = {'ce': 1.0, 'kd': 1.0, 'feat': 0.0, 'layer': 0.0, 'attn': 0.0, 'contr': 0.0}
    with router.capture(student, 'student', off) as sc, router.capture(teacher, 'teacher', off) as tc:
        assert (hooks(student), hooks(teacher)) == base   # no hook registered at all
        student.model(input_ids=batch['student_input_ids'])
    assert sc.calls == tc.calls == 0 and sc.q == {}
    assert forward_terms(router, student, teacher, batch, off)[0] == {}
    assert sum(calls.values()) == 0 and stacks == [] and probs == []
    terms = forward_terms(router, student, teacher, batch, {**off, 'feat': 0.1})[0]
    assert list(terms) == ['feat'] and calls == {'final': 1, 'layer0': 0, 'layer1': 0} and probs == []
    terms = forward_terms(router, student, teacher, batch, {**off, 'attn': 0.1})[0]
    assert list(terms) == ['attn'] and sum(calls.values()) == 1 and len(stacks) == 1 and len(probs) == 2
    for h in handles: h.remove()

def test_attention_errors(pair, batch):
    student, teacher = pair
    router = Router.from_models(student, teacher)
    _, s_hs, t_hs = forward_terms(router, student, teacher, batch, {})
    with pytest.raises(ValueError, match='no student attention was captured'): router.loss_terms(s_hs, t_hs, batch, {'attn': 1.0})
    with pytest.raises(ValueError, match='built for a 3-layer student'): router.capture(teacher, 'student')
    other = fake_aligned_batch(4, n_chunks=(3, 4), seed=5)
    with router.capture(student, 'student') as sc, torch.no_grad(): student.model(input_ids=other['student_input_ids'])
    with router.capture(teacher, 'teacher') as tc, torch.no_grad(): teacher.model(input_ids=batch['teacher_input_ids'])
    with pytest.raises(ValueError, match='different forwards'): router.attention_loss(sc, tc, batch)

def test_reentrant_checkpointing_is_refused(batch):
    student, teacher = tiny_student(), tiny_teacher()
    router = Router.from_models(student, teacher)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # transformers' deprecation and use_cache notices
        student.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': True})
        with pytest.raises(RuntimeError, match='use_reentrant'): forward_terms(router, student, teacher, batch, {'attn': 1.0})
        student.gradient_checkpointing_disable()
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        forward_terms(router, student, teacher, batch, {'attn': 1.0})[0]['attn'].backward()
    assert student.model.layers[2].self_attn.q_proj.weight.grad.abs().sum() > 0

def test_inference_mode_teacher_and_autocast(pair, batch):
    student, teacher = pair
    router = Router.from_models(student, teacher)
    terms = forward_terms(router, student, teacher, batch, teacher_mode=torch.inference_mode)[0]
    sum(terms.values()).backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        terms = forward_terms(router, student, teacher, batch)[0]
    assert all(torch.isfinite(v) for v in terms.values())
    student.zero_grad()

# --- construction, config and state --------------------------------------------------------------------------------------

def test_layer_index_errors_name_the_model(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match=r'layer_map has layer 7, but LlamaForCausalLM has 3 layers'):
        Router.from_models(student, teacher, layer_map=[7])
    with pytest.raises(ValueError, match=r'attn_layers has layer -4, but LlamaForCausalLM has 3 layers'):
        Router.from_config(KDConfig(attn_layers=[-4]), student, teacher)

def test_reference_sizes_and_init():
    r = Router(30, 24, 576, 896)
    assert list(r.slots) == ['final', 'layer5', 'layer11', 'layer17', 'layer23'] and r.attn_pairs == [(29, 23)]
    w = r.mixture('layer17').detach()
    assert int(w.argmax()) == round(18 * 24 / 30) and w.max() > 0.6
    assert r.num_parameters() == 5 * (896 * 576 + 576 + 25)

def test_state_dict_round_trip(pair, batch):
    student, teacher = pair
    a = Router.from_config(KDConfig(layer_map=[1], attn_layers=[0, 2], feature_loss='nmse'), student, teacher)
    assert a.layer_map == [1] and a.attn_pairs == [(0, 0), (2, 3)] and a.feature_kind == 'nmse'
    calib = fake_aligned_batch(16, n_chunks=(30, 40), seed=1)
    _, s_hs, t_hs = forward_terms(a, student, teacher, calib, {})
    a.calibrate(s_hs, t_hs, calib)
    with torch.no_grad(): a.mix['final'].add_(torch.randn(5))
    b = Router.from_config(KDConfig(layer_map=[1], attn_layers=[0, 2], feature_loss='nmse'), student, teacher)
    assert not b.calibrated
    b.load_state_dict(a.state_dict())
    assert bool(b.calibrated)
    ta, tb = forward_terms(a, student, teacher, batch)[0], forward_terms(b, student, teacher, batch)[0]
    for k in ('feat', 'layer', 'attn'): assert torch.equal(ta[k], tb[k]), k
