"""shard.tier / pick / runtime: notebooks and scripts size themselves by where they run."""

import jax
import pytest

from weightlab import shard as ws


def test_tier_follows_the_environment_and_the_backend(monkeypatch):
    monkeypatch.setenv("WEIGHTLAB_SMALL", "1")
    assert ws.tier() == "small" and ws.pick(small=1, cpu=2, accelerator=3) == 1
    for unset in ("", "0"):
        monkeypatch.setenv("WEIGHTLAB_SMALL", unset)
        assert ws.tier() == "cpu" and ws.pick(small=1, cpu=2, accelerator=3) == 2
    monkeypatch.delenv("WEIGHTLAB_SMALL")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert ws.tier() == "accelerator" and ws.pick(small=1, cpu=2, accelerator=3) == 3
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ws.tier() == "accelerator"


def test_runtime_reports_the_devices(monkeypatch):
    monkeypatch.setenv("WEIGHTLAB_SMALL", "1")
    r = ws.runtime()
    assert r.tier == "small" and r.backend == "cpu" and r.device_count == jax.device_count()
    assert str(r).startswith("small run | backend cpu | ")


def test_a_mistyped_switch_or_a_missing_size_is_an_error(monkeypatch):
    monkeypatch.setenv("WEIGHTLAB_SMALL", "yes")
    with pytest.raises(ValueError, match="WEIGHTLAB_SMALL must be '1'.*'yes'"):
        ws.tier()
    monkeypatch.setenv("WEIGHTLAB_SMALL", "1")
    with pytest.raises(TypeError):
        ws.pick(small=1, cpu=2)  # all three sizes are required
    with pytest.raises(TypeError):
        ws.pick(1, 2, 3)  # keyword-only
