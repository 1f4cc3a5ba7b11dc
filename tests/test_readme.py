"""The README's Python snippets run as written (in a scratch directory)."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.slow
def test_readme_snippets_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README block {i}", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message says which block broke
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e
