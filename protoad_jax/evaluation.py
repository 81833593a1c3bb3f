"""The main job: per category fit, score, measure, and write tables, maps, overlays, charts and a
report.

Every output file is written atomically; a category's ``result.json`` is written last, so an
interrupted run resumes by skipping the categories that have one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from protoad_jax import backbone, data, metrics, pipeline, report, weights
from protoad_jax.config import IMAGE_SCORES, Config
from protoad_jax.fileio import atomic_write
from protoad_jax.model import Model

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
RANDOM_BACKBONE = "random-init backbone"
DEFAULT_K = Config().num_prototypes
CSV_COLUMNS = ("category",) + METRICS + ("num_prototypes", "num_train", "num_test",
                                         "seconds_features", "seconds_clustering", "seconds_scoring",
                                         "seconds_metrics")
# scores.csv: every test image; status "ok", or "skipped: <reason>" (no score) with skip_bad_images.
SCORES_COLUMNS = ("path", "defect_type", "label", "status", "score")


class NoWeightsError(RuntimeError):
    """No backbone weights are available and a random-init backbone was not allowed; the message
    says how to get the weights."""


class Backbone(NamedTuple):
    """Backbone variables, the ``.npz`` they came from (None if random), a description, warnings."""

    variables: dict
    path: str | None
    description: str
    warnings: list[str]


def resolve_backbone(weights_path: str | None, arch: str = "wide_resnet50_2", *, demo: bool = False,
                     allow_random: bool = False) -> Backbone:
    """Loads the given weights, else the converted ImageNet file (converting/downloading it when
    missing); without them, a random-init backbone only for the demo or with ``allow_random``.

    Raises:
      NoWeightsError: the ImageNet weights could not be downloaded or converted and random
        weights are not allowed; the message says why and how to get them.
      FileNotFoundError / ValueError: ``weights_path`` is missing or not valid weights.
    """
    if weights_path is not None:
        return Backbone(pipeline.load_backbone(weights_path, arch), str(weights_path),
                        f"{arch} from {weights_path}", [])
    try:
        path = weights.ensure_weights(arch)
        return Backbone(pipeline.load_backbone(path, arch), str(path),
                        f"{arch} IMAGENET1K_V1 (torchvision), converted to {path}", [])
    # Offline (DownloadError is an OSError), a wrong hash (ChecksumError), a corrupt .pth
    # (CheckpointError) or a mismatched file (ValueError): say why, then decide.
    except (OSError, ValueError) as e:
        if not (demo or allow_random):
            raise NoWeightsError(f"no backbone weights: {e}\nConvert the ImageNet weights with "
                                 "scripts/convert_weights.py and pass their path, or allow a "
                                 "random-init backbone (results are then not meaningful).") from e
        reason = str(e).splitlines()[0]
    return random_backbone(arch, f"the ImageNet weights are not available ({reason})")


def random_backbone(arch: str, reason: str) -> Backbone:
    """A deterministic (PRNG key 0) random-init backbone, with a prominent warning."""
    warning = (f"WARNING: {RANDOM_BACKBONE}: {reason}. Features come from a randomly initialised "
               "WideResNet, so the numbers are NOT those of ProtoAD. Convert the ImageNet weights with "
               "scripts/convert_weights.py and rerun.")
    log.warning(warning)
    variables = backbone.fold_batchnorm(random_variables(arch))
    return Backbone(jax.device_put(variables), None, RANDOM_BACKBONE, [warning])


def random_variables(arch: str = "wide_resnet50_2") -> dict:
    """Flax's default initialisation of the backbone (PRNG key 0), BatchNorm unfolded."""
    return backbone.ResNet(arch=arch).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def backbone_for_model(model: Model, weights_path: str | None = None, *,
                       allow_random: bool = False) -> Backbone:
    """The backbone a model was fitted with: ``weights_path``, else the path recorded in the model.

    A model fitted with the random-init backbone (demo) needs ``allow_random``.

    Raises:
      NoWeightsError: the model records no weights file, none is given, and random weights are
        not allowed.
    """
    path = weights_path or model.weights
    if path is not None:
        return Backbone(pipeline.load_backbone(path, model.config.arch), str(path), str(path), [])
    if not allow_random:
        raise NoWeightsError("this model was fitted with a random-init backbone (no weights file "
                             "recorded); allow a random-init backbone to use it anyway, or give the "
                             "backbone weights")
    return random_backbone(model.config.arch, "the model was fitted with a random-init backbone")


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


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False), mode="w")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


class Inputs(NamedTuple):
    """One category's inputs: ``train`` and ``test`` as image paths (folder readers) or
    preprocessed arrays (TFDS), the test ``items``, and their ``masks`` when already decoded."""

    train: list
    test: list
    items: list[data.TestItem]
    has_masks: bool
    masks: np.ndarray | None = None


def load_inputs(dataset: str, data_dir: str | Path | None, category: str, config: Config, *,
                tfds_data_dir: str | None = None, tfds_manual_dir: str | None = None) -> Inputs:
    """Reads a category from a folder layout (``mvtec``, ``btad``, ``folder``) or from a TFDS
    builder (``tfds:mvtec_ad``, ``tfds:btad``), in the same order either way."""
    if dataset.startswith("tfds:"):
        from protoad_jax import tfds_builders

        cat = tfds_builders.load_category(f"{dataset}/{category}", tfds_data_dir, manual_dir=tfds_manual_dir)
        train, _ = tfds_builders.preprocess_split(cat.train, config.resize, config.image_size)
        test, masks = tfds_builders.preprocess_split(cat.test, config.resize, config.image_size)
        return Inputs(list(train), list(test), cat.test.items(), True, masks)
    cat = data.read_dataset(dataset, data_dir, category)
    return Inputs(cat.train, [it.path for it in cat.test], cat.test, cat.has_masks)


def list_categories(dataset: str, data_dir: str | Path | None) -> list[str]:
    if dataset.startswith("tfds:"):
        from protoad_jax import tfds_builders

        return tfds_builders.list_configs(dataset.removeprefix("tfds:"))
    return data.list_categories(dataset, data_dir)


def run_category(dataset: str, data_dir: str | Path | None, category: str, out_dir: Path, config: Config,
                 net: Backbone, *, batch_size: int = 8, save_raw_maps: bool = False,
                 skip_bad_images: bool = False, num_overlays: int = 4, progress: bool = True,
                 tfds_data_dir: str | None = None, tfds_manual_dir: str | None = None) -> dict[str, Any]:
    """Fits on ``train``, scores ``test``, measures, writes ``out_dir/<category>/...``; returns the row."""
    inputs = load_inputs(dataset, data_dir, category, config, tfds_data_dir=tfds_data_dir,
                         tfds_manual_dir=tfds_manual_dir)
    cat_dir = out_dir / category
    t0 = time.perf_counter()
    model = pipeline.fit(inputs.train, net.path, config=config, variables=net.variables,
                         batch_size=batch_size, progress=progress)
    model.save(cat_dir / "model.npz")
    t1 = time.perf_counter()
    scored = pipeline.score_images(model, inputs.test, net.variables, batch_size=batch_size,
                                   progress=progress, skip_bad=skip_bad_images)
    t2 = time.perf_counter()
    reasons = {s.path: s.reason for s in scored.skipped}
    keep = [i for i, x in enumerate(inputs.test) if not isinstance(x, Path) or x not in reasons]
    items = [inputs.items[i] for i in keep]
    skipped = [str(s.path) for s in scored.skipped]
    labels = np.array([it.label for it in items])
    masks = None
    if inputs.masks is not None:
        masks = inputs.masks[keep]
    elif inputs.has_masks:
        masks = data.load_masks(items, config.resize, config.image_size)
    else:
        log.warning("%s: no ground_truth folder; pixel metrics are null", category)
    measured = metrics.evaluate_with_curves(labels, scored.scores, masks, scored.maps)
    values = measured.values
    t3 = time.perf_counter()

    score_of = dict(zip(keep, scored.scores.tolist()))  # by position: TFDS names can repeat
    rows = [{"path": str(it.path), "defect_type": it.defect_type, "label": it.label,
             "status": "ok" if i in score_of else f"skipped: {reasons[it.path]}",
             "score": score_of.get(i, "")} for i, it in enumerate(inputs.items)]
    _write_csv(cat_dir / "scores.csv", SCORES_COLUMNS, rows)
    if save_raw_maps:
        for it, m in zip(items, scored.maps):
            _save_npy(cat_dir / "maps" / it.defect_type / f"{it.path.stem}.npy", m.astype(np.float32))
    images = [inputs.test[i] for i in keep]
    overlays = _write_overlays(cat_dir, items, images, scored, masks, config, num_overlays)
    plots = _write_plots(cat_dir, category, labels, scored.scores, measured, model.threshold)

    result = {
        "category": category, **values,
        "image_f1_threshold": None if measured.image_f1 is None else measured.image_f1.threshold,
        "num_prototypes": model.num_prototypes,
        "num_train": len(inputs.train), "num_test": len(items), "skipped_images": skipped,
        "seconds_features": model.info["seconds_features"],
        "seconds_clustering": model.info["seconds_clustering"],
        "seconds_fit_total": round(t1 - t0, 3), "seconds_scoring": round(t2 - t1, 3),
        "seconds_metrics": round(t3 - t2, 3), "backbone": net.description, "fit_info": model.info,
        "overlays": overlays, "plots": plots,
    }
    _write_json(cat_dir / "result.json", result)  # last: marks the category finished
    return result


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
            image = data.preprocess_image(image, config.resize, config.image_size)
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
    _write_json(out_dir / "results.json", summary)
    _write_csv(out_dir / "results.csv", CSV_COLUMNS, results + [mean])
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
