"""Normal images added to a fitted model without a refit: ``update(model, images)``.

Runs on the host around the jitted regions of ``pipeline`` (features), ``exemplars`` (the
nearest-prototype pass) and ``clustering`` (new prototypes); docs/update.md states the rules:

  1. the new images' patches, with fit's view and budget rules (``pipeline.extract_patches``);
  2. a patch is covered when its similarity to the nearest current prototype reaches the model's
     coverage level (``Model.coverage``, recorded at fit: ``exemplars.COVERAGE_QUANTILE``);
     the others are the uncovered patches;
  3. the uncovered patches are clustered with the model's clustering rules
     (``clustering.cluster``): first into ``ceil(uncovered / d)`` prototypes, ``d`` the fit's
     patches per prototype, doubled until the new prototypes cover all but
     ``COVERAGE_QUANTILE`` of the uncovered patches at the coverage level (capped at one per
     patch; FINCH with ``num_prototypes=None``: its ``finch_level`` partition, once); appended
     after the old ones, which are left unchanged; their exemplars are among those patches;
  4. when the model records a calibration (``Model.calibration``), its normal images are scored
     with the updated model and the threshold is recalibrated at the same quantile;
  5. the update is recorded in ``Model.updates``.

Deterministic for the model's seed (the patch sample and the clustering are seeded).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from protoad_jax import exemplars, pipeline, scoring
from protoad_jax.clustering import cluster
from protoad_jax.errors import InputError, NoWeightsError, SettingsError
from protoad_jax.model import Model


class UpdateError(InputError):
    """A model that cannot be updated (written before coverage levels were recorded), or new
    images whose features are not finite."""


class Update(NamedTuple):
    """``model``: the updated model (the given model itself when nothing was added);
    ``record``: what was done (appended to ``model.updates`` when prototypes were added)."""

    model: Model
    record: dict

    @property
    def added(self) -> int:
        return int(self.record["prototypes_added"])

    def line(self) -> str:
        r = self.record
        head = (f"{r['images']} images, {r['patches']} patches: {r['uncovered']} uncovered "
                f"(similarity to the nearest prototype below the coverage level {r['level']:.6f})")
        if not self.added:
            return f"{head}; nothing added, the model is unchanged"
        tail = ""
        if r.get("threshold_after") is not None:
            tail = f"; threshold {r['threshold_before']:.6f} -> {r['threshold_after']:.6f} (recalibrated)"
        return (f"{head}; {r['prototypes_added']} prototypes added "
                f"({r['prototypes_before']} -> {r['prototypes_before'] + r['prototypes_added']}){tail}")


def update(model: Model, images: Sequence[Any], variables: dict | None = None, *,
           batch_size: int = 8, progress: bool = True, source: str | None = None) -> Update:
    """Adds normal ``images`` to ``model``: prototypes for what its prototypes do not cover.

    Args:
      model: a fitted or loaded ``Model`` with a coverage level and exemplars (fitted by this
        version of protoad_jax).
      images: image paths (any size: each is resized and cropped like the training images), or
        preprocessed ``[s, s, 3]`` float32 arrays.
      variables: backbone variables (default: loaded from ``model.weights``).
      batch_size: images per jitted backbone call.
      progress: show progress bars.
      source: what the images are (a folder), stored in the update record.

    Returns:
      ``Update(model, record)``. When every patch is covered, ``model`` is the given model
      unchanged (nothing is recorded in it) and ``record["prototypes_added"]`` is 0.

    Raises:
      UpdateError: the model has no coverage level or exemplars (an older file: refit it), or
        the new images' features contain NaN/inf.
      SettingsError: no images.
      NoWeightsError: no variables and the model records no weights file.
      BadImageError: an image (or a calibration image) is missing or undecodable.
    """
    if model.coverage is None or model.exemplars is None:
        raise UpdateError("this model has no coverage level and exemplars (it was fitted before "
                          "protoad_jax recorded them), so update cannot tell which new patches "
                          "are already covered; refit it on its training images and the new ones "
                          "(protoad evaluate or protoad_jax.fit), after which updates work")
    images = list(images)
    if not images:
        raise SettingsError("update() got no images; pass at least one normal image")
    if variables is None:
        if model.weights is None:
            raise NoWeightsError("the model records no backbone weights path; pass variables= "
                                 "(protoad_jax.weights.load_backbone(PATH.npz))")
        from protoad_jax.weights import load_backbone  # Flax: only when weights are loaded

        variables = load_backbone(model.weights, model.config.arch)
    config = model.config
    t0 = time.perf_counter()
    patches, origin = pipeline.extract_patches(images, variables, config, batch_size=batch_size,
                                               progress=progress, with_index=True)
    _check_finite(patches, origin, images, config, model.weights)
    level = float(model.coverage["level"])
    near = exemplars.nearest(patches, model.prototypes)
    uncovered = np.flatnonzero(near.patch_sim < level)
    record = {"images": len(images), "source": source, "patches": len(patches),
              "uncovered": len(uncovered), "level": level,
              "coverage_statistic": model.coverage.get("statistic"),
              "prototypes_before": model.num_prototypes, "prototypes_added": 0, "seed": config.seed}
    if not len(uncovered):
        record["seconds"] = round(time.perf_counter() - t0, 3)
        return Update(model, record)
    sub = patches[uncovered]
    k_new = new_prototype_count(len(sub), model.coverage, config.num_prototypes)
    while True:
        if k_new is not None and k_new >= len(sub):  # one prototype per patch: the patches
            centres, info = sub.astype(np.float32), {"clustering": "none (one prototype per patch)"}
        else:
            centres, info = cluster(sub, dataclasses.replace(config, num_prototypes=k_new),
                                    progress=progress)
        added = np.asarray(scoring.prepare_prototypes(centres, config.normalize_prototypes))
        found = exemplars.nearest(sub, added)
        left = np.mean(found.patch_sim < level)
        # Enough prototypes when the added ones cover the uncovered patches as the fit's cover
        # its own (all but COVERAGE_QUANTILE); else twice as many (FINCH levels: as they are).
        if k_new is None or k_new >= len(sub) or left <= exemplars.COVERAGE_QUANTILE:
            break
        k_new = min(2 * k_new, len(sub))
    new_exemplars, _ = exemplars.locate(added, sub, origin[uncovered], images, config, found)
    record.update(prototypes_added=len(added), clustering=info.get("clustering"),
                  threshold_before=model.threshold)
    updated = dataclasses.replace(
        model, prototypes=np.concatenate([model.prototypes, added]).astype(np.float32),
        exemplars=model.exemplars.append(new_exemplars))
    if model.calibration:
        updated = recalibrate(updated, variables, batch_size=batch_size, progress=progress)
        record["threshold_after"] = updated.threshold
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return Update(dataclasses.replace(updated, updates=(*model.updates, record)), record)


def new_prototype_count(uncovered: int, coverage: dict, num_prototypes: int | None) -> int | None:
    """The first number of prototypes tried for ``uncovered`` patches: the fit's density, ``ceil(uncovered * k / n)`` with
    ``k`` prototypes fitted on ``n`` patches (at least 1); None (FINCH's ``finch_level``
    partition) when the model was fitted with ``num_prototypes=None``."""
    if num_prototypes is None:
        return None
    return max(1, math.ceil(uncovered * coverage["num_prototypes"] / coverage["num_patches"]))


def recalibrate(model: Model, variables: dict, *, batch_size: int = 8,
                progress: bool = True) -> Model:
    """``model`` with its threshold recalibrated on its calibration record's normal images (same
    quantile, ``pipeline.calibrate_threshold``)."""
    cal = model.calibration
    scored = pipeline.score_images(model, cal["paths"], variables, batch_size=batch_size,
                                   progress=progress)
    threshold, rule = pipeline.calibrate_threshold(scored.scores, cal["quantile"])
    return model.with_threshold(threshold, f"{rule} (recalibrated after an update)", cal)


def _check_finite(patches: np.ndarray, origin: np.ndarray, images: list, config,
                  weights: str | os.PathLike | None) -> None:
    finite = np.isfinite(patches).all(axis=1)
    if finite.all():
        return
    inputs, _, _ = exemplars.patch_origin(origin[~finite], config)  # tiles: every tile an input
    windows = exemplars.InputIndex(images, config)
    bad = list(dict.fromkeys(f"#{i}" if windows[i] is None else windows[i].path
                             for i in sorted(set(inputs.tolist()))))  # images, in order
    names = ", ".join(bad[:3])
    raise UpdateError(f"the backbone features of {len(bad)} of {len(images)} new images contain "
                      f"NaN or inf (first: {names}); the backbone weights ({weights or 'given'}) "
                      "hold NaN/inf values: convert them again (protoad convert-weights) and rerun")
