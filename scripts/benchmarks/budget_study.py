"""The patch budget by measurement: random subsample vs greedy k-center coreset vs all patches.

For each category, method and budget: fit (FINCH, K = --num_prototypes, early exit on), score the
test images, and report image AUROC, pixel AUROC, AU-PRO and the fit time (features + sampling +
clustering), through the same evaluation.run_category that scripts/evaluate.py runs.

Categories: the demo dataset (demo_texture, demo_object; 12 training images = 37,632 patches each)
and "photo" (scikit-learn's sample photographs with painted holes, scratches and stains;
demo.make_photo_dataset; scikit-learn is in the [test] extra). Without --weights a random-init
backbone is used and said so.

Command (docs/evaluation.md's "Choosing the patch budget" table comes from it):
  python scripts/benchmarks/budget_study.py --budgets=5000,10000,20000 --output=runs/budget_study
Prints a markdown table, one row per (category, method, budget): category | patches | method |
image AUROC | pixel AUROC | AU-PRO | fit s; writes the table (with the backbone line) to
<output>/budget_study.md and the rows to <output>/budget_study.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("budgets", ["5000", "10000", "20000"], "Patch budgets (max_patches).")
flags.DEFINE_list("methods", ["random", "coreset"], "Patch samplers.")
flags.DEFINE_list("categories", ["demo_texture", "demo_object", "photo"], "Categories.")
flags.DEFINE_integer("num_prototypes", 1000, "FINCH required number of clusters K.")
flags.DEFINE_bool("all_patches", True, "Also fit on all patches (the reference row).")
flags.DEFINE_string("weights", None, "Backbone .npz (default: random-init backbone, stated).")
flags.DEFINE_string("output", "runs/budget_study", "Output folder.")
flags.DEFINE_integer("seed", 0, "Seed of the data, the samplers and the random backbone.")


def main(argv):
    del argv
    from protoad_jax import Config, evaluation, fileio, weights
    from protoad_jax.datasets import demo

    out = Path(FLAGS.output)
    data_root = out / "data"
    demo.make_demo_dataset(data_root, seed=FLAGS.seed)
    if demo.PHOTO in FLAGS.categories:
        from sklearn.datasets import load_sample_images

        demo.make_photo_dataset(data_root, load_sample_images().images, seed=FLAGS.seed)
    net = weights.resolve_backbone(FLAGS.weights, allow_random=True)
    runs = [(m, int(b)) for m in FLAGS.methods for b in FLAGS.budgets]
    if FLAGS.all_patches:
        runs.append(("all", None))
    rows = []
    header = ("| category | patches | method | image AUROC | pixel AUROC | AU-PRO | fit s |\n"
              "|---|---|---|---|---|---|---|")
    print(header)
    for category in FLAGS.categories:
        for method, budget in runs:
            config = Config(num_prototypes=FLAGS.num_prototypes, seed=FLAGS.seed,
                            max_patches=budget, patch_sampler="random" if method == "all" else method)
            t = time.perf_counter()
            row = evaluation.run_category("mvtec", data_root, category,
                                          out / f"{method}_{budget}", config, net,
                                          num_overlays=0, progress=False)
            seconds = time.perf_counter() - t
            r = {"category": category, "method": method, "patches": row["fit_info"]["num_patches"],
                     "image_auroc": row["image_auroc"], "pixel_auroc": row["pixel_auroc"],
                     "aupro": row["aupro"], "fit_s": row["seconds_fit_total"],
                     "finch_levels": row["fit_info"].get("finch_levels"), "total_s": round(seconds, 1)}
            rows.append(r)
            print(_line(r), flush=True)
    text = f"Backbone: {net.description}\n\n{header}\n" + "\n".join(map(_line, rows)) + "\n"
    fileio.atomic_write(out / "budget_study.md", lambda f: f.write(text), mode="w")
    fileio.atomic_write(out / "budget_study.json", lambda f: json.dump(rows, f, indent=1), mode="w")


def _line(r: dict) -> str:
    return (f"| {r['category']} | {r['patches']} | {r['method']} | {r['image_auroc']:.4f} | "
            f"{r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['fit_s']:.1f} |")


if __name__ == "__main__":
    sys.exit(app.run(main))
