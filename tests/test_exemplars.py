"""Exemplars and the coverage level against NumPy oracles; the model file with and without them.

A random resnet50 (layer1..3 as wide as wide_resnet50_2's) at 64 x 64 (a 16 x 16 patch grid),
three crops of scikit-learn's sample photos of three sizes, K = 12, 700 sampled patches.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from protoad_jax import Config, exemplars, load_model, model, pipeline, preprocess, weights

CONFIG = Config(arch="resnet50", image_size=64, resize=72, num_prototypes=12, max_patches=700)
TOL = 1e-5  # float32 matmul against the float64 oracle, unit vectors of 1792 dims


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    china = load_sample_images().images[0]  # 427 x 640
    paths = []
    for i, (y, x, h, w) in enumerate([(0, 0, 300, 400), (100, 200, 250, 250), (50, 300, 377, 200)]):
        paths.append(d / f"china_{i}.png")
        Image.fromarray(china[y:y + h, x:x + w]).save(paths[-1])
    variables = weights.random_variables("resnet50")
    fit = pipeline.fit(paths, config=CONFIG, variables=variables, progress=False)
    patches, index = pipeline.extract_patches(paths, variables, CONFIG, progress=False,
                                              with_index=True)
    return paths, variables, fit, patches, index


def test_exemplar_is_the_argmax_over_the_fitted_patches(fitted):
    paths, _, fit, patches, index = fitted
    sims = patches.astype(np.float64) @ fit.prototypes.astype(np.float64).T  # [n, k] oracle
    ex = fit.exemplars
    image, cell = np.divmod(index, 16 * 16)  # extract_patches' order: image-major, row-major
    where = {(str(paths[i]), int(r), int(c)): n
             for n, (i, (r, c)) in enumerate(zip(image, zip(*np.divmod(cell, 16))))}
    chosen = [where[(str(p), int(r), int(c))] for p, r, c in zip(ex.paths, ex.rows, ex.cols)]
    got = sims[chosen, np.arange(fit.num_prototypes)]
    err = np.abs(got - sims.max(axis=0)).max()  # the chosen patch reaches the max (ties allowed)
    norms = np.linalg.norm(fit.prototypes.astype(np.float64), axis=1)
    cos_err = np.abs(ex.cosines - sims.max(axis=0) / norms).max()
    print(f"exemplar similarity vs oracle max: {err:.2e}; cosine error {cos_err:.2e} (tol {TOL})")
    assert err <= TOL and cos_err <= TOL
    level = np.quantile(sims.max(axis=1), exemplars.COVERAGE_QUANTILE)
    print(f"coverage level {fit.coverage['level']:.6f} vs oracle {level:.6f}")
    assert abs(fit.coverage["level"] - level) <= TOL
    assert fit.coverage["num_patches"] == len(patches) == 700


def test_box_covers_the_patch_cell_in_the_preprocessed_image(fitted):
    """Oracle: paint the box into an image of the original size, preprocess it like a mask (the
    NEAREST resize and crop of ground truth): the patch's 4 x 4 cell lies inside the box, and
    the box is at most one cell wider on each side."""
    _, _, fit, _, _ = fitted
    ex = fit.exemplars
    for path, r, c, box in zip(ex.paths, ex.rows, ex.cols, ex.boxes):
        w, h = preprocess.image_size(path)
        mask = np.zeros((h, w), np.uint8)
        mask[box[1]:box[3], box[0]:box[2]] = 255
        crop = preprocess.preprocess_mask(Image.fromarray(mask), CONFIG.resize, CONFIG.image_size)
        assert crop[4 * r:4 * r + 4, 4 * c:4 * c + 4].all(), (path, r, c, box)
        rows, cols = np.nonzero(crop)
        assert rows.min() >= 4 * r - 4 and rows.max() < 4 * r + 8, (r, rows.min(), rows.max())
        assert cols.min() >= 4 * c - 4 and cols.max() < 4 * c + 8, (c, cols.min(), cols.max())


@pytest.mark.parametrize("n", [1, 300, 1000])
def test_nearest_matches_numpy_for_any_chunking(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 1792)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    p = rng.normal(size=(7, 1792)).astype(np.float32)
    sims = x.astype(np.float64) @ p.astype(np.float64).T
    for chunk in (None, 256):
        got = exemplars.nearest(x, p, chunk=chunk)
        err = max(np.abs(got.patch_sim - sims.max(axis=1)).max(),
                  np.abs(got.prototype_sim - sims.max(axis=0)).max(),
                  np.abs(sims[got.patch_index, np.arange(7)] - sims.max(axis=0)).max())
        print(f"n={n} chunk={chunk}: max error {err:.2e} (tol {TOL})")
        assert err <= TOL


def test_nearest_compiles_once_per_shape():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 1792)).astype(np.float32)
    p = rng.normal(size=(5, 1792)).astype(np.float32)
    fn = exemplars._chunk_fn()
    exemplars.nearest(x, p, chunk=256)
    before = fn._cache_size()
    exemplars.nearest(x[::-1].copy(), p + 1, chunk=256)  # new values, same shapes
    assert fn._cache_size() == before


def test_model_file_keeps_exemplars_and_older_files_load_without(fitted, tmp_path):
    _, _, fit, _, _ = fitted
    back = load_model(fit.save(tmp_path / "m.npz"))
    for name in model.Exemplars._fields:
        np.testing.assert_array_equal(getattr(back.exemplars, name), getattr(fit.exemplars, name))
    assert back.coverage == fit.coverage
    old = dataclasses.replace(fit, exemplars=None, coverage=None)
    path = old.save(tmp_path / "old.npz")
    assert not set(model.EXEMPLAR_KEYS) & set(np.load(path).files)
    loaded = load_model(path)
    assert loaded.exemplars is None and loaded.coverage is None
    np.testing.assert_array_equal(loaded.prototypes, fit.prototypes)


def test_misshapen_exemplars_are_a_model_file_error(fitted, tmp_path):
    _, _, fit, _, _ = fitted
    path = fit.save(tmp_path / "m.npz")
    arrays = dict(np.load(path))
    arrays["exemplar_rows"] = arrays["exemplar_rows"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(model.ModelFileError, match="bad.npz.*exemplar rows"):
        load_model(tmp_path / "bad.npz")
