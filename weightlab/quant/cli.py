"""``weightlab quantize``: data-free quantization of a safetensors checkpoint, with any registered
data-free method. Which options a method takes comes from its registry entry: an option the method
does not have is a usage error, not silently ignored."""

from __future__ import annotations

import json
import re
import time

from ..errors import QuantizationError

_FLAGS = {"fmt": "--format", "bits": "--bits", "group_size": "--group-size"}


class UsageError(QuantizationError):
    """A command-line option that does not apply, or a meaningless value."""


def _group(text):
    if text is None or text in ("auto", "channel", "tensor"):
        return {"channel": None, "tensor": 0}.get(text, text)
    try:
        g = int(text)
    except ValueError:
        raise UsageError(f"--group-size must be a positive integer, 'auto', 'channel' or 'tensor', got {text!r}") from None
    if g <= 0:
        raise UsageError(f"--group-size must be positive (or 'channel' / 'tensor'), got {g}")
    return g


def method_kwargs(args) -> dict:
    """The method's keyword arguments from the options the user gave (None = not given)."""
    from .registry import METHODS

    entry = METHODS[args.method]
    if entry.calibrated:
        raise UsageError(f"{args.method} needs calibration data; from the CLI only data-free methods run "
                         f"({', '.join(METHODS.names(calibrated=False))}); use weightlab.quant.quantize from Python")
    given = {"fmt": args.format, "bits": args.bits, "group_size": _group(args.group_size)}
    kw = {}
    for k, v in given.items():
        if v is None or (k == "group_size" and args.group_size is None):
            continue
        if k not in entry.parameters:
            raise UsageError(f"{_FLAGS[k]} does not apply to --method {args.method} (it takes "
                             f"{', '.join(_FLAGS[p] for p in _FLAGS if p in entry.parameters)})")
        kw[k] = v
    return kw


def run(args) -> int:
    from .. import io as wio
    from ..io.atomic import refuse_existing
    from . import check_quantizable, quantize_array, save
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..dtypes import is_floating

    if not args.dry_run:
        refuse_existing(args.output, args.overwrite)
    kw = method_kwargs(args)
    try:
        sel = re.compile(args.select)
        exc = re.compile(args.exclude) if args.exclude else None
    except re.error as e:
        raise UsageError(f"--select/--exclude: not a valid regular expression: {e}") from None
    t0 = time.time()
    with wio.open_checkpoint(args.input) as c:
        plan = []
        for name in c.keys():
            shape, dtype = c.shape(name), c.dtype(name)
            chosen = len(shape) == 2 and is_floating(dtype) and sel.search(name) and not (exc and exc.search(name))
            axis = args.axis if args.axis is not None else (-1 if name.endswith(".weight") else -2)
            if chosen:  # validate every tensor from the header (shape/dtype only) before reading any data
                check_quantizable(name, jax.ShapeDtypeStruct(shape, dtype),
                                  lambda w, n=name, a=axis: quantize_array(w, args.method, axis=a, path=n, **kw))
            plan.append((name, bool(chosen), axis))
        n_q = sum(1 for _, ch, _ in plan if ch)
        print(f"{args.input}: {len(plan)} tensors, {n_q} to quantize with {args.method} {json.dumps(kw)}")
        if n_q == 0:
            raise QuantizationError(f"no 2-D float tensor matches --select {args.select!r} minus --exclude")
        if args.dry_run:
            for name, ch, axis in plan:
                if ch:
                    print(f"  quantize {name} {tuple(c.shape(name))} axis={axis}")
            return 0
        out, dense_bytes, q_bytes = {}, 0, 0
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
