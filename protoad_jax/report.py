"""Pictures and pages people look at: heatmap overlays, ROC/PRO curves, score histograms and an
offline HTML report (NumPy + PIL only).

Charts are drawn with Pillow at twice their size and downsampled, which anti-aliases lines and
text; they use only ASCII text (Pillow's bundled font has no other glyphs).
"""

from __future__ import annotations

import html
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from protoad_jax import metrics
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


def pairs_panel(rows: Sequence[tuple[Image.Image, Image.Image, str]], title: str) -> Image.Image:
    """One line per ``(left, right, caption)``: two equal-size images side by side, the caption
    beside them, under ``title`` ("closest normal look": a region and its exemplar)."""
    w, h = rows[0][0].size
    line, text_w = h + 6, 420
    canvas = Image.new("RGB", (2 * w + 12 + text_w, 18 + line * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 3), title, fill="black")
    for i, (left, right, caption) in enumerate(rows):
        y = 18 + i * line
        canvas.paste(left, (0, y))
        canvas.paste(right, (w + 4, y))
        draw.text((2 * w + 12, y + h // 2 - 6), caption, fill="black")
    return canvas


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Writes a PNG atomically (temp file + rename)."""
    atomic_write(path, lambda f: img.save(f, format="PNG"))


# --- charts ------------------------------------------------------------------------------------

PLOT_SIZE = (420, 315)  # (width, height) of every chart PNG: three fit side by side in 1400 px
# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, PURPLE = (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167)
GREY, DARK = (150, 150, 150), (40, 40, 40)
_SS = 2 if features.check("freetype2") else 1  # supersampling (a bitmap font cannot be scaled)
_MARGIN = (64, 34, 14, 46)  # left, top, right, bottom, in output pixels


def _padded(lo: float, hi: float, frac: float = 0.02) -> tuple[float, float]:
    """Axis limits a little beyond the data, so lines at the limits do not hide under the frame."""
    return lo - frac * (hi - lo), hi + frac * (hi - lo)


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px * _SS) if _SS > 1 else ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 6,
               integer: bool = False) -> tuple[np.ndarray, int]:
    """Round tick values in ``[lo, hi]`` (steps 1, 2, 2.5, 5 x 10^k; whole numbers when
    ``integer``) and the number of decimals to print them with."""
    if not hi > lo:
        raise ValueError(f"nice_ticks: need lo < hi, got [{lo}, {hi}]")
    raw = (hi - lo) / target
    if integer:
        raw = max(raw, 1.0)
    mag = 10.0 ** math.floor(math.log10(raw))
    steps = [m * mag for m in ((1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10))]
    # The round step whose tick count is closest to the target (ties: the larger step).
    counts = [math.floor(hi / st + 1e-9) - math.ceil(lo / st - 1e-9) + 1 for st in steps]
    step = min(zip(steps, counts), key=lambda sc: (abs(sc[1] - target), -sc[0]))[0]
    ticks = np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    decimals += 1 if round(step / mag, 6) == 2.5 and mag <= 1 else 0  # 0.25, not 0.2; 25, not 25.0
    return ticks, decimals


class _Chart:
    """A chart on a supersampled canvas: data -> pixel transform, grid, ticks, labels, legend."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: tuple[float, float],
                 ylim: tuple[float, float], size: tuple[int, int] = PLOT_SIZE,
                 y_integer: bool = False):
        self.size, self.y_integer = size, y_integer
        w, h = size[0] * _SS, size[1] * _SS
        left, top, right, bottom = (m * _SS for m in _MARGIN)
        self.box = (left, top, w - right, h - bottom)  # plot area, canvas pixels
        self.xlim, self.ylim = xlim, ylim
        self.img = Image.new("RGB", (w, h), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.legend_entries: list[tuple[str, tuple, str]] = []
        self._frame(title, xlabel, ylabel)

    def px(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Data -> canvas pixel coordinates (y up)."""
        x0, y0, x1, y1 = self.box
        (a, b), (c, d) = self.xlim, self.ylim
        return (x0 + (np.asarray(x, np.float64) - a) / (b - a) * (x1 - x0),
                y1 - (np.asarray(y, np.float64) - c) / (d - c) * (y1 - y0))

    def _frame(self, title: str, xlabel: str, ylabel: str) -> None:
        d, (x0, y0, x1, y1) = self.draw, self.box
        tick_font, label_font = _font(13), _font(14)
        xt, xd = nice_ticks(*self.xlim)
        yt, yd = nice_ticks(*self.ylim, integer=self.y_integer)
        for t in xt:
            px = float(self.px(t, self.ylim[0])[0])
            d.line([(px, y0), (px, y1)], fill=(232, 232, 232), width=_SS)
            d.line([(px, y1), (px, y1 + 4 * _SS)], fill=DARK, width=_SS)
            d.text((px, y1 + 6 * _SS), f"{t:.{xd}f}", fill=DARK, font=tick_font, anchor="mt")
        for t in yt:
            py = float(self.px(self.xlim[0], t)[1])
            d.line([(x0, py), (x1, py)], fill=(232, 232, 232), width=_SS)
            d.line([(x0 - 4 * _SS, py), (x0, py)], fill=DARK, width=_SS)
            d.text((x0 - 6 * _SS, py), f"{t:.{yd}f}", fill=DARK, font=tick_font, anchor="rm")
        d.text(((x0 + x1) / 2, self.img.height - 4 * _SS), xlabel, fill=DARK, font=label_font,
               anchor="md")
        d.text((self.img.width / 2, 8 * _SS), title, fill="black", font=_font(16), anchor="mt")
        # The y label: drawn horizontally on its own image, rotated, pasted left of the ticks.
        tw = int(d.textlength(ylabel, font=label_font)) + 4 * _SS
        label = Image.new("L", (tw, 20 * _SS), 0)
        ImageDraw.Draw(label).text((2 * _SS, 10 * _SS), ylabel, fill=255, font=label_font,
                                   anchor="lm")
        label = label.rotate(90, expand=True)
        self.img.paste(DARK, (4 * _SS, int((y0 + y1 - label.height) / 2)), label)

    def line(self, x, y, color, label: str | None = None, width: int = 2,
             dash: bool = False) -> None:
        """A polyline through the data points, clipped to the axes, decimated to distinct pixels."""
        px, py = self.px(x, y)
        x0, y0, x1, y1 = self.box
        pts = np.stack([np.clip(px, x0, x1), np.clip(py, y0, y1)], 1).round()
        keep = np.ones(len(pts), bool)
        keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
        pts = [tuple(p) for p in pts[keep]]
        if dash:
            for a, b in itertools.pairwise(pts):
                self._dashed(a, b, color, width * _SS)
        elif len(pts) > 1:
            self.draw.line(pts, fill=color, width=width * _SS, joint="curve")
        if label:
            self.legend_entries.append((label, color, "dash" if dash else "line"))

    def _dashed(self, a, b, color, width) -> None:
        length = math.hypot(b[0] - a[0], b[1] - a[1])
        on, off = 7 * _SS, 4 * _SS
        for start in np.arange(0.0, length, on + off):
            end = min(start + on, length)
            f0, f1 = start / length, end / length
            self.draw.line([(a[0] + (b[0] - a[0]) * f0, a[1] + (b[1] - a[1]) * f0),
                            (a[0] + (b[0] - a[0]) * f1, a[1] + (b[1] - a[1]) * f1)],
                           fill=color, width=width)

    def vline(self, x: float, color, label: str, dash: bool = True) -> None:
        self.line([x, x], list(self.ylim), color, label, width=2, dash=dash)

    def bars(self, edges: np.ndarray, counts: np.ndarray, color, label: str, slot: int = 0,
             slots: int = 1) -> None:
        """Histogram bars; ``slots`` groups share each bin side by side, this one in ``slot``."""
        ex, _ = self.px(edges, 0)
        _, cy = self.px(0, counts)
        for i, c in enumerate(counts):
            if c > 0:
                width = (ex[i + 1] - ex[i]) / slots
                x0 = ex[i] + slot * width
                self.draw.rectangle([x0 + 1, cy[i], x0 + width - 1, self.box[3]], fill=color)
        self.legend_entries.append((label, color, "box"))

    def legend(self, corner: str) -> None:
        """The legend in a corner of the plot area: ``"ul"``, ``"ur"``, ``"ll"`` or ``"lr"``."""
        if not self.legend_entries:
            return
        font, pad, row, swatch = _font(13), 6 * _SS, 18 * _SS, 22 * _SS
        text_width = max(self.draw.textlength(t, font=font) for t, _, _ in self.legend_entries)
        width = pad * 3 + swatch + int(text_width)
        height = pad * 2 + row * len(self.legend_entries)
        x0, y0, x1, y1 = self.box
        lx = x0 + pad if corner[1] == "l" else x1 - pad - width
        ly = y0 + pad if corner[0] == "u" else y1 - pad - height
        self.draw.rectangle([lx, ly, lx + width, ly + height], fill="white", outline=GREY,
                            width=_SS)
        for i, (text, color, kind) in enumerate(self.legend_entries):
            cy = ly + pad + row * i + row / 2
            sx = lx + pad
            if kind == "box":
                self.draw.rectangle([sx, cy - 5 * _SS, sx + swatch, cy + 5 * _SS], fill=color)
            elif kind == "dash":
                self._dashed((sx, cy), (sx + swatch, cy), color, 2 * _SS)
            else:
                self.draw.line([(sx, cy), (sx + swatch, cy)], fill=color, width=2 * _SS)
            self.draw.text((sx + swatch + pad, cy), text, fill=DARK, font=font, anchor="lm")

    def image(self) -> Image.Image:
        """Frames the plot area and downsamples to ``size``."""
        self.draw.rectangle(self.box, outline=DARK, width=_SS)
        return self.img.resize(self.size, Image.Resampling.BOX) if _SS > 1 else self.img


def roc_plot(curve: metrics.Curve, auroc: float, title: str) -> Image.Image:
    """The image ROC curve (from ``metrics.roc_curve``) with its AUROC in the legend."""
    chart = _Chart(title, "false positive rate (normal images flagged)",
                   "true positive rate", _padded(0.0, 1.0), _padded(0.0, 1.0))
    chart.line([0, 1], [0, 1], GREY, "chance (AUROC 0.5)", dash=True)
    chart.line(curve.fpr, curve.y, BLUE, f"image AUROC {auroc:.4f}")
    chart.legend("lr")
    return chart.image()


def pro_plot(curve: metrics.Curve, aupro: float, title: str,
             fpr_limit: float = metrics.AUPRO_FPR_LIMIT) -> Image.Image:
    """The PRO curve (from ``metrics.pro_curve``) up to ``fpr_limit``, the AU-PRO in the legend."""
    part = metrics.curve_up_to(curve, fpr_limit)
    chart = _Chart(title, "false positive rate (normal pixels)", "per-region overlap",
                   _padded(0.0, fpr_limit), _padded(0.0, 1.0))
    chart.line(part.fpr, part.y, GREEN, f"AU-PRO (FPR <= {fpr_limit:g}) {aupro:.4f}")
    chart.legend("lr")
    return chart.image()


def score_histogram(groups: Mapping[str, np.ndarray], thresholds: Mapping[str, float | None],
                    title: str, xlabel: str = "image anomaly score") -> Image.Image:
    """Histograms of image scores on shared bins (side by side in each bin), with vertical
    threshold lines.

    Args:
      groups: legend label -> ``[n]`` scores, e.g. ``{"normal (n=20)": ..., "anomalous (n=30)":
        ...}``; up to two groups (blue, orange); empty groups are skipped.
      thresholds: legend label -> threshold (None: not drawn); up to two (black, purple).
      title: the chart title.
    """
    groups = {k: np.asarray(v, np.float64).ravel() for k, v in groups.items() if np.size(v)}
    if not groups:
        raise ValueError("score_histogram: no scores to plot")
    if len(groups) > 2 or len(thresholds) > 2:
        raise ValueError(f"score_histogram: at most 2 groups and 2 thresholds, got "
                         f"{len(groups)} and {len(thresholds)}")
    lines = {k: float(v) for k, v in thresholds.items() if v is not None}
    everything = np.concatenate([*groups.values(), list(lines.values())])
    lo, hi = float(everything.min()), float(everything.max())
    pad = 0.06 * (hi - lo) if hi > lo else max(0.05 * abs(lo), 0.05)
    n = sum(len(v) for v in groups.values())
    num_bins = int(np.clip(round(2 * math.sqrt(n)), 8, 30))
    edges = np.linspace(lo - pad / 2, hi + pad / 2, num_bins + 1)
    counts = {k: np.histogram(v, edges)[0] for k, v in groups.items()}
    top = max(int(c.max()) for c in counts.values())
    # Headroom: the tallest bar ends below the legend (rows of 18 px, padding, offset).
    plot_h = PLOT_SIZE[1] - _MARGIN[1] - _MARGIN[3]
    legend_h = 30 + 18 * (len(counts) + len(lines))
    y_max = max(top * plot_h / (plot_h - legend_h), top + 0.5)
    chart = _Chart(title, xlabel, "images", (lo - pad, hi + pad), (0.0, y_max), y_integer=True)
    for slot, ((label, c), color) in enumerate(zip(counts.items(), (BLUE, ORANGE))):
        chart.bars(edges, c, color, label, slot, len(counts))
    for (label, t), color in zip(lines.items(), (DARK, PURPLE)):
        chart.vline(t, color, label)
    # Put the legend over the emptier half of the plot.
    total = sum(counts.values())
    mid = len(total) // 2
    chart.legend("ul" if total[:mid].max(initial=0) <= total[mid:].max(initial=0) else "ur")
    return chart.image()


def write_score_histogram(path: str | os.PathLike, scores: np.ndarray, threshold: float | None,
                          title: str = "image scores of the inputs") -> None:
    """``predict``'s summary chart: a histogram of its inputs' scores with the threshold, if set."""
    lines = {} if threshold is None else {f"threshold {threshold:.4f} (above: anomalous)":
                                          threshold}
    save_png(score_histogram({f"inputs (n={np.size(scores)})": scores}, lines, title), path)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return html.escape(str(v))


class Gallery(NamedTuple):
    """A headed row of images in the HTML report.

    heading: the section heading.
    images: paths relative to the page's folder.
    natural_size: show the images at 100% (charts); else scaled to half the page width (overlays).
    """

    heading: str
    images: Sequence[str]
    natural_size: bool = False


def write_html(path: str | os.PathLike, title: str, notes: Sequence[str], columns: Sequence[str],
               rows: Sequence[dict], galleries: Sequence[Gallery]) -> None:
    """An offline HTML page: notes, a table (``rows`` keyed by ``columns``), and image galleries.

    Galleries without images are left out.
    """
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           ("<style>body{font-family:sans-serif;margin:1.5em}p{margin:.3em 0}"
            ".scroll{overflow-x:auto;margin:1em 0}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right;font-size:13px}"
            "th{background:#eee}td:first-child{text-align:left}.warn{color:#b00;font-weight:bold}"
            "img{margin:4px;border:1px solid #ccc}img.overlay{width:48%;max-width:700px}"
            ".charts{display:flex;flex-wrap:wrap;gap:8px}.charts img{margin:0;max-width:100%}"
            "</style></head><body>"), f"<h1>{html.escape(title)}</h1>"]
    for note in notes:
        cls = " class='warn'" if note.startswith("WARNING") else ""
        out.append(f"<p{cls}>{html.escape(note)}</p>")
    out.append("<div class='scroll'><table><tr>"
               + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>")
    out.append("</table></div>")
    for gallery in galleries:
        if not gallery.images:
            continue
        # Charts are few and small: loaded at once; overlays lazily.
        attrs = "class='chart'" if gallery.natural_size else "class='overlay' loading='lazy'"
        div = "<div class='charts'>" if gallery.natural_size else "<div>"
        out.append(f"<h2>{html.escape(gallery.heading)}</h2>{div}")
        out += [f"<a href='{html.escape(p)}'><img {attrs} src='{html.escape(p)}' "
                f"alt='{html.escape(Path(p).stem)}'></a>" for p in gallery.images]
        out.append("</div>")
    out.append("</body></html>")
    atomic_write(Path(path), lambda f: f.write("\n".join(out)), mode="w")
