"""FINCH (Sarfraz et al., CVPR 2019) as its authors ship it, with every decision exact.

docs/METHOD.md section 2. The reference is the authors' ``finch/finch.py`` (ssarfraz/
FINCH-Clustering; the algorithm of the ``finch-clust`` package) with its defaults,
``distance='cosine'`` and ``ensure_early_exit=True``:

* Level 0: each sample's first neighbour ``kappa(i)`` (cosine, itself excluded, lowest index on
  ties; ``neighbours.first_neighbours``, decided as float64 decides it); link ``i - j`` when
  ``j = kappa(i)``, ``kappa(j) = i`` or ``kappa(i) = kappa(j)``; clusters = connected components.
* Early exit: the authors' adjacency counts links (``A = (N + I)(N + I)^T`` without its
  diagonal: 2 for mutual first neighbours, else 1) and ``min_sim = max(A * D)`` over level 0
  with ``D`` the cosine distance (``1 - cos`` clipped to ``[0, 2]``). At every later level a link
  with ``A * D > min_sim`` is cut before the components are taken. Only a few links can matter:
  a sibling link ``i - j`` (shared first neighbour ``h``) is never shorter than ``i - h`` or
  ``j - h``, so it only bridges when ``i`` and ``h`` are mutual and their double-counted link is
  cut; those bridges are checked explicitly. Off with ``ensure_early_exit=False``.
* Each cluster is replaced by the mean of its original members; the next level clusters the
  means. A level with one cluster, or that merges nothing, is dropped and ends the hierarchy; a
  level that merges exactly one cluster is kept and ends it (the authors' ``while exit_clust > 1``
  loop).
* Required number of clusters ``K``: a level with exactly ``K`` clusters is returned as is;
  otherwise the coarsest level with at least ``K`` clusters is merged, closest pair of means
  first, one pair at a time, down to ``K`` (``merging.merge_closest``; exact, ``O(m d)`` memory).
  Deliberate difference: when ``K`` exceeds the level-0 count the authors' code fails (no level
  has ``K`` clusters); here the samples themselves are merged down to exactly ``K``.

Exactness: the authors compute distances in float32 (and above 70,000 samples with approximate,
non-deterministic neighbours); here first neighbours, link lengths, ``min_sim``, the cuts and the
merges are float64 decisions, so a partition is the same on any device, precision, chunking or
device count. Cluster means are accumulated in float64 on the host; the ``O(n^2 d)`` candidate
searches run on the accelerator.

Exact ties: copies (byte-identical samples) are settled by index before any arithmetic, so the
same on every CPU: their cosine is exactly 1 (distance 0), the largest there is; a copy's first
neighbour is the lowest-index other copy; and when ``K`` exceeds the level-0 count, copies merge
before any other pair, group by group in order of first copy, the first copy absorbing the
others in index order (``merging.merge_closest(copies=...)``). Computed as ``sum / count`` and
dot products, clusters of copies have equal means only up to the last bit, which depends on the
count and the CPU's SIMD summation order, and so would the labels. Above the samples no two
clusters consist of copies of one row (level 0 links every copy to the first). Any other pair
with equal float64 cosines goes to the lowest pair, as float64 decides it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from jax.sharding import Mesh

from protoad_jax.clustering import memory, merging
from protoad_jax.clustering.neighbours import (
    Neighbours,
    PatchGrid,
    cosine64,
    first_neighbours,
    unit64,
)

_SUM_ROWS = 16384  # rows per block of the float64 cluster sums
_BUDGET_HINT = "subsample the patches (Config.max_patches)"


class FinchResult(NamedTuple):
    """FINCH hierarchy.

    Attributes:
      partitions: per level (0 = finest), ``[n]`` int32 cluster labels of the samples, clusters
        numbered in order of their first member.
      num_clusters: per level, the number of clusters ``c_l``.
      means: per level, ``[c_l, d]`` float32 means of the original member vectors.
      required_labels: ``[n]`` int32 labels of the required-number-of-clusters partition
        (``finch(..., num_clusters=K)``), numbered in order of first member; else None.
      required_means: ``[K, d]`` float32 means of that partition; else None.
      required_level: the level that was returned (exactly ``K`` clusters) or merged down to
        ``K`` (-1: the samples themselves, when ``K`` exceeds the level-0 count); else None.
      min_sim: the early-exit distance threshold (None when off or ``n <= 2``).
      stats: per level ``levels`` (first-neighbour counters: ``reranked``, ``fallbacks``,
        ``exhaustive``, ``duplicates``) and ``merge`` (``merges``, ``copies``, ``refreshes``,
        ``exact``, ``start``).
    """

    partitions: list[np.ndarray]
    num_clusters: list[int]
    means: list[np.ndarray]
    required_labels: np.ndarray | None = None
    required_means: np.ndarray | None = None
    required_level: int | None = None
    min_sim: float | None = None
    stats: dict | None = None


# ----------------------------------------------------------------------------- host graph steps


def _canonical(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabels so that clusters are numbered in order of their first member."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first), dtype=np.int32)
    return rank[inverse.reshape(-1)], len(first)


def _components(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of the undirected edges ``src - dst``: ``([n] int32, count)``."""
    graph = scipy.sparse.csr_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=True, connection="weak")
    return _canonical(labels)


def _distance(rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine distances ``1 - cos`` (clipped to ``[0, 2]``) of the row pairs ``a[k], b[k]``."""
    out = np.empty(len(a))
    for s in range(0, len(a), _SUM_ROWS):
        out[s:s + _SUM_ROWS] = 1.0 - cosine64(rows[a[s:s + _SUM_ROWS]], rows[b[s:s + _SUM_ROWS]])
    return np.clip(out, 0.0, 2.0)


def _sibling_diameter(rows: np.ndarray, kappa: np.ndarray, copies: np.ndarray) -> float:
    """Largest cosine distance between two samples that share a first neighbour (copies, i.e.
    equal ``copies[i]``, and a row with itself at distance exactly 0: one copy of each row is
    compared)."""
    order = np.argsort(kappa, kind="stable")
    _, starts, sizes = np.unique(kappa[order], return_index=True, return_counts=True)
    worst = 0.0
    for s, k in zip(starts[sizes >= 2], sizes[sizes >= 2]):
        kids = order[s:s + k]
        kids = unit64(rows[kids[np.unique(copies[kids], return_index=True)[1]]])
        for r in range(0, len(kids), 1024):
            sim = np.clip(kids[r:r + 1024] @ kids.T, -1, 1)
            sim[np.arange(len(sim)), r + np.arange(len(sim))] = 1.0
            worst = max(worst, 1.0 - float(sim.min()))
    return min(worst, 2.0)


def _level(rows: np.ndarray, kappa: np.ndarray, sim: np.ndarray,
           min_sim: float | None) -> tuple[np.ndarray, int]:
    """One FINCH level from first neighbours, with the early-exit cuts when ``min_sim`` is set."""
    n = len(kappa)
    i = np.arange(n)
    if min_sim is None:
        return _components(n, i, kappa)
    mutual = kappa[kappa] == i
    dist = np.clip(1.0 - sim, 0.0, 2.0)
    keep = (1.0 + mutual) * dist <= min_sim
    src, dst = [i[keep]], [kappa[keep]]
    # Bridges: p and h mutual with their (double-counted) link cut, c a child of h whose link
    # to h survives; the sibling link p - c (counted once) survives when D(p, c) <= min_sim.
    cut_pairs = np.flatnonzero(mutual & ~keep)
    if len(cut_pairs):
        partner = np.full(n, -1)
        partner[cut_pairs] = kappa[cut_pairs]
        child = np.flatnonzero(keep & (partner[kappa] >= 0) & (partner[kappa] != i))
        p = partner[kappa[child]]  # the hub's mutual partner
        near = _distance(rows, p, child) <= min_sim
        src.append(p[near])
        dst.append(child[near])
    return _components(n, np.concatenate(src), np.concatenate(dst))


def _early_exit_threshold(rows: np.ndarray, nb: Neighbours) -> float:
    """The authors' ``min_sim = max(A * D)`` over the links of level 0."""
    kappa = nb.index
    mutual = kappa[kappa] == np.arange(len(kappa))
    linked = float(((1.0 + mutual) * np.clip(1.0 - nb.similarity, 0.0, 2.0)).max())
    return max(linked, _sibling_diameter(rows, kappa, nb.copies))


def _sums(x: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    """``[c, d]`` float64 sums of the rows of ``x`` per label, block by block."""
    out = np.zeros((c, x.shape[1]), np.float64)
    for s in range(0, len(x), _SUM_ROWS):
        lab = labels[s:s + _SUM_ROWS]
        onehot = scipy.sparse.csr_matrix(
            (np.ones(len(lab)), (lab, np.arange(len(lab)))), shape=(c, len(lab)))
        out += onehot @ np.asarray(x[s:s + _SUM_ROWS], np.float64)
    return out


# ----------------------------------------------------------------------------- public


def finch(x: np.ndarray, *, num_clusters: int | None = None, ensure_early_exit: bool = True,
          chunk_size: int = 1024, precision: str = "float32",
          mesh: Mesh | None = None, grid: PatchGrid | None = None) -> FinchResult:
    """FINCH hierarchy of partitions, optionally merged down to a required number of clusters.

    Args:
      x: ``[n, d]`` samples (float16, float32 or float64), ``n >= 2``, finite, no zero rows.
      num_clusters: required number of clusters ``K`` in ``[1, n]``, or None.
      ensure_early_exit: the authors' distance cut above level 0 (their default, True).
      chunk_size: block size of the first-neighbour candidate pass.
      precision: candidate-pass arithmetic, ``"float32"`` or ``"bfloat16"`` (the result does
        not depend on it).
      mesh: devices to split the candidate passes over (data replicated on each), e.g.
        ``sharding.local_mesh()``; the result does not depend on the device count.
      grid: ``x`` is every patch of whole images (``neighbours.PatchGrid``): level 0's candidate
        pass shares each cell's Gram blocks (the result does not depend on it); None: unstructured.

    Returns:
      ``FinchResult``; ``required_*`` set when ``num_clusters`` is given.

    Raises:
      ValueError: ``x`` not ``[n, d]`` with ``n >= 2``, not finite, a zero row; ``num_clusters``
        out of ``[1, n]``.
      MemoryError: the estimated memory of a step exceeds the available memory (raised before
        that step); the message says which budget to use.
    """
    xh = np.asarray(x)
    if xh.ndim != 2 or xh.shape[0] < 2 or xh.shape[1] < 1:
        raise ValueError(f"finch: x must be [n, d] with n >= 2 samples and d >= 1, got shape "
                         f"{xh.shape}")
    n, d = xh.shape
    if num_clusters is not None and (
            not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters <= n):
        raise ValueError(
            f"finch: num_clusters must be an integer in [1, n={n}], got {num_clusters!r}")
    itemsize = xh.dtype.itemsize if xh.dtype in (np.float16, np.float32) else 4
    chunk = min(int(chunk_size), n)
    # level 0 has at most n / 2 clusters (each holds a sample and its first neighbour): its
    # float64 sums and float32 means are the largest arrays of the hierarchy. On the device: the
    # samples, their candidate lists, and in the worst case (every query a near tie) the fallback
    # pass's copy of all queries and their 256-long lists.
    memory.check(f"finch: the first-neighbour search over {n} samples and the level-0 sums",
                 _BUDGET_HINT,
                 host=n * d * itemsize + n * 64 * 8 + (n // 2) * d * 12,
                 device=2 * n * d * itemsize + n * (256 + 2048) + 8 * chunk * (chunk + d) * 4)
    kw = {"chunk_size": chunk_size, "precision": precision, "mesh": mesh}
    k = None if num_clusters is None else int(num_clusters)

    def counters(nb):
        return {"n": len(nb.index), "reranked": nb.reranked, "fallbacks": nb.fallbacks,
                "exhaustive": nb.exhaustive, "duplicates": nb.duplicates,
                "factored": nb.factored}

    nb = first_neighbours(xh, grid=grid, **kw)
    labels, c = _level(xh, nb.index, nb.similarity, None)
    min_sim = _early_exit_threshold(xh, nb) if ensure_early_exit and n > 2 else None
    copies = nb.copies  # exact duplicates, for the merging of the samples themselves
    level_stats = [counters(nb)]
    sums = _sums(xh, labels, c)
    counts = np.bincount(labels, minlength=c).astype(np.float64)
    level_means = sums / counts[:, None]
    partitions, sizes, means = [labels], [c], [level_means.astype(np.float32)]
    # float64 sums kept: the current level's and, for a required K, the coarsest level with at
    # least K clusters (the start of the merging)
    kept = {0: (sums, counts)}
    while sizes[-1] >= 2:
        nb = first_neighbours(level_means, **kw)
        lab, c_new = _level(level_means, nb.index, nb.similarity, min_sim)
        merged = sizes[-1] - c_new
        if c_new == 1 or merged < 1:
            break
        memory.check(f"finch: level {len(sizes)} ({c_new} clusters)",
                     _BUDGET_HINT, host=c_new * d * 12)
        level_stats.append(counters(nb))
        sums = _sums(sums, lab, c_new)
        counts = np.bincount(lab, weights=counts, minlength=c_new)
        # Clusters numbered by first member stay so: a merged cluster's first member is that of
        # its lowest-numbered part.
        partitions.append(lab[partitions[-1]].astype(np.int32))
        sizes.append(c_new)
        level_means = sums / counts[:, None]
        means.append(level_means.astype(np.float32))
        kept = {lv: v for lv, v in kept.items() if k is not None and sizes[lv] >= k > c_new}
        kept[len(sizes) - 1] = (sums, counts)
        if merged == 1:
            break

    stats = {"levels": level_stats}
    req_labels = req_means = req_level = None
    if k is not None:
        if k in sizes:
            req_level = sizes.index(k)
            req_labels = partitions[req_level]
            req_means = means[req_level]
        else:
            req_level = max((lv for lv, c in enumerate(sizes) if c >= k), default=-1)
            m = len(kept[req_level][1]) if req_level >= 0 else n
            memory.check(f"finch: merging {m} clusters down to {k}",
                         f"ask for a K closer to a FINCH level or {_BUDGET_HINT}",
                         host=merging.host_bytes(m, d) + (m * d * 8 if req_level < 0 else 0),
                         device=m * d * 4 + m * 512)
            # Exact ties: copies of a sample (byte-identical rows) are settled by index before
            # any arithmetic. A level has none: level 0 links every copy to the first one, so
            # no two clusters of a level consist of copies of the same row.
            if req_level >= 0:
                base_labels = partitions[req_level]
                base_sums, base_counts = kept[req_level]
                copies = None
            else:
                base_labels, base_counts = np.arange(n, dtype=np.int32), np.ones(n)
                base_sums = np.asarray(xh, np.float64)
            merge_stats: dict = {}
            merged_labels = merging.merge_closest(base_sums, base_counts, k, copies=copies,
                                                  stats=merge_stats, **kw)
            stats["merge"] = dict(merge_stats, start=m)
            req_labels = merged_labels[base_labels].astype(np.int32)
            msums = _sums(base_sums, merged_labels, k)
            mcounts = np.bincount(merged_labels, weights=base_counts, minlength=k)
            req_means = (msums / mcounts[:, None]).astype(np.float32)

    return FinchResult(partitions, [int(c) for c in sizes], means, req_labels, req_means,
                       req_level, min_sim, stats)
