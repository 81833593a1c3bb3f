"""Embedding and scoring head against torch, cv2, scipy and a NumPy transcription.

docs/METHOD.md section 1.
"""

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
import torch_reference
from PIL import Image

from protoad_jax import features, scoring

MAP_TOL = 1e-6     # upsample / blur vs cv2 / scipy
PATCH_TOL = 2e-6   # patch map vs float64 NumPy and float32 torch
HEAD_TOL = 1e-5    # full head vs the torch/cv2/scipy reference


def _rng(seed):
    return np.random.default_rng(seed)


def _embedding(seed, h=56, w=56, c=1792):
    """Non-negative (post-ReLU-like), non-constant patch features."""
    return np.maximum(_rng(seed).normal(size=(h, w, c)), 0).astype(np.float32)


def _prototypes(emb, k, seed):
    """Cluster-mean-like prototypes: means of random groups of patches plus noise (raw, not unit)."""
    rng = _rng(seed)
    flat = emb.reshape(-1, emb.shape[-1])
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    groups = rng.integers(0, flat.shape[0], size=(k, 3))
    protos = flat[groups].mean(axis=1) + 0.02 * rng.normal(size=(k, flat.shape[1]))
    return protos.astype(np.float32)


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------- embed


def _torch_embed(f1, f2, f3):
    t = [torch.from_numpy(f.transpose(2, 0, 1)[None].copy()) for f in (f1, f2, f3)]
    f23 = torch.cat([t[1], F.interpolate(t[2], size=t[1].shape[2:], mode="nearest")], dim=1)
    out = torch.cat([t[0], F.interpolate(f23, size=t[0].shape[2:], mode="nearest")], dim=1)
    return out[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("sizes,chans", [
    (((56, 56), (28, 28), (14, 14)), (256, 512, 1024)),
    (((12, 20), (6, 10), (3, 5)), (4, 6, 8)),   # non-square, exact x2
    (((7, 9), (4, 5), (2, 3)), (3, 5, 7)),      # odd sizes: torch size= index rule
], ids=["56", "12x20", "7x9"])
def test_embed_matches_torch_interpolate_cat(sizes, chans):
    rng = _rng(sum(chans))
    f1, f2, f3 = (rng.normal(size=s + (c,)).astype(np.float32) for s, c in zip(sizes, chans))
    got = np.asarray(jax.jit(features.embed)({"layer1": f1, "layer2": f2, "layer3": f3}))
    want = _torch_embed(f1, f2, f3)
    err = _err(got, want)
    print(f"embed {sizes}: shape {got.shape} max abs err {err:.1e} (tol 0, exact)")
    assert got.shape == sizes[0] + (sum(chans),) and got.dtype == np.float32
    assert err == 0.0, f"embed differs from torch interpolate+cat by {err} (must be exact)"


def test_embed_x2_is_repeat_and_bad_inputs():
    assert np.array_equal(features.nearest_indices(14, 28), np.repeat(np.arange(14), 2))
    with pytest.raises(ValueError, match="missing"):
        features.embed({"layer1": np.zeros((4, 4, 2)), "layer2": np.zeros((2, 2, 2))})
    with pytest.raises(ValueError, match=r"\[h, w, c\]"):
        features.embed({k: np.zeros((1, 4, 4, 2)) for k in ("layer1", "layer2", "layer3")})


def test_reference_embed_matches_trunk_plus_embed():
    """torch_reference.reference_embed == oracles' torchvision trunk features + our embed."""
    from oracles import random_torchvision_model, torch_stage_features
    model = random_torchvision_model("resnet50", seed=3)
    x = _rng(3).normal(size=(1, 3, 64, 96)).astype(np.float32)
    want = torch_reference.reference_embed(model, x)[0].numpy().transpose(1, 2, 0)
    feats = torch_stage_features(model, x)
    got = np.asarray(features.embed({k: v[0] for k, v in feats.items()}))
    err = _err(got, want)
    print(f"reference_embed vs trunk+embed: shape {want.shape} max abs err {err:.1e} (tol 0)")
    assert want.shape == (16, 24, 1792) and err == 0.0


def test_reference_transform_shapes():
    img = Image.fromarray(_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    x = torch_reference.reference_transform()(img)
    assert tuple(x.shape) == (3, 224, 224) and x.dtype == torch.float32
    assert float(x.std()) > 0.1


# ---------------------------------------------------------------- patch scores


@pytest.fixture(scope="module")
def emb():
    return _embedding(0)


def _numpy_patch_scores(emb, protos):
    """The reference formula in float64: 1 - max_k <P_k, x / max(|x|, 1e-12)>."""
    x = emb.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return 1.0 - (x @ protos.astype(np.float64).T).max(axis=-1)


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "raw"])
@pytest.mark.parametrize("k", [1, 7, 300])
def test_patch_scores_vs_numpy_and_torch_conv(emb, k, normalize):
    raw = _prototypes(emb, k, seed=k)
    protos = scoring.prepare_prototypes(raw, normalize)
    got = np.asarray(jax.jit(scoring.patch_scores)(emb, protos))
    want_np = _numpy_patch_scores(emb, np.asarray(protos))
    want_torch, _, _ = torch_reference.reference_head(emb.transpose(2, 0, 1)[None], np.asarray(protos))
    e_np, e_t = _err(got, want_np), _err(got, want_torch[0])
    print(f"patch_scores K={k} {'cosine' if normalize else 'raw'}: range [{got.min():.3f}, "
          f"{got.max():.3f}] max err vs numpy {e_np:.2e}, vs torch conv {e_t:.2e} (tol {PATCH_TOL})")
    assert got.shape == (56, 56) and got.std() > 1e-3
    assert e_np < PATCH_TOL, f"vs numpy {e_np} >= {PATCH_TOL}"
    assert e_t < PATCH_TOL, f"vs torch {e_t} >= {PATCH_TOL}"


@pytest.mark.parametrize("k,chunk", [(7, 3), (300, 128), (300, 1), (5, 5), (5, 64)])
def test_chunked_equals_unchunked(emb, k, chunk):
    protos = scoring.prepare_prototypes(_prototypes(emb, k, seed=k + 1), normalize=True)
    full = np.asarray(jax.jit(scoring.patch_scores)(emb, protos))
    chunked = np.asarray(jax.jit(scoring.patch_scores, static_argnums=2)(emb, protos, chunk))
    err = _err(full, chunked)
    print(f"chunked K={k} chunk={chunk}: max abs err {err:.1e} (tol 1e-6)")
    assert err <= 1e-6, f"chunked differs by {err}"


def test_prepare_prototypes():
    p = _rng(1).normal(size=(5, 8)) * 3
    raw = np.asarray(scoring.prepare_prototypes(p, normalize=False))
    unit = np.asarray(scoring.prepare_prototypes(p, normalize=True))
    assert raw.dtype == np.float32 and np.array_equal(raw, p.astype(np.float32))
    err = _err(unit, p / np.linalg.norm(p, axis=1, keepdims=True))
    assert err < 1e-6, f"normalised prototypes off by {err}"
    z = np.asarray(scoring.l2_normalize(np.zeros((2, 3), np.float32)))
    assert np.array_equal(z, np.zeros((2, 3)))  # eps clamp, no NaN (torch F.normalize)


def test_bad_inputs_raise_clear_errors(emb):
    good = np.ones((4, 1792), np.float32)
    with pytest.raises(ValueError, match="width 1000 does not match.*1792"):
        scoring.patch_scores(emb, np.ones((4, 1000), np.float32))
    with pytest.raises(ValueError, match="width 1000 does not match"):
        jax.jit(scoring.score_image)(emb, np.ones((4, 1000), np.float32))
    with pytest.raises(ValueError, match="k >= 1"):
        scoring.prepare_prototypes(np.zeros((0, 1792), np.float32), normalize=True)
    with pytest.raises(ValueError, match="k >= 1"):
        scoring.patch_scores(emb, np.zeros((0, 1792), np.float32))
    nan = good.copy()
    nan[2, 5] = np.nan
    with pytest.raises(ValueError, match="finite.*1 of 4 rows.*\\[2\\]"):
        scoring.prepare_prototypes(nan, normalize=False)
    with pytest.raises(ValueError, match=r"\[k, c\]"):
        scoring.prepare_prototypes(np.ones(5), normalize=True)
    with pytest.raises(ValueError, match=r"one image's \[h, w, c\]"):
        scoring.patch_scores(emb[None], good)
    with pytest.raises(ValueError, match="chunk_size"):
        scoring.patch_scores(emb, good, chunk_size=0)
    with pytest.raises(ValueError, match="image_score"):
        scoring.score_image(emb, good, image_score="mean")
    with pytest.raises(ValueError, match="sigma"):
        scoring.gaussian_blur(np.ones((4, 4)), sigma=-1.0)


# ---------------------------------------------------------------- upsample and blur


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("src,dst", [((56, 56), (224, 224)), ((28, 40), (112, 150)), ((7, 9), (30, 17))],
                         ids=["56-224", "28x40-112x150", "7x9-30x17"])
def test_upsample_bilinear_matches_cv2(src, dst, dtype):
    m = _rng(src[0]).normal(size=src).astype(dtype)
    want = cv2.resize(m, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
    got = np.asarray(jax.jit(scoring.upsample_bilinear, static_argnums=1)(m, dst))
    exact = scoring.bilinear_matrix(src[0], dst[0]) @ m.astype(np.float64) @ scoring.bilinear_matrix(src[1], dst[1]).T
    err, err64 = _err(got, want), _err(exact, want)
    print(f"bilinear {src}->{dst} {dtype.__name__}: jax vs cv2 {err:.2e}, float64 matrices vs cv2 "
          f"{err64:.2e} (tol {MAP_TOL})")
    assert got.shape == dst and err < MAP_TOL, f"upsample vs cv2 {err} >= {MAP_TOL}"
    # cv2 computes float-image weights in double: float64 matrices agree to rounding.
    assert err64 < (1e-12 if dtype == np.float64 else MAP_TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,sigma", [((224, 224), 4.0), ((112, 150), 2.5), ((20, 37), 4.0), ((5, 7), 2.5)],
                         ids=["224-s4", "112x150-s2.5", "20x37-s4", "5x7-s2.5-kernel-wider-than-axis"])
def test_gaussian_blur_matches_scipy(shape, sigma, dtype):
    m = _rng(shape[1]).normal(size=shape).astype(dtype)
    want = scipy.ndimage.gaussian_filter(m, sigma=sigma, mode="reflect")
    got = np.asarray(jax.jit(scoring.gaussian_blur, static_argnums=(1, 2))(m, sigma, 4.0))
    err = _err(got, want)
    print(f"gaussian {shape} sigma={sigma} {dtype.__name__}: max abs err {err:.2e} (tol {MAP_TOL})")
    assert got.shape == shape and err < MAP_TOL, f"blur vs scipy {err} >= {MAP_TOL}"


def test_float64_under_x64_matches_to_rounding():
    """With jax_enable_x64 the float64 path reproduces cv2 and scipy float64 to ~1e-15."""
    m = _rng(4).normal(size=(28, 40))
    # jax.enable_x64 from jax 0.8; jax.experimental.enable_x64 before it (pyproject's floor: 0.6.1).
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    with enable_x64(True):
        up = scoring.upsample_bilinear(m, (112, 150))
        blur = scoring.gaussian_blur(np.asarray(up), 4.0)
        assert up.dtype == jnp.float64 and blur.dtype == jnp.float64
    e_up = _err(up, cv2.resize(m, (150, 112), interpolation=cv2.INTER_LINEAR))
    e_blur = _err(blur, scipy.ndimage.gaussian_filter(np.asarray(up), 4.0, mode="reflect"))
    print(f"x64: bilinear vs cv2 {e_up:.1e}, blur vs scipy {e_blur:.1e} (tol 1e-12)")
    assert e_up < 1e-12 and e_blur < 1e-12


def test_gaussian_kernel_and_sigma_zero():
    assert scoring.gaussian_kernel(4.0, 4.0).size == 33
    m = _rng(2).normal(size=(6, 9)).astype(np.float32)
    assert np.array_equal(np.asarray(scoring.gaussian_blur(m, sigma=0.0)), m)


# ---------------------------------------------------------------- full head


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "raw"])
def test_score_image_matches_reference(normalize):
    embs = np.stack([_embedding(10), _embedding(11)])
    protos = np.asarray(scoring.prepare_prototypes(_prototypes(embs[0], 64, seed=5), normalize))
    ref_patch, ref_maps, ref_scores, ref_patch_scores = torch_reference.reference_head(
        embs.transpose(0, 3, 1, 2), protos, return_patch_score=True)
    for mode, ref_score in (("smoothed_max", ref_scores), ("patch_max", ref_patch_scores)):
        fn = jax.jit(jax.vmap(functools.partial(scoring.score_image, image_score=mode, chunk_size=24),
                              in_axes=(0, None)))
        out = fn(embs, protos)
        errs = (_err(out.patch_map, ref_patch), _err(out.anomaly_map, ref_maps), _err(out.score, ref_score))
        print(f"score_image {'cosine' if normalize else 'raw'} {mode}: max err patch {errs[0]:.2e} "
              f"map {errs[1]:.2e} score {errs[2]:.2e} (tol {HEAD_TOL}); scores {np.asarray(out.score)}")
        assert out.anomaly_map.shape == (2, 224, 224) and out.score.shape == (2,)
        assert max(errs) < HEAD_TOL, f"{mode}: errors {errs} >= {HEAD_TOL}"


# ---------------------------------------------------------------- transform contracts


def _small_case(seed, n=None):
    emb = _embedding(seed, 8, 10, 16) if n is None else np.stack([_embedding(seed + i, 8, 10, 16) for i in range(n)])
    protos = _prototypes(emb.reshape(-1, 8, 10, 16)[0], 9, seed)
    return emb, np.asarray(scoring.prepare_prototypes(protos, True))


def test_jit_equals_eager():
    emb, protos = _small_case(20)
    kw = {"out_size": (32, 40), "sigma": 2.0, "chunk_size": 4}
    eager = scoring.score_image(emb, protos, **kw)
    jitted = jax.jit(functools.partial(scoring.score_image, **kw))(emb, protos)
    errs = [_err(a, b) for a, b in zip(eager, jitted)]
    print(f"jit vs eager max errs {errs}")
    assert max(errs) < 1e-6


def test_vmap_equals_loop():
    embs, protos = _small_case(30, n=3)
    fn = functools.partial(scoring.score_image, out_size=(32, 40), sigma=2.0, image_score="patch_max")
    batched = jax.vmap(fn, in_axes=(0, None))(embs, protos)
    for i in range(3):
        single = fn(embs[i], protos)
        errs = [_err(a[i], b) for a, b in zip(batched, single)]
        assert max(errs) < 1e-6, f"image {i}: vmap vs loop {errs}"


def test_second_call_does_not_recompile():
    traces = []

    def counted(emb, protos):
        traces.append(1)
        return scoring.score_image(emb, protos, out_size=(32, 40), chunk_size=4)

    fn = jax.jit(counted)
    (e1, p1), (e2, p2) = _small_case(40), _small_case(41)
    a = fn(e1, p1)
    b = fn(e2, p2)
    assert len(traces) == 1 and fn._cache_size() == 1, f"traced {len(traces)} times"
    assert not np.allclose(a.score, b.score)  # different data really went through
