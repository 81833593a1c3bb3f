"""Per-image ProtoAD head: normalise, prototype matmul, channel max, 1 - x, upsample, blur, score.

docs/METHOD.md section 1. Every function is pure and per image (batch with ``jax.vmap``); sizes,
sigma, truncate, image-score mode and chunk size are static Python values. The fixed linear maps
(bilinear upsampling, Gaussian blur) are built once per size in NumPy, float64, and applied as
small matrices, which reproduces OpenCV / SciPy exactly up to float32 rounding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from protoad_jax.config import IMAGE_SCORES

NORM_EPS = 1e-12  # torch F.normalize default
# The upsample/blur matrices are tiny; run them at full float32 precision on every backend so
# the map matches cv2/scipy even where the default matmul precision is TF32 or bf16 passes.
_EXACT = lax.Precision.HIGHEST


class ScoreResult(NamedTuple):
    """Per-image scores.

    Attributes:
      patch_map: ``[h, w]`` raw patch anomaly map ``1 - max_k <P_k, x_ij / |x_ij|>``.
      anomaly_map: ``[H, W]`` bilinearly upsampled and Gaussian-smoothed map.
      score: ``[]`` image anomaly score.
    """

    patch_map: jax.Array
    anomaly_map: jax.Array
    score: jax.Array


def l2_normalize(x: jax.typing.ArrayLike) -> jax.Array:
    """``x / max(||x||, 1e-12)`` over the last axis (torch ``F.normalize`` semantics).

    Args:
      x: ``[..., c]``.

    Returns:
      ``[..., c]``, same float dtype (integers become float32).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, NORM_EPS)


def prepare_prototypes(prototypes: jax.typing.ArrayLike, normalize: bool) -> jax.Array:
    """Validates prototypes and optionally L2-normalises them, once, before scoring.

    Args:
      prototypes: ``[k, c]`` cluster means.
      normalize: True: unit rows, so the head is true cosine similarity (the paper, the default).
        False: rows used as given, as the published reference code does (raw cluster means as
        1x1 conv kernels).

    Returns:
      ``[k, c]`` float32.

    Raises:
      ValueError: not rank 2, ``k == 0``, ``c == 0``, or (for concrete arrays) a NaN/inf entry.
    """
    p = jnp.asarray(prototypes, jnp.float32)
    if p.ndim != 2:
        raise ValueError(f"prototypes must have shape [k, c], got shape {p.shape}")
    if p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"prototypes must have k >= 1 rows and c >= 1 channels, got shape {p.shape}")
    if not isinstance(p, jax.core.Tracer):  # values are only checkable outside jit
        finite = np.isfinite(np.asarray(p)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"prototypes must be finite; {bad.size} of {p.shape[0]} rows contain "
                             f"NaN or inf (first rows: {bad[:5].tolist()})")
    return l2_normalize(p) if normalize else p


def _check_head_inputs(embedding: jax.Array, prototypes: jax.Array) -> None:
    if embedding.ndim != 3:
        raise ValueError(f"embedding must be one image's [h, w, c], got shape {embedding.shape} "
                         "(vmap over the batch axis)")
    if prototypes.ndim != 2 or prototypes.shape[0] < 1:
        raise ValueError(f"prototypes must have shape [k, c] with k >= 1, got shape {prototypes.shape}")
    if prototypes.shape[1] != embedding.shape[-1]:
        raise ValueError(f"prototype width {prototypes.shape[1]} does not match the embedding's "
                         f"{embedding.shape[-1]} channels (prototypes {prototypes.shape}, "
                         f"embedding {embedding.shape})")


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size`` as an int, or None; raises ValueError unless a positive integer or None."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


def patch_scores(embedding: jax.typing.ArrayLike, prototypes: jax.typing.ArrayLike,
                 chunk_size: int | None = None) -> jax.Array:
    """Patch anomaly map ``s_ij = 1 - max_k <P_k, x_ij / |x_ij|>``.

    The embedding is L2-normalised per position; prototypes are used as given (prepare them
    with ``prepare_prototypes``). The reference's 1x1 conv is the einsum
    ``"hwc,kc->hwk"`` (``[h, w, c] x [k, c] -> [h, w, k]``), followed by a max over ``k``.

    With ``chunk_size``, prototypes are padded to ``[n_chunks, chunk_size, c]`` with copies of
    prototype 0 (a duplicate never changes the max) and scanned with a running max, so peak
    memory is ``h * w * chunk_size`` similarities instead of ``h * w * k`` (K = 100,000 fits).

    Args:
      embedding: ``[h, w, c]`` patch embedding of one image.
      prototypes: ``[k, c]``.
      chunk_size: prototypes per scan step, or None for a single matmul.

    Returns:
      ``[h, w]`` float32.

    Raises:
      ValueError: wrong ranks, ``k == 0``, channel mismatch, or ``chunk_size < 1``.
    """
    x = jnp.asarray(embedding, jnp.float32)
    p = jnp.asarray(prototypes, jnp.float32)
    _check_head_inputs(x, p)
    h, w, c = x.shape
    k = p.shape[0]
    xn = l2_normalize(x)
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is None or chunk_size >= k:
        best = jnp.max(jnp.einsum("hwc,kc->hwk", xn, p), axis=-1)
        return 1.0 - best
    n_chunks = -(-k // chunk_size)
    pad = n_chunks * chunk_size - k
    p = jnp.concatenate([p, jnp.broadcast_to(p[:1], (pad, c))], axis=0)
    chunks = p.reshape(n_chunks, chunk_size, c)  # [n_chunks, chunk, c]

    def step(best, chunk):  # best [h, w], chunk [chunk, c]
        sims = jnp.einsum("hwc,kc->hwk", xn, chunk)  # [h, w, chunk]
        return jnp.maximum(best, jnp.max(sims, axis=-1)), None

    best, _ = lax.scan(step, jnp.full((h, w), -jnp.inf, jnp.float32), chunks)
    return 1.0 - best


@functools.cache
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 linear-interpolation matrix with OpenCV ``INTER_LINEAR`` semantics.

    Half-pixel centres ``src = (dst + 0.5) * n_in / n_out - 0.5``, clamped to ``[0, n_in - 1]``
    (cv2 uses pixel 0 below 0 and pixel ``n_in - 1`` above it, i.e. replicated borders).
    OpenCV 4/5 computes these weights in double precision for float images (no fixed point:
    that is only for 8-bit images), so float64 input matches cv2 to float64 rounding and float32
    input to float32 rounding. One cv2 special case is not mirrored: downscaling by exactly 2 switches
    cv2 to INTER_AREA, which equals this formula for exact halving anyway.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"bilinear sizes must be >= 1, got {n_in} -> {n_out}")
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0
    i1 = np.minimum(i0 + 1, n_in - 1)
    mat = np.zeros((n_out, n_in))
    np.add.at(mat, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(mat, (np.arange(n_out), i1), frac)
    mat.setflags(write=False)
    return mat


def _float(m: jax.typing.ArrayLike) -> jax.Array:
    m = jnp.asarray(m)
    return m if jnp.issubdtype(m.dtype, jnp.floating) else m.astype(jnp.float32)


def upsample_bilinear(m: jax.typing.ArrayLike, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of one map with OpenCV ``INTER_LINEAR`` semantics (see ``bilinear_matrix``).

    ``out = U_h @ m @ U_w.T`` as ``einsum("Hh,hw,Ww->HW")`` with ``U_h [H, h]``, ``U_w [W, w]``.

    Args:
      m: ``[h, w]`` map.
      size: ``(H, W)`` output size (note: cv2's ``dsize`` is ``(W, H)``).

    Returns:
      ``[H, W]`` in ``m``'s float dtype.
    """
    m = _float(m)
    if m.ndim != 2:
        raise ValueError(f"upsample_bilinear expects one map [h, w], got shape {m.shape}")
    H, W = size
    uh = jnp.asarray(bilinear_matrix(m.shape[0], int(H)), m.dtype)
    uw = jnp.asarray(bilinear_matrix(m.shape[1], int(W)), m.dtype)
    # Width first, then height: the order cv2 accumulates in (horizontal pass, then vertical).
    return jnp.einsum("Hh,hW->HW", uh, jnp.einsum("hw,Ww->hW", m, uw, precision=_EXACT),
                      precision=_EXACT)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy's normalised 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, float64."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x.astype(np.float64) ** 2)
    return phi / phi.sum()


@functools.cache
def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``[n, n]`` float64 matrix of scipy ``gaussian_filter1d(mode='reflect')`` on a length-n axis.

    scipy's ``reflect`` is half-sample symmetric (``d c b a | a b c d | d c b a``, numpy
    ``pad(mode='symmetric')``), applied periodically when the kernel is wider than the axis.
    """
    weights = gaussian_kernel(sigma, truncate)
    radius = weights.size // 2
    rows = np.arange(n)[:, None]
    src = rows + np.arange(-radius, radius + 1)[None, :]  # [n, taps]
    src = np.mod(src, 2 * n)
    src = np.where(src >= n, 2 * n - 1 - src, src)
    mat = np.zeros((n, n))
    np.add.at(mat, (np.broadcast_to(rows, src.shape), src), np.broadcast_to(weights, src.shape))
    mat.setflags(write=False)
    return mat


def gaussian_blur(m: jax.typing.ArrayLike, sigma: float = 4.0, truncate: float = 4.0) -> jax.Array:
    """Separable Gaussian smoothing equal to ``scipy.ndimage.gaussian_filter(m, sigma, mode='reflect',
    truncate=truncate)``.

    ``out = G_H @ m @ G_W.T`` (``einsum("Hh,hW->HW")``), ``G`` from ``gaussian_matrix``; scipy
    filters axis 0 first, and so does this.

    Args:
      m: ``[H, W]`` map.
      sigma: standard deviation in pixels (static); 0 returns ``m`` unchanged.
      truncate: kernel radius in sigmas (static); 33 taps for sigma 4, truncate 4.

    Returns:
      ``[H, W]`` in ``m``'s float dtype.

    Raises:
      ValueError: negative sigma or non-2-D input.
    """
    m = _float(m)
    if m.ndim != 2:
        raise ValueError(f"gaussian_blur expects one map [H, W], got shape {m.shape}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return m
    gh = jnp.asarray(gaussian_matrix(m.shape[0], float(sigma), float(truncate)), m.dtype)
    gw = jnp.asarray(gaussian_matrix(m.shape[1], float(sigma), float(truncate)), m.dtype)
    rows = jnp.einsum("Hh,hW->HW", gh, m, precision=_EXACT)
    return jnp.einsum("HW,VW->HV", rows, gw, precision=_EXACT)


def score_image(embedding: jax.typing.ArrayLike, prototypes: jax.typing.ArrayLike, *,
                out_size: tuple[int, int] = (224, 224), sigma: float = 4.0, truncate: float = 4.0,
                image_score: str = "smoothed_max", chunk_size: int | None = None) -> ScoreResult:
    """The full per-image head of docs/METHOD.md section 1.

    Args:
      embedding: ``[h, w, c]`` (``[56, 56, 1792]``).
      prototypes: ``[k, c]``, already prepared by ``prepare_prototypes``.
      out_size: ``(H, W)`` of the anomaly map (the evaluation resolution).
      sigma, truncate: Gaussian smoothing of the upsampled map; ``sigma=0`` disables it.
      image_score: ``"smoothed_max"`` (reference code: max of the smoothed ``[H, W]`` map) or
        ``"patch_max"`` (paper equation: max of the raw ``[h, w]`` patch map).
      chunk_size: see ``patch_scores``.

    Returns:
      ``ScoreResult(patch_map [h, w], anomaly_map [H, W], score [])``.

    Raises:
      ValueError: unknown ``image_score`` or a shape error from ``patch_scores``.
    """
    if image_score not in IMAGE_SCORES:
        raise ValueError(f"image_score must be one of {tuple(IMAGE_SCORES)}, got {image_score!r}")
    patch_map = patch_scores(embedding, prototypes, chunk_size)
    anomaly_map = gaussian_blur(upsample_bilinear(patch_map, out_size), sigma, truncate)
    score = jnp.max(anomaly_map) if image_score == "smoothed_max" else jnp.max(patch_map)
    return ScoreResult(patch_map, anomaly_map, score)
