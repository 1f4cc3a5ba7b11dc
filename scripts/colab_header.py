"""Give every notebook in notebooks/ the Colab header: an open-in-Colab badge, TPU accelerator
metadata, and a first code cell that installs weightlab where it is missing (skipped where it is
installed) and reports the devices. Idempotent (the header cells carry a ``weightlab_header`` tag).

    python scripts/colab_header.py [--repo OWNER/NAME]
"""

import argparse
from pathlib import Path

import nbformat as nbf

ap = argparse.ArgumentParser()
ap.add_argument("--repo", default="weightlab/weightlab")
a = ap.parse_args()
INSTALL = f"""# Install weightlab where it is missing (Colab); skipped where it is installed. Then: the devices.
import importlib.util, subprocess, sys
if importlib.util.find_spec("weightlab") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/{a.repo}"])
import jax
print("backend:", jax.default_backend(), "| devices:", jax.device_count(), "|", jax.devices()[0].device_kind)"""

for path in sorted(Path("notebooks").glob("*.ipynb")):
    nb = nbf.read(path, as_version=4)
    if path.name == "scale.ipynb":  # has its own (it also makes 8 CPU devices)
        continue
    nb.cells = [c for c in nb.cells if "weightlab_header" not in c.metadata.get("tags", [])]
    badge = nbf.v4.new_markdown_cell(
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{a.repo}/blob/main/notebooks/{path.name})",
        metadata={"tags": ["weightlab_header"]})
    install = nbf.v4.new_code_cell(INSTALL, metadata={"tags": ["weightlab_header"]})
    nb.cells = [badge, install] + nb.cells
    nb.metadata["accelerator"] = "TPU"
    nb.metadata.setdefault("colab", {"provenance": []})
    nbf.write(nb, path)
    print("header:", path)
