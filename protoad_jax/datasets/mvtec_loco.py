"""The MVTec LOCO AD layout as downloaded: ``<category>/train/good``, ``validation/good``,
``test/{good,logical_anomalies,structural_anomalies}``, and one folder of masks per anomalous
test image, ``ground_truth/<type>/<stem>/000.png, 001.png, ...``.

Decisions (the layout as the dataset describes it; not checked against a download here):

- Each file in an image's mask folder is one defect; the image's defect is their union
  (``preprocess.mask_image`` of the folder). The masks hold per-defect grey values (for the
  saturation thresholds of the readme's sPRO metric); here any non-zero pixel is defect, and
  AU-PRO is measured on the union's connected regions (sPRO is not implemented).
- Metrics are reported for all test images and per anomaly type: good vs
  ``logical_anomalies``, good vs ``structural_anomalies`` (``Category.per_type``).
- ``validation/good`` is not trained on: its scores calibrate the model's threshold.
"""

from __future__ import annotations

import os
from pathlib import Path

from protoad_jax.datasets.folders import Category, category_dir, image_files, read_layout
from protoad_jax.preprocess import MASK_SUFFIXES

MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag",
                         "splicing_connectors")
ANOMALY_TYPES = ("logical_anomalies", "structural_anomalies")


def _mask_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in MASK_SUFFIXES for p in path.iterdir())


def read_mvtec_loco(root: str | os.PathLike, category: str) -> Category:
    """One MVTec LOCO category (``test`` split; per-type metrics on).

    Raises:
      DatasetError: a missing category, train, test or ground-truth folder, an empty split, or
        an anomalous test image without its mask folder (or with an empty one).
    """
    cat_dir = category_dir(root, category, "MVTec LOCO AD", MVTEC_LOCO_CATEGORIES)
    cat = read_layout(cat_dir, [cat_dir / "train" / "good"], ("good",),
                      lambda gt, t, stem: [gt / t / stem], require_masks=True,
                      is_mask=_mask_folder)
    val_dir = cat_dir / "validation" / "good"
    return cat._replace(validation=image_files(val_dir) if val_dir.is_dir() else [],
                        split="test", per_type=True)
