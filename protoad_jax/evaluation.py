"""The main job: per category fit, score, measure, and write tables, maps, overlays, charts and a
report.

Every output file is written atomically; a category's ``result.json`` is written last, so an
interrupted run resumes by skipping the categories that have one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from protoad_jax import (
    datasets,
    distributed,
    explain,
    fileio,
    input_pipeline,
    metrics,
    pipeline,
    preprocess,
    regions,
    report,
)
from protoad_jax.config import IMAGE_SCORES, Config
from protoad_jax.errors import SettingsError
from protoad_jax.model import Model

if TYPE_CHECKING:
    from protoad_jax.weights import Backbone

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
DEFAULT_K = Config().num_prototypes
CSV_COLUMNS = ("category", "split") + METRICS + ("num_prototypes", "num_train", "num_test",
                                         "seconds_features", "seconds_clustering", "seconds_scoring",
                                         "seconds_metrics")
# scores.csv: every test image; status "ok", or "skipped: <reason>" (no score) with skip_bad_images.
SCORES_COLUMNS = ("path", "defect_type", "label", "status", "score")


def load_result(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def settings(config: Config, weights_desc: str) -> dict[str, Any]:
    """The settings every results table states (docs/METHOD.md section 3)."""
    return {
        "weights": weights_desc,
        "view": config.view,
        "preprocessing": preprocessing(config),
        "evaluation_resolution": (f"{config.image_size}x{config.image_size}" +
                                  ("" if config.view == "center_crop" else
                                   " (the whole image and its mask resized to it)")),
        "image_score": IMAGE_SCORES[config.image_score],
        "sigma": config.sigma,
        "prototypes": "L2-normalised (cosine)" if config.normalize_prototypes else
                      "raw cluster means (reference code)",
        "clustering": config.clustering,
        "num_prototypes": config.num_prototypes,
        "finch_level": config.finch_level if config.num_prototypes is None else None,
        "finch_early_exit": config.finch_early_exit if config.clustering == "finch" else None,
        "max_patches": config.max_patches,
        "patch_sampler": config.patch_sampler,
        "max_patches_resolved": config.patch_budget(jax.default_backend()),
        "seed": config.seed,
        "backbone_dtype": config.dtype,
        "config": dataclasses.asdict(config),
    }


def preprocessing(config: Config) -> str:
    """What the model scores, in words (results tables; docs/METHOD.md sections 1 and 5)."""
    s = config.image_size
    if config.view == "full_frame":
        return (f"RGB; the whole image resized to {s}x{s} with PIL LANCZOS (aspect ratio not "
                "kept); ImageNet mean/std")
    if config.view == "tiles":
        first = ("" if config.tile_image_size is None else
                 f"long side resized to {config.tile_image_size} with PIL LANCZOS; ")
        return (f"RGB; {first}tiles of {config.tile_size} px overlapping by at least "
                f"{config.tile_overlap} px (last tile flush with the edge), each resized to {s}x{s} "
                "with PIL LANCZOS; tile maps stitched with the mean over overlaps; ImageNet mean/std")
    return (f"RGB; shorter side to {config.resize} with PIL LANCZOS; center crop "
            f"{config.image_size}; ImageNet mean/std")


def check_view_dataset(dataset: str, config: Config) -> None:
    """Raises ``SettingsError`` for a TFDS dataset in the ``full_frame`` or ``tiles`` view: TFDS
    inputs arrive as center crops (``datasets.load``)."""
    if dataset.startswith("tfds:") and config.view != "center_crop":
        raise SettingsError(f"the {config.view} view reads image files; {dataset} gives center "
                            "crops. Read the extracted folders instead (--dataset=mvtec or btad with "
                            "--data_dir), or use --view=center_crop")


class TestScores(NamedTuple):
    """The test images scored, aligned: the ``items`` scored and their ``images`` (paths or
    arrays), ``labels`` (None for a split without labels), ``masks`` (None without ground
    truth), the scores, and per input
    position the score or the skip reason (``rows`` of scores.csv)."""

    __test__ = False  # not a pytest test class

    items: list[datasets.TestItem]
    images: list
    labels: np.ndarray | None
    masks: np.ndarray | None
    scored: pipeline.ScoredImages
    rows: list[dict[str, Any]]


def run_category(dataset: str, data_dir: str | Path | None, category: str, out_dir: Path, config: Config,
                 net: Backbone, *, split: str | None = None, batch_size: int = 8,
                 save_raw_maps: bool = False, skip_bad_images: bool = False, num_overlays: int = 4,
                 progress: bool = True, tfds_data_dir: str | None = None,
                 tfds_manual_dir: str | None = None, across_processes: bool = False) -> dict[str, Any]:
    """Fits on ``train``, scores ``test`` (the dataset's ``split``; None: its default), measures,
    writes ``out_dir/<category>/...``; returns the row.

    A dataset with held-out normal images (``inputs.validation``: MVTec AD 2, MVTec LOCO)
    calibrates the model's threshold on their scores (``pipeline.calibrate_threshold``'s 0.99
    quantile). A split without labels gets null metrics and a ``metrics_note``; a dataset with
    ``per_type`` gets ``per_type`` metrics too (``per_type_metrics``).
    ``across_processes``: every process of a multi-process run calls this for the category; the
    fit and the scoring are split over them (``pipeline.fit``, ``pipeline.score_shared``), and
    only process 0 measures and writes the files; the others return only ``category``,
    ``split`` and ``skipped_images``.
    """
    check_view_dataset(dataset, config)
    inputs = datasets.load(dataset, data_dir, category, config, split=split,
                           tfds_data_dir=tfds_data_dir, tfds_manual_dir=tfds_manual_dir)
    cat_dir = out_dir / category
    t0 = time.perf_counter()
    model = pipeline.fit(inputs.train, net.path, config=config, variables=net.variables,
                         batch_size=batch_size, progress=progress, across_processes=across_processes)
    t1 = time.perf_counter()
    if inputs.validation:
        val = pipeline.score_images(model, inputs.validation, net.variables, batch_size=batch_size,
                                    progress=progress, across_processes=across_processes)
        threshold, rule = pipeline.calibrate_threshold(val.scores)
        model = model.with_threshold(threshold, f"{rule} (validation/good)")
    t_val = time.perf_counter()
    test = score_test(model, inputs, net, batch_size=batch_size, progress=progress,
                      skip_bad_images=skip_bad_images, across_processes=across_processes)
    t2 = time.perf_counter()
    if across_processes and not distributed.is_main():  # process 0 measures and writes
        return {"category": category, "split": inputs.split,
                "skipped_images": [str(s.path) for s in test.scored.skipped]}
    extra: dict[str, Any] = {}
    if not inputs.labeled:
        measured = metrics.Evaluation(dict.fromkeys(METRICS), None, None, None)
        extra["metrics_note"] = (f"the {inputs.split} split has no labels: metrics are null; "
                                 "scores.csv, maps and overlays are written")
    else:
        if test.masks is None:
            log.warning("%s: no ground_truth folder; pixel metrics are null", category)
        measured = metrics.evaluate_with_curves(test.labels, test.scored.scores, test.masks,
                                                test.scored.maps)
        if inputs.per_type:
            extra["per_type"] = per_type_metrics(test.items, test.scored.scores, test.masks,
                                                 test.scored.maps)
    t3 = time.perf_counter()
    result = {
        "category": category, "split": inputs.split, **measured.values, **extra,
        "threshold": model.threshold, "threshold_rule": model.info.get("threshold_rule"),
        "num_validation": len(inputs.validation),
        "seconds_validation": round(t_val - t1, 3),
        "image_f1_threshold": None if measured.image_f1 is None else measured.image_f1.threshold,
        "num_prototypes": model.num_prototypes,
        "num_train": len(inputs.train), "num_test": len(test.items),
        "skipped_images": [str(s.path) for s in test.scored.skipped],
        "seconds_features": model.info["seconds_features"],
        "seconds_clustering": model.info["seconds_clustering"],
        "seconds_fit_total": round(t1 - t0, 3), "seconds_scoring": round(t2 - t_val, 3),
        "seconds_metrics": round(t3 - t2, 3), "backbone": net.description, "fit_info": model.info,
    }
    model.save(cat_dir / "model.npz")  # after scoring: a bad test image leaves nothing behind
    result.update(write_category(cat_dir, category, test, measured, model, config,
                                 save_raw_maps=save_raw_maps, num_overlays=num_overlays))
    if num_overlays:  # the most anomalous images' regions beside their closest normal looks
        result["closest_looks"] = explain.report_looks(model, test.images, test.scored,
                                                       net.variables, cat_dir, num_overlays,
                                                       batch_size=batch_size)
    fileio.write_json(cat_dir / "result.json", result)  # last: marks the category finished
    return result


def per_type_metrics(items: list[datasets.TestItem], scores: np.ndarray, masks: np.ndarray | None,
                     maps: np.ndarray) -> dict[str, dict[str, Any]]:
    """For each anomalous defect type, the metrics of the normal test images and that type's
    images only (MVTec LOCO's protocol: good vs logical, good vs structural anomalies).

    Args:
      items: the test images scored (``TestItem``, labels 0/1), aligned with the arrays.
      scores: ``[n]`` image scores; masks: ``[n, h, w]`` bool or None; maps: ``[n, h, w]``.
    Returns:
      ``{type: {**evaluate_all(...), "num_normal", "num_anomalous"}}``, types sorted.
    """
    labels = np.array([it.label for it in items])
    types = np.array([it.defect_type for it in items])
    out = {}
    for t in sorted(set(types[labels == 1].tolist())):
        sel = (labels == 0) | (types == t)
        values = metrics.evaluate_all(labels[sel], scores[sel],
                                      None if masks is None else masks[sel],
                                      None if masks is None else maps[sel])
        out[t] = {**values, "num_normal": int(np.sum(labels == 0)),
                  "num_anomalous": int(np.sum(types == t))}
    return out


def score_test(model: Model, inputs: datasets.Inputs, net: Backbone, *, batch_size: int = 8,
               progress: bool = True, skip_bad_images: bool = False,
               across_processes: bool = False) -> TestScores:
    """Scores a category's test images and aligns what was scored with its labels and masks
    (images skipped as unreadable drop out of both; scores.csv keeps a row for each).
    ``across_processes``: split over the processes (``pipeline.score_shared``)."""
    config = model.config
    scored = pipeline.score_images(model, inputs.test, net.variables, batch_size=batch_size,
                                   progress=progress, skip_bad=skip_bad_images,
                                   across_processes=across_processes)
    reasons = {s.path: s.reason for s in scored.skipped}
    keep = [i for i, x in enumerate(inputs.test) if not isinstance(x, Path) or x not in reasons]
    items = [inputs.items[i] for i in keep]
    masks = None
    if inputs.masks is not None:
        masks = inputs.masks[keep]
    elif inputs.has_masks:
        masks = input_pipeline.load_masks(items, config.resize, config.image_size,
                                          frame=config.view != "center_crop")
    score_of = dict(zip(keep, scored.scores.tolist()))  # by position: TFDS names can repeat
    rows = [{"path": str(it.path), "defect_type": it.defect_type, "label": it.label,
             "status": "ok" if i in score_of else f"skipped: {reasons[it.path]}",
             "score": score_of.get(i, "")} for i, it in enumerate(inputs.items)]
    labels = None if any(it.label is None for it in items) else np.array([it.label for it in items])
    return TestScores(items, [inputs.test[i] for i in keep], labels, masks, scored, rows)


def write_category(cat_dir: Path, category: str, test: TestScores, measured: metrics.Evaluation,
                   model: Model, config: Config, *, save_raw_maps: bool = False,
                   num_overlays: int = 4) -> dict[str, list[str]]:
    """Writes scores.csv, the raw maps (optional), overlays and plots of one category; returns
    ``{"overlays": [...], "plots": [...]}`` (paths relative to ``cat_dir``)."""
    fileio.write_csv(cat_dir / "scores.csv", SCORES_COLUMNS, test.rows)
    if save_raw_maps:
        for it, m in zip(test.items, test.scored.maps):
            path = cat_dir / "maps" / it.defect_type / f"{it.path.stem}.npy"
            fileio.atomic_write(path, lambda f, m=m: np.save(f, m.astype(np.float32)))
    overlays = _write_overlays(cat_dir, test.items, test.images, test.scored, test.masks, config,
                               num_overlays)
    plots = _write_plots(cat_dir, category, test.labels, test.scored.scores, measured,
                         model.threshold)
    return {"overlays": overlays, "plots": plots}


def _write_overlays(cat_dir: Path, items: list, images: list, scored: pipeline.ScoredImages,
                    masks: np.ndarray | None, config: Config, n: int) -> list[str]:
    """Panels for the ``n`` most and ``n`` least anomalous test images; returns relative paths."""
    order = np.argsort(-scored.scores, kind="stable")
    picks = [("most", i) for i in order[:n]] + [("least", i) for i in order[::-1][:n]]
    vmin, vmax = float(scored.maps.min()), float(scored.maps.max())
    out = []
    for rank, (kind, i) in enumerate(picks):
        it = items[i]
        image = images[i]
        m, mask = scored.maps[i], None if masks is None else masks[i]
        if config.view != "center_crop":  # the whole image, its map and mask at the original resolution
            image = preprocess.preprocess_original(image)
            h, w = image.shape[:2]
            m = regions.upsample_frame(m if scored.frames is None else scored.frames[i], w, h)
            if mask is not None:
                mask = (preprocess.binarize_mask(preprocess.mask_image(it.mask_path))
                        if it.mask_path is not None else np.zeros((h, w), bool))
        elif isinstance(image, Path):
            image = preprocess.preprocess_image(image, config.resize, config.image_size)
        title = f"{kind} anomalous #{rank % n + 1}: {it.defect_type}/{it.path.name} score {scored.scores[i]:.4f}"
        png = report.panel(image, m, mask, title, vmin, vmax)
        rel = f"overlays/{kind}_{rank % n + 1:02d}_{it.defect_type}_{it.path.stem}.png"
        report.save_png(png, cat_dir / rel)
        out.append(rel)
    return out


def _write_plots(cat_dir: Path, category: str, labels: np.ndarray | None, scores: np.ndarray,
                 measured: metrics.Evaluation, threshold: float | None) -> list[str]:
    """The image ROC curve, the PRO curve and the image-score histogram (each when defined) as
    ``cat_dir/plots/*.png``; returns their paths relative to ``cat_dir``.

    The histogram marks the image F1-max threshold and ``threshold`` (the model's calibrated
    one), when set.
    """
    charts = {}
    if measured.image_roc is not None:
        charts["roc"] = report.roc_plot(measured.image_roc, measured.values["image_auroc"],
                                        f"{category}: image ROC curve")
    if measured.pro is not None:
        charts["pro"] = report.pro_plot(measured.pro, measured.values["aupro"],
                                        f"{category}: PRO curve (pixels)")
    f1 = measured.image_f1
    thresholds = {}
    if f1 is not None:
        thresholds[f"F1-max threshold {f1.threshold:.4f} (F1 {f1.f1:.3f})"] = f1.threshold
    if threshold is not None:
        thresholds[f"calibrated threshold {threshold:.4f} (normal images)"] = threshold
    if labels is None:  # a split without labels
        groups = {f"unlabeled (n={len(scores)})": scores}
    else:
        labels = np.asarray(labels, bool)
        groups = {f"normal (n={np.count_nonzero(~labels)})": scores[~labels],
                  f"anomalous (n={np.count_nonzero(labels)})": scores[labels]}
    charts["score_histogram"] = report.score_histogram(groups, thresholds,
                                                       f"{category}: test image scores")
    out = []
    for name, img in charts.items():
        rel = f"plots/{name}.png"
        report.save_png(img, cat_dir / rel)
        out.append(rel)
    return out


def summarize(results: list[dict], out_dir: Path, run_settings: dict, warnings: list[str]) -> dict:
    """Writes results.json, results.csv and report.html over all categories; returns the summary."""
    type_columns = per_type_columns(results)
    rows = [{**r, **_flat_per_type(r)} for r in results]
    mean = {"category": "mean"}
    for k in METRICS + type_columns:
        vals = [r[k] for r in rows if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    summary = {"settings": run_settings, "warnings": warnings, "categories": results,
               "mean": {k: v for k, v in mean.items() if "/" not in k}}
    if type_columns:
        summary["mean_per_type"] = {
            t: {k: mean[f"{t}/{k}"] for k in METRICS}
            for t in dict.fromkeys(c.split("/")[0] for c in type_columns)}
    fileio.write_json(out_dir / "results.json", summary)
    columns = CSV_COLUMNS + type_columns
    fileio.write_csv(out_dir / "results.csv", columns, rows + [mean])
    notes = warnings + [f"{k}: {v}" for k, v in run_settings.items() if k != "config"]
    galleries = []
    for r in results:
        cat = r["category"]
        galleries += [report.Gallery(f"{cat}: curves and score histogram",
                                     [f"{cat}/{p}" for p in r.get("plots", [])], natural_size=True),
                      report.Gallery(f"{cat}: most and least anomalous test images "
                                     "(image | ground truth | heatmap)",
                                     [f"{cat}/{p}" for p in r.get("overlays", [])])]
        looks = r.get("closest_looks")
        if looks and looks["images"]:  # explain.report_looks
            galleries.append(report.Gallery(
                f"{cat}: closest normal look, most anomalous test images (region | the exemplar "
                f"of its nearest prototype; {looks['rule']})",
                [f"{cat}/{p}" for p in looks["images"]]))
    report.write_html(out_dir / "report.html", "protoad_jax results", notes, columns,
                      rows + [mean], galleries)
    return summary


def per_type_columns(results: list[dict]) -> tuple[str, ...]:
    """``<type>/<metric>`` columns of results.csv for the categories with ``per_type`` metrics
    (types in first-seen order, metrics in ``METRICS`` order); empty when none has them."""
    types = dict.fromkeys(t for r in results for t in r.get("per_type") or {})
    return tuple(f"{t}/{k}" for t in types for k in METRICS)


def _flat_per_type(result: dict) -> dict[str, float | None]:
    return {f"{t}/{k}": vals.get(k) for t, vals in (result.get("per_type") or {}).items()
            for k in METRICS}


def format_table(results: list[dict], mean: dict) -> str:
    """A plain-text table: one row per category and the mean."""
    head = f"{'category':<16}" + "".join(f"{k:>14}" for k in METRICS) + f"{'K':>7}{'fit s':>9}{'score s':>9}"
    lines = [head, "-" * len(head)]
    for r in results + [mean]:
        cells = "".join(f"{r[k]:>14.4f}" if r.get(k) is not None else f"{'n/a':>14}" for k in METRICS)
        extra = (f"{r['num_prototypes']:>7}{r['seconds_fit_total']:>9.1f}{r['seconds_scoring']:>9.1f}"
                 if "num_prototypes" in r else "")
        lines.append(f"{r['category']:<16}{cells}{extra}")
    typed = [(r["category"], t, vals) for r in results for t, vals in (r.get("per_type") or {}).items()]
    if typed:
        width = max(16, *(len(f"{c} {t}") + 1 for c, t, _ in typed))
        lines += ["", "per anomaly type (the normal test images vs that type's):",
                  f"{'category type':<{width}}" + "".join(f"{k:>14}" for k in METRICS)]
        for cat, t, vals in typed:
            cells = "".join(f"{vals[k]:>14.4f}" if vals.get(k) is not None else f"{'n/a':>14}"
                            for k in METRICS)
            lines.append(f"{cat + ' ' + t:<{width}}{cells}")
    return "\n".join(lines)
