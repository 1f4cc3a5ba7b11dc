"""``weightlab quantize``: quantization of a safetensors checkpoint with any registered method.
Data-free methods (RTN, HQQ, any4) run tensor by tensor on any checkpoint; calibrated ones (GPTQ,
AWQ) run the model itself on calibration text, so they need a Hugging Face directory of a bundled
architecture (:mod:`.cli_calib`). Which options a method takes comes from its registry entry: an
option the method does not have is a usage error, not silently ignored. ``--export`` writes a
directory in another library's format through :func:`weightlab.interop.export_checkpoint`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import DependencyMissingError, QuantizationError, UsageError

_FLAGS = {"fmt": "--format", "bits": "--bits", "group_size": "--group-size", "act_order": "--act-order"}
CALIBRATION_FLAGS = {"calibration": "--calibration", "calibration_samples": "--calibration-samples",
                     "seq_len": "--seq-len", "act_order": "--act-order", "rotate": "--rotate", "seed": "--seed"}
"""Options that only calibrated methods take (``None``/``False`` = not given)."""


def method_kwargs(args) -> dict:
    """The method's keyword arguments from the options the user gave (None = not given). An option
    the method (or the chosen format) does not have is a :class:`UsageError`, never ignored."""
    from .defaults import DEFAULTS
    from .formats import format_for
    from .registry import METHODS

    entry = METHODS[args.method]
    if not entry.calibrated:
        given = [f for k, f in CALIBRATION_FLAGS.items() if getattr(args, k, None) not in (None, False)]
        if given:
            raise UsageError(f"{given[0]} applies to the calibrated methods only "
                             f"({', '.join(METHODS.names(calibrated=True))}), not to --method {args.method}")
    elif getattr(args, "axis", None) is not None:
        raise UsageError(f"--axis does not apply to --method {args.method}: the model's own matmuls give each "
                         "weight's input axis")
    given = {"fmt": args.format, "bits": args.bits, "group_size": args.group_size,
             "act_order": True if getattr(args, "act_order", False) else None}
    kw = {}
    for k, v in given.items():
        if v is None:
            continue
        if k not in entry.parameters:
            raise UsageError(f"{_FLAGS[k]} does not apply to --method {args.method} (it takes "
                             f"{', '.join(_FLAGS[p] for p in _FLAGS if p in entry.parameters) or 'none of them'})")
        kw[k] = v
    if "fmt" in kw:
        fmt = format_for(kw["fmt"], kw.get("bits", DEFAULTS["bits"]))  # an unknown name lists the known ones
        if args.bits is not None and kw["fmt"].lower() not in ("int", "uint"):
            raise UsageError(f"--bits applies to the int/uint formats only; {fmt.name} is a fixed {fmt.bits}-bit "
                             "format (drop --bits)")
        if fmt.block_size is not None and kw.get("group_size", "auto") not in ("auto", fmt.block_size):
            raise UsageError(f"{fmt.name} has a fixed block of {fmt.block_size} weights; --group-size "
                             f"{kw['group_size']} does not apply (drop it or give {fmt.block_size})")
    return kw


def exporter(args):
    """``weightlab.interop.export_checkpoint`` when ``--export`` is given (None otherwise), imported
    before any work so a build without it fails at once."""
    if getattr(args, "export", None) is None:
        return None
    try:
        from ..interop import export_checkpoint
    except ImportError as e:
        raise DependencyMissingError(f"--export {args.export} needs weightlab.interop, which this installation "
                                     f"lacks ({e}); write the weightlab .safetensors file instead (drop "
                                     "--export)") from None
    return export_checkpoint


def hf_config(path) -> dict | None:
    """The ``config.json`` of a checkpoint directory (None for a file or a directory without one)."""
    from ..io.header import read_json_object

    f = Path(path) / "config.json"
    return read_json_object(f) if Path(path).is_dir() and f.is_file() else None


def export_format(choice: str) -> tuple[str, dict]:
    """``--export`` choice -> (weightlab.interop format, its options)."""
    return ("gptq", {"checkpoint_format": "gptq_v2"}) if choice == "gptq-v2" else (choice, {})


def _side_files(src) -> dict[str, bytes]:
    """The tokenizer and generation config of an HF directory, copied into an exported directory."""
    from ..merge.hfout import TOKENIZER_FILES, side_files

    return side_files(str(src), TOKENIZER_FILES + ("generation_config.json",))


def _v1_cannot_hold(flat: dict) -> str | None:
    """The first asymmetric QArray with a zero point of 0, which GPTQ's v1 layout cannot store."""
    import numpy as np

    from .qarray import is_qarray

    return next((k for k, q in flat.items() if is_qarray(q) and q.zero is not None
                 and bool(np.any(np.asarray(q.zero) == 0))), None)


def write(args, flat: dict, metadata: dict, config: dict | None, export) -> None:
    """Write the HF-named ``flat`` tree: one weightlab .safetensors file (QArray layouts in its
    header), or with ``--export`` a directory in that format with the input's tokenizer files
    (atomic either way). ``--export gptq`` whose zero points include 0 (not storable in the v1
    layout) is written as ``gptq_v2`` with a note rather than failing after the calibration."""
    from . import save

    if export is None:
        save(args.output, flat, metadata=metadata, overwrite=args.overwrite)
        return
    fmt, options = export_format(args.export)
    if fmt == "compressed-tensors" and any(getattr(q, "zero", None) is not None for q in flat.values()):
        print("note: asymmetric codes (zero points): compressed-tensors 0.20 decompresses them, but transformers "
              "5.24 cannot load such a checkpoint (a library bug); --format int writes symmetric codes it loads")
    if args.export == "gptq":
        bad = _v1_cannot_hold(flat)
        if bad is not None:
            print(f"note: '{bad}' has zero points of 0, which the GPTQ v1 layout (checkpoint_format 'gptq') cannot "
                  "store; writing checkpoint_format 'gptq_v2' (GPTQModel reads it; --format int gives symmetric "
                  "codes that v1 holds)")
            options = {"checkpoint_format": "gptq_v2"}
    export(flat, args.output, fmt, config=config, overwrite=args.overwrite, files=_side_files(args.input), **options)


def _existing_qarrays(c, source: str) -> dict:
    """QArrays already in the input (a partly quantized checkpoint), rebuilt from the header's
    layouts so they are written back with their layouts (never as raw codes/scale tensors)."""
    from .checkpoint import qarray_specs
    from .qarray import QArray

    return {p: QArray.from_spec(spec, {n: c[f"{p}/{n}"] for n in spec["children"]})
            for p, spec in qarray_specs(c.metadata, source, names=c.keys()).items()}


def run(args) -> int:
    from .. import io as wio
    from ..cliargs import output
    from . import check_quantizable, quantize_array
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..dtypes import is_floating

    from .registry import METHODS

    kw = method_kwargs(args)
    if METHODS[args.method].calibrated:
        from .cli_calib import run_calibrated

        return run_calibrated(args, kw)
    output(args.output, args.overwrite, args.dry_run)
    export = exporter(args)
    config = hf_config(args.input) if export is not None else None
    sel = re.compile(args.select)
    exc = re.compile(args.exclude) if args.exclude else None
    t0 = time.time()
    with wio.open_checkpoint(args.input) as c:
        kept = _existing_qarrays(c, str(args.input))
        hidden = {f"{p}/{n}" for p, q in kept.items() for n in q.spec()["children"]}
        if kept:
            print(f"{args.input}: keeping {len(kept)} tensors that are already quantized as they are")
        plan = []
        for name in c.keys():
            if name in hidden:
                continue
            shape, dtype = c.shape(name), c.dtype(name)
            chosen = len(shape) == 2 and is_floating(dtype) and sel.search(name) and not (exc and exc.search(name))
            axis = args.axis if args.axis is not None else (-1 if name.endswith(".weight") else -2)
            if chosen:  # validate every tensor from the header (shape/dtype only) before reading any data
                check_quantizable(name, jax.ShapeDtypeStruct(shape, dtype),
                                  lambda w, n=name, a=axis: quantize_array(w, args.method, axis=a, path=n, **kw))
            plan.append((name, bool(chosen), axis))
        n_q = sum(1 for _, ch, _ in plan if ch)
        f64 = [n for n, ch, _ in plan if ch and c.dtype(n) == np.float64]
        if f64 and not jax.config.jax_enable_x64:
            print(f"note: {len(f64)} float64 tensors (e.g. {f64[0]}) are quantized from their float32 values and "
                  "dequantize to float32 (JAX runs 32-bit; set JAX_ENABLE_X64=1 to keep float64)")
        print(f"{args.input}: {len(plan)} tensors, {n_q} to quantize with {args.method} {json.dumps(kw)}")
        if n_q == 0:
            raise QuantizationError(f"no 2-D float tensor matches --select {args.select!r} minus --exclude")
        if args.dry_run:
            for name, ch, axis in plan:
                if ch:
                    print(f"  quantize {name} {tuple(c.shape(name))} axis={axis}")
            return 0
        out, dense_bytes, q_bytes = dict(kept), 0, 0
        from tqdm import tqdm

        for name, ch, axis in tqdm(plan, desc="quantize", disable=None, leave=False):
            arr = c[name]
            if ch:
                q = quantize_array(jnp.asarray(arr), args.method, axis=axis, path=name, **kw)
                out[name] = jax.device_get(q)
                dense_bytes += arr.nbytes
                q_bytes += q.nbytes
            else:
                out[name] = np.asarray(arr)
    write(args, out, {"weightlab.recipe": {"method": args.method, **kw, "source": str(Path(args.input).resolve())}},
          config, export)
    print(f"wrote {args.output}: quantized tensors {dense_bytes / 2**20:.2f} MiB -> {q_bytes / 2**20:.2f} MiB "
          f"({dense_bytes / max(q_bytes, 1):.2f}x smaller) in {time.time() - t0:.1f}s")
    return 0
