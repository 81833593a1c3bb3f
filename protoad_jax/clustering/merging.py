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
  otherwise one pass over all live clusters settles it (a "refresh").
* Clusters whose partner was ``i`` or ``j`` look again: their list entries that are still alive
  and unchanged, plus the clusters created since their list, certified against their ``t``, or
  refreshed.

Screen. Clusters created since a list, and a refresh's pass over all clusters, are first bounded
by ``screen.ProjectionScreen`` (float32 projections on the 64 principal axes: a proven upper
bound on each float64 cosine), kept by slot and in creation order, so the clusters created since
a step are one contiguous slice (a dead cluster's squared norm is ``inf``). Only candidates whose
bound reaches the cut get an exact cosine (at most ``4 L`` per batch, highest bounds first; the
largest bound left out joins the list's ``t``). The merges do not depend on the screen, only the
number of exact cosines does.

Every cosine that decides anything is a float64 dot product of float64 unit vectors (clipped to
``[-1, 1]``), as in ``neighbours``.

Exact ties (docs/METHOD.md section 2). Clusters the caller declares ``copies`` (exactly equal
means, e.g. copies of one sample: ``neighbours.duplicate_groups``) are settled by index before
any arithmetic, so the result is the same bit for bit on every CPU: their cosine is exactly 1,
the largest there is, so they merge before any other pair, lowest pair first (group by group in
order of the group's first cluster, which absorbs the others in index order). Computed as
``sum / count`` and dot products, equal means may differ in the last bit with the count and the
SIMD summation order, and which tied pair looked closest would change with the CPU. A group of
copies merged whole has the sum ``total count * (sum / count of its first cluster)``: the first
cluster's mean, so the other copies' float sums never enter a decision. Equal float64 cosines
between other pairs go to the lowest pair, as float64 decides them.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from protoad_jax.clustering.neighbours import candidate_lists
from protoad_jax.clustering.screen import SCREEN_DIMS, ProjectionScreen

LIST_LENGTH = 32
_REFRESH_BLOCK = 64


def host_bytes(m: int, d: int) -> int:
    """Host memory ``merge_closest`` holds for ``m`` clusters in ``d`` dimensions, estimated:
    the float64 sums and unit vectors, the initial candidate pass's float64 and float32 copies
    (two of the latter on a CPU device), the lists and the screen's projections (the caller's own
    ``sums`` not counted)."""
    return m * d * (3 * 8 + 2 * 4) + m * 2000


def merge_closest(sums: np.ndarray, counts: np.ndarray, k: int, *,
                  copies: np.ndarray | None = None, list_length: int = LIST_LENGTH,
                  screen_dims: int = SCREEN_DIMS, chunk_size: int = 1024,
                  precision: str = "float32", mesh: Mesh | None = None,
                  stats: dict | None = None) -> np.ndarray:
    """Merges the closest pair of clusters (cosine of their means) until ``k`` remain.

    Args:
      sums: ``[m, d]`` sums of each cluster's original members (float64 preferred).
      counts: ``[m]`` member counts (> 0).
      k: clusters to keep, ``1 <= k <= m``.
      copies: ``[m]`` int, for each cluster the lowest-numbered cluster with exactly the same mean
        (itself when none): exact ties, settled by index before any arithmetic (module
        docstring). None: none declared.
      list_length: candidate-list length ``L``.
      screen_dims: ``p``, dimensions of the projection that bounds cosines before exact ones
        (1 to 64; any value gives the same merges, only the speed changes).
      chunk_size, precision, mesh: the initial candidate pass (``neighbours.candidate_lists``).
      stats: if given, filled with ``merges``, ``copies`` (those of them settled by index),
        ``refreshes`` and ``exact`` (exact cosines computed after the initial pass).

    Returns:
      ``[m]`` int32 label in ``[0, k)`` of each input cluster; labels numbered in order of the
      lowest input cluster of each merged group.

    Raises:
      ValueError: bad ``k``, shapes, ``screen_dims``, ``copies``, or a zero sum (no direction).
    """
    sums = np.array(sums, np.float64)  # a copy: merged in place
    m = sums.shape[0]
    counts = np.asarray(counts, np.float64).copy()
    if counts.shape != (m,):
        raise ValueError(f"merge_closest: counts must be [{m}], got {counts.shape}")
    if not 1 <= int(k) <= m:
        raise ValueError(f"merge_closest: k must be in [1, {m}], got {k}")
    if not 1 <= int(screen_dims) <= SCREEN_DIMS:
        raise ValueError(f"merge_closest: screen_dims must be in [1, {SCREEN_DIMS}], "
                         f"got {screen_dims}")
    k = int(k)
    ids = np.arange(m)
    owner = ids.copy()
    counters = {"merges": m - k, "copies": 0, "refreshes": 0, "exact": 0}
    todo = m - k
    live = ids  # the clusters whose merges float64 decides
    if copies is not None:
        copies = np.asarray(copies)
        if copies.shape != (m,) or not np.issubdtype(copies.dtype, np.integer) or not (
                (copies >= 0) & (copies <= ids)).all() or not (copies[copies] == copies).all():
            raise ValueError(f"merge_closest: copies must be [{m}] ints, each a group's lowest "
                             "cluster (copies[i] <= i, copies[copies[i]] == copies[i])")
        # Exact ties first, by index: groups in order of their first cluster, each absorbing its
        # other clusters in index order (the lowest tied pair, again and again).
        later = np.flatnonzero(copies != ids)
        later = later[np.lexsort((later, copies[later]))][:todo]
        owner[later] = copies[later]
        todo -= len(later)
        counters["copies"] = len(later)
        if todo:  # every group merged whole: the first cluster's mean times the total count
            live = np.flatnonzero(copies == ids)
            total = np.bincount(copies, weights=counts, minlength=m)
            group = live[np.bincount(copies, minlength=m)[live] > 1]
            sums[group] = sums[group] / counts[group, None] * total[group, None]
    if todo:
        norms = np.sqrt(np.einsum("nd,nd->n", sums, sums))
        if not (norms > 0).all():
            raise ValueError("merge_closest: a cluster mean is zero (no direction for the cosine)")
        if len(live) < m:  # the merged groups' other clusters leave
            sums, norms = sums[live], norms[live]
        state = _State(sums, norms, todo, list_length, int(screen_dims), chunk_size, precision,
                       mesh)
        for step in range(1, todo + 1):
            i, j = state.closest_pair()
            owner[live[j]] = live[i]  # live is ascending: slot order is cluster order
            state.merge(i, j, step)
        counters.update(refreshes=state.refreshes, exact=state.exact)
    if stats is not None:
        stats.update(counters)
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

    def __init__(self, sums, norms, merges, list_length, dims, chunk_size, precision, mesh):
        m = len(sums)
        self.sums, self.norms = sums, norms
        self.unit = sums / norms[:, None]
        self.alive = np.ones(m, bool)
        self.ctime = np.zeros(m, np.int64)  # step at which the slot's cluster was made
        self.tau = np.zeros(m, np.int64)  # step at which the slot's list was made
        self.log = np.full(merges + 1, -1, np.int64)  # log[step] = slot of the cluster made then
        self.mark = np.zeros(m, bool)  # scratch
        self.screen = ProjectionScreen(self.unit, dims)
        self.proj, self.sq = self.screen.project(self.unit)  # by slot
        self.proj_log = np.zeros((merges + 1, self.proj.shape[1]), np.float32)  # by step
        self.sq_log = np.full(merges + 1, np.inf, np.float32)  # inf: not made yet, or dead
        idx, sim, self.t = candidate_lists(self.unit, list_length, chunk_size=chunk_size,
                                           precision=precision, mesh=mesh)
        self.lidx, self.lsim = idx, sim
        self.cap = 4 * list_length  # exact cosines per screened batch, at most
        self.best = np.full(m, -1, np.int64)
        self.bsim = np.full(m, -np.inf)
        self.refreshes = self.exact = 0
        certified = sim[:, 0] > self.t
        self.best[certified] = self._lowest_top(idx[certified], sim[certified])
        self.bsim[certified] = sim[certified, 0]
        self._refresh(np.flatnonzero(~certified), 0)

    # -- exact float64 pieces, bounds and lists

    def _cos(self, rows: np.ndarray, x: int) -> np.ndarray:
        self.exact += len(rows)
        return np.clip(self.unit[rows] @ self.unit[x], -1.0, 1.0)

    @staticmethod
    def _lowest_top(idx: np.ndarray, sim: np.ndarray) -> np.ndarray:
        """Per row, the lowest index among the entries equal to the row's maximum."""
        top = sim.max(axis=1, keepdims=True)
        return np.where(sim == top, idx, np.iinfo(np.int64).max).min(axis=1)

    def _screened(self, slots: np.ndarray, d2: np.ndarray, cut: float
                  ) -> tuple[np.ndarray, np.ndarray, float]:
        """Rows whose bound reaches ``cut``: their slots and bounds, and the largest bound of the
        rest (``d2`` is overwritten)."""
        keep = np.flatnonzero(d2 <= self.screen.limit(cut))
        ub = self.screen.bound(d2[keep])
        d2[keep] = np.inf
        return slots[keep], ub, float(self.screen.bound(d2.min(initial=np.inf)))

    def _recent(self, x: int, since: int, until: int, cut: float
                ) -> tuple[np.ndarray, np.ndarray, float]:
        """Live clusters made at steps ``since < step < until`` that the screen cannot rule out
        for ``x`` (bound ``>= cut``), their bounds, and the largest bound of the others: one
        contiguous slice of the creation-order arrays (``x`` itself was made before ``since``
        or is not in the slice)."""
        steps = slice(since + 1, until)
        d2 = self.screen.d2(self.proj_log[steps], self.sq_log[steps], self.proj[x], self.sq[x])
        return self._screened(self.log[steps], d2, cut)

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

    def _refresh(self, xs: np.ndarray, now: int) -> None:
        """One screened pass over every live cluster for each of ``xs``: partner and list."""
        self.refreshes += len(xs)
        slots = np.arange(len(self.alive))
        for s in range(0, len(xs), _REFRESH_BLOCK):
            block = xs[s:s + _REFRESH_BLOCK]
            d2s = self.screen.d2(self.proj, self.sq, self.proj[block], self.sq[block])
            for d2, x in zip(d2s, block):
                x = int(x)
                d2[x] = np.inf
                top = np.argpartition(d2, self.cap)[:self.cap] if len(d2) > self.cap else slots
                top = top[d2[top] < np.inf]
                sim = self._cos(top, x)
                d2[top] = np.inf
                idx, left = top, float(self.screen.bound(d2.min(initial=np.inf)))
                if len(sim) and not sim.max() > left:  # more near ties than the cap
                    more, _, left = self._screened(slots, d2, sim.max())
                    idx = np.concatenate([idx, more])
                    sim = np.concatenate([sim, self._cos(more, x)])
                self._set_list(x, idx, sim, left, now)
                if not self._certify(x, idx, sim, -np.inf):  # the last cluster
                    self.best[x], self.bsim[x] = -1, -np.inf

    def _valid_entries(self, x: int) -> tuple[np.ndarray, np.ndarray]:
        idx, sim = self.lidx[x], self.lsim[x]
        ok = idx >= 0
        ok[ok] = self.alive[idx[ok]] & (self.ctime[idx[ok]] <= self.tau[x]) & (idx[ok] != x)
        return idx[ok], sim[ok]

    def _cut(self, sim: np.ndarray, floor: float) -> float:
        """Below this a candidate can neither beat ``floor`` nor enter a top-``L`` list of
        ``sim`` and itself."""
        length = self.lidx.shape[1]
        return max(floor, np.partition(sim, -length)[-length] if len(sim) >= length else -np.inf)

    def _best_from(self, x: int, idx: np.ndarray, sim: np.ndarray, rs: np.ndarray,
                   ub: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Adds the screened clusters ``rs`` (bounds ``ub``) to the candidates of ``x``: exact
        cosines for at most ``4 L`` of them, highest bounds first. Returns the candidates and the
        largest bound left uncomputed."""
        if len(rs) > self.cap:
            top = np.argpartition(-ub, self.cap - 1)[:self.cap]
            rest = np.ones(len(ub), bool)
            rest[top] = False
            rs, left = rs[top], float(ub[rest].max())
        else:
            left = -np.inf
        if len(rs):
            idx = np.concatenate([idx, rs])
            sim = np.concatenate([sim, self._cos(rs, x)])
        return idx, sim, left

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
        ti, tj = self.t[i], self.t[j]
        since = min(self.tau[i], self.tau[j])
        old_i, old_j = self._valid_entries(i), self._valid_entries(j)
        # the merged cluster, in slot i; the two old ones leave the screen
        self.sq_log[self.ctime[i]] = self.sq_log[self.ctime[j]] = np.inf
        self.sums[i] += self.sums[j]
        self.norms[i] = np.sqrt(self.sums[i] @ self.sums[i])
        if not self.norms[i] > 0:
            raise ValueError("merge_closest: a merged cluster mean is zero (no direction)")
        n_new = self.norms[i]
        self.unit[i] = self.sums[i] / n_new
        self.proj[i], self.sq[i] = self.screen.project(self.unit[i])
        self.proj_log[now], self.sq_log[now] = self.proj[i], self.sq[i]
        self.alive[j] = False
        self.sq[j] = np.inf
        self.bsim[j] = -np.inf
        self.ctime[i] = now
        self.log[now] = i
        stale = np.flatnonzero(self.alive & ((self.best == i) | (self.best == j)))
        stale = stale[stale != i]

        cand = np.union1d(old_i[0], old_j[0])
        cand = cand[self.alive[cand] & (cand != i)]
        sim = self._cos(cand, i)
        old_bound = -np.inf if (ti == -np.inf or tj == -np.inf) else (a * ti + b * tj) / n_new
        recent, ub, left = self._recent(i, since, now, self._cut(sim, old_bound))
        self.mark[cand] = True
        fresh = ~self.mark[recent]
        self.mark[cand] = False
        idx, sim, more = self._best_from(i, cand, sim, recent[fresh], ub[fresh])
        self._set_list(i, idx, sim, max(old_bound, left, more), now)
        refresh = [] if self._certify(i, idx, sim, self.t[i]) else [i]

        for x in stale:
            idx, s = self._valid_entries(x)
            floor = max(s.max() if len(s) else -np.inf, self.t[x])
            rs, ub, left = self._recent(x, self.tau[x], now + 1, self._cut(s, floor))
            idx, s, more = self._best_from(x, idx, s, rs, ub)
            if not self._certify(x, idx, s, max(self.t[x], left, more)):
                refresh.append(x)
        self._refresh(np.asarray(refresh, np.int64), now)
