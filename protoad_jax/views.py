"""Tiles: where each tile of an image lies, and the tiles' maps stitched into one map (NumPy only;
no jit here: the tiles are scored by ``pipeline``'s jitted scorer like any other input).

docs/METHOD.md section 5. Coordinates are continuous with pixel ``i`` spanning ``[i, i + 1)``.
  * The tiled image is the original, or with ``Config.tile_image_size`` the original resized
    (PIL LANCZOS) so that its long side is ``tile_image_size`` (``tiled_size``).
  * ``tile_starts``: tiles of ``tile_size`` pixels, neighbours overlapping by at least
    ``tile_overlap``; the last tile is flush with the far edge, so the tiles cover the image
    exactly (no padding, no pixel left out) and the last one may overlap more.
  * ``stitch``: each tile's ``[s, s]`` map is resampled to ``tile x tile`` (``resize_matrix``)
    and the maps are averaged where tiles overlap. The mean, not the max: a score is the cosine
    distance of a patch to its nearest prototype, and a pixel near a tile's border is seen with
    less context there (the convolutions' zero padding) than in its neighbour, which sees it
    well inside; averaging the two views of the same pixel keeps the map on the same scale as a
    single tile's and does not turn every tile border into a seam of maxima.
  * ``resample``: a map covering a whole frame brought to another size: bilinear with half-pixel
    centres, and when shrinking a triangle filter widened by the scale (antialiased, what PIL's
    ``BILINEAR`` and ``torch.nn.functional.interpolate(..., antialias=True)`` do), so that a
    small peak is averaged, not skipped.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from protoad_jax.errors import InputError


class TileError(InputError):
    """An image that cannot be tiled with the settings (a tile larger than the image)."""


def tiled_size(width: int, height: int, tile_image_size: int | None) -> tuple[int, int]:
    """``(width, height)`` of the tiled image: the original, or resized so the long side is
    ``tile_image_size`` (the short side rounded to the nearest integer, at least 1)."""
    if tile_image_size is None:
        return width, height
    long = max(width, height)
    short = lambda n: max(1, round(n * tile_image_size / long))
    return (tile_image_size, short(height)) if width >= height else (short(width), tile_image_size)


def tile_starts(n: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Offsets of the tiles along one side of ``n`` pixels: ``0, stride, 2 stride, ...`` with
    ``stride = tile - overlap``, then ``n - tile`` (flush with the edge), the fewest tiles that
    cover ``[0, n)`` with neighbours overlapping by at least ``overlap``.

    Raises:
      ValueError: ``tile > n`` or not ``0 <= overlap < tile``.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    if tile > n:
        raise ValueError(f"tile {tile} is larger than the side {n}")
    return tuple(range(0, n - tile, tile - overlap)) + (n - tile,)


class TileLayout(NamedTuple):
    """The tiles of one image: its original ``width x height``, the tiled image's
    ``tiled_width x tiled_height``, the tile side and the tiles' left (``xs``) and top (``ys``)
    offsets in tiled-image pixels. Tiles are numbered row-major (``boxes``)."""

    width: int
    height: int
    tiled_width: int
    tiled_height: int
    tile: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def num_tiles(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """``(x0, y0, x1, y1)`` of each tile in tiled-image pixels, row-major; x1, y1 exclusive."""
        return [(x, y, x + self.tile, y + self.tile) for y in self.ys for x in self.xs]


def tile_layout(width: int, height: int, tile_size: int, tile_overlap: int,
                tile_image_size: int | None, what: str = "the image") -> TileLayout:
    """The tiles of a ``width x height`` image (``Config.tile_size``, ``tile_overlap``,
    ``tile_image_size``).

    Raises:
      TileError: a tile is larger than the tiled image (the message names ``what``, the file).
    """
    tw, th = tiled_size(width, height, tile_image_size)
    if tile_size > min(tw, th):
        resized = "" if tile_image_size is None else f" (resized from {width}x{height} to long side {tile_image_size})"
        raise TileError(f"{what} is {tw}x{th}{resized}, smaller than one tile of {tile_size}x{tile_size}; "
                        f"pass a --tile_size of at most {min(tw, th)}"
                        + ("" if tile_image_size is None else " or a larger --tile_image_size")
                        + ", or score it with --view=full_frame")
    return TileLayout(width, height, tw, th, tile_size, tile_starts(tw, tile_size, tile_overlap),
                      tile_starts(th, tile_size, tile_overlap))


def resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 weights resampling ``n_in`` samples covering a segment to
    ``n_out`` samples covering the same segment: a triangle filter of radius ``max(1, n_in /
    n_out)`` input pixels at half-pixel centres, weights normalised over the pixels inside (edge
    values held). Upsampling it is bilinear ``align_corners=False``; shrinking it averages."""
    scale = n_in / n_out
    radius = max(1.0, scale)
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * scale  # in input pixel units
    x = np.arange(n_in, dtype=np.float64) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centre[:, None]) / radius)
    return w / w.sum(axis=1, keepdims=True)


def resample(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """A ``[h, w]`` map covering a whole frame at ``[height, width]`` float32 (``resize_matrix``
    along each axis)."""
    m = np.asarray(m, np.float64)
    out = np.einsum("yi,ij,xj->yx", resize_matrix(height, m.shape[0]), m,
                    resize_matrix(width, m.shape[1]), optimize=True)
    return out.astype(np.float32)


def stitch(tile_maps: np.ndarray, layout: TileLayout) -> np.ndarray:
    """The tiles' maps as one ``[tiled_height, tiled_width]`` float32 map of the tiled image.

    Args:
      tile_maps: ``[num_tiles, s, s]``, the scorer's maps of the tiles in ``layout.boxes`` order.

    Returns:
      Each map resampled to ``tile x tile`` and placed at its box; where tiles overlap, the mean.
    """
    tile_maps = np.asarray(tile_maps, np.float64)
    if tile_maps.ndim != 3 or tile_maps.shape[0] != layout.num_tiles:
        raise ValueError(f"expected {layout.num_tiles} tile maps [n, s, s], got shape {tile_maps.shape}")
    w = resize_matrix(layout.tile, tile_maps.shape[1])
    total = np.zeros((layout.tiled_height, layout.tiled_width), np.float64)
    count = np.zeros_like(total)
    for m, (x0, y0, x1, y1) in zip(tile_maps, layout.boxes, strict=True):
        total[y0:y1, x0:x1] += w @ m @ w.T
        count[y0:y1, x0:x1] += 1.0
    return (total / count).astype(np.float32)  # count >= 1 everywhere: the tiles cover the image
