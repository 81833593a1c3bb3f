"""scale: ``fit`` at MVTec's largest category size (391 training images = 1.23M patches) in a
fresh process: time per phase and peak RSS with the CPU default patch budget, and the memory of
extracting and holding all the patches."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import harness
from absl import flags
from harness import FLAGS, Table

from protoad_jax import Config, datasets, pipeline, weights
from protoad_jax import config as config_lib
from protoad_jax.datasets import demo

flags.DEFINE_integer("scale_images", 391, "scale: generated training images (391 = MVTec hazelnut).")


def run() -> list[Table]:
    table = Table(f"scale: fit on {FLAGS.scale_images} generated 256x256 images "
                  f"({FLAGS.scale_images * 3136:,} patches x 1792), threads={FLAGS.threads}",
                  ["case", "patches kept", "storage", "features s", "clustering s", "total s",
                   "peak RSS MB"])
    with tempfile.TemporaryDirectory() as tmp:
        root = demo.make_demo_dataset(Path(tmp), seed=0, n_train=FLAGS.scale_images, n_test_good=0,
                                      n_test_bad=0, categories=("demo_object",))
        cases = [("fit, default (CPU 'auto' budget), FINCH K=1000", "auto", False),
                 ("patch extraction only, all patches kept", None, True)]
        for name, budget, extract_only in cases:
            r = harness.run_case(__name__, {"root": str(root), "max_patches": budget,
                                            "extract_only": extract_only})
            if "error" in r:
                table.add(name, r["error"], "", "", "", "", "")
                continue
            table.add(name, r["num_patches"], r["patch_dtype"], r["seconds_features"],
                      r["seconds_clustering"] if r["seconds_clustering"] is not None else "—",
                      r["total_s"], r["peak_mb"])
    table.notes += [
        (f"random-init backbone (speed and memory do not depend on weights); CPU 'auto' budget = "
         f"config.CPU_MAX_PATCHES = {config_lib.CPU_MAX_PATCHES:,} seeded patches; patches are "
         "stored float16 above 4 GiB of float32 (pipeline.FLOAT16_PATCHES_ABOVE_BYTES)."),
        ("exact FINCH over all 1.23M patches is not run on this CPU: see the cluster table's "
         "projection; the second row shows the memory of holding all of them."),
        "peak RSS = the subprocess's VmHWM (JAX runtime + backbone + patches + clustering).",
    ]
    return [table.print()]


def case(spec: dict) -> dict:
    """fit() (or only its patch extraction) on the generated training images of ``spec["root"]``,
    run by ``harness.run_case`` in a fresh process."""
    paths = datasets.find_images(Path(spec["root"]) / "demo_object" / "train" / "good")
    net = weights.random_backbone("wide_resnet50_2", "benchmark")
    config = Config(max_patches=spec["max_patches"])
    t = time.perf_counter()
    if spec["extract_only"]:
        patches = pipeline.extract_patches(paths, net.variables, config, progress=False)
        info = {"num_patches": len(patches), "patch_dtype": patches.dtype.name,
                "seconds_features": time.perf_counter() - t, "seconds_clustering": None}
    else:
        info = pipeline.fit(paths, config=config, variables=net.variables, progress=False).info
    return dict(total_s=time.perf_counter() - t, **info)
