"""The projection screen's bound is never below the float64 cosine it stands in for (the oracle:
float64 unit vectors, dot product, clipped), also for near-duplicates and at the float32 edge,
and its squared-distance limit keeps every row whose bound reaches the cut."""

from __future__ import annotations

import numpy as np
import pytest

from protoad_jax.clustering.screen import SCREEN_DIMS, ProjectionScreen


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows(d, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    x = np.abs(centres[rng.integers(0, 6, 400)] + 0.2 * rng.normal(size=(400, d)))
    x[100:140] = x[99] + 1e-7 * rng.normal(size=(40, d))  # near-duplicates: cosines ~1 - 1e-14
    x[140:150] = x[99]  # exact duplicates
    return _unit(x)


@pytest.mark.parametrize("d,dims", [(1792, 64), (1792, 8), (300, 1), (40, 64)])
def test_bound_never_below_float64_cosine(d, dims):
    u = _rows(d, d + dims)
    screen = ProjectionScreen(u, dims)
    proj, sq = screen.project(u)
    exact = np.clip(u @ u.T, -1.0, 1.0)
    d2 = np.stack([screen.d2(proj, sq, proj[i], sq[i]) for i in range(len(u))])  # one query
    d2_block = screen.d2(proj, sq, proj, sq)  # all queries at once (a gemm: other rounding)
    bound = screen.bound(d2)
    for name, gap in (("row", bound - exact), ("block", screen.bound(d2_block) - exact)):
        print(f"d={d} p={dims} {name}: min(bound - cos) {gap.min():.3e} (tolerance: >= 0), "
              f"median {np.median(gap):.3e}; pairs with bound < 0.99: {(bound < 0.99).mean():.3f}")
        assert gap.min() >= 0.0
    # limit(cut): every row whose bound reaches the cut passes; dead rows (inf) never do
    for cut in (-np.inf, 0.5, float(np.median(bound)), 0.999999, 1.0, 1.5):
        lim = screen.limit(cut)
        assert ((bound >= cut) <= (d2 <= lim)).all()
        assert not np.float32(np.inf) <= lim
    assert screen.bound(np.float32(np.inf)) == -np.inf


def test_screen_rules_pairs_out_on_patch_like_data():
    # rows spread over 64 directions in 1792-d: the 64 principal axes hold most of the spread,
    # so most pairs get a bound far below their nearest neighbours' cosines
    u = _rows(1792, 1)
    screen = ProjectionScreen(u)
    proj, sq = screen.project(u)
    bound = screen.bound(screen.d2(proj, sq, proj[0], sq[0]))
    exact = np.clip(u @ u[0], -1.0, 1.0)
    tenth = np.sort(exact)[-11]
    kept = (bound >= tenth).mean()
    print(f"rows the screen keeps for the 10th-neighbour cut: {kept:.3f}")
    assert kept < 0.5


def test_bad_dims():
    with pytest.raises(ValueError, match="dims"):
        ProjectionScreen(np.eye(3), SCREEN_DIMS + 1)


def test_few_rows_fewer_axes_still_a_bound():
    u = _rows(1792, 3)[:20]
    screen = ProjectionScreen(u)
    proj, sq = screen.project(u)
    gap = screen.bound(screen.d2(proj, sq, proj, sq)) - np.clip(u @ u.T, -1.0, 1.0)
    print(f"20 rows: {proj.shape[1]} axes, min(bound - cos) {gap.min():.3e} (tolerance: >= 0)")
    assert proj.shape == (20, 20) and gap.min() >= 0.0
