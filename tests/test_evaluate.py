"Evaluation and report: bpb is exact, mixed precision cannot crash the final eval, nothing is printed, the report always gets written."
import json, math
from pathlib import Path
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
import kd_kaggle.evaluate as ev_mod
from kd_kaggle.env import PrecisionPolicy
from kd_kaggle.evaluate import (evaluate, evaluate_saved, greedy_generations, lm_metrics, pair_metrics,
                                compare_generations, generations_table)
from kd_kaggle.plots import LivePlot, report_parts, show_report, synthetic_history, write_report

VS, VT = 30, 40
BF16 = PrecisionPolicy('bf16', torch.bfloat16, torch.bfloat16, False)
FP16 = PrecisionPolicy('fp16', torch.float16, torch.float16, True)

def _student(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False) | kw
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()

def _teacher(seed=1):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()

def _batch(B=2, T=9, seed=0):
    "Hand-made batch in docs/batch_format.md layout; fake alignment: student position i <-> teacher position i."
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([T] + [T - 3] * (B - 1))
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    nxt = torch.zeros_like(mask); nxt[:, :-1] = mask[:, 1:]
    out = {}
    for side, V in (('student', VS), ('teacher', VT)):
        ids = torch.randint(0, V, (B, T), generator=g) * mask
        labels = torch.where(nxt.bool(), ids.roll(-1, 1), -100); labels[:, 0] = -100
        out |= {f'{side}_input_ids': ids, f'{side}_attention_mask': mask, f'{side}_labels': labels,
                f'{side}_label_bytes': torch.randint(1, 5, (B, T), generator=g) * (labels != -100)}
    pos = torch.arange(T)[None].expand(B, T)
    out |= {'s2t': torch.where(mask.bool(), pos, -1), 'one_to_one': mask.bool() & (torch.rand(B, T, generator=g) < 0.7),
            's_chunk': torch.where(mask.bool(), pos, -1), 't_chunk': torch.where(mask.bool(), pos, -1)}
    return out

@pytest.fixture(scope='module')
def data():
    return [_batch(seed=0), _batch(B=3, seed=1)]

VMAP = torch.tensor([i if i < 25 else -1 for i in range(VT)])

def _hand_bpb(model, batches, side='student'):
    nll = nbytes = 0.0
    for b in batches:
        with torch.no_grad():
            logits = model(input_ids=b[f'{side}_input_ids'], attention_mask=b[f'{side}_attention_mask']).logits.float()
        lab = b[f'{side}_labels']; sel = lab != -100
        nll -= torch.log_softmax(logits, -1)[sel].gather(-1, lab[sel][:, None]).sum().item()
        nbytes += b[f'{side}_label_bytes'][sel].sum().item()
    return nll / (math.log(2) * nbytes)

def test_bpb_matches_hand_computation(data):
    s, t = _student(), _teacher()
    assert lm_metrics(s, data)['bpb'] == pytest.approx(_hand_bpb(s, data), rel=1e-5)
    m = lm_metrics(t, data, side='teacher')
    assert m['bpb'] == pytest.approx(_hand_bpb(t, data, 'teacher'), rel=1e-5)
    assert m['tokens'] == sum(int((b['teacher_labels'] != -100).sum()) for b in data)
    assert m['ppl'] == pytest.approx(math.exp(m['loss']))

def test_fallback_forward_for_heads_we_do_not_apply(data):
    s = _student(final_logit_softcapping=30.0)   # a config attribute that makes us use the model's own forward
    assert not ev_mod._plain_head(s)
    assert lm_metrics(s, data)['bpb'] == pytest.approx(_hand_bpb(s, data), rel=1e-5)

def test_pair_metrics_self_and_bounds(data):
    t = _teacher()
    same = [{**b, **{k.replace('teacher', 'student'): v for k, v in b.items() if k.startswith('teacher')}} for b in data]
    pm = pair_metrics(t, t, same, torch.arange(VT))
    assert pm['agreement'] == 1.0 and pm['kl'] == pytest.approx(0.0, abs=1e-5) and pm['tail_mass'] == pytest.approx(0.0, abs=1e-6)
    pm = pair_metrics(_student(), t, data, VMAP)
    assert 0 <= pm['agreement'] <= 1 and pm['kl'] > 0 and 0 < pm['tail_mass'] < 1
    assert pm['aligned_positions'] == sum(int((b['one_to_one'] & (b['student_labels'] != -100)).sum()) for b in data)
    # a map longer or shorter than the teacher head must not break the projection
    assert pair_metrics(_student(), t, data, VMAP[:30])['aligned_positions'] == pm['aligned_positions']

def test_seed_crash_half_head_and_autocast_policies(data):
    s = _student(); ref = lm_metrics(s, data)['bpb']
    half_head = _student(); half_head.lm_head.half()
    b = data[0]
    with pytest.raises(RuntimeError, match='same dtype'):   # what killed the seed after hours of training
        half_head(input_ids=b['student_input_ids'], attention_mask=b['student_attention_mask'])
    for model, pol, tol in ((half_head, None, 1e-2), (half_head, BF16, 5e-2), (s, BF16, 5e-2), (s, FP16, 2e-2)):
        assert lm_metrics(model, data, policy=pol)['bpb'] == pytest.approx(ref, rel=tol)
    fp16_teacher = _teacher().half()   # the teacher as loaded on a T4
    t_ref = lm_metrics(_teacher(), data, side='teacher')['bpb']
    assert lm_metrics(fp16_teacher, data, side='teacher', policy=FP16)['bpb'] == pytest.approx(t_ref, rel=2e-2)
    out = evaluate(half_head, fp16_teacher, data, VMAP, policy=BF16)
    assert all(math.isfinite(out[k]) for k in ('student_bpb', 'teacher_bpb', 'kl', 'agreement', 'retention'))

def test_evaluate_is_silent_restores_mode_and_reports_everything(data, capsys):
    s, t = _student(), _teacher()
    s.train()
    out = evaluate(s, t, iter(data), VMAP, student_bpb_before=5.0)   # a one-shot iterator is enough: one pass
    cap = capsys.readouterr()
    assert cap.out == '' and all(l.startswith('eval') for l in cap.err.strip().splitlines())   # at most the progress bar's line
    assert len(cap.err.strip().splitlines()) <= 1
    assert s.training and not t.training
    for k in ('student_loss', 'student_ppl', 'student_bpb', 'teacher_loss', 'teacher_ppl', 'teacher_bpb', 'retention',
              'student_bpb_before', 'student_bpb_after', 'agreement', 'kl', 'tokens', 'bytes', 'seconds'):
        assert k in out, k
    assert out['retention'] == pytest.approx(out['teacher_bpb'] / out['student_bpb'])
    assert out['bytes'] == sum(int(b['student_label_bytes'].sum()) for b in data)
    assert out['agreement'] == pytest.approx(pair_metrics(s, t, data, VMAP)['agreement'])
    assert 'agreement' not in evaluate(s, None, data)   # teacher-cache runs: student metrics only

def test_empty_held_out_set_is_a_clear_error(data):
    s, t = _student(), _teacher()
    with pytest.raises(ValueError, match='no held-out examples.*eval_fraction'): evaluate(s, t, [], VMAP)
    with pytest.raises(ValueError, match='eval_data'): lm_metrics(s, iter([]))
    unscored = [{**data[0], 'student_labels': torch.full_like(data[0]['student_labels'], -100)}]
    with pytest.raises(ValueError, match='no scored student tokens'): evaluate(s, t, unscored, VMAP)

def test_oom_batch_is_split_not_fatal(data, monkeypatch):
    s, t = _student(), _teacher()
    ref = evaluate(s, t, data, VMAP)
    real = ev_mod._forward
    def tight(model, ids, policy=None):
        if ids.shape[0] > 1: raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return real(model, ids, policy)
    monkeypatch.setattr(ev_mod, '_forward', tight)
    out = evaluate(s, t, data, VMAP)
    for k in ('student_bpb', 'teacher_bpb', 'kl', 'agreement'): assert out[k] == pytest.approx(ref[k], rel=1e-5)
    assert out['examples'] == ref['examples'] == 5

def test_evaluate_saved_roundtrip(data, tmp_path):
    s, t = _student(), _teacher()
    s.save_pretrained(tmp_path / 'student')
    out = evaluate_saved(tmp_path / 'student', t, lambda d: data, VMAP, out_path=tmp_path / 'eval.json')
    assert out['student_bpb'] == pytest.approx(evaluate(s, t, data, VMAP)['student_bpb'], rel=1e-5)
    assert json.loads((tmp_path / 'eval.json').read_text())['student_dir'] == str(tmp_path / 'student')

def test_greedy_generations_real_tokenizer_half_head(fixtures_dir):
    tok = AutoTokenizer.from_pretrained(fixtures_dir / 'tokenizers' / 'smollm2')
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    m.lm_head.half(); m.train(); side = tok.padding_side
    prompts = ['The capital of France is', 'Once', 'A much longer prompt that needs no padding at all']
    gens = greedy_generations(m, tok, prompts, max_new_tokens=4, batch_size=2)
    assert len(gens) == 3 and all(isinstance(g, str) and not g.startswith('[generation failed') for g in gens)
    assert m.training and tok.padding_side == side   # mode restored, tokenizer untouched
    rows = compare_generations(m, tok, None, None, prompts[:1], max_new_tokens=2)
    assert generations_table(rows).splitlines()[0] == '| prompt | teacher | student |'

def test_report_files_exist_and_parse(tmp_path):
    from PIL import Image
    final = {'student_bpb': 1.1, 'teacher_bpb': 0.93, 'retention': 0.85, 'student_bpb_before': 2.0, 'agreement': 0.5,
             'kl': float('nan'), 'student_tokens': 1000, 'teacher_tokens': 800}
    extra = {'alignment': {'1:1 positions': 0.88}, 'generations': [{'prompt': 'p', 'teacher': 't', 'student': 's'}]}
    md = write_report(tmp_path, synthetic_history(steps=600, eval_every=200), final, {'time_budget': '2h'}, extra)
    rep = json.loads((tmp_path / 'report.json').read_text())
    assert rep['final_metrics']['kl'] is None and rep['errors'] == [] and rep['training']['budget_s'] == 7200
    text = md.read_text()
    assert 'bpb' in text and 'bits per byte' in text and '1.1000' in text
    assert len(rep['figures']) == 4
    for f in rep['figures']:
        with Image.open(tmp_path / f) as im: im.verify(); assert f'({f})' in text
    # missing keys, garbage values and a failed final evaluation still give a report
    md2 = write_report(tmp_path / 'bad', [{'step': 'x', 'loss': None}, {'kd_raw': float('inf')}, {}], {'error': 'boom'}, None, None)
    assert 'boom' in md2.read_text() and json.loads((tmp_path / 'bad' / 'report.json').read_text())['figures'] == []

def test_show_report_displays_markdown_and_images(tmp_path, monkeypatch):
    import IPython.display as d
    shown = []
    monkeypatch.setattr(d, 'display', lambda *objs, **kw: shown.extend(objs))
    write_report(tmp_path, synthetic_history(steps=300, eval_every=100), {'student_bpb': 1.2}, {}, {})
    show_report(tmp_path)
    kinds = [type(o).__name__ for o in shown]
    assert kinds.count('Image') == len([p for p in report_parts(tmp_path) if p[0] == 'img']) >= 3 and 'Markdown' in kinds

def test_liveplot_silent_in_terminal_and_updates_in_place(capsys, monkeypatch):
    hist = synthetic_history(steps=200)
    lp = LivePlot()
    for r in hist: lp.update(r)
    lp.close()
    assert capsys.readouterr().out == '' and lp.handle is None
    import IPython.display as d
    calls = []
    class Handle:
        def update(self, obj): calls.append('update')
    def fake_display(obj, display_id=False): calls.append('display'); return Handle()
    monkeypatch.setattr(d, 'display', fake_display)
    lp = LivePlot(enabled=True, clock=lambda: 0.0)
    for r in hist[:20]: lp.update(r)
    assert calls == ['display', 'update']   # the first record, then the step-0 eval record; the clock never moves

def test_evaluation_kl_is_the_training_kd_term(tmp_path):
    "The held-out KL that evaluate() reports is the trainer's KD term (fkl, T=1, dense buckets) at the same positions."
    from kd_kaggle.train import demo_config, setup_run, _eval_batches
    r = setup_run(demo_config(str(tmp_path/'run'), max_train_examples=16, max_eval_examples=8, batch_size=4))
    batch = _eval_batches(r)[0]
    with torch.no_grad():
        _, parts = r.distiller(batch, r.curriculum.weights(0.0))
        pm = pair_metrics(r.student, r.teacher, [batch], r.vocab_map, teacher_vocab_limit=len(r.t_tok))
    assert int(parts['n_kd']) > 0
    assert pm['kl'] == pytest.approx(float(parts['kd_raw']), rel=1e-5)

def test_a_map_without_a_student_tail_gives_nan_pair_metrics_not_an_error(data):
    "Every student id mapped but some teacher rows not: training refuses such a map; evaluation reports NaN KL instead of failing."
    full = torch.tensor([i if i < VS else -1 for i in range(VT)])
    out = evaluate(_student(), _teacher(), data, full)
    assert math.isnan(out['kl']) and out['student_bpb'] > 0
