"""Per-image ProtoAD head: normalise, prototype matmul, channel max, 1 - x, upsample, blur, score.

docs/METHOD.md section 1. Every function is pure and per image (batch with ``jax.vmap``); sizes,
sigma, truncate, image-score mode and chunk size are static Python values. The fixed linear maps
(bilinear upsampling, Gaussian blur) are built once per size in NumPy, float64, and applied as
small matrices, which reproduces OpenCV / SciPy exactly up to float32 rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from protoad_jax.config import IMAGE_SCORES
from protoad_jax.features import grid_indices, upsample_to

NORM_EPS = 1e-12  # torch F.normalize default
# chunk_size="auto" (the scoring path's default): above this many prototypes the head scans
# chunks of it with a running max, which keeps each [56, 56, chunk] similarity block in cache:
# faster than one matmul from K ~ 1000 on (docs/benchmarks.md, head table) and memory bounded.
AUTO, AUTO_CHUNK = "auto", 512
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


def check_chunk_size(chunk_size: int | str | None) -> int | str | None:
    """``chunk_size`` as an int, ``"auto"`` or None; raises ValueError for anything else."""
    if chunk_size is None or chunk_size == AUTO:
        return chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, 'auto' or None, got {chunk_size!r}")
    return int(chunk_size)


def resolve_chunk_size(chunk_size: int | str | None, k: int) -> int | None:
    """``"auto"``: ``AUTO_CHUNK`` prototypes per step when ``k`` exceeds it, else one matmul;
    an int or None as given (``check_chunk_size``)."""
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size == AUTO:
        return AUTO_CHUNK if k > AUTO_CHUNK else None
    return chunk_size


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
    chunk_size = resolve_chunk_size(chunk_size, k)
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


def nested_shapes(grids: Sequence[tuple[np.ndarray, np.ndarray]], finest: tuple[int, int]
                  ) -> list[tuple[int, ...]] | None:
    """Shapes that put every stage on one nested grid, so that upsampling is broadcasting.

    When each stage's rows (and columns) on the finest grid are ``arange // f_l`` with factors
    that divide one another (1, 2, 4 for layer1..3), a finest index is ``a * F + digits`` in
    mixed radix (``F`` the largest factor), and stage ``l`` depends on ``a`` and the digits
    above ``f_l`` only: its ``[h_l, w_l]`` reshapes to ``[H, r_m, ..., 1, W, r_m, ..., 1]``.
    Returns one shape per stage, or None when the sizes are not such exact multiples.
    """
    shape = []
    for axis, n in enumerate(finest):
        factors = []
        for g in grids:
            idx = g[axis]
            f = n // (int(idx.max()) + 1)
            if f * (int(idx.max()) + 1) != n or not np.array_equal(idx, np.arange(n) // f):
                return None
            factors.append(f)
        chain = sorted(set(factors))
        if any(b % a for a, b in zip(chain, chain[1:])):
            return None
        radices = [b // a for a, b in zip(chain, chain[1:])][::-1]  # coarse digit first
        shape.append((n // chain[-1], radices, chain, factors))
    out = []
    for l in range(len(grids)):
        dims: list[int] = []
        for n_top, radices, chain, factors in shape:
            keep = len(chain) - 1 - chain.index(factors[l])  # digits coarser than this stage's f
            dims += [n_top] + [r if j < keep else 1 for j, r in enumerate(radices)]
        out.append(tuple(dims))
    return out


def patch_scores_factored(feats: Sequence[jax.typing.ArrayLike], prototypes: jax.typing.ArrayLike,
                          chunk_size: int | str | None = AUTO, *, nearest: bool = False
                          ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``patch_scores(features.embed(feats), prototypes)``, computed at each stage's own resolution.

    Nearest upsampling commutes with dot products (docs/METHOD.md section 1, "Factored head"):
    for a prototype ``p = [p_1, p_2, p_3]`` split like the embedding's channels,
    ``x . p = l_1 . p_1 + up(l_2 . p_2) + up(l_3 . p_3)`` and
    ``|x|^2 = |l_1|^2 + up(|l_2|^2) + up(|l_3|^2)``, so the similarity of every position is
    ``max_k (x . p_k) / max(|x|, 1e-12)`` (dividing by a positive number keeps the max). Exact up
    to float32 rounding (the sums run in another order); for WideResNet-50-2 at 224 x 224 the
    matmuls cost ``56^2 * 256 + 28^2 * 512 + 14^2 * 1024`` multiply-adds per prototype instead of
    ``56^2 * 1792``: 4x fewer.

    Args:
      feats: per-stage features of one image, finest first: ``[[h_1, w_1, c_1], [h_2, w_2, c_2],
        ...]`` (any float dtype; computed in float32).
      prototypes: ``[k, c_1 + c_2 + ...]``, prepared by ``prepare_prototypes``.
      chunk_size: prototypes per scan step (running max), None for one matmul per stage, or
        ``"auto"`` (``resolve_chunk_size``: chunks of ``AUTO_CHUNK`` above that many).
      nearest: also return each position's nearest prototype (the argmax beside the max, from
        the same similarity block; the first index on exact ties). The plain head (False) runs
        exactly the code it ran before the option existed.

    Returns:
      ``[h_1, w_1]`` float32; with ``nearest``, ``(that, index [h_1, w_1] int32)``.

    Raises:
      ValueError: wrong ranks, ``k == 0``, channel mismatch, or ``chunk_size < 1``.
    """
    xs = [jnp.asarray(f, jnp.float32) for f in feats]
    p = jnp.asarray(prototypes, jnp.float32)
    if not xs or any(x.ndim != 3 for x in xs):
        raise ValueError(f"feats must be one image's stages [h, w, c], finest first; got shapes "
                         f"{[jnp.shape(x) for x in xs]} (vmap over the batch axis)")
    widths = [x.shape[-1] for x in xs]
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] != sum(widths):
        raise ValueError(f"prototypes must be [k >= 1, {sum(widths)}] (stage widths {widths}); got "
                         f"shape {p.shape}")
    finest = xs[0].shape[:2]
    grids = grid_indices(tuple(x.shape[:2] for x in xs))
    nested = nested_shapes(grids, finest)
    splits = np.cumsum(widths)[:-1].tolist()

    def on_finest(parts: list[jax.Array]) -> jax.Array:
        """Sum of per-stage ``[h_l, w_l, ...]`` upsampled to ``[h_1, w_1, ...]``."""
        if nested is None:  # sizes that are no exact multiples: gather onto the finest grid
            return sum(upsample_to(s, *g) for s, g in zip(parts, grids))
        # Exact factors: each stage reshaped onto one nested grid and added by broadcasting,
        # which XLA fuses into the consumer (no [h_1, w_1, k] gather or copy).
        tail = parts[0].shape[2:]
        total = sum(s.reshape(*shape, *tail) for s, shape in zip(parts, nested))
        return total.reshape(*finest, *tail)

    sq = on_finest([jnp.sum(jnp.square(x), axis=-1) for x in xs])
    norm = jnp.maximum(jnp.sqrt(sq), NORM_EPS)  # [h_1, w_1]

    def dots(protos: jax.Array) -> jax.Array:  # [kc, c] -> [..., kc], on the finest grid
        sims = [jnp.einsum("hwc,kc->hwk", x, q)  # [h_l, w_l, kc] per stage
                for x, q in zip(xs, jnp.split(protos, splits, axis=1))]
        if nested is None:
            return on_finest(sims)
        return sum(s.reshape(*shape, s.shape[-1]) for s, shape in zip(sims, nested))

    def best_dot(protos: jax.Array) -> jax.Array:  # [kc, c] -> [h_1, w_1]
        return jnp.max(dots(protos), axis=-1).reshape(finest)  # the max before the reshape: fused

    def best_dot_index(protos: jax.Array) -> tuple[jax.Array, jax.Array]:
        d = dots(protos)
        return (jnp.max(d, axis=-1).reshape(finest),
                jnp.argmax(d, axis=-1).astype(jnp.int32).reshape(finest))

    k, c = p.shape
    chunk_size = resolve_chunk_size(chunk_size, k)
    if chunk_size is None or chunk_size >= k:
        if nearest:
            best, index = best_dot_index(p)
            return 1.0 - best / norm, index
        return 1.0 - best_dot(p) / norm
    n_chunks = -(-k // chunk_size)
    pad = n_chunks * chunk_size - k  # copies of prototype 0 never change the max
    chunks = jnp.concatenate([p, jnp.broadcast_to(p[:1], (pad, c))]).reshape(n_chunks, chunk_size, c)
    start = jnp.full(xs[0].shape[:2], -jnp.inf, jnp.float32)
    if nearest:
        def step_index(carry, chunk_and_offset):
            (best, index), (chunk, offset) = carry, chunk_and_offset
            m, a = best_dot_index(chunk)
            better = m > best  # strict: an earlier chunk keeps exact ties (the pad never wins)
            return (jnp.where(better, m, best), jnp.where(better, a + offset, index)), None

        offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size
        (best, index), _ = lax.scan(step_index, (start, jnp.zeros(finest, jnp.int32)),
                                    (chunks, offsets))
        return 1.0 - best / norm, index

    def step(best, chunk):
        return jnp.maximum(best, best_dot(chunk)), None

    best, _ = lax.scan(step, start, chunks)
    return 1.0 - best / norm


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
    return finish(patch_scores(embedding, prototypes, chunk_size), out_size=out_size, sigma=sigma,
                  truncate=truncate, image_score=image_score)


def score_features(feats: Sequence[jax.typing.ArrayLike], prototypes: jax.typing.ArrayLike, *,
                   out_size: tuple[int, int] = (224, 224), sigma: float = 4.0, truncate: float = 4.0,
                   image_score: str = "smoothed_max", chunk_size: int | str | None = AUTO
                   ) -> ScoreResult:
    """``score_image(features.embed(feats), ...)`` with the factored head
    (``patch_scores_factored``): what the scoring path runs.

    Args:
      feats: per-stage features of one image, finest first (``[56, 56, 256]``, ``[28, 28, 512]``,
        ``[14, 14, 1024]``).
      prototypes, out_size, sigma, truncate, image_score, chunk_size: as ``score_image``.
    """
    return finish(patch_scores_factored(feats, prototypes, chunk_size), out_size=out_size,
                  sigma=sigma, truncate=truncate, image_score=image_score)


def score_features_nearest(feats: Sequence[jax.typing.ArrayLike], prototypes: jax.typing.ArrayLike,
                           *, out_size: tuple[int, int] = (224, 224), sigma: float = 4.0,
                           truncate: float = 4.0, image_score: str = "smoothed_max",
                           chunk_size: int | str | None = AUTO) -> tuple[ScoreResult, jax.Array]:
    """``score_features`` and, beside it, each patch's nearest prototype: ``(ScoreResult,
    index [h_1, w_1] int32)``, the argmax taken from the same similarity block as the max
    (``patch_scores_factored(..., nearest=True)``); ``protoad_jax.explain`` runs it."""
    patch_map, index = patch_scores_factored(feats, prototypes, chunk_size, nearest=True)
    return finish(patch_map, out_size=out_size, sigma=sigma, truncate=truncate,
                  image_score=image_score), index


def finish(patch_map: jax.Array, *, out_size: tuple[int, int], sigma: float, truncate: float,
           image_score: str) -> ScoreResult:
    """Patch map ``[h, w]`` -> ``ScoreResult``: bilinear upsampling, Gaussian blur, image score."""
    if image_score not in IMAGE_SCORES:
        raise ValueError(f"image_score must be one of {tuple(IMAGE_SCORES)}, got {image_score!r}")
    anomaly_map = gaussian_blur(upsample_bilinear(patch_map, out_size), sigma, truncate)
    score = jnp.max(anomaly_map) if image_score == "smoothed_max" else jnp.max(patch_map)
    return ScoreResult(patch_map, anomaly_map, score)
