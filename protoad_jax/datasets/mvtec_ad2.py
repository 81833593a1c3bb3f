"""The MVTec AD 2 layout as downloaded: ``<category>/train/good``, ``validation/good``,
``test_public/{good,bad}`` with ``test_public/ground_truth/bad/<stem>_mask.png``, and the
unlabelled ``test_private/`` and ``test_private_mixed/`` (images directly in the folder).

Decisions, following the dataset's own code (``mvtec_ad_2_public_offline.py``, shipped with it):

- The evaluated split is chosen by name (``SPLITS``; ``test_public`` by default, the only one
  with labels and masks). ``test_private`` and ``test_private_mixed`` are scored and written
  (scores, maps, overlays) with null metrics: their ground truth is on MVTec's evaluation server.
- ``validation/good`` is not trained on: its scores calibrate the model's threshold
  (``evaluation.run_category``). The dataset's code reads it as a split of its own and
  prescribes no threshold rule; this one (normal images only, never the test set) is ours.
- A mask pixel is a defect when it is non-zero (the masks are 0/255).
"""

from __future__ import annotations

import os

from protoad_jax.datasets.folders import (
    Category,
    TestItem,
    category_dir,
    image_files,
    read_layout,
    require_dir,
)
from protoad_jax.errors import DatasetError, SettingsError

MVTEC_AD2_CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial",
                        "wallplugs", "walnuts")
SPLITS = ("test_public", "test_private", "test_private_mixed")
UNLABELED = "unlabeled"  # the defect type of a test image without a label


def read_mvtec_ad2(root: str | os.PathLike, category: str, split: str = "test_public") -> Category:
    """One MVTec AD 2 category with ``split`` as its test images.

    Raises:
      DatasetError: a missing category, train or split folder, an empty split, or an anomalous
        ``test_public`` image without its mask.
      SettingsError: an unknown split.
    """
    if split not in SPLITS:
        raise SettingsError(f"unknown MVTec AD 2 split {split!r}; expected one of {SPLITS}")
    cat_dir = category_dir(root, category, "MVTec AD 2", MVTEC_AD2_CATEGORIES)
    train_dir = cat_dir / "train" / "good"
    val_dir = cat_dir / "validation" / "good"
    validation = image_files(val_dir) if val_dir.is_dir() else []
    if split == "test_public":
        split_dir = cat_dir / split
        cat = read_layout(cat_dir, [train_dir], ("good",),
                          lambda gt, t, stem: [gt / t / f"{stem}_mask.png"],
                          test_dir=split_dir, gt_dir=split_dir / "ground_truth",
                          types=("good", "bad"), require_masks=True)
        return cat._replace(validation=validation, split=split)
    train = image_files(train_dir) if train_dir.is_dir() else []
    if not train:
        raise DatasetError(f"no training images in {train_dir}")
    split_dir = cat_dir / split
    require_dir(split_dir, f"MVTec AD 2 split folder ({split})")
    images = image_files(split_dir)
    if not images:
        raise DatasetError(f"no images in {split_dir}: an empty split (MVTec AD 2 keeps the "
                           f"{split} images directly in that folder)")
    test = [TestItem(p, UNLABELED, None, None) for p in images]
    return Category(cat_dir.name, train, test, has_masks=False, validation=validation,
                    split=split, labeled=False)
