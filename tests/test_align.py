"""Property and error tests for kd_kaggle.align on the real fixture tokenizers (offline, CPU, < 2 min)."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import functools, json, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st

from kd_kaggle.align import (
    load_tokenizer, token_bytes, token_byte_lengths, token_table, normalize_text, encode_with_byte_ends, align_tokens,
    align_pair, align_batch, build_vocab_map, vocab_map_fingerprint, save_vocab_map, load_vocab_map,
    project_teacher_probs, teacher_logit_mask, mapped_student_ids, student_mapped_mask, alignment_stats,
    align_report, format_align_report, sample_texts, _byte_to_unicode)

FIX = Path(__file__).parent / 'fixtures'
NAMES = ('qwen2', 'smollm2', 'gpt2', 'mistral', 'tinyllama', 'mistral_raw', 'tinyllama_raw', 'smollm2_raw')
QWEN_ROWS = 151_936

@functools.cache
def tok(name):
    "A fixture tokenizer; 'x_raw' is x's tokenizer.json loaded directly (legacy normalizers, no transformers class)."
    if name.endswith('_raw'):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
        return load_tokenizer(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(FIX / 'tokenizers' / name[:-4] / 'tokenizer.json'))))
    return load_tokenizer(FIX / 'tokenizers' / name)

@functools.cache
def vmap(teacher, student):
    return build_vocab_map(tok(teacher), tok(student), QWEN_ROWS if teacher == 'qwen2' else None)

@functools.cache
def byte_tokenizer():
    "A fast tokenizer with one token per byte: every byte offset is one of its token ends."
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE(vocab={u: b for b, u in _byte_to_unicode().items()}, merges=[]))
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t)

PAIRS = [('qwen2', 'smollm2'), ('qwen2', 'gpt2'), ('qwen2', 'mistral'), ('qwen2', 'tinyllama'),
         ('mistral', 'qwen2'), ('tinyllama', 'mistral'), ('smollm2', 'gpt2'), ('qwen2', 'mistral_raw'), ('tinyllama_raw', 'tinyllama')]

# ---------------------------------------------------------------- text strategy
FRAGMENTS = ['the', ' The', ' cat', 'Hello', ' world', 'café', ' naïve', 'Ångström', 'résumé', 'e\u0301', 'n\u0303',
             '中文', '分词测试', '日本語', '한국어', 'Привет', 'مرحبا', '🙂', '🦩', '👍🏽', '👨\u200d👩\u200d👧', '🫠', 'x²', '—', '…',
             ' ', '  ', '   ', '\n', '\n\n', '\t', ' \t ', '\r\n', '0', '7', '123', '2024', '3.14', "'s", "n't", '!?', '.',
             '\x00', '\x1b', '\x7f', '<', '>', '|', '_', '<|im_start|>', '<|im_end|>', '<|endoftext|>', '<s>', '</s>', '<unk>', 'def f(x):\n    return x']
# random characters leave out unassigned code points and most control characters (SmolLM2 has no token for some
# of their bytes) and '▁' (a SentencePiece tokenizer reads it as a space): both are tested on their own below.
# The fragments cover \t \n \r \x00 \x1b \x7f.
TEXT = (st.lists(st.one_of(st.sampled_from(FRAGMENTS),
                           st.text(st.characters(codec='utf-8', exclude_categories=('Cs', 'Cn', 'Cc'), exclude_characters='▁'), max_size=4)), max_size=24)
        .map(''.join).map(normalize_text))
# KD_HYPOTHESIS_EXAMPLES=2000 for a long local search; CI keeps the default
SETTINGS = settings(max_examples=int(os.environ.get('KD_HYPOTHESIS_EXAMPLES', 50)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

def spans(tk, text):
    "(ids, byte ends) of `text` as align_pair tokenizes it (the tokenizer's own special tokens), via the public encoder."
    return encode_with_byte_ends(tk, text, add_special_tokens=True)

# ---------------------------------------------------------------- properties
@SETTINGS
@given(text=TEXT, pair=st.sampled_from(PAIRS))
def test_chunks_tile_both_sequences(text, pair):
    t, s = tok(pair[0]), tok(pair[1])
    a = align_pair(t, s, text)
    s_ids, s_ends = spans(s, text)
    t_ids, t_ends = spans(t, text)
    np.testing.assert_array_equal(s_ids, a['student_ids']); np.testing.assert_array_equal(t_ids, a['teacher_ids'])
    n = len(text.encode())
    assert (s_ends[-1] if len(s_ends) else 0) == n == (t_ends[-1] if len(t_ends) else 0)   # byte totals agree
    s_len, t_len = np.diff(s_ends, prepend=0), np.diff(t_ends, prepend=0)
    assert ((a['s_chunk'] == -1) == (s_len == 0)).all() and ((a['t_chunk'] == -1) == (t_len == 0)).all()
    sc, tc = a['s_chunk'][s_len > 0], a['t_chunk'][t_len > 0]
    n_chunks = int(sc.max()) + 1 if len(sc) else 0
    # chunk ids run 0..n-1 without gaps, in order, on both sides
    assert (np.diff(sc) >= 0).all() and (np.diff(tc) >= 0).all()
    np.testing.assert_array_equal(np.unique(sc), np.arange(n_chunks)); np.testing.assert_array_equal(np.unique(tc), np.arange(n_chunks))
    # each chunk ends at the same byte on both sides, and the chunks tile the text bytes
    s_chunk_end = np.maximum.reduceat(s_ends[s_len > 0], np.flatnonzero(np.diff(sc, prepend=-1))) if n_chunks else []
    t_chunk_end = np.maximum.reduceat(t_ends[t_len > 0], np.flatnonzero(np.diff(tc, prepend=-1))) if n_chunks else []
    np.testing.assert_array_equal(s_chunk_end, t_chunk_end)
    if n_chunks: assert s_chunk_end[-1] == n and (np.diff(s_chunk_end) > 0).all()

@SETTINGS
@given(text=TEXT, pair=st.sampled_from(PAIRS))
def test_s2t_and_one_to_one_mean_identical_prefixes_and_next_tokens(text, pair):
    t, s = tok(pair[0]), tok(pair[1])
    a = align_pair(t, s, text)
    _, s_ends = spans(s, text)
    _, t_ends = spans(t, text)
    s_len, t_len = np.diff(s_ends, prepend=0), np.diff(t_ends, prepend=0)
    t_real_ends = set(t_ends[t_len > 0].tolist())
    expect_hit = (s_len > 0) & np.isin(s_ends, list(t_real_ends))
    np.testing.assert_array_equal(a['s2t'] >= 0, expect_hit)
    i = np.flatnonzero(a['s2t'] >= 0)
    np.testing.assert_array_equal(s_ends[i], t_ends[a['s2t'][i]])
    assert (t_len[a['s2t'][i]] > 0).all()
    # at a 1:1 position the next tokens are the same byte string, and the vocab map sends the teacher's to the student's
    sb, tb, vm = token_bytes(s), token_bytes(t), vmap(*pair)
    for i in np.flatnonzero(a['one_to_one']):
        j = a['s2t'][i]
        s_next, t_next = a['student_ids'][i + 1], a['teacher_ids'][j + 1]
        assert sb[s_next] == tb[t_next], (text, i, j)
        assert int(vm[t_next]) == s_next, (text, sb[s_next], int(vm[t_next]))
    # the per-side rule without a response start: every position that has a next token
    np.testing.assert_array_equal(align_pair(t, s, text, same_bytes=False)['loss_mask'], np.arange(len(s_ends)) < len(s_ends) - 1)

@SETTINGS
@given(text=TEXT, name=st.sampled_from(NAMES))
def test_a_tokenizer_aligned_with_itself_is_the_identity(text, name):
    a = align_pair(tok(name), tok(name), text)
    _, ends = spans(tok(name), text)
    real = np.diff(ends, prepend=0) > 0
    np.testing.assert_array_equal(a['s2t'], np.where(real, np.arange(len(ends)), -1))
    np.testing.assert_array_equal(a['s_chunk'], a['t_chunk'])
    next_real = np.zeros(len(ends), bool); next_real[:-1] = real[1:] & real[:-1]
    np.testing.assert_array_equal(a['one_to_one'], next_real)

@SETTINGS
@given(text=TEXT, teacher=st.sampled_from(['qwen2', 'mistral']))
def test_a_byte_per_token_student_puts_every_teacher_token_in_its_own_chunk(text, teacher):
    a = align_pair(tok(teacher), byte_tokenizer(), text)
    tc = a['t_chunk'][a['t_chunk'] >= 0]
    np.testing.assert_array_equal(tc, np.arange(len(tc)))
    assert len(a['student_ids']) == len(text.encode())

@SETTINGS
@given(text=TEXT, pair=st.sampled_from(PAIRS[:3]), data=st.data())
def test_per_side_loss_mask_marks_positions_whose_next_token_reaches_the_response(text, pair, data):
    start = data.draw(st.integers(0, len(text)))
    a = align_pair(tok(pair[0]), tok(pair[1]), text, response_start_char=start, same_bytes=False)
    start_byte = len(text[:start].encode())
    for mask, tk in ((a['loss_mask'], tok(pair[1])), (a['teacher_loss_mask'], tok(pair[0]))):
        _, ends = spans(tk, text)
        expect = np.zeros(len(ends), bool); expect[:-1] = ends[1:] > start_byte
        np.testing.assert_array_equal(mask, expect)

def scored_spans(ends, mask):
    "(start, end) byte spans of the tokens a side labels: the next token of every masked position."
    p = np.flatnonzero(mask)
    assert (p + 1 < len(ends)).all()
    return [(int(ends[i]), int(ends[i + 1])) for i in p]

def check_same_bytes(a, text, start_byte):
    "Both sides label one contiguous byte range, the same one, starting at the first admissible shared boundary."
    s_ends, t_ends = np.cumsum(a['student_byte_lens']), np.cumsum(a['teacher_byte_lens'])
    total = int(s_ends[-1]) if len(s_ends) else 0
    assert total == (int(t_ends[-1]) if len(t_ends) else 0) <= len(text.encode())
    b = int(a['scored_from'])
    for ends, lens, mask in ((s_ends, a['student_byte_lens'], a['loss_mask']), (t_ends, a['teacher_byte_lens'], a['teacher_loss_mask'])):
        sp = scored_spans(ends, mask)
        assert all(e > st_ for st_, e in sp)                                    # only tokens with bytes are labelled
        assert [x for x, _ in sp[1:]] == [e for _, e in sp[:-1]]                 # contiguous, in order
        assert ((sp[0][0], sp[-1][1]) == (b, total)) if sp else b == total       # exactly bytes[b:total]
        assert sum(lens[1:][mask[:-1]]) == total - b                             # what the data layer sums as label bytes
    # b is a boundary both sides share, past the response start (clipped to the kept bytes when truncated) and past each
    # side's first token it cannot predict ...
    assert b == 0 or (b in s_ends[a['student_byte_lens'] > 0] and b in t_ends[a['teacher_byte_lens'] > 0])
    lo = max([min(start_byte or 0, total)] + [int(e[0]) for e, l in ((s_ends, a['student_byte_lens']), (t_ends, a['teacher_byte_lens'])) if len(l) and l[0] > 0])
    assert b >= lo
    # ... and the first such boundary: none lies in [lo, b)
    assert not set(range(lo, b)) & ({0} | (set(s_ends.tolist()) & set(t_ends.tolist())))

@SETTINGS
@given(text=TEXT, pair=st.sampled_from(PAIRS), bos=st.sampled_from([None, True, False]), data=st.data())
def test_both_sides_score_the_same_contiguous_bytes(text, pair, bos, data):
    t, s = tok(pair[0]), tok(pair[1])
    if bos and s.bos_token_id is None: bos = None
    start = data.draw(st.one_of(st.none(), st.integers(0, len(text))))
    max_length = data.draw(st.one_of(st.none(), st.integers(1, 16)))
    a = align_pair(t, s, text, response_start_char=start, add_student_bos=bos, max_length=max_length)
    check_same_bytes(a, text, None if start is None else len(text[:start].encode()))

@pytest.mark.parametrize('pair', [('qwen2', 'smollm2'), ('qwen2', 'mistral'), ('qwen2', 'tinyllama'), ('tinyllama', 'mistral'),
                                  ('mistral', 'qwen2'), ('qwen2', 'gpt2'), ('qwen2', 'mistral_raw')])
@pytest.mark.parametrize('bos', [None, True, False])
def test_same_bytes_on_real_text_and_instruction_rows(pair, bos):
    t, s = tok(pair[0]), tok(pair[1])
    if bos and s.bos_token_id is None: bos = None
    rows = [json.loads(l) for l in (FIX / 'text' / 'dolly_excerpt.jsonl').read_text().splitlines()[:8]]
    texts = [normalize_text(r['prompt'] + r['output']) for r in rows]
    starts = [len(normalize_text(r['prompt'])) for r in rows]
    prose = [normalize_text(p) for p in (FIX / 'text' / 'austen_excerpt.txt').read_text().split('\n\n')[:8] if p.strip()]
    for txts, sts in ((texts, starts), (prose, [None] * len(prose)), (texts, [None] * len(texts))):
        b = align_batch(t, s, txts, sts, add_student_bos=bos, max_length=96)
        for k, text in enumerate(txts):
            a = {key: v[k] for key, v in b.items()}
            check_same_bytes(a, text, None if sts[k] is None else len(text[:sts[k]].encode()))

def test_a_student_bos_alone_no_longer_scores_bytes_the_teacher_cannot():
    "The bug: SmolLM2 with its BOS predicted its first text token, Qwen2 (no BOS) could not, so the student scored more bytes."
    text = 'Hello world, this is a test.'
    a = align_pair(tok('qwen2'), tok('smollm2'), text, add_student_bos=True)
    s_bytes = int(a['student_byte_lens'][1:][a['loss_mask'][:-1]].sum())
    t_bytes = int(a['teacher_byte_lens'][1:][a['teacher_loss_mask'][:-1]].sum())
    assert s_bytes == t_bytes == len(text) - len('Hello') and int(a['scored_from']) == len('Hello')
    old = align_pair(tok('qwen2'), tok('smollm2'), text, add_student_bos=True, same_bytes=False)   # the per-side rule: 28 vs 23
    assert int(old['student_byte_lens'][1:][old['loss_mask'][:-1]].sum()) == len(text) != t_bytes
    # a BOS on both sides: every byte is scored
    b = align_pair(tok('tinyllama'), tok('mistral'), text)
    assert int(b['scored_from']) == 0 and b['loss_mask'][0] and b['teacher_loss_mask'][0]

@SETTINGS
@given(text=TEXT, pair=st.sampled_from(PAIRS[:3]), max_length=st.integers(1, 12))
def test_max_length_cuts_both_sides_at_a_shared_boundary(text, pair, max_length):
    full = align_pair(tok(pair[0]), tok(pair[1]), text)
    cut = align_pair(tok(pair[0]), tok(pair[1]), text, max_length=max_length)
    ns, nt = len(cut['student_ids']), len(cut['teacher_ids'])
    assert ns <= max_length and nt <= max_length
    np.testing.assert_array_equal(cut['student_ids'], full['student_ids'][:ns])
    np.testing.assert_array_equal(cut['teacher_ids'], full['teacher_ids'][:nt])
    _, s_ends = spans(tok(pair[1]), text)
    _, t_ends = spans(tok(pair[0]), text)
    assert (s_ends[ns - 1] if ns else 0) == (t_ends[nt - 1] if nt else 0)
    # the alignment of the kept prefix is the prefix of the full alignment, except at the new last position
    np.testing.assert_array_equal(cut['s2t'], full['s2t'][:ns])
    np.testing.assert_array_equal(cut['one_to_one'][:-1], full['one_to_one'][:ns][:-1])

@settings(max_examples=60, deadline=None)
@given(vt=st.integers(1, 40), vs=st.integers(1, 30), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_projected_distribution_plus_tail_sums_to_one(vt, vs, batch, seed):
    g = torch.Generator().manual_seed(seed)
    vm = torch.randint(-1, vs, (vt,), generator=g)
    p = torch.randn(batch, 2, vt, generator=g, dtype=torch.float64).softmax(-1)
    ps, tail = project_teacher_probs(p, vm, vs)
    assert ps.shape == (batch, 2, vs) and tail.shape == (batch, 2) and (ps >= 0).all()
    torch.testing.assert_close(ps.sum(-1) + tail, torch.ones(batch, 2, dtype=torch.float64))
    ref = torch.zeros(batch, 2, vs, dtype=torch.float64)
    for j in range(vt):
        if vm[j] >= 0: ref[..., vm[j]] += p[..., j]
    torch.testing.assert_close(ps, ref)
    torch.testing.assert_close(tail, p[..., vm < 0].sum(-1))
    outside = ~student_mapped_mask(vm, vs)
    assert (ps[..., outside] == 0).all()

def test_projection_with_the_real_map_and_padded_rows():
    vm = vmap('qwen2', 'smollm2')
    logits = torch.randn(2, 4, QWEN_ROWS).masked_fill(~teacher_logit_mask(QWEN_ROWS, len(tok('qwen2'))), float('-inf'))
    ps, tail = project_teacher_probs(logits.softmax(-1), vm, len(tok('smollm2')))
    torch.testing.assert_close(ps.sum(-1) + tail, torch.ones(2, 4))
    assert (mapped_student_ids(vm).diff() > 0).all()

@settings(max_examples=20, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), pair=st.sampled_from(PAIRS[:3]))
def test_align_batch_equals_align_pair_per_text(texts, pair):
    b = align_batch(tok(pair[0]), tok(pair[1]), texts)
    for k, text in enumerate(texts):
        a = align_pair(tok(pair[0]), tok(pair[1]), text)
        for key in a: np.testing.assert_array_equal(b[key][k], a[key])

@settings(max_examples=25, deadline=None)
@given(text=TEXT.filter(lambda t: len(t) > 3), pair=st.sampled_from(PAIRS[:3]))
def test_an_oracle_teacher_is_fully_covered_at_kd_positions(text, pair):
    vm = vmap(*pair)
    def oracle(ids):
        p = torch.zeros(len(ids), vm.numel()); p[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:])] = 1.0
        return p
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        st_ = alignment_stats(tok(pair[0]), tok(pair[1]), [text], vocab_map=vm, teacher_probs_fn=oracle)
    if 'covered_mass_mean' in st_: assert st_['covered_mass_mean'] == 1.0 and st_['tail_mass_mean'] == 0.0

# ---------------------------------------------------------------- real-tokenizer facts
@pytest.mark.parametrize('student,size', [('smollm2', 39_237), ('gpt2', 42_257), ('mistral', 29_234), ('tinyllama', 26_342)])
def test_vocab_map_size_agrees_with_the_measured_overlap(student, size):
    vm = vmap('qwen2', student)
    assert vm.shape == (QWEN_ROWS,) and int((vm >= 0).sum()) == size
    assert (vm[len(tok('qwen2')):] == -1).all()

@pytest.mark.parametrize('teacher,student', [('qwen2', 'mistral'), ('mistral', 'qwen2'), ('tinyllama', 'mistral')])
def test_vocab_map_is_exact_and_complete(teacher, student):
    vm, t, s = vmap(teacher, student), token_table(tok(teacher)), token_table(tok(student))
    index = {}
    for i in range(len(s)): index.setdefault((bool(s.added[i]), s.bytes[i]), []).append(i)
    for j in range(len(t)):
        cands = index.get((bool(t.added[j]), t.bytes[j]), []) if t.bytes[j] else []
        if not cands: assert vm[j] == -1; continue
        best = sorted(cands, key=lambda i: (bool(s.byte_fallback[i]), i))[0]
        assert int(vm[j]) == best, (j, t.bytes[j])

def test_fingerprint_and_save_load(tmp_path):
    fp = vocab_map_fingerprint(tok('qwen2'), tok('smollm2'))
    assert fp == vocab_map_fingerprint(FIX / 'tokenizers/qwen2', FIX / 'tokenizers/smollm2')
    p = save_vocab_map(vmap('qwen2', 'smollm2'), tmp_path / 'sub/map.safetensors', fp)
    assert torch.equal(load_vocab_map(p, fp), vmap('qwen2', 'smollm2'))
    with pytest.raises(ValueError, match='other tokenizers'):
        load_vocab_map(p, vocab_map_fingerprint(tok('qwen2'), tok('gpt2')))

def test_measured_alignment_on_fixture_text():
    texts = [normalize_text(t) for t in sample_texts(FIX / 'text/dolly_excerpt.jsonl', 10**7)]
    got = {s: alignment_stats(tok('qwen2'), tok(s), texts, vocab_map=vmap('qwen2', s)) for s in ('smollm2', 'gpt2', 'mistral')}
    assert got['gpt2']['boundary_fraction'] > 0.9 and got['smollm2']['boundary_fraction'] > 0.9
    assert 0.8 < got['mistral']['boundary_fraction'] < got['gpt2']['boundary_fraction']
    assert all(g['one_to_one_fraction'] > 0.7 for g in got.values())

# ---------------------------------------------------------------- bad input
def test_a_slow_tokenizer_is_refused():
    from transformers import PythonBackend
    class Chars(PythonBackend):
        def __init__(self, **kw): self.v = {c: i for i, c in enumerate('ab')}; super().__init__(**kw)
        def get_vocab(self): return dict(self.v)
        @property
        def vocab_size(self): return 2
        def _tokenize(self, text): return list(text)
        def _convert_token_to_id(self, t): return self.v.get(t, 0)
        def _convert_id_to_token(self, i): return 'ab'[i]
    with pytest.raises(TypeError, match=r'needs a fast tokenizer .*got .*Chars'):
        load_tokenizer(Chars())
    with pytest.raises(TypeError, match='needs a fast tokenizer'):
        align_pair(Chars(), tok('gpt2'), 'ab')

def test_an_unsupported_tokenizer_family_is_named():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    wp = Tokenizer(models.WordPiece({'[UNK]': 0, 'a': 1, '##b': 2}, unk_token='[UNK]'))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    with pytest.raises(NotImplementedError, match='byte-level BPE and SentencePiece'):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=wp))

def test_text_that_decodes_differently_from_its_bytes():
    with pytest.raises(ValueError, match=r"decodes differently from its bytes.*normalize_text"):
        align_pair(tok('qwen2'), tok('smollm2'), 'Cafe\u0301 au lait')
    with pytest.raises(ValueError, match=r"texts\[1\] decodes differently"):
        align_batch(tok('qwen2'), tok('smollm2'), ['fine', 'cafe\u0301'])
    align_pair(tok('qwen2'), tok('smollm2'), normalize_text('Cafe\u0301 au lait'))

@pytest.mark.parametrize('text,missing', [('\U00040000', '0xf1'), ('a\x13b', '0x13')])
def test_bytes_without_a_token_are_reported(text, missing):
    with pytest.raises(ValueError, match=f'decodes differently from its bytes.*no token for the byte.*{missing}'):
        align_pair(tok('qwen2'), tok('smollm2'), text)
    align_pair(tok('qwen2'), tok('mistral'), text)   # byte fallback covers every byte

def test_a_literal_metaspace_character_is_reported():
    with pytest.raises(ValueError, match=r"decodes differently from its bytes.*'▁' \(U\+2581\)"):
        align_pair(tok('qwen2'), tok('mistral'), 'a▁b')
    align_pair(tok('qwen2'), tok('smollm2'), 'a▁b')

@pytest.mark.parametrize('bad', [-1, 11, 2.0, '3', True])
def test_response_start_char_out_of_range(bad):
    with pytest.raises(ValueError, match=r'response_start_char=.* out of range.*\[0, 10\]'):
        align_pair(tok('qwen2'), tok('smollm2'), 'Hello you!', response_start_char=bad)
    with pytest.raises(ValueError, match=r'response_start_chars\[1\]'):
        align_batch(tok('qwen2'), tok('smollm2'), ['a', 'Hello you!'], [0, bad])

def test_a_badly_aligned_pair_warns_with_the_numbers():
    with pytest.warns(UserWarning, match=r'only \d+\.\d% of \d+ student tokens align 1:1.*shared boundaries \d+\.\d%'):
        stats = alignment_stats(tok('qwen2'), byte_tokenizer(), ['The quick brown fox jumps over the lazy dog.'])
    assert stats['one_to_one_fraction'] < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        alignment_stats(tok('qwen2'), tok('smollm2'), ['The quick brown fox jumps over the lazy dog.'], vocab_map=vmap('qwen2', 'smollm2'))

def test_other_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match='teacher_rows=10'):
        build_vocab_map(tok('qwen2'), tok('smollm2'), teacher_rows=10)
    with pytest.raises(ValueError, match='vocab_map has'):
        project_teacher_probs(torch.ones(3, 5) / 5, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match='student_vocab=1'):
        project_teacher_probs(torch.ones(2) / 2, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match='different byte totals'):
        align_tokens([1, 2], [1, 3])
    with pytest.raises(FileNotFoundError, match='nope.txt'):
        sample_texts(tmp_path / 'nope.txt')
    (tmp_path / 'rows.jsonl').write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: .*'prompt' and 'output'"):
        sample_texts(tmp_path / 'rows.jsonl')
    (tmp_path / 'bad.jsonl').write_text('{"prompt": "x", "output": "y"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        sample_texts(tmp_path / 'bad.jsonl')
    with pytest.raises(ValueError, match='add_student_bos=True'):
        align_pair(tok('qwen2'), byte_tokenizer(), 'x', add_student_bos=True)

def test_sample_texts_is_bounded_and_evenly_spaced(tmp_path):
    (tmp_path / 'p.txt').write_text('\n\n'.join(f'paragraph {i:03d}' for i in range(100)))
    assert len(sample_texts(tmp_path / 'p.txt', None)) == 100
    got = sample_texts(tmp_path / 'p.txt', max_chars=130)
    assert sum(map(len, got)) <= 130 and got[0] == 'paragraph 000' and got[1] == 'paragraph 010'

def test_align_report_on_files():
    rep = align_report(FIX / 'tokenizers/qwen2', FIX / 'tokenizers/mistral', FIX / 'text/bible_excerpt.txt',
                       max_chars=20_000, teacher_rows=QWEN_ROWS)
    assert rep['teacher_rows'] == QWEN_ROWS and rep['vocab_map_size'] == 29_234 and rep['texts'] > 0
    assert json.loads(align_report(FIX / 'tokenizers/qwen2', FIX / 'tokenizers/mistral', FIX / 'text/bible_excerpt.txt',
                                   as_json=True, max_chars=20_000, teacher_rows=QWEN_ROWS)) == rep
    text = format_align_report(rep)
    assert 'shared boundaries' in text and '29,234' in text and len(text.splitlines()) <= 8
