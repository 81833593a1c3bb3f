"""Charts and the HTML page: valid PNGs of the documented size whose marks sit where the data put
them, computed from the metric curves; the page embeds them by relative path.

Positions are checked against the chart's own data -> pixel transform (``_Chart.px``, divided by
the supersampling factor), within a tolerance of a few pixels for line width and downsampling.
"""

from __future__ import annotations

import html.parser

import numpy as np
import pytest
from PIL import Image

from protoad_jax import metrics, report

PX_TOL = 3  # pixels: line width (2) plus rounding of the 2x downsampling


def _png_roundtrip(img: Image.Image, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / name
    report.save_png(img, path)
    with Image.open(path) as f:
        got = (f.format, f.size, f.mode)
        assert got == ("PNG", report.PLOT_SIZE, "RGB"), got
        f.verify()
    with Image.open(path) as f:
        return np.asarray(f)


def _where(rgb: np.ndarray, color, tol: int = 60) -> np.ndarray:
    """Mask of pixels within ``tol`` (max abs channel difference) of ``color``."""
    return np.max(np.abs(rgb.astype(int) - np.array(color)), axis=-1) <= tol


def _to_output_px(chart: report._Chart, x, y):
    px, py = chart.px(x, y)
    return px / report._SS, py / report._SS


def _pixel(chart: report._Chart, x: float, y: float) -> tuple[int, int]:
    """(column, row) of a data point in the output PNG."""
    px, py = _to_output_px(chart, x, y)
    return int(np.rint(px)), int(np.rint(py))


def test_nice_ticks():
    for lo, hi, integer in [(0.0, 1.0, False), (0.0, 0.3, False), (0.1234, 0.5678, False),
                            (-3.2, 17.9, False), (0.0, 3.4, True), (0.0, 145.0, True),
                            (2e-4, 9e-4, False),
                            (0.0, 160.0, False), (0.0, 16.0, False)]:
        ticks, decimals = report.nice_ticks(lo, hi, integer=integer)
        step = np.diff(ticks)
        mantissa = step[0] / 10 ** np.floor(np.log10(step[0]))
        labels = [f"{t:.{decimals}f}" for t in ticks]
        print(lo, hi, integer, labels)
        assert 3 <= len(ticks) <= 13, ticks
        assert ticks[0] >= lo - 1e-12 and ticks[-1] <= hi + 1e-12, (lo, hi, ticks)
        assert ticks[0] - lo < step[0] + 1e-12 and hi - ticks[-1] < step[0] + 1e-12
        assert np.allclose(step, step[0]) and any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
        assert len(set(labels)) == len(labels), labels  # enough decimals to tell ticks apart
        if step[0] == round(step[0]):
            assert decimals == 0, labels  # whole steps print as whole numbers
        if integer:
            assert np.all(ticks == np.round(ticks)) and step[0] >= 1
    with pytest.raises(ValueError, match="lo < hi"):
        report.nice_ticks(1.0, 1.0)


def test_roc_plot_draws_the_metric_curve(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 3 == 0
    scores = rng.normal(size=40) + 2.0 * labels
    curve = metrics.roc_curve(labels, scores)
    img = report.roc_plot(curve, metrics.image_auroc(labels, scores), "t")
    rgb = _png_roundtrip(img, tmp_path, "roc.png")
    chart = report._Chart("t", "x", "y", report._padded(0.0, 1.0), report._padded(0.0, 1.0))
    blue = _where(rgb, report.BLUE)
    # Every vertex of the ROC staircase, and every corner it turns, has the curve colour nearby.
    # Points are checked where the legend (lower right) does not cover them.
    xs, ys = _to_output_px(chart, curve.fpr, curve.y)
    checked = 0
    for x, y, fx, ty in zip(xs, ys, curve.fpr, curve.y):
        if fx > 0.45 and ty < 0.3:
            continue
        c, r = int(np.rint(x)), int(np.rint(y))
        window = blue[max(r - PX_TOL, 0):r + PX_TOL + 1, max(c - PX_TOL, 0):c + PX_TOL + 1]
        assert window.any(), f"no curve pixel near ({fx}, {ty}) -> pixel ({c}, {r})"
        checked += 1
    # And not where the curve is not: the area under a high-AUROC curve's middle is white.
    bx, by = _pixel(chart, 0.5, 0.05)
    assert not blue[by - 5:by + 5, bx - 5:bx + 5].any()
    print(f"{checked} ROC vertices found within {PX_TOL} px")
    assert checked >= len(xs) // 2


def test_pro_plot_stops_at_the_limit(tmp_path):
    curve = metrics.Curve(np.array([0.0, 0.0, 0.1, 0.6, 1.0]), np.array([0.0, 0.5, 0.6, 0.8, 1.0]),
                          np.array([np.inf, 4, 3, 2, 1.0]))
    rgb = _png_roundtrip(report.pro_plot(curve, 0.5, "t"), tmp_path, "pro.png")
    chart = report._Chart("t", "x", "y", report._padded(0.0, metrics.AUPRO_FPR_LIMIT),
                          report._padded(0.0, 1.0))
    green = _where(rgb, report.GREEN)
    # At FPR 0.3 the curve is interpolated between (0.1, 0.6) and (0.6, 0.8): PRO 0.68.
    for fpr, pro in [(0.05, 0.55), (0.2, 0.64), (0.29, 0.676)]:
        c, r = _pixel(chart, fpr, pro)
        assert green[r - PX_TOL:r + PX_TOL + 1, c - PX_TOL:c + PX_TOL + 1].any(), (fpr, pro, c, r)
    # Nothing of the curve to the right of the plot area (FPR > 0.3 is not drawn).
    right, _ = _pixel(chart, 0.3, 0)
    assert not green[:, right + PX_TOL:].any()


def test_score_histogram_bars_and_thresholds(tmp_path):
    rng = np.random.default_rng(1)
    normal, anomalous = rng.normal(0.3, 0.03, 30), rng.normal(0.5, 0.05, 20)
    t_f1, t_cal = 0.41, 0.36
    img = report.score_histogram({"normal (n=30)": normal, "anomalous (n=20)": anomalous},
                                 {"F1-max": t_f1, "calibrated": t_cal}, "scores")
    rgb = _png_roundtrip(img, tmp_path, "hist.png")
    everything = np.concatenate([normal, anomalous])
    pad = 0.06 * (everything.max() - everything.min())
    # Only the x transform and the base line are used: the y range does not move them.
    chart = report._Chart("t", "x", "y", (everything.min() - pad, everything.max() + pad), (0.0, 1.0))
    for t, color in [(t_f1, report.DARK), (t_cal, report.PURPLE)]:
        c, _ = _pixel(chart, t, 0)
        column = _where(rgb[:, c - 1:c + 2], color, tol=40).any(axis=1)
        # A dashed line over the plot height: many rows of the line's colour in this column.
        print(f"threshold {t}: {column.sum()} rows of its colour at x={c}")
        assert column.sum() > 60, column.sum()
    # Bars, just above the base line: blue only where normal scores are, orange only where
    # anomalous ones are (the two groups do not overlap here).
    base = _pixel(chart, 0, 0)[1] - 3
    strip = rgb[base - 2:base + 1]
    blue_cols = np.flatnonzero(_where(strip, report.BLUE, tol=30).any(axis=0))
    orange_cols = np.flatnonzero(_where(strip, report.ORANGE, tol=30).any(axis=0))
    (n_lo, _), (n_hi, _) = _pixel(chart, normal.min(), 0), _pixel(chart, normal.max(), 0)
    (a_lo, _), (a_hi, _) = _pixel(chart, anomalous.min(), 0), _pixel(chart, anomalous.max(), 0)
    bin_px = (n_hi - n_lo) / 4  # generous: a bar may extend up to a bin beyond its scores
    print(f"blue columns {blue_cols.min()}-{blue_cols.max()} (scores at {n_lo}-{n_hi}), "
          f"orange {orange_cols.min()}-{orange_cols.max()} (scores at {a_lo}-{a_hi})")
    assert n_lo - bin_px <= blue_cols.min() and blue_cols.max() <= n_hi + bin_px
    assert a_lo - bin_px <= orange_cols.min() and orange_cols.max() <= a_hi + bin_px
    assert blue_cols.max() < orange_cols.min()
    with pytest.raises(ValueError, match="no scores"):
        report.score_histogram({"empty": np.zeros(0)}, {}, "t")


def test_score_histogram_single_value_and_no_threshold(tmp_path):
    # One score (a one-image prediction): the x range must still be valid.
    rgb = _png_roundtrip(report.score_histogram({"inputs (n=1)": np.array([0.42])}, {}, "one"),
                         tmp_path, "one.png")
    assert _where(rgb, report.BLUE).any()
    path = tmp_path / "pred" / "score_histogram.png"
    report.write_score_histogram(path, np.array([0.1, 0.2, 0.25]), None)
    with Image.open(path) as f:
        assert f.size == report.PLOT_SIZE


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))


def test_html_embeds_charts_by_relative_path(tmp_path):
    for name in ("cat/plots/roc.png", "cat/overlays/a.png"):
        report.save_png(Image.new("RGB", (8, 8), "white"), tmp_path / name)
    report.write_html(tmp_path / "report.html", "t", ["note"], ["category", "v"],
                      [{"category": "cat", "v": 0.5}],
                      [report.Gallery("cat: charts", ["cat/plots/roc.png"], natural_size=True),
                       report.Gallery("cat: overlays", ["cat/overlays/a.png"]),
                       report.Gallery("cat: nothing", [])])
    text = (tmp_path / "report.html").read_text()
    parser = _Images()
    parser.feed(text)
    by_src = {i["src"]: i for i in parser.imgs}
    assert set(by_src) == {"cat/plots/roc.png", "cat/overlays/a.png"}
    chart = by_src["cat/plots/roc.png"]
    assert chart["class"] == "chart" and "loading" not in chart  # charts load at once
    assert by_src["cat/overlays/a.png"]["class"] == "overlay"
    assert all((tmp_path / src).is_file() for src in by_src)
    assert "cat: nothing" not in text  # empty galleries are left out
