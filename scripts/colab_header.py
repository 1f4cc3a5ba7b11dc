"""Give every notebook in notebooks/ the Colab header: an open-in-Colab badge, TPU accelerator
metadata, and a first code cell that installs weightlab where it is missing (skipped where it is
installed), makes 8 virtual CPU devices where there is no accelerator, and reports the devices.
Idempotent (the header cells carry a ``weightlab_header`` tag).

    python scripts/colab_header.py [--repo OWNER/NAME]
"""

import argparse
from pathlib import Path

import nbformat as nbf

ap = argparse.ArgumentParser()
ap.add_argument("--repo", default="weightlab/weightlab")
a = ap.parse_args()
INSTALL = f"""# Install weightlab where it is missing (Colab); skipped where it is installed.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("weightlab") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/{a.repo}"])
# No accelerator: 8 virtual CPU devices, so the mesh cells really split work (must be set before JAX starts).
ACCEL = os.path.exists("/dev/accel0") or bool(os.environ.get("COLAB_TPU_ADDR")) or os.path.exists("/dev/nvidia0")
if not ACCEL and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
print("backend:", jax.default_backend(), "| devices:", jax.device_count(), "|", jax.devices()[0].device_kind)"""

for path in sorted(Path("notebooks").glob("*.ipynb")):
    nb = nbf.read(path, as_version=4)
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
