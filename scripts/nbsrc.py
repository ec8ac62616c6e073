"""Round-trip notebooks <-> percent-format text, for editing notebooks as plain files.

    python scripts/nbsrc.py to-py  nbs/02_align.ipynb  /tmp/02_align.py
    python scripts/nbsrc.py to-nb  /tmp/02_align.py    nbs/02_align.ipynb

Cells are separated by `# %%` (code) and `# %% [markdown]` (markdown, each line prefixed `# `).
Run `nbdev-clean` afterwards. Dev-only tool; not part of the package.
"""
import sys, nbformat

def to_py(nb_path, py_path):
    nb = nbformat.read(nb_path, as_version=4)
    out = []
    for c in nb.cells:
        if c.cell_type == 'markdown':
            out.append('# %% [markdown]\n' + '\n'.join(('# ' + l) if l else '#' for l in c.source.split('\n')))
        else: out.append('# %%\n' + c.source)
    open(py_path, 'w').write('\n\n'.join(out) + '\n')

def _unmd(lines):
    return '\n'.join(l[2:] if l.startswith('# ') else l[1:] if l.startswith('#') else l for l in lines)

def to_nb(py_path, nb_path):
    text = open(py_path).read()
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        src = '\n'.join(buf).strip('\n')
        if kind == 'md': cells.append(nbformat.v4.new_markdown_cell(_unmd(src.split('\n'))))
        else: cells.append(nbformat.v4.new_code_cell(src))
    for line in text.split('\n'):
        if line.startswith('# %% [markdown]'): flush(); kind, buf = 'md', []
        elif line.startswith('# %%'): flush(); kind, buf = 'code', []
        else: buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    nbformat.write(nb, nb_path)

if __name__ == '__main__':
    cmd, src, dst = sys.argv[1:4]
    {'to-py': to_py, 'to-nb': to_nb}[cmd](src, dst)
