"""Multi-device runs equal one-device runs: batch sharding of fit / make_scorer / score_images and
the sharded nearest-neighbour searches of FINCH and k-means.

XLA_FLAGS must be set before jax starts, so the same worker (``main`` below, this file run as a
script) runs in two subprocesses: one CPU device, and four forced host devices
(``--xla_force_host_platform_device_count=4``). Each writes its results to an ``.npz``; the
test compares them exactly (the one-device run is the oracle) and checks, from the four-device
run, that the work was really split: the scorer's outputs are sharded over the 4 devices along
the batch axis, and the compiled first-neighbour / k-means programs gather per-device results.

The backbone is a random-init wide_resnet50_2 (1792-channel head) saved to ``.npz`` and loaded
through ``weights.load_backbone``, so the test follows whatever that does to the variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

DEVICES = 4
N_IMAGES = 4  # images per batch: ~0.3 s each through the backbone on CPU
K = 8  # prototypes
MAX_PATCHES = 600  # training patches kept per fit (seeded subsample of 4 x 3136)
MAP_TOL = 1e-6  # 224 x 224 maps and scores near 1.0: a few float32 ulps (see the scorer test)


def main(out: str) -> None:
    """Worker: every sharded code path on this process's devices; results -> ``out`` (.npz)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    jax.config.update("jax_default_matmul_precision", "highest")
    from protoad_jax import backbone, pipeline, sharding, weights, xla_cpu
    from protoad_jax.clustering import finch, kmeans, neighbours
    from protoad_jax.config import EMBED_CHANNELS, Config
    from protoad_jax.model import Model

    ndev = jax.local_device_count()
    mesh = sharding.local_mesh()
    res: dict[str, np.ndarray] = {}
    info: dict = {"devices": ndev, "mesh_size": mesh.size,
                  "batch_size_3": sharding.device_batch_size(3)}
    rng = np.random.default_rng(0)
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        info[f"seconds_{name}"] = round(clock[-1] - clock[-2], 1)

    # Backbone: random He-scaled weights and BatchNorm statistics on the parameter shapes of
    # wide_resnet50_2 (eval_shape: no init pass), through load_backbone like real weights.
    def fill(name: str, a: jax.ShapeDtypeStruct) -> np.ndarray:
        if name.endswith("kernel"):
            std = np.sqrt(2.0 / np.prod(a.shape[:-1]))
            return (rng.normal(size=a.shape) * std).astype(np.float32)
        if name.endswith(("scale", "var")):
            return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        return (rng.normal(size=a.shape) * 0.1).astype(np.float32)

    net = backbone.ResNet(arch="wide_resnet50_2")
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    random_vars = jax.tree_util.tree_map_with_path(lambda p, a: fill(str(p[-1].key), a), shapes)
    path = Path(out).with_suffix(".weights.npz")
    weights.save_variables(path, dict(random_vars))
    variables = weights.load_backbone(path)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(variables))
    images = rng.normal(size=(N_IMAGES, 224, 224, 3)).astype(np.float32)
    protos = rng.normal(size=(K, EMBED_CHANNELS)).astype(np.float32)
    model = Model(protos / np.linalg.norm(protos, axis=1, keepdims=True), Config())

    # make_scorer: a batch that divides the device count, then one that needs padding.
    lap("init")
    scorer = pipeline.make_scorer(model, variables)
    maps, scores = scorer(images)
    jax.block_until_ready(maps)
    lap("scorer")
    info["maps_spec"] = str(maps.sharding.spec) if hasattr(maps.sharding, "spec") else None
    info["maps_devices"] = len(maps.sharding.device_set)
    info["maps_shard_shapes"] = sorted({tuple(s.data.shape) for s in maps.addressable_shards})
    info["maps_is_batch_sharded"] = maps.sharding.is_equivalent_to(sharding.batch_sharding(), 3)
    res["scorer_maps"], res["scorer_scores"] = np.asarray(maps), np.asarray(scores)
    if ndev == 1:
        # one image per call: what each of 4 devices runs on this batch
        maps1, scores1 = scorer(images[:1])
        res["batch1_maps"], res["batch1_scores"] = np.asarray(maps1), np.asarray(scores1)
    if ndev > 1:
        # zero-padded to 4 rows (the same compiled shape), the padding dropped
        maps3, scores3 = scorer(images[:3])
        res["pad3_maps"], res["pad3_scores"] = np.asarray(maps3), np.asarray(scores3)
        info["pad3_maps_shape"] = list(maps3.shape)
        # Under the user's own jit the scorer leaves placement to the caller (sharded input).
        placed = jax.device_put(images, sharding.batch_sharding())
        # the user's jit with the library's XLA:CPU options (README "Use it from JAX"): the same code
        jmaps, jscores = jax.jit(scorer, compiler_options=xla_cpu.compiler_options())(placed)
        res["jit_scorer_maps"], res["jit_scorer_scores"] = np.asarray(jmaps), np.asarray(jscores)
        info["jit_maps_devices"] = len(jmaps.sharding.device_set)
    lap("scorer_more")

    # score_images: batch_size 3 is rounded up to 4 on 4 devices (one compiled batch shape).
    scored = pipeline.score_images(model, list(images), variables,
                                   batch_size=3 if ndev > 1 else N_IMAGES, progress=False)
    res["score_maps"], res["score_scores"] = scored.maps, scored.scores
    res["score_patch_maps"] = scored.patch_maps
    lap("score_images")

    # fit: the embedding batch is sharded (checked on one call), then both clusterings.
    emb_fn = pipeline._embed_fn("wide_resnet50_2", "float32", "float32")
    emb = emb_fn(sharding.replicate(variables), sharding.device_batch(images))
    info["embed_devices"] = len(emb.sharding.device_set)
    info["embed_is_batch_sharded"] = emb.sharding.is_equivalent_to(sharding.batch_sharding(), 4)
    for clustering in ("finch", "kmeans"):
        fitted = pipeline.fit(list(images), variables=variables, clustering=clustering,
                              num_prototypes=K, max_patches=MAX_PATCHES, batch_size=N_IMAGES,
                              progress=False)
        res[f"fit_{clustering}"] = fitted.prototypes
        info[f"fit_{clustering}_patches"] = fitted.info["num_patches"]
        lap(f"fit_{clustering}")

    # FINCH / k-means on random data with exact ties: rows 0..49 repeated at 500.. and 900..
    # (first neighbours at cosine 1 in other chunks, on other devices). 1000 rows in chunks of
    # 96: 11 chunks, padded to 12 on 4 devices.
    x = rng.normal(size=(1000, 32)).astype(np.float32)
    x[500:550] = x[:50]
    x[900:950] = x[:50]
    m = mesh if ndev > 1 else None
    nb = neighbours.first_neighbours(x, chunk_size=96, candidates=4, mesh=m)
    res["kappa"], res["kappa_sim"] = nb.index, nb.similarity
    fr = finch.finch(x, num_clusters=6, chunk_size=96, mesh=m)
    info["finch_levels"] = fr.num_clusters
    for i, (p, mu) in enumerate(zip(fr.partitions, fr.means)):
        res[f"finch_partition_{i}"], res[f"finch_means_{i}"] = np.asarray(p), np.asarray(mu)
    res["finch_req_labels"] = np.asarray(fr.required_labels)
    res["finch_req_means"] = np.asarray(fr.required_means)
    lap("finch")
    for spherical, dtype in ((False, np.float32), (True, np.float16)):
        km = kmeans.kmeans(x.astype(dtype), 7, jax.random.key(1), chunk_size=96, tol=0.0,
                           spherical=spherical, mesh=m)
        for f in km._fields:
            res[f"kmeans_{spherical}_{np.dtype(dtype).name}_{f}"] = np.asarray(getattr(km, f))
    lap("kmeans")
    # The sharded programs gather the per-device chunk results (a one-device program has no
    # collectives): evidence that the searches are split.
    if ndev > 1:
        xr = jax.device_put(jnp.asarray(x), sharding.replicated_sharding())
        ok = jax.device_put(jnp.ones(1000, bool), sharding.replicated_sharding())
        pairs = jax.device_put(jnp.asarray(neighbours._chunk_pairs(1000, 96, ndev)),
                               sharding.replicated_sharding())
        hlo_nn = neighbours._pair_pass.lower(xr, ok, pairs, chunk=96, c=4, bf16=False,
                                             mesh=m).compile().as_text()
        hlo_km = kmeans._kmeans.lower(xr, jax.random.key(1), None, k=7, max_iters=100, tol=0.0,
                                      spherical=False, chunk=96, mesh=m).compile().as_text()
        info["nn_all_gather"] = "all-gather" in hlo_nn
        info["kmeans_all_gather"] = "all-gather" in hlo_km
        lap("hlo")
    np.savez(out, **res)
    Path(out).with_suffix(".json").write_text(json.dumps(info))


def _start(out: Path, devices: int) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, __file__, str(out)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, out: Path, devices: int, t0: float) -> tuple[dict, dict]:
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{devices}-device worker failed:\n{log}"
    info = json.loads(out.with_suffix(".json").read_text())
    print(f"{devices}-device worker: {time.perf_counter() - t0:.1f} s; {info}")
    with np.load(out) as z:
        return {k: z[k] for k in z.files}, info


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, dict, dict]:
    """(results, info) of the 1-device and the 4-device worker, run concurrently (compiles
    are mostly single-threaded)."""
    tmp = tmp_path_factory.mktemp("sharding")
    t0 = time.perf_counter()
    procs = {d: _start(tmp / f"dev{d}.npz", d) for d in (1, DEVICES)}
    one, info1 = _finish(procs[1], tmp / "dev1.npz", 1, t0)
    many, info4 = _finish(procs[DEVICES], tmp / f"dev{DEVICES}.npz", DEVICES, t0)
    return one, info1, many, info4


def test_devices_and_batch_rounding(runs):
    _, info1, _, info4 = runs
    assert info1["devices"] == 1 and info1["mesh_size"] == 1 and info1["batch_size_3"] == 3
    assert info4["devices"] == DEVICES and info4["mesh_size"] == DEVICES
    assert info4["batch_size_3"] == 4, "batch 3 on 4 devices must round up to 4"


def test_scorer_outputs_are_sharded_over_the_batch(runs):
    _, info1, _, info4 = runs
    assert info4["maps_devices"] == DEVICES and info4["maps_is_batch_sharded"], info4
    assert info4["maps_shard_shapes"] == [[N_IMAGES // DEVICES, 224, 224]], info4
    assert info4["jit_maps_devices"] == DEVICES, info4
    assert info4["embed_devices"] == DEVICES and info4["embed_is_batch_sharded"], info4
    assert info1["maps_devices"] == 1


def test_searches_are_split_across_devices(runs):
    _, _, _, info4 = runs
    assert info4["nn_all_gather"] and info4["kmeans_all_gather"], info4


def _assert_equal(one: dict, many: dict, prefix: str) -> None:
    keys = sorted(k for k in one if k.startswith(prefix))
    assert keys, f"no results named {prefix}*"
    for k in keys:
        a, b = one[k], many[k]
        err = _max_err(a, b) if a.size else 0.0
        print(f"{k}: {a.shape} {a.dtype}, max |1 device - {DEVICES} devices| = {err:.3g}")
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_array_equal(b, a, err_msg=f"{k}: {DEVICES} devices must equal 1 exactly")


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def test_scorer_equals_one_device(runs):
    """Patch maps, 224 x 224 maps and scores (the factored head's per-stage matmuls, bilinear
    upsample and Gaussian blur as matmuls, batched by vmap) round differently with the
    per-device batch size (XLA picks another matmul kernel for 4 images than for 1): equal
    within MAP_TOL of the one-device batch of 4 and of the one-device run of one image (the
    per-device batch; the partitioned program may fuse the factored head's sums in another
    order)."""
    one, _, many, _ = runs
    assert np.ptp(one["scorer_scores"]) > 0 and np.ptp(one["scorer_maps"][0]) > 0, "degenerate"
    for k in ("score_patch_maps", "scorer_maps", "scorer_scores", "score_maps", "score_scores"):
        err = _max_err(one[k], many[k])
        print(f"{k}: max |1 device - {DEVICES} devices| = {err:.3g} (tolerance {MAP_TOL})")
        assert err <= MAP_TOL, f"{k}: max error {err} > {MAP_TOL}"
    for k in ("maps", "scores"):
        err = _max_err(many[f"scorer_{k}"][:1], one[f"batch1_{k}"])
        print(f"{k}: max |1 device, 1 image - {DEVICES} devices, 1 image each| = {err:.3g}")
        assert err <= MAP_TOL, (k, err)
    # the same computation on 4 devices: score_images, make_scorer, the padded batch of 3 and
    # the scorer under the user's jit agree exactly
    np.testing.assert_array_equal(many["score_maps"], many["scorer_maps"])
    np.testing.assert_array_equal(many["pad3_maps"], many["scorer_maps"][:3])
    np.testing.assert_array_equal(many["pad3_scores"], many["scorer_scores"][:3])
    np.testing.assert_array_equal(many["jit_scorer_maps"], many["scorer_maps"])
    np.testing.assert_array_equal(many["jit_scorer_scores"], many["scorer_scores"])
    np.testing.assert_array_equal(one["score_maps"], one["scorer_maps"])


def test_fit_equals_one_device(runs):
    one, info1, many, info4 = runs
    assert info1["fit_finch_patches"] == info4["fit_finch_patches"] == MAX_PATCHES
    assert one["fit_finch"].shape == one["fit_kmeans"].shape == (K, 1792)
    _assert_equal(one, many, "fit_")


def test_finch_equals_one_device(runs):
    one, info1, many, info4 = runs
    assert info1["finch_levels"] == info4["finch_levels"], (info1, info4)
    kappa = one["kappa"]
    np.testing.assert_array_equal(kappa[:50], np.arange(500, 550), "ties: lowest index")
    np.testing.assert_array_equal(kappa[500:550], np.arange(50))
    _assert_equal(one, many, "kappa")
    _assert_equal(one, many, "finch_")


def test_kmeans_equals_one_device(runs):
    one, _, many, _ = runs
    _assert_equal(one, many, "kmeans_")


if __name__ == "__main__":
    main(sys.argv[1])
