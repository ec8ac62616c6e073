"""Fail if `nbdev-clean` changes a notebook or `nbdev-export` changes the library.

Compares file hashes before and after, so it works on a fresh clone and on a dirty tree alike.
Usage: python .ci/check_sync.py [REPO_DIR]
"""
import hashlib, subprocess, sys
from pathlib import Path

def snapshot(root: Path, pattern: str) -> dict:
    "Map relative path -> sha256 for files under `root` matching `pattern`."
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern)) if p.is_file() and '__pycache__' not in p.parts}

def changed(before: dict, after: dict) -> list:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))

def main(repo: Path) -> int:
    bindir = Path(sys.executable).parent
    nbs_before = snapshot(repo, 'nbs/**/*.ipynb') | snapshot(repo, 'kaggle/*.ipynb')
    subprocess.run([str(bindir/'nbdev-clean')], cwd=repo, check=True)
    subprocess.run([str(bindir/'nbdev-clean'), '--fname', 'kaggle'], cwd=repo, check=True) if (repo/'kaggle').exists() else None
    nbs_diff = changed(nbs_before, snapshot(repo, 'nbs/**/*.ipynb') | snapshot(repo, 'kaggle/*.ipynb'))
    if nbs_diff:
        print('notebooks not clean (run nbdev-clean and commit):', *nbs_diff, sep='\n  ')
        return 1
    lib_before = snapshot(repo, 'kd_kaggle/**/*.py')
    subprocess.run([str(bindir/'nbdev-export')], cwd=repo, check=True)
    lib_diff = changed(lib_before, snapshot(repo, 'kd_kaggle/**/*.py'))
    if lib_diff:
        print('notebooks and library out of sync (run nbdev-export and commit):', *lib_diff, sep='\n  ')
        return 1
    print('sync check: notebooks clean, library matches notebooks')
    return 0

if __name__ == '__main__':
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else '.').resolve()))
