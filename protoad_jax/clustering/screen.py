"""Upper bounds on cosine similarities from a low-dimensional float32 projection.

For unit vectors ``x, y`` and any matrix ``P`` with orthonormal columns,
``cos(x, y) = 1 - |x - y|^2 / 2 <= 1 - |P^T (x - y)|^2 / 2``: the distance in a projection never
exceeds the true one. With ``P`` the ``p`` leading principal axes of the data (``p = 64`` of
1792 patch dimensions), the bound rules out almost every pair that cannot matter while reading
``p`` float32 values a row instead of ``d`` float64 ones; ``merging`` computes exact cosines only
for the rows it cannot rule out.

Rounding. Projections and squared distances ``D2`` are float32. The bound used is
``1 + 1e-9 - max(0, D2 - 3e-5) / (2 g)`` with ``g = 1 + p max|P^T P - I|`` (``>= ||P||^2``):
rounding the projections to float32 moves ``D`` by at most ``2^-23``, the float32 expansion
``|a|^2 + |b|^2 - 2 a.b`` errs by at most ``2 (p + 2) 2^-24 (|a| + |b|)^2 < 2e-5`` for ``p <= 64``
(squared norms rounded to float32 add less than ``1e-7``), and the float64 cosine of computed
unit vectors exceeds ``1 - |x - y|^2 / 2`` by less than ``1e-12``. So the bound is never below
the float64 cosine ``clip(u_x . u_y, -1, 1)`` that ``merging`` and ``neighbours`` decide with.
A row whose squared norm is ``inf`` (``merging`` marks dead clusters so) has ``D2 = inf`` and
bound ``-inf``.
"""

from __future__ import annotations

import numpy as np

SCREEN_DIMS = 64  # the error analysis above holds for p <= 64
_D2_SLACK = 3e-5  # float32 error of a squared projected distance, p <= 64
_COS_SLACK = 1e-9  # float64 cosine vs 1 - |x - y|^2 / 2, with room to spare
_PCA_ROWS = 8192  # rows the principal axes are estimated from


class ProjectionScreen:
    """Float32 projections of unit vectors on ``p <= 64`` orthonormal axes (the principal axes
    of ``unit``, estimated from up to 8,192 evenly spaced rows, fewer axes when there are fewer
    rows; the identity when ``d <= p``).

    Callers filter on squared distances (``d2``, ``limit``) and make bounds (``bound``) only for
    the rows they keep."""

    def __init__(self, unit: np.ndarray, dims: int = SCREEN_DIMS):
        if not 1 <= int(dims) <= SCREEN_DIMS:
            raise ValueError(f"ProjectionScreen: dims must be in [1, {SCREEN_DIMS}], got {dims}")
        m, d = unit.shape
        if d <= dims:
            basis = np.eye(d)
        else:
            rows = unit[np.linspace(0, m - 1, min(m, _PCA_ROWS)).astype(np.int64)]
            centred = rows - rows.mean(axis=0)
            if len(rows) < d:  # few rows: O(rows^2 d), and at most rows - 1 axes carry spread
                basis = np.linalg.svd(centred, full_matrices=False)[2][:dims].T
            else:
                _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
                basis = vectors[:, ::-1][:, :dims]
            basis = np.ascontiguousarray(basis)
        err = np.abs(basis.T @ basis - np.eye(basis.shape[1])).max()
        self.basis = basis
        self.half_gain = 0.5 / (1.0 + basis.shape[1] * err)

    def project(self, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float32 projections and their squared norms (float32)."""
        proj = (unit @ self.basis).astype(np.float32)
        sq = np.einsum("...p,...p->...", proj.astype(np.float64), proj.astype(np.float64))
        return proj, np.asarray(sq, np.float32)

    @staticmethod
    def d2(proj: np.ndarray, sq: np.ndarray, q: np.ndarray, q_sq) -> np.ndarray:
        """Float32 squared distances of the rows ``proj`` to ``q`` (``[p]``; or ``[b, p]`` for
        ``b`` queries, giving ``[b, n]``)."""
        out = q @ proj.T
        out *= -2.0
        out += sq
        out += q_sq[:, None] if q.ndim == 2 else q_sq
        return out

    def bound(self, d2) -> np.ndarray:
        """Upper bounds on the float64 cosines of rows at squared distances ``d2``."""
        return 1.0 + _COS_SLACK - np.maximum(np.asarray(d2, np.float64) - _D2_SLACK,
                                             0.0) * self.half_gain

    def limit(self, cut: float) -> np.float32:
        """The largest float32 ``D2`` whose bound can reach ``cut`` (rounded up; finite, so rows
        at ``inf`` never pass)."""
        if cut == -np.inf:
            return np.finfo(np.float32).max
        lim = max((1.0 + _COS_SLACK - cut) / self.half_gain + _D2_SLACK, -1.0)
        out = np.float32(lim)
        return out if out >= lim else np.nextafter(out, np.float32(np.inf))
