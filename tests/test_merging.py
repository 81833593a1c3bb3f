"""Closest-pair merging against a brute force that recomputes every mean and every cosine per
merge, including exact ties (duplicate means), short candidate lists (forcing refreshes) and a
low-dimensional screen (its bounds decide which cosines are computed at all); and declared copies
(exact ties) settled by index, whatever the last bits of their sums."""

from __future__ import annotations

import numpy as np
import pytest
from finch_oracle import canonical

from protoad_jax.clustering.merging import merge_closest


def brute_force(sums: np.ndarray, k: int, copies: np.ndarray | None = None) -> np.ndarray:
    """With ``copies`` (each cluster's first cluster of equal mean): a pair of clusters made only
    of copies of one cluster merges first, the lowest such pair."""
    groups = [[i] for i in range(len(sums))]
    s = [sums[i].astype(np.float64) for i in range(len(sums))]
    while len(groups) > k:
        heads = [{int(copies[c]) for c in g} if copies is not None else set() for g in groups]
        tied = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))
                if len(heads[i]) == 1 and heads[i] == heads[j]]
        if tied:
            i, j = tied[0]  # the lowest pair
        else:
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


@pytest.mark.parametrize("list_length", [2, 32])
def test_copies_settled_by_index(list_length):
    """Equal means with different counts (sums ``mean * count``: their float64 directions differ
    in the last bits, which decide nothing once the copies are declared): groups of 2, 4 and 7
    clusters, first members not in group order. K stops inside the copies, right after them, and
    below (float64 merges). The non-first copies' sums moved by one unit in the last place, up
    or down (what another CPU's rounding of ``mean * count`` could do), give the same labels."""
    rng = np.random.default_rng(list_length)
    m, d = 90, 10
    means = rng.normal(size=(m, d)) + 0.5
    copies = np.arange(m)
    for rows in ([30, 31], [12, 40, 41, 88], [20, 3, 9, 50, 51, 60, 70]):
        means[rows] = means[min(rows)]
        copies[rows] = min(rows)
    counts = rng.integers(1, 8, m).astype(np.float64)
    sums = means * counts[:, None]
    later = copies != np.arange(m)
    up, down = sums.copy(), sums.copy()
    up[later] = np.nextafter(sums[later], np.inf)
    down[later] = np.nextafter(sums[later], -np.inf)
    n_copies = int(later.sum())  # 1 + 3 + 6 = 10
    for k in (m - 1, m - 2, m - 5, m - n_copies, m - n_copies - 20, 3):
        stats = {}
        got = merge_closest(sums, counts, k, copies=copies, list_length=list_length,
                            chunk_size=32, stats=stats)
        want = brute_force(sums, k, copies)
        print(f"L={list_length} K={k}: {stats}, mismatches {(got != want).sum()}")
        np.testing.assert_array_equal(got, want, err_msg=f"K={k}")
        assert stats["copies"] == min(m - k, n_copies) and stats["merges"] == m - k
        for other, what in ((up, "up"), (down, "down")):
            np.testing.assert_array_equal(
                merge_closest(other, counts, k, copies=copies, list_length=list_length,
                              chunk_size=32), want, err_msg=f"K={k}, later copies' sums {what}")
    # the first three merges: 3 absorbs 9 (the lowest pair), then 20, then 50
    np.testing.assert_array_equal(merge_closest(sums, counts, m - 3, copies=copies),
                                  brute_force(sums, m - 3, copies))
    want = np.arange(m)
    want[[9, 20, 50]] = 3
    np.testing.assert_array_equal(merge_closest(sums, counts, m - 3, copies=copies),
                                  canonical(want))


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
    for copies in ([0, 0, 1, 3, 4], [0, 1, 2, 4, 4], [0, 0, 2], [0.0, 0, 2, 3, 4]):
        with pytest.raises(ValueError, match="copies"):
            merge_closest(sums, np.ones(5), 2, copies=np.array(copies))
