"""Closest-pair merging against a brute force that recomputes every mean and every cosine per
merge, including exact ties (duplicate means), short candidate lists (forcing refreshes) and a
low-dimensional screen (its bounds decide which cosines are computed at all)."""

from __future__ import annotations

import numpy as np
import pytest
from finch_oracle import canonical

from protoad_jax.clustering.merging import merge_closest


def brute_force(sums: np.ndarray, k: int) -> np.ndarray:
    groups = [[i] for i in range(len(sums))]
    s = [sums[i].astype(np.float64) for i in range(len(sums))]
    while len(groups) > k:
        m = np.stack(s)
        u = m / np.linalg.norm(m, axis=1, keepdims=True)
        sim = np.clip(u @ u.T, -1.0, 1.0)
        np.fill_diagonal(sim, -np.inf)
        i, j = np.unravel_index(np.argmax(sim), sim.shape)  # row-major: the lowest (i, j)
        i, j = min(i, j), max(i, j)
        groups[i] += groups.pop(j)
        s[i] = s[i] + s.pop(j)
    out = np.empty(len(sums), np.int64)
    for g, members in enumerate(groups):
        out[members] = g
    return canonical(out)


@pytest.mark.parametrize("list_length", [1, 4, 32])
@pytest.mark.parametrize("ties", [False, True])
def test_equals_brute_force(list_length, ties):
    rng = np.random.default_rng(list_length + 10 * ties)
    m, d = 260, 12
    means = rng.normal(size=(m, d)) + 1.5
    if ties:
        means[20:30] = means[4]  # identical means: exact ties, lowest pair first
        means[200:203] = means[100]
    counts = rng.integers(1, 6, m).astype(np.float64)
    sums = means * counts[:, None]
    for k in (1, 9, 130, m):
        stats = {}
        got = merge_closest(sums, counts, k, list_length=list_length, chunk_size=64, stats=stats)
        want = brute_force(sums, k)
        print(f"L={list_length} ties={ties} K={k}: {stats}, mismatches {(got != want).sum()}")
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32 and len(np.unique(got)) == k


@pytest.mark.parametrize("screen_dims", [1, 3, 16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("spread", [0.3, 0.003])
def test_screen_equals_brute_force(screen_dims, ties, spread):
    # 40-d means around 12 directions (real structure: the screen rules most pairs out; with the
    # small spread, neighbours' cosines differ by ~1e-6, so a bound off by that much shows), with
    # near-duplicates 1e-9 apart and, with ties, exact duplicates
    rng = np.random.default_rng(screen_dims + 100 * ties)
    m, d = 240, 40
    centres = rng.normal(size=(12, d))
    means = centres[rng.integers(0, 12, m)] + spread * rng.normal(size=(m, d))
    means[60:64] = means[59] + 1e-9 * rng.normal(size=(4, d))
    if ties:
        means[100:106] = means[7]
    counts = rng.integers(1, 4, m).astype(np.float64)
    sums = means * counts[:, None]
    for k in (1, 17, 150):
        stats = {}
        got = merge_closest(sums, counts, k, list_length=4, screen_dims=screen_dims,
                            chunk_size=64, stats=stats)
        want = brute_force(sums, k)
        print(f"p={screen_dims} ties={ties} spread={spread} K={k}: {stats}, mismatches {(got != want).sum()}")
        np.testing.assert_array_equal(got, want)
    # the screen must have ruled pairs out: fewer exact cosines than a pass per refresh
    assert stats["exact"] < stats["refreshes"] * m


def test_bad_input():
    sums = np.ones((5, 3))
    with pytest.raises(ValueError, match="k must be"):
        merge_closest(sums, np.ones(5), 0)
    with pytest.raises(ValueError, match="counts"):
        merge_closest(sums, np.ones(4), 2)
    z = sums.copy()
    z[2] = 0
    with pytest.raises(ValueError, match="zero"):
        merge_closest(z, np.ones(5), 2)
    with pytest.raises(ValueError, match="screen_dims"):
        merge_closest(sums, np.ones(5), 2, screen_dims=0)
