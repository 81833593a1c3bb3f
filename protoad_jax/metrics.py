"""Evaluation metrics (docs/METHOD.md): image/pixel AUROC, AU-PRO, F1-max, and the ROC and PRO
curves they integrate (the report plots exactly these curves).

Metrics run on the host in plain NumPy, exactly (no binning): every threshold is a distinct
score value, found by one sort of all scores. A score ``>= threshold`` is predicted anomalous.

Undefined metrics return ``None`` instead of raising, so one degenerate category does not
abort a 15-category evaluation; the caller decides whether to warn:
- AUROC is ``None`` when only one class is present;
- F1-max is ``None`` when there are no positives (recall is 0/0);
- AU-PRO is ``None`` when there is no ground-truth region or no normal pixel.

Inputs may be NumPy or JAX arrays. Labels and masks are bool, or numbers that are exactly 0
or 1. NaN scores raise. Memory is O(number of pixels): for MVTec sizes (150 x 224 x 224 = 7.5M
pixels) a few hundred MB at most, no Python-level per-pixel or per-threshold loops.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

AUPRO_FPR_LIMIT = 0.3  # MVTec AD's official integration limit


class F1Max(NamedTuple):
    """Best F1 over all thresholds, and the highest threshold that attains it (``score >= t``)."""

    f1: float
    threshold: float


class Curve(NamedTuple):
    """An ROC or PRO curve through every distinct score, from the strictest threshold.

    fpr: [t + 1] false positive rate, non-decreasing, from 0 (threshold +inf: nothing flagged)
      to 1 (the lowest score: everything flagged).
    y: [t + 1] true positive rate (ROC) or per-region overlap (PRO) at each point, non-decreasing.
    thresholds: [t + 1] the score threshold of each point (``score >= threshold`` is flagged),
      descending, ``thresholds[0] = +inf``; NaN for a point interpolated by ``curve_up_to``.
    """

    fpr: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray


# --- validation --------------------------------------------------------------------------------

def _binary(values: Any, what: str) -> np.ndarray:
    y = np.asarray(values)
    if y.dtype == bool:
        return y
    if y.dtype.kind not in "iuf":
        raise TypeError(f"{what} must be bool or 0/1 numbers, got dtype {y.dtype}")
    if not np.all((y == 0) | (y == 1)):
        found = np.unique(y[(y != 0) & (y != 1)])[:5]
        raise ValueError(f"{what} must contain only 0/1 (or bool), found values like {found.tolist()}")
    return y != 0


def _scores(values: Any, what: str) -> np.ndarray:
    s = np.asarray(values)
    if s.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be real numbers, got dtype {s.dtype}")
    if s.dtype.kind == "f":
        nan = int(np.count_nonzero(np.isnan(s)))
        if nan:
            raise ValueError(f"{what} contains {nan} NaN value(s) of {s.size}; scores must not be NaN")
    return s


def _pair(labels: Any, scores: Any, names: tuple[str, str], ndim: int, fn: str):
    y = _binary(labels, f"{fn}: {names[0]}")
    s = _scores(scores, f"{fn}: {names[1]}")
    if y.shape != s.shape or y.ndim != ndim:
        layout = "[n]" if ndim == 1 else "[n, h, w]"
        raise ValueError(f"{fn}: {names[0]} and {names[1]} must have the same shape {layout}; "
                         f"got {names[0]} {y.shape} and {names[1]} {s.shape}")
    if y.size == 0:
        raise ValueError(f"{fn}: {names[0]} and {names[1]} are empty (shape {y.shape})")
    return y, s


# --- the shared exact curve --------------------------------------------------------------------

class _Sorted(NamedTuple):
    """One descending sort of all scores, shared by every pixel metric.

    order: [m] indices, scores descending. last: [t] positions (in sorted order) of the last of
    each run of tied scores -- all tied pixels switch together, so only these are thresholds.
    thresholds: [t] the distinct scores, descending.
    """

    order: np.ndarray
    last: np.ndarray
    thresholds: np.ndarray


def _sort(s: np.ndarray) -> _Sorted:
    s = s.ravel()
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    last = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1)
    return _Sorted(order, last, s_sorted[last])


def _counts(y: np.ndarray, srt: _Sorted):
    """fps, tps: [t] int64, negatives and positives scoring >= each threshold (sklearn's
    ``_binary_clf_curve``)."""
    tps = np.cumsum(y.ravel()[srt.order], dtype=np.int64)[srt.last]
    return (srt.last + 1) - tps, tps


def _both_classes(y: np.ndarray) -> tuple[int, int] | None:
    """``(positives, negatives)``, or None when either class is absent (ROC undefined)."""
    num_pos = int(np.count_nonzero(y))
    num_neg = y.size - num_pos
    return None if num_pos == 0 or num_neg == 0 else (num_pos, num_neg)


def _roc_curve(y: np.ndarray, srt: _Sorted) -> Curve | None:
    classes = _both_classes(y)
    if classes is None:
        return None
    num_pos, num_neg = classes
    fps, tps = _counts(y, srt)
    return Curve(np.concatenate([[0.0], fps / num_neg]), np.concatenate([[0.0], tps / num_pos]),
                 np.concatenate([[np.inf], srt.thresholds.astype(np.float64)]))


def _auroc(y: np.ndarray, srt: _Sorted) -> float | None:
    classes = _both_classes(y)
    if classes is None:
        return None
    num_pos, num_neg = classes
    fps, tps = _counts(y, srt)
    # Trapezoid rule on the ROC staircase in integers, one rounding at the end: each step adds
    # dfp * (tp_prev + tp) / 2 in units of 1 / (P * N); ties give the diagonal (the 1/2 credit).
    dfp = np.diff(fps, prepend=0)
    tp_sum = tps + np.concatenate([[0], tps[:-1]])
    twice_area = int(np.dot(dfp, tp_sum))  # <= 2 * P * N, fits int64 for any realistic size
    return twice_area / (2 * num_pos * num_neg)


def _f1_max(y: np.ndarray, srt: _Sorted) -> F1Max | None:
    num_pos = int(np.count_nonzero(y))
    if num_pos == 0:
        return None
    fps, tps = _counts(y, srt)
    # F1 = 2 P R / (P + R) = 2 tp / (tp + fp + num_pos): never 0/0 while num_pos > 0.
    f1 = 2.0 * tps / (tps + fps + num_pos)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return F1Max(float(f1[best]), srt.thresholds[best].item())


# --- public metrics ----------------------------------------------------------------------------

def image_auroc(labels: Any, scores: Any) -> float | None:
    """Image-level ROC AUC; equals sklearn ``roc_auc_score(labels, scores)``.

    Args:
      labels: [n] bool or 0/1, True = anomalous.
      scores: [n] anomaly scores (higher = more anomalous).
    Returns:
      The AUC, or None when only one class is present (the AUC is undefined).
    Raises:
      ValueError: shapes differ, labels are not binary, or scores contain NaN.
    """
    y, s = _pair(labels, scores, ("labels", "scores"), 1, "image_auroc")
    return _auroc(y, _sort(s))


def roc_curve(labels: Any, scores: Any) -> Curve | None:
    """Image-level ROC curve, every distinct score a point; ``image_auroc`` is its trapezoid area.

    Equals sklearn ``roc_curve(labels, scores, drop_intermediate=False)``.

    Args:
      labels: [n] bool or 0/1, True = anomalous.
      scores: [n] anomaly scores.
    Returns:
      ``Curve(fpr, tpr, thresholds)`` from (0, 0) to (1, 1), or None when only one class is present.
    Raises:
      ValueError: shapes differ, labels are not binary, or scores contain NaN.
    """
    y, s = _pair(labels, scores, ("labels", "scores"), 1, "roc_curve")
    return _roc_curve(y, _sort(s))


def pixel_auroc(masks: Any, maps: Any) -> float | None:
    """Pixel-level ROC AUC over all pixels of all images pooled (normal images give negatives).

    Args:
      masks: [n, h, w] bool or 0/1 ground truth, True = anomalous pixel.
      maps: [n, h, w] anomaly maps.
    Returns:
      The AUC, or None when the pooled pixels hold only one class.
    Raises:
      ValueError: shapes differ or are not [n, h, w], masks not binary, or maps contain NaN.
    """
    y, s = _pair(masks, maps, ("masks", "maps"), 3, "pixel_auroc")
    return _auroc(y, _sort(s))


def f1_max(labels: Any, scores: Any) -> F1Max | None:
    """Image-level F1-max: the best F1 over all thresholds of the precision-recall curve.

    Thresholds are the distinct scores (sklearn ``precision_recall_curve`` semantics); an image
    is predicted anomalous when ``score >= threshold``.

    Args:
      labels: [n] bool or 0/1, True = anomalous.
      scores: [n] anomaly scores.
    Returns:
      ``F1Max(f1, threshold)`` with the highest threshold attaining the maximum, or None when
      there are no positives (recall is undefined).
    Raises:
      ValueError: shapes differ, labels are not binary, or scores contain NaN.
    """
    y, s = _pair(labels, scores, ("labels", "scores"), 1, "f1_max")
    return _f1_max(y, _sort(s))


def pixel_f1_max(masks: Any, maps: Any) -> F1Max | None:
    """Pixel-level F1-max over all pixels of all images pooled; see ``f1_max``.

    Args:
      masks: [n, h, w] bool or 0/1 ground truth.
      maps: [n, h, w] anomaly maps.
    Returns:
      ``F1Max(f1, threshold)``, or None when no pixel is anomalous.
    Raises:
      ValueError: shapes differ or are not [n, h, w], masks not binary, or maps contain NaN.
    """
    y, s = _pair(masks, maps, ("masks", "maps"), 3, "pixel_f1_max")
    return _f1_max(y, _sort(s))


def aupro(masks: Any, maps: Any, fpr_limit: float = AUPRO_FPR_LIMIT) -> float | None:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec official).

    The area of ``curve_up_to(pro_curve(masks, maps), fpr_limit)`` by the trapezoid rule, divided
    by ``fpr_limit``; see ``pro_curve``. Computed exactly from one sort of all pixels (the
    official code does the same, with a float32 FPR).

    Args:
      masks: [n, h, w] bool or 0/1 ground truth.
      maps: [n, h, w] anomaly maps.
      fpr_limit: upper FPR integration limit, in (0, 1].
    Returns:
      The AU-PRO in [0, 1], or None when there is no anomalous region or no normal pixel.
    Raises:
      ValueError: shapes differ or are not [n, h, w], masks not binary, maps contain NaN, or
        fpr_limit is outside (0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    y, s = _pair(masks, maps, ("masks", "maps"), 3, "aupro")
    return _aupro(_pro_curve(y, _sort(s)), fpr_limit)


def pro_curve(masks: Any, maps: Any) -> Curve | None:
    """The per-region-overlap curve: PRO against pixel FPR at every distinct map value.

    Ground-truth regions are the 8-connected components of each image's mask. At each threshold,
    FPR is over the normal pixels of all images pooled and PRO is the mean, over all regions of
    all images, of the fraction of the region at or above the threshold.

    Args:
      masks: [n, h, w] bool or 0/1 ground truth.
      maps: [n, h, w] anomaly maps.
    Returns:
      ``Curve(fpr, pro, thresholds)`` from (0, 0) to FPR 1, or None when there is no anomalous
      region or no normal pixel.
    Raises:
      ValueError: shapes differ or are not [n, h, w], masks not binary, or maps contain NaN.
    """
    y, s = _pair(masks, maps, ("masks", "maps"), 3, "pro_curve")
    return _pro_curve(y, _sort(s))


def _pro_curve(y: np.ndarray, srt: _Sorted) -> Curve | None:
    from scipy import ndimage  # lazy: keeps `import protoad_jax.metrics` cheap

    # 8-connectivity within each image, none across images: a 3x3x3 structure whose only
    # non-zero slice is the middle one labels all images at once with globally unique ids.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, num_regions = ndimage.label(y, structure=structure)
    regions = regions.ravel()
    num_normal = int(np.count_nonzero(regions == 0))
    if num_regions == 0 or num_normal == 0:
        return None

    # Per pixel: a normal pixel adds 1 to the FP count; a pixel of region r adds
    # 1 / (|r| * num_regions) to PRO.
    sizes = np.bincount(regions, minlength=num_regions + 1).astype(np.float64)
    pro_step = 1.0 / (sizes * num_regions)
    pro_step[0] = 0.0
    regions_sorted = regions[srt.order]
    del regions
    fp = np.cumsum(regions_sorted == 0, dtype=np.int64)[srt.last]
    pro = pro_step[regions_sorted]
    del regions_sorted
    pro = np.cumsum(pro, out=pro)[srt.last]
    # The lowest threshold flags every pixel: FPR 1 exactly, PRO 1 up to rounding (capped at 1).
    fpr = np.concatenate([[0.0], np.minimum(fp / num_normal, 1.0)])
    pro = np.concatenate([[0.0], np.minimum(pro, 1.0)])
    return Curve(fpr, pro, np.concatenate([[np.inf], srt.thresholds.astype(np.float64)]))


def _aupro(curve: Curve | None, fpr_limit: float) -> float | None:
    if curve is None:
        return None
    return _area(curve_up_to(curve, fpr_limit)) / fpr_limit


def curve_up_to(curve: Curve, fpr_max: float) -> Curve:
    """The part of a curve with ``fpr <= fpr_max``, ending at ``fpr_max`` (MVTec ``trapezoid``).

    When no point has ``fpr == fpr_max``, the segment crossing it is interpolated linearly and the
    new end point gets threshold NaN. Points with repeated FPR (vertical steps) are kept.

    Args:
      curve: a ``Curve`` from ``roc_curve`` or ``pro_curve`` (FPR from 0 to 1).
      fpr_max: in [0, 1].
    Returns:
      The clipped ``Curve``; its trapezoid area divided by ``fpr_max`` is the normalised area.
    """
    x, y, t = curve
    if not x[0] <= fpr_max <= x[-1]:
        raise ValueError(f"curve_up_to: fpr_max {fpr_max} is outside the curve's FPR range "
                         f"[{x[0]}, {x[-1]}]")
    keep = int(np.searchsorted(x, fpr_max, side="right"))  # x[:keep] <= fpr_max < x[keep:]
    if x[keep - 1] == fpr_max:
        return Curve(x[:keep], y[:keep], t[:keep])
    # Highest point before fpr_max to the first point after it.
    x0, x1, y0, y1 = x[keep - 1], x[keep], y[keep - 1], y[keep]
    y_end = y0 + (y1 - y0) * (fpr_max - x0) / (x1 - x0)
    return Curve(np.append(x[:keep], fpr_max), np.append(y[:keep], y_end),
                 np.append(t[:keep], np.nan))


def _area(curve: Curve) -> float:
    """Trapezoid area under the curve (vertical steps add nothing)."""
    x, y, _ = curve
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


class Evaluation(NamedTuple):
    """``evaluate_all``'s metrics and the curves and threshold behind them (None where undefined).

    values: the ``evaluate_all`` dict.
    image_roc: image-level ROC curve; ``values["image_auroc"]`` is its trapezoid area.
    pro: PRO curve (full FPR range); ``values["aupro"]`` is the normalised area of
      ``curve_up_to(pro, AUPRO_FPR_LIMIT)``.
    image_f1: image F1-max and the highest score threshold attaining it.
    """

    values: dict[str, float | None]
    image_roc: Curve | None
    pro: Curve | None
    image_f1: F1Max | None


def evaluate_all(image_labels: Any, image_scores: Any, masks: Any | None,
                 maps: Any | None) -> dict[str, float | None]:
    """All the metrics of one test set (docs/METHOD.md).

    Args:
      image_labels: [n] bool or 0/1, True = anomalous image.
      image_scores: [n] image anomaly scores.
      masks: [n, h, w] ground-truth masks, or None (no pixel annotations).
      maps: [n, h, w] anomaly maps; unused (may be None) when masks is None.
    Returns:
      ``{"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"}`` as floats;
      each is None when undefined (see the module docstring), the pixel ones when masks is None.
    Raises:
      ValueError: inconsistent shapes or image counts, non-binary labels/masks, NaN scores.
    """
    return evaluate_with_curves(image_labels, image_scores, masks, maps).values


def evaluate_with_curves(image_labels: Any, image_scores: Any, masks: Any | None,
                         maps: Any | None) -> Evaluation:
    """``evaluate_all`` plus the image ROC curve, the PRO curve and the image F1-max threshold.

    Same arguments and errors as ``evaluate_all``; the metrics are computed from the returned
    curves, so a plot of them shows exactly what was measured.
    """
    yi, si = _pair(image_labels, image_scores, ("image_labels", "image_scores"), 1, "evaluate_all")
    image_sorted = _sort(si)
    image_f1 = _f1_max(yi, image_sorted)
    image_roc = _roc_curve(yi, image_sorted)
    out = {
        "image_auroc": _auroc(yi, image_sorted),
        "pixel_auroc": None,
        "aupro": None,
        "image_f1_max": None if image_f1 is None else image_f1.f1,
        "pixel_f1_max": None,
    }
    if masks is None:
        return Evaluation(out, image_roc, None, image_f1)
    if maps is None:
        raise ValueError("evaluate_all: masks were given but maps is None")
    n, n_masks = yi.shape[0], np.shape(masks)[0]
    if n_masks != n:
        raise ValueError(f"evaluate_all: {n} image labels but masks hold {n_masks} images "
                         f"(masks shape {np.shape(masks)})")
    y, s = _pair(masks, maps, ("masks", "maps"), 3, "evaluate_all")
    srt = _sort(s)  # one sort of all pixels serves the three pixel metrics
    pixel_f1 = _f1_max(y, srt)
    pro = _pro_curve(y, srt)
    out["pixel_auroc"] = _auroc(y, srt)
    out["aupro"] = _aupro(pro, AUPRO_FPR_LIMIT)
    out["pixel_f1_max"] = None if pixel_f1 is None else pixel_f1.f1
    return Evaluation(out, image_roc, pro, image_f1)
