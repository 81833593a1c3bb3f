"""Dataset layouts the tests write: a tiny BTAD-layout dataset of demo textures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from protoad_jax.datasets import demo


def _save(array: np.ndarray, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def make_btad_like(root: str | os.PathLike, seed: int = 0, n_train: int = 4, n_test_ok: int = 2,
                   n_test_ko: int = 3, size: int = 64) -> Path:
    """Writes a tiny BTAD-layout dataset (category ``01``: ``train/ok``, ``test/ok``,
    ``test/ko`` as ``.bmp``, ``ground_truth/ko/<stem>.png``) of demo textures; returns ``root``."""
    root = Path(root)
    cat = root / "01"
    for i in range(n_train):
        _save(demo.demo_sample(demo.TEXTURE, "train", i, seed, size).image,
              cat / "train" / "ok" / f"{i:04d}.bmp", "BMP")
    for i in range(n_test_ok):
        _save(demo.demo_sample(demo.TEXTURE, "good", i, seed, size).image,
              cat / "test" / "ok" / f"{i:04d}.bmp", "BMP")
    kinds = demo.DEFECTS[demo.TEXTURE]
    for i in range(n_test_ko):
        sample = demo.demo_sample(demo.TEXTURE, kinds[i % len(kinds)], i // len(kinds), seed, size)
        _save(sample.image, cat / "test" / "ko" / f"{i:04d}.bmp", "BMP")
        _save(sample.mask.astype(np.uint8) * 255, cat / "ground_truth" / "ko" / f"{i:04d}.png",
              "PNG")
    return root


# --- VisA, MVTec AD 2 and MVTec LOCO layouts, as downloaded, of real photographs -----------------
# Each is built from datasets.demo.make_photo_dataset (seeded crops of scikit-learn's sample
# photographs with painted holes, scratches and stains; each mask is exactly the changed pixels),
# rearranged into the dataset's own folder layout.


def _photo_source(tmp: Path, seed: int, n_train: int, n_test_good: int, n_test_bad: int,
                  size: int) -> tuple[list[Path], list[Path], list[tuple[Path, Path]]]:
    """``(train, good, [(bad image, its mask), ...])`` of a photo dataset written under ``tmp``."""
    from sklearn.datasets import load_sample_images

    cat = demo.make_photo_dataset(tmp, load_sample_images().images, seed=seed, n_train=n_train,
                                  n_test_good=n_test_good, n_test_bad=n_test_bad, size=size) / demo.PHOTO
    train = sorted((cat / "train" / "good").glob("*.png"))
    good = sorted((cat / "test" / "good").glob("*.png"))
    bad = [(p, cat / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
           for t in sorted(demo.PHOTO_DEFECTS) for p in sorted((cat / "test" / t).glob("*.png"))]
    return train, good, bad


def _copy(src: Path, dst: Path, fmt: str = "PNG", box: tuple | None = None) -> None:
    with Image.open(src) as im:
        im = im.crop(box) if box else im
        _save(np.asarray(im), dst, fmt)


def make_visa_like(root: str | os.PathLike, category: str = "photo", seed: int = 0,
                   n_train: int = 4, n_test_good: int = 2, n_test_bad: int = 3,
                   size: int = 128) -> Path:
    """A VisA-layout dataset as downloaded: ``<category>/Data/Images/{Normal,Anomaly}/*.JPG``,
    masks ``<category>/Data/Masks/Anomaly/*.png`` holding small class values (1, 2, 3: any
    non-zero pixel is defect, as in VisA), and ``split_csv/1cls.csv`` (with one row of another
    object, whose files do not exist: a reader must only read its category's rows)."""
    root = Path(root)
    train, good, bad = _photo_source(root / ".source", seed, n_train, n_test_good, n_test_bad, size)
    rows = ["object,split,label,image,mask"]
    for i, src in enumerate(train + good):
        rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
        _copy(src, root / rel, "JPEG")
        rows.append(f"{category},{'train' if i < len(train) else 'test'},normal,{rel},")
    for i, (src, mask) in enumerate(bad):
        rel, rel_mask = f"{category}/Data/Images/Anomaly/{i:03d}.JPG", f"{category}/Data/Masks/Anomaly/{i:03d}.png"
        _copy(src, root / rel, "JPEG")
        with Image.open(mask) as m:
            _save(((np.asarray(m) > 0) * (1 + i % 3)).astype(np.uint8), root / rel_mask, "PNG")
        rows.append(f"{category},test,anomaly,{rel},{rel_mask}")
    rows.append("candle,train,normal,candle/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    shutil.rmtree(root / ".source")
    return root


def make_mvtec_ad2_like(root: str | os.PathLike, category: str = "photo", seed: int = 0,
                        n_train: int = 4, n_val: int = 2, n_test_good: int = 2,
                        n_test_bad: int = 3, n_private: int = 3, size: int = 128) -> Path:
    """An MVTec AD 2-layout dataset: ``train/good``, ``validation/good``,
    ``test_public/{good,bad}``, ``test_public/ground_truth/bad/<stem>_mask.png`` (0/255), and
    unlabelled ``test_private/NNN_regular.png``, ``test_private_mixed/NNN_mixed.png`` (normal
    and defective images mixed). Images are wider than tall (size x 3/4 size), as AD 2's are."""
    root = Path(root)
    box = (0, size // 8, size, size - size // 8)
    train, good, bad = _photo_source(root / ".source", seed, n_train + n_val, n_test_good,
                                     n_test_bad, size)
    _, p_good, p_bad = _photo_source(root / ".source_private", seed + 1, 0, n_private - n_private // 2,
                                     n_private // 2, size)
    cat = root / category
    for i, src in enumerate(train):
        folder = cat / "train" / "good" if i < n_train else cat / "validation" / "good"
        _copy(src, folder / f"{i:03d}_regular.png", box=box)
    for i, src in enumerate(good):
        _copy(src, cat / "test_public" / "good" / f"{i:03d}_regular.png", box=box)
    for i, (src, mask) in enumerate(bad):
        _copy(src, cat / "test_public" / "bad" / f"{i:03d}_regular.png", box=box)
        _copy(mask, cat / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", box=box)
    for i, src in enumerate(p_good + [b for b, _ in p_bad]):
        _copy(src, cat / "test_private" / f"{i:03d}_regular.png", box=box)
        _copy(src, cat / "test_private_mixed" / f"{i:03d}_mixed.png", box=box)
    shutil.rmtree(root / ".source")
    shutil.rmtree(root / ".source_private")
    return root


def make_mvtec_loco_like(root: str | os.PathLike, category: str = "photo", seed: int = 0,
                         n_train: int = 4, n_val: int = 2, n_test_good: int = 2,
                         n_logical: int = 2, n_structural: int = 2, size: int = 128) -> Path:
    """An MVTec LOCO-layout dataset: ``train/good``, ``validation/good``,
    ``test/{good,logical_anomalies,structural_anomalies}``, and per anomalous image a folder
    ``ground_truth/<type>/<stem>/`` of masks: the defect's left part in ``000.png`` (255) and its
    right part in ``001.png`` (value 60: LOCO's masks are not binary); their union is the defect."""
    root = Path(root)
    train, good, bad = _photo_source(root / ".source", seed, n_train + n_val, n_test_good,
                                     n_logical + n_structural, size)
    cat = root / category
    for i, src in enumerate(train):
        folder = cat / "train" / "good" if i < n_train else cat / "validation" / "good"
        _copy(src, folder / f"{i:03d}.png")
    for i, src in enumerate(good):
        _copy(src, cat / "test" / "good" / f"{i:03d}.png")
    for i, (src, mask) in enumerate(bad):
        kind = "logical_anomalies" if i < n_logical else "structural_anomalies"
        stem = f"{i if i < n_logical else i - n_logical:03d}"
        _copy(src, cat / "test" / kind / f"{stem}.png")
        with Image.open(mask) as m:
            defect = np.asarray(m) > 0
        split_at = int(np.median(np.nonzero(defect)[1]))
        cols = np.arange(defect.shape[1])[None, :]
        _save((defect & (cols < split_at)).astype(np.uint8) * 255,
              cat / "ground_truth" / kind / stem / "000.png", "PNG")
        _save((defect & (cols >= split_at)).astype(np.uint8) * 60,
              cat / "ground_truth" / kind / stem / "001.png", "PNG")
    shutil.rmtree(root / ".source")
    return root
