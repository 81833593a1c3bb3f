"""Each prototype's exemplar and the coverage level: one chunked pass over the fitted patches.

The jit is here: ``_chunk_fn``, one patch chunk against every prototype (built once per chunk
and prototype shape); the running argmax over chunks is kept on the host, so memory is one
``[chunk, k]`` similarity block (K = 1000 prototypes x 50,000 patches x 1792 dims never needs
the ``[n, k]`` matrix).

* The exemplar of prototype ``p_k``: the fitted patch ``x_i`` (L2-normalised) with the highest
  ``<p_k, x_i>`` among the patches the prototypes were fitted on (first index on exact ties),
  located as training image, patch row and column (of its model input: the image, or in the
  ``tiles`` view its tile), and the patch's cell in the original image's pixels through the
  view's geometry (``InputWindow``: the center crop, the full-frame resize, or the tile's
  position and scale); stored with its cosine.
* The coverage level: from the same block, each fitted patch's similarity to its nearest
  prototype, ``max_k <p_k, x_i>`` (what the head turns into the patch score ``1 - s``); the
  level is its ``COVERAGE_QUANTILE`` quantile (docs/update.md says why this statistic).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from protoad_jax import regions, views
from protoad_jax.config import Config
from protoad_jax.model import Exemplars
from protoad_jax.preprocess import image_size

# A new patch is covered when its nearest-prototype similarity reaches the 1% quantile of the
# fitted patches' own: at least as well matched as 99% of the training patches were.
COVERAGE_QUANTILE = 0.01
BLOCK_ELEMENTS = 1 << 24  # similarities per chunk (64 MB of float32): sets the patch chunk


class Nearest(NamedTuple):
    """The chunked pass's results.

    Attributes:
      patch_index: ``[k]`` int64, per prototype the row of the most similar patch.
      prototype_sim: ``[k]`` float32, that similarity ``<p_k, x_i>``.
      patch_sim: ``[n]`` float32, per patch the similarity to its nearest prototype.
    """

    patch_index: np.ndarray
    prototype_sim: np.ndarray
    patch_sim: np.ndarray


@functools.cache
def _chunk_fn() -> Any:
    def fn(x, valid, prototypes):  # x [m, c], valid [m], prototypes [k, c]
        sims = jnp.einsum("mc,kc->mk", x.astype(jnp.float32), prototypes,
                          precision=lax.Precision.HIGHEST)  # [m, k]
        masked = jnp.where(valid[:, None], sims, -jnp.inf)  # padding rows never win a column
        return (jnp.max(masked, axis=0), jnp.argmax(masked, axis=0).astype(jnp.int32),
                jnp.max(sims, axis=1))

    return jax.jit(fn)


def chunk_rows(k: int) -> int:
    """Patches per chunk: a power of two with ``chunk * k <= BLOCK_ELEMENTS`` (256 to 16384)."""
    return int(min(16384, max(256, 2 ** math.floor(math.log2(max(1, BLOCK_ELEMENTS // k))))))


def nearest(patches: np.ndarray, prototypes: np.ndarray, chunk: int | None = None) -> Nearest:
    """Per prototype its most similar patch and per patch its nearest prototype's similarity.

    Args:
      patches: ``[n, c]`` L2-normalised patch embeddings (float16 or float32; computed in float32).
      prototypes: ``[k, c]`` as the head uses them.
      chunk: patches per jitted step (default ``chunk_rows(k)``).

    Returns:
      ``Nearest``; exact ties go to the first patch.
    """
    x = np.asarray(patches)
    p = jnp.asarray(prototypes, jnp.float32)
    n, k = len(x), p.shape[0]
    if n == 0:
        raise ValueError("nearest(): no patches")
    chunk = chunk or chunk_rows(k)
    chunk = min(chunk, 1 << max(0, math.ceil(math.log2(n))))  # small inputs: one small chunk
    fn = _chunk_fn()
    best = np.full(k, -np.inf, np.float32)
    index = np.zeros(k, np.int64)
    patch_sim = np.empty(n, np.float32)
    for start in range(0, n, chunk):
        block = x[start:start + chunk]
        m = len(block)
        if m < chunk:
            block = np.concatenate([block, np.zeros((chunk - m, x.shape[1]), block.dtype)])
        col_max, col_arg, row_max = jax.device_get(fn(block, np.arange(chunk) < m, p))
        better = col_max > best  # strict: an earlier chunk keeps exact ties
        best[better] = col_max[better]
        index[better] = col_arg[better] + start
        patch_sim[start:start + m] = row_max[:m]
    return Nearest(index, best, patch_sim)


def patch_origin(index: np.ndarray, config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat image-major, row-major patch positions (``pipeline.extract_patches(...,
    with_index=True)``) -> ``(image, row, col)``, each ``[n]`` int64."""
    side = config.image_size // 4
    image, cell = np.divmod(np.asarray(index, np.int64), side * side)
    row, col = np.divmod(cell, side)
    return image, row, col


class InputWindow(NamedTuple):
    """Where one model input (the scored ``s x s`` square, ``s = image_size``) lies in its
    original image ``path`` of ``width x height``: an input pixel ``(x, y)`` (continuous) is the
    original pixel ``(x0 + x * sx, y0 + y * sy)``.

    center_crop: the crop's offset and the resize (``regions.crop_window``); full_frame: the whole
    image squeezed to ``s x s`` (``x0 = y0 = 0``, ``sx = width / s``, ``sy = height / s``);
    tiles: the tile's box in the tiled image (``views.tile_layout``), scaled by ``tile / s`` and
    by the tiled image's resize (``width / tiled_width``)."""

    path: str
    width: int
    height: int
    x0: float
    y0: float
    sx: float
    sy: float

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        return self.x0 + x * self.sx, self.y0 + y * self.sy


def input_windows(path: str | os.PathLike, config: Config) -> list[InputWindow]:
    """The model inputs that the image file ``path`` makes in ``config.view``, in the order
    ``pipeline.extract_patches`` embeds them: one window, or (``tiles``) one per tile in
    ``views.TileLayout.boxes`` order."""
    width, height = image_size(path)
    s = config.image_size
    if config.view == "full_frame":
        return [InputWindow(str(path), width, height, 0.0, 0.0, width / s, height / s)]
    if config.view == "tiles":
        layout = views.tile_layout(width, height, config.tile_size, config.tile_overlap,
                                   config.tile_image_size, f"image file {path}")
        fx, fy = width / layout.tiled_width, height / layout.tiled_height
        return [InputWindow(str(path), width, height, x0 * fx, y0 * fy, layout.tile / s * fx,
                            layout.tile / s * fy) for x0, y0, _, _ in layout.boxes]
    w = regions.crop_window(width, height, config.resize, s)
    fx, fy = w.width / w.resized_width, w.height / w.resized_height
    return [InputWindow(str(path), width, height, w.left * fx, w.top * fy, fx, fy)]


def patch_box(window: InputWindow, row: int, col: int, config: Config) -> list[int]:
    """The patch cell ``(row, col)`` of an input as ``[x0, y0, x1, y1]`` in the original image's
    pixels (``window``; ``x1``, ``y1`` exclusive; rounded outwards, clipped to the image)."""
    cell = config.image_size / (config.image_size // 4)
    x0, y0 = window.to_original(col * cell, row * cell)
    x1, y1 = window.to_original((col + 1) * cell, (row + 1) * cell)
    return [max(0, math.floor(x0)), max(0, math.floor(y0)), min(window.width, math.ceil(x1)),
            min(window.height, math.ceil(y1))]


def locate(prototypes: np.ndarray, patches: np.ndarray, index: np.ndarray,
           images: Sequence[Any], config: Config, found: Nearest | None = None
           ) -> tuple[Exemplars, Nearest]:
    """The exemplars of ``prototypes`` among ``patches`` (fitted from ``images``, origins
    ``index``), and the pass's ``Nearest`` (its ``patch_sim`` gives the coverage level).

    Args:
      prototypes: ``[k, c]`` as the head uses them.
      patches: ``[n, c]`` the patches they were fitted on.
      index: ``[n]`` their flat positions among the model inputs of ``images``
        (``extract_patches(..., with_index=True)``; tiles: every tile is an input).
      images: the images ``index`` refers to: paths, or preprocessed arrays (no path, no box).
      config: the model's settings (view, patch grid and geometry: ``input_windows``).
      found: ``nearest(patches, prototypes)`` when the caller has it already.
    """
    found = nearest(patches, prototypes) if found is None else found
    inputs, row, col = patch_origin(np.asarray(index)[found.patch_index], config)
    windows = InputIndex(images, config)
    paths, boxes = [], []
    for i, r, c in zip(inputs.tolist(), row.tolist(), col.tolist()):
        window = windows[i]
        if window is None:  # a preprocessed array: no file, no box
            paths.append("")
            boxes.append([-1, -1, -1, -1])
            continue
        paths.append(window.path)
        boxes.append(patch_box(window, r, c, config))
    norms = np.maximum(np.linalg.norm(np.asarray(prototypes, np.float64), axis=1), 1e-12)
    cosines = (found.prototype_sim / norms).astype(np.float32)
    exemplars = Exemplars(np.array(paths, np.str_), row.astype(np.int32), col.astype(np.int32),
                          np.array(boxes, np.int32).reshape(-1, 4), cosines)
    return exemplars, found


class InputIndex:
    """Model input number -> its ``InputWindow`` (None for an array), reading image headers only
    as needed (tiles: the images before it, to count their tiles)."""

    def __init__(self, images: Sequence[Any], config: Config):
        self.images, self.config = images, config
        self.windows: list[InputWindow | None] = []
        self.next_image = 0
        self.cache: dict[int, InputWindow | None] = {}

    def __getitem__(self, i: int) -> InputWindow | None:
        if self.config.view != "tiles":  # one input per image
            if i not in self.cache:
                src = self.images[i]
                self.cache[i] = (input_windows(src, self.config)[0]
                                 if isinstance(src, (str, os.PathLike)) else None)
            return self.cache[i]
        while len(self.windows) <= i:
            src = self.images[self.next_image]
            self.next_image += 1
            self.windows.extend(input_windows(src, self.config)
                                if isinstance(src, (str, os.PathLike)) else [None])
        return self.windows[i]


def coverage(patch_sim: np.ndarray, num_prototypes: int) -> dict:
    """The coverage record stored with a model: the ``COVERAGE_QUANTILE`` quantile of the fitted
    patches' nearest-prototype similarities (``Nearest.patch_sim``), with what it was taken over."""
    sims = np.asarray(patch_sim, np.float64)
    return {"level": float(np.quantile(sims, COVERAGE_QUANTILE)), "quantile": COVERAGE_QUANTILE,
            "statistic": (f"{COVERAGE_QUANTILE:g} quantile of the {len(sims)} fitted patches' "
                          "similarity to their nearest prototype"),
            "num_patches": len(sims), "num_prototypes": int(num_prototypes)}
