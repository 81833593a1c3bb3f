"""Dataset layouts the tests write: a tiny BTAD-layout dataset of demo textures."""

from __future__ import annotations

import os
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
