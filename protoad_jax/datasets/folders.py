"""Dataset folder layouts (MVTec AD, BTAD, a generic folder): which files are training, test,
normal, anomalous, and which mask belongs to which image.

Readers return plain NamedTuples listing files in sorted order; nothing is decoded here
(``protoad_jax.input_pipeline`` streams the files).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from protoad_jax.errors import DatasetError, SettingsError

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
        raise SettingsError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
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
        raise SettingsError(f"dataset {dataset!r} needs a category; see list_categories()")
    if dataset == "mvtec":
        return read_mvtec(root, category)
    if dataset == "btad":
        return read_btad(root, category)
    if dataset == "folder":
        return read_folder(root)
    raise SettingsError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
