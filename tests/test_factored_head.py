"""The factored head (prototype similarities at each stage's own resolution) against the head on
the concatenated embedding: the same maps up to float32 rounding.

Oracle: ``scoring.score_image(features.embed(stages), ...)``, the concatenated path that
test_scoring.py checks against torch, cv2 and scipy. docs/METHOD.md section 1, "Factored head".
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_sample_images

from protoad_jax import backbone, features, scoring, weights
from protoad_jax.config import EMBED_LAYERS
from protoad_jax.datasets import demo

# float32 rounding of sums over 1792 channels taken in another order: a few ulps of values <= 2.
TOL = 2e-6


@pytest.fixture(scope="module")
def stages():
    """Backbone stages of 4 real photographs (crops of scikit-learn's samples), random-init
    wide_resnet50_2 with BatchNorm folded, as the scoring path runs it."""
    x = np.stack(demo.photo_crops(load_sample_images().images, 4, seed=5))
    variables = backbone.fold_batchnorm(weights.random_variables("wide_resnet50_2"))
    net = backbone.ResNet(arch="wide_resnet50_2", folded=True)
    feats = jax.jit(net.apply)(variables, x)
    return [np.asarray(feats[k]) for k in EMBED_LAYERS]


def _prototypes(stages, k, seed, normalize):
    """Prototypes like fitted ones: means of a few patch embeddings plus a little noise."""
    emb = np.array(jax.vmap(features.embed)(dict(zip(EMBED_LAYERS, stages)))).reshape(-1, 1792)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    protos = emb[rng.integers(0, len(emb), (k, 3))].mean(axis=1)
    protos += 0.01 * rng.normal(size=protos.shape) * np.abs(protos).mean()
    return np.asarray(scoring.prepare_prototypes(protos, normalize))


@functools.cache
def _heads(chunk_size):
    kw = {"out_size": (224, 224), "sigma": 4.0, "truncate": 4.0, "image_score": "smoothed_max",
          "chunk_size": chunk_size}

    def concatenated(s1, s2, s3, p):
        return scoring.score_image(features.embed(dict(zip(EMBED_LAYERS, (s1, s2, s3)))), p, **kw)

    def factored(s1, s2, s3, p):
        return scoring.score_features([s1, s2, s3], p, **kw)

    batch = functools.partial(jax.vmap, in_axes=(0, 0, 0, None))
    return jax.jit(batch(concatenated)), jax.jit(batch(factored))


@pytest.mark.parametrize("k,normalize,chunk", [
    (1, True, None), (100, True, None), (100, False, None), (1000, True, None),
    (1000, False, 384), (1000, True, "auto"), (10000, True, 2048),
], ids=["k1", "k100", "k100-raw", "k1000", "k1000-raw-chunked", "k1000-auto", "k10000-chunked"])
def test_factored_equals_concatenated_on_photographs(stages, k, normalize, chunk):
    protos = _prototypes(stages, k, k, normalize)
    concatenated, factored = _heads(chunk)
    want = concatenated(*stages, protos)
    got = factored(*stages, protos)
    errs = {name: float(jnp.abs(getattr(got, name) - getattr(want, name)).max())
            for name in ("patch_map", "anomaly_map", "score")}
    print(f"K={k} normalize={normalize} chunk={chunk}: max |factored - concatenated| "
          + ", ".join(f"{n} {e:.2e}" for n, e in errs.items())
          + f" (tol {TOL}; patch scores in [{float(want.patch_map.min()):.3f}, "
          f"{float(want.patch_map.max()):.3f}])")
    assert max(errs.values()) <= TOL, errs
    # Not vacuous: the maps vary over the image (a constant map would hide a misplaced stage).
    assert float(want.patch_map.std()) > 1e-3


@pytest.mark.parametrize("sizes", [
    ((56, 56), (28, 28), (14, 14)),   # nested: broadcasting
    ((12, 20), (6, 10), (3, 5)),      # nested, not square
    ((50, 50), (25, 25), (13, 13)),   # 13 -> 25 is no exact x2: gathers
    ((7, 9), (4, 5), (2, 3)),         # odd sizes: torch's nearest index rule
], ids=["56", "12x20", "50", "7x9"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_factored_on_every_grid_and_chunking(sizes, chunk):
    rng = np.random.default_rng(sum(map(sum, sizes)))
    chans = (5, 7, 11)
    stages = [np.maximum(rng.normal(size=s + (c,)), 0).astype(np.float32) for s, c in zip(sizes, chans)]
    protos = rng.normal(size=(8, sum(chans))).astype(np.float32)
    want = scoring.patch_scores(features.embed(dict(zip(EMBED_LAYERS, stages))), protos)
    got = jax.jit(functools.partial(scoring.patch_scores_factored, chunk_size=chunk))(stages, protos)
    err = float(jnp.abs(got - want).max())
    print(f"{sizes} chunk {chunk}: max |factored - concatenated| {err:.2e} (tol {TOL})")
    assert got.shape == sizes[0] and err <= TOL


def test_nested_shapes_and_zero_features():
    grids = features.grid_indices(((56, 56), (28, 28), (14, 14)))
    assert scoring.nested_shapes(grids, (56, 56)) == [(14, 2, 2, 14, 2, 2), (14, 2, 1, 14, 2, 1),
                                                      (14, 1, 1, 14, 1, 1)]
    assert scoring.nested_shapes(features.grid_indices(((50, 50), (25, 25), (13, 13))), (50, 50)) is None
    # All-zero features: x / max(|x|, 1e-12) is 0, similarity 0, score 1, as the reference.
    zeros = [np.zeros((4, 4, 2), np.float32), np.zeros((2, 2, 3), np.float32)]
    got = scoring.patch_scores_factored(zeros, np.ones((2, 5), np.float32))
    assert np.array_equal(np.asarray(got), np.ones((4, 4), np.float32))


def test_factored_bad_inputs():
    s = [np.zeros((4, 4, 2), np.float32), np.zeros((2, 2, 3), np.float32)]
    with pytest.raises(ValueError, match=r"prototypes must be \[k >= 1, 5\]"):
        scoring.patch_scores_factored(s, np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="finest first"):
        scoring.patch_scores_factored([np.zeros((1, 4, 4, 2))], np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        scoring.patch_scores_factored(s, np.ones((2, 5), np.float32), chunk_size=0)


def test_auto_chunk_size_rule():
    """``"auto"`` (the scoring path's default) chunks only above ``AUTO_CHUNK`` prototypes."""
    a = scoring.AUTO_CHUNK
    assert scoring.resolve_chunk_size("auto", a) is None
    assert scoring.resolve_chunk_size("auto", a + 1) == a
    assert scoring.resolve_chunk_size(None, 10 * a) is None
    assert scoring.resolve_chunk_size(7, 3) == 7
    with pytest.raises(ValueError, match="'auto' or None"):
        scoring.resolve_chunk_size("fast", 10)
