"""FINCH against the authors' algorithm (tests/finch_oracle.py, float64, exact neighbours), on
real-photo patch embeddings and on synthetic data with near-duplicates and exact duplicates."""

from __future__ import annotations

import numpy as np
import pytest
from finch_oracle import authors_finch, canonical, member_means

from protoad_jax import evaluation, pipeline, weights
from protoad_jax.datasets import demo
from protoad_jax.config import Config
from protoad_jax.clustering.finch import finch


@pytest.fixture(scope="module")
def photo_patches() -> np.ndarray:
    """1,800 patch embeddings of crops of scikit-learn's sample photographs (random-init
    wide_resnet50_2, float16 as the pipeline stores them), seeded."""
    net = weights.random_backbone("wide_resnet50_2", "test")
    crops = demo.photo_crops(2, seed=3)
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
    # All-identical samples: one cluster; K > 1 merges identical samples, lowest pairs first.
    same = np.repeat(x[:1], 10, axis=0)
    res = finch(same, num_clusters=3)
    assert res.num_clusters == [1] and res.required_level == -1
    want = authors_finch(same.astype(np.float64), req_clust=3)[2]
    np.testing.assert_array_equal(res.required_labels, want)
    assert len(np.unique(res.required_labels)) == 3
    np.testing.assert_array_equal(res.required_labels, canonical(res.required_labels))
