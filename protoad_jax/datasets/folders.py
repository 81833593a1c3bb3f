"""Dataset folder layouts (MVTec AD, BTAD, a generic folder) and the helpers the other layouts
(``visa``, ``mvtec_ad2``, ``mvtec_loco``) share: which files are training, test, normal,
anomalous, and which mask belongs to which image.

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
from protoad_jax.preprocess import MASK_SUFFIXES

log = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
BTAD_CATEGORIES = ("01", "02", "03")
DATASETS = ("mvtec", "btad", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = MASK_SUFFIXES
NORMAL_TYPES = ("good", "normal", "ok")

class TestItem(NamedTuple):
    """One test image. ``label`` is 0 (normal), 1 (anomalous) or None (a split without labels);
    ``mask_path`` is None for normal images and when the dataset has no ground truth; it is a
    folder of mask files for MVTec LOCO (their union is the defect)."""

    __test__ = False  # not a pytest test class

    path: Path
    defect_type: str
    label: int | None
    mask_path: Path | None


class Category(NamedTuple):
    """One category: its normal training images and its test images, sorted.

    ``validation``: held-out normal images (MVTec AD 2, MVTec LOCO), scored after the fit to
    calibrate the model's threshold; ``split``: the name of the split ``test`` holds;
    ``labeled``: False when the split has no labels (its items' ``label`` is None: scored and
    written, no metrics); ``per_type``: measure each anomalous ``defect_type`` against the
    normal test images too (MVTec LOCO's logical and structural anomalies).
    """

    name: str
    train: list[Path]
    test: list[TestItem]
    has_masks: bool
    validation: Sequence[Path] = ()
    split: str = "test"
    labeled: bool = True
    per_type: bool = False


def image_files(folder: Path, exts: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The files of ``folder`` (not recursive) whose suffix, any case, is in ``exts``, by name."""
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


def subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DatasetError(f"{what} {folder} does not exist")


def read_layout(cat_dir: Path, train_dirs: Sequence[Path], normal_types: Sequence[str],
                mask_candidates: Callable[[Path, str, str], list[Path]], *,
                test_dir: Path | None = None, gt_dir: Path | None = None,
                types: Sequence[str] | None = None, require_masks: bool = False,
                is_mask: Callable[[Path], bool] = Path.is_file) -> Category:
    """Shared reader: ``train_dirs`` of normal images, ``test/<type>/``, ``ground_truth/``.

    ``test_dir`` and ``gt_dir`` default to ``cat_dir/test`` and ``cat_dir/ground_truth``;
    ``types`` limits the test subfolders read (None: all); ``require_masks`` makes a missing
    ``gt_dir`` an error instead of a warning; ``is_mask`` says whether a candidate exists.
    """
    train = [p for d in train_dirs if d.is_dir() for p in image_files(d, IMAGE_EXTENSIONS)]
    if not train:
        where = " or ".join(str(d) for d in train_dirs)
        raise DatasetError(f"no training images in {where} (expected files ending in "
                           f"{', '.join(IMAGE_EXTENSIONS)})")
    test_dir = cat_dir / "test" if test_dir is None else test_dir
    require_dir(test_dir, "test folder")
    loose = image_files(test_dir, IMAGE_EXTENSIONS)
    if loose:
        raise DatasetError(f"{test_dir} holds images directly (e.g. {loose[0].name}); put them in "
                           f"{test_dir.name}/<type>/ folders: {'/'.join(normal_types)} for normal "
                           "images, any other name for anomalous ones")
    gt_dir = cat_dir / "ground_truth" if gt_dir is None else gt_dir
    has_masks = gt_dir.is_dir()
    if not has_masks:
        if require_masks:
            raise DatasetError(f"ground-truth folder {gt_dir} does not exist; this layout has one "
                               "(restore it from the downloaded archive)")
        log.warning("no ground_truth folder at %s: pixel metrics will be null", gt_dir)
    test: list[TestItem] = []
    for type_dir in subdirs(test_dir):
        if types is not None and type_dir.name not in types:
            continue
        label = 0 if type_dir.name in normal_types else 1
        for img in image_files(type_dir, IMAGE_EXTENSIONS):
            mask = None
            if has_masks and label:
                candidates = mask_candidates(gt_dir, type_dir.name, img.stem)
                mask = next((c for c in candidates if is_mask(c)), None)
                if mask is None:
                    raise DatasetError(f"no ground-truth mask for anomalous test image {img}: "
                                       f"expected {' or '.join(map(str, candidates))}")
            test.append(TestItem(img, type_dir.name, label, mask))
    if not test:
        where = f" ({'/'.join(types)})" if types is not None else ""
        raise DatasetError(f"no test images in the subfolders{where} of {test_dir}")
    return Category(cat_dir.name, train, test, has_masks)


def category_dir(root: str | os.PathLike, category: str, dataset: str,
                  known: Sequence[str]) -> Path:
    root = Path(root)
    require_dir(root, f"{dataset} dataset root")
    cat_dir = root / category
    if not (cat_dir / "train").is_dir():
        found = [d.name for d in subdirs(root) if (d / "train").is_dir()]
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
    cat_dir = category_dir(root, category, "MVTec AD", MVTEC_CATEGORIES)
    return read_layout(cat_dir, [cat_dir / "train" / "good"], ("good",),
                        lambda gt, t, stem: [gt / t / f"{stem}_mask.png"])


def read_btad(root: str | os.PathLike, category: str) -> Category:
    """BTAD layout: ``train/ok``, ``test/ok``, ``test/ko``, ``ground_truth/ko/<stem>.{png,bmp}``.

    Raises:
      DatasetError: as ``read_mvtec``.
    """
    cat_dir = category_dir(root, category, "BTAD", BTAD_CATEGORIES)
    return read_layout(cat_dir, [cat_dir / "train" / "ok"], ("ok",),
                        lambda gt, t, stem: [gt / t / f"{stem}{e}" for e in (".png", ".bmp")])


def read_folder(root: str | os.PathLike) -> Category:
    """A generic layout: normal images in ``root/train/`` (or ``train/{good,normal,ok}/``),
    ``root/test/<type>/`` with ``good``/``normal``/``ok`` normal and any other type anomalous, and
    optional masks ``root/ground_truth/<type>/<stem>_mask.png`` or ``<stem>.png`` (or .bmp/.tif).

    Raises:
      DatasetError: as ``read_mvtec``.
    """
    root = Path(root)
    require_dir(root, "dataset folder")
    train = root / "train"
    require_dir(train, "training folder")

    def candidates(gt: Path, t: str, stem: str) -> list[Path]:
        return [gt / t / f"{stem}{suffix}{e}" for suffix in ("_mask", "") for e in MASK_EXTENSIONS]

    return read_layout(root, [train] + [train / n for n in NORMAL_TYPES], NORMAL_TYPES,
                        candidates)


def list_categories(dataset: str, root: str | os.PathLike) -> list[str]:
    """Category names present under ``root`` (sorted): folders that have a ``train`` folder.

    For ``dataset="folder"`` the root itself is the one category, named after the folder.
    """
    if dataset not in DATASETS:
        raise SettingsError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    root = Path(root)
    if dataset == "folder":
        require_dir(root, f"{dataset} dataset root")
        require_dir(root / "train", "training folder")
        return [root.name]
    return categories_under(root, dataset, MVTEC_CATEGORIES if dataset == "mvtec" else BTAD_CATEGORIES)


def categories_under(root: Path, dataset: str, known: Sequence[str]) -> list[str]:
    """The folders under ``root`` that have a ``train`` folder, sorted.

    Raises:
      DatasetError: ``root`` does not exist or holds no such folder (the message lists ``known``).
    """
    require_dir(root, f"{dataset} dataset root")
    found = [d.name for d in subdirs(root) if (d / "train").is_dir()]
    if not found:
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
