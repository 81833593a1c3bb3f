"""Predict's outputs for scored images: predictions.csv, overlays, defect masks, regions.json.

Every file is written atomically. Under the output folder ``O``:
  ``predictions.csv``  one row per input file, in input order: ``path``, ``status`` (``ok``, or
      ``skipped: <reason>`` for an unreadable file left out with ``skip_bad``), ``score``,
      ``anomalous`` (``yes``/``no``, ``unknown`` without a threshold; empty when skipped),
      ``regions`` (number of defect regions of an anomalous image, else empty);
  ``overlays/<name>.png``  the crop the model scored | heatmap over it, the defect regions
      outlined in white (the original-resolution mask brought into the crop frame by the same
      NEAREST resize and crop as ground-truth masks); in the ``full_frame`` and ``tiles`` views
      the original image | heatmap over it, at the original resolution;
  ``masks/<name>.png``  per anomalous image: the defect mask at the original image size, 8-bit
      grayscale, 255 = defect;
  ``regions.json``  per anomalous image: ``path``, ``score``, ``threshold``, ``image_size``
      ``[width, height]``, ``crop_box`` (the scored pixels), ``mask``, and ``regions``: ``area``,
      ``box``, ``peak``, ``centroid`` in original pixel coordinates (``protoad_jax.regions``),
      and, with an ``explain.Explainer``, each region's ``explanation`` (nearest prototype,
      similarity, exemplar) and the image's ``closest_look``;
  ``closest/<name>.png``  with an explainer, per anomalous image: each region's crop beside its
      exemplar's crop ("closest normal look", ``explain.closest_look``);
``<name>`` is the input's path relative to the input folder, without its suffix, ``/`` -> ``__``.
An image is anomalous when its score is above the threshold.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from protoad_jax import fileio, preprocess, regions, report
from protoad_jax.pipeline import ScoredImages

CSV_COLUMNS = ("path", "status", "score", "anomalous", "regions")
REGIONS_NOTES = {
    "coordinates": "original image pixels; boxes [x0, y0, x1, y1] with x1, y1 exclusive; "
                   "centroid [x, y] is the mean column and row of the region's pixels",
    "unscored_pixels": "the model scores only the center crop of the resized image; pixels "
                       "outside crop_box are not scored and are never part of a region",
    "region_rule": "8-connected pixels whose anomaly score, bilinearly upsampled from the "
                   "scored crop to the original resolution, is above the threshold",
}

# The full_frame and tiles views score every pixel (docs/METHOD.md section 5).
FRAME_NOTES = {
    "unscored_pixels": "none: the model scores the whole image (full_frame or tiles view); "
                       "crop_box is the whole image",
    "region_rule": "8-connected pixels whose anomaly score, resampled from the map of the whole "
                   "image (full_frame: the s x s map; tiles: the stitched tile maps) to the "
                   "original resolution, is above the threshold",
}


class Prediction(NamedTuple):
    """One input file's row: ``status`` ``"ok"`` or ``"skipped: <reason>"``; ``score`` None and
    ``anomalous`` ``""`` when skipped; ``regions`` the region count of an anomalous image."""

    path: Path
    status: str
    score: float | None
    anomalous: str
    regions: int | None

    def line(self) -> str:
        """``"<score>  <yes|no|unknown>  <path>"``, or ``"skipped: <reason>  <path>"``."""
        if self.score is None:
            return f"{self.status}  {self.path}"
        return f"{self.score:.6f}  {self.anomalous:7s}  {self.path}"

    def csv_row(self) -> dict[str, str]:
        """The predictions.csv row (``CSV_COLUMNS``)."""
        return {"path": str(self.path), "status": self.status,
                "score": "" if self.score is None else f"{self.score:.6f}",
                "anomalous": self.anomalous, "regions": "" if self.regions is None else str(self.regions)}


class Summary(NamedTuple):
    """All rows (input order) and the counts the summary line states."""

    rows: list[Prediction]
    threshold: float | None

    @property
    def scored(self) -> int:
        return sum(r.score is not None for r in self.rows)

    @property
    def anomalous(self) -> int:
        return sum(r.anomalous == "yes" for r in self.rows)

    @property
    def skipped(self) -> int:
        return len(self.rows) - self.scored

    def line(self) -> str:
        """E.g. ``"1 of 3 scored images anomalous; 2 skipped"``."""
        head = (f"{self.scored} images scored, no threshold set" if self.threshold is None
                else f"{self.anomalous} of {self.scored} scored images anomalous")
        return f"{head}; {self.skipped} skipped"


def verdict(score: float, threshold: float | None) -> str:
    """``"yes"`` when ``score > threshold``, ``"no"``, or ``"unknown"`` without a threshold."""
    return "unknown" if threshold is None else ("yes" if score > threshold else "no")


def output_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """The file name stem of an input's outputs: its path relative to ``root`` (a folder), or
    its stem when ``root`` is the file itself, without suffix and with ``/`` -> ``__``."""
    path, root = Path(path), Path(root)
    if path == root or not root.is_dir():
        return path.stem
    return path.relative_to(root).with_suffix("").as_posix().replace("/", "__")


def write_predictions(out_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
                      scored: ScoredImages, threshold: float | None, *, root: str | os.PathLike,
                      resize: int, crop: int, view: str = "center_crop",
                      explainer: Any = None, value_range: tuple[float, float] | None = None,
                      tables_dir: str | os.PathLike | None = None) -> Summary:
    """Writes predictions.csv, overlays, masks and regions.json (module docstring) for ``paths``.

    Args:
      out_dir: the output folder ``O``.
      paths: every input file, in order (the scored ones and ``scored.skipped``).
      scored: ``pipeline.score_images(model, paths, ..., skip_bad=...)``.
      threshold: image-score threshold, or None (no decisions, no regions).
      root: the input file or folder (names the outputs).
      resize, crop: the preprocessing the maps came from (``Config.resize``, ``Config.image_size``).
      view: ``Config.view``. In ``full_frame`` and ``tiles`` the maps cover the whole image
        (``tiles``: ``scored.frames``, the stitched maps), regions come from
        ``regions.find_frame_regions`` and the overlays are at the original resolution (the
        image | the upsampled heatmap), nothing unscored.
      explainer: ``explain.Explainer`` or None: each region of regions.json gets its
        ``explanation`` (nearest prototype, similarity, exemplar) and each anomalous image a
        ``closest/<name>.png`` (region crop | exemplar crop, "closest normal look").
      value_range: the overlays' colour scale ``(vmin, vmax)``; default the maps' own range
        (a process scoring a share of the inputs passes every process's range).
      tables_dir: where predictions.csv and regions.json go (default ``out_dir``; a process's
        shard folder in a multi-process run, ``protoad_jax.shards``).

    Returns:
      The ``Summary``; its rows are also what predictions.csv holds.
    """
    out = Path(out_dir)
    frames = scored.frames if scored.frames is not None else scored.maps  # maps over the whole image
    results = {Path(p): (float(s), m, f) for p, s, m, f in
               zip(scored.inputs, scored.scores, scored.maps, frames)}
    whole = view != "center_crop"
    reasons = {Path(s.path): s.reason for s in scored.skipped}
    vmin, vmax = value_range or (float(scored.maps.min()), float(scored.maps.max()))
    rows, found = [], []
    for p in map(Path, paths):
        if p in reasons:
            rows.append(Prediction(p, f"skipped: {reasons[p]}", None, "", None))
            continue
        score, m, frame = results[p]
        decision = verdict(score, threshold)
        name = output_name(p, root)
        outlined = None
        n_regions = None
        if decision == "yes":
            res = (regions.find_frame_regions(frame, threshold, *preprocess.image_size(p)) if whole
                   else regions.find_regions(m, threshold, *preprocess.image_size(p), resize, crop))
            mask_rel = f"masks/{name}.png"
            mask_png = Image.fromarray(res.mask.astype(np.uint8) * 255, "L")
            report.save_png(mask_png, out / mask_rel)
            found.append(_image_entry(p, score, threshold, res, mask_rel))
            if explainer is not None:  # protoad_jax.explain: the normal look each region missed
                explainer.annotate(found[-1], p, res, out, f"closest/{name}.png")
            outlined = res.mask if whole else preprocess.preprocess_mask(mask_png, resize, crop)
            n_regions = len(res.regions)
        title = f"{p.name} score {score:.4f}" + (
            "" if threshold is None else f" ({decision}, t={threshold:.4f}"
            + ("" if n_regions is None else f", {n_regions} regions") + ")")
        if whole:  # the original image and its map at the original resolution
            image = preprocess.preprocess_original(p)
            m = regions.upsample_frame(frame, image.shape[1], image.shape[0])
        else:
            image = preprocess.preprocess_image(p, resize, crop)
        report.save_png(report.panel(image, m, None, title, vmin, vmax, regions=outlined),
                        out / "overlays" / f"{name}.png")
        rows.append(Prediction(p, "ok", score, decision, n_regions))
    tables = out if tables_dir is None else Path(tables_dir)
    fileio.write_csv(tables / "predictions.csv", CSV_COLUMNS, [r.csv_row() for r in rows])
    notes = dict(REGIONS_NOTES, **(FRAME_NOTES if whole else {}))
    fileio.write_json(tables / "regions.json", {"threshold": threshold, "view": view, **notes,
                                                "images": found})
    return Summary(rows, threshold)


def _image_entry(path: Path, score: float, threshold: float, res: regions.ImageRegions,
                 mask_rel: str) -> dict:
    w = res.window
    return {
        "path": str(path), "score": round(score, 6), "threshold": threshold,
        "image_size": [w.width, w.height], "crop_box": list(w.box), "mask": mask_rel,
        "regions": [{"area": r.area, "box": list(r.box), "peak": round(r.peak, 6),
                     "centroid": [round(c, 2) for c in r.centroid]} for r in res.regions],
    }
