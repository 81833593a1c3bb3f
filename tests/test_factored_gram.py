"""The factored first-neighbour candidate pass (``neighbours.PatchGrid``: every patch of whole
images; layer1 Gram blocks per patch, layer2 / layer3 Gram blocks per 2 x 2 / 4 x 4 cell, added)
against the unfactored pass on all patches of real photographs: its similarities within the
adjusted bound ``B' = B + 4 rho`` of float64, and the same decisions (first neighbours, their
float64 similarities, FINCH levels and required-K labels), also with copies, tiny candidate
lists (fallbacks), on four devices, and through ``pipeline.fit``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_sample_images

from protoad_jax import pipeline, weights
from protoad_jax.clustering import neighbours
from protoad_jax.clustering.finch import finch
from protoad_jax.clustering.neighbours import PatchGrid
from protoad_jax.config import Config
from protoad_jax.datasets import demo

IMAGES = 3  # 3 x 56 x 56 = 9,408 patches


@pytest.fixture(scope="module")
def net():
    return weights.random_backbone("wide_resnet50_2", "test")


@pytest.fixture(scope="module")
def photos(net) -> tuple[np.ndarray, PatchGrid]:
    """Every patch of 3 crops of scikit-learn's sample photographs (random-init
    wide_resnet50_2, float32 as the pipeline stores them at this size), and their grid."""
    crops = demo.photo_crops(load_sample_images().images, IMAGES, seed=5)
    x = pipeline.extract_patches(crops, net.variables, Config(max_patches=None),
                                 batch_size=IMAGES, progress=False)
    assert x.dtype == np.float32 and x.shape == (IMAGES * 56 * 56, 1792)
    return x, PatchGrid(IMAGES, 56, 56)


def synthetic(images: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Patch embeddings built as the pipeline builds them (stages concatenated after nearest
    upsampling, L2-normalised in float32) from random non-negative stages."""
    rng = np.random.default_rng(seed)
    l2 = np.maximum(rng.normal(size=(images, h // 2, w // 2, 512)), 0)
    l3 = np.maximum(rng.normal(size=(images, h // 4, w // 4, 1024)), 0)
    up2 = np.repeat(np.repeat(l2, 2, 1), 2, 2)
    up3 = np.repeat(np.repeat(l3, 4, 1), 4, 2)
    l1 = np.maximum(rng.normal(size=(images, h, w, 256)), 0) + 2 * up2[..., :256]
    x = np.concatenate([l1, up2, up3], -1).astype(np.float32).reshape(-1, 1792)
    return x / np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float32))[:, None]


def assert_same(a: neighbours.Neighbours, b: neighbours.Neighbours, what: str) -> None:
    print(f"{what}: unfactored bound {a.bound:.4e}, factored {b.factored} bound {b.bound:.4e}; "
          f"re-ranked {a.reranked} / {b.reranked}, fallbacks {a.fallbacks} / {b.fallbacks}, "
          f"exhaustive {a.exhaustive} / {b.exhaustive}, index mismatches "
          f"{(a.index != b.index).sum()}")
    assert not a.factored and b.factored
    np.testing.assert_array_equal(b.index, a.index)
    np.testing.assert_array_equal(b.similarity, a.similarity)
    np.testing.assert_array_equal(b.copies, a.copies)
    assert b.duplicates == a.duplicates


def test_bound_holds_on_photos(photos):
    """|factored approximate - float64| cosine of every kept candidate <= B' (and the residual
    rho a few float32 ulps)."""
    x, grid = photos
    n, c, chunk = len(x), 32, 1024
    order = neighbours.nested_order(grid)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    parts, rho = neighbours._factor(x, order, grid.widths)
    v, idx = neighbours._pair_pass_factored(
        tuple(jnp.asarray(a) for a in parts), jnp.ones(n, bool),
        jnp.asarray(neighbours._chunk_pairs(n, chunk, 1)), chunk=chunk, c=c)
    v, idx = np.asarray(v, np.float64), order[np.asarray(idx)]
    exact = neighbours.cosine64(np.repeat(x[order], c, axis=0), x[idx.reshape(-1)]).reshape(n, c)
    err = np.abs(v - exact).max()
    v0, idx0 = neighbours._pair_pass(jnp.asarray(x), jnp.ones(n, bool),
                                     jnp.asarray(neighbours._chunk_pairs(n, chunk, 1)),
                                     chunk=chunk, c=c, bf16=False)
    exact0 = neighbours.cosine64(np.repeat(x, c, axis=0),
                                 x[np.asarray(idx0).reshape(-1)]).reshape(n, c)
    err0 = np.abs(np.asarray(v0, np.float64) - exact0).max()
    b = neighbours.error_bound(1792, "float32")
    bound = b + 4 * rho
    print(f"rho {rho:.3e} ({rho / 2.0 ** -24:.2f} float32 ulps); max |approx - float64|: "
          f"factored {err:.3e}, unfactored {err0:.3e}; B {b:.4e}, B' {bound:.4e} "
          f"(factored error {err / bound:.2%} of B')")
    assert rho <= 2.0 ** -21 and err <= bound


@pytest.mark.parametrize("chunk,candidates", [(1024, 16), (500, 2)])
def test_first_neighbours_equal_unfactored(photos, chunk, candidates):
    x, grid = photos
    a = neighbours.first_neighbours(x, chunk_size=chunk, candidates=candidates)
    b = neighbours.first_neighbours(x, chunk_size=chunk, candidates=candidates, grid=grid)
    assert_same(a, b, f"chunk {chunk}, c {candidates}")
    if candidates == 2:
        assert b.fallbacks > 0  # the fallback pass (unfactored rows) serves factored lists


def test_copies_equal_unfactored(photos):
    """A whole image repeated (exact copies of every row, first copies in another chunk) and a
    blank-like block: the exact-copy rule is the same on the factored pass."""
    x, grid = photos
    y = x.copy()
    y[2 * 3136:] = x[:3136]
    a = neighbours.first_neighbours(y, chunk_size=1024)
    b = neighbours.first_neighbours(y, chunk_size=1024, grid=grid)
    assert a.duplicates >= 2 * 3136
    assert_same(a, b, "image 0 repeated as image 2")
    assert (b.index[2 * 3136:] == np.arange(3136)).all()


def test_finch_equal_unfactored(photos):
    x, grid = photos
    for k in (1000, None):
        a = finch(x, num_clusters=k)
        b = finch(x, num_clusters=k, grid=grid)
        print(f"K={k}: levels {a.num_clusters} / {b.num_clusters}, min_sim {a.min_sim!r} / "
              f"{b.min_sim!r}, level 0 factored {b.stats['levels'][0]['factored']}")
        assert b.stats["levels"][0]["factored"] and not a.stats["levels"][0]["factored"]
        assert a.num_clusters == b.num_clusters and a.min_sim == b.min_sim
        for p, q in zip(a.partitions, b.partitions):
            np.testing.assert_array_equal(q, p)
        if k is not None:
            assert a.required_level == b.required_level
            np.testing.assert_array_equal(b.required_labels, a.required_labels)
            np.testing.assert_array_equal(b.required_means, a.required_means)


def test_unfactored_where_it_does_not_apply():
    """float16 rows, bfloat16 and rows that are not the grid's (shuffled: residual ~1) take the
    unfactored pass, same decisions; a grid of the wrong shape is an error."""
    x = synthetic(2, 8, 12)
    grid = PatchGrid(2, 8, 12)
    want = neighbours.first_neighbours(x, chunk_size=100).index
    assert neighbours.first_neighbours(x, chunk_size=100, grid=grid).factored
    for y, prec in ((x.astype(np.float16), "float32"), (x, "bfloat16"),
                    (x[np.random.default_rng(0).permutation(len(x))], "float32")):
        nb = neighbours.first_neighbours(y, chunk_size=100, precision=prec, grid=grid)
        assert not nb.factored
        np.testing.assert_array_equal(nb.index, neighbours.first_neighbours(
            y, chunk_size=100, precision=prec).index)
    np.testing.assert_array_equal(neighbours.first_neighbours(x, grid=grid).index, want)
    for bad in (PatchGrid(3, 8, 12), PatchGrid(2, 6, 16), PatchGrid(2, 8, 12, (256, 512, 512))):
        with pytest.raises(ValueError, match="grid"):
            neighbours.first_neighbours(x, grid=bad)


def test_fit_passes_the_grid(net):
    """fit() passes the grid when it keeps every patch, not when a budget subsamples them."""
    crops = demo.photo_crops(load_sample_images().images, 2, seed=1, size=64)
    kw = {"variables": net.variables, "num_prototypes": 20, "resize": 64, "image_size": 64,
          "progress": False}
    every = pipeline.fit(crops, max_patches=None, **kw)
    some = pipeline.fit(crops, max_patches=300, **kw)
    assert every.info["num_patches"] == 2 * 16 * 16 and some.info["num_patches"] == 300
    assert every.info["finch_stats"]["levels"][0]["factored"]
    assert not some.info["finch_stats"]["levels"][0]["factored"]


def _worker(out: str) -> None:
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    from protoad_jax import sharding

    x = synthetic(3, 8, 16, seed=1)
    x[256:384] = x[:128]  # copies in another chunk
    m = sharding.local_mesh() if jax.local_device_count() > 1 else None
    nb = neighbours.first_neighbours(x, chunk_size=96, candidates=3, mesh=m,
                                     grid=PatchGrid(3, 8, 16))
    Path(out).write_text(json.dumps({"devices": jax.local_device_count(),
                                     "factored": nb.factored, "index": nb.index.tolist(),
                                     "similarity": nb.similarity.tolist()}))


def test_four_devices_equal_one(tmp_path):
    runs = {}
    for devices in (1, 4):
        out = tmp_path / f"dev{devices}.json"
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        subprocess.run([sys.executable, __file__, str(out)], env=env, check=True, timeout=600)
        runs[devices] = json.loads(out.read_text())
    assert runs[4]["devices"] == 4 and runs[1]["factored"] and runs[4]["factored"]
    assert runs[1]["index"] == runs[4]["index"] and runs[1]["similarity"] == runs[4]["similarity"]
    x = synthetic(3, 8, 16, seed=1)
    x[256:384] = x[:128]
    np.testing.assert_array_equal(runs[1]["index"],
                                  neighbours.first_neighbours(x, chunk_size=96, candidates=3).index)


if __name__ == "__main__":
    _worker(sys.argv[1])
