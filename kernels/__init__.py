"""Pallas kernels, importable as ``weightlab.kernels``.

Each kernel module ``foo.py`` exposes ``foo(...)`` and ``foo_reference(...)`` (pure jnp, same
signature). The quantization and merging pillars add their kernels here.

The top-level name ``kernels`` belongs to Hugging Face's ``kernels`` distribution, which
transformers >= 5 imports at start-up. Our folder is installed as ``weightlab.kernels`` only, but a
Python started in the repository root (``python -m pytest``, a notebook, ``python -c``) has the root
on ``sys.path`` and would find this folder first under the bare name, breaking ``import
transformers``. When imported under the bare name, this module therefore hands the import over to
the first ``kernels`` package on ``sys.path`` that is not a copy of this folder (the repository
root may be on the path under several spellings, or another checkout with it). Without one it
stays this empty, version-less package, which transformers' availability check reads as "not
usable".
"""

if __name__ == "kernels":  # imported as a top-level package: the repository root is on sys.path
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _ours(spec) -> bool:  # a copy of this folder (another checkout, or this one by another path)
        return spec.origin is not None and _os.path.exists(
            _os.path.join(_os.path.dirname(spec.origin), "dequant_matmul.py"))

    _spec = None
    for _entry in _sys.path:
        _found = _machinery.PathFinder.find_spec("kernels", [_entry])
        if _found is not None and _found.loader is not None and not _ours(_found):
            _spec = _found
            break
    if _spec is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_real)
