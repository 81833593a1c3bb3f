"""Input pipeline: images decoded on a thread pool into fixed-size batches, masks, input checks.

PIL releases the GIL while decoding and resizing, so ``batched`` / ``load_masks`` stream files
through a thread pool with bounded prefetch and deterministic order; the last batch is
zero-padded so a jitted consumer sees one shape and never recompiles.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from protoad_jax.errors import BadImageError, DatasetError, InputError, SettingsError
from protoad_jax.preprocess import (
    check_sizes,
    image_size,
    mask_files,
    preprocess_frame,
    preprocess_frame_mask,
    preprocess_image,
    preprocess_mask,
    preprocess_tiles,
)

log = logging.getLogger(__name__)


class SkippedImage(NamedTuple):
    """An input left out with ``skip_bad=True``: its ``path`` and the ``reason`` (``BadImageError.reason``)."""

    path: Path
    reason: str



def check_mask_matches(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> None:
    """Raises ``DatasetError`` when a mask's original size differs from its image's (each file
    of a mask folder, ``preprocess.mask_files``).

    Both are resized and cropped independently, so a size mismatch would silently misalign
    every pixel of the evaluation.
    """
    isize = image_size(image_path)
    for mask_file in mask_files(mask_path):  # a folder of masks (MVTec LOCO): each file
        msize = image_size(mask_file)
        if isize != msize:
            raise DatasetError(
                f"mask {mask_file} is {msize[0]}x{msize[1]} but its image {image_path} is "
                f"{isize[0]}x{isize[1]} (width x height); a mask must have its image's size")



def default_num_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_threads: int,
                 prefetch: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in input order, at most ``prefetch`` items in flight."""
    if num_threads <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        first = [x for _, x in zip(range(max(1, prefetch)), it, strict=False)]
        pending = collections.deque(pool.submit(fn, x) for x in first)
        try:
            while pending:
                fut = pending.popleft()
                for x in it:
                    pending.append(pool.submit(fn, x))
                    break
                yield fut.result()
        finally:  # consumer stopped early or an error: drop the queued work
            for fut in pending:
                fut.cancel()


class Batch(NamedTuple):
    """``images`` ``[batch_size, crop, crop, 3]`` float32 (zero rows past the valid ones when
    padded) and the ``paths`` of the valid rows, in order."""

    images: np.ndarray
    paths: list[Path]

    @property
    def num_valid(self) -> int:
        return len(self.paths)


class Stream:
    """A one-shot iterable over batches. With ``skip_bad=True``, the files that
    could not be decoded are skipped, logged, and listed in ``skipped`` (``SkippedImage``, in
    input order) as iteration goes."""

    def __init__(self, gen_fn: Callable[[list[SkippedImage]], Iterator[Any]]):
        self.skipped: list[SkippedImage] = []
        self._gen = gen_fn(self.skipped)

    def __iter__(self) -> Iterator[Any]:
        return self._gen

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


def _decoded(paths: Sequence[str | os.PathLike], prepare: Callable[[Path], Any],
             num_threads: int | None, prefetch: int | None, skip_bad: bool,
             skipped: list[SkippedImage]) -> Iterator[tuple[Path, Any]]:
    num_threads = default_num_threads() if num_threads is None else num_threads
    prefetch = 4 * max(1, num_threads) if prefetch is None else prefetch

    def load(path: Path) -> tuple[Path, Any]:
        try:
            return path, prepare(path)
        except BadImageError as e:
            return path, e

    for path, x in ordered_map(load, map(Path, paths), num_threads, prefetch):
        if isinstance(x, BadImageError):
            if not skip_bad:
                raise x
            log.warning("skipping bad image: %s", x)
            skipped.append(SkippedImage(path, x.reason))
            continue
        yield path, x


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads ``images`` ``[n, ...]`` to ``[size, ...]`` along the first axis (``n <= size``),
    so that a jitted consumer sees one static batch shape and never recompiles."""
    n = images.shape[0]
    if n > size:
        raise ValueError(f"cannot pad a batch of {n} down to {size}")
    if n == size:
        return images
    return np.concatenate([images, np.zeros((size - n,) + images.shape[1:], images.dtype)])


def batched(paths: Sequence[str | os.PathLike], batch_size: int, resize: int = 256,
            crop: int = 224, num_threads: int | None = None, prefetch: int | None = None,
            pad: bool = True, skip_bad: bool = False, *, frame: bool = False) -> Stream:
    """Streams preprocessed images in batches, in order, decoding ahead on a thread pool.

    Args:
      paths: image files.
      batch_size: images per batch.
      resize, crop: as ``preprocess_image``.
      num_threads: decoding threads (default ``min(8, cpus)``).
      prefetch: images decoded ahead (default ``2 * batch_size``, at least ``4 * num_threads``).
      pad: zero-pad the last batch to ``batch_size`` (``Batch.num_valid`` rows are real).
      skip_bad: skip undecodable files (listed in ``.skipped``; batches stay full) instead of
        raising.
      frame: the ``full_frame`` view: ``preprocess_frame(path, crop)`` (whole image, ``resize``
        unused) instead of ``preprocess_image``.

    Returns:
      A ``Stream`` of ``Batch(images [batch_size, crop, crop, 3] float32, paths)``; unpacks as
      ``(images, paths)``.

    Raises:
      BadImageError: (while iterating, ``skip_bad=False``) a file is missing or undecodable.
    """
    check_sizes(resize, crop)
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if prefetch is None:
        prefetch = max(2 * batch_size, 4 * (num_threads or default_num_threads()))

    def gen(skipped: list[SkippedImage]) -> Iterator[Batch]:
        images: list[np.ndarray] = []
        names: list[Path] = []
        prepare = (functools.partial(preprocess_frame, size=crop) if frame else
                   functools.partial(preprocess_image, resize=resize, crop=crop))
        for path, x in _decoded(paths, prepare, num_threads, prefetch, skip_bad, skipped):
            images.append(x)
            names.append(path)
            if len(images) == batch_size:
                yield Batch(np.stack(images), names)
                images, names = [], []
        if images:
            stacked = np.stack(images)
            yield Batch(pad_to(stacked, batch_size) if pad else stacked, names)

    return Stream(gen)


class Tile(NamedTuple):
    """One row of a ``tile_batches`` batch: tile ``index`` (``layout.boxes`` order) of the image
    at ``path``, tiled as ``layout`` (``views.TileLayout``)."""

    path: Path
    layout: Any
    index: int


def tile_batches(paths: Sequence[str | os.PathLike], batch_size: int, size: int, tile_size: int,
                 tile_overlap: int, tile_image_size: int | None, *, skip_bad: bool = False,
                 skipped: list[SkippedImage] | None = None, num_threads: int | None = None
                 ) -> Iterator[tuple[np.ndarray, list[Tile]]]:
    """The ``tiles`` view's batches: ``(batch [batch_size, size, size, 3] float32, rows)`` where
    the rows are the ``Tile`` in each valid row; tiles of consecutive images share batches (an
    image's tiles are consecutive rows, possibly over two batches), and the last batch is
    zero-padded so a jitted consumer sees one shape.

    Images are decoded and cut (``preprocess_tiles``) on a thread pool; with ``skip_bad``,
    undecodable files are skipped and, once iteration ends, appended to ``skipped``.

    Raises:
      BadImageError: a file is missing or undecodable (``skip_bad=False``).
      views.TileError: an image is smaller than one tile.
    """
    prepare = functools.partial(preprocess_tiles, size=size, tile_size=tile_size,
                                tile_overlap=tile_overlap, tile_image_size=tile_image_size)
    num_threads = default_num_threads() if num_threads is None else num_threads
    local: list[SkippedImage] = []
    rows: list[np.ndarray] = []
    owners: list[Tile] = []
    for path, (tiles, layout) in _decoded(paths, prepare, num_threads, 2 * num_threads, skip_bad, local):
        for i, t in enumerate(tiles):
            rows.append(t)
            owners.append(Tile(path, layout, i))
            if len(rows) == batch_size:
                yield np.stack(rows), owners
                rows, owners = [], []
    if rows:
        yield pad_to(np.stack(rows), batch_size), owners
    if skipped is not None:
        skipped += local


def load_masks(items: Sequence[Any], resize: int = 256, crop: int = 224,
               num_threads: int | None = None, *, frame: bool = False) -> np.ndarray:
    """Ground-truth masks of ``items``: all-False for normal images, checked against the image size.

    ``frame``: for the ``full_frame`` and ``tiles`` views, the whole mask at ``crop x crop``
    (``preprocess_frame_mask``; the evaluation resolution) instead of the center crop.

    Returns:
      ``[len(items), crop, crop]`` bool.

    Raises:
      DatasetError: an anomalous item has no mask, or a mask's size differs from its image's.
      BadImageError: a mask file cannot be decoded.
    """
    check_sizes(resize, crop)

    def load(item: Any) -> np.ndarray:
        if not item.label:
            return np.zeros((crop, crop), bool)
        if item.mask_path is None:
            raise DatasetError(f"anomalous test image {item.path} has no ground-truth mask")
        check_mask_matches(item.path, item.mask_path)
        if frame:
            return preprocess_frame_mask(item.mask_path, crop)
        return preprocess_mask(item.mask_path, resize, crop)

    num_threads = default_num_threads() if num_threads is None else num_threads
    masks = list(ordered_map(load, items, num_threads, 4 * max(1, num_threads)))
    return np.stack(masks) if masks else np.zeros((0, crop, crop), bool)


# ----------------------------------------------------------------------------- checks


class ImagesError(InputError):
    """Images given to a scorer are not ``[b, s, s, 3]`` float32 of finite values."""


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    """On the array's device: one small compiled reduction per shape, no host copy."""
    return jnp.isfinite(x).all()


def check_images(images: Any, image_size: int, *, batch_size: int | None = None,
                 owner: str = "the scorer", error: type[InputError] = ImagesError) -> None:
    """Raises ``error`` unless ``images`` is ``[b, image_size, image_size, 3]`` float32 of finite
    values (``b == batch_size`` when a batch size is fixed, else ``b >= 1``).

    Shape and dtype are checked on tracers too (inside a user's ``jit``/``vmap``); values only on
    concrete arrays (a jax array is reduced on its device, not copied to the host). ``owner``
    names the scorer in the message (an exported artifact's file, say).
    """
    b = "b" if batch_size is None else batch_size
    want = f"[{b}, {image_size}, {image_size}, 3]"
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise error(f"{owner} scores a numpy or jax array of shape {want} float32; got a "
                    f"{type(images).__name__}")
    shape, dtype = tuple(images.shape), images.dtype
    batch_ok = len(shape) == 4 and shape[0] >= 1 and batch_size in (None, shape[0])
    if not batch_ok or shape[1:] != (image_size, image_size, 3):
        hint = "" if batch_size is None else (" (this scorer has a fixed batch: pad the batch, or "
                                              "re-export with a symbolic batch, the default)")
        raise error(f"{owner} scores images of shape {want} (NHWC, preprocessed with "
                    f"protoad_jax.preprocess_image); got shape {list(shape)}{hint}")
    if dtype != np.float32:
        raise error(f"{owner} scores float32 images (ImageNet-normalised); got dtype {dtype}. "
                    "Use protoad_jax.preprocess_image, which returns float32.")
    if isinstance(images, jax.core.Tracer):
        return
    finite = _all_finite(images) if isinstance(images, jax.Array) else np.isfinite(images).all()
    if not bool(finite):
        raise error(f"images given to {owner} contain NaN or inf pixels; check the decoding and "
                    "normalisation")


# ----------------------------------------------------------------------------- batches


def iter_batches(images: Sequence[Any], batch_size: int, resize: int, crop: int, *,
                 skip_bad: bool = False, skipped: list[SkippedImage] | None = None,
                 frame: bool = False) -> Iterator[tuple[np.ndarray, list]]:
    """Yields ``(batch [batch_size, crop, crop, 3] float32, items)`` where ``items`` are the
    inputs in the batch's valid rows; the last batch is zero-padded to ``batch_size`` so a jitted
    consumer sees one shape and never recompiles.

    ``images`` holds image paths (decoded on a thread pool with prefetch; with ``skip_bad``,
    undecodable files are skipped, left out of ``items`` and, once iteration ends, appended to
    ``skipped`` as ``SkippedImage``) or preprocessed arrays (checked with ``check_images``).
    ``frame``: paths are preprocessed for the ``full_frame`` view (``batched``).
    """
    if len(images) and isinstance(images[0], (str, os.PathLike)):
        stream = batched(images, batch_size, resize=resize, crop=crop, skip_bad=skip_bad, frame=frame)
        for batch in stream:
            yield batch.images, batch.paths
        if skipped is not None:
            skipped += stream.skipped
        return
    for start in range(0, len(images), batch_size):
        items = images[start:start + batch_size]
        chunk = np.stack([np.asarray(a) for a in items])
        check_images(chunk, crop)
        yield pad_to(chunk, batch_size), list(items)


@dataclasses.dataclass
class ScoredImages:
    """Per-image results of ``pipeline.score_images`` and ``export.score_files``: maps
    ``[n, s, s]``, scores ``[n]``, patch maps ``[n, h, w]`` (None from an exported scorer and
    in the ``tiles`` view), the ``n`` inputs scored, and the inputs ``skipped`` as unreadable with
    ``skip_bad`` (``SkippedImage(path, reason)``, in input order; absent from the
    arrays).

    ``maps`` cover what the view scores (docs/METHOD.md section 5): the center crop
    (``center_crop``) or the whole image squeezed to ``s x s`` (``full_frame``, ``tiles``: the
    evaluation resolution). ``frames`` (``tiles`` only): each image's stitched map
    ``[tiled_height, tiled_width]`` float32 (``views.stitch``), what its regions are found in."""

    maps: np.ndarray
    scores: np.ndarray
    patch_maps: np.ndarray | None
    inputs: list
    skipped: list[SkippedImage] = dataclasses.field(default_factory=list)
    frames: list[np.ndarray] | None = None


def score_batches(call: Callable[[np.ndarray], tuple], images: Sequence[Any], batch_size: int,
                  resize: int, crop: int, *, progress: bool = True, skip_bad: bool = False,
                  frame: bool = False) -> tuple[list[np.ndarray], list, list[SkippedImage]]:
    """Runs ``call(batch [batch_size, crop, crop, 3]) -> (array [batch_size, ...], ...)`` over
    ``iter_batches`` and returns ``(outputs, inputs, skipped)``: each output concatenated over
    the batches with the padding rows dropped, the inputs scored in order, and the files skipped
    as unreadable (with ``skip_bad``). ``frame``: the ``full_frame`` view (``batched``).

    Raises:
      BadImageError: an image file is missing or undecodable (``skip_bad=False``; its
        ``skippable`` is True), or every image was (``skip_bad=True``).
      SettingsError: no images were given.
    """
    from protoad_jax.progress import Progress

    images = list(images)
    if not images:
        raise SettingsError("no images to score; pass at least one image")
    outputs: list[list[np.ndarray]] = []
    inputs: list = []
    skipped: list[SkippedImage] = []
    with Progress("scoring", len(images), "img", progress) as bar:
        try:
            for batch, items in iter_batches(images, batch_size, resize, crop, skip_bad=skip_bad,
                                             skipped=skipped, frame=frame):
                n = len(items)
                res = jax.device_get(call(batch))
                outputs = outputs or [[] for _ in res]
                for out, r in zip(outputs, res, strict=True):
                    out.append(np.asarray(r)[:n])
                inputs += items
                bar.update(n)
        except BadImageError as e:
            e.skippable = True  # skip_bad=True would have skipped it
            raise
    check_any_scored(inputs, skipped)
    return [np.concatenate(out) for out in outputs], inputs, skipped


def check_any_scored(inputs: list, skipped: list[SkippedImage]) -> None:
    """Raises ``BadImageError`` listing the skipped files when nothing was scored."""
    if not inputs:
        listed = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise BadImageError(f"none of the {len(skipped)} images could be read: {listed}{more}",
                            skipped[0].path, "every image was unreadable")
