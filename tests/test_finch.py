"""FINCH against an independent brute-force NumPy / SciPy transcription of the paper's rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph

from protoad_jax import finch as finch_lib
from protoad_jax.finch import finch, first_neighbours

# ----------------------------------------------------------------------------- oracle


def canonical(labels) -> np.ndarray:
    """Relabels clusters in order of first appearance (a plain Python transcription)."""
    seen: dict[int, int] = {}
    return np.array([seen.setdefault(int(v), len(seen)) for v in np.asarray(labels)], np.int64)


def oracle_kappa(v: np.ndarray) -> np.ndarray:
    """First neighbour under cosine distance, float64, full matrix, self excluded."""
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - u @ u.T
    np.fill_diagonal(dist, np.inf)
    return np.argmin(dist, axis=1)  # lowest index on ties


def oracle_level(v: np.ndarray) -> tuple[np.ndarray, int]:
    """One FINCH level: adjacency with the paper's three rules, connected components."""
    m = len(v)
    kappa = oracle_kappa(v)
    adj = np.zeros((m, m), bool)
    adj[np.arange(m), kappa] = True            # j = kappa(i)
    adj |= adj.T                               # kappa(j) = i
    adj |= kappa[:, None] == kappa[None, :]    # kappa(i) = kappa(j)
    c, lab = scipy.sparse.csgraph.connected_components(scipy.sparse.csr_matrix(adj), directed=False)
    return lab, c


def member_means(x: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    return np.stack([x[labels == g].mean(axis=0) for g in range(c)])


def oracle_finch(x: np.ndarray, min_clusters: int = 2) -> list[np.ndarray]:
    x = np.asarray(x, np.float64)
    labels, c = oracle_level(x)
    labels = canonical(labels)
    parts = [labels]
    while c > 1:
        means = member_means(x, labels, c)  # means of the ORIGINAL members
        lab_c, c_new = oracle_level(means)
        if c_new >= c or c_new < min_clusters:
            break
        labels, c = canonical(lab_c[labels]), c_new
        parts.append(labels)
    return parts


def oracle_merge(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Closest pair of cluster means (cosine), recomputed from the members at every step."""
    x = np.asarray(x, np.float64)
    labels = canonical(labels)
    groups = [list(np.flatnonzero(labels == g)) for g in range(labels.max() + 1)]
    while len(groups) > k:
        means = np.stack([x[g].mean(axis=0) for g in groups])
        u = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        sim = u @ u.T
        np.fill_diagonal(sim, -np.inf)
        i, j = np.unravel_index(np.argmax(sim), sim.shape)  # lowest (i, j) on ties, i < j
        i, j = min(i, j), max(i, j)
        groups[i] = groups[i] + groups[j]
        del groups[j]
    out = np.empty(len(x), np.int64)
    for g, members in enumerate(groups):
        out[members] = g
    return canonical(out)


# ----------------------------------------------------------------------------- data


def blobs(n=2400, d=48, centers=30, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 2.0
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def gaussian(n=2000, d=32, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["blobs", "gaussian"])
def test_hierarchy_matches_bruteforce(name):
    x = blobs() if name == "blobs" else gaussian()
    res = finch(x, chunk_size=700)  # divides neither n
    ref = oracle_finch(x)
    print(f"{name}: levels {res.num_clusters}, oracle {[int(p.max()) + 1 for p in ref]}")
    assert len(res.partitions) == len(ref) >= 3, "number of levels differs from the oracle"
    assert res.num_clusters == [int(p.max()) + 1 for p in ref]
    for level, (got, want) in enumerate(zip(res.partitions, ref)):
        got = np.asarray(got)
        assert got.dtype == np.int32 and got.shape == (len(x),)
        # Labels are numbered in order of first member: equal to the canonical oracle labels.
        np.testing.assert_array_equal(got, want, err_msg=f"level {level} partition differs")
        means = np.asarray(res.means[level])
        want_means = member_means(x.astype(np.float64), want, int(want.max()) + 1)
        err = np.abs(means - want_means).max()
        print(f"  level {level}: {res.num_clusters[level]} clusters, max |mean error| {err:.2e}")
        assert means.dtype == np.float32 and err < 1e-5, f"level {level} means: error {err} >= 1e-5"


def test_first_neighbours_exact_under_jit_and_chunking():
    x = gaussian(n=700, d=24, seed=3)
    want = oracle_kappa(x.astype(np.float64))
    for chunk in (700, 256, 97, 1024):
        got = np.asarray(first_neighbours(x, chunk_size=chunk))
        assert got.dtype == np.int32
        print(f"chunk {chunk}: mismatches {(got != want).sum()}")
        np.testing.assert_array_equal(got, want, err_msg=f"chunk {chunk}")
    jitted = jax.jit(finch_lib._first_neighbours, static_argnames="chunk")
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(x), chunk=97)), want)
    before = finch_lib._first_neighbours._cache_size()
    first_neighbours(x * 2.0, chunk_size=97)
    assert finch_lib._first_neighbours._cache_size() == before, "recompiled for the same shapes"


def test_first_neighbours_ties_take_lowest_index():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    # rows 40.. duplicate rows 5, 5, 9, 9 (up to a positive scale, which cosine ignores exactly
    # only for powers of two).
    x = np.concatenate([base, base[[5, 5, 9]], 2.0 * base[[9]]])
    for chunk in (44, 16, 7):
        kappa = np.asarray(first_neighbours(x, chunk_size=chunk))
        assert kappa[5] == 40 and kappa[40] == 5 and kappa[41] == 5, (chunk, kappa[[5, 40, 41]])
        assert kappa[9] == 42 and kappa[42] == 9 and kappa[43] == 9, (chunk, kappa[[9, 42, 43]])


def test_chunk_size_does_not_change_results():
    x = blobs(n=1300, d=32, centers=20, seed=5)
    ref = finch(x, chunk_size=4096, num_clusters=7)
    for chunk in (333, 64):
        res = finch(x, chunk_size=chunk, num_clusters=7)
        assert res.num_clusters == ref.num_clusters
        for a, b in zip(res.partitions, ref.partitions):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(res.means, ref.means):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(res.required_labels),
                                      np.asarray(ref.required_labels))


def test_deterministic():
    x = gaussian(n=900, d=20, seed=6)
    a, b = finch(x, num_clusters=13), finch(x, num_clusters=13)
    assert a.num_clusters == b.num_clusters
    for p, q in zip(a.partitions + a.means, b.partitions + b.means):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(a.required_labels), np.asarray(b.required_labels))
    np.testing.assert_array_equal(np.asarray(a.required_means), np.asarray(b.required_means))


def test_required_clusters_match_bruteforce_merge():
    x = gaussian(n=600, d=16, seed=7)
    res = finch(x)
    print("levels", res.num_clusters)
    for k in (1, 3, res.num_clusters[1], res.num_clusters[1] - 5, res.num_clusters[0] + 40, 600):
        got = finch(x, num_clusters=k)
        labels = np.asarray(got.required_labels)
        level = got.required_level
        start = res.partitions[level] if level >= 0 else np.arange(len(x))
        if level >= 0:
            assert res.num_clusters[level] >= k and (
                level + 1 == len(res.num_clusters) or res.num_clusters[level + 1] < k)
        want = oracle_merge(x, np.asarray(start), k)
        print(f"K={k}: from level {level}, {int(labels.max()) + 1} clusters, "
              f"mismatches {(labels != want).sum()}")
        assert int(labels.max()) + 1 == k and len(np.unique(labels)) == k
        np.testing.assert_array_equal(labels, want, err_msg=f"K={k}")
        means = np.asarray(got.required_means)
        err = np.abs(means - member_means(x.astype(np.float64), want, k)).max()
        assert means.shape == (k, x.shape[1]) and err < 1e-5, f"K={k}: means error {err} >= 1e-5"


@pytest.mark.parametrize("k", [5, 50, 250])
def test_required_clusters_on_blobs(k):
    x = blobs(n=1500, d=32, centers=25, seed=8)
    got = finch(x, num_clusters=k)
    labels = np.asarray(got.required_labels)
    assert len(np.unique(labels)) == k and labels.max() == k - 1
    assert np.asarray(got.required_means).shape == (k, 32)
    # Labels numbered in order of first member.
    np.testing.assert_array_equal(labels, canonical(labels))


def test_float16_input():
    rng = np.random.default_rng(9)
    # 150 well-separated blobs of 2-3 points: level 0 is exactly the blobs.
    centers = rng.normal(size=(150, 32))
    blob = np.repeat(np.arange(150), rng.integers(2, 4, 150))
    x = (centers[blob] + 0.01 * rng.normal(size=(len(blob), 32))).astype(np.float32)
    x16 = x.astype(np.float16)
    r32, r16 = finch(x, chunk_size=100), finch(x16, chunk_size=100)
    np.testing.assert_array_equal(np.asarray(r16.partitions[0]), canonical(blob))
    np.testing.assert_array_equal(np.asarray(r16.partitions[0]), np.asarray(r32.partitions[0]))
    assert r16.means[0].dtype == jnp.float32
    # float16 storage clusters exactly like its float64 values under the oracle, at every level.
    y16 = gaussian(n=800, d=32, seed=10).astype(np.float16)
    res, ref = finch(y16, chunk_size=300), oracle_finch(y16.astype(np.float64))
    assert len(res.partitions) == len(ref)
    for a, b in zip(res.partitions, ref):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_merge_closest_linear_update_matches_recompute():
    rng = np.random.default_rng(11)
    means = rng.normal(size=(120, 8)).astype(np.float32) + 0.3
    counts = rng.integers(1, 20, 120).astype(np.float64)
    labels = finch_lib._merge_closest(means, counts, 17)
    # oracle: expand clusters to weighted points is equivalent to count-weighted means
    groups = [[i] for i in range(120)]
    while len(groups) > 17:
        m = np.stack([np.average(means[g].astype(np.float64), axis=0, weights=counts[g])
                      for g in groups])
        u = m / np.linalg.norm(m, axis=1, keepdims=True)
        s = u @ u.T
        np.fill_diagonal(s, -np.inf)
        i, j = sorted(np.unravel_index(np.argmax(s), s.shape))
        groups[i] += groups.pop(j)
    want = np.empty(120, np.int64)
    for g, members in enumerate(groups):
        want[members] = g
    np.testing.assert_array_equal(labels, canonical(want))


def test_edge_cases_and_errors():
    x = gaussian(n=50, d=8, seed=12)
    one = finch(x[:1], num_clusters=1)
    assert one.num_clusters == [1] and np.asarray(one.required_labels).tolist() == [0]
    two = finch(x[:2])
    assert two.num_clusters == [1]
    np.testing.assert_allclose(np.asarray(two.means[0])[0], x[:2].mean(0), atol=1e-6)
    all_levels = finch(x, min_clusters=1)
    assert all_levels.num_clusters[-1] == 1
    assert finch(x).num_clusters == all_levels.num_clusters[:-1]
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        finch(bad)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        finch(x[0])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        finch(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="num_clusters"):
        finch(x, num_clusters=51)
    with pytest.raises(ValueError, match="num_clusters"):
        finch(x, num_clusters=0)
    with pytest.raises(ValueError, match="at least 2"):
        first_neighbours(x[:1])
    with pytest.raises(ValueError, match="chunk_size"):
        finch(x, chunk_size=0)


def test_subsample():
    x = jnp.asarray(gaussian(n=100, d=4, seed=13))
    key = jax.random.key(0)
    s = finch_lib.subsample(x, 30, key)
    rows = [int(np.flatnonzero((np.asarray(x) == r).all(1))[0]) for r in np.asarray(s)]
    assert s.shape == (30, 4) and rows == sorted(set(rows))
    np.testing.assert_array_equal(np.asarray(finch_lib.subsample(x, 30, key)), np.asarray(s))
    assert finch_lib.subsample(x, 200, key) is x
