"""Score new images with a fitted model: a CSV of scores and decisions, and a heatmap per image.

Commands:
  python scripts/predict.py --model=runs/mvtec/bottle/model.npz --input=/data/new_bottles --output_dir=pred
  python scripts/predict.py --model=M.npz --input=DIR --output_dir=O --calibrate_dir=/data/known_good
  python scripts/predict.py --model=M.npz --input=one.png --output_dir=O --threshold=0.31

Writes O/predictions.csv (path, score, anomalous yes/no, or "unknown" when no threshold is set)
and O/overlays/<name>.png (image | heatmap over the image). Prints one line per image and a count.
Threshold rule with --calibrate_dir: the --calibrate_quantile (default 0.99) quantile of the
image scores of the normal images in that folder (numpy linear interpolation); an image is
anomalous when its score is above it. The threshold and its rule are saved into the model file,
so later runs without --threshold use it.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model .npz written by fit()/evaluate.py.", required=True)
flags.DEFINE_string("input", None, "An image file or a folder of images (searched recursively).", required=True)
flags.DEFINE_string("output_dir", None, "Where predictions.csv and overlays/ go.", required=True)
flags.DEFINE_float("threshold", None, "Image-score threshold (overrides the model's).")
flags.DEFINE_string("calibrate_dir", None, "Folder of normal images: set the threshold from them and save it.")
flags.DEFINE_float("calibrate_quantile", 0.99, "Quantile of the normal scores used as threshold.")
flags.DEFINE_string("weights", None, "Backbone .npz (default: the one recorded in the model).")
flags.DEFINE_bool("allow_random_weights", False, "Accept a model fitted with a random-init backbone (demo).")
flags.DEFINE_integer("batch_size", 8, "Images per jitted call.")
flags.DEFINE_bool("skip_bad_images", False, "Skip undecodable images instead of failing.")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    del argv
    from protoad_jax import data, evaluation, fileio, load_model, pipeline, report

    model_path = Path(FLAGS.model)
    model = load_model(model_path)
    net = evaluation.backbone_for_model(model, FLAGS.weights, allow_random=FLAGS.allow_random_weights)
    out = Path(FLAGS.output_dir)
    kw = {"batch_size": FLAGS.batch_size, "progress": FLAGS.progress, "skip_bad": FLAGS.skip_bad_images}
    if FLAGS.calibrate_dir:
        normal = data.find_images(FLAGS.calibrate_dir)
        scored = pipeline.score_images(model, normal, net.variables, **kw)
        threshold, rule = pipeline.calibrate_threshold(scored.scores, FLAGS.calibrate_quantile)
        model = model.with_threshold(threshold, f"{rule} ({FLAGS.calibrate_dir})")
        model.save(model_path)
        print(f"threshold {threshold:.6f} = {rule}; saved into {model_path}")
    threshold = FLAGS.threshold if FLAGS.threshold is not None else model.threshold
    if threshold is None:
        print("no threshold is set: pass --threshold=T or --calibrate_dir=NORMAL_DIR; "
              "predictions.csv says 'unknown'", file=sys.stderr)
    root = Path(FLAGS.input)
    paths = data.find_images(root)
    scored = pipeline.score_images(model, paths, net.variables, **kw)
    vmin, vmax = float(scored.maps.min()), float(scored.maps.max())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "score", "anomalous"])
    flagged = 0
    for p, score, m in zip(scored.inputs, scored.scores, scored.maps):
        verdict = "unknown" if threshold is None else ("yes" if score > threshold else "no")
        flagged += verdict == "yes"
        writer.writerow([str(p), f"{score:.6f}", verdict])
        print(f"{score:.6f}  {verdict:7s}  {p}")
        image = data.preprocess_image(p, model.config.resize, model.config.image_size)
        title = f"{Path(p).name} score {score:.4f}" + ("" if threshold is None else f" ({verdict}, t={threshold:.4f})")
        name = Path(p).relative_to(root).with_suffix("").as_posix().replace("/", "__") if root.is_dir() \
            else Path(p).stem
        report.save_png(report.panel(image, m, None, title, vmin, vmax), out / "overlays" / f"{name}.png")
    fileio.atomic_write(out / "predictions.csv", lambda f: f.write(buf.getvalue()), mode="w")
    print(f"{flagged} of {len(scored.inputs)} images anomalous; wrote {out / 'predictions.csv'} and "
          f"{out / 'overlays'}/")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(app.run(main))
