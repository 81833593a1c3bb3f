"""FINCH against the authors' algorithm (tests/finch_oracle.py, float64, exact neighbours), on
real-photo patch embeddings and on synthetic data with near-duplicates and exact duplicates; and
the exact-tie rule (copies settled by index, docs/METHOD.md section 2) on its own."""

from __future__ import annotations

import numpy as np
import pytest
from finch_oracle import authors_finch, canonical, member_means
from sklearn.datasets import load_sample_images

from protoad_jax import pipeline, weights
from protoad_jax.clustering import merging
from protoad_jax.clustering.finch import finch
from protoad_jax.config import Config
from protoad_jax.datasets import demo


@pytest.fixture(scope="module")
def photo_patches() -> np.ndarray:
    """1,800 patch embeddings of crops of scikit-learn's sample photographs (random-init
    wide_resnet50_2, float16 as the pipeline stores them), seeded."""
    net = weights.random_backbone("wide_resnet50_2", "test")
    crops = demo.photo_crops(load_sample_images().images, 2, seed=3)
    x = pipeline.extract_patches(crops, net.variables, Config(max_patches=None), batch_size=2,
                                 progress=False)
    rows = np.sort(np.random.default_rng(0).choice(len(x), 1800, replace=False))
    return x[rows].astype(np.float16)


def near_duplicates(seed: int = 0) -> np.ndarray:
    """Blobs of mixed spread, exact duplicates (a blank region) and near-duplicates whose
    cosine differs from a copy's by ~1e-8."""
    rng = np.random.default_rng(seed)
    n, d = 1500, 24
    centres = rng.normal(size=(40, d)) * 3 + 1
    spread = rng.choice([0.05, 0.3, 1.0], n)[:, None]
    x = centres[rng.integers(0, 40, n)] + rng.normal(size=(n, d)) * spread
    x[50:70] = x[7]  # exact duplicates
    x[300:305] = x[301] + rng.normal(size=(5, d)) * 1e-7  # near-duplicates
    return x.astype(np.float32)


def assert_same_hierarchy(res, parts, counts, what):
    print(f"{what}: authors {counts}, protoad_jax {res.num_clusters}")
    assert res.num_clusters == counts, f"{what}: levels differ"
    for level, (got, want) in enumerate(zip(res.partitions, parts)):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want, err_msg=f"{what}: level {level} partition")


@pytest.mark.parametrize("early_exit", [True, False])
def test_photo_patches_equal_authors(photo_patches, early_exit):
    x = photo_patches
    x64 = x.astype(np.float64)
    base = finch(x, ensure_early_exit=early_exit, chunk_size=700)
    parts, counts, _, min_sim = authors_finch(x64, ensure_early_exit=early_exit)
    assert_same_hierarchy(base, parts, counts, f"photo, early_exit={early_exit}")
    if early_exit:
        print(f"min_sim {base.min_sim!r} vs authors {min_sim!r}")
        assert abs(base.min_sim - min_sim) <= 1e-12
    else:
        assert base.min_sim is None
    for level, means in enumerate(base.means):
        err = np.abs(means - member_means(x64, parts[level])).max()
        assert means.dtype == np.float32 and err < 1e-6, f"level {level} means error {err}"
    # K: a level's count, a few merges from the coarsest level, and many from level 0 (the
    # brute-force oracle recomputes every mean per merge: K > the level-0 count is tested on
    # low-dimensional data below).
    ks = sorted({counts[-1], max(counts[-1] - 7, 1), (counts[0] + counts[min(1, len(counts) - 1)]) // 2})
    for k in ks:
        res = finch(x, num_clusters=k, ensure_early_exit=early_exit, chunk_size=700)
        want = authors_finch(x64, req_clust=k, ensure_early_exit=early_exit)[2]
        got = res.required_labels
        print(f"K={k}: from level {res.required_level}, mismatches {(got != want).sum()}")
        np.testing.assert_array_equal(got, want, err_msg=f"K={k}")
        assert len(np.unique(got)) == k and res.required_means.shape == (k, x.shape[1])
        err = np.abs(res.required_means - member_means(x64, want)).max()
        assert err < 1e-6, f"K={k}: means error {err}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("early_exit", [True, False])
def test_near_duplicates_equal_authors(seed, early_exit):
    x = near_duplicates(seed)
    x64 = x.astype(np.float64)
    parts, counts, _, _ = authors_finch(x64, ensure_early_exit=early_exit)
    res = finch(x, ensure_early_exit=early_exit, chunk_size=256)
    assert_same_hierarchy(res, parts, counts, f"near-duplicates seed {seed}")
    assert res.stats["levels"][0]["duplicates"] >= 20
    for k in (counts[-1], 7, 1200):
        got = finch(x, num_clusters=k, ensure_early_exit=early_exit, chunk_size=256)
        want = authors_finch(x64, req_clust=k, ensure_early_exit=early_exit)[2]
        np.testing.assert_array_equal(got.required_labels, want, err_msg=f"K={k}")


def test_early_exit_cuts_change_the_hierarchy():
    """Tight pairs far apart: level 0 links are short, so the cut stops the merging of the
    pairs (the authors' early exit), while without it they merge further."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(60, 16))
    x = np.repeat(centres, 2, axis=0) + rng.normal(size=(120, 16)) * 1e-3
    on, off = finch(x), finch(x, ensure_early_exit=False)
    for flag, res in ((True, on), (False, off)):
        assert_same_hierarchy(res, *authors_finch(x, ensure_early_exit=flag)[:2], f"pairs {flag}")
    assert on.num_clusters == [60] and len(off.num_clusters) > 1


def test_results_do_not_depend_on_chunk_or_precision():
    x = near_duplicates(2)
    ref = finch(x, num_clusters=9, chunk_size=4096)
    for kw in ({"chunk_size": 97}, {"chunk_size": 300, "precision": "bfloat16"}):
        res = finch(x, num_clusters=9, **kw)
        assert res.num_clusters == ref.num_clusters, kw
        for a, b in zip(res.partitions + [res.required_labels],
                        ref.partitions + [ref.required_labels]):
            np.testing.assert_array_equal(a, b, err_msg=str(kw))
        for a, b in zip(res.means, ref.means):
            np.testing.assert_array_equal(a, b)


def test_bad_input_and_edge_cases():
    x = near_duplicates(3)[:50]
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        finch(bad)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="finite"):
        finch(bad)
    with pytest.raises(ValueError, match="at least 2|n >= 2"):
        finch(x[:1])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        finch(x[0])
    for k in (0, 51, 2.5):
        with pytest.raises(ValueError, match="num_clusters"):
            finch(x, num_clusters=k)
    zero = x.copy()
    zero[4] = 0
    with pytest.raises(ValueError, match="all zeros"):
        finch(zero)
    # Two samples: mutual neighbours, one cluster at level 0, no level above.
    two = finch(x[:2], num_clusters=2)
    assert two.num_clusters == [1] and two.required_labels.tolist() == [0, 1]
    # Ten identical samples: one cluster at level 0 (distance exactly 0: min_sim 0). K = 3 merges
    # the samples themselves; all are copies, so by the exact-tie rule sample 0 absorbs samples
    # 1..7 in index order (7 = 10 - 3 merges) and 8, 9 stay alone, on every CPU (issue 16: the
    # last bit of a mean had made it [0 0 0 0 0 0 0 1 1 2] on one CPU).
    same = np.repeat(x[:1], 10, axis=0)
    res = finch(same, num_clusters=3)
    assert res.num_clusters == [1] and res.required_level == -1 and res.min_sim == 0.0
    assert res.stats["merge"]["copies"] == 7
    np.testing.assert_array_equal(res.required_labels, [0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    np.testing.assert_array_equal(authors_finch(same.astype(np.float64), req_clust=3)[2],
                                  [0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    for k in range(1, 11):  # K clusters: samples 0..10-K together, then one each
        want = [0] * (11 - k) + list(range(1, k))
        np.testing.assert_array_equal(finch(same, num_clusters=k).required_labels, want)


# ----------------------------------------------------------------------------- exact ties


def copies_first(first: np.ndarray, k: int) -> np.ndarray:
    """The exact-tie rule, transcribed for ``n - k`` at most the number of copies beyond the
    first: the lowest tied pair merges each time, i.e. groups of copies in order of their first
    copy (``first[i]``: the first copy of row i), each absorbing its other copies in index
    order."""
    n = len(first)
    labels = np.arange(n)
    for _ in range(n - k):
        tied = [(labels[first[j]], labels[j]) for j in range(n) if labels[j] != labels[first[j]]]
        i, j = min(tied)  # the lowest pair of clusters that are copies of one row
        labels[labels == j] = i
    return canonical(labels)


def with_copies(n: int = 120, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct random rows with groups of copies (multiplicities 2, 3, 4, 6, 9) scattered over
    the samples, the first copy not always the earliest group; and for each row its first copy."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) + 0.3).astype(np.float32)
    first = np.arange(n)
    free = rng.permutation(n)
    for size in (3, 9, 2, 6, 4):
        rows, free = np.sort(free[:size]), free[size:]
        x[rows] = x[rows[0]]
        first[rows] = rows[0]
    return x, first


def test_exact_ties_hand_made():
    """Five distinct rows A..E as A B A C B A D C A E: copies of A at 0 2 5 8, B at 1 4, C at 3
    7. The rule merges 0-2, 0-5, 0-8 (A, the lowest group), then 1-4 (B), then 3-7 (C)."""
    rng = np.random.default_rng(1)
    a, b, c, d, e = rng.normal(size=(5, 8)).astype(np.float32)
    x = np.stack([a, b, a, c, b, a, d, c, a, e])
    want = {9: [0, 1, 0, 2, 3, 4, 5, 6, 7, 8], 8: [0, 1, 0, 2, 3, 0, 4, 5, 6, 7],
            7: [0, 1, 0, 2, 3, 0, 4, 5, 0, 6], 6: [0, 1, 0, 2, 1, 0, 3, 4, 0, 5],
            5: [0, 1, 0, 2, 1, 0, 3, 2, 0, 4]}
    for k, labels in want.items():
        res = finch(x, num_clusters=k)
        print(f"K={k}: {res.required_labels.tolist()} (level 0: {res.num_clusters[0]} clusters)")
        assert res.required_level == -1 and res.stats["merge"]["copies"] == 10 - k
        np.testing.assert_array_equal(res.required_labels, labels, err_msg=f"K={k}")
        np.testing.assert_array_equal(copies_first(np.array([0, 1, 0, 3, 1, 0, 6, 3, 0, 9]), k),
                                      labels)
        np.testing.assert_array_equal(authors_finch(x.astype(np.float64), req_clust=k)[2], labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_ties_copies_merge_first_by_index(seed):
    x, first = with_copies(seed=seed)
    n, copies = len(x), int((first != np.arange(len(x))).sum())  # 19 merges of copies
    level0 = finch(x).num_clusters[0]
    u = n - copies  # distinct rows
    assert level0 < u - 5
    # K reached among the copies: the rule alone; all copies merged: one cluster per distinct
    # row; below that the float64 merging of the distinct rows, from the rule's start (oracle).
    for k in (n - 1, n - 7, n - 18, u, u - 5):
        res = finch(x, num_clusters=k, chunk_size=50)
        want = (copies_first(first, k) if k >= u else
                authors_finch(x.astype(np.float64), req_clust=k)[2])
        print(f"seed {seed} K={k}: {res.stats['merge']}, mismatches "
              f"{(res.required_labels != want).sum()}")
        np.testing.assert_array_equal(res.required_labels, want, err_msg=f"K={k}")
        assert res.stats["merge"]["copies"] == min(n - k, copies)
        if k == u:
            np.testing.assert_array_equal(res.required_labels, canonical(first))
        # rounding cannot move it: exact scalings by powers of two, other chunks, bfloat16
        for scale, kw in ((2.0 ** -7, {}), (2.0 ** 9, {"chunk_size": 17}),
                          (1.0, {"precision": "bfloat16", "chunk_size": 33})):
            other = finch(x * np.float32(scale), num_clusters=k, **kw).required_labels
            np.testing.assert_array_equal(other, want, err_msg=f"K={k} x{scale} {kw}")


def test_exact_ties_do_not_depend_on_cosine_rounding(monkeypatch):
    """Every float64 cosine of the merging lowered by 0 to 3 units of 2^-50 at random (far more
    than any CPU's rounding): the labels of the copies' merges stay the rule's. Without the rule
    (merge_closest not told of the copies) the same noise moves the labels of ten identical
    samples, so the noise does reach the decisions the rule takes out of arithmetic."""
    rng = np.random.default_rng(0)
    cos, lists = merging._State._cos, merging.candidate_lists

    def noisy_cos(self, rows, x):
        return cos(self, rows, x) - rng.integers(0, 4, len(rows)) * 2.0 ** -50

    def noisy_lists(*a, **kw):
        idx, sim, t = lists(*a, **kw)
        sim = sim - rng.integers(0, 4, sim.shape) * 2.0 ** -50
        order = np.argsort(-sim, axis=1, kind="stable")
        return np.take_along_axis(idx, order, 1), np.take_along_axis(sim, order, 1), t

    monkeypatch.setattr(merging._State, "_cos", noisy_cos)
    monkeypatch.setattr(merging, "candidate_lists", noisy_lists)
    x, first = with_copies(seed=2)
    u = len(x) - int((first != np.arange(len(x))).sum())
    for k in (len(x) - 4, u, u - 5):  # the last: float64 merges (gaps >> the noise) as well
        want = (copies_first(first, k) if k >= u else
                authors_finch(x.astype(np.float64), req_clust=k)[2])
        np.testing.assert_array_equal(finch(x, num_clusters=k).required_labels, want,
                                      err_msg=f"K={k}")
    same = np.repeat(x[:1].astype(np.float64), 10, axis=0)
    rule = [0, 0, 0, 0, 0, 0, 0, 0, 1, 2]
    without = [merging.merge_closest(same, np.ones(10), 3).tolist() for _ in range(6)]
    print("ten copies, K=3, without the rule under noise:", without)
    assert any(w != rule for w in without)
    for _ in range(6):
        np.testing.assert_array_equal(
            merging.merge_closest(same, np.ones(10), 3, copies=np.zeros(10, int)), rule)
