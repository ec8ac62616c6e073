"""Execute the Kaggle notebook (kaggle/kd_kaggle_distill.ipynb) for real on a GPU machine, as a Kaggle user would run it.

    python benchmarks/kaggle_notebook_gpu.py --models /tmp/kd_models --out runs/nb --steps 30

The notebook runs unchanged except for its one "edit me" cell: the attached-model paths point at --models (the random-weight
Qwen2.5-0.5B / SmolLM2-135M that benchmarks/train_gpu.py builds, with the real tokenizers) and the training length is cut
to --steps. nbclient starts a real ipykernel, so on a machine with two GPUs the training cell takes its multi-GPU
branch (kd_kaggle.launch.notebook_train) exactly as on Kaggle's T4x2. A fork probe after every cell records whether
the notebook process left CUDA usable for a fork. Writes the executed notebook and a JSON summary
(`ran`, `processes`, `live_plot_images`, `report`, `errors`) to --out. No T4 emulation here: the launch is what is tested.
"""
import argparse, json, re, sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]

def edited(nb, models: Path, run_dir: Path, steps: int):
    "The notebook with its configuration cell pointed at `models` and cut to `steps` steps."
    cell = next(c for c in nb.cells if c.cell_type == 'code' and 'TEACHER = ' in c.source)
    src = cell.source
    for name, value in (('TEACHER', models/'teacher'), ('STUDENT', models/'student'), ('DATA', models/'austen_train.txt'),
                        ('OUTPUT_DIR', run_dir), ('TIME_BUDGET', '8m')):
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {str(value)!r}", src, count=1, flags=re.M)
        assert n == 1, f'no {name} line in the configuration cell'
    src, n = re.subn(r"batch_size=8, grad_accum=4, epochs=1,",
                     f"batch_size=4, grad_accum=1, max_steps={steps}, log_every=2, eval_every={steps // 2}, save_every={steps // 2}, "
                     "max_train_examples=800, max_eval_examples=32, precision='fp16',", src)
    assert n == 1, 'the KDConfig call in the configuration cell changed: update this script'
    cell.source = src
    return nb

FORK_CHECK = """import os as _os, torch as _torch
_r, _w = _os.pipe(); _pid = _os.fork()
if _pid == 0: _os.write(_w, b'1' if _torch.cuda._is_in_bad_fork() else b'0'); _os._exit(0)
_os.waitpid(_pid, 0); print('FORKCHECK {i}', _os.read(_r, 1) == b'1')"""

def with_fork_checks(nb):
    "After every code cell before the training cell: would a fork now find CUDA unusable?"
    cells, i = [], 0
    for j, c in enumerate(nb.cells):
        if c.cell_type == 'code' and 'notebook_train' in c.source: cells.extend(nb.cells[j:]); break
        cells.append(c)
        if c.cell_type == 'code': cells.append(nbformat.v4.new_code_cell(FORK_CHECK.format(i=i))); i += 1
    nb.cells = cells
    return nb

def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--models', default='/tmp/kd_models'); ap.add_argument('--out', default='runs/nb')
    ap.add_argument('--steps', type=int, default=30); args = ap.parse_args()
    out = Path(args.out).resolve(); out.mkdir(parents=True, exist_ok=True); run_dir = out/'kd_run'
    nb = edited(nbformat.read(REPO/'kaggle'/'kd_kaggle_distill.ipynb', as_version=4), Path(args.models).resolve(), run_dir, args.steps)
    nb = with_fork_checks(nb)
    t0, errors = time.time(), []
    try: NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(out)}}).execute()
    except Exception as e: errors.append(f'{type(e).__name__}: {str(e)[-3000:]}')
    nbformat.write(nb, out/'executed.ipynb')
    train_cell = next(c for c in nb.cells if c.cell_type == 'code' and 'notebook_train' in c.source)
    outs = train_cell.get('outputs', [])
    images = sum('image/png' in o.get('data', {}) for o in outs if o.get('output_type') in ('display_data', 'update_display_data'))
    text = ''.join(o.get('text', '') for o in outs if o.get('output_type') == 'stream')
    checks = [''.join(o.get('text', '')) for c in nb.cells if 'FORKCHECK' in c.source for o in c.get('outputs', []) if o.get('output_type') == 'stream']
    final = run_dir/'final_metrics.json'
    summary = {'ran': not errors and final.is_file(), 'wall_s': round(time.time() - t0, 1),
               'processes': (re.findall(r' x(\d+), precision', text) or [None])[0], 'live_plot_images': images,
               'final_metrics': json.loads(final.read_text()) if final.is_file() else None,
               'report': (run_dir/'report.md').is_file(), 'errors': errors,
               'fork_poisoned_after_cell': [c.strip() for c in checks], 'train_cell_text_tail': text[-2500:]}
    (out/'summary.json').write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != 'train_cell_text_tail'}, indent=1)); print(text[-2500:])
    sys.exit(0 if summary['ran'] else 1)

if __name__ == '__main__':
    main()
