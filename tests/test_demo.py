"Embedded demo assets: offline loading, sizes, tokenizer styles and round trips, a teacher that really learned."
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
import importlib.util, json, math, time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, pre_tokenizers, normalizers

from kd_kaggle.demo import (DEMO_HELDOUT_NOVELS, DEMO_TRAIN_NOVELS, demo_corpus, demo_corpus_path, demo_dir,
                            demo_documents, demo_lm_eval, demo_student_path, demo_teacher_path, describe_demo,
                            load_demo_teacher, load_demo_tokenizers, make_demo_student, seeded_init_)

REPO = Path(__file__).resolve().parents[1]
PROBES = ['Café déjà vu — naïve résumé', 'Ça coûte 5 £, señor Müller', '中文分词测试：東京タワー',
          'emoji 👍🏽 and 🙂, x² + y² ≤ z²', 'tabs\tand\nnew  lines\n\n', 'def f(x):\n    return {"a": [1, 2]}']


@pytest.fixture(scope='module')
def toks(): return load_demo_tokenizers()

@pytest.fixture(scope='module')
def teacher(): return load_demo_teacher()


def test_files_and_sizes():
    for f in ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'model.safetensors'):
        assert (demo_teacher_path() / f).is_file(), f
    for f in ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'):
        assert (demo_student_path() / f).is_file(), f
    assert not (demo_student_path() / 'model.safetensors').exists()  # the student is a seeded init
    assert (demo_teacher_path() / 'model.safetensors').stat().st_size <= 5_000_000
    gz = demo_corpus_path('train') + demo_corpus_path('heldout')
    assert len(gz) == 6 and sum(f.stat().st_size for f in gz) <= 2_000_000
    note = (demo_dir() / 'corpus' / 'README.md').read_text().lower()
    assert 'public-domain' in note and 'mit' in note and 'persuasion' in note
    with safe_open(str(demo_teacher_path() / 'model.safetensors'), 'pt') as s:
        assert {str(s.get_slice(k).get_dtype()) for k in s.keys()} == {'F16'}
        assert 'lm_head.weight' not in set(s.keys())  # tied to the embedding


def test_corpus_split():
    assert DEMO_HELDOUT_NOVELS == ('persuasion',) and 'persuasion' not in DEMO_TRAIN_NOVELS
    held, train = demo_corpus('heldout'), demo_corpus('train')
    assert held[0] == 'Persuasion' and len(held) == 1035 and len(train) == 9263
    assert not set(held) & set(train[:200])
    assert all(p and '\n' not in p for p in held)
    assert [d.split('\n\n') for d in demo_documents('heldout')] == [held]
    with pytest.raises(ValueError): demo_corpus('test')


def test_tokenizer_styles(toks):
    ttok, stok = toks
    assert ttok.is_fast and stok.is_fast
    assert (len(ttok), len(stok)) == (4099, 2048)
    tb, sb = ttok.backend_tokenizer, stok.backend_tokenizer
    # teacher: Qwen/GPT-2 style byte-level BPE, specials appended after the 4,096 regular tokens
    assert isinstance(tb.normalizer, normalizers.NFC) and 'ByteLevel' in str(tb.pre_tokenizer)
    assert 'ByteLevel' in str(tb.decoder)
    assert ttok.convert_tokens_to_ids(['<|endoftext|>', '<|im_start|>', '<|im_end|>']) == [4096, 4097, 4098]
    assert ttok.eos_token == ttok.pad_token == '<|endoftext|>' and ttok.bos_token is None
    assert ttok('Emma')['input_ids'] == ttok.encode('Emma', add_special_tokens=False)  # adds nothing
    assert ttok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False) == '<|im_start|>user\nHi<|im_end|>\n'
    # student: Llama style SentencePiece BPE, '▁' metaspace, byte fallback, <unk>/<s>/</s> = 0/1/2
    assert isinstance(sb.pre_tokenizer, pre_tokenizers.Metaspace) and sb.model.byte_fallback
    assert (stok.unk_token_id, stok.bos_token_id, stok.eos_token_id, stok.pad_token_id) == (0, 1, 2, None)
    assert stok.convert_ids_to_tokens([3, 13, 258]) == ['<0x00>', '<0x0A>', '<0xFF>']
    assert stok('Emma')['input_ids'][0] == 1 and stok('Emma')['input_ids'][1:] == stok.encode('Emma', add_special_tokens=False)
    s = 'She was at home.'
    assert ttok.tokenize(s) != stok.tokenize(s)
    assert all(t.startswith('Ġ') for t in ttok.tokenize(s)[1:-1]) and stok.tokenize(s)[0].startswith('▁')


@pytest.mark.parametrize('which', ['teacher', 'student'])
def test_tokenizer_round_trip_and_raw_ids(toks, which):
    tok = toks[0] if which == 'teacher' else toks[1]
    raw = Tokenizer.from_file(str((demo_teacher_path() if which == 'teacher' else demo_student_path()) / 'tokenizer.json'))
    texts = demo_corpus('heldout')[:150] + demo_corpus('train')[::200] + PROBES
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == t
        assert ids == raw.encode(t, add_special_tokens=False).ids  # AutoTokenizer did not rebuild a different pipeline
        assert tok.encode(t) == raw.encode(t).ids
    offs = tok(PROBES[0], add_special_tokens=False, return_offsets_mapping=True)['offset_mapping']
    assert [tuple(o) for o in offs] == raw.encode(PROBES[0], add_special_tokens=False).offsets


def test_tokenizers_are_reproducible(tmp_path):
    "Re-training both tokenizers from the shipped corpus gives the shipped files byte for byte."
    spec = importlib.util.spec_from_file_location('make_demo_assets', REPO / 'scripts' / 'make_demo_assets.py')
    mda = importlib.util.module_from_spec(spec); spec.loader.exec_module(mda)
    paras = demo_corpus('train')
    for tok, folder in ((mda.train_teacher_tokenizer(paras), demo_teacher_path()), (mda.train_student_tokenizer(paras), demo_student_path())):
        tok.save(str(tmp_path / 'tokenizer.json'), pretty=True)
        assert (tmp_path / 'tokenizer.json').read_bytes() == (folder / 'tokenizer.json').read_bytes()


def test_loading_is_quiet_and_fast(capfd, caplog):
    load_demo_tokenizers(); load_demo_teacher(); make_demo_student()  # first calls pay transformers' lazy imports
    capfd.readouterr()
    t0 = time.time()
    load_demo_tokenizers(); load_demo_teacher(); make_demo_student()
    assert time.time() - t0 < 2
    out, err = capfd.readouterr()
    assert out == '' and err == ''
    assert not [r for r in caplog.records if r.levelname in ('WARNING', 'ERROR') and 'transformers' in r.name]


def test_teacher_learned_the_corpus(teacher, toks):
    ttok = toks[0]
    assert type(teacher).__name__ == 'Qwen2ForCausalLM' and teacher.config.vocab_size == len(ttok)
    assert teacher.config.tie_word_embeddings and teacher.config.num_key_value_heads < teacher.config.num_attention_heads
    r = demo_lm_eval(teacher, ttok, 'heldout', max_paragraphs=40)
    fresh = seeded_init_(load_demo_teacher(), seed=0)
    r0 = demo_lm_eval(fresh, ttok, 'heldout', max_paragraphs=40)
    assert r['tokens'] == r0['tokens'] > 2000
    assert abs(r0['loss'] - math.log(len(ttok))) < 0.2  # a fresh init is a uniform guess
    assert r['loss'] < 0.65 * r['uniform_loss'] and r['loss'] < r0['loss'] - 3
    assert r['bpb'] < 2.0 < r['uniform_bpb']
    half = demo_lm_eval(load_demo_teacher(dtype=torch.bfloat16), ttok, 'heldout', max_paragraphs=10)
    full = demo_lm_eval(teacher, ttok, 'heldout', max_paragraphs=10)
    assert abs(half['loss'] - full['loss']) < 0.05


def test_student_init_is_deterministic(toks):
    stok = toks[1]
    a, b, c = make_demo_student(0), make_demo_student(0), make_demo_student(1)
    assert type(a).__name__ == 'LlamaForCausalLM' and a.config.vocab_size == len(stok)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    assert not torch.equal(sa['model.embed_tokens.weight'], sc['model.embed_tokens.weight'])
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    # pins the generator's stream, so a change of torch.randn's algorithm would be noticed
    g = torch.Generator().manual_seed(0)
    first = sorted(a.named_parameters())[0]
    assert torch.equal(first[1].detach(), torch.randn(first[1].shape, generator=g) * 0.02)
    r = demo_lm_eval(a, stok, 'heldout', max_paragraphs=5)
    assert abs(r['loss'] - math.log(len(stok))) < 0.2
    assert make_demo_student(0, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_describe_demo():
    d = describe_demo()
    assert d['teacher']['params'] < 2_500_000 and d['teacher']['weights_bytes'] <= 5_000_000
    assert d['student']['params'] < d['teacher']['params'] and d['student']['weights_bytes'] == 0
    assert d['corpus']['heldout']['novels'] == ['persuasion']
    assert d['total_bytes'] < 7_000_000
    json.dumps(d)
