"""Closest-pair merging of clusters down to a required count, exact and in ``O(m d)`` memory.

FINCH's required-number-of-clusters mode (its authors' ``req_numclust``) merges, one pair at a
time, the two clusters whose means have the highest cosine similarity, the merged mean being the
mean of all original members. This module makes the same sequence of merges (ties to the
lexicographically lowest pair of cluster numbers, clusters numbered by first member) without the
``m x m`` similarity matrix (40 GB at 10^5 clusters) and without recomputing all pairs per merge.

State (host, float64): per cluster the sum of its members (the mean's direction), its unit
vector, its best partner and that cosine, and a candidate list of its ``L`` most similar clusters
with exact cosines plus ``t``, an upper bound on the cosine to any live cluster missing from the
list that existed when the list was made (time ``tau``). The lists start from the accelerator's
candidate pass (``neighbours.candidate_lists``); afterwards:

* Global pair. The closest pair is always a pair of mutual first neighbours, and each cluster's
  stored partner is its nearest among all clusters alive when that partner was last computed.
  For the closest pair, the member that last computed its partner saw the other one, so the
  maximum stored cosine is the closest pair's, and the lowest such pair is the lowest tie.
* Merge ``i < j`` into slot ``i``. The new cluster's cosine to a cluster ``q`` is
  ``(a cos(i, q) + b cos(j, q)) / |s_i + s_j|`` with ``a = |s_i|``, ``b = |s_j|`` (``s``: sums), so
  any ``q`` in neither list (and older than both lists) has a cosine at most
  ``(a t_i + b t_j) / |s_i + s_j|``. The new list is built from both lists plus the clusters
  created since the older list, its best partner is certified when it beats that bound;
  otherwise one exact pass over all live clusters settles it (a "refresh").
* Clusters whose partner was ``i`` or ``j`` look again: their list entries that are still alive
  and unchanged, plus the clusters created since their list, certified against their ``t``, or
  refreshed.

Every cosine that decides anything is a float64 dot product of float64 unit vectors (clipped to
``[-1, 1]``), as in ``neighbours``.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from protoad_jax.neighbours import candidate_lists

LIST_LENGTH = 32


class MergeStats(dict):
    """Counters of one merge run: ``merges``, ``refreshes`` (exact passes over all clusters)."""


def merge_closest(sums: np.ndarray, counts: np.ndarray, k: int, *, list_length: int = LIST_LENGTH,
                  chunk_size: int = 1024, precision: str = "float32", mesh: Mesh | None = None,
                  stats: dict | None = None) -> np.ndarray:
    """Merges the closest pair of clusters (cosine of their means) until ``k`` remain.

    Args:
      sums: ``[m, d]`` sums of each cluster's original members (float64 preferred).
      counts: ``[m]`` member counts (> 0).
      k: clusters to keep, ``1 <= k <= m``.
      list_length: candidate-list length ``L``.
      chunk_size, precision, mesh: the initial candidate pass (``neighbours.candidate_lists``).
      stats: if given, filled with ``merges`` and ``refreshes``.

    Returns:
      ``[m]`` int32 label in ``[0, k)`` of each input cluster; labels numbered in order of the
      lowest input cluster of each merged group.

    Raises:
      ValueError: bad ``k``, shapes, or a zero sum (no direction).
    """
    sums = np.array(sums, np.float64)  # a copy: merged in place
    m = sums.shape[0]
    counts = np.asarray(counts, np.float64).copy()
    if counts.shape != (m,):
        raise ValueError(f"merge_closest: counts must be [{m}], got {counts.shape}")
    if not 1 <= int(k) <= m:
        raise ValueError(f"merge_closest: k must be in [1, {m}], got {k}")
    k = int(k)
    owner = np.arange(m)
    merges = refreshes = 0
    if k < m:
        norms = np.sqrt(np.einsum("nd,nd->n", sums, sums))
        if not (norms > 0).all():
            raise ValueError("merge_closest: a cluster mean is zero (no direction for the cosine)")
        state = _State(sums, norms, list_length, chunk_size, precision, mesh)
        for step in range(1, m - k + 1):
            i, j = state.closest_pair()
            owner[j] = i
            state.merge(i, j, step)
            merges += 1
        refreshes = state.refreshes
    if stats is not None:
        stats.update(merges=merges, refreshes=refreshes)
    while True:  # follow merge chains to the surviving slot
        nxt = owner[owner]
        if np.array_equal(nxt, owner):
            break
        owner = nxt
    alive = owner == np.arange(m)
    rank = np.cumsum(alive) - 1  # slots keep the order of their lowest member
    return rank[owner].astype(np.int32)


class _State:
    """The live clusters, their partners and candidate lists (see the module docstring)."""

    def __init__(self, sums, norms, list_length, chunk_size, precision, mesh):
        m = len(sums)
        self.sums, self.norms = sums, norms
        self.unit = sums / norms[:, None]
        self.alive = np.ones(m, bool)
        self.ctime = np.zeros(m, np.int64)  # step at which the slot's cluster was made
        self.tau = np.zeros(m, np.int64)  # step at which the slot's list was made
        self.log = np.full(m, -1, np.int64)  # log[step] = slot of the cluster made at that step
        self.where = np.full(m, -1, np.int64)  # scratch: position of a slot in an array
        idx, sim, self.t = candidate_lists(self.unit, list_length, chunk_size=chunk_size,
                                           precision=precision, mesh=mesh)
        self.lidx, self.lsim = idx, sim
        self.rev: dict[int, set[int]] = {}  # q -> clusters whose list held q (checked on use)
        for r in range(m):
            self._index_list(r)
        self.best = np.full(m, -1, np.int64)
        self.bsim = np.full(m, -np.inf)
        self.refreshes = 0
        certified = sim[:, 0] > self.t
        self.best[certified] = self._lowest_top(idx[certified], sim[certified])
        self.bsim[certified] = sim[certified, 0]
        self._refresh(np.flatnonzero(~certified), 0)

    # -- exact float64 pieces and lists

    def _cos(self, rows: np.ndarray, x: int) -> np.ndarray:
        return np.clip(self.unit[rows] @ self.unit[x], -1.0, 1.0)

    @staticmethod
    def _lowest_top(idx: np.ndarray, sim: np.ndarray) -> np.ndarray:
        """Per row, the lowest index among the entries equal to the row's maximum."""
        top = sim.max(axis=1, keepdims=True)
        return np.where(sim == top, idx, np.iinfo(np.int64).max).min(axis=1)

    def _index_list(self, r: int) -> None:
        for q in self.lidx[r]:
            if q < 0:
                break
            self.rev.setdefault(int(q), set()).add(r)

    def _set_list(self, r: int, idx: np.ndarray, sim: np.ndarray, t: float, now: int) -> None:
        """List of ``r``: the top ``L`` of candidates with exact cosines; ``t`` bounds the rest."""
        length = self.lidx.shape[1]
        order = np.argsort(-sim, kind="stable")
        keep = order[:length]
        self.lidx[r] = -1
        self.lsim[r] = -np.inf
        self.lidx[r, :len(keep)] = idx[keep]
        self.lsim[r, :len(keep)] = sim[keep]
        self.t[r] = max(t, sim[order[length]]) if len(order) > length else t
        self.tau[r] = now
        self._index_list(r)

    def _refresh(self, xs: np.ndarray, now: int) -> None:
        """Exact pass over every live cluster for the clusters ``xs``: partner and list."""
        if len(xs) == 0:
            return
        self.refreshes += len(xs)
        slots = np.arange(len(self.alive))
        for s in range(0, len(xs), 64):
            block = xs[s:s + 64]
            # every slot, read in place (a gather of the live rows would copy m x d per call)
            sim = np.clip(self.unit[block] @ self.unit.T, -1.0, 1.0)  # [b, m]
            sim[:, ~self.alive] = -np.inf
            sim[np.arange(len(block)), block] = -np.inf
            a = np.argmax(sim, axis=1)  # lowest index on ties
            self.best[block] = a
            self.bsim[block] = sim[np.arange(len(block)), a]
            for row, x in zip(sim, block):
                ok = row > -np.inf
                self._set_list(int(x), slots[ok], row[ok], -np.inf, now)

    def _valid_entries(self, x: int) -> tuple[np.ndarray, np.ndarray]:
        idx, sim = self.lidx[x], self.lsim[x]
        ok = idx >= 0
        ok[ok] = self.alive[idx[ok]] & (self.ctime[idx[ok]] <= self.tau[x]) & (idx[ok] != x)
        return idx[ok], sim[ok]

    def _recent(self, since: int, now: int) -> np.ndarray:
        """Live clusters made after step ``since`` (up to ``now``, exclusive)."""
        steps = np.arange(since + 1, now)
        slots = self.log[since + 1:now]
        ok = self.alive[slots] & (self.ctime[slots] == steps)
        return slots[ok]

    def _listed_bound(self, rs: np.ndarray, y: int, y_ctime: int) -> np.ndarray:
        """Upper bounds on ``cos(y, r)`` for clusters ``rs`` whose lists were made after ``y``
        existed: the exact cosine where ``r``'s list holds ``y``, else ``r``'s threshold."""
        ub = self.t[rs].copy()
        holders = self.rev.get(y)
        if holders and len(rs):
            self.where[rs] = np.arange(len(rs))
            for r in holders:
                k = self.where[r]
                if k < 0 or y_ctime > self.tau[r]:
                    continue
                hit = np.flatnonzero(self.lidx[r] == y)
                if len(hit):
                    ub[k] = self.lsim[r, hit[0]]
            self.where[rs] = -1
        return ub

    def _best_from(self, x: int, idx: np.ndarray, sim: np.ndarray, rs: np.ndarray,
                   ub: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Adds the clusters ``rs`` (upper bounds ``ub``) to the candidates of ``x``: exact
        cosines for those that could reach the top ``L`` (or beat ``floor``). Returns the
        candidates and the largest bound left uncomputed."""
        length = self.lidx.shape[1]
        cut = max(floor, np.sort(sim)[-length] if len(sim) >= length else -np.inf)
        need = ub >= cut
        if need.any():
            idx = np.concatenate([idx, rs[need]])
            sim = np.concatenate([sim, self._cos(rs[need], x)])
        return idx, sim, float(ub[~need].max()) if (~need).any() else -np.inf

    # -- the algorithm

    def closest_pair(self) -> tuple[int, int]:
        top = self.bsim.max()
        rs = np.flatnonzero(self.bsim == top)
        lo = np.minimum(rs, self.best[rs])
        hi = np.maximum(rs, self.best[rs])
        first = np.lexsort((hi, lo))[0]
        return int(lo[first]), int(hi[first])

    def _certify(self, x: int, idx: np.ndarray, sim: np.ndarray, bound: float) -> bool:
        """Partner of ``x`` from candidates with exact cosines, if the best beats ``bound``."""
        if len(sim) == 0 or not sim.max() > bound:
            return False
        self.best[x] = self._lowest_top(idx[None, :], sim[None, :])[0]
        self.bsim[x] = sim.max()
        return True

    def merge(self, i: int, j: int, now: int) -> None:
        a, b = self.norms[i], self.norms[j]
        ti, tj, taui, tauj = self.t[i], self.t[j], self.tau[i], self.tau[j]
        ci, cj = self.ctime[i], self.ctime[j]
        old_i, old_j = self._valid_entries(i), self._valid_entries(j)
        recent = self._recent(min(taui, tauj), now)
        recent = recent[(recent != i) & (recent != j)]
        # cos(i, r), cos(j, r) bounds for the recent clusters, before slot i changes
        bi = np.where(self.ctime[recent] <= taui, ti, self._listed_bound(recent, i, ci))
        bj = np.where(self.ctime[recent] <= tauj, tj, self._listed_bound(recent, j, cj))
        # the merged cluster, in slot i
        self.sums[i] += self.sums[j]
        self.norms[i] = np.sqrt(self.sums[i] @ self.sums[i])
        if not self.norms[i] > 0:
            raise ValueError("merge_closest: a merged cluster mean is zero (no direction)")
        n_new = self.norms[i]
        self.unit[i] = self.sums[i] / n_new
        self.alive[j] = False
        self.bsim[j] = -np.inf
        self.ctime[i] = now
        self.log[now] = i
        stale = np.flatnonzero(self.alive & ((self.best == i) | (self.best == j)))
        stale = stale[stale != i]

        cand = np.union1d(old_i[0], old_j[0])
        cand = cand[self.alive[cand] & (cand != i)]
        in_lists = np.isin(recent, cand)
        old_bound = -np.inf if (ti == -np.inf or tj == -np.inf) else (a * ti + b * tj) / n_new
        ub = np.where((bi == -np.inf) | (bj == -np.inf), -np.inf, (a * bi + b * bj) / n_new)
        idx, sim, left = self._best_from(i, cand, self._cos(cand, i), recent[~in_lists],
                                         ub[~in_lists], old_bound)
        t_new = max(old_bound, left)
        self._set_list(i, idx, sim, t_new, now)
        refresh = [] if self._certify(i, idx, sim, self.t[i]) else [i]

        for x in stale:
            idx, s = self._valid_entries(x)
            rs = self._recent(self.tau[x], now + 1)
            rs = rs[rs != x]
            ub = self._listed_bound(rs, x, self.ctime[x])
            best = s.max() if len(s) else -np.inf
            idx, s, left = self._best_from(x, idx, s, rs, ub, max(best, self.t[x]))
            if not self._certify(x, idx, s, max(self.t[x], left)):
                refresh.append(x)
        self._refresh(np.asarray(refresh, np.int64), now)
