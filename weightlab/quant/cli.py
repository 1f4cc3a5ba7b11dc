"""``weightlab quantize``: data-free quantization of a safetensors checkpoint, with any registered
data-free method. Which options a method takes comes from its registry entry: an option the method
does not have is a usage error, not silently ignored."""

from __future__ import annotations

import json
import re
import time

from ..errors import QuantizationError, UsageError

_FLAGS = {"fmt": "--format", "bits": "--bits", "group_size": "--group-size"}


def method_kwargs(args) -> dict:
    """The method's keyword arguments from the options the user gave (None = not given). An option
    the method (or the chosen format) does not have is a :class:`UsageError`, never ignored."""
    from .defaults import DEFAULTS
    from .formats import format_for
    from .registry import METHODS

    entry = METHODS[args.method]
    if entry.calibrated:
        raise UsageError(f"{args.method} needs calibration data; from the CLI only data-free methods run "
                         f"({', '.join(METHODS.names(calibrated=False))}); use weightlab.quant.quantize from Python")
    given = {"fmt": args.format, "bits": args.bits, "group_size": args.group_size}
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
    from . import check_quantizable, quantize_array, save
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..dtypes import is_floating

    kw = method_kwargs(args)
    output(args.output, args.overwrite, args.dry_run)
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
    save(args.output, out, metadata={"weightlab.recipe": {"method": args.method, **kw, "source": str(args.input)}},
         overwrite=args.overwrite)
    print(f"wrote {args.output}: quantized tensors {dense_bytes / 2**20:.2f} MiB -> {q_bytes / 2**20:.2f} MiB "
          f"({dense_bytes / max(q_bytes, 1):.2f}x smaller) in {time.time() - t0:.1f}s")
    return 0
