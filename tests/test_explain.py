"""Explanations: the nearest-prototype index map against a NumPy argmax, its jitted region, the
peak patch, and regions.json's explanation entries.

A random resnet50 at 64 x 64 (16 x 16 patch grid), K = 10 prototypes fitted on crops of
scikit-learn's sample photos.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from protoad_jax import (
    Config,
    explain,
    model,
    pipeline,
    prediction,
    preprocess,
    regions,
    scoring,
    weights,
)

CONFIG = Config(arch="resnet50", image_size=64, resize=72, num_prototypes=10, max_patches=500)
TOL = 1e-5


def _oracle_sims(stages: list[np.ndarray], prototypes: np.ndarray) -> np.ndarray:
    """NumPy transcription: nearest-upsample every stage to the finest grid (np.repeat),
    concatenate, L2-normalise, dot with the prototypes: ``[h, w, k]`` float64."""
    h = stages[0].shape[0]
    up = [np.repeat(np.repeat(s.astype(np.float64), h // s.shape[0], 0), h // s.shape[1], 1)
          for s in stages]
    emb = np.concatenate(up, axis=-1)
    emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb @ prototypes.astype(np.float64).T


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_index_map_is_the_numpy_argmax(chunk_size):
    rng = np.random.default_rng(0)
    stages = [np.abs(rng.normal(size=(s, s, c))).astype(np.float32)
              for s, c in ((16, 256), (8, 512), (4, 1024))]
    p = rng.normal(size=(11, 1792)).astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    sims = _oracle_sims(stages, p)
    fn = jax.jit(lambda a, b, c, q: scoring.patch_scores_factored([a, b, c], q, chunk_size,
                                                                  nearest=True))
    patch_map, index = (np.asarray(x) for x in fn(*stages, p))
    plain = np.asarray(jax.jit(lambda a, b, c, q: scoring.patch_scores_factored([a, b, c], q,
                                                                                chunk_size))(*stages, p))
    picked = np.take_along_axis(sims, index[..., None].astype(np.int64), -1)[..., 0]
    err = np.abs(picked - sims.max(-1)).max()  # the chosen prototype reaches the max (ties allowed)
    map_err = max(np.abs(patch_map - (1 - sims.max(-1))).max(), np.abs(patch_map - plain).max())
    print(f"chunk {chunk_size}: index-map similarity error {err:.2e}, patch map error {map_err:.2e} "
          f"(tol {TOL})")
    assert index.dtype == np.int32 and index.min() >= 0 and index.max() < len(p)
    assert err <= TOL and map_err <= TOL


def test_score_features_nearest_vmaps():
    rng = np.random.default_rng(1)
    stages = [np.abs(rng.normal(size=(2, s, s, c))).astype(np.float32)
              for s, c in ((16, 256), (8, 512), (4, 1024))]
    p = rng.normal(size=(5, 1792)).astype(np.float32)
    kw = {"out_size": (64, 64), "sigma": 4.0, "truncate": 4.0, "image_score": "smoothed_max"}
    res, index = jax.jit(jax.vmap(lambda s, q: scoring.score_features_nearest(s, q, **kw),
                                  in_axes=(0, None)))(stages, p)
    plain = jax.vmap(lambda s, q: scoring.score_features(s, q, **kw), in_axes=(0, None))(stages, p)
    assert index.shape == (2, 16, 16)
    err = np.abs(np.asarray(res.anomaly_map) - np.asarray(plain.anomaly_map)).max()
    print(f"anomaly map with vs without the index: {err:.2e}")
    assert err <= 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    china, flower = load_sample_images().images
    train = []
    for i in range(2):
        train.append(d / f"china_{i}.png")
        Image.fromarray(china[60 * i:60 * i + 300, 100 * i:100 * i + 360]).save(train[-1])
    test = d / "flower.png"
    Image.fromarray(flower[50:350, 100:420]).save(test)
    variables = weights.random_variables("resnet50")
    fit = pipeline.fit(train, config=CONFIG, variables=variables, progress=False)
    return train, test, variables, fit


def test_nearest_maps_match_the_embedding_argmax_and_the_plain_scorer(setup):
    train, test, variables, fit = setup
    images = [test, *train]
    ex = explain.nearest_maps(fit, images, variables, batch_size=2, progress=False)
    plain = pipeline.score_images(fit, images, variables, batch_size=2, progress=False)
    every = dataclasses.replace(CONFIG, max_patches=None)
    patches = pipeline.extract_patches(images, variables, every, progress=False)  # all 3 x 256
    sims = (patches.astype(np.float64) @ fit.prototypes.astype(np.float64).T).reshape(3, 16, 16, -1)
    picked = np.take_along_axis(sims, ex.nearest[..., None].astype(np.int64), -1)[..., 0]
    err = np.abs(picked - sims.max(-1)).max()
    map_err = np.abs(ex.scored.maps - plain.maps).max()
    print(f"index map vs NumPy argmax: similarity error {err:.2e}; maps vs score_images {map_err:.2e}")
    assert err <= TOL and map_err <= 1e-6
    np.testing.assert_array_equal(ex.scored.scores, plain.scores)


def test_peak_patch_is_the_cell_under_the_peak_pixel():
    window = regions.crop_window(400, 300, 72, 64)  # resized 96 x 72, crop offset (16, 4)
    for x, y in [(0, 0), (133, 20), (399, 299), (200, 150)]:
        r = regions.Region(1, (x, y, x + 1, y + 1), 1.0, (x, y), (x, y))
        row, col = explain.peak_patch(r, window, 16)
        # Oracle: the crop pixel of the peak's centre, at 4 crop pixels per cell.
        cx = (x + 0.5) * 96 / 400 - 16
        cy = (y + 0.5) * 72 / 300 - 4
        assert (row, col) == (min(15, max(0, int(cy // 4))), min(15, max(0, int(cx // 4))))


def test_regions_json_has_explanations_and_closest_looks(setup, tmp_path):
    train, test, variables, fit = setup
    ex = explain.nearest_maps(fit, [test], variables, batch_size=1, progress=False)
    threshold = float(np.quantile(ex.scored.maps, 0.95))  # flags the image, some regions
    prediction.write_predictions(tmp_path, [test], ex.scored, threshold, root=test,
                                 resize=CONFIG.resize, crop=CONFIG.image_size,
                                 explainer=explain.Explainer(fit, ex))
    entry = json.loads((tmp_path / "regions.json").read_text())["images"][0]
    assert entry["regions"]
    for r in entry["regions"]:
        e = r["explanation"]
        row, col = e["patch"]
        assert e["prototype"] == int(ex.nearest[0, row, col])
        assert abs(e["similarity"] - (1 - ex.scored.patch_maps[0, row, col])) <= 1e-6
        assert e["exemplar"]["path"] in {str(p) for p in train}
        assert e["exemplar"] == fit.exemplars.entry(e["prototype"])
    assert (tmp_path / entry["closest_look"]).exists()
    # A model file written before exemplars: the explanation says so, nothing to draw.
    old = model.Model(fit.prototypes, fit.config, fit.weights)
    found = regions.find_regions(ex.scored.maps[0], threshold, *preprocess.image_size(test),
                                 CONFIG.resize, CONFIG.image_size)
    plain = explain.Explainer(old, ex).regions(test, found)
    assert all(e["exemplar"] is None and e["note"] == model.NO_EXEMPLARS for e in plain)
    assert explain.closest_look(test, found, plain, CONFIG) is None


def test_report_looks_pair_the_most_anomalous_regions_with_exemplars(setup, tmp_path):
    """evaluate's closest looks: the n highest scores, regions above the 0.99 quantile of all
    map pixels (NumPy), each look written; the report shows them under one heading."""
    from protoad_jax import evaluation

    train, test, variables, fit = setup
    images = [train[0], test, train[1]]
    scored = pipeline.score_images(fit, images, variables, batch_size=2, progress=False)
    looks = explain.report_looks(fit, images, scored, variables, tmp_path / "cat", n=2,
                                 batch_size=2)
    assert looks["threshold"] == float(np.quantile(scored.maps, 0.99))
    top = [images[i] for i in np.argsort(-scored.scores, kind="stable")[:2]]
    expected = []
    for rank, path in enumerate(top, 1):
        found = regions.find_regions(scored.maps[images.index(path)], looks["threshold"],
                                     *preprocess.image_size(path), CONFIG.resize, CONFIG.image_size)
        if found.regions:
            expected.append(f"closest/most_{rank:02d}_{path.stem}.png")
    print(f"looks {looks['images']}, expected {expected}")
    assert expected and looks["images"] == expected
    assert all((tmp_path / "cat" / p).exists() for p in expected)
    evaluation.summarize([{"category": "cat", "closest_looks": looks}], tmp_path, {}, [])
    page = (tmp_path / "report.html").read_text()
    assert "closest normal look" in page and all(f"cat/{p}" in page for p in expected)
