"""Chat data end to end on the embedded demo pair (the demo teacher's tokenizer has a chat template, the student's has
none, so it gets ChatML): training, the teacher cache, bad rows, and align-report on assistant turns."""
import io, json, math, contextlib
from pathlib import Path

import pytest

from kd_kaggle.align import align_report, load_tokenizer, sample_texts
from kd_kaggle.cache import cache_teacher
from kd_kaggle.config import KDConfig
from kd_kaggle.data import build_datasets
from kd_kaggle.models import resolve_model
from kd_kaggle.train import train

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO/'tests'/'fixtures'/'text'/'dolly_chat_excerpt.jsonl'   # 60 Dolly rows as conversations, some multi-turn, some with a system turn


def chat_cfg(tmp_path, **kw):
    return KDConfig(**{**dict(teacher='demo', student='demo', data=str(CHAT), seq_len=1024, batch_size=4, max_steps=3, eval_fraction=0.1,
                              max_eval_examples=6, log_every=1, eval_every=100, save_every=100, precision='fp32', time_budget='5m',
                              output_dir=str(tmp_path/'run'), cache_dir=str(tmp_path/'data')), **kw})


def test_chat_data_scores_only_assistant_turns(tmp_path):
    cfg = chat_cfg(tmp_path)
    t_tok, s_tok = load_tokenizer(resolve_model('demo', 'teacher')), load_tokenizer(resolve_model('demo', 'student'))
    said = []
    train_ds, eval_ds = build_datasets(cfg, t_tok, s_tok, say=said.append)
    assert any('chat data: teacher in its own chat template, student in the default ChatML' in s for s in said)
    assert len(train_ds) + len(eval_ds) >= 55   # a conversation whose first reply does not fit seq_len is dropped (and said)
    rows = [[m['content'] for m in json.loads(l)['messages'] if m['role'] == 'assistant'] for l in CHAT.read_text().splitlines()]
    squash = lambda s: ''.join(s.split())   # the demo student adds a dummy-prefix space to each piece it tokenizes: not a byte
    conversations = {squash(''.join(r[:k])): r[:k] for r in rows for k in range(1, len(r) + 1)}   # later turns may not fit seq_len
    for ex in train_ds:
        scored = [(l, b) for l, b in zip(ex['student_labels'], ex['student_label_bytes']) if l != -100]
        replies = conversations[squash(s_tok.decode([l for l, b in scored if b > 0]))]   # exactly one row's assistant replies ...
        assert squash(s_tok.decode([l for l, b in scored if b == 0])) == '<|im_end|>' * len(replies)   # ... and the end marker after each
        assert sum(ex['student_label_bytes']) == sum(ex['teacher_label_bytes']) == len(''.join(replies).encode())


def test_chat_training_online_and_from_a_teacher_cache(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out): final = train(chat_cfg(tmp_path))
    assert math.isfinite(final['student_bpb']) and math.isfinite(final['kl']) and final['aligned_positions'] > 100
    cfg = chat_cfg(tmp_path, top_k=16, output_dir=str(tmp_path/'cached'))
    with contextlib.redirect_stdout(out): cache_teacher(cfg, str(tmp_path/'cache'), batch_size=4)
    with contextlib.redirect_stdout(out):
        final = train(chat_cfg(tmp_path, top_k=16, teacher_cache=str(tmp_path/'cache'), output_dir=str(tmp_path/'from_cache')))
    assert math.isfinite(final['student_bpb'])


def test_bad_chat_rows_name_file_and_line(tmp_path):
    bad = tmp_path/'bad.jsonl'
    good = json.dumps({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]})
    for row, msg in (({'messages': [{'role': 'user', 'content': 'hi'}]}, 'bad.jsonl:2: no assistant turn'),
                     ({'messages': [{'role': 'robot', 'content': 'hi'}]}, "bad.jsonl:2: messages[0] has role 'robot'"),
                     ({'messages': [{'role': 'assistant', 'content': ''}]}, 'bad.jsonl:2: messages[0] (assistant) has empty'),
                     ({'text': 'plain'}, '1 of 2 rows have no \'messages\'')):
        bad.write_text(good + '\n' + json.dumps(row) + '\n')
        t_tok, s_tok = load_tokenizer(resolve_model('demo', 'teacher')), load_tokenizer(resolve_model('demo', 'student'))
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[').replace(']', r'\]')):
            build_datasets(chat_cfg(tmp_path, data=str(bad)), t_tok, s_tok, say=None)


def test_align_report_on_chat_rows_reads_assistant_turns():
    rows = [json.loads(l) for l in CHAT.read_text().splitlines()]
    replies = [m['content'] for r in rows for m in r['messages'] if m['role'] == 'assistant']
    assert sample_texts(CHAT, None) == replies
    stats = align_report(resolve_model('demo', 'teacher'), resolve_model('demo', 'student'), CHAT)
    assert stats['texts'] > 10 and stats['one_to_one_fraction'] > 0.3


def test_chat_training_with_the_real_tokenizers(tmp_path):
    "Qwen2's tokenizer (its own chat template, default system turn) -> SmolLM2's (no template: ChatML), tiny random models."
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)
    for name, cls, cfg_cls, tk in (('teacher', Qwen2ForCausalLM, Qwen2Config, 'qwen2'), ('student', LlamaForCausalLM, LlamaConfig, 'smollm2')):
        tok = load_tokenizer(REPO/'tests'/'fixtures'/'tokenizers'/tk)
        cls(cfg_cls(vocab_size=len(tok), **dims)).save_pretrained(tmp_path/name); tok.save_pretrained(tmp_path/name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        final = train(chat_cfg(tmp_path, teacher=str(tmp_path/'teacher'), student=str(tmp_path/'student'), seq_len=512, max_steps=2))
    assert 'teacher in its own chat template, student in the default ChatML' in out.getvalue()
    assert math.isfinite(final['student_bpb']) and final['aligned_positions'] > 100 and final['scored_bytes'] > 1000


def test_chat_kind_mismatches_and_template_file_in_the_cache_key(tmp_path):
    from kd_kaggle.data import data_cache_key
    t_tok, s_tok = load_tokenizer(resolve_model('demo', 'teacher')), load_tokenizer(resolve_model('demo', 'student'))
    with pytest.raises(ValueError, match="data_format='text' but .* holds chat rows"):
        build_datasets(chat_cfg(tmp_path, data_format='text'), t_tok, s_tok, say=None)
    txt = tmp_path/'heldout.txt'; txt.write_text('Some held-out prose.\n\nAnd more of it.\n')
    with pytest.raises(ValueError, match='held-out data must be of the same kind'):
        build_datasets(chat_cfg(tmp_path, eval_data=str(txt)), t_tok, s_tok, say=None)
    jinja = tmp_path/'t.jinja'; jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    key = data_cache_key(chat_cfg(tmp_path, chat_template=str(jinja)), t_tok, s_tok)
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")   # same path, new template
    assert data_cache_key(chat_cfg(tmp_path, chat_template=str(jinja)), t_tok, s_tok) != key
