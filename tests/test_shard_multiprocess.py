"""Multi-process JAX: 2 local processes x 2 CPU devices (jax.distributed on localhost, gloo collectives)
run a sharded merge, a sharded GPTQ and one learned-optimizer step with results equal to one process;
bad settings, an absent coordinator and a mismatched process count are bounded, typed errors."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import weightlab as wl
from weightlab.errors import DistributedError
from weightlab.shard import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mp" / "worker.py"


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in list(env):
        if k.startswith(("WEIGHTLAB_COORD", "WEIGHTLAB_NUM_PROC", "WEIGHTLAB_PROCESS", "JAX_COORD", "JAX_NUM_PROC",
                         "JAX_PROCESS_ID")):
            env.pop(k)
    return env


def _launch(argvs, timeout):
    procs = [subprocess.Popen([sys.executable, *a], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for a in argvs]
    outs = []
    t0 = time.monotonic()
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], outs, time.monotonic() - t0


def test_settings_are_checked_before_anything_connects(monkeypatch):
    assert distributed.settings() is None  # single process: nothing to do
    for kw, pattern in [(dict(coordinator="localhost:1234"), "missing"),
                        (dict(coordinator="localhost:1234", num_processes=2, process_id=2), r"in \[0, 2\)"),
                        (dict(coordinator="localhost", num_processes=2, process_id=0), "host:port"),
                        (dict(coordinator="localhost:99999", num_processes=2, process_id=0), "host:port"),
                        (dict(coordinator="h:1", num_processes=0, process_id=0), ">= 1"),
                        (dict(coordinator="h:1", num_processes="two", process_id=0), "integers")]:
        with pytest.raises(DistributedError, match=pattern):
            distributed.settings(**kw)
    monkeypatch.setenv("WEIGHTLAB_COORDINATOR", "10.0.0.1:4000")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("WEIGHTLAB_PROCESS_ID", "3")
    assert distributed.settings() == {"coordinator": "10.0.0.1:4000", "num_processes": 4, "process_id": 3}
    assert distributed.settings(process_id=1)["process_id"] == 1  # flags beat the environment


SNIPPET = ("import sys; from weightlab.shard import distributed as d\n"
           "d.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), timeout_s=3)\n"
           "import jax; print('joined', jax.process_count(), flush=True); d.shutdown()")


def test_absent_coordinator_and_mismatched_counts_are_bounded_typed_errors():
    rc, out, dt = _launch([["-c", SNIPPET, f"localhost:{_port()}", "2", "1"]], timeout=60)
    assert rc == [1] and "DistributedError" in out[0] and "did not answer within 3 s" in out[0] and dt < 40
    port = _port()
    rc, out, dt = _launch([["-c", SNIPPET, f"localhost:{port}", "2", "0"],
                           ["-c", SNIPPET, f"localhost:{port}", "3", "1"]], timeout=90)
    assert rc[1] == 1 and "told num_processes=3 but the runtime sees 2" in out[1], out[1][-2000:]
    assert dt < 90


@pytest.mark.slow
def test_two_processes_compute_what_one_process_computes(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    try:
        import worker  # noqa: E402  (the same inputs and jobs, run here unsharded)
    finally:
        sys.path.remove(str(WORKER.parent))
    port, out = _port(), tmp_path / "mp.npz"
    rc, logs, dt = _launch([[str(WORKER), f"localhost:{port}", "2", str(i), str(out)] for i in range(2)], timeout=400)
    assert rc == [0, 0], "\n".join(x[-3000:] for x in logs)
    got = dict(np.load(out))
    p, stats, models, grads = worker.inputs()
    want = {}
    for name, (t, extras) in worker.jobs().items():
        res = wl.apply_once(t, p, **extras(p, stats, models, grads))
        want.update({f"{name}::{k}": v for k, v in worker.flat(res).items()})
    assert set(got) == set(want) and any(k.endswith("/codes") for k in got)
    for k in want:
        if k.endswith(("/codes", "/g_idx")):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert jax.process_count() == 1  # the test process itself never joined


def test_cli_flags_are_read_anywhere_and_bad_ones_fail_before_work(capsys, tmp_path, monkeypatch):
    from weightlab.cli import _pop_distributed, main

    rest, found = _pop_distributed(["info", "--coordinator", "h:1", "x.safetensors", "--num-processes=2",
                                    "--process-id", "1"])
    assert rest == ["info", "x.safetensors"]
    assert found == {"--coordinator": "h:1", "--num-processes": "2", "--process-id": "1"}
    rest, found = _pop_distributed(["info", "--coordinator", "--num-processes", "2"])  # a flag is not a value
    assert rest == ["info"] and found == {"--coordinator": None, "--num-processes": "2"}
    assert main(["methods", "--coordinator", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "--coordinator needs a value" in capsys.readouterr().err
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # JAX's own variables start a run too
    assert main(["methods", "--process-id", "0"]) == 2
    assert "missing ['coordinator']" in capsys.readouterr().err
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    assert main(["methods", "--coordinator", "localhost:1", "--num-processes", "2"]) == 2
    assert "missing ['process_id']" in capsys.readouterr().err
    assert main(["methods", "--distributed-timeout", "5"]) == 2
    assert "without --coordinator" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_job_across_two_processes_publishes_once(tmp_path):
    """`weightlab quantize` run by 2 processes: both compute, process 0 alone publishes the output."""
    import numpy as _np

    from weightlab import io

    src, out = tmp_path / "in.safetensors", tmp_path / "q.safetensors"
    io.save(src, {"layer.weight": _np.random.default_rng(0).standard_normal((64, 64)).astype(_np.float32)})
    port = _port()
    argv = lambda i: ["-m", "weightlab.cli", "quantize", str(src), str(out), "--method", "rtn", "--bits", "4", "--group-size", "32",  # noqa
                      "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
    rc, logs, dt = _launch([argv(0), argv(1)], timeout=240)
    assert rc == [0, 0], "\n".join(x[-2000:] for x in logs)
    assert "process 1 of 2" in logs[1] and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
