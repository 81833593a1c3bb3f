"""First neighbours decided as float64 decides them, against a float64 brute force, on data
built with near ties (gaps ~1e-8) and exact duplicates, for every chunking, precision and
candidate count; and the candidate pass's error bound against measured errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from protoad_jax.clustering import neighbours


def brute_force64(x: np.ndarray) -> np.ndarray:
    """argmax_{j != i} cos(x_i, x_j) in float64, lowest j on ties; identical rows are given
    identical columns (BLAS may round two copies of a row differently in the last bit)."""
    u = x.astype(np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    s = np.clip(u @ u.T, -1.0, 1.0)
    _, group = np.unique(x, axis=0, return_inverse=True)
    group = group.reshape(-1)
    first = np.array([np.flatnonzero(group == g)[0] for g in group])
    s = s[:, first]
    np.fill_diagonal(s, -np.inf)
    return np.argmax(s, axis=1)


def tie_data(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(60, 40)) + 0.5
    x = base[rng.integers(0, 60, 900)] + rng.normal(size=(900, 40)) * rng.choice([1e-3, 0.2], 900)[:, None]
    x[100:140] = x[7]        # a blank region: 41 identical rows
    x[500:503] = x[600]      # more duplicates, the first copy later in the data
    # near ties: two neighbours of row 300 whose float64 cosines differ by ~1e-8
    d = rng.normal(size=40)
    x[301] = x[300] + 1e-4 * d
    x[302] = x[300] + 1e-4 * d * (1 + 1e-4)
    return x.astype(np.float32)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk,candidates", [(900, 16), (256, 2), (97, 5)])
def test_equals_float64_brute_force(precision, chunk, candidates):
    x = tie_data()
    want = brute_force64(x)
    nb = neighbours.first_neighbours(x, chunk_size=chunk, candidates=candidates,
                                     precision=precision)
    print(f"{precision} chunk {chunk} c {candidates}: mismatches {(nb.index != want).sum()}, "
          f"reranked {nb.reranked}, fallbacks {nb.fallbacks}, exhaustive {nb.exhaustive}, "
          f"duplicates {nb.duplicates}")
    np.testing.assert_array_equal(nb.index, want)
    assert nb.duplicates == 41 + 4 and nb.reranked > 0
    assert nb.index[7] == 100 and nb.index[100] == 7 and nb.index[139] == 7  # lowest other copy
    assert nb.index[600] == 500 and nb.index[500] == 501
    copies = np.r_[7, 100:140, 500:503, 600]
    assert (nb.similarity[copies] == 1.0).all()  # exactly 1 between copies, not computed
    want_copies = np.arange(len(x))
    want_copies[100:140], want_copies[[501, 502, 600]] = 7, 500
    np.testing.assert_array_equal(nb.copies, want_copies)
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(nb.similarity, np.clip(np.einsum("nd,nd->n", u, u[want]), -1, 1),
                               rtol=0, atol=1e-15)


def test_all_fallback_paths_used():
    """Tiny candidate lists in bfloat16: queries need the longer device list and some the
    exhaustive float64 search; the answer is still the brute force's."""
    x = tie_data(1)
    nb = neighbours.first_neighbours(x, chunk_size=128, candidates=1, fallback_candidates=3,
                                     precision="bfloat16")
    print(f"reranked {nb.reranked}, fallbacks {nb.fallbacks}, exhaustive {nb.exhaustive}")
    assert nb.fallbacks > 0 and nb.exhaustive > 0
    np.testing.assert_array_equal(nb.index, brute_force64(x))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_error_bound_holds(precision):
    """Measured |approximate - float64| cosine of every candidate the pass kept <= the bound."""
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(700, 1792)) ** 2).astype(np.float16)  # non-negative like ReLU features
    n, c = len(x), 32
    pairs = jnp.asarray(neighbours._chunk_pairs(n, 256, 1))
    v, idx = neighbours._pair_pass(jnp.asarray(x), jnp.ones(n, bool), pairs, chunk=256, c=c,
                                   bf16=precision == "bfloat16")
    v, idx = np.asarray(v, np.float64), np.asarray(idx)
    exact = neighbours.cosine64(np.repeat(x, c, axis=0), x[idx.reshape(-1)]).reshape(n, c)
    err = np.abs(v - exact).max()
    bound = neighbours.error_bound(1792, precision)
    print(f"{precision}: max |approx - float64| {err:.3e}, bound {bound:.3e} ({err / bound:.1%})")
    assert err <= bound


def test_device_count_independent_of_list_order():
    """Top-c lists merged across chunk orders give the same decisions: symmetric pass vs a
    rectangular query pass for every row."""
    x = tie_data(3)
    n = len(x)
    nb = neighbours.first_neighbours(x, chunk_size=200, candidates=4)
    v, _idx = neighbours._query_pass(jnp.asarray(x), jnp.arange(n, dtype=jnp.int32), jnp.asarray(x),
                                    jnp.ones(n, bool), chunk=200, c=4, bf16=False)
    v2, _idx2 = neighbours._pair_pass(jnp.asarray(x), jnp.ones(n, bool),
                                     jnp.asarray(neighbours._chunk_pairs(n, 200, 1)), chunk=200,
                                     c=4, bf16=False)
    np.testing.assert_allclose(np.asarray(v), np.asarray(v2), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(nb.index, brute_force64(x))


def test_bad_input():
    x = tie_data()[:20]
    for bad, match in ((x[:1], "n >= 2"), (x[0], r"\[n, d\]")):
        with pytest.raises(ValueError, match=match):
            neighbours.first_neighbours(bad)
    y = x.copy()
    y[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        neighbours.first_neighbours(y)
    y[3] = 0
    with pytest.raises(ValueError, match="all zeros"):
        neighbours.first_neighbours(y)
    with pytest.raises(ValueError, match="precision"):
        neighbours.first_neighbours(x, precision="float8")
