"""Every notebook in notebooks/ runs top to bottom (small size: WEIGHTLAB_SMALL=1), on the 8 virtual
CPU devices its header makes where there is no accelerator, so the mesh cells really split work."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTLAB_SMALL", "1")
    monkeypatch.setenv("XLA_FLAGS", "")  # the header cell adds the 8 virtual devices itself
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    header = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "backend: cpu | devices: 8" in header or "backend: cpu" not in header, header  # 8 virtual CPU devices


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_the_colab_header_and_sizes_by_tier(path):
    """Badge, TPU metadata and the install/device cell first (scripts/colab_header.py); sizes come from
    shard.pick(small=, cpu=, accelerator=), not from a small/full switch that ignores the backend."""
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("accelerator") == "TPU"
    assert [c.metadata.get("tags") for c in nb.cells[:2]] == [["weightlab_header"]] * 2
    assert "colab-badge" in nb.cells[0].source and f"notebooks/{path.name}" in nb.cells[0].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "ws.pick(" in code and "ws.runtime()" in code
    assert "if SMALL else" not in code
    if path.name != "quickstart.ipynb":
        assert "make_mesh" in code, "every pillar notebook ends on the devices you have"


def test_there_are_notebooks():
    assert any(p.name == "quickstart.ipynb" for p in NOTEBOOKS)
