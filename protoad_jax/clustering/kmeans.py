"""k-means (Lloyd) with k-means++ seeding, Euclidean or spherical, chunked over the samples.

docs/METHOD.md section 2. ``kmeans`` is the public entry point: it validates its inputs on the host and
calls ``_kmeans``, the one jitted function of this module (static ``k``, ``max_iters``, ``tol``,
``spherical``, ``chunk``). Everything inside is ``lax`` control flow over fixed shapes:

* Samples are visited in row chunks of ``chunk`` rows (``scan_rows``), so the ``[n, k]`` distance
  matrix never exists whole (only ``[chunk, k]``) and float16 storage is cast to float32 one
  chunk at a time. ``n`` need not be a multiple of ``chunk``: the last chunk is clamped to end
  at row ``n`` and a validity mask drops the rows an earlier chunk already covered, so the data
  is never padded (a padded copy of 1.2 M x 1792 patches would cost gigabytes).
* Distances are ``|x|^2 - 2 x.c + |c|^2`` (a matmul), never an ``[n, k, d]`` broadcast;
  centroid sums are ``segment_sum``.
* Multi-device (``mesh`` with more than one device): the nearest-centroid search, the
  ``O(n k d)`` part, splits its chunks across the devices (``map_rows``, a ``shard_map`` over
  the chunk index; ``x`` and the centroids replicated). The centroid sums then run over the
  chunks in the same order as on one device, so results are bitwise those of the one-device run.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from protoad_jax.clustering.chunking import (
    as_float,
    check_finite,
    is_sharded,
    map_rows,
    replicate,
    scan_rows,
)
from protoad_jax.scoring import l2_normalize

# Assignments are argmin decisions: run the distance matmul at full float32 precision on every
# backend (the default on GPU/TPU may use TF32 / bf16 passes and flip near-ties).
_EXACT = lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """k-means result.

    Attributes:
      centroids: ``[k, d]`` float32 (unit norm when spherical).
      assignment: ``[n]`` int32, nearest centroid of each sample (lowest index on ties).
      inertia: ``[]`` float32. Euclidean: sum of squared distances to the assigned centroid.
        Spherical: sum of cosine distances ``1 - cos(x_i, c_a(i))``.
      iterations: ``[]`` int32, Lloyd iterations (assignment + update steps) performed.
    """

    centroids: jax.Array
    assignment: jax.Array
    inertia: jax.Array
    iterations: jax.Array


def _prepare(xc: jax.Array, spherical: bool) -> jax.Array:
    return l2_normalize(xc) if spherical else xc


# ----------------------------------------------------------------------------- distances


def _assign_chunk(xc: jax.Array, centroids: jax.Array,
                  spherical: bool) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of each row: ``([chunk] int32 index, [chunk] float32 distance)``.

    Euclidean distance is ``|x|^2 - 2 x.c + |c|^2`` (clamped at 0); spherical is ``1 - x.c`` on
    unit vectors (argmax of the cosine, so a centroid norm that is 1 only up to rounding does
    not bias the choice).
    """
    dots = jnp.einsum("nd,kd->nk", xc, centroids, precision=_EXACT)
    if spherical:
        a = jnp.argmax(dots, axis=1)
        dist = 1.0 - jnp.take_along_axis(dots, a[:, None], axis=1)[:, 0]
    else:
        partial = jnp.sum(centroids * centroids, axis=1)[None, :] - 2.0 * dots
        a = jnp.argmin(partial, axis=1)
        dist = jnp.sum(xc * xc, axis=1) + jnp.take_along_axis(partial, a[:, None], axis=1)[:, 0]
    return a.astype(jnp.int32), jnp.maximum(dist, 0.0)


def _assign(x, centroids, chunk, spherical, prev=None, mesh=None):
    """One pass over ``x``: assignment, distances, cluster sums and counts, inertia, #changed.

    On a multi-device ``mesh`` the search (``a``, ``dist``) is split across the devices first,
    then the sums run over the chunks in order, as the one-device pass does.
    """
    k, d = centroids.shape

    def accumulate(carry, xc, a, dist, prev_c, valid):
        sums, counts, inertia, changed = carry
        w = valid.astype(jnp.float32)
        sums = sums + jax.ops.segment_sum(xc * w[:, None], a, num_segments=k)
        counts = counts + jax.ops.segment_sum(w, a, num_segments=k)
        inertia = inertia + jnp.sum(dist * w)
        if prev is not None:
            changed = changed + jnp.sum((a != prev_c) & valid)
        return sums, counts, inertia, changed

    init = (jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.float32),
            jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    prev_rows = prev if prev is not None else jnp.zeros((x.shape[0],), jnp.int32)
    if is_sharded(mesh):
        a, dist = map_rows(
            lambda xc, _, start: _assign_chunk(_prepare(xc, spherical), centroids, spherical),
            x, chunk, mesh=mesh)

        def fn(carry, xc, rc, valid, start):
            return accumulate(carry, _prepare(xc, spherical), *rc, valid), ()

        (sums, counts, inertia, changed), _ = scan_rows(fn, init, x, chunk, (a, dist, prev_rows))
        return a, dist, sums, counts, inertia, changed

    def fused(carry, xc, prev_c, valid, start):
        xc = _prepare(xc, spherical)
        a, dist = _assign_chunk(xc, centroids, spherical)
        return accumulate(carry, xc, a, dist, prev_c, valid), (a, dist)

    (sums, counts, inertia, changed), (a, dist) = scan_rows(fused, init, x, chunk, prev_rows)
    return a, dist, sums, counts, inertia, changed


def _rows(x: jax.Array, idx: jax.Array, spherical: bool) -> jax.Array:
    """Rows ``x[idx]`` as float32 (unit norm when spherical)."""
    return _prepare(jnp.take(x, idx, axis=0).astype(jnp.float32), spherical)


# ----------------------------------------------------------------------------- algorithm


def _kmeans_pp(x, k, key, chunk, spherical, mesh=None):
    """k-means++ seeding (D^2 sampling, one candidate per step): ``[k, d]`` float32 centroids."""
    n, d = x.shape

    def dist_to(c):  # [n] distance of every sample to one centroid c [1, d]
        def fn(xc, _, start):
            return _assign_chunk(_prepare(xc, spherical), c, spherical)[1]
        return map_rows(fn, x, chunk, mesh=mesh)

    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, n)
    c0 = _rows(x, first[None], spherical)
    cents = jnp.zeros((k, d), jnp.float32).at[0].set(c0[0])

    def body(t, state):
        cents, mind = state
        # categorical over log D^2: zero-distance samples (the centroids themselves) get -inf.
        idx = jax.random.categorical(jax.random.fold_in(key, t), jnp.log(mind))
        c = _rows(x, idx[None], spherical)
        return cents.at[t].set(c[0]), jnp.minimum(mind, dist_to(c))

    cents, _ = lax.fori_loop(1, k, body, (cents, dist_to(c0)))
    return cents


def _update(x, sums, counts, dist, k, spherical):
    """New centroids from the sums; empty clusters re-seeded with the farthest samples.

    The ``e`` empty clusters (in index order) take the ``e`` samples farthest from their assigned
    centroid (in decreasing distance, lowest index on ties): deterministic, and the next
    assignment step gives each of them at least that sample.
    """
    cents = sums / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
        cents = l2_normalize(cents)
    empty = counts == 0

    def reseed(cents):
        _, far = lax.top_k(dist, k)
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        return jnp.where(empty[:, None], _rows(x, far[rank], spherical), cents)

    return lax.cond(jnp.any(empty), reseed, lambda c: c, cents)


@functools.partial(jax.jit,
                   static_argnames=("k", "max_iters", "tol", "spherical", "chunk", "mesh"))
def _kmeans(x: jax.Array, key: jax.Array, init: jax.Array | None, *, k: int, max_iters: int,
            tol: float, spherical: bool, chunk: int, mesh: Mesh | None = None) -> KMeansResult:
    """Jitted k-means on validated inputs (``x`` [n, d] any float dtype, ``1 <= k <= n``)."""
    n = x.shape[0]
    if init is None:
        cents = _kmeans_pp(x, k, key, chunk, spherical, mesh)
    else:
        cents = _prepare(init.astype(jnp.float32), spherical)

    def cond(state):
        _, _, _, it, done = state
        return (it < max_iters) & ~done

    def body(state):
        cents, prev_a, prev_inertia, it, _ = state
        a, dist, sums, counts, inertia, changed = _assign(x, cents, chunk, spherical, prev_a, mesh)
        new = _update(x, sums, counts, dist, k, spherical)
        # tol: relative decrease of the inertia between consecutive assignment steps. tol = 0
        # runs until the assignment is stable, like scikit-learn's tol=0.
        done = (changed == 0) | ((tol > 0) & (prev_inertia - inertia <= tol * inertia))
        return new, a, inertia, it + 1, done

    init_state = (cents, jnp.full((n,), -1, jnp.int32), jnp.array(jnp.inf, jnp.float32),
                  jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    cents, _, _, iters, _ = lax.while_loop(cond, body, init_state)
    a, _, _, _, inertia, _ = _assign(x, cents, chunk, spherical, mesh=mesh)  # final labels
    return KMeansResult(cents, a, inertia, iters)


# ----------------------------------------------------------------------------- public


def kmeans(x: jax.typing.ArrayLike, k: int, key: jax.Array, *, max_iters: int = 100,
           tol: float = 1e-4, spherical: bool = False, chunk_size: int = 4096,
           init: jax.typing.ArrayLike | None = None, mesh: Mesh | None = None) -> KMeansResult:
    """k-means clustering: k-means++ seeding then Lloyd iterations.

    Validates on the host, then runs one jitted computation (compiled once per shape, dtype and
    static setting). Memory is ``O(chunk_size * k + k * d)`` on top of ``x`` itself: ``x`` may be
    float16 (cast to float32 one chunk at a time).

    Args:
      x: ``[n, d]`` samples, any float dtype (float16 storage is fine).
      k: number of clusters, ``1 <= k <= n``.
      key: PRNG key for k-means++ (unused when ``init`` is given).
      max_iters: maximum Lloyd iterations.
      tol: stop when the inertia decreased by at most ``tol`` times itself (relative change
        between consecutive assignment steps). Lloyd also stops when no assignment changed;
        ``tol=0`` stops only then (or at ``max_iters``).
      spherical: cosine k-means: samples are L2-normalised, assigned to the centroid of highest
        cosine, and centroids are re-normalised after each update.
      chunk_size: samples per chunk of the assignment step (clamped to ``n``).
      init: optional ``[k, d]`` initial centroids (skips k-means++; normalised when spherical).
      mesh: devices to split the nearest-centroid search over (its chunks; ``x`` is replicated
        on every device), e.g. ``sharding.local_mesh()``; None or one device = no sharding.
        The result is bitwise the same for any number of devices.

    Returns:
      ``KMeansResult`` (jax arrays). Empty clusters are re-seeded with the samples farthest from
      their centroids, so all ``k`` clusters are non-empty unless ``x`` has fewer than ``k``
      distinct rows or ``max_iters`` ran out right after a re-seed.

    Raises:
      ValueError: ``x`` not 2-D, empty, or not finite; ``k`` out of ``[1, n]``; ``init`` not
        ``[k, d]`` or not finite; ``max_iters < 1``; ``tol < 0``; ``chunk_size < 1``.
    """
    x = as_float("x", x)
    if x.ndim != 2:
        raise ValueError(f"kmeans: x must be [n, d], got shape {x.shape}")
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(
            f"kmeans: x must have at least one sample and one feature, got shape {x.shape}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"kmeans: k must be an integer in [1, n={n}], got {k!r}")
    if int(max_iters) < 1:
        raise ValueError(f"kmeans: max_iters must be >= 1, got {max_iters}")
    if not tol >= 0:
        raise ValueError(f"kmeans: tol must be >= 0, got {tol}")
    if int(chunk_size) < 1:
        raise ValueError(f"kmeans: chunk_size must be >= 1, got {chunk_size}")
    check_finite("kmeans: x", x)
    if init is not None:
        init = as_float("init", init)
        if init.shape != (k, d):
            raise ValueError(f"kmeans: init must be [k, d] = [{k}, {d}], got shape {init.shape}")
        check_finite("kmeans: init", init)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(
            f"kmeans: mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    x, key, init = replicate((x, key, init), mesh)
    return _kmeans(x, key, init, k=int(k), max_iters=int(max_iters), tol=float(tol),
                   spherical=bool(spherical), chunk=min(int(chunk_size), n), mesh=mesh)
