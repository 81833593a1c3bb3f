"""Why a region is anomalous: the normal look it failed to match.

The jit is ``pipeline.scoring_function(config, nearest=True)``: the scoring region with the
nearest prototype's index taken beside the max (``scoring.patch_scores_factored(...,
nearest=True)``; the plain scorer is unchanged). Here, on the host:

  * ``nearest_maps``: per image the anomaly map, score, patch map and the nearest-prototype
    index map ``[h, w]`` (h = w = image_size // 4);
  * ``explain_region``: for one defect region of ``regions.find_regions``, its peak patch (the
    patch cell under the region's peak pixel), the prototype most similar to it (the index map
    there), the similarity ``1 - patch score`` and that prototype's exemplar (``Model.exemplars``:
    a training image and the patch's box in it);
  * ``closest_look``: each region's crop beside its exemplar's crop ("closest normal look"),
    one row per region, for predict's ``closest/`` and the evaluate report;
  * ``ViewExplainer``: the same in the ``full_frame`` and ``tiles`` views, where the inputs under
    the regions' peaks (the frame, or the peak tiles: ``peak_input``) are scored again with the
    index map (predict's plain scoring is unchanged; one extra call per image with regions).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from protoad_jax import (
    exemplars,
    input_pipeline,
    pipeline,
    preprocess,
    regions,
    report,
    scoring,
    sharding,
)
from protoad_jax.input_pipeline import ScoredImages
from protoad_jax.model import NO_EXEMPLARS, Model

MAX_REGIONS = 3  # rows of a closest-look panel: the regions with the highest peaks
THUMB = 112  # side of each crop in a closest-look panel, pixels
CONTEXT_CELLS = 8  # a crop shows at least this many patch cells around its centre


class Explained(NamedTuple):
    """``scored``: what ``pipeline.score_images`` returns; ``nearest``: ``[n, h, w]`` int32,
    each patch's nearest prototype (row of ``model.prototypes``)."""

    scored: ScoredImages
    nearest: np.ndarray


def nearest_maps(model: Model, images: Sequence[Any], variables: dict | None = None, *,
                 batch_size: int = 8, progress: bool = True,
                 chunk_size: int | str | None = scoring.AUTO, skip_bad: bool = False) -> Explained:
    """``pipeline.score_images`` with each patch's nearest prototype beside the anomaly map.

    One jitted region (``pipeline.scoring_function(..., nearest=True)``): the argmax comes from
    the same similarity block as the max. Arguments and errors as ``pipeline.score_images``.
    """
    _, variables, prototypes = pipeline.scoring_parts(model, variables, chunk_size=chunk_size,
                                                      caller="nearest_maps")
    fn = pipeline.scoring_function(model.config, chunk_size, nearest=True)

    def call(batch: np.ndarray) -> tuple:
        res, index = fn(variables, prototypes, sharding.device_batch(batch))
        return res.anomaly_map, res.score, res.patch_map, index

    (maps, scores, patch_maps, index), inputs, skipped = input_pipeline.score_batches(
        call, images, sharding.device_batch_size(batch_size), model.config.resize,
        model.config.image_size, progress=progress, skip_bad=skip_bad)
    return Explained(ScoredImages(maps, scores, patch_maps, inputs, skipped), index)


def peak_patch(region: regions.Region, window: regions.CropWindow, grid: int) -> tuple[int, int]:
    """``(row, col)`` of the patch cell (on the ``grid x grid`` patch map of the scored crop)
    under the centre of the region's peak pixel."""
    cx, cy = window.to_crop(region.peak_at[0] + 0.5, region.peak_at[1] + 0.5)
    cell = window.crop / grid
    return (int(np.clip(math.floor(cy / cell), 0, grid - 1)),
            int(np.clip(math.floor(cx / cell), 0, grid - 1)))


def explain_region(region: regions.Region, window: regions.CropWindow, patch_map: np.ndarray,
                   nearest: np.ndarray, model: Model) -> dict:
    """One region's explanation (JSON-ready): ``patch`` ``[row, col]`` (its peak patch),
    ``prototype`` (the most similar one there), ``similarity`` (``1 - patch score``, the head's
    similarity to it) and ``exemplar`` (``Exemplars.entry``: path, row, col, box, cosine), or
    ``exemplar: null`` and a ``note`` for a model file without exemplars."""
    row, col = peak_patch(region, window, patch_map.shape[0])
    return explanation(row, col, patch_map, nearest, model)


def explanation(row: int, col: int, patch_map: np.ndarray, nearest: np.ndarray,
                model: Model) -> dict:
    """The explanation of the patch ``(row, col)`` of one model input (its ``patch_map`` and
    ``nearest`` index map): ``explain_region``'s dict."""
    k = int(nearest[row, col])
    out = {"patch": [row, col], "prototype": k,
           "similarity": round(float(1.0 - patch_map[row, col]), 6)}
    if model.exemplars is None:
        return {**out, "exemplar": None, "note": NO_EXEMPLARS}
    return {**out, "exemplar": model.exemplars.entry(k)}


class Explainer:
    """Explanations for images scored by ``nearest_maps``, looked up by input: what predict's
    ``regions.json`` and ``closest/`` use."""

    def __init__(self, model: Model, explained: Explained):
        self.model = model
        self.explained = explained
        self._rows: dict[Path, int] = {}  # input -> row, built once (first row of a repeated path)
        for i, p in enumerate(explained.scored.inputs):
            self._rows.setdefault(Path(p), i)

    def regions(self, path: Any, found: regions.ImageRegions) -> list[dict]:
        """``explain_region`` for each of ``found.regions`` of the input ``path``."""
        i = self._index(path)
        patch_map = self.explained.scored.patch_maps[i]
        return [explain_region(r, found.window, patch_map, self.explained.nearest[i], self.model)
                for r in found.regions]

    def annotate(self, entry: dict, path: Any, found: regions.ImageRegions, out_dir: Path,
                 look_rel: str) -> None:
        """Adds to predict's regions.json ``entry`` each region's ``explanation`` and writes the
        image's closest-look panel to ``out_dir / look_rel`` (``entry["closest_look"]``; None
        when there is nothing to show)."""
        annotate(entry, path, found, self.regions(path, found), self.model.config, out_dir,
                 look_rel)

    def _index(self, path: Any) -> int:
        try:
            return self._rows[Path(path)]
        except KeyError:
            raise ValueError(f"{path} was not scored by this explainer") from None


def annotate(entry: dict, path: Any, found: regions.ImageRegions, explanations: list[dict],
             config: Any, out_dir: Path, look_rel: str, cell: float | None = None) -> None:
    """Adds ``explanations`` to predict's regions.json ``entry`` (each region's
    ``explanation``) and writes the closest-look panel (``closest_look``) to ``out_dir /
    look_rel`` (``entry["closest_look"]``; None when there is nothing to show)."""
    for region, e in zip(entry["regions"], explanations):
        region["explanation"] = e
    look = closest_look(path, found, explanations, config, cell=cell)
    entry["closest_look"] = None if look is None else look_rel
    if look is not None:
        report.save_png(look, Path(out_dir) / look_rel)


# ----------------------------------------------------------------------------- full_frame, tiles


def peak_input(region: regions.Region, windows: Sequence[exemplars.InputWindow], size: int,
               grid: int) -> tuple[int, int, int]:
    """``(input, row, col)``: the model input (``exemplars.input_windows`` of the image) that
    shows the centre of the region's peak pixel, and the patch cell there. In the tiles view a
    pixel lies in up to four tiles: the one whose centre is nearest to it (the tile that sees it
    with the most context), the first in ``layout.boxes`` order on an exact tie."""
    px, py = region.peak_at[0] + 0.5, region.peak_at[1] + 0.5
    best = None
    for j, w in enumerate(windows):
        u, v = (px - w.x0) / w.sx, (py - w.y0) / w.sy  # in the input's s x s pixels
        if not (0.0 <= u <= size and 0.0 <= v <= size):
            continue
        d = (u - size / 2) ** 2 + (v - size / 2) ** 2
        if best is None or d < best[0]:
            best = (d, j, u, v)
    if best is None:
        raise ValueError(f"peak {region.peak_at} lies in none of the {len(windows)} inputs")
    _, j, u, v = best
    cell = size / grid
    return (j, int(np.clip(math.floor(v / cell), 0, grid - 1)),
            int(np.clip(math.floor(u / cell), 0, grid - 1)))


class ViewExplainer(NamedTuple):
    """Explanations in the ``full_frame`` and ``tiles`` views, where predict scores with the
    plain scorer (``pipeline.score_images``: tiles stitched as they arrive): for an image with
    regions, the inputs under the regions' peaks (the whole frame, or the peak tiles:
    ``peak_input``) are scored again by ``pipeline.scoring_function(nearest=True)``, one call per
    image with regions, in batches of ``batch_size`` rows (one compile). Same interface as
    ``Explainer``."""

    model: Model
    variables: dict
    batch_size: int = 8
    chunk_size: int | str | None = scoring.AUTO

    def regions(self, path: Any, found: regions.ImageRegions) -> list[dict]:
        if not found.regions:
            return []
        config = self.model.config
        s, grid = config.image_size, config.image_size // 4
        windows = exemplars.input_windows(path, config)
        picks = [peak_input(r, windows, s, grid) for r in found.regions]
        needed = sorted({j for j, _, _ in picks})
        if config.view == "tiles":
            inputs = preprocess.preprocess_tiles(path, s, config.tile_size, config.tile_overlap,
                                                 config.tile_image_size)[0][needed]
        else:
            inputs = preprocess.preprocess_frame(path, s)[None]
        rows = -(-len(inputs) // self.batch_size) * self.batch_size  # fixed batch: one compile
        batch = np.concatenate([inputs, np.zeros((rows - len(inputs), s, s, 3), np.float32)])
        fn = pipeline.scoring_function(config, self.chunk_size, nearest=True)
        prototypes = np.asarray(self.model.prototypes, np.float32)
        patch_maps, index = [], []
        for start in range(0, rows, self.batch_size):
            res, near = fn(self.variables, prototypes, batch[start:start + self.batch_size])
            patch_maps.append(np.asarray(res.patch_map))
            index.append(np.asarray(near))
        patch_maps, index = np.concatenate(patch_maps), np.concatenate(index)
        at = {j: n for n, j in enumerate(needed)}
        return [{**explanation(r, c, patch_maps[at[j]], index[at[j]], self.model),
                 **({"tile": j} if config.view == "tiles" else {})} for j, r, c in picks]

    def annotate(self, entry: dict, path: Any, found: regions.ImageRegions, out_dir: Path,
                 look_rel: str) -> None:
        """``Explainer.annotate`` in these views (the crops' context from the view's scale)."""
        w = exemplars.input_windows(path, self.model.config)[0]
        cell = max(w.sx, w.sy) * 4  # original pixels per patch cell (4 input pixels)
        annotate(entry, path, found, self.regions(path, found), self.model.config, out_dir,
                 look_rel, cell)


def _square(box: Sequence[int], side: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A square of ``side`` (at least the box's larger side) centred on ``box``, moved inside the
    image where it fits."""
    x0, y0, x1, y1 = box
    side = math.ceil(min(max(side, x1 - x0, y1 - y0), width, height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(np.clip(round(cx - side / 2), 0, width - side))
    top = int(np.clip(round(cy - side / 2), 0, height - side))
    return left, top, left + side, top + side


def _thumb(path: str | os.PathLike, box: Sequence[int], context: float) -> Image.Image:
    """The image's crop around ``box`` (``_square``), ``box`` outlined, scaled to ``THUMB``."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    square = _square(box, context, *rgb.size)
    crop = np.asarray(rgb.crop(square)).copy()
    inside = np.zeros(crop.shape[:2], bool)
    x0, y0 = box[0] - square[0], box[1] - square[1]
    inside[max(0, y0):max(0, box[3] - square[1]), max(0, x0):max(0, box[2] - square[0])] = True
    crop = report.outline(crop, inside, (255, 255, 255))
    return Image.fromarray(crop).resize((THUMB, THUMB), Image.Resampling.NEAREST)


def closest_look(path: str | os.PathLike, found: regions.ImageRegions, entries: list[dict],
                 config: Any, cell: float | None = None) -> Image.Image | None:
    """Each region's crop (its box outlined) beside its exemplar's crop (the patch outlined),
    the ``MAX_REGIONS`` highest regions, captioned; None when there is nothing to show (no
    region, or no exemplar with a file). ``cell``: original pixels per patch cell (default: the
    center crop's, from ``found.window``)."""
    rows = []
    for r, e in list(zip(found.regions, entries))[:MAX_REGIONS]:
        ex = e.get("exemplar")
        if not ex or not ex.get("path") or not ex.get("box") or not Path(ex["path"]).exists():
            continue
        # Context: CONTEXT_CELLS patch cells, in each image's own original pixels.
        scale = cell or (found.window.width / found.window.resized_width * config.image_size
                         / (config.image_size // 4))
        region_crop = _thumb(path, r.box, CONTEXT_CELLS * scale)
        ex_cell = ex["box"][2] - ex["box"][0]
        exemplar_crop = _thumb(ex["path"], ex["box"], CONTEXT_CELLS * ex_cell)
        caption = (f"peak {r.peak:.3f} | prototype {e['prototype']}, similarity "
                   f"{e['similarity']:.3f}: {Path(ex['path']).name}")
        rows.append((region_crop, exemplar_crop, caption))
    if not rows:
        return None
    return report.pairs_panel(rows, f"{Path(path).name}: region | closest normal look")


# ----------------------------------------------------------------------------- evaluate's report

REPORT_PIXEL_QUANTILE = 0.99  # regions of the report's closest looks: one rule for every image


def report_looks(model: Model, images: Sequence[Any], scored: ScoredImages, variables: dict,
                 out_dir: str | os.PathLike, n: int = 4, *, batch_size: int = 8) -> dict:
    """Evaluate's "closest normal look": for the ``n`` most anomalous of the scored test
    ``images`` (highest image scores, stable order), each region's crop beside its exemplar's
    crop (``closest_look``), written to ``out_dir/closest/most_<rank>_<stem>.png``.

    One threshold rule for the regions, for every image and every view: a pixel belongs to a
    region when its score is above the ``REPORT_PIXEL_QUANTILE`` quantile of all the test maps'
    pixels (``scored.maps``, the evaluation resolution; numpy linear). It needs no labels and no
    calibrated threshold (most evaluate runs have none) and the most anomalous images always
    have their hottest pixels in it. Images given as arrays (TFDS) have no file: skipped.

    Returns:
      ``{"threshold": float, "rule": str, "images": [relative paths], "note": str | None}``.
    """
    threshold = float(np.quantile(scored.maps, REPORT_PIXEL_QUANTILE))
    rule = (f"regions: pixels above the {REPORT_PIXEL_QUANTILE:g} quantile of all test map pixels "
            f"({threshold:.6f})")
    out = {"threshold": threshold, "rule": rule, "images": [], "note": None}
    if model.exemplars is None:
        return {**out, "note": NO_EXEMPLARS}
    order = np.argsort(-np.asarray(scored.scores), kind="stable")[:n]
    picks = [(rank, int(i)) for rank, i in enumerate(order, 1)
             if isinstance(images[i], (str, os.PathLike))]
    if not picks:
        return {**out, "note": "the test images are arrays (no files): no closest looks"}
    config = model.config
    paths = [images[i] for _, i in picks]
    if config.view == "center_crop":
        explainer = Explainer(model, nearest_maps(model, paths, variables, batch_size=batch_size,
                                                  progress=False))
    else:
        explainer = ViewExplainer(model, variables, batch_size)
    frames = scored.frames if scored.frames is not None else scored.maps
    for (rank, i), path in zip(picks, paths):
        size = preprocess.image_size(path)
        found = (regions.find_regions(scored.maps[i], threshold, *size, config.resize,
                                      config.image_size) if config.view == "center_crop"
                 else regions.find_frame_regions(frames[i], threshold, *size))
        entry = {"regions": [{} for _ in found.regions]}
        rel = f"closest/most_{rank:02d}_{Path(path).stem}.png"
        explainer.annotate(entry, path, found, Path(out_dir), rel)
        if entry["closest_look"] is not None:
            out["images"].append(rel)
    return out
