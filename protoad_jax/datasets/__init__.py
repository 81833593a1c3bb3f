"""One door from a dataset name to its inputs: ``load(name, data_dir, category, config)`` and
``list_categories(name, data_dir)``.

Folder layouts as downloaded (``folders``: MVTec AD, BTAD, a generic folder), TFDS builders
(``tfds_builders``, with the ``[tfds]`` extra; imported only for a ``tfds:`` name), and the
generated demo data (``demo``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from protoad_jax.config import Config
from protoad_jax.datasets.folders import (
    BTAD_CATEGORIES,
    IMAGE_EXTENSIONS,
    MVTEC_CATEGORIES,
    Category,
    TestItem,
    find_images,
    read_btad,
    read_dataset,
    read_folder,
    read_mvtec,
)
from protoad_jax.datasets.folders import list_categories as list_folder_categories
from protoad_jax.errors import DatasetError, InputError, SettingsError
from protoad_jax.input_pipeline import check_mask_matches

NAMES = ("mvtec", "btad", "folder", "tfds:mvtec_ad", "tfds:btad")

__all__ = [
    "BTAD_CATEGORIES", "IMAGE_EXTENSIONS", "MVTEC_CATEGORIES", "NAMES", "Category", "DatasetError",
    "Inputs", "TestItem", "find_images", "list_categories", "load", "read_btad", "read_dataset",
    "read_folder", "read_mvtec",
]


class Inputs(NamedTuple):
    """One category's inputs: ``train`` and ``test`` as image paths (folder layouts) or
    preprocessed ``[s, s, 3]`` arrays (TFDS), the test ``items`` (``TestItem``), whether masks
    exist, and the ``masks`` ``[n, s, s]`` bool when already decoded (TFDS)."""

    train: list
    test: list
    items: list[TestItem]
    has_masks: bool
    masks: np.ndarray | None = None


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


def load(dataset: str, data_dir: str | Path | None, category: str, config: Config, *,
         tfds_data_dir: str | None = None, tfds_manual_dir: str | None = None) -> Inputs:
    """Reads a category from a folder layout (``mvtec``, ``btad``, ``folder``) or from a TFDS
    builder (``tfds:mvtec_ad``, ``tfds:btad``), in the same order either way.

    Raises:
      DatasetError: the folder does not have the layout (the message names what is missing),
        or a mask's size differs from its image's (checked from the file headers).
      InputError: a ``tfds:`` name without the ``[tfds]`` extra installed.
    """
    _check_name(dataset)
    if dataset.startswith("tfds:"):
        tb = _tfds()
        cat = tb.load_category(f"{dataset}/{category}", tfds_data_dir, manual_dir=tfds_manual_dir)
        train, _ = tb.preprocess_split(cat.train, config.resize, config.image_size)
        test, masks = tb.preprocess_split(cat.test, config.resize, config.image_size)
        return Inputs(list(train), list(test), cat.test.items(), True, masks)
    if data_dir is None:
        raise SettingsError(f"dataset {dataset!r} needs its root folder (data_dir)")
    cat = read_dataset(dataset, data_dir, category)
    for it in cat.test:  # image headers only: a mismatch is found before any fitting
        if it.mask_path is not None:
            check_mask_matches(it.path, it.mask_path)
    return Inputs(cat.train, [it.path for it in cat.test], cat.test, cat.has_masks)


def list_categories(dataset: str, data_dir: str | Path | None) -> list[str]:
    """The categories of a dataset: folders with a ``train/`` folder under ``data_dir`` (the
    folder itself for ``folder``), or a TFDS builder's configs."""
    _check_name(dataset)
    if dataset.startswith("tfds:"):
        return _tfds().list_configs(dataset.removeprefix("tfds:"))
    if data_dir is None:
        raise SettingsError(f"dataset {dataset!r} needs its root folder (data_dir)")
    return list_folder_categories(dataset, data_dir)
