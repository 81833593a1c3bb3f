"""Defect regions at the original image resolution (NumPy + SciPy only).

The model scores the preprocessed image (docs/METHOD.md): shorter side resized to ``resize``
(256), then a ``crop x crop`` (224) center crop. Its anomaly map ``[crop, crop]`` therefore
covers only the crop window; this module maps it back onto the original pixels:

  1. ``crop_window``: where the crop lies in the original image. Coordinates are continuous with
     pixel ``i`` spanning ``[i, i + 1)``; PIL's resize maps pixel centres, so an original point
     ``x`` lies at ``x * resized_width / width`` in the resized image and at that minus ``left``
     in the crop (``to_crop``; ``to_original`` is the inverse).
  2. ``upsample_to_original``: the map sampled bilinearly at every original pixel centre that
     falls inside the window, edges included (half-pixel centres, edge values held at the
     window's border, like ``align_corners=False``). Pixels outside the crop window are NOT scored: the model never saw
     them; they are NaN in the upsampled map and never part of a region.
  3. ``find_regions``: pixels whose upsampled score is above the threshold, grouped into
     8-connected regions (``scipy.ndimage.label``), each with its area, bounding box, peak score
     and centroid in original pixel coordinates.

The ``full_frame`` and ``tiles`` views score the whole image (docs/METHOD.md section 5): their
map covers the whole frame, ``find_frame_regions`` brings it to the original resolution
(``upsample_frame``) and nothing is unscored.

Boxes are ``[x0, y0, x1, y1]`` in original pixels with ``x1``, ``y1`` exclusive (PIL's box
convention: ``image.crop(box)`` cuts the region out).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from protoad_jax import preprocess, views

EIGHT_CONNECTED = np.ones((3, 3), bool)


class CropWindow(NamedTuple):
    """The preprocessing's geometry for one original image: original ``width x height``, the
    resized size, and the crop's ``left``/``top`` offset and side ``crop`` in resized pixels."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    crop: int

    def to_crop(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        """Original continuous coordinates -> crop coordinates (the anomaly map's frame)."""
        return (np.asarray(x, np.float64) * self.resized_width / self.width - self.left,
                np.asarray(y, np.float64) * self.resized_height / self.height - self.top)

    def to_original(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        """Crop coordinates -> original continuous coordinates."""
        return ((np.asarray(x, np.float64) + self.left) * self.width / self.resized_width,
                (np.asarray(y, np.float64) + self.top) * self.height / self.resized_height)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``: the original pixels whose centres lie in the crop window, edges
        included (the scored pixels); ``x1``/``y1`` exclusive."""
        x0, x1 = _window_range(self.width, self.resized_width, self.left, self.crop)
        y0, y1 = _window_range(self.height, self.resized_height, self.top, self.crop)
        return x0, y0, x1, y1


def crop_window(width: int, height: int, resize: int = 256, crop: int = 224) -> CropWindow:
    """The geometry of ``preprocess.preprocess_image`` on a ``width x height`` image.

    Raises:
      ValueError: a size is not a positive integer, or the crop does not fit.
    """
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"image {name} must be a positive integer, got {v!r}")
    rw, rh = preprocess.resized_size(int(width), int(height), resize)
    left, top, _, _ = preprocess.crop_box(rw, rh, crop)
    return CropWindow(int(width), int(height), rw, rh, left, top, crop)


def _window_range(n: int, n_resized: int, offset: int, crop: int) -> tuple[int, int]:
    """``[start, stop)``: the original pixels ``u`` whose centre maps into ``[offset, offset + crop]``.

    Pixel ``u``'s centre is at ``(u + 0.5) * n_resized / n`` in the resized image. Both window
    edges count as inside (a centre exactly on an edge is half in the window; PIL's NEAREST
    resize samples such a pixel for the edge column). The bounds are solved in integers so
    that no rounding moves a pixel in or out.
    """
    twice_r = 2 * n_resized
    start = -((n_resized - 2 * offset * n) // twice_r)  # min u: (2u + 1) * n_resized >= 2 * offset * n
    stop = (2 * (offset + crop) * n - n_resized) // twice_r + 1  # min u: ... > 2 * (offset + crop) * n
    return max(0, start), min(n, stop)


def _interp_matrix(n: int, n_resized: int, offset: int, crop: int) -> tuple[np.ndarray, int, int]:
    """Bilinear weights ``[stop - start, crop]`` from map samples to original pixels ``[start, stop)``."""
    start, stop = _window_range(n, n_resized, offset, crop)
    u = np.arange(start, stop, dtype=np.float64)
    # Map index of pixel u's centre: (u + 0.5) * n_resized / n - offset - 0.5, held inside [0, crop - 1].
    p = np.clip((u + 0.5) * n_resized / n - offset - 0.5, 0.0, crop - 1)
    i0 = np.minimum(np.floor(p).astype(np.int64), crop - 2) if crop > 1 else np.zeros(len(p), np.int64)
    frac = p - i0
    w = np.zeros((len(u), crop), np.float64)
    rows = np.arange(len(u))
    w[rows, i0] = 1.0 - frac
    if crop > 1:
        w[rows, i0 + 1] += frac
    return w, start, stop


def upsample_to_original(anomaly_map: np.ndarray, window: CropWindow) -> np.ndarray:
    """The ``[crop, crop]`` map at the original resolution: ``[height, width]`` float32, NaN
    outside ``window.box`` (pixels the model did not score)."""
    m = np.asarray(anomaly_map, np.float64)
    if m.shape != (window.crop, window.crop):
        raise ValueError(f"anomaly map must be [{window.crop}, {window.crop}] (the crop the model "
                         f"scored); got shape {m.shape}")
    wy, y0, y1 = _interp_matrix(window.height, window.resized_height, window.top, window.crop)
    wx, x0, x1 = _interp_matrix(window.width, window.resized_width, window.left, window.crop)
    out = np.full((window.height, window.width), np.nan, np.float32)
    out[y0:y1, x0:x1] = np.einsum("yi,ij,xj->yx", wy, m, wx, optimize=True)
    return out


class Region(NamedTuple):
    """One 8-connected defect region, in original pixel coordinates.

    ``area``: pixels; ``box``: ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive; ``peak``: the
    highest upsampled score in it; ``centroid``: ``(x, y)``, the mean column and row of its pixels;
    ``peak_at``: ``(x, y)``, the pixel of the peak (the first in row-major order on ties).
    """

    area: int
    box: tuple[int, int, int, int]
    peak: float
    centroid: tuple[float, float]
    peak_at: tuple[int, int] = (-1, -1)


class ImageRegions(NamedTuple):
    """``mask`` ``[height, width]`` bool (score above the threshold), its ``regions`` (highest
    peak first) and the ``window`` the model scored (``FrameWindow`` in the frame views)."""

    mask: np.ndarray
    regions: list[Region]
    window: CropWindow | FrameWindow


def find_regions(anomaly_map: np.ndarray, threshold: float, width: int, height: int,
                 resize: int = 256, crop: int = 224) -> ImageRegions:
    """Defect regions of one image at its original resolution.

    Args:
      anomaly_map: ``[crop, crop]``, the scorer's map of the preprocessed image.
      threshold: a pixel is defective when its upsampled score is above it (the model's image
        threshold, so that a region is where the image exceeds it).
      width, height: the original image size.
      resize, crop: the preprocessing the map came from (``Config.resize``, ``Config.image_size``).

    Returns:
      ``ImageRegions``. Pixels outside the crop window are never defective (not scored). With a
      ``patch_max`` image score an anomalous image can have no region (its raw patch maximum
      can exceed every pixel of the smoothed map).
    """
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    window = crop_window(width, height, resize, crop)
    return regions_above(upsample_to_original(anomaly_map, window), threshold, window)


class FrameWindow(NamedTuple):
    """The ``full_frame`` and ``tiles`` views' geometry: the map covers the whole original
    ``width x height`` image, so every pixel is scored (``box`` is the whole image)."""

    width: int
    height: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return 0, 0, self.width, self.height


def upsample_frame(frame_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """A map covering the whole image (``full_frame``: ``[s, s]``; ``tiles``: the stitched
    ``[tiled_height, tiled_width]``) at the original resolution, ``[height, width]`` float32:
    ``views.resample`` (bilinear, half-pixel centres, edge values held; antialiased where the
    original is smaller than the map). No pixel is NaN: the whole image was scored."""
    return views.resample(frame_map, height, width)


def find_frame_regions(frame_map: np.ndarray, threshold: float, width: int,
                       height: int) -> ImageRegions:
    """``find_regions`` for the ``full_frame`` and ``tiles`` views: the defect regions of a map
    covering the whole ``width x height`` image (``upsample_frame``); the window is a
    ``FrameWindow``."""
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    window = FrameWindow(int(width), int(height))
    return regions_above(upsample_frame(frame_map, width, height), threshold, window)


def regions_above(up: np.ndarray, threshold: float, window: CropWindow | FrameWindow) -> ImageRegions:
    """The 8-connected regions of ``up > threshold`` (``[height, width]`` at the original
    resolution; NaN, unscored, is never above it), highest peak first."""
    with np.errstate(invalid="ignore"):
        mask = up > threshold  # NaN (unscored) compares False
    labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if n == 0:
        return ImageRegions(mask, [], window)
    index = np.arange(1, n + 1)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = ndimage.maximum(up, labels, index)
    centroids = ndimage.center_of_mass(mask, labels, index)
    peaks_at = ndimage.maximum_position(up, labels, index)
    regions = [Region(int(a), (sx.start, sy.start, sx.stop, sy.stop), float(pk), (float(cx), float(cy)),
                      (int(px), int(py)))
               for a, (sy, sx), pk, (cy, cx), (py, px) in zip(areas, ndimage.find_objects(labels), peaks,
                                                              centroids, peaks_at)]
    regions.sort(key=lambda r: (-r.peak, r.box))
    return ImageRegions(mask, regions, window)
