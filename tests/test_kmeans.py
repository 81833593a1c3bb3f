"""k-means against scikit-learn (Euclidean) and a NumPy transcription (spherical)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

from protoad_jax.clustering import kmeans as kmeans_lib
from protoad_jax.clustering.kmeans import kmeans


def blobs(n=1500, d=16, centers=8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 2.5
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def numpy_spherical(x, init, max_iters=100):
    """Spherical Lloyd in float64: cosine argmax, normalised mean update, stop when stable."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    prev, it = None, 0
    while it < max_iters:
        a = np.argmax(u @ c.T, axis=1)
        it += 1
        sums = np.stack([u[a == j].sum(0) for j in range(len(c))])
        c = sums / np.linalg.norm(sums, axis=1, keepdims=True)
        if prev is not None and (a == prev).all():
            break
        prev = a
    cos = u @ c.T
    a = np.argmax(cos, axis=1)
    return c, a, float(np.sum(1.0 - cos[np.arange(len(u)), a])), it


def test_matches_sklearn_lloyd():
    x = blobs()
    rng = np.random.default_rng(1)
    init = x[rng.choice(len(x), 8, replace=False)]
    res = kmeans(x, 8, jax.random.key(0), init=init, tol=0.0,
                 chunk_size=256)  # does not divide 1500
    sk = KMeans(8, init=init, n_init=1, algorithm="lloyd", tol=0.0, max_iter=100).fit(x)
    rel = abs(float(res.inertia) - sk.inertia_) / sk.inertia_
    cerr = np.abs(np.asarray(res.centroids) - sk.cluster_centers_).max()
    print(f"inertia {float(res.inertia):.6f} vs sklearn {sk.inertia_:.6f}: rel {rel:.2e}; "
          f"centroid max err {cerr:.2e}; iterations {int(res.iterations)} vs {sk.n_iter_}")
    np.testing.assert_array_equal(np.asarray(res.assignment), sk.labels_)
    assert res.assignment.dtype == jnp.int32 and res.centroids.dtype == jnp.float32
    assert rel < 1e-5, f"inertia relative error {rel} >= 1e-5"
    assert cerr < 1e-4, f"centroid max error {cerr} >= 1e-4"
    assert int(res.iterations) == sk.n_iter_


def test_kmeanspp_key_contract():
    x = blobs(n=800, d=8, centers=6, seed=2)
    a = kmeans(x, 6, jax.random.key(3), chunk_size=300)
    b = kmeans(x, 6, jax.random.key(3), chunk_size=300)
    c = kmeans(x, 6, jax.random.key(4), chunk_size=300)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
    assert not np.array_equal(np.asarray(a.centroids), np.asarray(c.centroids)), "key ignored"
    # Converged Lloyd fixed point: assignment is the nearest centroid, centroids are the means.
    xa, ca = np.asarray(a.assignment), np.asarray(a.centroids)
    d2 = ((x[:, None, :].astype(np.float64) - ca[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(xa, np.argmin(d2, axis=1))
    means = np.stack([x[xa == j].mean(0) for j in range(6)])
    err = np.abs(means - ca).max()
    print(f"fixed-point centroid error {err:.2e}, inertia {float(a.inertia):.3f} "
          f"vs {d2.min(1).sum():.3f}, iterations {int(a.iterations)}")
    assert err < 1e-5
    np.testing.assert_allclose(float(a.inertia), d2.min(1).sum(), rtol=1e-5)
    # tol is a relative inertia decrease: the first step always runs (previous inertia = inf),
    # a huge tol stops at the second.
    assert int(kmeans(x, 6, jax.random.key(3), tol=1e9).iterations) == 2 < int(a.iterations)


def test_spherical_matches_numpy():
    x = blobs(n=1200, d=12, centers=7, seed=5) + 0.5
    rng = np.random.default_rng(6)
    scale = rng.uniform(0.5, 2.0, (7, 1)).astype(np.float32)
    init = x[rng.choice(len(x), 7, replace=False)] * scale
    res = kmeans(x, 7, jax.random.key(0), init=init, tol=0.0, spherical=True, chunk_size=500)
    c, a, inertia, it = numpy_spherical(x.astype(np.float64), init.astype(np.float64))
    cerr = np.abs(np.asarray(res.centroids) - c).max()
    rel = abs(float(res.inertia) - inertia) / inertia
    print(f"spherical: centroid err {cerr:.2e}, inertia rel err {rel:.2e}, iterations "
          f"{int(res.iterations)} vs {it}")
    np.testing.assert_array_equal(np.asarray(res.assignment), a)
    assert cerr < 1e-5 and rel < 1e-5, f"centroid error {cerr} / inertia rel error {rel} >= 1e-5"
    np.testing.assert_allclose(np.linalg.norm(np.asarray(res.centroids), axis=1), 1.0, atol=1e-6)
    assert int(res.iterations) == it


@pytest.mark.parametrize("case", ["duplicate", "far"])
def test_empty_clusters_are_reseeded(case):
    x = blobs(n=600, d=6, centers=5, seed=7)
    rng = np.random.default_rng(8)
    init = x[rng.choice(len(x), 5, replace=False)].copy()
    if case == "duplicate":
        init[3] = init[1]  # ties go to the lower index: cluster 3 starts empty
    else:
        init[2] = 1000.0 + rng.normal(size=6)  # nobody is near it
    res = kmeans(x, 5, jax.random.key(0), init=init, tol=0.0, chunk_size=128)
    counts = np.bincount(np.asarray(res.assignment), minlength=5)
    print(f"{case}: counts {counts.tolist()}, iterations {int(res.iterations)}")
    assert (counts > 0).all(), f"empty cluster after re-seeding: {counts}"
    assert np.abs(np.asarray(res.centroids)).max() < 100
    # The re-seeding rule after one step: the empty cluster takes the sample farthest from its
    # assigned centroid, the others the means of their members.
    one = kmeans(x, 5, jax.random.key(0), init=init, max_iters=1, chunk_size=128)
    d2 = ((x[:, None, :].astype(np.float64) - init[None].astype(np.float64)) ** 2).sum(-1)
    a = np.argmin(d2, axis=1)
    empty = 3 if case == "duplicate" else 2
    assert not (a == empty).any()
    far = x[np.argmax(d2.min(1))]
    want = np.stack([x[a == j].mean(0) if j != empty else far for j in range(5)])
    err = np.abs(np.asarray(one.centroids) - want).max()
    print(f"  one step: centroid error {err:.2e}")
    assert int(one.iterations) == 1 and err < 1e-5, f"re-seeded centroids: error {err} >= 1e-5"


def test_kmeanspp_samples_by_squared_distance():
    rng = np.random.default_rng(12)
    centers = rng.normal(size=(5, 4)) * 100.0
    blob = np.repeat(np.arange(5), 60)
    x = (centers[blob] + rng.normal(size=(300, 4))).astype(np.float32)
    for seed in range(4):
        seeds = kmeans_lib._kmeans_pp(jnp.asarray(x), 5, jax.random.key(seed), 128, False)
        seeds = np.asarray(seeds)
        rows = [int(np.flatnonzero((x == s).all(1))[0]) for s in seeds]
        # D^2 sampling puts one seed in each far-apart blob (uniform sampling would rarely: 4%).
        assert sorted(blob[rows].tolist()) == [0, 1, 2, 3, 4], (seed, blob[rows])


def test_chunk_size_and_float16():
    x = blobs(n=1000, d=10, centers=6, seed=9)
    key = jax.random.key(1)
    ref = kmeans(x, 6, key, chunk_size=4096)
    for chunk in (7, 333, 1000):
        res = kmeans(x, 6, key, chunk_size=chunk)
        np.testing.assert_array_equal(np.asarray(res.assignment), np.asarray(ref.assignment))
        np.testing.assert_allclose(np.asarray(res.centroids), np.asarray(ref.centroids), atol=1e-5)
        np.testing.assert_allclose(float(res.inertia), float(ref.inertia), rtol=1e-5)
    x16 = x.astype(np.float16)
    a = kmeans(x16, 6, key, chunk_size=300)
    b = kmeans(x16.astype(np.float32), 6, key, chunk_size=300)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


def test_jit_vmap_and_no_recompile():
    x = jnp.asarray(blobs(n=400, d=5, centers=4, seed=10))
    keys = jax.random.split(jax.random.key(2), 3)
    eager = [kmeans(x, 4, k, chunk_size=150) for k in keys]
    jitted = jax.jit(lambda x, key: kmeans(x, 4, key, chunk_size=150))
    batched = jax.vmap(lambda key: kmeans(x, 4, key, chunk_size=150))(keys)
    for i, e in enumerate(eager):
        j = jitted(x, keys[i])
        np.testing.assert_array_equal(np.asarray(j.assignment), np.asarray(e.assignment))
        np.testing.assert_array_equal(np.asarray(batched.assignment[i]), np.asarray(e.assignment))
        np.testing.assert_allclose(np.asarray(batched.centroids[i]), np.asarray(e.centroids),
                                   atol=1e-6)
    before = kmeans_lib._kmeans._cache_size()
    kmeans(x + 1.0, 4, jax.random.key(9), chunk_size=150)
    assert kmeans_lib._kmeans._cache_size() == before, "recompiled for the same shapes"


def test_bad_inputs():
    x = blobs(n=50, d=4, centers=3, seed=11)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 0, key)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 51, key)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        kmeans(x[0], 2, key)
    with pytest.raises(ValueError, match="at least one sample"):
        kmeans(np.zeros((0, 4), np.float32), 1, key)
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        kmeans(bad, 3, key)
    with pytest.raises(ValueError, match="init must be"):
        kmeans(x, 3, key, init=x[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        kmeans(x, 3, key, chunk_size=0)
