"""What low precision costs: the exported scorer under OpenVINO f32 / bf16 / f16 (and ONNX Runtime
f32) against the live scorer on the demo data: map and score differences and the change in
image AUROC, pixel AUROC and AU-PRO.

Commands (need the [deploy] extra; --int8 also needs NNCF, which no extra installs: measured
with ``pip install nncf==3.4.0``):
  python scripts/benchmarks/deploy_quality.py [--weights=W.npz] [--workdir=DIR]
  python scripts/benchmarks/deploy_quality.py --int8      # adds OpenVINO INT8 (NNCF post-training)

Generates the demo categories (``datasets.demo``: demo_texture, demo_object, and photo: real
photographs from scikit-learn with painted holes, scratches and stains), fits each with the
default Config (FINCH, K = 1000) on the backbone (--weights, else the random-init
wide_resnet50_2), scores the test images with ``pipeline.score_images`` (the live scorer, the
reference) and with ``load_exported(export_scorer(..., format="onnx"), runtime, precision)`` on
the same preprocessed files, and prints one markdown table: category | runtime | precision | max
|map diff| | max |score diff| | image AUROC, pixel AUROC, AU-PRO (live value, then each path's
change) | batch-1 ms (median per image, all paths alternating, after warm-up), plus the mean
over categories; then the CPU (lscpu). With --int8 an OpenVINO INT8 row: the export quantized
by ``nncf.quantize`` (default preset, static batch 1), calibrated on the category's normal
training images (all of them, 12), compiled with OpenVINO's default precision.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import harness
import numpy as np
from absl import app, flags
from harness import FLAGS, Table

flags.DEFINE_string("workdir", None, "Where the demo data and exports go (default: a temporary folder).")
flags.DEFINE_bool("int8", False, "Also quantize each export to INT8 with NNCF (pip install nncf).")

PATHS = (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "bf16"), ("openvino", "f16"))
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _int8(folder: Path, train: list, manifest: dict):
    """``scorer(images) -> (maps, scores)`` of the export quantized to INT8 by NNCF, calibrated
    on ``train`` (image paths), one image per inference."""
    import nncf

    from protoad_jax import onnx_export, preprocess_image

    ov = onnx_export.import_deploy("openvino", RuntimeError, "deploy_quality --int8")
    pre = manifest["preprocessing"]
    core = ov.Core()
    model = core.read_model(str(folder / onnx_export.ARTIFACT))
    model.reshape({0: [1, pre["crop"], pre["crop"], 3]})
    calibration = [preprocess_image(p, pre["resize"], pre["crop"])[None] for p in train]
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))
    compiled = core.compile_model(quantized, "CPU")
    request = compiled.create_infer_request()

    def scorer(images):
        outs = [request.infer({0: images[i:i + 1]}) for i in range(len(images))]
        return tuple(np.concatenate([np.array(o[compiled.output(n)]) for o in outs])
                     for n in onnx_export.OUTPUTS)

    return scorer


def _category_rows(category: str, root: Path, work: Path, net) -> list[list]:
    from protoad_jax import (
        Config,
        datasets,
        evaluation,
        export,
        metrics,
        pipeline,
        preprocess_image,
    )

    config = Config(arch=FLAGS.arch)
    inputs = datasets.load("mvtec", root, category, config)
    model = pipeline.fit(inputs.train, net.path, config=config, variables=net.variables,
                         progress=False)
    live = evaluation.score_test(model, inputs, net, progress=False)
    want = metrics.evaluate_all(live.labels, live.scored.scores, live.masks, live.scored.maps)
    folder = export.export_scorer(model, net.variables, work / category, format="onnx")
    rows = [[category, "live make_scorer (JAX)", "f32", 0.0, 0.0,
             *(f"{want[m]:.4f}" for m in METRICS)]]
    live_scorer = pipeline.make_scorer(model, net.variables)
    scorers = [lambda x: tuple(np.asarray(a) for a in live_scorer(x))]
    manifest = None
    for runtime, precision in PATHS:
        scorer, manifest = export.load_exported(folder, runtime=runtime, precision=precision)
        scorers.append(scorer)
        got = export.score_files(scorer, manifest, live.images, progress=False)
        values = metrics.evaluate_all(live.labels, got.scores, live.masks, got.maps)
        rows.append([category, runtime, precision,
                     float(np.abs(got.maps - live.scored.maps).max()),
                     float(np.abs(got.scores - live.scored.scores).max()),
                     *(f"{values[m] - want[m]:+.4f}" for m in METRICS)])
        print(" | ".join(map(str, rows[-1])), flush=True)
    if FLAGS.int8:
        scorer = _int8(folder, inputs.train, manifest)
        scorers.append(scorer)
        got = export.score_files(scorer, manifest, live.images, progress=False)
        values = metrics.evaluate_all(live.labels, got.scores, live.masks, got.maps)
        rows.append([category, "openvino (NNCF)", "int8",
                     float(np.abs(got.maps - live.scored.maps).max()),
                     float(np.abs(got.scores - live.scored.scores).max()),
                     *(f"{values[m] - want[m]:+.4f}" for m in METRICS)])
    x = preprocess_image(live.images[0], config.resize, config.image_size)[None]
    for fn in scorers:
        fn(x)  # warm-up (compiles at batch 1)
    for row, ms in zip(rows, harness.medians(*[lambda fn=fn: fn(x) for fn in scorers])):
        row.append(ms * 1e3)
    return rows


def main(argv):
    del argv
    from sklearn.datasets import load_sample_images

    from protoad_jax import weights
    from protoad_jax.datasets import demo

    harness.setup()
    work = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="protoad_deploy_quality_"))
    root = demo.make_demo_dataset(work / "data")
    demo.make_photo_dataset(root, load_sample_images().images)  # root/photo
    net = (weights.resolve_backbone(FLAGS.weights, FLAGS.arch) if FLAGS.weights
           else weights.random_backbone(FLAGS.arch, "deploy_quality.py without --weights"))
    rows = []
    for category in (*demo.CATEGORIES, demo.PHOTO):
        rows += _category_rows(category, root, work / "exports", net)
    from protoad_jax import Config

    table = Table("deploy quality: exported scorer vs the live scorer on the demo data, "
                  f"K={Config().num_prototypes}, {FLAGS.arch} ({FLAGS.weights or 'random-init'})",
                  ["category", "runtime", "precision", "max |map diff|", "max |score diff|",
                   "image AUROC (change)", "pixel AUROC (change)", "AU-PRO (change)",
                   "batch 1 ms"])
    for row in rows:
        table.add(*row)
    live = [r for r in rows if r[1].startswith("live")]
    for runtime, precision in dict.fromkeys((r[1], r[2]) for r in rows if r not in live):
        mine = [r for r in rows if (r[1], r[2]) == (runtime, precision)]
        table.add("mean", runtime, precision, max(r[3] for r in mine), max(r[4] for r in mine),
                  *(f"{np.mean([float(r[5 + i]) for r in mine]):+.4f}" for i in range(3)),
                  np.median([r[8] for r in mine]))
    table.add("mean", "live make_scorer (JAX)", "f32", 0.0, 0.0,
              *(f"{np.mean([float(r[5 + i]) for r in live]):.4f}" for i in range(3)),
              np.median([r[8] for r in live]))
    table.notes += [
        ("live rows: the metric values; other rows: their change from the live value (same "
        "category, same model); map and score differences: max over the category's test images "
        "(the mean rows: max over categories; metric changes: mean; batch 1 ms: median)."),
        f"files under {work}",
        *harness.machine(),
    ]
    table.print()


if __name__ == "__main__":
    sys.exit(app.run(main))
