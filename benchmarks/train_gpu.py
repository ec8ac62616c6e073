"""The real trainer on a GPU at the reference shapes, emulating a Kaggle T4 (also the 1-GPU half of the two-GPU run).

    accelerate launch --num_processes 1 benchmarks/train_gpu.py --out runs/gpu --steps 40
    accelerate launch --num_processes 2 benchmarks/train_gpu.py ...      # needs two GPUs (the T4x2 analogue)

Random-weight Qwen2.5-0.5B (teacher) and SmolLM2-135M (student) built from their configs with the real tokenizers
(tests/fixtures), saved once under --models; Austen text from the embedded corpus; `kd_kaggle.train.train` with
precision='fp16' (autocast + GradScaler, fp16 teacher, fp32 student), a 15 GiB allocator cap per GPU and SDPA limited to
the kernels a T4 has (memory-efficient + math). Prints the trainer's own lines and writes its run dir.
"""
import argparse, os, shutil, sys, time
from pathlib import Path
import torch

REPO = Path(__file__).resolve().parents[1]
QWEN05 = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
              vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6)
SMOL135 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
               vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=8192, rms_norm_eps=1e-5)

def build_models(root: Path):
    "Save random-weight teacher/student dirs with the real tokenizers (once)."
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, LlamaConfig, LlamaForCausalLM
    for name, cls, cfg_cls, cfg, tok in (('teacher', Qwen2ForCausalLM, Qwen2Config, QWEN05, 'qwen2'),
                                         ('student', LlamaForCausalLM, LlamaConfig, SMOL135, 'smollm2')):
        d = root/name
        if (d/'config.json').is_file(): continue
        torch.manual_seed(0)
        cls(cfg_cls(**cfg)).to(torch.float16 if name == 'teacher' else torch.float32).save_pretrained(d)
        AutoTokenizer.from_pretrained(REPO/'tests'/'fixtures'/'tokenizers'/tok).save_pretrained(d)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='runs/gpu'); ap.add_argument('--models', default='/tmp/kd_models')
    ap.add_argument('--steps', type=int, default=40); ap.add_argument('--batch-size', type=int, default=4)
    ap.add_argument('--seq-len', type=int, default=1024); ap.add_argument('--cap-gib', type=float, default=15.0)
    ap.add_argument('--grad-accum', type=int, default=1); ap.add_argument('--save-every', type=int, default=None)
    ap.add_argument('--log-every', type=int, default=5); ap.add_argument('--eval-every', type=int, default=None)
    ap.add_argument('--resume', default='auto', help="'auto' (this --out) or a checkpoint dir, e.g. one a 2-GPU run wrote")
    ap.add_argument('--compile', default='auto', choices=('auto', 'on', 'off'))
    ap.add_argument('--cache-dir', default=None, help='prepared-data cache shared by several runs (default: under --out)')
    args = ap.parse_args()
    from accelerate import PartialState
    state = PartialState()
    if state.is_main_process: build_models(Path(args.models))
    state.wait_for_everyone()
    dev = torch.cuda.current_device() if state.device.index is None else state.device.index
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / torch.cuda.get_device_properties(dev).total_memory), dev)
    from kd_kaggle.demo import demo_corpus
    data = Path(args.models)/'austen_train.txt'
    if state.is_main_process and not data.is_file(): data.write_text('\n\n'.join(demo_corpus('train')))
    state.wait_for_everyone()
    from kd_kaggle.env import use_repeat_kv_for_sdpa
    use_repeat_kv_for_sdpa()              # what the trainer does on a real T4 (sm_75); this card has flash, so force it
    from kd_kaggle.config import KDConfig
    from kd_kaggle.train import train
    from torch.nn.attention import sdpa_kernel, SDPBackend
    cfg = KDConfig(teacher=str(Path(args.models)/'teacher'), student=str(Path(args.models)/'student'), data=str(data),
                   seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.steps,
                   precision='fp16', lr=3e-4, max_eval_examples=32, eval_every=args.eval_every or max(10, args.steps // 2),
                   save_every=args.save_every or max(10, args.steps // 2), log_every=args.log_every, print_every=10,
                   time_budget='20m', output_dir=args.out, max_train_examples=2000, resume=args.resume, cache_dir=args.cache_dir,
                   compile=args.compile)
    t0 = time.time()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):   # a T4 has no flash / cuDNN attention
        m = train(cfg)
    if state.is_main_process:
        print(f"train_gpu: {time.time() - t0:.0f}s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
              f"student bpb {m.get('student_bpb_before')} -> {m.get('student_bpb')}, teacher bpb {m.get('teacher_bpb')}")

if __name__ == '__main__':
    main()
