"""Build kd_kaggle's embedded demo assets (`kd_kaggle/demo_assets/`) reproducibly.

Every setting is in this file: fixed seeds, fixed data order, fixed hyper-parameters. Steps:

    python scripts/make_demo_assets.py corpus --src ../shared/data/austen  # gzip the six novels (CPU, 1 s)
    python scripts/make_demo_assets.py tokenizers    # train both tokenizers on the training split (CPU, ~1 s)
    python scripts/make_demo_assets.py configs       # model configs, generation configs, README files
    python scripts/make_demo_assets.py teacher --out DIR   # pretrain the teacher (one H100: ~3 min); DIR/model.safetensors + logs
    python scripts/make_demo_assets.py install-teacher DIR # copy DIR/model.safetensors (fp16) into the package
    python scripts/make_demo_assets.py eval          # held-out loss / bits per byte of the shipped teacher (CPU)

`corpus`, `tokenizers`, `configs` and `eval` need only a CPU. `teacher` trains the small grid of
TEACHER_VARIANTS below in parallel processes on one GPU and keeps the variant with the lowest
validation loss (validation = the last VAL_FRACTION of the paragraphs of each *training* novel;
the held-out novel is never used to choose anything). The shipped weights came from one run of
`python3 scripts/make_demo_assets.py teacher --out $OUT` on an H100 (torch 2.11, transformers 5.17;
see kd_kaggle/demo_assets/teacher/training_summary.json); GPU kernels are not bit-deterministic, so a
re-run gives close, not identical, weights. The student ships without weights:
`kd_kaggle.demo.make_demo_student(seed)` initialises it deterministically.
"""
import argparse, gzip, hashlib, io, json, math, os, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / 'kd_kaggle' / 'demo_assets'

# ---------------------------------------------------------------- corpus
NOVELS = ('emma', 'mansfield_park', 'northanger_abbey', 'persuasion', 'pride_and_prejudice', 'sense_and_sensibility')
SOURCE_SHA256 = {  # ../shared/data/README.md
    'emma': '28fdad64b60044071a63ac220af7aca345eea4b497bf471e30961475787497a0',
    'mansfield_park': '53abe640dc7461f04faca70c2eb5fa3e804a6742f5d165624dcd597ef0337a3e',
    'northanger_abbey': 'a3dd2c010ee617b5fde0b7450adcdb8187d74c83e7d7c7645129b868e99e7116',
    'persuasion': '5822e368a17a7167ddc3942a60335da0c1f9ae816ba10e8f26ed38788a4bf43d',
    'pride_and_prejudice': '0770f4bae5c1392b0ce05d4b053df85e0837e30c1ec35c03661bafe2b7be7fee',
    'sense_and_sensibility': 'f337f6e857305b6d56c4d6e97607ccf38b1bf74770476fc7dd2aa6fda13a19f4',
}

CORPUS_README = """# Demo corpus: six Jane Austen novels

Public-domain text (Jane Austen, 1811-1817; Project Gutenberg transcriptions), extracted from the
R package janeaustenr 1.0.0 (Debian `r-cran-janeaustenr` 1.0.0-1; package (c) 2016-2017 Julia Silge,
MIT licence). One paragraph per block, blocks separated by one blank line; hard-wrapped lines were
joined with a space; chapter headings are paragraphs; Gutenberg's `_italics_` are kept; no
Gutenberg header or licence boilerplate. Stored gzip-compressed (level 9, no name, mtime 0).

Fixed split used by `kd_kaggle.demo`: `persuasion` is the held-out novel; the other five
(emma, mansfield_park, northanger_abbey, pride_and_prejudice, sense_and_sensibility) are training
text. Built by `scripts/make_demo_assets.py corpus`.

| file | sha256 of the uncompressed text |
|---|---|
""" + ''.join(f'| `{n}.txt.gz` | `{h}` |\n' for n, h in SOURCE_SHA256.items())


def gzip_bytes(data: bytes) -> bytes:
    "Deterministic gzip: no file name, mtime 0, level 9."
    buf = io.BytesIO()
    with gzip.GzipFile(filename='', mode='wb', fileobj=buf, compresslevel=9, mtime=0) as f: f.write(data)
    return buf.getvalue()


def build_corpus(src: Path):
    out = ASSETS / 'corpus'; out.mkdir(parents=True, exist_ok=True)
    for n in NOVELS:
        data = (src / f'{n}.txt').read_bytes()
        assert hashlib.sha256(data).hexdigest() == SOURCE_SHA256[n], f'{n}: sha256 differs from the shared copy'
        (out / f'{n}.txt.gz').write_bytes(gzip_bytes(data))
    (out / 'README.md').write_text(CORPUS_README)
    print('corpus:', sum(f.stat().st_size for f in out.glob('*.gz')), 'bytes gzipped')


# ---------------------------------------------------------------- tokenizers
TEACHER_VOCAB = 4096            # regular tokens (256 bytes + 3840 merges); 3 specials are appended after them, like Qwen
TEACHER_SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')
STUDENT_VOCAB = 2048            # total, like Llama: <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF>=3..258, then pieces
STUDENT_SPECIALS = ('<unk>', '<s>', '</s>')
# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, newlines, spaces)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _added(content):
    from tokenizers import AddedToken
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def train_teacher_tokenizer(paragraphs):
    "Byte-level BPE in the style of Qwen2/GPT-2: NFC, Qwen2 split regex, ByteLevel; specials appended last."
    from tokenizers import Tokenizer, Regex, models, normalizers, pre_tokenizers, decoders, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=TEACHER_VOCAB, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # paragraphs are separated by a blank line in the documents the models see
    tok.train_from_iterator([p + '\n\n' for p in paragraphs], trainer=trainer)
    assert tok.get_vocab_size() == TEACHER_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens([_added(s) for s in TEACHER_SPECIALS])
    return tok


def train_student_tokenizer(paragraphs):
    "SentencePiece-style BPE like Llama/Mistral: '▁' metaspace, byte fallback, <unk>/<s>/</s> = 0/1/2, BOS added."
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
    meta = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=True)
    tok = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    n_train = STUDENT_VOCAB - 256  # the 256 byte tokens are inserted after training
    trainer = trainers.BpeTrainer(vocab_size=n_train, min_frequency=2, show_progress=False,
                                  special_tokens=list(STUDENT_SPECIALS))
    # Paragraphs hold no newline: like Llama's SentencePiece, '\n' is left to byte fallback (<0x0A>).
    tok.train_from_iterator(paragraphs, trainer=trainer)
    trained = json.loads(tok.to_str())['model']
    assert len(trained['vocab']) == n_train, len(trained['vocab'])
    vocab = {s: i for i, s in enumerate(STUDENT_SPECIALS)}
    vocab.update({f'<0x{b:02X}>': 3 + b for b in range(256)})
    for piece, _ in sorted(trained['vocab'].items(), key=lambda kv: kv[1]):
        if piece not in vocab: vocab[piece] = len(vocab)
    assert len(vocab) == STUDENT_VOCAB, len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(' ')) for m in trained['merges']]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token='<unk>', byte_fallback=True, fuse_unk=True))
    out.pre_tokenizer = meta
    out.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(' ', 1, 0)])
    out.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)])
    out.add_special_tokens([_added(s) for s in STUDENT_SPECIALS])
    return out


TEACHER_TOKENIZER_CONFIG = {
    # Like the real Qwen. transformers 5 always rebuilds model_type qwen2 tokenizers as Qwen2Tokenizer
    # (whatever this says) from vocab + merges with Qwen2's regex, NFC and ByteLevel: the same pipeline as
    # tokenizer.json, so the ids and offsets are identical (tested). transformers 4 loads tokenizer.json as is.
    'tokenizer_class': 'Qwen2Tokenizer',
    'bos_token': None, 'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>', 'unk_token': None,
    'additional_special_tokens': ['<|im_start|>', '<|im_end|>'],
    'model_max_length': 1024, 'padding_side': 'right', 'clean_up_tokenization_spaces': False,
    'split_special_tokens': False, 'chat_template': CHATML,
}
STUDENT_TOKENIZER_CONFIG = {
    # Not LlamaTokenizer: transformers 5 would rebuild it with its own Metaspace settings. The generic fast
    # class (TokenizersBackend in transformers 5) uses tokenizer.json as written.
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': None,  # no pad, like Llama
    'add_bos_token': True, 'add_eos_token': False,
    'model_max_length': 2048, 'padding_side': 'right', 'clean_up_tokenization_spaces': False,
    'split_special_tokens': False,
}


def save_tokenizer(tok, cfg, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / 'tokenizer.json'), pretty=True)
    (folder / 'tokenizer_config.json').write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + '\n')
    for stale in ('special_tokens_map.json', 'chat_template.jinja', 'vocab.json', 'merges.txt'):
        (folder / stale).unlink(missing_ok=True)


def build_tokenizers():
    from kd_kaggle.demo import demo_corpus
    paras = demo_corpus('train')
    t0 = time.time(); teacher = train_teacher_tokenizer(paras)
    t1 = time.time(); student = train_student_tokenizer(paras)
    print(f'tokenizers trained in {t1 - t0:.1f} s + {time.time() - t1:.1f} s; sizes', teacher.get_vocab_size(), student.get_vocab_size())
    save_tokenizer(teacher, TEACHER_TOKENIZER_CONFIG, ASSETS / 'teacher')
    save_tokenizer(student, STUDENT_TOKENIZER_CONFIG, ASSETS / 'student')


# ---------------------------------------------------------------- model configs
TEACHER_ARCH = dict(hidden_size=160, intermediate_size=432, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.02)
STUDENT_ARCH = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, initializer_range=0.02, attention_bias=False, mlp_bias=False)

ASSETS_README = """# kd_kaggle demo assets

Offline, CPU-sized stand-ins for the reference pair (Qwen2.5 teacher -> SmolLM2/Llama-style student),
with two *different* tokenizers. Built by `scripts/make_demo_assets.py`; loaded by `kd_kaggle.demo`.

- `corpus/`: six public-domain Jane Austen novels, gzipped (see `corpus/README.md`). `persuasion` is held out.
- `teacher/`: `Qwen2ForCausalLM` (hidden 160, 4 layers, 4 heads / 2 KV heads, MLP 432, tied embeddings,
  1024 positions), pretrained on the five training novels; fp16 safetensors. `training_summary.json`
  records the run (grid of variants, the one kept, device). Tokenizer: byte-level BPE
  (NFC, Qwen2 split regex), 4096 tokens + `<|endoftext|>` (eos/pad) `<|im_start|>` `<|im_end|>`, ChatML template.
- `student/`: `LlamaForCausalLM` config only (hidden 96, 3 layers, 4 heads / 2 KV heads, MLP 256, tied
  embeddings); weights come from `make_demo_student(seed)`. Tokenizer: SentencePiece-style BPE, '▁' metaspace,
  byte fallback, 2048 tokens, `<unk>`=0 `<s>`=1 (bos, added by default) `</s>`=2 (eos), no pad.

Both folders load offline with `AutoTokenizer.from_pretrained` as fast tokenizers whose ids and offsets equal
`tokenizers.Tokenizer.from_file('tokenizer.json')`'s: the teacher as `Qwen2Tokenizer` (transformers 5 rebuilds
it from vocab + merges with the same Qwen2 pipeline), the student as `TokenizersBackend`
(`tokenizer_class: PreTrainedTokenizerFast`, so that transformers 5 does not rebuild it as a `LlamaTokenizer`).

Licences: the text is public domain (janeaustenr extraction, MIT); the tokenizers and weights were
trained here from that text and are released with kd_kaggle (Apache-2.0).
"""


def build_configs():
    from tokenizers import Tokenizer
    from transformers import Qwen2Config, LlamaConfig, GenerationConfig
    ttok = Tokenizer.from_file(str(ASSETS / 'teacher' / 'tokenizer.json'))
    stok = Tokenizer.from_file(str(ASSETS / 'student' / 'tokenizer.json'))
    eos = ttok.token_to_id('<|endoftext|>')
    tc = Qwen2Config(vocab_size=ttok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **TEACHER_ARCH)
    tc.architectures = ['Qwen2ForCausalLM']; tc.dtype = 'float16'
    tc.save_pretrained(ASSETS / 'teacher')
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False).save_pretrained(ASSETS / 'teacher')
    sc = LlamaConfig(vocab_size=stok.get_vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=None, **STUDENT_ARCH)
    sc.architectures = ['LlamaForCausalLM']; sc.dtype = 'float32'
    sc.save_pretrained(ASSETS / 'student')
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False).save_pretrained(ASSETS / 'student')
    (ASSETS / 'README.md').write_text(ASSETS_README)
    print('configs written; teacher vocab', tc.vocab_size, 'student vocab', sc.vocab_size)


# ---------------------------------------------------------------- teacher pretraining
SEED = 1234
VAL_FRACTION = 0.05     # last 5% of the paragraphs of each training novel: validation for choosing a variant
SEQ_LEN = 512
BATCH = 64              # sequences per step: 32,768 tokens (~24 steps per epoch)
WARMUP = 100
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1      # on matrices and embeddings; not on norms and biases
CLIP = 1.0
MIN_LR_RATIO = 0.1      # cosine decay to 10% of the peak
EVAL_EVERY = int(os.environ.get('KD_DEMO_EVAL_EVERY', 50))
TIME_LIMIT_S = 270      # a guard per variant; a variant stopped by it is flagged in the log
# (name, peak lr, residual/embedding dropout, epochs); run in parallel, best validation loss wins.
TEACHER_VARIANTS = [
    ('lr2e-3_d0.0_e16', 2e-3, 0.0, 16),
    ('lr3e-3_d0.1_e16', 3e-3, 0.1, 16),
    ('lr3e-3_d0.1_e32', 3e-3, 0.1, 32),
    ('lr3e-3_d0.2_e32', 3e-3, 0.2, 32),
    ('lr3e-3_d0.2_e64', 3e-3, 0.2, 64),
    ('lr6e-3_d0.1_e32', 6e-3, 0.1, 32),
    ('lr1.5e-3_d0.1_e32', 1.5e-3, 0.1, 32),
    ('lr3e-3_d0.3_e64', 3e-3, 0.3, 64),
]


def _docs_ids(tok, docs, prefix_id):
    "One stream: each document is `[prefix] + tokens`, documents concatenated in order."
    ids = []
    for d in docs: ids += [prefix_id] + tok.encode(d, add_special_tokens=False).ids
    return ids


def teacher_data(tok):
    "Train / validation / held-out token streams (python lists), fixed order; `tok` is a `tokenizers.Tokenizer`."
    from kd_kaggle.demo import demo_corpus, DEMO_TRAIN_NOVELS
    eos = tok.token_to_id('<|endoftext|>')
    train, val = [], []
    for n in DEMO_TRAIN_NOVELS:
        p = demo_corpus(n); k = len(p) - max(1, round(VAL_FRACTION * len(p)))
        train.append('\n\n'.join(p[:k])); val.append('\n\n'.join(p[k:]))
    held = ['\n\n'.join(demo_corpus('heldout'))]
    return _docs_ids(tok, train, eos), _docs_ids(tok, val, eos), _docs_ids(tok, held, eos)


def _dropout_hooks(model, p):
    "Dropout on the embedding output and on every attention / MLP output, in training mode only."
    import torch.nn.functional as F
    def hook(mod, inp, out):
        if not mod.training or p == 0: return out
        if isinstance(out, tuple): return (F.dropout(out[0], p, True),) + tuple(out[1:])
        return F.dropout(out, p, True)
    mods = [model.model.embed_tokens] + [m for l in model.model.layers for m in (l.self_attn, l.mlp)]
    return [m.register_forward_hook(hook) for m in mods]


def _eval_stream(model, ids, ctx, batch=16):
    "Mean next-token loss over non-overlapping windows of `ctx` (every token but the first predicted once)."
    import torch, torch.nn.functional as F
    tot, n = 0.0, 0
    L = ids.numel()
    starts = list(range(0, L - 1, ctx))
    model.eval()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=ids.is_cuda):
        full = [s for s in starts if s + ctx + 1 <= L]
        for i in range(0, len(full), batch):
            x = torch.stack([ids[s:s + ctx + 1] for s in full[i:i + batch]])
            lg = model(input_ids=x[:, :-1]).logits.float()
            tot += F.cross_entropy(lg.flatten(0, 1), x[:, 1:].flatten(), reduction='sum').item(); n += x[:, 1:].numel()
        for s in starts[len(full):]:
            x = ids[s:][None]
            lg = model(input_ids=x[:, :-1]).logits.float()
            tot += F.cross_entropy(lg.flatten(0, 1), x[:, 1:].flatten(), reduction='sum').item(); n += x.shape[1] - 1
    model.train()
    return tot / n


def train_teacher_variant(name, lr, dropout, epochs, out: Path, device=None, max_steps=None):
    "Pretrain one teacher variant; keep the weights of its best validation loss. Returns its log dict."
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM
    from kd_kaggle.demo import seeded_init_
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(SEED)
    torch.backends.cuda.matmul.allow_tf32 = True
    tok = Tokenizer.from_file(str(ASSETS / 'teacher' / 'tokenizer.json'))  # the shipped file, whatever transformers does
    tr, va, he = (torch.tensor(x, dtype=torch.long, device=device) for x in teacher_data(tok))
    cfg = AutoConfig.from_pretrained(ASSETS / 'teacher')
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    seeded_init_(model, seed=SEED)
    model.to(device).train()
    hooks = _dropout_hooks(model, dropout)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': WEIGHT_DECAY}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=lr, betas=BETAS, eps=1e-8, fused=(device == 'cuda'))
    n_win = (tr.numel() - 1) // SEQ_LEN
    steps_per_epoch = n_win // BATCH
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    def lr_at(s):
        if s < WARMUP: return lr * (s + 1) / WARMUP
        q = (s - WARMUP) / max(1, total - WARMUP)
        return lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(q, 1.0))))
    g = torch.Generator().manual_seed(SEED)
    log = dict(name=name, lr=lr, dropout=dropout, epochs=epochs, total_steps=total, steps_per_epoch=steps_per_epoch,
               train_tokens=tr.numel(), val_tokens=va.numel(), heldout_tokens=he.numel(), curve=[], truncated=False)
    best, best_state, step, t0 = float('inf'), None, 0, time.time()
    order = torch.empty(0, dtype=torch.long)
    while step < total:
        if order.numel() < BATCH:  # a new epoch: random offset, shuffled non-overlapping windows
            off = int(torch.randint(0, SEQ_LEN, (1,), generator=g))
            nw = (tr.numel() - 1 - off) // SEQ_LEN
            order = off + SEQ_LEN * torch.randperm(nw, generator=g)
        idx, order = order[:BATCH], order[BATCH:]
        pos = idx.to(device)[:, None] + torch.arange(SEQ_LEN + 1, device=device)
        x = tr[pos]
        for grp in opt.param_groups: grp['lr'] = lr_at(step)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=(device == 'cuda')):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step(); step += 1
        if step % EVAL_EVERY == 0 or step == total:
            l = loss.item()
            v = _eval_stream(model, va, cfg.max_position_embeddings)
            h = _eval_stream(model, he, cfg.max_position_embeddings)
            log['curve'].append(dict(step=step, train=round(l, 4), val=round(v, 4), heldout=round(h, 4),
                                     lr=lr_at(step - 1), s=round(time.time() - t0, 1)))
            if v < best:
                best = v; best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                log.update(best_step=step, best_val=v, heldout_at_best=h)
            print(f'[{name}] step {step}/{total} train {l:.3f} val {v:.3f} heldout {h:.3f} {time.time() - t0:.0f}s', flush=True)
        if time.time() - t0 > TIME_LIMIT_S: log['truncated'] = True; break
    for hk in hooks: hk.remove()
    log['seconds'] = round(time.time() - t0, 1); log['steps_done'] = step
    model.load_state_dict(best_state)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    (out / 'log.json').write_text(json.dumps(log, indent=1))
    return log


def train_teacher(out: Path, jobs: int, only=None, max_steps=None):
    "Run TEACHER_VARIANTS in parallel processes; copy the best (by validation loss) to `out`."
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get('TMPDIR', '/tmp')) / 'kd_demo_teacher'
    shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
    procs, pending, done = {}, [v for v in TEACHER_VARIANTS if not only or v[0] in only], []
    env = dict(os.environ, OMP_NUM_THREADS='2', PYTHONUNBUFFERED='1')
    extra = [] if max_steps is None else ['--max-steps', str(max_steps)]
    t0 = time.time()
    while pending or procs:
        while pending and len(procs) < jobs:
            name, lr, dr, ep = pending.pop(0)
            logf = open(work / f'{name}.txt', 'w')
            procs[name] = (subprocess.Popen([sys.executable, __file__, 'teacher-variant', name, str(work / name)] + extra,
                                            stdout=logf, stderr=subprocess.STDOUT, env=env), logf)
        time.sleep(2)
        for name, (p, logf) in list(procs.items()):
            if p.poll() is not None:
                logf.close(); del procs[name]; done.append((name, p.returncode))
                print(f'{name}: exit {p.returncode} after {time.time() - t0:.0f}s', flush=True)
    logs = {}
    for name, rc in done:
        f = work / name / 'log.json'
        logs[name] = json.loads(f.read_text()) if f.exists() else dict(name=name, error=rc, tail=(work / f'{name}.txt').read_text()[-2000:])
    ok = [l for l in logs.values() if 'best_val' in l]
    best = min(ok, key=lambda l: l['best_val'])
    shutil.copy(work / best['name'] / 'model.safetensors', out / 'model.safetensors')
    summary = dict(chosen=best['name'], wall_s=round(time.time() - t0, 1), variants=logs,
                   settings=dict(SEED=SEED, VAL_FRACTION=VAL_FRACTION, SEQ_LEN=SEQ_LEN, BATCH=BATCH, WARMUP=WARMUP,
                                 BETAS=BETAS, WEIGHT_DECAY=WEIGHT_DECAY, CLIP=CLIP, MIN_LR_RATIO=MIN_LR_RATIO,
                                 TEACHER_ARCH=TEACHER_ARCH))
    (out / 'train_log.json').write_text(json.dumps(summary, indent=1))
    with open(out / 'variants.txt', 'w') as f:
        for name, _ in done: f.write((work / f'{name}.txt').read_text())
    print(f"{'variant':18s} {'steps':>6s} {'best@':>6s} {'val':>7s} {'heldout':>7s} {'sec':>6s} trunc")
    for l in sorted(ok, key=lambda l: l['best_val']):
        print(f"{l['name']:18s} {l['steps_done']:6d} {l['best_step']:6d} {l['best_val']:7.4f} {l['heldout_at_best']:7.4f} {l['seconds']:6.0f} {l['truncated']}")
    print('chosen:', best['name'])


def install_teacher(src: Path):
    from safetensors import safe_open
    f = src / 'model.safetensors'
    with safe_open(str(f), 'pt') as s:
        dt = {str(s.get_slice(k).get_dtype()) for k in s.keys()}
    assert dt == {'F16'}, dt
    shutil.copy(f, ASSETS / 'teacher' / 'model.safetensors')
    print('installed', f.stat().st_size, 'bytes')
    log = json.loads((src / 'train_log.json').read_text())
    env = (src / 'env.txt').read_text().strip().splitlines() if (src / 'env.txt').exists() else []
    variants = {n: {k: v.get(k) for k in ('lr', 'dropout', 'epochs', 'total_steps', 'steps_done', 'best_step', 'best_val',
                                          'heldout_at_best', 'seconds', 'truncated')} for n, v in log['variants'].items()}
    summary = dict(chosen=log['chosen'], chosen_by='lowest validation loss (last 5% of each training novel)',
                   device=env, wall_s=log['wall_s'], settings=log['settings'], variants=variants,
                   note='losses are mean nats/token on the GPU (bf16 autocast) during training; '
                        'run `python scripts/make_demo_assets.py eval` for the shipped fp16 weights on CPU')
    (ASSETS / 'teacher' / 'training_summary.json').write_text(json.dumps(summary, indent=1) + '\n')


def evaluate():
    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from kd_kaggle.demo import load_demo_teacher, load_demo_tokenizers, demo_lm_eval, seeded_init_
    from transformers import AutoModelForCausalLM
    ttok, _ = load_demo_tokenizers()
    t0 = time.time(); m = load_demo_teacher(); tl = time.time() - t0
    for split in ('heldout', 'train'):
        t0 = time.time(); r = demo_lm_eval(m, ttok, split, max_paragraphs=None if split == 'heldout' else 400)
        print(split, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, f'{time.time() - t0:.1f}s')
    fresh = seeded_init_(AutoModelForCausalLM.from_config(m.config, dtype=torch.float32), seed=0).eval()
    r = demo_lm_eval(fresh, ttok, 'heldout', max_paragraphs=100)
    print('fresh-init teacher, heldout first 100 paragraphs', {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    print(f'teacher load {tl:.2f}s')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('corpus'); c.add_argument('--src', type=Path, default=ROOT.parent / 'shared' / 'data' / 'austen')
    sub.add_parser('tokenizers'); sub.add_parser('configs')
    t = sub.add_parser('teacher'); t.add_argument('--out', type=Path, required=True); t.add_argument('--jobs', type=int, default=len(TEACHER_VARIANTS))
    t.add_argument('--only', nargs='*', default=None); t.add_argument('--max-steps', type=int, default=None)  # smoke tests
    v = sub.add_parser('teacher-variant'); v.add_argument('name'); v.add_argument('out', type=Path)
    v.add_argument('--max-steps', type=int, default=None)
    i = sub.add_parser('install-teacher'); i.add_argument('src', type=Path)
    sub.add_parser('eval')
    a = ap.parse_args()
    if a.cmd == 'corpus': build_corpus(a.src)
    elif a.cmd == 'tokenizers': build_tokenizers()
    elif a.cmd == 'configs': build_configs()
    elif a.cmd == 'teacher': train_teacher(a.out, a.jobs, a.only, a.max_steps)
    elif a.cmd == 'teacher-variant':
        name, lr, dr, ep = next(x for x in TEACHER_VARIANTS if x[0] == a.name)
        train_teacher_variant(name, lr, dr, ep, a.out, max_steps=a.max_steps)
    elif a.cmd == 'install-teacher': install_teacher(a.src)
    elif a.cmd == 'eval': evaluate()


if __name__ == '__main__':
    main()
