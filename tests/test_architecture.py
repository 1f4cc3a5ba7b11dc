"""The layering and the one-registry template (docs/architecture.md), checked mechanically."""

import ast
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import weightlab as wl
from weightlab import merge, quant

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "weightlab"
GROUND = ["tree.py", "errors.py", "core.py", "dtypes.py", "registry.py", "_lazy.py"]
ABOVE_GROUND = {"io", "quant", "merge", "models", "data", "lab", "kernels", "align", "lopt", "shard", "train", "eval",
                "evaluate", "evalcli", "interop",
                "cli", "cliargs"}


def imported_modules(path: Path) -> set[str]:
    """Top-level weightlab subpackages a file imports (relative or absolute)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and path.parent == PKG:  # from .x import
                out.add(mod.split(".")[0] if mod else "")
                out.update(a.name for a in node.names if not mod)
            elif node.level >= 1:
                parts = path.relative_to(PKG).parts[:-1]
                base = list(parts[:len(parts) - (node.level - 1)])
                full = base + (mod.split(".") if mod else [])
                out.add(full[0] if full else (node.names[0].name if node.names else ""))
            elif mod.startswith("weightlab."):
                out.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("weightlab."):
                    out.add(a.name.split(".")[1])
    return out


@pytest.mark.parametrize("name", GROUND)
def test_the_ground_imports_nothing_above_it(name):
    bad = imported_modules(PKG / name) & ABOVE_GROUND
    assert not bad, f"{name} imports {bad}"


def test_kernels_take_plain_arrays_and_pillars_never_import_lab():
    for f in (ROOT / "kernels").glob("*.py"):
        assert not imported_modules(f) & {"quant", "merge"}, f
    for pillar in ("quant", "merge", "align", "lopt", "io", "models", "data"):
        for f in (PKG / pillar).glob("*.py"):
            assert "lab" not in imported_modules(f), f
    for f in (PKG / "io").glob("*.py"):  # the QArray metadata key belongs to quant
        assert "weightlab.qarrays" not in f.read_text(), f


def test_no_module_grows_past_the_limit():
    for f in list(PKG.rglob("*.py")) + list((ROOT / "kernels").glob("*.py")):
        n = len(f.read_text().splitlines())
        assert n <= 620, f"{f.relative_to(ROOT)} has {n} lines"


def test_docs_tables_equal_the_registries():
    from weightlab.lab.docs import FILES, sync

    for f in FILES:
        assert sync(ROOT / f, check=True) == [], f"{f}: run python scripts/gen_docs.py"


def test_everything_listed_comes_from_the_registries():
    for name in merge.METHODS:
        assert getattr(merge, name) is merge.METHODS[name].fn
        assert name in dir(merge)
    for name in quant.METHODS:
        assert isinstance(getattr(quant, name)(), wl.WeightTransform)
    r = subprocess.run([sys.executable, "-m", "weightlab.cli", "methods"], capture_output=True, text=True, timeout=120)
    from weightlab import align

    for name in align.METHODS:
        assert getattr(align, name) is align.METHODS[name].fn
        assert isinstance(align.transform(name), wl.WeightTransform)
    from weightlab import lopt

    for name in lopt.METHODS:
        assert getattr(lopt, name) is lopt.METHODS[name].fn, name
    assert isinstance(lopt.transform("small_fc"), wl.WeightTransform)
    for name in list(merge.METHODS) + list(quant.METHODS) + list(align.METHODS) + list(lopt.METHODS):
        assert f"  {name} " in r.stdout or f"  {name}" in r.stdout.replace("\n", " \n"), name
    from weightlab.cli import build_parser
    from weightlab.merge.config import yaml_methods

    help_text = build_parser(["merge"])._subparsers._group_actions[0].choices["merge"].format_help()
    for name in yaml_methods():
        assert name in help_text, name
    q = build_parser(["quantize"])._subparsers._group_actions[0].choices["quantize"]
    choices = next(a.choices for a in q._actions if a.dest == "method")
    assert list(choices) == quant.METHODS.names()
    a = build_parser(["align"])._subparsers._group_actions[0].choices["align"]
    choices = next(x.choices for x in a._actions if x.dest == "method")
    assert set(choices) <= set(align.METHODS.names()) and "weight_matching" in choices


def test_a_new_recipe_is_one_function_and_works_everywhere(tmp_path):
    """Adding a recipe of existing steps: one decorated function (here 8 lines) and it works from
    Python, as a transform under select, from YAML and from the CLI."""
    from weightlab import cli, io
    from weightlab.merge import methods
    from weightlab.merge.registry import METHODS, merge_method

    try:
        @merge_method("half_task_arithmetic", per_model_params=("weight",), paper="test only")
        def half_task_arithmetic(base, models, *, weight=1.0):
            """Task arithmetic at half strength."""
            return methods._gta(base, models, weight=weight, lambda_=0.5)

        rng = np.random.default_rng(0)
        base = {"a": {"weight": rng.standard_normal((4, 3)).astype(np.float32)}, "b": rng.standard_normal(3).astype(np.float32)}
        ms = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), base) for _ in range(2)]
        want = merge.task_arithmetic(base, ms, lambda_=0.5)
        got = half_task_arithmetic(base, ms)
        np.testing.assert_allclose(got["a"]["weight"], want["a"]["weight"], rtol=1e-6)
        t = wl.select("^a/", merge.transform("half_task_arithmetic"))
        out = wl.apply_once(t, base, models=ms)
        np.testing.assert_allclose(out["a"]["weight"], want["a"]["weight"], rtol=1e-6)
        assert out["b"] is base["b"]
        for name, p in [("base", base), ("m0", ms[0]), ("m1", ms[1])]:
            io.save_sharded(tmp_path / name, {"model.layers.0.w.weight": p["a"]["weight"], "model.norm.weight": p["b"]})
        cfg = tmp_path / "h.yml"
        cfg.write_text(f"merge_method: half_task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                       f"  - model: {tmp_path / 'm0'}\n  - model: {tmp_path / 'm1'}\n")
        assert cli.main(["merge", str(cfg), str(tmp_path / "out")]) == 0
        with io.open_checkpoint(tmp_path / "out") as c:
            np.testing.assert_allclose(c["model.layers.0.w.weight"], want["a"]["weight"], rtol=1e-6)
    finally:
        METHODS._entries.pop("half_task_arithmetic", None)
        vars(merge).pop("half_task_arithmetic", None)
