"""Pallas kernels, importable as ``weightlab.kernels``.

Each kernel module ``foo.py`` exposes ``foo(...)`` and ``foo_reference(...)`` (pure jnp, same
signature). The quantization and merging pillars add their kernels here.
"""
