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

from protoad_jax import datasets, fileio, input_pipeline, metrics, pipeline, preprocess, report
from protoad_jax.config import IMAGE_SCORES, Config
from protoad_jax.model import Model

if TYPE_CHECKING:
    from protoad_jax.weights import Backbone

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
DEFAULT_K = Config().num_prototypes
CSV_COLUMNS = ("category",) + METRICS + ("num_prototypes", "num_train", "num_test",
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
        "preprocessing": (f"RGB; shorter side to {config.resize} with PIL LANCZOS; center crop "
                          f"{config.image_size}; ImageNet mean/std"),
        "evaluation_resolution": f"{config.image_size}x{config.image_size}",
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


class TestScores(NamedTuple):
    """The test images scored, aligned: the ``items`` scored and their ``images`` (paths or
    arrays), ``labels``, ``masks`` (None without ground truth), the scores, and per input
    position the score or the skip reason (``rows`` of scores.csv)."""

    __test__ = False  # not a pytest test class

    items: list[datasets.TestItem]
    images: list
    labels: np.ndarray
    masks: np.ndarray | None
    scored: pipeline.ScoredImages
    rows: list[dict[str, Any]]


def run_category(dataset: str, data_dir: str | Path | None, category: str, out_dir: Path, config: Config,
                 net: Backbone, *, batch_size: int = 8, save_raw_maps: bool = False,
                 skip_bad_images: bool = False, num_overlays: int = 4, progress: bool = True,
                 tfds_data_dir: str | None = None, tfds_manual_dir: str | None = None) -> dict[str, Any]:
    """Fits on ``train``, scores ``test``, measures, writes ``out_dir/<category>/...``; returns the row."""
    inputs = datasets.load(dataset, data_dir, category, config, tfds_data_dir=tfds_data_dir,
                           tfds_manual_dir=tfds_manual_dir)
    cat_dir = out_dir / category
    t0 = time.perf_counter()
    model = pipeline.fit(inputs.train, net.path, config=config, variables=net.variables,
                         batch_size=batch_size, progress=progress)
    t1 = time.perf_counter()
    test = score_test(model, inputs, net, batch_size=batch_size, progress=progress,
                      skip_bad_images=skip_bad_images)
    t2 = time.perf_counter()
    if test.masks is None:
        log.warning("%s: no ground_truth folder; pixel metrics are null", category)
    measured = metrics.evaluate_with_curves(test.labels, test.scored.scores, test.masks, test.scored.maps)
    t3 = time.perf_counter()
    result = {
        "category": category, **measured.values,
        "image_f1_threshold": None if measured.image_f1 is None else measured.image_f1.threshold,
        "num_prototypes": model.num_prototypes,
        "num_train": len(inputs.train), "num_test": len(test.items),
        "skipped_images": [str(s.path) for s in test.scored.skipped],
        "seconds_features": model.info["seconds_features"],
        "seconds_clustering": model.info["seconds_clustering"],
        "seconds_fit_total": round(t1 - t0, 3), "seconds_scoring": round(t2 - t1, 3),
        "seconds_metrics": round(t3 - t2, 3), "backbone": net.description, "fit_info": model.info,
    }
    model.save(cat_dir / "model.npz")  # after scoring: a bad test image leaves nothing behind
    result.update(write_category(cat_dir, category, test, measured, model, config,
                                 save_raw_maps=save_raw_maps, num_overlays=num_overlays))
    fileio.write_json(cat_dir / "result.json", result)  # last: marks the category finished
    return result


def score_test(model: Model, inputs: datasets.Inputs, net: Backbone, *, batch_size: int = 8,
               progress: bool = True, skip_bad_images: bool = False) -> TestScores:
    """Scores a category's test images and aligns what was scored with its labels and masks
    (images skipped as unreadable drop out of both; scores.csv keeps a row for each)."""
    config = model.config
    scored = pipeline.score_images(model, inputs.test, net.variables, batch_size=batch_size,
                                   progress=progress, skip_bad=skip_bad_images)
    reasons = {s.path: s.reason for s in scored.skipped}
    keep = [i for i, x in enumerate(inputs.test) if not isinstance(x, Path) or x not in reasons]
    items = [inputs.items[i] for i in keep]
    masks = None
    if inputs.masks is not None:
        masks = inputs.masks[keep]
    elif inputs.has_masks:
        masks = input_pipeline.load_masks(items, config.resize, config.image_size)
    score_of = dict(zip(keep, scored.scores.tolist()))  # by position: TFDS names can repeat
    rows = [{"path": str(it.path), "defect_type": it.defect_type, "label": it.label,
             "status": "ok" if i in score_of else f"skipped: {reasons[it.path]}",
             "score": score_of.get(i, "")} for i, it in enumerate(inputs.items)]
    return TestScores(items, [inputs.test[i] for i in keep], np.array([it.label for it in items]),
                      masks, scored, rows)


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
        if isinstance(image, Path):
            image = preprocess.preprocess_image(image, config.resize, config.image_size)
        title = f"{kind} anomalous #{rank % n + 1}: {it.defect_type}/{it.path.name} score {scored.scores[i]:.4f}"
        png = report.panel(image, scored.maps[i], None if masks is None else masks[i], title, vmin, vmax)
        rel = f"overlays/{kind}_{rank % n + 1:02d}_{it.defect_type}_{it.path.stem}.png"
        report.save_png(png, cat_dir / rel)
        out.append(rel)
    return out


def _write_plots(cat_dir: Path, category: str, labels: np.ndarray, scores: np.ndarray,
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
    labels = np.asarray(labels, bool)
    charts["score_histogram"] = report.score_histogram(
        {f"normal (n={np.count_nonzero(~labels)})": scores[~labels],
         f"anomalous (n={np.count_nonzero(labels)})": scores[labels]},
        thresholds, f"{category}: test image scores")
    out = []
    for name, img in charts.items():
        rel = f"plots/{name}.png"
        report.save_png(img, cat_dir / rel)
        out.append(rel)
    return out


def summarize(results: list[dict], out_dir: Path, run_settings: dict, warnings: list[str]) -> dict:
    """Writes results.json, results.csv and report.html over all categories; returns the summary."""
    mean = {"category": "mean"}
    for k in METRICS:
        vals = [r[k] for r in results if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    summary = {"settings": run_settings, "warnings": warnings, "categories": results, "mean": mean}
    fileio.write_json(out_dir / "results.json", summary)
    fileio.write_csv(out_dir / "results.csv", CSV_COLUMNS, results + [mean])
    notes = warnings + [f"{k}: {v}" for k, v in run_settings.items() if k != "config"]
    galleries = []
    for r in results:
        cat = r["category"]
        galleries += [report.Gallery(f"{cat}: curves and score histogram",
                                     [f"{cat}/{p}" for p in r.get("plots", [])], natural_size=True),
                      report.Gallery(f"{cat}: most and least anomalous test images "
                                     "(image | ground truth | heatmap)",
                                     [f"{cat}/{p}" for p in r.get("overlays", [])])]
    report.write_html(out_dir / "report.html", "protoad_jax results", notes, CSV_COLUMNS,
                      results + [mean], galleries)
    return summary


def format_table(results: list[dict], mean: dict) -> str:
    """A plain-text table: one row per category and the mean."""
    head = f"{'category':<16}" + "".join(f"{k:>14}" for k in METRICS) + f"{'K':>7}{'fit s':>9}{'score s':>9}"
    lines = [head, "-" * len(head)]
    for r in results + [mean]:
        cells = "".join(f"{r[k]:>14.4f}" if r.get(k) is not None else f"{'n/a':>14}" for k in METRICS)
        extra = (f"{r['num_prototypes']:>7}{r['seconds_fit_total']:>9.1f}{r['seconds_scoring']:>9.1f}"
                 if "num_prototypes" in r else "")
        lines.append(f"{r['category']:<16}{cells}{extra}")
    return "\n".join(lines)
