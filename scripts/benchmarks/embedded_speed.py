"""make_scorer as a user's program gets it vs the XLA settings around it, each in a fresh process.

Variants (same random-init wide_resnet50_2, K prototypes, batch, images; fresh process each):
  library       ``import protoad_jax`` and ``make_scorer``, nothing else: the library's
                per-computation XLA:CPU options (``protoad_jax.xla_cpu``) apply.
  process_flag  ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (what the scripts set before
                the options moved into the library; the library then leaves XLA_FLAGS in charge).
  xla_default   ``XLA_FLAGS`` naming XLA:CPU's default library fusions (jaxlib 0.10: dot and
                convolution), i.e. the code a library user got before.
Each process also times the PyTorch reference (scripts/torch_reference.py) on the same batch,
alternating calls with JAX, so each row has its own ratio. Rounds alternate the variants, so
that all see the same background load; medians over rounds are printed.

Command (about 40 s per process on a 2-core CPU):
  python scripts/embedded_speed.py --rounds=5 --batch=8 --k=1000
Prints a markdown table: variant, JAX img/s, torch img/s, JAX / torch, per-round JAX img/s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Fresh processes per variant (alternating variants).")
flags.DEFINE_integer("batch", 8, "Images per scorer call.")
flags.DEFINE_integer("k", 1000, "Prototypes.")
flags.DEFINE_integer("repeats", 3, "Timed calls per process after warm-up (median).")
flags.DEFINE_list("variants", ["library", "process_flag", "xla_default"], "Variants to run.")
flags.DEFINE_string("child", None, "Internal: run one variant in this process.")

YNN = "--xla_cpu_experimental_ynn_fusion_type="
VARIANT_XLA_FLAGS = {
    "library": None,
    "process_flag": YNN,
    "xla_default": YNN + "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def child(batch: int, k: int, repeats: int) -> dict:
    import jax
    import numpy as np
    import torch
    import torchvision
    from flax import traverse_util

    import protoad_jax
    from protoad_jax import backbone, scoring, weights

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_reference

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    tmodel = torchvision.models.wide_resnet50_2().eval()
    sd = {n: v.numpy() for n, v in tmodel.state_dict().items()}
    variables = traverse_util.unflatten_dict(weights.to_flax(sd), sep="/")
    variables = backbone.fold_batchnorm(jax.device_put(variables))  # as load_backbone does
    rng = np.random.default_rng(0)
    protos = np.asarray(scoring.prepare_prototypes(
        rng.standard_normal((k, 1792), dtype=np.float32), normalize=True))
    model = protoad_jax.Model(protos, protoad_jax.Config(num_prototypes=k))
    score = protoad_jax.make_scorer(model, variables)
    x = rng.standard_normal((batch, 224, 224, 3), dtype=np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def run_jax():
        jax.block_until_ready(score(x))

    def run_torch():
        torch_reference.reference_scores(tmodel, protos, xt, out_size=224, sigma=4.0)

    t = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t
    run_torch()
    tj, tt = [], []
    for _ in range(repeats):
        for fn, ts in ((run_jax, tj), (run_torch, tt)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return {"jax_img_s": batch / statistics.median(tj), "torch_img_s": batch / statistics.median(tt),
            "first_call_s": compile_s, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv):
    del argv
    if FLAGS.child:
        print("RESULT " + json.dumps(child(FLAGS.batch, FLAGS.k, FLAGS.repeats)), flush=True)
        return
    unknown = set(FLAGS.variants) - set(VARIANT_XLA_FLAGS)
    if unknown:
        raise app.UsageError(f"unknown variants {sorted(unknown)}; expected {list(VARIANT_XLA_FLAGS)}")
    results: dict[str, list[dict]] = {v: [] for v in FLAGS.variants}
    for r in range(FLAGS.rounds):
        for v in FLAGS.variants:
            env = {key: val for key, val in os.environ.items() if key != "XLA_FLAGS"}
            if VARIANT_XLA_FLAGS[v] is not None:
                env["XLA_FLAGS"] = VARIANT_XLA_FLAGS[v]
            cmd = [sys.executable, __file__, f"--child={v}", f"--batch={FLAGS.batch}",
                   f"--k={FLAGS.k}", f"--repeats={FLAGS.repeats}"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{v} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            results[v].append(res)
            print(f"round {r + 1}/{FLAGS.rounds} {v}: jax {res['jax_img_s']:.2f} img/s, "
                  f"torch {res['torch_img_s']:.2f} img/s", file=sys.stderr, flush=True)
    print(f"\n### make_scorer in a fresh process, batch {FLAGS.batch}, K = {FLAGS.k}, float32, "
          f"{len(os.sched_getaffinity(0))} threads; medians of {FLAGS.rounds} processes\n")
    print("| variant | XLA_FLAGS | JAX img/s | torch img/s | JAX / torch | JAX img/s per round |")
    print("|---|---|---|---|---|---|")
    for v, rows in results.items():
        j = statistics.median(r["jax_img_s"] for r in rows)
        t = statistics.median(r["torch_img_s"] for r in rows)
        ratio = statistics.median(r["jax_img_s"] / r["torch_img_s"] for r in rows)
        per = ", ".join(f"{r['jax_img_s']:.2f}" for r in rows)
        print(f"| {v} | `{rows[0]['xla_flags'] or '(unset)'}` | {j:.2f} | {t:.2f} | {ratio:.2f}x | {per} |")


if __name__ == "__main__":
    app.run(main)
