"""End-to-end parity of the pipeline with the PyTorch reference, and the public API contracts.

One random-init torchvision wide_resnet50_2 (BatchNorm randomised) per module, converted to a
``.npz`` in a temporary folder, so ``fit(weights=PATH)`` and ``load_model`` go through real files.
Every scoring call uses batches of ``B`` images and every model has ``K`` prototypes, so the
jitted regions compile once for the whole module.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from oracles import random_torchvision_model, state_dict_numpy
from PIL import Image
from sklearn.datasets import load_sample_images

import protoad_jax
from protoad_jax import model as model_lib
from protoad_jax import pipeline, weights, xla_cpu

REPO = Path(__file__).resolve().parents[1]
import torch_reference

TOL = 1e-5  # max abs error vs the torch reference: patch maps, 224 x 224 maps, image scores
B = 2  # images per scoring batch everywhere in this module
K = 8  # prototypes of every model in this module
MAX_PATCHES = 1500  # training patches kept per fit (seeded subsample of 2 x 3136)


class Backbone(NamedTuple):
    torch_model: torch.nn.Module
    path: Path  # converted .npz
    variables: dict


class Images(NamedTuple):
    names: list[str]
    pils: list[Image.Image]  # what the torch side preprocesses itself
    jax_x: np.ndarray  # [n, 224, 224, 3] preprocess_image
    torch_x: np.ndarray  # [n, 3, 224, 224] torch_reference.reference_transform
    train_paths: list[Path]  # china.png, flower.png written losslessly


@pytest.fixture(scope="module")
def wrn(tmp_path_factory) -> Backbone:
    model = random_torchvision_model("wide_resnet50_2", seed=0)
    flat = weights.to_flax(state_dict_numpy(model))
    path = weights.save_variables(tmp_path_factory.mktemp("weights") / "wrn.npz",
                                  traverse_util.unflatten_dict(flat, sep="/"))
    return Backbone(model, path, weights.load_backbone(path))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Images:
    """china, flower, a crop of each (preprocessed from PIL), and two random images."""
    folder = tmp_path_factory.mktemp("photos")
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)  # 640 x 427 RGB
    paths = []
    for name, im in (("china", china), ("flower", flower)):
        paths.append(folder / f"{name}.png")
        im.save(paths[-1])
    names = ["china", "flower", "china_crop", "flower_crop"]
    pils = [china, flower, china.crop((300, 40, 560, 330)), flower.crop((60, 120, 300, 400))]
    jax_x = np.stack([protoad_jax.preprocess_image(p) for p in pils])
    tf = torch_reference.reference_transform()
    torch_x = np.stack([tf(p).numpy() for p in pils])
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
    jax_x = np.concatenate([jax_x, noise])
    torch_x = np.concatenate([torch_x, noise.transpose(0, 3, 1, 2)])
    return Images(names + ["random0", "random1"], pils, jax_x, torch_x, paths)


@pytest.fixture(scope="module")
def torch_embedding(wrn, images) -> np.ndarray:
    """``[n, 1792, 56, 56]`` reference embedding of the torch-preprocessed images."""
    return torch_reference.reference_embed(wrn.torch_model, images.torch_x).numpy()


def _fit(wrn, images, **kw) -> protoad_jax.Model:
    kw = {"clustering": "finch", "num_prototypes": K, "seed": 0, "max_patches": MAX_PATCHES,
          "batch_size": B, "progress": False, **kw}
    return protoad_jax.fit(list(images.jax_x[:2]), weights=wrn.path, **kw)


@pytest.fixture(scope="module")
def models(wrn, images) -> dict[str, protoad_jax.Model]:
    """Models fitted on china + flower, and random-prototype models, all with K prototypes."""
    out = {
        "finch_raw": _fit(wrn, images, normalize_prototypes=False),
        "finch_norm": _fit(wrn, images, normalize_prototypes=True),
    }
    rng = np.random.default_rng(1)
    # Non-negative like the (post-ReLU) embedding, so the cosines are far from 0 and the max
    # over prototypes is contested; raw ones have norms ~2 (not unit) to exercise the raw mode.
    raw = np.abs(rng.normal(size=(K, 1792))).astype(np.float32) * np.float32(0.05)
    cfg = out["finch_raw"].config
    out["random_raw"] = protoad_jax.Model(raw, cfg, str(wrn.path))
    out["random_norm"] = protoad_jax.Model(raw / np.linalg.norm(raw, axis=1, keepdims=True),
                                        out["finch_norm"].config, str(wrn.path))
    return out


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ----------------------------------------------------------------------------- 1. parity


def test_preprocessing_matches_torchvision(images):
    err = _max_err(images.jax_x[:4], images.torch_x[:4].transpose(0, 2, 3, 1))
    print(f"preprocess_image vs reference_transform: max abs err {err:.3e} (tol 1e-6)")
    assert err <= 1e-6, f"preprocessing differs from torchvision by {err} > 1e-6"


def test_prototype_modes(models):
    raw, norm = models["finch_raw"].prototypes, models["finch_norm"].prototypes
    norms = np.linalg.norm(raw.astype(np.float64), axis=1)
    print(f"FINCH raw cluster-mean norms: {norms.min():.4f} .. {norms.max():.4f}")
    assert norms.max() < 0.999, "raw FINCH means of unit patches should not be unit vectors"
    err = _max_err(norm, raw / norms[:, None])
    print(f"normalize_prototypes=True vs NumPy L2 normalisation of the raw means: {err:.3e} "
          "(tol 1e-6)")
    assert err <= 1e-6
    assert raw.shape == norm.shape == (K, 1792) and raw.dtype == norm.dtype == np.float32


@pytest.mark.parametrize("case", ["finch_raw", "finch_norm", "random_raw", "random_norm"])
def test_end_to_end_parity_with_torch_reference(wrn, images, torch_embedding, models, case,
                                                tmp_path):
    model = models[case]
    model.save(tmp_path / "model.npz")
    loaded = protoad_jax.load_model(tmp_path / "model.npz")  # weights come from wrn.path too
    ours = pipeline.score_images(loaded, list(images.jax_x), batch_size=B, progress=False)
    ref_patch, ref_maps, ref_scores = torch_reference.reference_head(torch_embedding,
                                                                     loaded.prototypes)
    assert ours.patch_maps.shape == ref_patch.shape == (6, 56, 56)
    assert ours.maps.shape == ref_maps.shape == (6, 224, 224)
    errs = {}
    for i, name in enumerate(images.names):
        e = (_max_err(ours.patch_maps[i], ref_patch[i]), _max_err(ours.maps[i], ref_maps[i]),
             _max_err(ours.scores[i], ref_scores[i]))
        errs[name] = e
        print(f"{case:11s} {name:11s} patch map {e[0]:.2e}  map {e[1]:.2e}  score {e[2]:.2e}  "
              f"(score {ref_scores[i]:.4f}; tol {TOL:.0e})")
    worst = np.max(list(errs.values()), axis=0)
    assert worst.max() <= TOL, f"{case}: max abs errs (patch, map, score) {worst} > {TOL}"
    # The maps are not trivial: they vary within images and the scores across images.
    assert np.ptp(ref_patch[0]) > 1e-3 and np.ptp(ref_scores) > 1e-4


# ----------------------------------------------------------------------------- 2. model files


def test_save_load_round_trip(wrn, images, models, tmp_path):
    model = models["finch_norm"]
    path = model.save(tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as z:
        # A fitted model has exemplars (docs/update.md): the required arrays plus theirs.
        assert model.exemplars is not None
        assert sorted(z.files) == sorted(model_lib.MODEL_KEYS + model_lib.EXEMPLAR_KEYS)
        assert sorted(model_lib.MODEL_KEYS) == sorted(["format_version", "prototypes", "config", "meta"])
        assert z["prototypes"].dtype == np.float32 and z["prototypes"].shape == (K, 1792)
        assert int(z["format_version"]) == model_lib.FORMAT_VERSION
        assert json.loads(str(z["config"])) == json.loads(model.config.to_json())
        stored = z["prototypes"]
    loaded = protoad_jax.load_model(path)
    assert np.array_equal(stored.view(np.uint32), model.prototypes.view(np.uint32))
    assert np.array_equal(loaded.prototypes.view(np.uint32), model.prototypes.view(np.uint32))
    assert loaded.config == model.config
    for field in type(model.exemplars)._fields:
        assert np.array_equal(np.asarray(getattr(loaded.exemplars, field)),
                              np.asarray(getattr(model.exemplars, field))), field
    assert loaded.weights == str(wrn.path) and loaded.info == json.loads(json.dumps(model.info))
    # The head uses the stored prototypes as they are: same scores bit for bit.
    x = images.jax_x[:B]
    a = protoad_jax.make_scorer(model, wrn.variables)(x)
    b = protoad_jax.make_scorer(loaded)(x)  # backbone loaded from the recorded .npz path
    assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))


def test_model_file_errors(models, tmp_path):
    good = models["finch_norm"].save(tmp_path / "good.npz")
    raw = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or not an .npz written by protoad_jax"):
        protoad_jax.load_model(tmp_path / "trunc.npz")
    with np.load(good, allow_pickle=False) as z:
        contents = {k: z[k] for k in z.files}
    np.savez(tmp_path / "v2.npz", **dict(contents, format_version=np.array(2, np.int64)))
    with pytest.raises(ValueError, match=r"has format version 2; this protoad_jax reads version 1"):
        protoad_jax.load_model(tmp_path / "v2.npz")
    np.savez(tmp_path / "nokey.npz", **{k: v for k, v in contents.items() if k != "config"})
    with pytest.raises(ValueError, match=r"not a protoad_jax model file: missing \['config'\]"):
        protoad_jax.load_model(tmp_path / "nokey.npz")
    np.savez(tmp_path / "width.npz", **dict(contents, prototypes=contents["prototypes"][:, :100]))
    with pytest.raises(ValueError, match=r"prototypes must be \[k, 1792\].*got shape \(8, 100\)"):
        protoad_jax.load_model(tmp_path / "width.npz")
    np.savez(tmp_path / "badjson.npz", **dict(contents, config=np.array("{not json")))
    with pytest.raises(ValueError, match="unreadable config or meta"):
        protoad_jax.load_model(tmp_path / "badjson.npz")
    with pytest.raises(protoad_jax.ModelFileError, match="does not exist"):
        protoad_jax.load_model(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- 3. fit


def test_fit_is_deterministic_and_seeded(wrn, images, models):
    t0 = time.perf_counter()
    finch_again = _fit(wrn, images, normalize_prototypes=True)
    km1 = _fit(wrn, images, clustering="kmeans")
    km2 = _fit(wrn, images, clustering="kmeans")
    km_seed = _fit(wrn, images, clustering="kmeans", seed=1)
    print(f"4 fits: {time.perf_counter() - t0:.1f} s; kmeans info {km1.info}")
    assert np.array_equal(finch_again.prototypes, models["finch_norm"].prototypes)
    assert np.array_equal(km1.prototypes, km2.prototypes)
    assert km1.prototypes.shape == (K, 1792)
    err = _max_err(km1.prototypes, km_seed.prototypes)
    print(f"kmeans seed 0 vs seed 1: max prototype difference {err:.3e} (must be > 1e-3)")
    assert err > 1e-3, "another seed (subsample + k-means++) should give other prototypes"


def test_fit_paths_equal_arrays(wrn, images, models):
    from_paths = protoad_jax.fit(images.train_paths, weights=wrn.path, clustering="finch",
                                 num_prototypes=K, seed=0, max_patches=MAX_PATCHES,
                                 normalize_prototypes=True, batch_size=B, progress=False)
    from_arrays = models["finch_norm"]
    assert from_paths.config == from_arrays.config
    assert np.array_equal(from_paths.prototypes, from_arrays.prototypes)


def test_max_patches_subsampling_is_seeded(wrn, images):
    x = list(images.jax_x[:2])
    cfg = protoad_jax.Config(max_patches=500, seed=3)
    full = pipeline.extract_patches(x, wrn.variables, protoad_jax.Config(), batch_size=B,
                                    progress=False)
    a = pipeline.extract_patches(x, wrn.variables, cfg, batch_size=B, progress=False)
    b = pipeline.extract_patches(x, wrn.variables, cfg, batch_size=B, progress=False)
    c = pipeline.extract_patches(x, wrn.variables, protoad_jax.Config(max_patches=500, seed=4),
                                 batch_size=B, progress=False)
    assert full.shape == (2 * 56 * 56, 1792) and a.shape == (500, 1792)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Every kept patch is a row of the full set (patches are subsampled, not recomputed), in order.
    full_index = {row.tobytes(): i for i, row in enumerate(full)}
    idx = [full_index.get(row.tobytes(), -1) for row in a]
    assert min(idx) >= 0 and np.all(np.diff(idx) > 0), "subsample is not an ordered subset"
    assert len(set(idx) & {full_index[r.tobytes()] for r in c}) < 500


# ----------------------------------------------------------------------------- 4. make_scorer


def test_scorer_matches_score_images_and_eager(wrn, images, models):
    model = models["finch_norm"]
    x = images.jax_x[:B]
    maps, scores = protoad_jax.make_scorer(model, wrn.variables)(x)
    assert maps.shape == (B, 224, 224) and scores.shape == (B,)
    assert maps.dtype == scores.dtype == jnp.float32
    ref = pipeline.score_images(model, list(x), wrn.variables, batch_size=B, progress=False)
    assert np.array_equal(np.asarray(maps), ref.maps)
    assert np.array_equal(np.asarray(scores), ref.scores)
    t0 = time.perf_counter()
    with jax.disable_jit():
        e_maps, e_scores = protoad_jax.make_scorer(model, wrn.variables)(x)
    err = max(_max_err(e_maps, maps), _max_err(e_scores, scores))
    print(f"eager (disable_jit) vs jitted scorer: max abs err {err:.2e} (tol 1e-6), "
          f"eager took {time.perf_counter() - t0:.1f} s")
    assert err <= 1e-6


def test_scorer_inside_user_jit_and_vmap(wrn, images, models):
    scorer = protoad_jax.make_scorer(models["finch_norm"], wrn.variables)
    x = images.jax_x[2:6].reshape(2, B, 224, 224, 3)  # photo crops, then random images
    per_slice = [scorer(s) for s in x]
    # A plain user jit, and the README's: the user's jit with protoad_jax's compiler options
    # (JAX takes compiler options on the outermost jit only).
    for options in (None, xla_cpu.compiler_options()):
        maps, scores = jax.jit(jax.vmap(scorer), compiler_options=options)(jnp.asarray(x))
        assert maps.shape == (2, B, 224, 224) and scores.shape == (2, B)
        err = max(max(_max_err(maps[i], m), _max_err(scores[i], s))
                  for i, (m, s) in enumerate(per_slice))
        print(f"jit(vmap(scorer), compiler_options={options}) over [2, {B}, 224, 224, 3] vs "
              f"per-slice calls: max abs err {err:.2e} (tol 1e-6)")
        assert err <= 1e-6
    # The boundary checks still fire on tracers, at trace time.
    with pytest.raises(ValueError, match="scores float32 images"):
        jax.jit(scorer)(jnp.zeros((B, 224, 224, 3), jnp.bfloat16))


def test_second_call_compiles_nothing(wrn, images, models, caplog):
    model = models["finch_norm"]
    fn = pipeline.scoring_function(model.config)
    scorer = protoad_jax.make_scorer(model, wrn.variables)
    # First calls (numpy and jax inputs): compile the scorer and the NaN check for this shape.
    jax.block_until_ready((scorer(images.jax_x[:B]), scorer(jnp.asarray(images.jax_x[:B]))))
    size = fn._cache_size()
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.DEBUG):
            scorer(images.jax_x[B:2 * B])  # new values, same shapes
            scorer(jnp.asarray(images.jax_x[B:2 * B]))
            # Another model with the same static settings (a new category) reuses the executable.
            other = protoad_jax.make_scorer(models["random_raw"], wrn.variables)
            jax.block_until_ready(other(jnp.asarray(images.jax_x[:B])))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    print(f"scoring_function cache size {size} -> {fn._cache_size()}; compile log lines: {compiles}")
    assert fn._cache_size() == size
    assert not compiles, compiles


def test_chunked_scorer_equals_unchunked(wrn, images, models):
    model = models["random_norm"]
    x = images.jax_x[2:2 + B]
    maps, scores = protoad_jax.make_scorer(model, wrn.variables)(x)
    # K = 8 in chunks of 3: a scan over 3 chunks, the last padded with copies of prototype 0.
    c_maps, c_scores = protoad_jax.make_scorer(model, wrn.variables, chunk_size=3)(x)
    chunked_fn = pipeline.scoring_function(model.config, 3)
    assert chunked_fn._cache_size() == 1, "the chunked scorer did not run its own jitted region"
    err = max(_max_err(c_maps, maps), _max_err(c_scores, scores))
    print(f"chunk_size=3 (K={K}) vs unchunked: max abs err {err:.2e} (tol 1e-6)")
    assert err <= 1e-6


# ----------------------------------------------------------------------------- 5. bad input


def test_bad_images_are_clear_errors(wrn, images, models):
    scorer = protoad_jax.make_scorer(models["finch_norm"], wrn.variables)
    x = images.jax_x[:B]
    with pytest.raises(ValueError,
                       match=r"scores images of shape \[b, 224, 224, 3\].*got shape \[2, 200, 200, 3\]"):
        scorer(x[:, :200, :200])
    with pytest.raises(ValueError, match=r"got shape \[224, 224, 3\]"):
        scorer(x[0])
    with pytest.raises(ValueError, match=r"got shape \[2, 3, 224, 224\]"):
        scorer(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # NCHW
    with pytest.raises(ValueError, match="scores float32 images.*got dtype float64"):
        scorer(x.astype(np.float64))
    with pytest.raises(ValueError, match="scores float32 images.*got dtype uint8"):
        scorer(np.clip(x * 50 + 128, 0, 255).astype(np.uint8))
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[1, 100, 37, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf pixels"):
            scorer(y)
        with pytest.raises(ValueError, match="NaN or inf pixels"):
            scorer(jnp.asarray(y))
    with pytest.raises(ValueError, match="scores float32 images.*got dtype float64"):
        protoad_jax.fit([x[0].astype(np.float64)], weights=wrn.path, progress=False)


def test_bad_models_are_clear_errors(wrn, models):
    cfg = models["finch_norm"].config
    rng = np.random.default_rng(5)
    narrow = protoad_jax.Model(rng.normal(size=(K, 100)).astype(np.float32), cfg, str(wrn.path))
    with pytest.raises(ValueError, match=r"prototypes must be \[k, 1792\].*got shape \(8, 100\)"):
        protoad_jax.make_scorer(narrow, wrn.variables)
    with pytest.raises(ValueError, match=r"prototypes must be \[k, 1792\].*got shape \(8, 100\)"):
        pipeline.score_images(narrow, [np.zeros((224, 224, 3), np.float32)], wrn.variables)
    empty = protoad_jax.Model(np.zeros((0, 1792), np.float32), cfg, str(wrn.path))
    with pytest.raises(ValueError, match=r"prototypes are empty \(k = 0"):
        protoad_jax.make_scorer(empty, wrn.variables)
    with pytest.raises(ValueError, match=r"prototypes are empty \(k = 0"):
        empty.save(wrn.path.parent / "empty.npz")
    nan = rng.normal(size=(K, 1792)).astype(np.float32)
    nan[3, 7] = np.nan
    with pytest.raises(ValueError, match=r"1 of 8 prototypes contain NaN or inf \(rows \[3\]\)"):
        protoad_jax.make_scorer(protoad_jax.Model(nan, cfg), wrn.variables)
    with pytest.raises(ValueError, match="records no backbone weights path"):
        protoad_jax.make_scorer(protoad_jax.Model(rng.normal(size=(K, 1792)).astype(np.float32), cfg))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        protoad_jax.make_scorer(models["finch_norm"], wrn.variables, chunk_size=0)


def test_bad_fit_arguments_are_clear_errors(wrn, images):
    with pytest.raises(ValueError, match="empty training set"):
        protoad_jax.fit([], weights=wrn.path, progress=False)
    with pytest.raises(ValueError, match="empty training set"):
        protoad_jax.fit(iter(()), weights=wrn.path, progress=False)
    with pytest.raises(ValueError, match="needs backbone weights"):
        protoad_jax.fit(list(images.jax_x[:1]), progress=False)
    with pytest.raises(ValueError, match="either config= or the individual settings"):
        protoad_jax.fit(list(images.jax_x[:1]), weights=wrn.path, config=protoad_jax.Config(),
                        clustering="kmeans", progress=False)
    with pytest.raises(ValueError, match="Config.clustering must be one of"):
        protoad_jax.fit(list(images.jax_x[:1]), weights=wrn.path, clustering="dbscan",
                        progress=False)


# ----------------------------------------------------------------------------- compare_reference.py


def test_compare_reference_script(wrn, images, models, tmp_path):
    pth = tmp_path / "wrn_random.pth"
    torch.save(wrn.torch_model.state_dict(), pth)
    model_path = models["finch_raw"].save(tmp_path / "model.npz")
    folder = tmp_path / "imgs"
    folder.mkdir()
    images.pils[2].resize((130, 145), Image.BICUBIC).save(folder / "a.png")  # tiny: upscaled to 256
    images.pils[3].convert("L").save(folder / "b_gray.png")  # grayscale -> RGB on both sides
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_reference.py"), f"--pth={pth}",
         f"--model={model_path}", f"--images={folder}", "--max_images=2", f"--tol={TOL}"],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)))  # this checkout's protoad_jax
    print(proc.stdout, proc.stderr[-2000:] if proc.returncode else "",
          f"compare_reference.py took {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("a.png") for line in lines)
    assert any(line.startswith("b_gray.png") for line in lines)
    overall = [line for line in lines if line.startswith("overall")]
    assert len(overall) == 1
    errs = [float(v) for v in overall[0].split()[1:5]]
    assert max(errs) <= TOL, overall[0]
