"""The VisA layout as downloaded (amazon-science/spot-diff, ``VisA.tar``): images in
``<root>/<category>/Data/Images/{Normal,Anomaly}/``, masks in
``<root>/<category>/Data/Masks/Anomaly/``, and the split in ``<root>/split_csv/1cls.csv``.

The CSV has the columns ``object, split, label, image, mask``; ``image`` and ``mask`` are paths
relative to ``<root>``, ``mask`` is empty for normal images. Decisions, following the dataset's
own ``prepare_data.py`` (the script its readme gives for the one-class setup):

- ``label`` ``normal`` is a normal image, anything else (``anomaly``) an anomalous one; test
  images get the defect types ``good`` and ``bad``, the folders ``prepare_data.py`` writes.
- A mask pixel is a defect when it is non-zero (VisA masks hold small class values, not 255).
- The one-class split trains on normal images only: an anomalous ``train`` row is an error.
- Images are listed as the folder readers list them (test: ``bad`` then ``good``, each by file
  name), so results equal those of ``--dataset=mvtec`` on the tree ``prepare_data.py`` writes.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from protoad_jax.datasets.folders import Category, TestItem, require_dir
from protoad_jax.errors import DatasetError

log = logging.getLogger(__name__)

VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                   "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")


def read_split_csv(root: str | os.PathLike) -> tuple[Path, list[tuple[int, dict[str, str]]]]:
    """``(path, [(line number, row), ...])`` of ``<root>/split_csv/1cls.csv``.

    Raises:
      DatasetError: the root or the CSV is missing, or the CSV lacks one of ``COLUMNS``.
    """
    root = Path(root)
    require_dir(root, "VisA dataset root")
    path = root / SPLIT_CSV
    if not path.is_file():
        raise DatasetError(f"VisA split file {path} does not exist; extract VisA.tar as it is "
                           "downloaded (it holds split_csv/1cls.csv next to the category folders)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"VisA split file {path} lacks the columns {missing} (found "
                               f"{reader.fieldnames}); expected {', '.join(COLUMNS)}")
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k})
                for row in reader]
    return path, rows


def list_categories(root: str | os.PathLike) -> list[str]:
    """The objects named in the split CSV that have a folder under ``root``, sorted (objects
    without one are logged and left out).

    Raises:
      DatasetError: no object of the CSV has a folder.
    """
    csv_path, rows = read_split_csv(root)
    named = sorted({row["object"] for _, row in rows})
    found = [o for o in named if (Path(root) / o).is_dir()]
    if len(found) < len(named):
        log.warning("objects of %s without a folder under %s, left out: %s", csv_path, root,
                    sorted(set(named) - set(found)))
    if not found:
        raise DatasetError(f"none of the objects of {csv_path} ({named}) has a folder under {root}")
    return found


def read_visa(root: str | os.PathLike, category: str) -> Category:
    """One VisA category, split by ``split_csv/1cls.csv``.

    Raises:
      DatasetError: a missing CSV or category folder, a CSV row naming a file that does not
        exist (the message names the CSV, its line and the file), an anomalous training row,
        an unknown split or label, an anomalous test row without a mask, or an empty split.
    """
    root = Path(root)
    csv_path, all_rows = read_split_csv(root)
    rows = [(n, r) for n, r in all_rows if r["object"] == category]
    cat_dir = root / category
    if not cat_dir.is_dir() or not rows:
        objects = sorted({r["object"] for _, r in all_rows})
        problem = f"folder {cat_dir} does not exist" if not cat_dir.is_dir() else \
            f"has no rows in {csv_path}"
        raise DatasetError(f"VisA category {category!r}: {problem}; categories in the split file: "
                           f"{objects or 'none'}; known VisA categories: {list(VISA_CATEGORIES)}")

    def existing(line: int, column: str, rel: str) -> Path:
        if not rel:
            raise DatasetError(f"{csv_path} line {line}: the {column} column is empty for an "
                               "anomalous test image; VisA gives each one a mask")
        path = root / rel
        if not path.is_file():
            raise DatasetError(f"{csv_path} line {line} names the {column} {path}, which does not "
                               "exist; restore the file from VisA.tar or remove the line")
        return path

    train: list[Path] = []
    test: list[TestItem] = []
    for line, row in rows:
        split, label = row["split"], 0 if row["label"] == "normal" else 1
        if split not in ("train", "test"):
            raise DatasetError(f"{csv_path} line {line}: split {split!r}; expected train or test")
        image = existing(line, "image", row["image"])
        if split == "train":
            if label:
                raise DatasetError(f"{csv_path} line {line}: an anomalous ({row['label']!r}) "
                                   "training image; the one-class split (1cls.csv) trains on "
                                   "normal images only")
            train.append(image)
        else:
            mask = existing(line, "mask", row["mask"]) if label else None
            test.append(TestItem(image, "bad" if label else "good", label, mask))
    for name, items in (("train", train), ("test", test)):
        if not items:
            raise DatasetError(f"{csv_path} has no {name} rows for {category!r}: an empty split")
    train.sort(key=lambda p: p.name)
    test.sort(key=lambda it: (it.defect_type, it.path.name))
    return Category(category, train, test, has_masks=True, split="test")
