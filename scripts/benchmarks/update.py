"""Adding normal images without a refit (protoad_jax.update), measured against a full refit.

Kind A: crops of scikit-learn's "china" photo (make_photo_dataset: train, test normals, test
images with painted holes, scratches and stains and their masks); kind B: the demo object
category (default: the A model flags nearly all of its normals; --kind_b=texture: the demo
texture, which the A model hardly flags; --kind_b=flower: crops of the "flower" photo, 2 in 3).
A model fitted on A's training images, its threshold calibrated on A's calibration normals (a
separate seeded set, 0.99 quantile), scores B's test normals: nearly all flagged.
Then (1) update with B's training images (threshold recalibrated on the same A normals) and (2)
a full refit on A's and B's training images (calibrated the same way): for each, the seconds,
the number of prototypes, the false-positive rate on B's test normals and A's image AUROC,
pixel AUROC and AU-PRO.

Command (docs/update.md's table comes from it; about 7 minutes on 2 cores):
  python scripts/benchmarks/update.py --output=runs/update_benchmark
Prints a markdown table (model | prototypes | seconds | FP on B normals | A image AUROC |
pixel AUROC | AU-PRO | threshold) and writes it with the settings to <output>/update.md and
<output>/update.json. Without --weights: the random-init wide_resnet50_2 (said in the output).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "runs/update_benchmark", "Output folder.")
flags.DEFINE_string("weights", None, "Backbone .npz (default: random-init wide_resnet50_2, stated).")
flags.DEFINE_integer("n_train_a", 48, "Training images of kind A (china).")
flags.DEFINE_integer("n_train_b", 8, "Training images of kind B (flower), added by the update.")
flags.DEFINE_integer("n_test_good", 30, "Test normals of each kind.")
flags.DEFINE_integer("n_test_bad", 30, "Defective test images of kind A.")
flags.DEFINE_integer("n_calibrate", 10, "Calibration normals of kind A.")
flags.DEFINE_integer("num_prototypes", 200, "FINCH K of the fit on A and of the refit.")
flags.DEFINE_integer("image_size", 112, "Center crop (resize = image_size * 8 / 7).")
flags.DEFINE_integer("seed", 0, "Seed of the data and the method.")
flags.DEFINE_enum("kind_b", "object", ["object", "texture", "flower"],
                  "Kind B: the demo object category (the A model flags nearly all of it), the "
                  "demo texture category or flower photo crops.")


def main(argv):
    del argv
    import numpy as np
    from sklearn.datasets import load_sample_images

    from protoad_jax import Config, datasets, evaluation, fileio, metrics, pipeline, update, weights
    from protoad_jax.datasets import demo

    out = Path(FLAGS.output)
    china, flower = load_sample_images().images
    root_a = demo.make_photo_dataset(out / "data_a", [china], seed=FLAGS.seed, n_train=FLAGS.n_train_a,
                                     n_test_good=FLAGS.n_test_good, n_test_bad=FLAGS.n_test_bad)
    if FLAGS.kind_b == "flower":
        root_b = demo.make_photo_dataset(out / "data_b", [flower], seed=FLAGS.seed, n_train=FLAGS.n_train_b,
                                         n_test_good=FLAGS.n_test_good, n_test_bad=0)
        cat_b = demo.PHOTO
    else:
        cat_b = demo.OBJECT if FLAGS.kind_b == "object" else demo.TEXTURE
        root_b = demo.make_demo_dataset(out / f"data_b_{FLAGS.kind_b}", seed=FLAGS.seed,
                                        n_train=FLAGS.n_train_b, n_test_good=FLAGS.n_test_good,
                                        n_test_bad=0, categories=(cat_b,))
    root_c = demo.make_photo_dataset(out / "data_calibrate", [china], seed=FLAGS.seed + 1,
                                     n_train=FLAGS.n_calibrate, n_test_good=0, n_test_bad=0)
    size = FLAGS.image_size
    config = Config(image_size=size, resize=size * 8 // 7, num_prototypes=FLAGS.num_prototypes,
                    seed=FLAGS.seed)
    net = (weights.resolve_backbone(FLAGS.weights) if FLAGS.weights else
           weights.random_backbone("wide_resnet50_2", "benchmark without --weights"))
    a = datasets.load("mvtec", root_a, demo.PHOTO, config)
    b_train = datasets.find_images(root_b / cat_b / "train")
    b_test = datasets.find_images(root_b / cat_b / "test" / "good")
    calibration = [str(p) for p in datasets.find_images(root_c / demo.PHOTO / "train")]

    def calibrated(model):
        scores = pipeline.score_images(model, calibration, net.variables, progress=False).scores
        threshold, rule = pipeline.calibrate_threshold(scores, 0.99)
        return model.with_threshold(threshold, rule, {"quantile": 0.99, "paths": calibration})

    def row(name, model, seconds):
        test = evaluation.score_test(model, a, net, progress=False)
        m = metrics.evaluate_all(test.labels, test.scored.scores, test.masks, test.scored.maps)
        b_scores = pipeline.score_images(model, b_test, net.variables, progress=False).scores
        r = {"model": name, "prototypes": model.num_prototypes, "seconds": round(seconds, 1),
             "fp_b": float(np.mean(b_scores > model.threshold)), "image_auroc": m["image_auroc"],
             "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"], "threshold": model.threshold}
        print(_line(r), flush=True)
        return r

    print(HEADER, flush=True)
    t = time.perf_counter()
    fit_a = pipeline.fit(a.train, config=config, variables=net.variables, progress=False)
    seconds_a = time.perf_counter() - t
    fit_a = calibrated(fit_a)
    rows = [row(f"fit on A ({len(a.train)} images)", fit_a, seconds_a)]
    t = time.perf_counter()
    res = update.update(fit_a, b_train, net.variables, progress=False, source=str(root_b))
    rows.append(row(f"A + update with B ({len(b_train)} images)", res.model, time.perf_counter() - t))
    t = time.perf_counter()
    refit = calibrated(pipeline.fit(list(a.train) + b_train, config=config,
                                    variables=net.variables, progress=False))
    seconds = time.perf_counter() - t
    rows.append(row(f"refit on A + B ({len(a.train) + len(b_train)} images)", refit, seconds))
    notes = [f"backbone: {net.description}", f"config: {config.to_json()}",
             f"kind B: {FLAGS.kind_b} ({len(b_train)} training images, {len(b_test)} test normals)",
             f"update: {res.line()}",
             ("seconds: fit (features, clustering, exemplars) or update (features, coverage pass, "
              "clustering, exemplars, recalibration on the calibration normals); the refit "
              "includes its calibration on the same normals"),
             f"threshold: 0.99 quantile of {len(calibration)} A calibration normals (update: recalibrated)",
             f"FP on B normals: share of {len(b_test)} B test normals above the threshold"]
    text = "\n".join([HEADER, *map(_line, rows), "", *notes]) + "\n"
    print("\n".join(notes))
    fileio.atomic_write(out / "update.md", lambda f: f.write(text), mode="w")
    fileio.atomic_write(out / "update.json", lambda f: json.dump({"rows": rows, "notes": notes}, f,
                                                                 indent=1), mode="w")


HEADER = ("| model | prototypes | seconds | FP on B normals | A image AUROC | A pixel AUROC | "
          "A AU-PRO | threshold |\n|---|---|---|---|---|---|---|---|")


def _line(r: dict) -> str:
    return (f"| {r['model']} | {r['prototypes']} | {r['seconds']:.1f} | {r['fp_b']:.2f} | "
            f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | "
            f"{r['threshold']:.4f} |")


if __name__ == "__main__":
    app.run(main)
