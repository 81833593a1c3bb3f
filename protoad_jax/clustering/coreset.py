"""Greedy k-center coreset of patch features (PatchCore's approximate greedy coreset).

Roth et al. (PatchCore, CVPR 2022) choose a memory bank of patches by farthest-point sampling:
every step adds the patch farthest from those chosen so far, so the rare patches (edges,
corners, small parts) that a uniform subsample misses are kept. Their "approximate" variant
runs the search on a random projection of the features to 128 dimensions and starts from the
mean distance to 10 random patches instead of from one; this module does the same:

* projection: a seeded Gaussian ``[d, dim]`` matrix scaled by ``1 / sqrt(dim)`` (distances are
  preserved in expectation, Johnson-Lindenstrauss), applied chunk by chunk (the features may
  be float16; the ``[n, dim]`` float32 projection is the only full-size array);
* start: each patch's distance is the mean of its Euclidean distances to ``starts`` seeded
  random patches;
* ``budget`` steps, jitted as one ``lax.fori_loop``: take the patch with the largest distance
  (lowest index on ties), then lower every distance to the distance to it.

Memory: ``n * (dim + 2) * 4`` bytes beyond the features (1.23 M patches: 0.6 GB). Time: each
step reads the ``[n, dim]`` projection once, so ``O(budget * n * dim)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PROJECTION_DIM = 128
STARTS = 10
_CHUNK = 16384


@functools.partial(jax.jit, static_argnames=("dim",))
def _project(x: jax.Array, key: jax.Array, dim: int) -> jax.Array:
    w = jax.random.normal(key, (x.shape[1], dim), jnp.float32) / np.sqrt(dim)
    return jnp.einsum("nd,dk->nk", x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("budget",))
def _greedy(p: jax.Array, start: jax.Array, budget: int) -> jax.Array:
    sq = jnp.sum(p * p, axis=1)

    def dist_to(i):
        c = p[i]
        return jnp.sqrt(jnp.maximum(sq - 2.0 * (p @ c) + sq[i], 0.0))

    dist = jnp.mean(jax.vmap(dist_to)(start), axis=0)

    def body(t, state):
        dist, chosen = state
        i = jnp.argmax(dist).astype(jnp.int32)  # lowest index on ties
        return jnp.minimum(dist, dist_to(i)), chosen.at[t].set(i)

    _, chosen = lax.fori_loop(0, budget, body, (dist, jnp.zeros(budget, jnp.int32)))
    return chosen


def greedy_coreset(x: np.ndarray, budget: int, seed: int = 0, *, dim: int = PROJECTION_DIM,
                   starts: int = STARTS) -> np.ndarray:
    """Indices of ``budget`` rows of ``x`` chosen by approximate greedy k-center, ascending.

    Args:
      x: ``[n, d]`` features (any float dtype; processed in chunks).
      budget: rows to keep, ``1 <= budget``; all rows when ``budget >= n``.
      seed: seeds the projection and the start patches.
      dim: projection dimension (PatchCore: 128).
      starts: random start patches whose mean distance initialises the search (PatchCore: 10).

    Returns:
      ``[min(budget, n)]`` int64 row indices, ascending (row order kept for the clustering);
      fewer when ``x`` has fewer distinct projected rows than ``budget``.

    Raises:
      ValueError: ``x`` not 2-D or empty, not finite, ``budget < 1``.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"greedy_coreset: x must be [n, d] with n >= 1, got shape {x.shape}")
    if int(budget) < 1:
        raise ValueError(f"greedy_coreset: budget must be >= 1, got {budget}")
    n = x.shape[0]
    if budget >= n:
        return np.arange(n)
    key_w, key_s = jax.random.split(jax.random.key(seed))
    proj = np.empty((n, dim), np.float32)
    for s in range(0, n, _CHUNK):
        block = np.asarray(x[s:s + _CHUNK])
        if not np.isfinite(block).all():
            raise ValueError("greedy_coreset: x must be finite; found NaN or inf")
        proj[s:s + _CHUNK] = np.asarray(_project(block, key_w, dim))
    start = jax.random.choice(key_s, n, (min(starts, n),), replace=False)
    chosen = np.asarray(_greedy(jnp.asarray(proj), start, int(budget)))
    return np.unique(chosen).astype(np.int64)
