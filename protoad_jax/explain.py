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
    one row per region, for predict's ``closest/`` and the evaluate report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from protoad_jax import input_pipeline, pipeline, regions, report, scoring, sharding
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
    k = int(nearest[row, col])
    out = {"patch": [row, col], "prototype": k,
           "similarity": round(float(1.0 - patch_map[row, col]), 6)}
    if model.exemplars is None:
        return {**out, "exemplar": None, "note": NO_EXEMPLARS}
    return {**out, "exemplar": model.exemplars.entry(k)}


class Explainer(NamedTuple):
    """Explanations for images scored by ``nearest_maps``, looked up by input: what predict's
    ``regions.json`` and ``closest/`` use."""

    model: Model
    explained: Explained

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
        explanations = self.regions(path, found)
        for region, e in zip(entry["regions"], explanations):
            region["explanation"] = e
        look = closest_look(path, found, explanations, self.model.config)
        entry["closest_look"] = None if look is None else look_rel
        if look is not None:
            report.save_png(look, Path(out_dir) / look_rel)

    def _index(self, path: Any) -> int:
        return [Path(p) for p in self.explained.scored.inputs].index(Path(path))


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
                 config: Any) -> Image.Image | None:
    """Each region's crop (its box outlined) beside its exemplar's crop (the patch outlined),
    the ``MAX_REGIONS`` highest regions, captioned; None when there is nothing to show (no
    region, or no exemplar with a file)."""
    rows = []
    for r, e in list(zip(found.regions, entries))[:MAX_REGIONS]:
        ex = e.get("exemplar")
        if not ex or not ex.get("path") or not ex.get("box") or not Path(ex["path"]).exists():
            continue
        # Context: CONTEXT_CELLS patch cells, in each image's own original pixels.
        scale = found.window.width / found.window.resized_width * config.image_size / (config.image_size // 4)
        region_crop = _thumb(path, r.box, CONTEXT_CELLS * scale)
        ex_cell = ex["box"][2] - ex["box"][0]
        exemplar_crop = _thumb(ex["path"], ex["box"], CONTEXT_CELLS * ex_cell)
        caption = (f"peak {r.peak:.3f} | prototype {e['prototype']}, similarity "
                   f"{e['similarity']:.3f}: {Path(ex['path']).name}")
        rows.append((region_crop, exemplar_crop, caption))
    if not rows:
        return None
    return report.pairs_panel(rows, f"{Path(path).name}: region | closest normal look")
