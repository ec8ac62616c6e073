"""The data layer's labels: on every example the student and the teacher are scored on exactly the same bytes (issue 15.5)."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import json, warnings
from pathlib import Path

import numpy as np
import pytest

from kd_kaggle.align import load_tokenizer, normalize_text
from kd_kaggle import data as kd_data
from kd_kaggle.data import encode_examples, load_records, data_cache_key
from kd_kaggle.config import KDConfig

FIX = Path(__file__).parent / 'fixtures'


def tok(name): return load_tokenizer(FIX / 'tokenizers' / name)


def check(ex):
    "Per example: equal scored byte totals > 0, and on each side one run of labelled positions that ends at the last token."
    n = len(ex['student_labels'])
    assert n > 0
    for i in range(n):
        sb, tb = sum(ex['student_label_bytes'][i]), sum(ex['teacher_label_bytes'][i])
        assert sb == tb > 0, (i, sb, tb)
        for side in ('student', 'teacher'):
            lab, nb = np.asarray(ex[f'{side}_labels'][i]), np.asarray(ex[f'{side}_label_bytes'][i])
            p = np.flatnonzero(lab != -100)
            assert (np.diff(p) == 1).all() and p[-1] == len(lab) - 2, p   # contiguous, through the end of the kept text
            assert (nb[p] > 0).all() and (nb[lab == -100] == 0).all()
    return n


RECORDS_TEXT = [{'text': p, 'response_start': None} for p in
                (FIX / 'text' / 'austen_excerpt.txt').read_text(encoding='utf-8').split('\n\n')[:12] if p.strip()]
RECORDS_INSTR = load_records(str(FIX / 'text' / 'dolly_excerpt.jsonl'))[0][:12]


@pytest.mark.parametrize('pair', [('qwen2', 'smollm2'),      # student BOS, teacher none: the reported bias
                                  ('qwen2', 'gpt2'),         # both without a prefix token (GPT-2 gets <|endoftext|> as BOS here)
                                  ('qwen2', 'mistral'),      # metaspace student with <s>, byte-level teacher
                                  ('mistral', 'qwen2'),      # metaspace teacher with <s>, student without any BOS
                                  ('tinyllama', 'mistral')]) # both metaspace, both with <s>
@pytest.mark.parametrize('kind', ['text', 'instruction'])
def test_encode_examples_scores_the_same_bytes_on_both_sides(pair, kind):
    t, s = tok(pair[0]), tok(pair[1])
    recs = RECORDS_TEXT if kind == 'text' else RECORDS_INSTR
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ex = encode_examples(recs, t, s, 128)
    check(ex)
    # which bytes: the student's labelled tokens spell exactly the tail of the kept text from the scored boundary on
    for i in range(len(ex['student_labels'])):
        s_ids, s_lab = np.asarray(ex['student_input_ids'][i]), np.asarray(ex['student_labels'][i])
        t_ids, t_lab = np.asarray(ex['teacher_input_ids'][i]), np.asarray(ex['teacher_labels'][i])
        s_text = s.decode(s_lab[s_lab != -100].tolist(), clean_up_tokenization_spaces=False)
        t_text = t.decode(t_lab[t_lab != -100].tolist(), clean_up_tokenization_spaces=False)
        # decoding may add/strip a metaspace dummy space: compare without leading whitespace
        assert s_text.lstrip() == t_text.lstrip(), (s_text[:60], t_text[:60])


def test_student_without_bos_and_instruction_boundary_mid_token():
    "A response starting inside a token on one side only: both sides start at the next shared boundary."
    t, s = tok('qwen2'), tok('mistral')
    rec = {'text': 'Question: say hello\nAnswer:hello world again', 'response_start': len('Question: say hello\nAnswer:he')}
    ex = encode_examples([rec], t, s, 64)
    check(ex)
    assert sum(ex['student_label_bytes'][0]) < len(rec['text']) - rec['response_start']


def test_qwen2_teacher_smollm2_student_with_bos_had_different_totals():
    "The regression: SmolLM2 (BOS) predicted 'Hello', Qwen2 (no BOS) could not: 28 vs 23 bytes before the fix."
    t, s = tok('qwen2'), tok('smollm2')
    text = 'Hello world, this is a test.'
    ex = encode_examples([{'text': text, 'response_start': None}], t, s, 64)
    assert ex['student_input_ids'][0][0] == s.bos_token_id
    assert sum(ex['student_label_bytes'][0]) == sum(ex['teacher_label_bytes'][0]) == len(text) - len('Hello')
    assert ex['student_labels'][0][0] == -100    # the BOS position no longer predicts 'Hello'


def test_demo_tokenizers_score_the_same_bytes():
    from kd_kaggle.demo import demo_corpus, load_demo_tokenizers
    t, s = load_demo_tokenizers()
    recs = [{'text': p, 'response_start': None} for p in demo_corpus('heldout')[:40]]
    assert recs[0]['text'] == 'Persuasion'   # the title: the teacher cannot predict its first token and no boundary follows before the end
    with pytest.warns(UserWarning, match='dropped 1 of 40 examples with no scored token'):
        ex = encode_examples(recs, t, s, 128)
    assert check(ex) == 39
    assert all(ids[0] == s.bos_token_id for ids in ex['student_input_ids'])   # demo student: BOS; demo teacher: none


def test_data_cache_key_changes_with_the_data_format_version(monkeypatch, tmp_path):
    "Data caches (and teacher caches, whose identity holds data_cache_key) built with the old labels are not reused."
    t, s = tok('qwen2'), tok('smollm2')
    cfg = KDConfig(data='demo', output_dir=str(tmp_path))
    assert kd_data.DATA_FORMAT_VERSION >= 3
    key = data_cache_key(cfg, t, s)
    monkeypatch.setattr(kd_data, 'DATA_FORMAT_VERSION', kd_data.DATA_FORMAT_VERSION - 1)
    assert data_cache_key(cfg, t, s) != key
