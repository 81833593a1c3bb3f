"""Greedy k-center coreset against a NumPy transcription of PatchCore's approximate greedy
coreset on the same projection, and the pipeline's coreset patch sampler."""

from __future__ import annotations

import numpy as np
import pytest

from protoad_jax.clustering import coreset


def numpy_greedy(p: np.ndarray, start: np.ndarray, budget: int) -> list[int]:
    p = p.astype(np.float64)
    dist = np.mean([np.linalg.norm(p - p[s], axis=1) for s in start], axis=0)
    chosen = []
    for _ in range(budget):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(p - p[i], axis=1))
    return chosen


def test_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3000, 64)) * rng.choice([0.1, 1.0, 3.0], 3000)[:, None]).astype(np.float16)
    import jax
    key_w, key_s = jax.random.split(jax.random.key(5))
    proj = np.asarray(coreset._project(x, key_w, 16))
    start = np.asarray(jax.random.choice(key_s, 3000, (10,), replace=False))
    want = numpy_greedy(proj, start, 200)
    got = coreset.greedy_coreset(x, 200, seed=5, dim=16)
    print(f"coreset of 200: {len(set(got) ^ set(want))} indices differ from the transcription")
    assert list(got) == sorted(want)


def test_covers_rare_points_better_than_random():
    """A few far outliers among a dense blob: the coreset keeps them all, a uniform sample
    of the same size almost never does."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 32)).astype(np.float32)
    x[:8] += 40.0 * rng.normal(size=(8, 32))
    idx = coreset.greedy_coreset(x, 100, seed=0)
    assert set(range(8)) <= set(idx.tolist()) and len(idx) == 100
    assert np.array_equal(idx, coreset.greedy_coreset(x, 100, seed=0))  # seeded
    assert len(coreset.greedy_coreset(x, 6000)) == 5000


def test_bad_input():
    with pytest.raises(ValueError, match="budget"):
        coreset.greedy_coreset(np.ones((5, 3)), 0)
    bad = np.ones((5, 3))
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        coreset.greedy_coreset(bad, 2)
