"""Memory checks: a step that would not fit raises MemoryError naming the budget before any heavy
work, on the host and on the device; a step that fits runs."""

from __future__ import annotations

import numpy as np
import pytest

from protoad_jax.clustering import finch, memory, merging


def _data(n=300, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) + 2.0


def test_host_first_neighbours(monkeypatch):
    monkeypatch.setattr(memory, "available_host", lambda: 1000)
    monkeypatch.setattr(finch, "first_neighbours", lambda *a, **k: pytest.fail("search ran"))
    with pytest.raises(MemoryError, match=r"first-neighbour search over 300 samples.*host "
                                          r"memory.*Config.max_patches"):
        finch.finch(_data(), num_clusters=5)


def test_device_first_neighbours(monkeypatch):
    monkeypatch.setattr(memory, "available_device", lambda device=None: 5000)
    monkeypatch.setattr(finch, "first_neighbours", lambda *a, **k: pytest.fail("search ran"))
    with pytest.raises(MemoryError, match=r"device memory.*Config.max_patches"):
        finch.finch(_data(), num_clusters=5)


def test_merge(monkeypatch):
    x = _data()
    levels = finch.finch(x).num_clusters
    k = levels[-1] - 1 if levels[-1] > 2 else levels[0] - 1  # needs one-pair merging
    assert k not in levels
    monkeypatch.setattr(merging, "host_bytes", lambda m, d: 10**18)
    monkeypatch.setattr(merging, "merge_closest", lambda *a, **kw: pytest.fail("merge ran"))
    with pytest.raises(MemoryError, match=rf"merging \d+ clusters down to {k}.*host memory.*"
                                          r"closer to a FINCH level"):
        finch.finch(x, num_clusters=k)


def test_fits_runs_and_unknown_is_no_limit(monkeypatch):
    want = finch.finch(_data(), num_clusters=5).required_labels
    monkeypatch.setattr(memory, "available_host", lambda: None)
    monkeypatch.setattr(memory, "available_device", lambda device=None: None)
    np.testing.assert_array_equal(finch.finch(_data(), num_clusters=5).required_labels, want)


def test_free_amounts_are_plausible():
    host = memory.available_host()
    print("free host bytes", host, "device", memory.available_device())
    assert host is None or host > 0
    memory.check("a small step", "nothing", host=1, device=1)  # fits
