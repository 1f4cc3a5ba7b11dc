"""Execute notebooks at full size and write their outputs back, so the committed notebooks show a
real run (the test suite runs them small, WEIGHTLAB_SMALL=1, and discards the outputs).

    python scripts/run_notebooks.py notebooks/quantization.ipynb notebooks/merging.ipynb

Each notebook runs in a scratch directory on one CPU device (XLA_FLAGS cleared) unless
``--keep-xla-flags``; a notebook with an error cell is not written back (exit status 1). The file
is replaced atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def run(path: Path, timeout: int) -> bool:
    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": scratch}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    print(f"{path}: {time.time() - t0:.0f} s, {len(errors)} error cell(s)", flush=True)
    if errors:
        print("\n".join(errors[0].get("traceback", []))[-3000:], file=sys.stderr)
        return False
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".ipynb.tmp", delete=False) as f:
        nbformat.write(nb, f)
    os.replace(f.name, path)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    ap.add_argument("--keep-xla-flags", action="store_true", help="do not clear XLA_FLAGS (virtual devices)")
    a = ap.parse_args(argv)
    if not a.keep_xla_flags:
        os.environ["XLA_FLAGS"] = ""
    os.environ.pop("WEIGHTLAB_SMALL", None)
    ok = [run(p, a.timeout) for p in a.notebooks]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
