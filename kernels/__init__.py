"""Pallas kernels, importable as ``weightlab.kernels``.

Each kernel module ``foo.py`` exposes ``foo(...)`` and ``foo_reference(...)`` (pure jnp, same
signature). The quantization and merging pillars add their kernels here.

The top-level name ``kernels`` belongs to Hugging Face's ``kernels`` distribution, which
transformers >= 5 imports at start-up. Our folder is installed as ``weightlab.kernels`` only, but a
Python started in the repository root (``python -m pytest``, a notebook, ``python -c``) has the root
on ``sys.path`` and would find this folder first under the bare name, breaking ``import
transformers``. When imported under the bare name, this module therefore hands the import over to
the installed ``kernels`` distribution when there is one. (Without one it stays this empty,
version-less package, which transformers' availability check reads as "not usable".)
"""

if __name__ == "kernels":  # imported as a top-level package: the repository root is on sys.path
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_real)
