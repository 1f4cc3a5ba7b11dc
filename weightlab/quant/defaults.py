"""The one table of quantizer defaults (no imports: the CLI reads it while building its parser)."""

__all__ = ["DEFAULTS"]

DEFAULTS = {"fmt": "uint", "bits": 4, "group_size": "auto", "axis": None, "scale_dtype": "float16",
            "select": r"(kernel|weight)$", "exclude": r"(embed|norm|LayerNorm|lm_head|pooler)"}
"""The one table of quantizer defaults (RTN, HQQ, any4, GPTQ, AWQ, QAT and ``weightlab quantize``):
asymmetric int4 (``"uint"``: codes with a zero point, the GPTQ/AWQ papers' "4-bit") in groups of
``"auto"`` = 128 weights (or the block of a block-scaled format: 32 for MXFP4, 16 for NVFP4) along
the input axis (``axis=None``: -2 for (in, out) kernels, or the axis the calibration statistics
found contracted), with float16 scales. ``"int"`` is the symmetric grid. ``select``/``exclude``: the
leaves quantized by default (the matrices of linear layers, Flax ``.../kernel`` or PyTorch
``....weight``; not embeddings, norms, the LM head or the pooler), see :data:`DEFAULT_SELECT`."""
