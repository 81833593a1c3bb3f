"""One door from a dataset name to its inputs: ``load(name, data_dir, category, config)`` and
``list_categories(name, data_dir)``.

Folder layouts as downloaded (``folders``: MVTec AD, BTAD, a generic folder; ``visa``;
``mvtec_ad2``; ``mvtec_loco``), TFDS builders (``tfds_builders``, with the ``[tfds]`` extra;
imported only for a ``tfds:`` name), and the generated demo data (``demo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from protoad_jax.config import Config
from protoad_jax.datasets import visa
from protoad_jax.datasets.folders import (
    BTAD_CATEGORIES,
    IMAGE_EXTENSIONS,
    MVTEC_CATEGORIES,
    Category,
    TestItem,
    categories_under,
    find_images,
    read_btad,
    read_dataset,
    read_folder,
    read_mvtec,
)
from protoad_jax.datasets.folders import list_categories as list_folder_categories
from protoad_jax.datasets.mvtec_ad2 import MVTEC_AD2_CATEGORIES, read_mvtec_ad2
from protoad_jax.datasets.mvtec_ad2 import SPLITS as MVTEC_AD2_SPLITS
from protoad_jax.datasets.mvtec_loco import MVTEC_LOCO_CATEGORIES, read_mvtec_loco
from protoad_jax.datasets.visa import VISA_CATEGORIES, read_visa
from protoad_jax.errors import DatasetError, InputError, SettingsError
from protoad_jax.input_pipeline import check_mask_matches

NAMES = ("mvtec", "btad", "folder", "visa", "mvtec_ad2", "mvtec_loco", "tfds:mvtec_ad", "tfds:btad")
# The splits each dataset can evaluate; the first is the default.
SPLITS = {name: ("test",) for name in NAMES} | {"mvtec_ad2": MVTEC_AD2_SPLITS}

__all__ = [
    "BTAD_CATEGORIES", "IMAGE_EXTENSIONS", "MVTEC_AD2_CATEGORIES", "MVTEC_CATEGORIES",
    "MVTEC_LOCO_CATEGORIES", "NAMES", "SPLITS", "VISA_CATEGORIES", "Category", "DatasetError",
    "Inputs", "TestItem", "find_images", "list_categories", "load", "read_btad", "read_dataset",
    "read_folder", "read_mvtec", "read_mvtec_ad2", "read_mvtec_loco", "read_visa", "resolve_split",
]


class Inputs(NamedTuple):
    """One category's inputs: ``train`` and ``test`` as image paths (folder layouts) or
    preprocessed ``[s, s, 3]`` arrays (TFDS), the test ``items`` (``TestItem``), whether masks
    exist, and the ``masks`` ``[n, s, s]`` bool when already decoded (TFDS); ``validation``,
    ``split``, ``labeled`` and ``per_type`` as in ``Category``."""

    train: list
    test: list
    items: list[TestItem]
    has_masks: bool
    masks: np.ndarray | None = None
    validation: Sequence = ()
    split: str = "test"
    labeled: bool = True
    per_type: bool = False


def _tfds() -> Any:
    try:
        from protoad_jax.datasets import tfds_builders
    except ImportError as e:
        raise InputError(f"TFDS datasets need the [tfds] extra ({e}); pip install -e '.[tfds]' "
                         "(or pip install 'protoad-jax[tfds]')") from e
    return tfds_builders


def _check_name(dataset: str) -> None:
    if dataset not in NAMES:
        raise SettingsError(f"unknown dataset {dataset!r}; expected one of {NAMES}")


def resolve_split(dataset: str, split: str | None) -> str:
    """``split``, or the dataset's default (``SPLITS``) when None.

    Raises:
      SettingsError: an unknown dataset, or a split the dataset does not have.
    """
    _check_name(dataset)
    if split is None:
        return SPLITS[dataset][0]
    if split not in SPLITS[dataset]:
        raise SettingsError(f"dataset {dataset!r} has no split {split!r}; expected one of "
                            f"{SPLITS[dataset]}")
    return split


def load(dataset: str, data_dir: str | Path | None, category: str, config: Config, *,
         split: str | None = None, tfds_data_dir: str | None = None,
         tfds_manual_dir: str | None = None) -> Inputs:
    """Reads a category from a folder layout (``mvtec``, ``btad``, ``folder``, ``visa``,
    ``mvtec_ad2``, ``mvtec_loco``) or from a TFDS builder (``tfds:mvtec_ad``, ``tfds:btad``),
    in the same order either way. ``split`` picks the evaluated split (``SPLITS``; None: the
    dataset's default).

    Raises:
      DatasetError: the folder does not have the layout (the message names what is missing),
        or a mask's size differs from its image's (checked from the file headers).
      SettingsError: a split the dataset does not have.
      InputError: a ``tfds:`` name without the ``[tfds]`` extra installed.
    """
    split = resolve_split(dataset, split)
    if dataset.startswith("tfds:"):
        tb = _tfds()
        cat = tb.load_category(f"{dataset}/{category}", tfds_data_dir, manual_dir=tfds_manual_dir)
        train, _ = tb.preprocess_split(cat.train, config.resize, config.image_size)
        test, masks = tb.preprocess_split(cat.test, config.resize, config.image_size)
        return Inputs(list(train), list(test), cat.test.items(), True, masks)
    if data_dir is None:
        raise SettingsError(f"dataset {dataset!r} needs its root folder (data_dir)")
    cat = _read(dataset, data_dir, category, split)
    for it in cat.test:  # image headers only: a mismatch is found before any fitting
        if it.mask_path is not None:
            check_mask_matches(it.path, it.mask_path)
    return Inputs(cat.train, [it.path for it in cat.test], cat.test, cat.has_masks,
                  validation=list(cat.validation), split=cat.split, labeled=cat.labeled,
                  per_type=cat.per_type)


def _read(dataset: str, data_dir: str | Path, category: str, split: str) -> Category:
    if dataset == "visa":
        return read_visa(data_dir, category)
    if dataset == "mvtec_ad2":
        return read_mvtec_ad2(data_dir, category, split)
    if dataset == "mvtec_loco":
        return read_mvtec_loco(data_dir, category)
    return read_dataset(dataset, data_dir, category)


def list_categories(dataset: str, data_dir: str | Path | None) -> list[str]:
    """The categories of a dataset: folders with a ``train/`` folder under ``data_dir`` (the
    folder itself for ``folder``; the objects of the split CSV for ``visa``), or a TFDS
    builder's configs."""
    _check_name(dataset)
    if dataset.startswith("tfds:"):
        return _tfds().list_configs(dataset.removeprefix("tfds:"))
    if data_dir is None:
        raise SettingsError(f"dataset {dataset!r} needs its root folder (data_dir)")
    if dataset == "visa":
        return visa.list_categories(data_dir)
    if dataset in ("mvtec_ad2", "mvtec_loco"):
        known = MVTEC_AD2_CATEGORIES if dataset == "mvtec_ad2" else MVTEC_LOCO_CATEGORIES
        return categories_under(Path(data_dir), dataset, known)
    return list_folder_categories(dataset, data_dir)
