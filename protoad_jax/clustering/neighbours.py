"""First neighbours under cosine similarity, decided as float64 arithmetic decides them.

FINCH's partitions hinge on argmax decisions, so a near tie settled in float32 on one device and
in bfloat16 on another gives two different models. ``first_neighbours`` makes every decision the
float64 one (lowest index on exact ties) while the ``O(n^2 d)`` work runs at hardware speed:

1. Candidate pass (device, jitted, chunked; query chunks split over a ``mesh``): each row is
   L2-normalised in float32, optionally rounded to bfloat16 (fast matrix units: AMX, tensor
   cores, the MXU), and every query keeps its ``c`` highest approximate similarities (a running
   ``lax.top_k`` over ``[chunk, chunk]`` blocks; memory ``O(chunk^2 + n c)``).
2. Bound (``error_bound``): for unit vectors in ``d`` dimensions the approximate similarity is
   within ``B`` of the exact one. A candidate whose approximate similarity is below the query's
   best minus ``2 B`` cannot be the first neighbour, so only the candidates inside that window
   are re-ranked in float64 on the host; a query with a single candidate there is settled as is.
3. Fallback: when even the ``c``-th candidate is inside the window (more near ties than ``c``),
   nothing outside the list is excluded and that query is searched exhaustively in float64.

Exact duplicates (byte-identical rows: blank images give identical patches) are detected by
hashing the rows (bytes verified) and settled by index before any arithmetic, so the same on
every CPU (docs/METHOD.md section 2): a copy's first neighbour is the lowest-index other copy,
ahead of any other row (their cosine is exactly 1, the largest there is), and its similarity is
exactly 1, not a computed ``u . u`` whose last bit depends on the SIMD summation order. Only the
first copy of each row is a key in the candidate pass, so copies never crowd a candidate list
and a row's first neighbour among copies is the first one.

"Float64 arithmetic" here: rows normalised in float64, dot products in float64, the cosine
clipped to ``[-1, 1]`` (as ``1 - cos`` is clipped to ``[0, 2]`` by scikit-learn's cosine
distance, which the FINCH authors' code uses). Two candidates whose float64 similarities differ
by a few units in the last place (~1e-16) may be ordered differently by another float64 code.

Factored candidate pass (``grid``: the rows are all patches of whole images, the fit's default
on accelerators). A patch embedding is ``x_i = [l1_i, l2_c(i), l3_c'(i)] / |raw_i|``: its layer2
and layer3 parts are nearest-upsampled copies, the same in the 2 x 2 cell ``c`` (layer2) and the
4 x 4 cell ``c'`` (layer3) up to a per-row scale (docs/METHOD.md section 1, "Factored head"). So
``cos(x_i, x_j) = U_i . U_j + w2_i w2_j (R2_c . R2_c~) + w3_i w3_j (R3_c' . R3_c'~)`` with
``U_i = x_i[:256] / |x_i|``, per-cell unit representatives ``R`` and per-row weights
``w_i = |x_i[seg]| / |x_i|``, all derived from the stored rows in float64. With the rows in
nested cell order (4 x 4 cells of 16 rows, 2 x 2 sub-cells of 4), a ``[chunk, chunk]`` block is a
256-d Gram block plus a ``[chunk / 4]^2`` 512-d and a ``[chunk / 16]^2`` 1024-d one added by
broadcasting: ~6x fewer multiply-adds than the 1792-d block. Candidate indices are mapped back
to the original rows before the float64 re-rank, so every decision is the one above. The stored
rows are copies only up to their own rounding: ``rho``, the largest relative residual
``|x_i[seg] - t_i R_c| / |x_i[seg]|`` (``t_i`` the norm ratio, measured on the host in float64;
~2^-23 for float32 rows, ~2^-11 for float16), perturbs the cosine by at most ``2 rho`` (the
reconstruction keeps each segment's norm; Cauchy-Schwarz over the segments), and the float32
evaluation (inputs rounded once, three dot products of at most 1024 terms, two scalings and two
sums: ``(1 + u)^8 (1 + g_1024) - 1``) stays within the unfactored ``f`` below, so
``B' = B + 4 rho``. Used for float32 (or float64) rows in float32 when ``rho <= 2^-20``;
float16 rows, bfloat16, and grids whose residual is larger take the unfactored pass.

Error bound. Let ``u = 2^-24`` (float32 unit roundoff), ``g = d u / (1 - d u)``. Normalising in
float32 (input rounding, the sum of squares, square root, division) perturbs each element by a
relative ``e_n <= g / 2 + 3 u``; bfloat16 rounding adds ``e_b = 2^-8``; a float32 product adds
``u`` (bfloat16 products are exact in float32); summing ``d`` products in float32 in any order
adds ``g`` times the sum of their magnitudes, which is at most 1 for unit vectors. So
``|s_approx - s| <= (1 + e_n)^2 (1 + e_b)^2 (1 + u_p) (1 + g) - 1`` and ``B`` is twice that
(margin for matrix units that emulate float32, e.g. TPU's multi-pass bfloat16) plus ``1e-12``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from protoad_jax.clustering.chunking import is_sharded, map_rows, replicate, scan_rows
from protoad_jax.scoring import NORM_EPS

PRECISIONS = ("float32", "bfloat16")
_ROWS_PER_HOST_BLOCK = 2048
_PAIRS_PER_HOST_BLOCK = 4096
_RERANK_QUERIES = 256  # float64 host work in blocks of this many queries / keys


class Neighbours(NamedTuple):
    """First neighbours and how they were decided.

    Attributes:
      index: ``[n]`` int32, ``index[i] = argmax_{j != i} cos(x_i, x_j)``, lowest ``j`` on ties.
      similarity: ``[n]`` float64, that cosine (float64 arithmetic, clipped to ``[-1, 1]``;
        exactly 1 between copies).
      reranked: queries whose window held two or more candidates (re-ranked in float64).
      fallbacks: queries with more near ties than ``candidates``: searched again on the device
        keeping ``fallback_candidates``.
      exhaustive: queries with more near ties than that: searched exhaustively in float64.
      duplicates: rows that have an identical row elsewhere.
      precision: ``"float32"`` or ``"bfloat16"``, the candidate pass's arithmetic.
      bound: the error bound ``B`` used.
      copies: ``[n]`` int64, for each row its first copy (itself if none; ``duplicate_groups``).
      factored: whether the candidate pass was the factored one (``grid``); ``bound`` is then
        ``B'``.
    """

    index: np.ndarray
    similarity: np.ndarray
    reranked: int
    fallbacks: int
    exhaustive: int
    duplicates: int
    precision: str
    bound: float
    copies: np.ndarray
    factored: bool = False


class PatchGrid(NamedTuple):
    """Rows that are every patch of whole images: ``images`` x ``height`` x ``width`` rows in
    image-major, row-major order, each the L2-normalised concatenation of stages of widths
    ``widths`` at resolutions ``1, 1/2, 1/4`` of the grid (nearest-upsampled x2, x4), as
    ``pipeline.extract_patches`` returns them when no budget subsamples them.
    ``height`` and ``width`` are multiples of 4."""

    images: int
    height: int
    width: int
    widths: tuple[int, int, int] = (256, 512, 1024)


_FACTOR_RHO_MAX = 2.0 ** -20  # above: the widened window costs more than the factoring saves
_FACTOR_ROWS = 16384  # host float64 work of the factoring in blocks of about this many rows


def error_bound(d: int, precision: str) -> float:
    """``B``: an upper bound on ``|approximate - exact|`` cosine of the candidate pass."""
    u = 2.0 ** -24
    g = d * u / (1.0 - d * u)
    e_n = g / 2.0 + 3.0 * u
    e_b, u_p = (2.0 ** -8, 0.0) if precision == "bfloat16" else (0.0, u)
    f = (1.0 + e_n) ** 2 * (1.0 + e_b) ** 2 * (1.0 + u_p) * (1.0 + g) - 1.0
    return 2.0 * f + 1e-12


def resolve_precision(precision: str) -> str:
    """Checks a candidate-pass precision name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


# ----------------------------------------------------------------------------- device pass


def _unit(xc: jax.Array, bf16: bool) -> jax.Array:
    u = xc / jnp.maximum(jnp.linalg.norm(xc, axis=1), NORM_EPS)[:, None]
    return u.astype(jnp.bfloat16) if bf16 else u


def _sims(a: jax.Array, b: jax.Array, bf16: bool) -> jax.Array:
    return jnp.einsum("qd,kd->qk", a, b, precision=None if bf16 else lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def _keep_top(best: tuple[jax.Array, jax.Array], sim: jax.Array, keys: jax.Array,
              c: int) -> tuple[jax.Array, jax.Array]:
    """Merges a ``[q, k]`` block of similarities (columns = row indices ``keys``) into the
    running ``([q, c], [q, c])`` best values / indices."""
    best_v, best_i = best
    v, pos = lax.top_k(jnp.concatenate([best_v, sim], axis=1), c)
    idx = jnp.concatenate([best_i, jnp.broadcast_to(keys, sim.shape)], axis=1)
    return v, jnp.take_along_axis(idx, pos, axis=1)


def _empty(rows: int, c: int) -> tuple[jax.Array, jax.Array]:
    return jnp.full((rows, c), -jnp.inf, jnp.float32), jnp.full((rows, c), -1, jnp.int32)


def _sweep(load, sims, n: int, key_ok: jax.Array, pairs: jax.Array, chunk: int, c: int,
           mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """The symmetric chunk-pair sweep of ``_pair_pass`` over any row representation:
    ``load(start)`` gives chunk ``[start, start + chunk)``'s operands, ``sims(a, b)`` their
    ``[chunk, chunk]`` float32 similarities."""
    ar = jnp.arange(chunk)

    def block(i):
        start = jnp.minimum(i * chunk, n - chunk)
        valid = start + ar >= i * chunk
        return start, start + ar, load(start), valid, valid & lax.dynamic_slice_in_dim(key_ok, start, chunk)

    def update(state, start, sim, keys):
        rows = tuple(lax.dynamic_slice_in_dim(a, start, chunk) for a in state)
        v, i = _keep_top(rows, sim, keys, c)
        return (lax.dynamic_update_slice_in_dim(state[0], v, start, 0),
                lax.dynamic_update_slice_in_dim(state[1], i, start, 0))

    def body(state, pair):
        i, j, active = pair[0], pair[1], pair[2] > 0
        si, ri, ui, qi_ok, ki_ok = block(i)
        sj, rj, uj, qj_ok, kj_ok = block(j)
        sim = sims(ui, uj)
        not_self = ri[:, None] != rj[None, :]
        rows = active & qi_ok[:, None] & kj_ok[None, :] & not_self
        state = update(state, si, jnp.where(rows, sim, -jnp.inf), rj)
        cols = active & (i != j) & ki_ok[:, None] & qj_ok[None, :] & not_self
        return update(state, sj, jnp.where(cols, sim, -jnp.inf).T, ri), ()

    def local(pairs):
        state, _ = lax.scan(body, _empty(n, c), pairs)
        return state

    if not is_sharded(mesh):
        return local(pairs)
    axes = mesh.axis_names  # pairs split over every mesh axis; each device keeps a full state
    v, i = jax.shard_map(lambda p: tuple(a[None] for a in local(p)), mesh=mesh,
                         in_specs=P(axes), out_specs=P(axes), check_vma=False)(pairs)
    d = v.shape[0]  # [devices, n, c] -> the best c of the devices' lists
    v, pos = lax.top_k(v.transpose(1, 0, 2).reshape(n, d * c), c)
    return v, jnp.take_along_axis(i.transpose(1, 0, 2).reshape(n, d * c), pos, axis=1)


@functools.partial(jax.jit, static_argnames=("chunk", "c", "bf16", "mesh"))
def _pair_pass(x: jax.Array, key_ok: jax.Array, pairs: jax.Array, *, chunk: int, c: int,
               bf16: bool, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-``c`` approximate cosine similarities of every row of ``x`` [n, d] among the rows with
    ``key_ok`` [n] (itself excluded): ``([n, c] f32, [n, c] int32)`` descending, ``-inf`` where
    fewer exist. ``pairs`` [p, 3] lists chunk pairs ``(I, J, active)`` with ``I <= J``: each
    ``[chunk, chunk]`` block of similarities is computed once and serves chunk ``I`` as queries
    (rows) and chunk ``J`` as queries (columns), half the work of a rectangular sweep. Chunks
    as in ``chunking.scan_rows`` (the last one clamped; its overlap rows are invalid)."""
    def load(start):
        return _unit(lax.dynamic_slice_in_dim(x, start, chunk).astype(jnp.float32), bf16)

    return _sweep(load, functools.partial(_sims, bf16=bf16), x.shape[0], key_ok, pairs, chunk,
                  c, mesh)


@functools.partial(jax.jit, static_argnames=("chunk", "c", "mesh"))
def _pair_pass_factored(parts: tuple[jax.Array, ...], key_ok: jax.Array, pairs: jax.Array, *,
                        chunk: int, c: int, mesh: Mesh | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """``_pair_pass`` (float32) on factored rows in nested cell order (``_factor``):
    ``parts = (u [n, d1], w [n, 2], r2 [n / 4, d2], r3 [n / 16, d3])``; ``chunk`` a multiple
    of 16. A block is ``u_I u_J^T`` plus the cells' Gram blocks broadcast over their rows."""
    u, w, r2, r3 = parts
    g = chunk // 16

    def load(start):
        return (lax.dynamic_slice_in_dim(u, start, chunk), lax.dynamic_slice_in_dim(w, start, chunk),
                lax.dynamic_slice_in_dim(r2, start // 4, chunk // 4),
                lax.dynamic_slice_in_dim(r3, start // 16, g))

    def sims(a, b):
        dot = functools.partial(jnp.einsum, "qd,kd->qk", precision=lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)
        s1 = dot(a[0], b[0]).reshape(g, 4, 4, g, 4, 4)  # [cell, sub-cell, row] on both sides
        s2 = dot(a[2], b[2]).reshape(g, 4, 1, g, 4, 1)
        s3 = dot(a[3], b[3]).reshape(g, 1, 1, g, 1, 1)
        w2 = (a[1][:, None, 0] * b[1][None, :, 0]).reshape(g, 4, 4, g, 4, 4)
        w3 = (a[1][:, None, 1] * b[1][None, :, 1]).reshape(g, 4, 4, g, 4, 4)
        return (s1 + w2 * s2 + w3 * s3).reshape(chunk, chunk)

    return _sweep(load, sims, u.shape[0], key_ok, pairs, chunk, c, mesh)


def _chunk_pairs(n: int, chunk: int, devices: int) -> np.ndarray:
    """``[p, 3]`` int32 chunk pairs ``(I, J, 1)``, ``I <= J``, padded with inactive rows to a
    multiple of ``devices``."""
    num = -(-n // chunk)
    i, j = np.triu_indices(num)
    pairs = np.stack([i, j, np.ones_like(i)], axis=1)
    pad = (-len(pairs)) % devices
    return np.concatenate([pairs, np.zeros((pad, 3), pairs.dtype)]).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("chunk", "c", "bf16", "mesh"))
def _query_pass(q: jax.Array, qidx: jax.Array, x: jax.Array, key_ok: jax.Array, *, chunk: int,
                c: int, bf16: bool, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-``c`` of the queries ``q`` [m, d] (rows ``qidx`` of ``x``, excluded as their own keys)
    among the rows of ``x`` with ``key_ok``: ``([m, c], [m, c])``."""
    qchunk = min(chunk, q.shape[0])
    ar = jnp.arange(chunk)

    def query_fn(xq, qi, _):
        u = _unit(xq, bf16)

        def key_fn(best, xk, ok_k, valid_k, kstart):
            keys = kstart + ar
            ok = (valid_k & ok_k)[None, :] & (qi[:, None] != keys[None, :])
            sim = jnp.where(ok, _sims(u, _unit(xk, bf16), bf16), -jnp.inf)
            return _keep_top(best, sim, keys, c), ()

        return scan_rows(key_fn, _empty(qchunk, c), x, chunk, key_ok)[0]

    return map_rows(query_fn, q, qchunk, qidx, mesh)


# ----------------------------------------------------------------------------- float64 host side


def unit64(rows: np.ndarray) -> np.ndarray:
    """Rows as float64 unit vectors (zero rows stay zero)."""
    r = np.asarray(rows, np.float64)
    norm = np.sqrt(np.einsum("nd,nd->n", r, r))
    return r / np.where(norm > 0, norm, 1.0)[:, None]


def cosine64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of row pairs ``a[i], b[i]`` ([m, d] each) in float64, clipped to ``[-1, 1]``."""
    return np.clip(np.einsum("nd,nd->n", unit64(a), unit64(b)), -1.0, 1.0)


def duplicate_groups(x: np.ndarray) -> np.ndarray:
    """``[n]`` int64: for each row the index of the first row with the same bytes (itself if
    none): the exact duplicates, found by hashing and verified byte for byte."""
    n = x.shape[0]
    flat = np.ascontiguousarray(x).reshape(n, -1)
    words = flat.view(np.uint8).reshape(n, -1)
    pad = (-words.shape[1]) % 8
    weights = np.random.default_rng(0).integers(1, 2 ** 63, (words.shape[1] + pad) // 8,
                                                dtype=np.uint64) | np.uint64(1)
    h = np.empty(n, np.uint64)
    for s in range(0, n, 4096):
        block = words[s:s + 4096]
        if pad:
            block = np.concatenate([block, np.zeros((len(block), pad), np.uint8)], axis=1)
        w = block.view(np.uint64)
        h[s:s + 4096] = (w * weights).sum(axis=1)  # wraps mod 2^64: a hash, checked below
    first = np.arange(n)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        members = order[s:e]  # ascending row order (stable sort)
        todo = list(members)
        while todo:  # verify bytes: a hash collision must not merge different rows
            head, rest = todo[0], todo[1:]
            same = {m for m in rest if np.array_equal(words[m], words[head])}
            first[list(same)] = head
            todo = [m for m in rest if m not in same]
    return first


def nested_order(grid: PatchGrid) -> np.ndarray:
    """``[n]`` int64 permutation: the rows of ``grid`` in nested cell order (per image, 4 x 4
    cells row-major, in each its 2 x 2 sub-cells row-major, in each its 4 rows row-major), so
    that rows ``16 k .. 16 k + 15`` share a layer3 cell and rows ``4 k .. 4 k + 3`` a layer2
    cell."""
    h, w = grid.height, grid.width
    one = np.arange(h * w).reshape(h // 4, 2, 2, w // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return (np.arange(grid.images)[:, None] * (h * w) + one.reshape(1, -1)).reshape(-1)


def _factor(xh: np.ndarray, order: np.ndarray, widths: tuple[int, int, int]
            ) -> tuple[tuple[np.ndarray, ...], float]:
    """The factored rows of ``xh[order]`` (nested cell order) and their residual ``rho``.

    Returns ``((u [n, d1], w [n, 2], r2 [n / 4, d2], r3 [n / 16, d3]) float32, rho)``: the first
    segment over the row norm, per segment ``s = 2, 3`` the weight ``|x_i[s]| / |x_i|`` and the
    unit representative of each cell (its first row's segment), all computed in float64; ``rho``
    the largest ``|x_i[s] - t_i rep_c| / |x_i[s]|`` with ``t_i = |x_i[s]| / |rep_c|``.
    """
    n = len(order)
    d1, d2, d3 = widths
    u = np.empty((n, d1), np.float32)
    w = np.empty((n, 2), np.float32)
    reps = [np.empty((n // 4, d2), np.float32), np.empty((n // 16, d3), np.float32)]
    rho = 0.0
    step = max(16, _FACTOR_ROWS // 16 * 16)
    for s in range(0, n, step):
        x = np.asarray(xh[order[s:s + step]], np.float64)
        norm = np.sqrt(np.einsum("nd,nd->n", x, x))
        u[s:s + len(x)] = x[:, :d1] / norm[:, None]
        for k, (lo, hi, size) in enumerate(((d1, d1 + d2, 4), (d1 + d2, d1 + d2 + d3, 16))):
            seg = x[:, lo:hi].reshape(-1, size, hi - lo)  # [cells, rows of a cell, width]
            rep = seg[:, 0]
            rep_norm = np.sqrt(np.einsum("cd,cd->c", rep, rep))
            seg_norm = np.sqrt(np.einsum("crd,crd->cr", seg, seg))
            unit = rep / np.where(rep_norm > 0, rep_norm, 1.0)[:, None]
            resid = seg - seg_norm[:, :, None] * unit[:, None, :]
            err = np.sqrt(np.einsum("crd,crd->cr", resid, resid))
            rho = max(rho, float(np.max(np.where(seg_norm > 0, err / np.where(seg_norm > 0, seg_norm, 1.0), 0.0))))
            reps[k][s // size:(s + len(x)) // size] = unit
            w[s:s + len(x), k] = seg_norm.reshape(-1) / norm
    return (u, w, reps[0], reps[1]), rho


def _exhaustive64(xh: np.ndarray, queries: np.ndarray, key_ok: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbours of ``queries`` among the rows with ``key_ok`` (float64, chunked)."""
    q = unit64(xh[queries])
    best_v = np.full(len(queries), -np.inf)
    best_i = np.full(len(queries), -1, np.int64)
    n = xh.shape[0]
    for s in range(0, n, _ROWS_PER_HOST_BLOCK):
        keys = np.arange(s, min(s + _ROWS_PER_HOST_BLOCK, n))
        sim = np.clip(q @ unit64(xh[keys]).T, -1.0, 1.0)
        sim[:, ~key_ok[keys]] = -np.inf
        sim[queries[:, None] == keys[None, :]] = -np.inf
        a = np.argmax(sim, axis=1)  # lowest index within the block on ties
        v = sim[np.arange(len(queries)), a]
        take = v > best_v  # strictly: an earlier block keeps a tie
        best_v[take], best_i[take] = v[take], keys[a[take]]
    return best_i, best_v


def _settle(xh: np.ndarray, rows: np.ndarray, v: np.ndarray, idx: np.ndarray, bound: float,
            unseen: int, index: np.ndarray) -> tuple[np.ndarray, int]:
    """Decides the queries ``rows`` from their candidate lists (``v``, ``idx`` [m, c], descending
    approximate similarities); writes ``index[rows]``. ``unseen``: keys outside a full list.

    Returns the rows left undecided (the ``c``-th candidate inside the window while keys
    outside the list exist) and how many were re-ranked in float64.
    """
    v = v.astype(np.float64)
    inside = (v >= (v[:, :1] - 2.0 * bound)) & (idx >= 0) & (v > -np.inf)
    full = inside[:, -1] & (unseen > 0)
    width = inside.sum(axis=1)
    lone = ~full & (width == 1)
    index[rows[lone]] = idx[lone, 0]
    rerank = np.flatnonzero(~full & (width >= 2))
    for s in range(0, len(rerank), _RERANK_QUERIES):
        block = rerank[s:s + _RERANK_QUERIES]
        ok = inside[block]
        keys = np.unique(idx[block][ok])  # the block's candidates, each read once
        sim = np.clip(unit64(xh[keys]) @ unit64(xh[rows[block]]).T, -1.0, 1.0).T  # [b, keys]
        pos = np.searchsorted(keys, np.where(ok, idx[block], keys[0]))
        cand = np.where(ok, np.take_along_axis(sim, pos, axis=1), -np.inf)
        best = cand.max(axis=1, keepdims=True)
        tied = np.where(cand == best, idx[block].astype(np.int64), np.iinfo(np.int64).max)
        index[rows[block]] = tied.min(axis=1)  # lowest index among float64 ties
    return rows[full], len(rerank)


def candidate_lists(x: np.ndarray, candidates: int, *, chunk_size: int = 1024,
                    precision: str = "float32", mesh: Mesh | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ``candidates`` most similar other rows, with exact values and a bound.

    Args:
      x: ``[n, d]`` float rows, ``n >= 2``, no zero rows (not checked here).
      candidates: list length ``c`` (capped at ``n - 1``).
      chunk_size, precision, mesh: as in ``first_neighbours``.

    Returns:
      ``(index [n, c] int64, similarity [n, c] float64, threshold [n] float64)``: the rows kept by
      the approximate pass, sorted by their float64 cosine (descending; ``-1`` / ``-inf`` pad
      short lists), and an upper bound on the float64 cosine of every row not in the list
      (``-inf`` when the list holds every other row).
    """
    n, d = x.shape
    prec = resolve_precision(precision)
    chunk, c = min(int(chunk_size), n), min(int(candidates), n - 1)
    devices = mesh.size if is_sharded(mesh) else 1
    v, idx = _pair_pass(replicate(jnp.asarray(x.astype(np.float32)), mesh),
                        replicate(jnp.ones(n, bool), mesh),
                        replicate(jnp.asarray(_chunk_pairs(n, chunk, devices)), mesh),
                        chunk=chunk, c=c, bf16=prec == "bfloat16", mesh=mesh)
    v, idx = np.asarray(v, np.float64), np.asarray(idx, np.int64)
    full = idx[:, -1] >= 0
    threshold = np.where(full, v[:, -1] + error_bound(d, prec), -np.inf)
    sims = np.full((n, c), -np.inf)
    u = unit64(x)
    rows = max(1, _PAIRS_PER_HOST_BLOCK // c)
    for s in range(0, n, rows):
        i = idx[s:s + rows]
        uc = u[np.maximum(i, 0).reshape(-1)].reshape(*i.shape, d)
        sim = np.clip(np.einsum("qd,qcd->qc", u[s:s + rows], uc), -1.0, 1.0)
        sims[s:s + rows] = np.where(i >= 0, sim, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return (np.take_along_axis(idx, order, axis=1), np.take_along_axis(sims, order, axis=1),
            threshold)


def first_neighbours(x: np.ndarray | jax.Array, *, chunk_size: int = 1024, candidates: int = 16,
                     fallback_candidates: int = 256, precision: str = "float32",
                     mesh: Mesh | None = None, grid: PatchGrid | None = None) -> Neighbours:
    """Every row's first neighbour under cosine similarity, as float64 decides it.

    Args:
      x: ``[n, d]`` float rows (float16, float32 or float64), ``n >= 2``, finite, no zero rows
        (a zero row has no direction).
      chunk_size: rows per block of the candidate pass; device memory
        ``O(chunk_size^2 + chunk_size * d + n * candidates)``.
      candidates: approximate candidates kept per query (``c``).
      fallback_candidates: the longer list searched again for queries whose ``c`` candidates
        were all near ties.
      precision: candidate-pass arithmetic, ``"float32"`` or ``"bfloat16"``; the result does not
        depend on it, only the time: bfloat16's bound is ~40 times wider, so on densely
        clustered patches most queries fall back (see docs/speed.md, "Fit stage"); float32 is the default.
      mesh: devices to split the query chunks over (``x`` replicated on each); the result does
        not depend on the device count.
      grid: the rows are every patch of whole images (``PatchGrid``): the candidate pass is the
        factored one where it applies (float32, non-float16 rows, residual ``<= 2^-20``; module
        docstring); the result does not depend on it. None: the rows are unstructured.

    Returns:
      ``Neighbours``.

    Raises:
      ValueError: ``x`` not 2-D, fewer than 2 rows, not finite, a zero row, bad sizes; a
        ``grid`` that does not describe ``x``'s shape.
    """
    xh = np.asarray(x)
    if xh.ndim != 2 or xh.shape[0] < 2 or xh.shape[1] < 1:
        raise ValueError(f"first_neighbours: x must be [n, d] with n >= 2, d >= 1, got {xh.shape}")
    if not np.issubdtype(xh.dtype, np.floating):
        xh = xh.astype(np.float32)
    if int(chunk_size) < 1 or int(candidates) < 1:
        raise ValueError(f"first_neighbours: chunk_size and candidates must be >= 1, got "
                         f"{chunk_size}, {candidates}")
    n, d = xh.shape
    for s in range(0, n, 65536):
        block = xh[s:s + 65536].astype(np.float32)
        if not np.isfinite(block).all():
            raise ValueError("first_neighbours: x must be finite; found NaN or inf "
                             f"(first bad row {s + int(np.argmin(np.isfinite(block).all(1)))})")
        if not (np.abs(block).max(axis=1) > 0).all():
            bad = s + int(np.argmin(np.abs(block).max(axis=1) > 0))
            raise ValueError(f"first_neighbours: row {bad} is all zeros; cosine similarity is "
                             "undefined for a zero vector: drop such rows first")
    prec = resolve_precision(precision)
    chunk = min(int(chunk_size), n)
    c = min(int(candidates), n - 1)

    factored = None
    if grid is not None:
        h, w = int(grid.height), int(grid.width)
        if (len(grid.widths) != 3 or sum(grid.widths) != d or int(grid.images) * h * w != n
                or h < 4 or w < 4 or h % 4 or w % 4):
            raise ValueError(f"first_neighbours: grid {grid} does not describe x of shape "
                             f"{xh.shape} (images * height * width rows, height and width "
                             "multiples of 4, sum(widths) columns)")
        if prec == "float32" and xh.dtype != np.float16:
            order = nested_order(grid)
            parts, rho = _factor(xh, order, tuple(int(v) for v in grid.widths))
            if rho <= _FACTOR_RHO_MAX:
                factored = order, parts, rho

    first = duplicate_groups(xh)
    key_ok = first == np.arange(n)
    device_ok = replicate(jnp.asarray(key_ok), mesh)
    bf16 = prec == "bfloat16"
    bound = error_bound(d, prec)

    index = np.full(n, -1, np.int64)
    # Duplicates: the lowest-index other copy, cosine exactly 1 (set below).
    dup_rows = np.flatnonzero(np.bincount(first, minlength=n)[first] >= 2)
    if len(dup_rows):
        index[dup_rows] = first[dup_rows]
        later = np.flatnonzero(~key_ok)
        order = later[np.argsort(first[later], kind="stable")]
        heads, pos = np.unique(first[order], return_index=True)
        index[heads] = order[pos]  # a first copy's neighbour: the second copy

    def on_device() -> jax.Array:
        return replicate(jnp.asarray(xh if xh.dtype in (np.float16, np.float32)
                                     else xh.astype(np.float32)), mesh)

    devices = mesh.size if is_sharded(mesh) else 1
    if factored is None:
        device_x = on_device()
        pairs = replicate(jnp.asarray(_chunk_pairs(n, chunk, devices)), mesh)
        v, idx = _pair_pass(device_x, device_ok, pairs, chunk=chunk, c=c, bf16=bf16, mesh=mesh)
        v, idx = np.asarray(v), np.asarray(idx)
        first_bound = bound
    else:
        device_x = None
        order, parts, rho = factored
        fchunk = max(16, chunk // 16 * 16)  # whole layer3 cells (n is a multiple of 16)
        vo, io = _pair_pass_factored(
            replicate(tuple(jnp.asarray(a) for a in parts), mesh),
            replicate(jnp.asarray(key_ok[order]), mesh),
            replicate(jnp.asarray(_chunk_pairs(n, fchunk, devices)), mesh),
            chunk=fchunk, c=c, mesh=mesh)
        vo, io = np.asarray(vo), np.asarray(io)
        v, idx = np.empty_like(vo), np.empty_like(io)  # back to the original rows and indices
        v[order] = vo
        idx[order] = np.where(io >= 0, order[np.maximum(io, 0)], -1)
        first_bound = bound + 4.0 * rho
    todo = np.flatnonzero(index < 0)
    todo, reranked = _settle(xh, todo, v[todo], idx[todo], first_bound, n - 1 - c, index)
    fallbacks = len(todo)
    if len(todo):  # more near ties than c: a longer list for those queries only
        device_x = on_device() if device_x is None else device_x
        c2 = min(int(fallback_candidates), n - 1)
        v2, idx2 = _query_pass(replicate(jnp.asarray(device_x[todo]), mesh),
                               replicate(jnp.asarray(todo.astype(np.int32)), mesh), device_x,
                               device_ok, chunk=chunk, c=c2, bf16=bf16, mesh=mesh)
        todo, more = _settle(xh, todo, np.asarray(v2), np.asarray(idx2), bound, n - 1 - c2, index)
        reranked += more
    exhaustive = len(todo)
    if len(todo):  # still more near ties than c2: float64 over every key
        index[todo] = _exhaustive64(xh, todo, key_ok)[0]

    similarity = np.empty(n, np.float64)
    for s in range(0, n, 8192):
        similarity[s:s + 8192] = cosine64(xh[s:s + 8192], xh[index[s:s + 8192]])
    similarity[dup_rows] = 1.0
    return Neighbours(index.astype(np.int32), similarity, reranked=int(reranked),
                      fallbacks=int(fallbacks), exhaustive=int(exhaustive),
                      duplicates=len(dup_rows), precision=prec, bound=first_bound, copies=first,
                      factored=factored is not None)
