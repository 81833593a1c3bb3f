"""Per-image patch embedding: layer1..3 features -> one ``[56, 56, 1792]`` map.

docs/METHOD.md section 1.

The reference upsamples layer3 x2 (nearest) and concatenates it after layer2, then upsamples
that x2 and concatenates it after layer1: channel order [layer1, layer2, layer3], no pooling,
no projection. Per image; batch with ``jax.vmap`` at the call site.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from protoad_jax.config import EMBED_LAYERS


@functools.cache
def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index under torch ``F.interpolate(mode="nearest", size=n_out)``.

    torch computes ``floor(i * scale)`` with ``scale = float32(n_in) / n_out`` in float32 and
    clamps to ``n_in - 1``; this reproduces that arithmetic (for an exact x2 it is ``repeat``).
    """
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    idx = np.minimum(idx, n_in - 1)
    idx.setflags(write=False)
    return idx


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest resize of ``x [h, w, c]`` to ``[size[0], size[1], c]`` with torch's index rule."""
    h, w = x.shape[:2]
    x = jnp.take(x, nearest_indices(h, size[0]), axis=0)
    return jnp.take(x, nearest_indices(w, size[1]), axis=1)


def grid_indices(shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """For stages of spatial ``shapes`` (finest first), the source row and column of each position
    of the finest grid: the composed nearest index maps ``embed`` applies (coarsest upsampled to
    the next-finer grid, that to the next, ...). Entry 0 is the identity.

    Returns:
      per stage ``(rows [h0], cols [w0])`` int64 arrays.
    """
    out = []
    for i, (h, w) in enumerate(shapes):
        rows, cols = np.arange(h), np.arange(w)
        for finer in reversed(shapes[:i]):  # each upsampling step, coarse to fine
            rows = rows[nearest_indices(len(rows), finer[0])]
            cols = cols[nearest_indices(len(cols), finer[1])]
        out.append((rows, cols))
    return tuple(out)


def upsample_to(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """``x [h, w, ...]`` at the finest grid's positions: ``x[rows][:, cols]`` (``grid_indices``).

    An exact integer factor (``rows == arange // f``, the WideResNet's 2x and 4x) is a repeat,
    which XLA fuses into its consumer; other sizes gather.
    """
    def along(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
        n = x.shape[axis]
        f = len(idx) // n
        if f * n == len(idx) and np.array_equal(idx, np.arange(len(idx)) // f):
            return x if f == 1 else jnp.repeat(x, f, axis=axis, total_repeat_length=len(idx))
        return jnp.take(x, idx, axis=axis)

    return along(along(x, rows, 0), cols, 1)


def embed(feats: dict[str, jax.Array], layers: tuple[str, ...] = EMBED_LAYERS) -> jax.Array:
    """Concatenates backbone stages into one patch embedding at the finest stage's resolution.

    Coarsest first: each stage is nearest-upsampled to the next-finer stage's grid and
    concatenated after it, so channels come out in ``layers`` order (finest first).

    Args:
      feats: ``{"layer1": [h1, w1, c1], "layer2": [h2, w2, c2], "layer3": [h3, w3, c3]}`` for one
        image (no batch axis); extra keys are ignored. Any float dtype.
      layers: stage names, finest first.

    Returns:
      ``[h1, w1, c1 + c2 + c3]`` float32 (``[56, 56, 1792]`` for WideResNet-50-2 at 224 x 224).

    Raises:
      ValueError: a stage is missing or not rank 3.
    """
    missing = [name for name in layers if name not in feats]
    if missing:
        raise ValueError(f"embed needs stages {list(layers)}; missing {missing} (got {sorted(feats)})")
    for name in layers:
        if jnp.ndim(feats[name]) != 3:
            raise ValueError(f"embed expects per-image features [h, w, c]; {name!r} has shape "
                             f"{jnp.shape(feats[name])} (vmap over the batch axis)")
    out = jnp.asarray(feats[layers[-1]], jnp.float32)
    for name in reversed(layers[:-1]):
        finer = jnp.asarray(feats[name], jnp.float32)
        out = jnp.concatenate([finer, resize_nearest(out, finer.shape[:2])], axis=-1)
    return out
