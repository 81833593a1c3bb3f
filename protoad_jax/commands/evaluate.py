"""Fit, score and measure ProtoAD on MVTec AD, BTAD, VisA, MVTec AD 2, MVTec LOCO or your own
folder; write tables, maps and a report.

Commands (``protoad evaluate ...`` is the same as ``python scripts/evaluate.py ...``):
  python scripts/evaluate.py --demo
      Generates a small MVTec-layout dataset (a texture and an object with scratches, holes,
      stains, missing pieces) under <output_dir>/demo_data and runs the whole job on it.
  python scripts/evaluate.py --dataset=mvtec --data_dir=/data/mvtec_ad --categories=all \\
      --weights=weights/wide_resnet50_2_imagenet1k_v1.npz --output_dir=runs/mvtec
  python scripts/evaluate.py --dataset=btad --data_dir=/data/btad --categories=01,02,03 ...
  python scripts/evaluate.py --dataset=folder --data_dir=/data/my_part ...   (train/, test/<good|type>/, ground_truth/)
  python scripts/evaluate.py --dataset=visa --data_dir=/data/VisA ...   (as extracted: split_csv/1cls.csv)
  python scripts/evaluate.py --dataset=mvtec_ad2 --data_dir=/data/mvtec_ad_2 --split=test_private ...
  python scripts/evaluate.py --dataset=mvtec_loco --data_dir=/data/mvtec_loco ...   (metrics per anomaly type too)

It prints one table row per category and the mean (image AUROC, pixel AUROC, AU-PRO, image and
pixel F1-max, K, seconds) and writes O/results.json, O/results.csv, O/report.html and, per
category, O/<category>/{model.npz, scores.csv, result.json, overlays/*.png, plots/*.png
[, maps/<type>/<name>.npy]} (plots: image ROC, PRO curve, score histogram).
--view=full_frame scores the whole image resized to the model's input size; --view=tiles scores
overlapping --tile_size tiles (--tile_overlap, --tile_image_size) and stitches their maps
(docs/evaluation.md, "Views"); the view is stored in each model.npz and in results.json.
Finished categories are skipped on a rerun unless --overwrite. Every result names its --split (the
dataset's default: test_public for mvtec_ad2, test elsewhere); the unlabelled MVTec AD 2 splits
(test_private, test_private_mixed) are scored and written with null metrics. MVTec AD 2 and
MVTec LOCO calibrate each model's threshold on validation/good (docs/evaluation.md).
An unreadable image stops the run with one line naming it, e.g.
  error: image file D/bottle/test/good/001.png: cannot decode (UnidentifiedImageError: cannot identify
  image file). Remove or replace the file. Or pass --skip_bad_images to skip it (it is then listed as skipped).
With --skip_bad_images, unreadable test images are left out of the metrics, listed in scores.csv
with status "skipped: <reason>" and in result.json's skipped_images, and counted in a printed line
("bottle: 1 unreadable test images skipped (...)"). Training images cannot be skipped.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from protoad_jax import cli, datasets, distributed

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "mvtec", list(datasets.NAMES),
                  "Dataset layout, or a TFDS builder (pip install -e '.[tfds]').")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data folder (default ~/tensorflow_datasets).")
flags.DEFINE_string("tfds_manual_dir", None, "Where the downloaded archives/extracted folders are "
                    "(default <tfds_data_dir>/downloads/manual).")
flags.DEFINE_string("data_dir", None, "Dataset root (for folder: the folder with train/ and test/).")
flags.DEFINE_string("split", None, "The split to evaluate (datasets.SPLITS): for mvtec_ad2 test_public "
                    "(default, labelled), test_private or test_private_mixed (no labels: scored, no "
                    "metrics); the others have test only.")
flags.DEFINE_list("categories", ["all"], "Categories: all, or a comma-separated list.")
flags.DEFINE_string("weights", None, "Backbone .npz from `protoad convert-weights` "
                    "(default: the converted ImageNet file in the weights cache).")
flags.DEFINE_string("output_dir", None, "Where results go (default runs/<dataset>, or demo_output with --demo).")
flags.DEFINE_enum("clustering", "finch", ["finch", "kmeans"], "Prototype clustering.")
flags.DEFINE_integer("num_prototypes", None, lower_bound=0, help="K prototypes (FINCH: required number of clusters; 0 = take "
                     "FINCH level --finch_level). Default: evaluation.DEFAULT_K.")
flags.DEFINE_integer("finch_level", 0, lower_bound=0, help="FINCH partition level when --num_prototypes=0.")
flags.DEFINE_bool("finch_early_exit", True, "FINCH authors' ensure_early_exit (their default); "
                  "--nofinch_early_exit turns it off.")
flags.DEFINE_string("max_patches", "auto", "Subsample training patches to this many (seeded); 'all'; "
                    "'auto' = all on GPU/TPU, config.CPU_MAX_PATCHES on CPU.")
flags.DEFINE_enum("patch_sampler", "random", ["random", "coreset"], "How --max_patches are chosen: "
                  "uniform seeded sample, or greedy k-center coreset (PatchCore's).")
flags.DEFINE_integer("seed", 0, lower_bound=0, help="Seed for subsampling, k-means++ and the demo data.")
flags.DEFINE_enum("image_score", "smoothed_max", ["smoothed_max", "patch_max"], "Image score definition.")
flags.DEFINE_bool("normalize_prototypes", True, "L2-normalise prototypes (False: reference code's raw means).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Backbone compute dtype.")
flags.DEFINE_integer("batch_size", 8, "Images (tiles in the tiles view) per jitted call.", lower_bound=1)
flags.DEFINE_enum("view", "center_crop", ["center_crop", "full_frame", "tiles"],
                  "What is scored: the center crop (the reference code; the outer band is not "
                  "scored), the whole image resized (full_frame), or overlapping tiles (tiles).")
flags.DEFINE_integer("tile_size", 256, "tiles view: tile side in pixels.", lower_bound=1)
flags.DEFINE_integer("tile_overlap", 32, "tiles view: minimum overlap of neighbouring tiles in "
                     "pixels (< --tile_size).", lower_bound=0)
flags.DEFINE_integer("tile_image_size", None, "tiles view: first resize each image so its long "
                     "side is this many pixels (default: tile the original).", lower_bound=1)
flags.DEFINE_bool("save_raw_maps", False, "Save float32 maps as <category>/maps/<type>/<name>.npy.")
flags.DEFINE_bool("skip_bad_images", False, "Skip (and count) undecodable test images instead of failing.")
flags.DEFINE_bool("overwrite", False, "Redo categories that already have results.")
flags.DEFINE_bool("demo", False, "Generate a demo dataset and evaluate on it.")
flags.DEFINE_bool("allow_random_weights", False, "Run with a random-init backbone when no weights exist.")
flags.DEFINE_integer("num_overlays", 4, lower_bound=0, help="Overlays of the most and of the least anomalous test images.")
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
    cli.enable_compile_cache(FLAGS.compile_cache_dir)
    from protoad_jax import Config, evaluation, weights
    from protoad_jax.datasets import demo

    split = datasets.resolve_split(FLAGS.dataset, FLAGS.split)
    default_out = f"runs/{FLAGS.dataset}" + ("" if FLAGS.split is None else f"_{split}")
    out = Path(FLAGS.output_dir or ("demo_output" if FLAGS.demo else default_out))
    dataset, data_dir = FLAGS.dataset, FLAGS.data_dir
    if FLAGS.demo and distributed.process_count() > 1:
        raise cli.CommandError("--demo runs in one process; make the data with one --demo run, "
                               "then pass --dataset=mvtec --data_dir=<output_dir>/demo_data")
    if FLAGS.demo:
        dataset, data_dir = "mvtec", demo.make_demo_dataset(out / "demo_data", seed=FLAGS.seed)
    elif data_dir is None and not dataset.startswith("tfds:"):
        raise cli.CommandError("--data_dir is required (or use --demo)")
    k = FLAGS.num_prototypes
    config = Config(clustering=FLAGS.clustering, seed=FLAGS.seed, finch_level=FLAGS.finch_level,
                    finch_early_exit=FLAGS.finch_early_exit,
                    num_prototypes=(evaluation.DEFAULT_K if k is None else k or None),
                    max_patches=_max_patches(FLAGS.max_patches),
                    patch_sampler=FLAGS.patch_sampler, image_score=FLAGS.image_score,
                    normalize_prototypes=FLAGS.normalize_prototypes, dtype=FLAGS.dtype,
                    view=FLAGS.view, tile_size=FLAGS.tile_size, tile_overlap=FLAGS.tile_overlap,
                    tile_image_size=FLAGS.tile_image_size)
    backbone = weights.resolve_backbone(FLAGS.weights, config.arch, demo=FLAGS.demo,
                                           allow_random=FLAGS.allow_random_weights)
    return _run_all(dataset, data_dir, out, config, backbone, split)


def _max_patches(text: str):
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    if not text.isdigit() or int(text) < 1:
        raise cli.CommandError(f"--max_patches must be a positive integer, 'all' or 'auto'; got {text!r}")
    return int(text)


def _run_all(dataset, data_dir, out, config, backbone, split):
    from protoad_jax import evaluation

    names = datasets.list_categories(dataset, data_dir) if FLAGS.categories == ["all"] else FLAGS.categories
    # Several processes: categories round-robin; fewer categories than processes: each fitted by
    # all of them together (docs/distributed.md).
    count = distributed.process_count()
    joint = 1 < count and len(names) < count
    results = []
    for name in (names if count == 1 or joint else distributed.round_robin(names)):
        done = out / name / "result.json"
        exists = distributed.broadcast_json(done.exists()) if joint else done.exists()  # all agree
        if exists and not FLAGS.overwrite:
            kept = evaluation.load_result(done)
            if kept.get("split", "test") != split:
                raise cli.CommandError(f"{done} holds results of the {kept.get('split', 'test')} "
                                       f"split, not {split}; pass another --output_dir, or "
                                       "--overwrite to redo it")
            print(f"{name}: finished earlier, kept ({done}); --overwrite redoes it", flush=True)
            results.append(kept)
            continue
        print(f"== {name}", flush=True)
        try:
            results.append(evaluation.run_category(
                dataset, data_dir, name, out, config, backbone, split=split,
                batch_size=FLAGS.batch_size,
                save_raw_maps=FLAGS.save_raw_maps, skip_bad_images=FLAGS.skip_bad_images,
                num_overlays=FLAGS.num_overlays, progress=FLAGS.progress,
                tfds_data_dir=FLAGS.tfds_data_dir, tfds_manual_dir=FLAGS.tfds_manual_dir,
                across_processes=joint))
        except MemoryError as e:  # the fit's checks (or an allocation) found too little memory
            raise cli.CommandError.hinted(
                e, f"({name}) Pass --max_patches=N with a smaller N to fit on fewer patches, or a "
                "--num_prototypes equal to a FINCH level.") from e
        if results[-1]["skipped_images"] and (not joint or distributed.is_main()):
            print(f"{name}: {len(results[-1]['skipped_images'])} unreadable test images skipped "
                  f"(status column of {out / name / 'scores.csv'})", flush=True)
    if count > 1:  # process 0 merges once every process has finished its categories
        distributed.barrier("evaluate: every category finished")
        if not distributed.is_main():
            return
        results = [evaluation.load_result(out / name / "result.json") for name in names]
    run_settings = {**evaluation.settings(config, backbone.description), "dataset": dataset,
                    "split": split}
    summary = evaluation.summarize(results, out, run_settings, backbone.warnings)
    for w in backbone.warnings:
        print(w)
    print(evaluation.format_table(results, summary["mean"]))
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'report.html'}")
