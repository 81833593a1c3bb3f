"""Generated anomaly-detection datasets in MVTec AD layout, for the demo, tests and benchmarks.

Two categories: ``demo_texture`` (a denim-like 3/1 twill weave) and ``demo_object`` (a machined
hex nut on a table), each with per-image random variation, and realistic defects: scratches
(thin random polylines), holes (dark frayed ellipses with a rim), stains (soft coloured blobs,
alpha-blended) and, for the object, missing pieces (a chunk of the nut replaced by background).
Every ground-truth mask is exact: the pixels whose saved value differs from the defect-free
rendering of the same image. A third category, ``photo``, paints the same defects on crops of
real photographs the caller passes (``make_photo_dataset``).

Everything is drawn with NumPy (and PIL's line drawing) from ``np.random.default_rng([seed, ...])``,
so the same seed gives byte-identical files on the same NumPy/Pillow install. Files are written
atomically (temporary file + rename).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from protoad_jax.fileio import atomic_write
from protoad_jax.preprocess import preprocess_image

TEXTURE, OBJECT = "demo_texture", "demo_object"
CATEGORIES = (TEXTURE, OBJECT)
DEFECTS = {
    TEXTURE: ("hole", "scratch", "stain"),
    OBJECT: ("hole", "missing", "scratch", "stain"),
}
_CATEGORY_ID = {TEXTURE: 1, OBJECT: 2}
_SPLIT_ID = {"train": 0, "good": 1, "hole": 2, "missing": 3, "scratch": 4, "stain": 5}


class DemoSample(NamedTuple):
    """``image`` and ``clean`` ``[size, size, 3]`` uint8 (the image before its defect), and
    ``mask`` ``[size, size]`` bool, exactly the pixels where they differ."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray


# ----------------------------------------------------------------------------- noise helpers


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """``[size, size]`` smooth noise: a ``cells``-grid of normals, smoothstep-interpolated."""
    g = rng.standard_normal((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _streaks(rng: np.random.Generator, size: int, length: int, axis: int) -> np.ndarray:
    """``[size, size]`` unit-ish noise smeared along ``axis`` (fibres along a thread)."""
    n = rng.standard_normal((size, size))
    out = sum(np.roll(n, k, axis=axis) for k in range(length))
    return out / np.sqrt(length)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return y + 0.5, x + 0.5


# ----------------------------------------------------------------------------- defect-free images


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A denim-like 3/1 twill: indigo warp (vertical) over pale weft. ``[s, s, 3]``."""
    s = size / 256
    period = rng.uniform(7.0, 7.8) * s
    y, x = _grid(size)
    warp_wave = 0.25 * _smooth_noise(rng, size, 3)  # threads are not perfectly straight
    u = (x + rng.uniform(0, 40)) / period + warp_wave
    v = (y + rng.uniform(0, 40)) / period + 0.25 * _smooth_noise(rng, size, 3)
    cu, fu = np.floor(u), u - np.floor(u)
    cv, fv = np.floor(v), v - np.floor(v)
    warp_on_top = np.mod(cu + cv, 4) < 3  # 3/1 twill: the warp shows on the face

    n_threads = int(size / period) + 90
    warp_tone = 1 + 0.07 * rng.standard_normal(n_threads)
    weft_tone = 1 + 0.05 * rng.standard_normal(n_threads)
    warp_shade = (np.sin(np.pi * fu) ** 0.7 * (0.82 + 0.18 * np.sin(np.pi * fv))
                  * warp_tone[cu.astype(int) % n_threads]
                  * (1 + 0.10 * _streaks(rng, size, max(2, int(6 * s)), axis=0)))
    weft_shade = (np.sin(np.pi * fv) ** 0.7 * (0.82 + 0.18 * np.sin(np.pi * fu))
                  * weft_tone[cv.astype(int) % n_threads]
                  * (1 + 0.10 * _streaks(rng, size, max(2, int(6 * s)), axis=1)))

    tint = 1 + 0.04 * rng.standard_normal(3)
    warp_rgb = np.array([42.0, 66.0, 118.0]) * tint
    weft_rgb = np.array([178.0, 174.0, 162.0]) * (1 + 0.03 * rng.standard_normal(3))
    gap_rgb = np.array([18.0, 22.0, 34.0])
    img = np.where(warp_on_top[..., None],
                   gap_rgb + (warp_rgb - gap_rgb) * warp_shade[..., None],
                   gap_rgb + (weft_rgb - gap_rgb) * weft_shade[..., None])
    light = 1 + 0.06 * _smooth_noise(rng, size, 3) + rng.uniform(-0.05, 0.05)
    return img * light[..., None] + 2.0 * rng.standard_normal((size, size, 1))


class _Nut(NamedTuple):
    background: np.ndarray  # [s, s, 3]
    body: np.ndarray  # [s, s, 3] the nut's colours everywhere
    alpha: np.ndarray  # [s, s] coverage in [0, 1]
    sdf: np.ndarray  # [s, s] signed distance to the nut's outline (negative inside)
    center: np.ndarray  # [2] (y, x)
    apothem: float


def _nut(rng: np.random.Generator, size: int) -> _Nut:
    """A machined hex nut with a round bore, lit from a random side, on a dark table."""
    s = size / 256
    y, x = _grid(size)
    center = size / 2 + rng.uniform(-6, 6, 2) * s
    py, px = y - center[0], x - center[1]
    r = np.hypot(py, px)
    apothem = 0.28 * size * (1 + rng.uniform(-0.02, 0.02))
    bore = 0.45 * apothem
    theta = rng.uniform(0, np.pi / 3)
    angles = theta + np.arange(6) * np.pi / 3
    proj = px[..., None] * np.cos(angles) + py[..., None] * np.sin(angles)  # [s, s, 6]
    hex_sdf = np.maximum(proj.max(-1) - apothem, r - 1.12 * apothem)  # chamfered corners
    sdf = np.maximum(hex_sdf, bore - r)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)

    light_angle = rng.uniform(0, 2 * np.pi)
    lx, ly = np.cos(light_angle), np.sin(light_angle)
    facet = np.argmax(proj, axis=-1)
    facing = np.cos(angles[facet]) * lx + np.sin(angles[facet]) * ly
    # Bevels: bands at the outer edge and around the bore, shaded by how they face the light.
    outer_bevel = np.clip((hex_sdf + 0.12 * apothem) / 1.5, 0, 1)
    inner_bevel = np.clip((bore + 0.10 * apothem - r) / 1.5, 0, 1)
    radial = -(px * lx + py * ly) / np.maximum(r, 1e-6)
    shade = (1 + 0.12 * (px * lx + py * ly) / apothem
             + 0.035 * np.sin(2 * np.pi * r / (2.6 * s))  # turning marks
             + 0.35 * facing * outer_bevel + 0.35 * radial * inner_bevel
             + 0.25 * np.exp(-((px + 0.5 * apothem * lx) ** 2 + (py + 0.5 * apothem * ly) ** 2)
                             / (2 * (0.35 * apothem) ** 2))  # broad highlight
             + 0.02 * rng.standard_normal((size, size)))
    metal = np.array([128.0, 127.0, 122.0]) * (1 + rng.uniform(-0.08, 0.08))
    body = metal * shade[..., None]

    table = np.array([52.0, 58.0, 55.0]) * (1 + 0.08 * _smooth_noise(rng, size, 4))[..., None]
    # A soft contact shadow offset away from the light.
    off = 5 * s
    sr = np.hypot(py + ly * off, px + lx * off)
    shadow = np.clip(1 - (sr - 0.95 * apothem) / (14 * s), 0, 1) * (sr > bore + 4 * s)
    background = table * (1 - 0.35 * shadow)[..., None] + 2.5 * rng.standard_normal((size, size, 1))
    return _Nut(background, body, alpha, sdf, center, apothem)


def _compose(nut: _Nut, alpha: np.ndarray | None = None) -> np.ndarray:
    a = (nut.alpha if alpha is None else alpha)[..., None]
    return nut.background * (1 - a) + nut.body * a


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- defects


def _pick_point(rng: np.random.Generator, size: int, margin: float, sdf: np.ndarray | None,
                depth: float = 0.0) -> np.ndarray:
    """A (y, x) point ``margin`` inside the image and (given an object's ``sdf``) ``depth`` inside
    the object."""
    for _ in range(1000):
        p = rng.uniform(margin, size - margin, 2)
        if sdf is None or sdf[int(p[0]), int(p[1])] < -depth:
            return p
    raise RuntimeError("no room for a defect; the image is too small")


def _blend(img: np.ndarray, a: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    return img * (1 - a[..., None]) + rgb * a[..., None]


def _scratch(rng, img, size, region, bright):
    s = size / 256
    p = _pick_point(rng, size, 40 * s, region, 8 * s)
    heading = rng.uniform(0, 2 * np.pi)
    points = [tuple(p[::-1])]
    for _ in range(rng.integers(4, 8)):
        heading += rng.normal(0, 0.3)
        step = rng.uniform(8, 13) * s
        p = p + step * np.array([np.sin(heading), np.cos(heading)])
        points.append(tuple(p[::-1]))
    canvas = Image.new("L", (size, size), 0)
    width = rng.integers(1, 3) if bright else rng.integers(2, 4)
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(width * max(1, s)), joint="curve")
    a = np.asarray(canvas, np.float64) / 255 * rng.uniform(0.7, 0.9)
    if region is not None:
        a = a * (region < -1.0)  # stays on the nut's face
    rgb = np.array([238.0, 236.0, 228.0]) if bright else np.array([214.0, 208.0, 190.0])
    return _blend(img, a, rgb)


def _hole(rng, img, size, region, rim_rgb):
    s = size / 256
    c = _pick_point(rng, size, 24 * s, region, 12 * s)
    semi = rng.uniform(5, 10 if region is None else 8) * s
    ratio = rng.uniform(0.55, 1.0)
    phi = rng.uniform(0, np.pi)
    y, x = _grid(size)
    dy, dx = y - c[0], x - c[1]
    eu = (dx * np.cos(phi) + dy * np.sin(phi)) / semi
    ev = (-dx * np.sin(phi) + dy * np.cos(phi)) / (semi * ratio)
    ang = np.arctan2(ev, eu)
    fray = 1 + sum(rng.uniform(0, 0.08) * np.sin(k * ang + rng.uniform(0, 2 * np.pi))
                   for k in (3, 5, 7))
    rho = np.hypot(eu, ev) / fray
    inside = np.clip((1 - rho) * semi * ratio + 0.5, 0, 1)
    rim_w = 2.2 * s / (semi * ratio)
    rim = np.clip(1 - np.abs(rho - 1 - rim_w / 2) / (rim_w / 2 + 1e-9), 0, 1) * 0.6
    rim = rim * (rho < 1 + rim_w)
    dark = np.array([14.0, 13.0, 16.0]) + 3 * rng.standard_normal((size, size, 1))
    out = _blend(img, rim, rim_rgb)
    return out * (1 - inside[..., None]) + dark * inside[..., None]


def _stain(rng, img, size, region, rgb):
    s = size / 256
    c = _pick_point(rng, size, 32 * s, region, 10 * s)
    y, x = _grid(size)
    field = np.zeros((size, size))
    for _ in range(rng.integers(3, 6)):
        o = c + rng.normal(0, 6 * s, 2)
        sig = rng.uniform(5, 10) * s
        field += np.exp(-((y - o[0]) ** 2 + (x - o[1]) ** 2) / (2 * sig ** 2))
    field /= field.max()
    cover = np.clip((field - 0.3) / 0.25, 0, 1)
    ring = np.exp(-((field - 0.34) / 0.06) ** 2) * (field > 0.3)  # coffee-ring edge
    a = np.clip(cover * rng.uniform(0.5, 0.65) + 0.25 * ring, 0, 0.85)
    if region is not None:
        a = a * np.clip(-region, 0, 1)
    return _blend(img, a, rgb * (1 + 0.05 * rng.standard_normal(3)))


def _missing(rng, nut: _Nut, size):
    """A chipped-off corner region of the nut, showing the table underneath."""
    s = size / 256
    phi = rng.uniform(0, 2 * np.pi)
    edge = nut.center + 1.0 * nut.apothem * np.array([np.sin(phi), np.cos(phi)])
    y, x = _grid(size)
    dy, dx = y - edge[0], x - edge[1]
    ang = np.arctan2(dy, dx)
    radius = rng.uniform(11, 16) * s * (1 + sum(
        rng.uniform(0, 0.15) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)))
    chunk = np.clip(radius - np.hypot(dy, dx) + 0.5, 0, 1)
    return _compose(nut, nut.alpha * (1 - chunk))


# ----------------------------------------------------------------------------- samples and files


def demo_sample(category: str, split: str, index: int, seed: int = 0,
                size: int = 256) -> DemoSample:
    """Renders one image deterministically.

    Args:
      category: ``"demo_texture"`` or ``"demo_object"``.
      split: ``"train"``, ``"good"`` (normal test image) or a defect of ``DEFECTS[category]``.
      index: the image's index within its split.
      seed: dataset seed.
      size: image side in pixels (defect sizes scale with it; at least 64).

    Returns:
      ``DemoSample``; ``mask`` is empty for ``train`` and ``good``.
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown demo category {category!r}; expected one of {CATEGORIES}")
    if split not in ("train", "good") + DEFECTS[category]:
        raise ValueError(f"unknown split {split!r} for {category}; expected train, good or one "
                         f"of {DEFECTS[category]}")
    if size < 64:
        raise ValueError(f"demo images must be at least 64 pixels wide, got {size}")
    rng = np.random.default_rng([seed, _CATEGORY_ID[category], _SPLIT_ID[split], index])
    if category == TEXTURE:
        img = _texture(rng, size)
        region, nut = None, None
    else:
        nut = _nut(rng, size)
        img, region = _compose(nut), nut.sdf
    clean = _to_u8(img)
    if split in ("train", "good"):
        return DemoSample(clean, clean, np.zeros((size, size), bool))
    texture = category == TEXTURE
    if split == "scratch":
        out = _scratch(rng, img, size, region, bright=not texture)
    elif split == "hole":
        rim = np.array([205.0, 200.0, 185.0]) if texture else np.array([225.0, 222.0, 214.0])
        out = _hole(rng, img, size, region, rim)
    elif split == "stain":
        rgb = np.array([96.0, 62.0, 26.0]) if texture else np.array([140.0, 66.0, 24.0])
        out = _stain(rng, img, size, region, rgb)
    else:
        out = _missing(rng, nut, size)
    image = _to_u8(out)
    return DemoSample(image, clean, np.any(image != clean, axis=-1))


def _save(array: np.ndarray, path: Path, fmt: str) -> None:
    """Writes a ``[h, w]`` or ``[h, w, 3]`` uint8 array as an image file, atomically."""
    image = Image.fromarray(array)
    atomic_write(path, lambda f: image.save(f, format=fmt))


def _split_counts(n: int, kinds: tuple[str, ...]) -> dict[str, int]:
    return {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}


def make_demo_dataset(root: str | os.PathLike, seed: int = 0, n_train: int = 12,
                      n_test_good: int = 6, n_test_bad: int = 8, size: int = 256,
                      categories: tuple[str, ...] = CATEGORIES) -> Path:
    """Writes the demo dataset in MVTec AD layout under ``root`` and returns ``root``.

    ``<root>/<category>/train/good/000.png``, ``test/good/``, ``test/<defect>/`` and
    ``ground_truth/<defect>/<name>_mask.png`` (0/255). The ``n_test_bad`` defective test images
    are spread evenly over ``DEFECTS[category]``. Same arguments -> byte-identical files.
    """
    root = Path(root)
    for category in categories:
        if category not in CATEGORIES:
            raise ValueError(f"unknown demo category {category!r}; expected some of {CATEGORIES}")
        cat = root / category
        for i in range(n_train):
            _save(demo_sample(category, "train", i, seed, size).image,
                  cat / "train" / "good" / f"{i:03d}.png", "PNG")
        for i in range(n_test_good):
            _save(demo_sample(category, "good", i, seed, size).image,
                  cat / "test" / "good" / f"{i:03d}.png", "PNG")
        for defect, n in _split_counts(n_test_bad, DEFECTS[category]).items():
            for i in range(n):
                sample = demo_sample(category, defect, i, seed, size)
                _save(sample.image, cat / "test" / defect / f"{i:03d}.png", "PNG")
                _save(sample.mask.astype(np.uint8) * 255,
                      cat / "ground_truth" / defect / f"{i:03d}_mask.png", "PNG")
    return root


def _random_square(rng: np.random.Generator, photos: Sequence[Image.Image]) -> Image.Image:
    """A seeded square crop of one of ``photos``: random photo, side and position."""
    img = photos[int(rng.integers(len(photos)))]
    w, h = img.size
    side = int(rng.integers(min(w, h) // 3, min(w, h) + 1))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return img.crop((x0, y0, x0 + side, y0 + side))


def _pil(photos: Sequence[Any]) -> list[Image.Image]:
    if not len(photos):
        raise ValueError("photos must hold at least one image (e.g. scikit-learn's "
                         "sklearn.datasets.load_sample_images().images)")
    return [p if isinstance(p, Image.Image) else Image.fromarray(np.asarray(p, np.uint8))
            for p in photos]


def photo_crops(photos: Sequence[Any], count: int, seed: int = 0,
                size: int = 224) -> list[np.ndarray]:
    """``count`` preprocessed ``[size, size, 3]`` crops of real photographs: random positions and
    scales, some mirrored, seeded.

    Real-photo material for the clustering tests and benchmarks (no dataset can be downloaded
    here): pass ``photos`` as RGB uint8 arrays or PIL images, e.g. scikit-learn's
    ``load_sample_images().images`` (the library itself does not import scikit-learn).
    """
    photos = _pil(photos)
    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(count):
        crop = _random_square(rng, photos)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(preprocess_image(crop, size + size // 7, size))
    return out


PHOTO = "photo"
PHOTO_DEFECTS = ("hole", "scratch", "stain")


def make_photo_dataset(root: str | os.PathLike, photos: Sequence[Any], seed: int = 0,
                       n_train: int = 12, n_test_good: int = 6, n_test_bad: int = 9,
                       size: int = 256) -> Path:
    """Real photographs with synthetic defects, in MVTec AD layout (category ``"photo"``).

    Images are seeded square crops of ``photos`` (RGB uint8 arrays or PIL images, e.g.
    scikit-learn's ``load_sample_images().images``), resized to ``size``; defective test images
    get a hole, scratch or stain painted as in the demo categories, and the mask is exactly the
    pixels that changed.
    """
    photos = _pil(photos)
    root = Path(root)
    cat = root / PHOTO

    def crop(rng):
        c = _random_square(rng, photos).resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(c, np.float64)

    for split, n in [("train", n_train), ("good", n_test_good)] + list(
            _split_counts(n_test_bad, PHOTO_DEFECTS).items()):
        for i in range(n):
            rng = np.random.default_rng([seed, 3, _SPLIT_ID[split], i])
            img = crop(rng)
            folder = cat / "train" / "good" if split == "train" else cat / "test" / split
            if split in ("train", "good"):
                _save(_to_u8(img), folder / f"{i:03d}.png", "PNG")
                continue
            if split == "hole":
                out = _hole(rng, img, size, None, np.array([205.0, 200.0, 185.0]))
            elif split == "scratch":
                out = _scratch(rng, img, size, None, bright=True)
            else:
                out = _stain(rng, img, size, None, np.array([140.0, 66.0, 24.0]))
            image = _to_u8(out)
            mask = np.any(image != _to_u8(img), axis=-1)
            _save(image, folder / f"{i:03d}.png", "PNG")
            _save((mask * 255).astype(np.uint8), cat / "ground_truth" / split / f"{i:03d}_mask.png",
                  "PNG")
    return root
