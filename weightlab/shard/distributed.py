"""Multi-process (multi-host) runs: ``jax.distributed`` set up from flags or the environment, checked first.

Every process runs the same program; :func:`initialize` connects them (``jax.distributed.initialize``
with the coordinator's ``host:port``, the number of processes and this process's id), then checks
that the runtime sees the process count it was told. After it, ``jax.devices()`` lists every
process's devices, ``make_mesh`` spans them, and weightlab's sharded transforms (``shard.jit``) run
unchanged: each process holds the shards of its own devices. Host arrays must be the same on every
process (load or generate them deterministically); :func:`global_array` places one,
:func:`gather` brings a result back to every host.

Settings come from arguments, else ``WEIGHTLAB_COORDINATOR`` / ``WEIGHTLAB_NUM_PROCESSES`` /
``WEIGHTLAB_PROCESS_ID``, else JAX's own ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``. Bad settings (a malformed address, an id outside ``[0, n)``, a count below 1)
are a :class:`~weightlab.errors.DistributedError` before anything connects; a coordinator that does
not answer is one after ``timeout_s`` seconds (never an endless wait: JAX's own client would abort
the process, so processes other than 0 first wait for the coordinator's port themselves); a process
told a different process count than the others gets one as soon as it has joined (the others are
then stopped by JAX's coordination service).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np

from ..errors import DistributedError

__all__ = ["settings", "initialize", "shutdown", "global_array", "gather", "is_initialized"]

_ENV = {"coordinator": ("WEIGHTLAB_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
        "num_processes": ("WEIGHTLAB_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
        "process_id": ("WEIGHTLAB_PROCESS_ID", "JAX_PROCESS_ID")}
_STATE = {"initialized": False}


def _env(name):
    for var in _ENV[name]:
        if os.environ.get(var) not in (None, ""):
            return os.environ[var], var
    return None, None


def settings(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
             ) -> dict | None:
    """The checked settings ``{"coordinator", "num_processes", "process_id"}`` from the arguments or
    the environment; ``None`` when nothing asks for more than one process."""
    vals, where = {}, {}
    for name, given in (("coordinator", coordinator), ("num_processes", num_processes), ("process_id", process_id)):
        if given is not None:
            vals[name], where[name] = given, f"--{name.replace('_', '-')}"
        else:
            v, var = _env(name)
            if v is not None:
                vals[name], where[name] = v, var
    if not vals:
        return None
    missing = [n for n in ("coordinator", "num_processes", "process_id") if n not in vals]
    if missing:
        raise DistributedError(f"a multi-process run needs the coordinator, the number of processes and this "
                               f"process's id; missing {missing} (given: {sorted(where.values())})")
    try:
        n, pid = int(vals["num_processes"]), int(vals["process_id"])
    except (TypeError, ValueError):
        raise DistributedError(f"num_processes and process_id must be integers, got {vals['num_processes']!r} "
                               f"({where['num_processes']}) and {vals['process_id']!r} ({where['process_id']})") from None
    if n < 1:
        raise DistributedError(f"num_processes must be >= 1, got {n} ({where['num_processes']})")
    if not 0 <= pid < n:
        raise DistributedError(f"process_id must be in [0, {n}), got {pid} ({where['process_id']})")
    addr = str(vals["coordinator"])
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[\w.\-]+):\d{1,5}", addr) or not 0 < int(addr.rsplit(":", 1)[1]) < 65536:
        raise DistributedError(f"the coordinator must be host:port (e.g. 10.0.0.1:1234), got {addr!r} "
                               f"({where['coordinator']})")
    return {"coordinator": addr, "num_processes": n, "process_id": pid}


def is_initialized() -> bool:
    return _STATE["initialized"]


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               timeout_s: int = 60) -> dict | None:
    """Connect this process to the others (see the module docstring). Returns the settings, or
    ``None`` (and does nothing) for a single-process run. Idempotent."""
    s = settings(coordinator, num_processes, process_id)
    if s is None or _STATE["initialized"]:
        return s
    if not isinstance(timeout_s, int) or timeout_s < 1:
        raise DistributedError(f"timeout_s must be a positive int, got {timeout_s!r}")
    if s["process_id"] != 0:  # JAX's client aborts the whole process (SIGABRT) when nobody answers: ask first
        _wait_for(s["coordinator"], timeout_s, s["process_id"], s["num_processes"])
    try:
        jax.distributed.initialize(s["coordinator"], s["num_processes"], s["process_id"],
                                   initialization_timeout=timeout_s)
    except Exception as e:  # the runtime raises various types; report what the user can act on
        raise DistributedError(f"process {s['process_id']} of {s['num_processes']} could not join the coordinator "
                               f"{s['coordinator']} within {timeout_s} s ({type(e).__name__}: {str(e)[:300]}); "
                               "is process 0 running, and do all processes agree on --num-processes?") from e
    _STATE["initialized"] = True
    if jax.process_count() != s["num_processes"]:
        raise DistributedError(f"told num_processes={s['num_processes']} but the runtime sees {jax.process_count()} "
                               "processes")
    return s


def _wait_for(addr: str, timeout_s: int, pid: int, n: int) -> None:
    import socket
    import time

    host, port = addr.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"process {pid} of {n}: the coordinator {addr} did not answer within {timeout_s} s "
                                       f"({e.strerror or e}); start process 0 (which hosts it) with the same "
                                       "--coordinator") from None
            time.sleep(0.2)


def shutdown() -> None:
    """Disconnect (``jax.distributed.shutdown``); safe to call when not initialized."""
    if _STATE["initialized"]:
        jax.distributed.shutdown()
        _STATE["initialized"] = False


def global_array(host: Any, sharding) -> jax.Array:
    """A global ``jax.Array`` with ``sharding`` from a host array every process holds whole (each
    process fills only its own devices' shards)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def gather(tree: Any) -> Any:
    """Every array of ``tree`` whole, as NumPy, on every process (an all-gather across processes)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
