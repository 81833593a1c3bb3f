"""Scoring path on the accelerator vs the PyTorch reference on the same device, float32 and bfloat16.

protoad_jax: ``make_scorer`` (one jitted region, JAX's default device, outputs blocked until
ready). PyTorch reference (tests/torch_reference.py, the published code's path): torchvision
trunk + F.normalize + 1x1 conv + max on torch's device (cuda when available), then, as the
published code does, ``.cpu()``, cv2 resize and scipy blur per image on the host. bfloat16:
``Config(dtype="bfloat16")`` (backbone in bfloat16, head in float32) against the torch trunk under
``torch.autocast(bfloat16)`` and the head in float32. Same random-init weights (harness.models;
BatchNorm folded for JAX, as ``weights.load_backbone`` does), prototypes and images; JAX and torch
calls alternate, medians reported; "max |map diff|" compares the two sides' 224x224 maps.

Command (device_check.sh runs it on a GPU):
  python scripts/benchmarks/device_e2e.py --batch_sizes=1,8,64 --dtypes=float32,bfloat16 --k=1000
Prints a line per (dtype, batch) to stderr as it goes, then one markdown table (dtype, batch, ms
per batch and images/s of each side, JAX speed-up, JAX first-call seconds, max |map diff|);
--output=FILE also appends it to FILE.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch

import harness
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Batch sizes.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the backbone.")
flags.DEFINE_integer("k", 1000, "Prototypes.")
flags.DEFINE_string("output", None, "Markdown file to append the table to.")
FLAGS.set_default("repeats", 10)  # harness's --repeats and --budget_s: calls are short on a GPU
FLAGS.set_default("budget_s", 30.0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    harness.setup()
    import jax
    import numpy as np
    import torch

    import protoad_jax
    from protoad_jax import backbone

    reference = harness.torch_reference()
    tdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmodel, variables = harness.models()
    variables = backbone.fold_batchnorm(variables)
    tmodel = tmodel.to(tdev)
    protos = harness.prototypes(FLAGS.k)
    sizes = sorted(map(int, FLAGS.batch_sizes))
    images = harness.images(max(sizes))
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(tdev)

    def run_torch(b: int, dtype: str):
        with torch.autocast(tdev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            emb = reference.reference_embed(tmodel, images_t[:b])
        return reference.reference_head(emb.float(), protos)[1]  # maps on the host

    jdev, tname = jax.devices()[0], (torch.cuda.get_device_name() if tdev.type == "cuda" else "cpu")
    lines = [
        (f"### scoring path on {jdev.device_kind} ({jdev.platform}): protoad_jax vs PyTorch "
         f"reference on {tname}, K = {FLAGS.k}, 224x224"),
        "",
        ("| dtype | batch | jax ms | jax img/s | torch ms | torch img/s | jax speed-up | "
         "jax first call s | max abs map diff |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in FLAGS.dtypes:
        model = protoad_jax.Model(protos, protoad_jax.Config(num_prototypes=FLAGS.k, dtype=dtype,
                                                            arch=FLAGS.arch))
        score = protoad_jax.make_scorer(model, variables)
        for b in sizes:
            x = jax.device_put(images[:b])
            t = time.perf_counter()
            maps = np.asarray(jax.block_until_ready(score(x))[0])
            first = time.perf_counter() - t
            diff = float(np.abs(maps - run_torch(b, dtype)).max())
            mj, mt = harness.medians(lambda: jax.block_until_ready(score(x)),  # noqa: B023
                                     lambda: run_torch(b, dtype))  # noqa: B023
            lines.append(f"| {dtype} | {b} | {mj * 1e3:.1f} | {b / mj:.1f} | {mt * 1e3:.1f} | "
                         f"{b / mt:.1f} | {mt / mj:.2f}x | {first:.1f} | {diff:.2g} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += [
        "",
        (f"- medians of up to {FLAGS.repeats} alternating calls after warm-up; jax first call = "
         "compile + run; torch: default cuDNN settings, post-processing (cv2 resize, scipy blur) "
         "on the host as in the published code; jax outputs stay on the device."),
        (f"- jax {jax.__version__}, torch {torch.__version__}; random-init weights and prototypes "
         "(speed does not depend on their values)."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
