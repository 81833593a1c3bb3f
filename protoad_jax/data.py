"""Dataset readers (MVTec AD, BTAD, a generic folder) and the reference's PIL preprocessing.

Preprocessing is docs/METHOD.md section 1, identical to the torchvision pipeline of the
reference code: ``Image.open(p).convert("RGB")`` -> ``Resize(256, LANCZOS)`` -> ``CenterCrop(224)``
-> ``ToTensor`` -> ``Normalize(ImageNet)``, but returned HWC as numpy float32 (``[crop, crop, 3]``).
Masks follow docs/METHOD.md section 3: NEAREST resize, same crop, ``> 0``.

Readers return plain NamedTuples listing files in sorted order; nothing is decoded until
``batched`` / ``load_masks`` stream it through a thread pool (PIL releases the
GIL while decoding and resizing) with bounded prefetch and deterministic order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from protoad_jax.config import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
BTAD_CATEGORIES = ("01", "02", "03")
DATASETS = ("mvtec", "btad", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
NORMAL_TYPES = ("good", "normal", "ok")

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)
# 16-bit grayscale modes. convert("RGB") saturates them to 255 (the reference would see a white
# image), so they are rescaled 0..65535 -> 0..255 instead; 8-bit images are untouched.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class BadImageError(ValueError):
    """An image file is missing or cannot be decoded.

    Attributes:
      path: the file.
      reason: what is wrong with it, without the path (e.g. ``"file does not exist"``).
      skippable: True when the error comes from a step that can skip unreadable files instead
        (``pipeline.score_images(..., skip_bad=True)``); False for training images.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, reason: str = ""):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.reason = reason or message
        self.skippable = False


class SkippedImage(NamedTuple):
    """An input left out with ``skip_bad=True``: its ``path`` and the ``reason`` (``BadImageError.reason``)."""

    path: Path
    reason: str


class DatasetError(ValueError):
    """A dataset folder does not have the expected layout."""


# ----------------------------------------------------------------------------- preprocessing


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """Output ``(width, height)`` of torchvision ``Resize(resize)``: shorter side -> ``resize``.

    Transcribes ``torchvision.transforms.functional._compute_resized_output_size``: the long side
    is ``int(resize * long / short)`` (truncation, not rounding); a square stays square.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of torchvision ``CenterCrop(crop)`` on a ``width x height``
    image.

    torchvision uses ``int(round((size - crop) / 2.0))``: Python's round-half-to-even, so an offset
    of 36.5 gives 36 and 37.5 gives 38.
    """
    if crop > width or crop > height:
        raise ValueError(f"center crop {crop} is larger than the resized image {width}x{height}")
    top = round((height - crop) / 2.0)  # Python 3 round() returns an int
    left = round((width - crop) / 2.0)
    return left, top, left + crop, top + crop


def _check_sizes(resize: int, crop: int) -> None:
    if not (isinstance(resize, int) and isinstance(crop, int) and 0 < crop <= resize):
        raise ValueError(
            f"expected integers 0 < crop <= resize, got resize={resize!r}, crop={crop!r}")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes ``path`` (PIL, any mode); any failure is a ``BadImageError`` that
    names the file."""
    try:
        # Exiting the block closes the file only; the decoded image stays usable.
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        reason = "file does not exist"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors. PIL's messages may
        # quote the path, which the error names anyway.
        detail = str(e).replace(repr(str(path)), "").replace(str(path), "").strip(" :")
        reason = f"cannot decode ({type(e).__name__}: {detail})" if detail else \
            f"cannot decode ({type(e).__name__})"
    raise BadImageError(f"image file {path}: {reason}. Remove or replace the file.", path, reason)


def to_rgb(img: Image.Image) -> Image.Image:
    """The RGB image ``preprocess_image`` starts from: like ``img.convert("RGB")`` (grayscale,
    palette, RGBA -> RGB; alpha is dropped), but 16-bit grayscale is rescaled to 8 bits."""
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_image(path_or_pil: str | os.PathLike | Image.Image, resize: int = 256,
                     crop: int = 224) -> np.ndarray:
    """Decodes, resizes, center-crops and normalises one image exactly like the reference.

    Args:
      path_or_pil: an image file or a PIL image (any mode; converted to RGB).
      resize: shorter side after PIL ``LANCZOS`` resize (torchvision ``Resize(int)`` semantics).
      crop: side of the center crop (torchvision ``CenterCrop`` rounding).

    Returns:
      ``[crop, crop, 3]`` float32, ``(x / 255 - mean) / std`` with ImageNet mean/std, HWC.

    Raises:
      BadImageError: the file is missing or cannot be decoded (the message names it).
      ValueError: ``crop > resize``.
    """
    _check_sizes(resize, crop)
    img = path_or_pil if isinstance(path_or_pil, Image.Image) else open_image(path_or_pil)
    img = to_rgb(img)
    size = resized_size(*img.size, resize)
    if size != img.size:  # torchvision returns the image untouched when the size already matches
        img = img.resize(size, Image.LANCZOS)
    img = img.crop(crop_box(*img.size, crop))
    # ToTensor then Normalize, all in float32 as torch does them: x / 255, (x - mean) / std.
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return (x - _MEAN) / _STD


def mask_image(path_or_pil: str | os.PathLike | Image.Image) -> Image.Image:
    """A ground-truth mask file (or PIL image) in a mode where ``> 0`` means "not black": palette
    and alpha modes become colour (``LA`` becomes ``L``), other modes are kept.

    NEAREST resizing picks pixels without mixing them, so binarising (``binarize_mask``) after a
    resize equals binarising before it.

    Raises:
      BadImageError: the file is missing or cannot be decoded.
    """
    img = path_or_pil if isinstance(path_or_pil, Image.Image) else open_image(path_or_pil)
    if img.mode in ("1", "L", "RGB", "F") or img.mode in _WIDE_MODES:
        return img
    return img.convert("L") if img.mode == "LA" else img.convert("RGB")


def binarize_mask(img: Image.Image) -> np.ndarray:
    """``[h, w]`` bool of a ``mask_image``: a pixel is anomalous when any channel is non-zero."""
    m = np.asarray(img) > 0
    return m.any(axis=-1) if m.ndim == 3 else m


def preprocess_mask(path_or_pil: str | os.PathLike | Image.Image, resize: int = 256,
                    crop: int = 224) -> np.ndarray:
    """Loads a ground-truth mask: PIL NEAREST resize (shorter side), center crop, ``> 0``.

    Args:
      path_or_pil: a mask file or a PIL image (original image size).

    Returns:
      ``[crop, crop]`` bool; a pixel is anomalous when any channel is non-zero.

    Raises:
      BadImageError: the file is missing or cannot be decoded.
    """
    _check_sizes(resize, crop)
    img = mask_image(path_or_pil)
    size = resized_size(*img.size, resize)
    if size != img.size:
        img = img.resize(size, Image.NEAREST)
    return binarize_mask(img.crop(crop_box(*img.size, crop)))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise BadImageError(f"image file {path} does not exist", path, "file does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot read the header of image file {path} ({e})", path,
                            f"cannot read the header ({type(e).__name__})") from e


def check_mask_matches(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> None:
    """Raises ``DatasetError`` when a mask's original size differs from its image's.

    Both are resized and cropped independently, so a size mismatch would silently misalign
    every pixel of the evaluation.
    """
    isize, msize = image_size(image_path), image_size(mask_path)
    if isize != msize:
        raise DatasetError(
            f"mask {mask_path} is {msize[0]}x{msize[1]} but its image {image_path} is "
            f"{isize[0]}x{isize[1]} (width x height); a mask must have its image's size")


# ----------------------------------------------------------------------------- readers


class TestItem(NamedTuple):
    """One test image. ``label`` is 0 (normal) or 1 (anomalous); ``mask_path`` is None for normal
    images and when the dataset has no ground truth."""

    __test__ = False  # not a pytest test class

    path: Path
    defect_type: str
    label: int
    mask_path: Path | None


class Category(NamedTuple):
    """One category: its normal training images and its labelled test images, sorted."""

    name: str
    train: list[Path]
    test: list[TestItem]
    has_masks: bool


def _files(folder: Path, exts: Sequence[str]) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")),
                  key=lambda p: p.name)


def find_images(path: str | os.PathLike) -> list[Path]:
    """An image file as ``[path]``, or a folder's images (recursive, sorted by relative path).

    Raises:
      DatasetError: the path does not exist, or the folder holds no image files.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist; pass an image file or a folder of images")
    found = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not found:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    return found


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DatasetError(f"{what} {folder} does not exist")


def _read_layout(cat_dir: Path, train_dirs: Sequence[Path], normal_types: Sequence[str],
                 mask_candidates: Callable[[Path, str, str], list[Path]]) -> Category:
    """Shared reader: ``train_dirs`` of normal images, ``test/<type>/``, ``ground_truth/``."""
    train = [p for d in train_dirs if d.is_dir() for p in _files(d, IMAGE_EXTENSIONS)]
    if not train:
        where = " or ".join(str(d) for d in train_dirs)
        raise DatasetError(f"no training images in {where} (expected files ending in "
                           f"{', '.join(IMAGE_EXTENSIONS)})")
    test_dir = cat_dir / "test"
    _require_dir(test_dir, "test folder")
    loose = _files(test_dir, IMAGE_EXTENSIONS)
    if loose:
        raise DatasetError(f"{test_dir} holds images directly (e.g. {loose[0].name}); put them in "
                           f"test/<type>/ folders: {'/'.join(normal_types)} for normal images, any "
                           "other name for anomalous ones")
    gt_dir = cat_dir / "ground_truth"
    has_masks = gt_dir.is_dir()
    if not has_masks:
        log.warning("no ground_truth folder at %s: pixel metrics will be null", gt_dir)
    test: list[TestItem] = []
    for type_dir in _subdirs(test_dir):
        label = 0 if type_dir.name in normal_types else 1
        for img in _files(type_dir, IMAGE_EXTENSIONS):
            mask = None
            if has_masks and label:
                candidates = mask_candidates(gt_dir, type_dir.name, img.stem)
                mask = next((c for c in candidates if c.is_file()), None)
                if mask is None:
                    raise DatasetError(f"no ground-truth mask for anomalous test image {img}: "
                                       f"expected {' or '.join(map(str, candidates))}")
            test.append(TestItem(img, type_dir.name, label, mask))
    if not test:
        raise DatasetError(f"no test images in the subfolders of {test_dir}")
    return Category(cat_dir.name, train, test, has_masks)


def _category_dir(root: str | os.PathLike, category: str, dataset: str,
                  known: Sequence[str]) -> Path:
    root = Path(root)
    _require_dir(root, f"{dataset} dataset root")
    cat_dir = root / category
    if not (cat_dir / "train").is_dir():
        found = [d.name for d in _subdirs(root) if (d / "train").is_dir()]
        problem = "has no train folder" if cat_dir.is_dir() else "not found"
        raise DatasetError(f"category {category!r} {problem} under {root}; categories found there: "
                           f"{found or 'none'}; known {dataset} categories: {list(known)}")
    return cat_dir


def read_mvtec(root: str | os.PathLike, category: str) -> Category:
    """MVTec AD layout: ``train/good``, ``test/<type>`` (``good`` normal), and
    ``ground_truth/<type>/<name>_mask.png``. Any category folder with this layout is accepted.

    Raises:
      DatasetError: unknown category, empty train folder, missing test folder, or an anomalous
        test image without its mask (when ``ground_truth`` exists).
    """
    cat_dir = _category_dir(root, category, "MVTec AD", MVTEC_CATEGORIES)
    return _read_layout(cat_dir, [cat_dir / "train" / "good"], ("good",),
                        lambda gt, t, stem: [gt / t / f"{stem}_mask.png"])


def read_btad(root: str | os.PathLike, category: str) -> Category:
    """BTAD layout: ``train/ok``, ``test/ok``, ``test/ko``, ``ground_truth/ko/<stem>.{png,bmp}``.

    Raises:
      DatasetError: as ``read_mvtec``.
    """
    cat_dir = _category_dir(root, category, "BTAD", BTAD_CATEGORIES)
    return _read_layout(cat_dir, [cat_dir / "train" / "ok"], ("ok",),
                        lambda gt, t, stem: [gt / t / f"{stem}{e}" for e in (".png", ".bmp")])


def read_folder(root: str | os.PathLike) -> Category:
    """A generic layout: normal images in ``root/train/`` (or ``train/{good,normal,ok}/``),
    ``root/test/<type>/`` with ``good``/``normal``/``ok`` normal and any other type anomalous, and
    optional masks ``root/ground_truth/<type>/<stem>_mask.png`` or ``<stem>.png`` (or .bmp/.tif).

    Raises:
      DatasetError: as ``read_mvtec``.
    """
    root = Path(root)
    _require_dir(root, "dataset folder")
    train = root / "train"
    _require_dir(train, "training folder")

    def candidates(gt: Path, t: str, stem: str) -> list[Path]:
        return [gt / t / f"{stem}{suffix}{e}" for suffix in ("_mask", "") for e in MASK_EXTENSIONS]

    return _read_layout(root, [train] + [train / n for n in NORMAL_TYPES], NORMAL_TYPES,
                        candidates)


def list_categories(dataset: str, root: str | os.PathLike) -> list[str]:
    """Category names present under ``root`` (sorted): folders that have a ``train`` folder.

    For ``dataset="folder"`` the root itself is the one category, named after the folder.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    root = Path(root)
    _require_dir(root, f"{dataset} dataset root")
    if dataset == "folder":
        _require_dir(root / "train", "training folder")
        return [root.name]
    found = [d.name for d in _subdirs(root) if (d / "train").is_dir()]
    if not found:
        known = MVTEC_CATEGORIES if dataset == "mvtec" else BTAD_CATEGORIES
        raise DatasetError(f"no category folders (with a train/ folder) under {root}; expected "
                           f"some of {list(known)}")
    return found


def read_dataset(dataset: str, root: str | os.PathLike, category: str | None = None) -> Category:
    """Dispatches to ``read_mvtec`` / ``read_btad`` / ``read_folder`` (ignores ``category``)."""
    if dataset in ("mvtec", "btad") and not category:
        raise ValueError(f"dataset {dataset!r} needs a category; see list_categories()")
    if dataset == "mvtec":
        return read_mvtec(root, category)
    if dataset == "btad":
        return read_btad(root, category)
    if dataset == "folder":
        return read_folder(root)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


# ----------------------------------------------------------------------------- streaming


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


def _decoded(paths: Sequence[str | os.PathLike], resize: int, crop: int, num_threads: int | None,
             prefetch: int | None, skip_bad: bool,
             skipped: list[SkippedImage]) -> Iterator[tuple[Path, np.ndarray]]:
    _check_sizes(resize, crop)
    num_threads = default_num_threads() if num_threads is None else num_threads
    prefetch = 4 * max(1, num_threads) if prefetch is None else prefetch

    def load(path: Path) -> tuple[Path, np.ndarray | BadImageError]:
        try:
            return path, preprocess_image(path, resize, crop)
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
            pad: bool = True, skip_bad: bool = False) -> Stream:
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

    Returns:
      A ``Stream`` of ``Batch(images [batch_size, crop, crop, 3] float32, paths)``; unpacks as
      ``(images, paths)``.

    Raises:
      BadImageError: (while iterating, ``skip_bad=False``) a file is missing or undecodable.
    """
    _check_sizes(resize, crop)
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if prefetch is None:
        prefetch = max(2 * batch_size, 4 * (num_threads or default_num_threads()))

    def gen(skipped: list[SkippedImage]) -> Iterator[Batch]:
        images: list[np.ndarray] = []
        names: list[Path] = []
        for path, x in _decoded(paths, resize, crop, num_threads, prefetch, skip_bad, skipped):
            images.append(x)
            names.append(path)
            if len(images) == batch_size:
                yield Batch(np.stack(images), names)
                images, names = [], []
        if images:
            stacked = np.stack(images)
            yield Batch(pad_to(stacked, batch_size) if pad else stacked, names)

    return Stream(gen)


def load_masks(items: Sequence[TestItem], resize: int = 256, crop: int = 224,
               num_threads: int | None = None) -> np.ndarray:
    """Ground-truth masks of ``items``: all-False for normal images, checked against the image size.

    Returns:
      ``[len(items), crop, crop]`` bool.

    Raises:
      DatasetError: an anomalous item has no mask, or a mask's size differs from its image's.
      BadImageError: a mask file cannot be decoded.
    """
    _check_sizes(resize, crop)

    def load(item: TestItem) -> np.ndarray:
        if not item.label:
            return np.zeros((crop, crop), bool)
        if item.mask_path is None:
            raise DatasetError(f"anomalous test image {item.path} has no ground-truth mask")
        check_mask_matches(item.path, item.mask_path)
        return preprocess_mask(item.mask_path, resize, crop)

    num_threads = default_num_threads() if num_threads is None else num_threads
    masks = list(ordered_map(load, items, num_threads, 4 * max(1, num_threads)))
    return np.stack(masks) if masks else np.zeros((0, crop, crop), bool)
