"""Score new images with a fitted model: a CSV of scores and decisions, heatmaps, defect regions.

Commands (``protoad predict ...`` is the same as ``python scripts/predict.py ...``):
  python scripts/predict.py --model=runs/mvtec/bottle/model.npz --input=/data/new_bottles --output_dir=pred
  python scripts/predict.py --model=M.npz --input=DIR --output_dir=O --calibrate_dir=/data/known_good
  python scripts/predict.py --model=M.npz --input=one.png --output_dir=O --threshold=0.31
  python scripts/predict.py --model=M.npz --input=DIR --output_dir=O --skip_bad_images
  python scripts/predict.py --exported=D --input=DIR --output_dir=O   # a scripts/export.py directory
  python scripts/predict.py --exported=D --runtime=openvino --precision=bf16 ...  # an ONNX export

Prints one line per input file and a summary (a = anomalous, n = scored, k = skipped):
  <score>  <yes|no|unknown>  /data/new_bottles/003.png
  skipped: cannot decode (UnidentifiedImageError: cannot identify image file)  /data/new_bottles/bad.png
  <a> of <n> scored images anomalous; <k> skipped; wrote pred/predictions.csv, pred/regions.json, pred/overlays/, pred/masks/
Writes (protoad_jax/prediction.py): O/predictions.csv (path, status ok / skipped: <reason>, score,
anomalous yes/no, or "unknown" when no threshold is set, number of regions), O/overlays/<name>.png
(image | heatmap with the defect regions outlined), and per anomalous image O/masks/<name>.png (the
defect mask at the original image size) and an entry in O/regions.json (8-connected regions with
area, bounding box, peak score and centroid in original pixel coordinates; pixels outside the
center crop the model sees are not scored; in the full_frame and tiles views every pixel is, and
the overlays are at the original resolution). An unreadable image stops the run with one line
naming it, unless --skip_bad_images.
For a center_crop model each region of regions.json also has an "explanation" (the nearest
prototype of its peak patch, the similarity and that prototype's exemplar: a training image and
box), and O/closest/<name>.png shows each region's crop beside its exemplar's (docs/update.md).
The model's view is used (--view, --tile_size, --tile_image_size may only repeat it; --tile_overlap
may change it for the tiles view, for this run only: the model file keeps its overlap, and a
threshold calibrated with another overlap is used for that run and not saved).
Also O/score_histogram.png (the scored inputs' scores, with the threshold).
Threshold rule with --calibrate_dir: the --calibrate_quantile (default 0.99) quantile of the
image scores of the normal images in that folder (numpy linear interpolation); an image is
anomalous when its score is above it. The threshold and its rule are saved into the model file,
so later runs without --threshold use it.
With --exported=D (instead of --model) the images are decoded and preprocessed with the
constants in D/manifest.json and scored by the exported artifact, without Flax; the threshold is
the manifest's unless --threshold is given (--calibrate_dir needs --model). An ONNX directory
(export.py --format=onnx) runs with --runtime=onnxruntime (default) or openvino, the latter at
--precision=f32 (default), bf16 or f16.
Compiled programs are kept in --compile_cache_dir (default $PROTOAD_COMPILE_CACHE_DIR, else
~/.cache/protoad_jax/compiled; empty: none), so a second run starts faster (docs/export.md
"Start-up").
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from protoad_jax import cli, datasets, distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model .npz written by fit()/evaluate.py (or pass --exported).")
flags.DEFINE_string("exported", None, "Directory written by scripts/export.py (instead of --model).")
flags.DEFINE_enum("runtime", None, ["onnxruntime", "openvino"],
                  "With --exported ONNX directories: the runtime (default onnxruntime).")
flags.DEFINE_enum("precision", None, ["f32", "bf16", "f16"],
                  "With --exported ONNX directories and --runtime=openvino: inference precision "
                  "(default f32, the live scorer's numbers).")
flags.DEFINE_string("input", None, "An image file or a folder of images (searched recursively).", required=True)
flags.DEFINE_string("output_dir", None, "Where predictions.csv, regions.json, overlays/ and masks/ go.",
                    required=True)
flags.DEFINE_float("threshold", None, "Image-score threshold (overrides the model's).")
flags.DEFINE_string("calibrate_dir", None, "Folder of normal images: set the threshold from them and save it.")
flags.DEFINE_float("calibrate_quantile", 0.99, lower_bound=1e-9, upper_bound=1.0, help="Quantile of the normal scores used as threshold.")
flags.DEFINE_string("weights", None, "Backbone .npz (default: the one recorded in the model).")
flags.DEFINE_bool("allow_random_weights", False, "Accept a model fitted with a random-init backbone (demo).")
flags.DEFINE_integer("batch_size", 8, "Images (tiles in the tiles view) per jitted call (fewer "
                     "when fewer are given: one image is scored as a batch of one).", lower_bound=1)
flags.DEFINE_bool("skip_bad_images", False, "Skip undecodable images instead of failing.")
flags.DEFINE_enum("view", None, ["center_crop", "full_frame", "tiles"],
                  "What is scored; default and only accepted value: the model's view (the "
                  "prototypes were fitted on it); another one is an error.")
flags.DEFINE_integer("tile_size", None, "tiles view: must equal the model's tile size (default).",
                     lower_bound=1)
flags.DEFINE_integer("tile_image_size", None, "tiles view: must equal the model's (default).",
                     lower_bound=1)
flags.DEFINE_integer("tile_overlap", None, "tiles view: overlap of neighbouring tiles in pixels "
                     "(default: the model's; any value below the tile size).", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_string("compile_cache_dir", None, "Folder of compiled programs reused by later runs "
                    "(default $PROTOAD_COMPILE_CACHE_DIR, else ~/.cache/protoad_jax/compiled); "
                    "empty: no cache.")


distributed.define_flags()


def main(argv):
    del argv
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    with distributed.failures_as_errors():
        _main()
        distributed.finish()


def _main():
    from protoad_jax import prediction, report

    if (FLAGS.model is None) == (FLAGS.exported is None):
        raise cli.CommandError("pass exactly one of --model=M.npz and --exported=DIR")
    if FLAGS.model and (FLAGS.runtime or FLAGS.precision):
        raise cli.CommandError("--runtime and --precision apply to --exported ONNX directories")
    cli.enable_compile_cache(FLAGS.compile_cache_dir)
    paths = datasets.find_images(FLAGS.input)
    if distributed.process_count() > 1:
        return _predict_share(paths)
    scored, threshold, config, explainer = (_score_exported(paths) if FLAGS.exported
                                            else _score_model(paths))
    out = Path(FLAGS.output_dir)
    summary = prediction.write_predictions(out, paths, scored, threshold, root=FLAGS.input,
                                           resize=config.resize, crop=config.image_size,
                                           view=config.view, explainer=explainer)
    report.write_score_histogram(out / "score_histogram.png", scored.scores, threshold)
    for r in summary.rows:
        print(r.line())
    print(f"{summary.line()}; wrote {out / 'predictions.csv'}, {out / 'regions.json'}, {out / 'overlays'}/, "
          f"{out / 'masks'}/, {out / 'score_histogram.png'}")


def _predict_share(paths):
    """This process's block of the inputs: scored, its overlays and masks written, its tables in
    its shard folder (``protoad_jax.shards``); process 0 merges every shard's tables."""
    from protoad_jax import prediction, shards

    out, index, count = Path(FLAGS.output_dir), distributed.process_index(), distributed.process_count()
    mine = paths[distributed.block(len(paths))]
    shard = shards.folder(out, index, count)
    key = {"inputs": [str(p) for p in mine], "model": FLAGS.model, "exported": FLAGS.exported,
           "threshold": FLAGS.threshold, "calibrate_dir": FLAGS.calibrate_dir,
           "runtime": FLAGS.runtime, "precision": FLAGS.precision, "weights": FLAGS.weights}
    done = shards.finished(shard, key)
    if done is None and mine:
        scored, threshold, config, explainer = (_score_exported(mine) if FLAGS.exported
                                                else _score_model(mine))
        mine_range = [float(scored.maps.min()), float(scored.maps.max())]
    else:  # kept from an earlier run, or more processes than inputs (an empty shard)
        threshold = done["threshold"] if done else None
        mine_range = done["value_range"] if done else [float("inf"), float("-inf")]
    ranges = distributed.allgather_json(mine_range)  # the overlays' colour scale of one process
    value_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    if done is None and mine:
        summary = prediction.write_predictions(out, mine, scored, threshold, root=FLAGS.input,
                                               resize=config.resize, crop=config.image_size,
                                               view=config.view, explainer=explainer,
                                               value_range=value_range, tables_dir=shard)
        shards.mark_done(shard, key, scored.scores, value_range, threshold)
        for r in summary.rows:
            print(r.line())
    elif done is None:
        shards.mark_empty(shard, key)
    else:
        print(f"process {index}: its shard finished earlier, kept ({shard / 'done.json'})")
    found = [t for t in distributed.allgather_json(threshold) if t is not None]
    threshold = found[0] if found else None
    distributed.barrier("predict: every shard written")
    if distributed.is_main():
        summary = shards.merge(out, count, threshold)
        print(f"{summary.line()}; wrote {out / 'predictions.csv'}, {out / 'regions.json'}, "
              f"{out / 'overlays'}/, {out / 'masks'}/, {out / 'score_histogram.png'}")


def _score_exported(paths):
    """Scores ``paths`` with the artifact in --exported; no Flax, no fitting code."""
    from protoad_jax import export

    if FLAGS.calibrate_dir or FLAGS.weights:
        raise cli.CommandError("--calibrate_dir and --weights need --model; an exported scorer carries "
                               "its weights, and its threshold is set at export time (or pass --threshold)")
    scorer, manifest = export.load_exported(FLAGS.exported, runtime=FLAGS.runtime,
                                            precision=FLAGS.precision)
    threshold = FLAGS.threshold if FLAGS.threshold is not None else manifest["threshold"]["value"]
    if threshold is None:
        print("no threshold is set: pass --threshold=T; predictions.csv says 'unknown'", file=sys.stderr)
    config = export.manifest_config(manifest)
    if config.view != "center_crop" or _view_flags():
        raise cli.CommandError(f"{FLAGS.exported}: an exported scorer preprocesses center crops; "
                               f"its model's view is {config.view}. Score with --model=M.npz for "
                               "the full_frame and tiles views")
    scored = export.score_files(scorer, manifest, paths, batch_size=_batch_size(paths, config),
                                progress=FLAGS.progress, skip_bad=FLAGS.skip_bad_images)
    return scored, threshold, config, None


def _score_model(paths):
    from protoad_jax import load_model, pipeline, weights

    model_path = Path(FLAGS.model)
    saved = load_model(model_path)
    model = _with_view(saved, model_path)
    net = weights.backbone_for_model(model, FLAGS.weights, allow_random=FLAGS.allow_random_weights)
    kw = {"progress": FLAGS.progress, "skip_bad": FLAGS.skip_bad_images}
    if FLAGS.calibrate_dir:
        normal = datasets.find_images(FLAGS.calibrate_dir)
        scored = pipeline.score_images(model, normal, net.variables,
                                       batch_size=_batch_size(normal, model.config), **kw)
        threshold, rule = pipeline.calibrate_threshold(scored.scores, FLAGS.calibrate_quantile)
        model = model.with_threshold(threshold, f"{rule} ({FLAGS.calibrate_dir})",
                                     {"quantile": FLAGS.calibrate_quantile,  # for protoad update
                                      "paths": [str(p) for p in scored.inputs]})
        if model.config != saved.config:  # --tile_overlap: the file keeps its own settings
            print(f"threshold {threshold:.6f} = {rule}; {len(scored.skipped)} skipped; used for "
                  f"this run only, not saved: it was calibrated with --tile_overlap="
                  f"{model.config.tile_overlap}, {model_path} uses {saved.config.tile_overlap}")
        else:
            if distributed.is_main():  # every process calibrates on the same images
                model.save(model_path)
            print(f"threshold {threshold:.6f} = {rule}; {len(scored.skipped)} skipped; saved into {model_path}")
    threshold = FLAGS.threshold if FLAGS.threshold is not None else model.threshold
    if threshold is None:
        print("no threshold is set: pass --threshold=T or --calibrate_dir=NORMAL_DIR; "
              "predictions.csv says 'unknown'", file=sys.stderr)
    from protoad_jax import explain

    if model.config.view == "center_crop":  # the index map beside the max, in the one pass
        explained = explain.nearest_maps(model, paths, net.variables,
                                         batch_size=_batch_size(paths, model.config), **kw)
        return explained.scored, threshold, model.config, explain.Explainer(model, explained)
    scored = pipeline.score_images(model, paths, net.variables, batch_size=_batch_size(paths, model.config),
                                   **kw)
    # full_frame, tiles: the inputs under each region's peak scored again with the index map
    return scored, threshold, model.config, explain.ViewExplainer(model, net.variables,
                                                                  FLAGS.batch_size)


def _view_flags() -> dict:
    names = ("view", "tile_size", "tile_image_size", "tile_overlap")
    return {n: FLAGS[n].value for n in names if FLAGS[n].value is not None}


def _with_view(model, model_path):
    """The model with --tile_overlap applied; --view, --tile_size and --tile_image_size must
    equal the model's: its prototypes were fitted on what that view shows, at that scale."""
    import dataclasses

    config, given = model.config, _view_flags()
    for name in ("view", "tile_size", "tile_image_size"):
        if name in given and given[name] != getattr(config, name):
            raise cli.CommandError(f"--{name}={given[name]} differs from the model's {name} "
                                   f"{getattr(config, name)!r} ({model_path}); its prototypes were "
                                   f"fitted on that view: refit with evaluate --{name}={given[name]}, "
                                   f"or drop --{name}")
    if "tile_overlap" in given and config.view != "tiles":
        raise cli.CommandError(f"--tile_overlap applies to the tiles view; the model {model_path} "
                               f"uses {config.view}")
    if "tile_overlap" in given:
        config = dataclasses.replace(config, tile_overlap=given["tile_overlap"])  # SettingsError if >= tile
        model = dataclasses.replace(model, config=config)
    return model


def _batch_size(paths, config) -> int:
    # A batch of 8 for one image scores 7 padding rows: 0.6 s more at start-up (docs/export.md);
    # the tiles view caps at the tiles, not the images (one image's tiles share batches).
    if config.view != "tiles":  # the exported path stays free of the pipeline import (start-up)
        return min(FLAGS.batch_size, len(paths))
    from protoad_jax import pipeline

    return pipeline.batch_size_for(paths, FLAGS.batch_size, config)
