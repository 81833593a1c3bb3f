"""The FINCH authors' algorithm (ssarfraz/FINCH-Clustering finch/finch.py, defaults cosine and
ensure_early_exit=True) transcribed with dense float64 matrices and exact first neighbours.

Independent of protoad_jax's implementation: full distance matrices, the authors' adjacency
``A = (N + I)(N + I)^T`` without its diagonal, ``min_sim = max(A * D)`` at level 0 and
``A * D > min_sim`` cut later, their level-keeping rules, and one-pair-at-a-time merging with
every mean recomputed from the members.

Where it deviates from the authors' code, and why:

* K above the level-0 count: their code fails (no level has K clusters); here, as in
  protoad_jax, the samples themselves are merged down to K.
* Exact ties (docs/METHOD.md section 2), the rule protoad_jax follows, transcribed here
  independently: copies (rows with the same bytes) are at distance exactly 0, a copy's first
  neighbour is the lowest-index other copy (ahead of any other row), every other row sees all
  copies of a row as one column (the first copy's), and two clusters made only of copies of
  one row merge before any other pair, lowest pair first. The authors' code decides these by
  the last bit of ``sum / count`` and of a dot product, which differs between CPUs (ten
  identical samples gave different required-K labels on two CPUs); in exact arithmetic the
  copies' cosine is 1, the largest there is, so the rule is exact arithmetic with the authors'
  lowest-pair tie-break (only rows that are parallel but not identical, also at cosine 1,
  come after copies instead of by index).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph


def canonical(labels) -> np.ndarray:
    """Relabels clusters in order of first appearance (a plain Python transcription)."""
    seen: dict[int, int] = {}
    return np.array([seen.setdefault(int(v), len(seen)) for v in np.asarray(labels)], np.int64)


def cosine_distances(v: np.ndarray) -> np.ndarray:
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    return np.clip(1.0 - u @ u.T, 0.0, 2.0)


def copies_of(v: np.ndarray) -> np.ndarray:
    """For each row the first row with the same bytes (itself if none)."""
    v = np.ascontiguousarray(v)
    key = v.view(np.dtype((np.void, v.dtype.itemsize * v.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def kappa_of(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First neighbours (lowest index on ties) and the distance matrix, copies settled by the
    exact-tie rule (module docstring)."""
    first = copies_of(v)
    dist = cosine_distances(v)[:, first]  # all copies of a row: the first copy's column
    same = first[:, None] == first[None, :]
    dist[same] = 0.0
    dd = np.where(same, -1.0, dist)  # a copy's first neighbour: another copy
    np.fill_diagonal(dd, np.inf)
    return np.argmin(dd, axis=1), dist


def adjacency(kappa: np.ndarray) -> np.ndarray:
    m = len(kappa)
    nn = np.eye(m)
    nn[np.arange(m), kappa] += 1
    a = nn @ nn.T
    np.fill_diagonal(a, 0)
    return a


def components(a: np.ndarray) -> tuple[np.ndarray, int]:
    c, lab = scipy.sparse.csgraph.connected_components(
        scipy.sparse.csr_matrix(a > 0), directed=True, connection="weak")
    return canonical(lab), c


def member_means(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.stack([x[labels == g].mean(axis=0) for g in range(labels.max() + 1)])


def authors_finch(x, req_clust=None, ensure_early_exit=True):
    """Returns (partitions, num_clust, req_c, min_sim), partitions canonical."""
    x = np.asarray(x, np.float64)
    kappa, dist = kappa_of(x)
    a = adjacency(kappa)
    labels, c = components(a)
    min_sim = float(np.max(dist * a)) if ensure_early_exit and len(x) > 2 else None
    parts, counts = [labels], [c]
    exit_clust = 2
    while exit_clust > 1 and counts[-1] >= 2:
        mat = member_means(x, parts[-1])
        kappa, dist = kappa_of(mat)
        a = adjacency(kappa)
        if min_sim is not None:
            a[dist * a > min_sim] = 0
        u, c = components(a)
        exit_clust = counts[-1] - c
        if c == 1 or exit_clust < 1:
            break
        parts.append(canonical(u[parts[-1]]))
        counts.append(c)
    req = None
    if req_clust is not None:
        if req_clust in counts:
            req = parts[counts.index(req_clust)]
        else:
            levels = [i for i, v in enumerate(counts) if v >= req_clust]
            # The authors' code fails here when no level has enough clusters; protoad_jax then
            # merges the samples themselves.
            start = parts[levels[-1]] if levels else np.arange(len(x))
            req = merge_closest_pairs(x, start, req_clust)
    return parts, counts, req, min_sim


def lowest_copy_pair(groups: list[list[int]], first: np.ndarray) -> tuple[int, int] | None:
    """The lowest pair ``(i, j)`` of clusters that both consist only of copies of one row."""
    seen: dict[int, list[int]] = {}
    for g, members in enumerate(groups):
        rows = {int(first[r]) for r in members}
        if len(rows) == 1:
            seen.setdefault(rows.pop(), []).append(g)
    pairs = [tuple(gs[:2]) for gs in seen.values() if len(gs) >= 2]
    return min(pairs) if pairs else None


def merge_closest_pairs(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """One closest pair of member means (cosine) at a time, every mean recomputed from the
    members; ties: the lowest pair of cluster numbers (first-member order). Exact ties first:
    two clusters of copies of one row (module docstring)."""
    x = np.asarray(x, np.float64)
    first = copies_of(x)
    labels = canonical(labels)
    groups = [list(np.flatnonzero(labels == g)) for g in range(labels.max() + 1)]
    while len(groups) > k:
        pair = lowest_copy_pair(groups, first) if (first != np.arange(len(x))).any() else None
        if pair is None:
            means = np.stack([x[g].mean(axis=0) for g in groups])
            dist = cosine_distances(means)
            np.fill_diagonal(dist, np.inf)
            pair = np.unravel_index(np.argmin(dist), dist.shape)  # row-major: lowest (i, j)
        i, j = min(pair), max(pair)
        groups[i] = groups[i] + groups[j]
        del groups[j]
    out = np.empty(len(x), np.int64)
    for g, members in enumerate(groups):
        out[members] = g
    return canonical(out)
