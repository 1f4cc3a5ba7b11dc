"""``weightlab quantize``: data-free quantization of a safetensors checkpoint (the argument parser is in
:mod:`weightlab.cli`, so building it does not import JAX)."""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import QuantizationError

def _kwargs(args) -> dict:
    g = args.group_size
    group = None if g == "channel" else (0 if g == "tensor" else int(g))
    if args.method == "rtn":
        return dict(fmt=args.format, bits=args.bits, group_size=group if args.format not in ("mxfp4", "nvfp4") else "auto")
    if args.method == "hqq":
        return dict(bits=args.bits, group_size=group)
    return dict(group_size=group)


def run(args) -> int:
    from .. import io as wio
    from ..io.atomic import refuse_existing
    from . import check_quantizable, quantize_array, save

    if not args.dry_run:
        refuse_existing(args.output, args.overwrite)
    kw = _kwargs(args)
    sel, exc = re.compile(args.select), re.compile(args.exclude) if args.exclude else None
    t0 = time.time()
    with wio.open_checkpoint(args.input) as c:
        plan = []
        for name in c.keys():
            shape, dtype = c.shape(name), c.dtype(name)
            floating = np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"
            chosen = len(shape) == 2 and floating and sel.search(name) and not (exc and exc.search(name))
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
                out[name] = arr
    save(args.output, out, metadata={"weightlab.recipe": {"method": args.method, **kw, "source": str(args.input)}},
         overwrite=args.overwrite)
    print(f"wrote {args.output}: quantized tensors {dense_bytes / 2**20:.2f} MiB -> {q_bytes / 2**20:.2f} MiB "
          f"({dense_bytes / max(q_bytes, 1):.2f}x smaller) in {time.time() - t0:.1f}s")
    return 0
