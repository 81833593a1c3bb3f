"""The FINCH authors' algorithm (ssarfraz/FINCH-Clustering finch/finch.py, defaults cosine and
ensure_early_exit=True) transcribed with dense float64 matrices and exact first neighbours.

Independent of protoad_jax's implementation: full distance matrices, the authors' adjacency
``A = (N + I)(N + I)^T`` without its diagonal, ``min_sim = max(A * D)`` at level 0 and
``A * D > min_sim`` cut later, their level-keeping rules, and one-pair-at-a-time merging with
every mean recomputed from the members.
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


def identical_columns(v: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Identical rows get identical distance columns (a BLAS product may differ in the last bit
    between two copies of the same row)."""
    _, first = np.unique(v, axis=0, return_inverse=True)
    first = first.reshape(-1)
    rep = np.zeros(first.max() + 1, np.int64)
    rep[first[::-1]] = np.arange(len(v))[::-1]  # lowest row of each group
    out = dist[:, rep[first]]
    np.fill_diagonal(out, dist.diagonal())
    return out


def kappa_of(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = identical_columns(v, cosine_distances(v))
    dd = dist.copy()
    np.fill_diagonal(dd, 1e12)
    return np.argmin(dd, axis=1), dd  # lowest index on ties


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


def merge_closest_pairs(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """One closest pair of member means (cosine) at a time, every mean recomputed from the
    members; ties: the lowest pair of cluster numbers (first-member order)."""
    x = np.asarray(x, np.float64)
    labels = canonical(labels)
    groups = [list(np.flatnonzero(labels == g)) for g in range(labels.max() + 1)]
    while len(groups) > k:
        means = np.stack([x[g].mean(axis=0) for g in groups])
        dist = identical_columns(means, cosine_distances(means))
        np.fill_diagonal(dist, np.inf)
        i, j = np.unravel_index(np.argmin(dist), dist.shape)  # row-major: lowest (i, j)
        i, j = min(i, j), max(i, j)
        groups[i] = groups[i] + groups[j]
        del groups[j]
    out = np.empty(len(x), np.int64)
    for g, members in enumerate(groups):
        out[members] = g
    return canonical(out)
