"""Pictures and pages people look at: heatmap overlays and an offline HTML report (NumPy + PIL only)."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from protoad_jax.config import IMAGENET_MEAN, IMAGENET_STD
from protoad_jax.fileio import atomic_write

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp (control points, linear in between).
_RAMP = np.array([[0, 0, 96], [0, 64, 255], [0, 224, 255], [128, 255, 96], [255, 224, 0],
                  [255, 64, 0], [160, 0, 0]], np.float64)


def to_uint8_image(image: np.ndarray) -> np.ndarray:
    """Undoes ImageNet normalisation: ``[h, w, 3]`` float32 -> ``[h, w, 3]`` uint8."""
    rgb = np.asarray(image, np.float64) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def colorize(m: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Maps ``[h, w]`` scores to ``[h, w, 3]`` uint8 colours; ``vmin``/``vmax`` fix the scale across images."""
    t = np.clip((np.asarray(m, np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    pos = t * (len(_RAMP) - 1)
    lo = np.minimum(pos.astype(int), len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def overlay(image_u8: np.ndarray, m: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Heatmap blended over the image: ``[h, w, 3]`` uint8."""
    blend = (1 - alpha) * image_u8.astype(np.float64) + alpha * colorize(m, vmin, vmax)
    return np.round(blend).astype(np.uint8)


def outline(image_u8: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0),
            tint: float = 0.0) -> np.ndarray:
    """The image with ``mask`` outlined in ``color`` (its boundary pixels: in the mask, with a
    4-neighbour outside it or past the image's edge) and its inside blended ``tint`` of the way
    to ``color``."""
    out = image_u8.astype(np.float64).copy()
    mask = np.asarray(mask, bool)
    out[mask] = (1 - tint) * out[mask] + tint * np.asarray(color, np.float64)
    m = np.pad(mask, 1)
    inner = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    out[mask & ~inner] = color
    return np.round(out).astype(np.uint8)


GROUND_TRUTH = {"color": (255, 0, 0), "tint": 0.45}  # red, tinted
REGIONS = {"color": (255, 255, 255), "tint": 0.0}  # white outline over the heatmap


def panel(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, title: str,
          vmin: float, vmax: float, regions: np.ndarray | None = None) -> Image.Image:
    """One row: image | ground truth (only when ``mask`` is given) | heatmap over the image, captioned.

    Args:
      image: ``[h, w, 3]`` ImageNet-normalised float32 (as scored).
      anomaly_map: ``[h, w]``.
      mask: ``[h, w]`` bool or None: ground truth, tinted and outlined in red.
      regions: ``[h, w]`` bool or None: predicted defect regions, outlined in white on the heatmap.
    """
    img = to_uint8_image(image)
    h = img.shape[0]
    gap = np.full((h, 4, 3), 255, np.uint8)
    gt = [outline(img, mask, **GROUND_TRUTH), gap] if mask is not None else []
    heat = overlay(img, anomaly_map, vmin, vmax)
    if regions is not None:
        heat = outline(heat, regions, **REGIONS)
    row = np.concatenate([img, gap, *gt, heat], axis=1)
    canvas = Image.new("RGB", (row.shape[1], h + 18), "white")
    canvas.paste(Image.fromarray(row), (0, 18))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 3), title, fill="black")
    return canvas


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Writes a PNG atomically (temp file + rename)."""
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return html.escape(str(v))


def write_html(path: str | os.PathLike, title: str, notes: Sequence[str], columns: Sequence[str],
               rows: Sequence[dict], galleries: dict[str, Sequence[str]]) -> None:
    """An offline HTML page: notes, a table (``rows`` keyed by ``columns``), and image galleries.

    ``galleries`` maps a heading to image paths relative to the page's folder.
    """
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           ("<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
           "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right;font-size:13px}th{background:#eee}"
           "td:first-child{text-align:left}.warn{color:#b00;font-weight:bold}img{margin:4px;"
           "border:1px solid #ccc;width:48%;max-width:700px}</style></head><body>"), f"<h1>{html.escape(title)}</h1>"]
    for note in notes:
        cls = " class='warn'" if note.startswith("WARNING") else ""
        out.append(f"<p{cls}>{html.escape(note)}</p>")
    out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>")
    out.append("</table>")
    for heading, images in galleries.items():
        out.append(f"<h2>{html.escape(heading)}</h2><div>")
        out += [f"<a href='{html.escape(p)}'><img src='{html.escape(p)}' loading='lazy'></a>" for p in images]
        out.append("</div>")
    out.append("</body></html>")
    atomic_write(Path(path), lambda f: f.write("\n".join(out)), mode="w")
