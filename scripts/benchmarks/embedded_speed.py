"""make_scorer as a user's program gets it vs the XLA settings around it, each in a fresh process.

Variants (same random-init wide_resnet50_2, K prototypes, batch, images; fresh process each):
  library       ``import protoad_jax`` and ``make_scorer``, nothing else: the library's
                per-computation XLA:CPU options (``protoad_jax.xla_cpu``) apply.
  process_flag  ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (what the scripts set before
                the options moved into the library; the library then leaves XLA_FLAGS in charge).
  xla_default   ``XLA_FLAGS`` naming XLA:CPU's default library fusions (jaxlib 0.10: dot and
                convolution), i.e. the code a library user got before.
Each process (harness.run_case) also times the PyTorch reference (tests/torch_reference.py) on
the same batch, alternating calls with JAX, so each row has its own ratio. Rounds alternate the
variants, so that all see the same background load; medians over rounds are printed.

Command (about 40 s per process on a 2-core CPU):
  python scripts/benchmarks/embedded_speed.py --rounds=5 --batch=8 --k=1000
Prints a line per process to stderr (round, variant, JAX and torch img/s), then a markdown table:
variant | XLA_FLAGS | JAX img/s | torch img/s | JAX / torch | JAX img/s per round.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import harness
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Fresh processes per variant (alternating variants).")
flags.DEFINE_integer("batch", 8, "Images per scorer call.")
flags.DEFINE_integer("k", 1000, "Prototypes.")
flags.DEFINE_list("variants", ["library", "process_flag", "xla_default"], "Variants to run.")

YNN = "--xla_cpu_experimental_ynn_fusion_type="
VARIANT_XLA_FLAGS = {
    "library": None,
    "process_flag": YNN,
    "xla_default": YNN + "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def case(spec: dict) -> dict:
    """One variant's process (its XLA_FLAGS set by the parent): JAX and torch images/s."""
    import jax

    import protoad_jax
    from protoad_jax import backbone

    reference = harness.torch_reference()
    torch = harness.torch_threads()
    batch, config = spec["batch"], protoad_jax.Config(num_prototypes=spec["k"], arch=FLAGS.arch)
    tmodel, variables = harness.models()
    variables = backbone.fold_batchnorm(variables)  # as weights.load_backbone does
    protos = harness.prototypes(config.num_prototypes)
    score = protoad_jax.make_scorer(protoad_jax.Model(protos, config), variables)
    x = harness.images(batch, config.image_size)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def run_jax():
        jax.block_until_ready(score(x))

    def run_torch():
        reference.reference_scores(tmodel, protos, xt, out_size=config.image_size, sigma=config.sigma)

    t = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t
    run_torch()
    tj, tt = harness.timed([run_jax, run_torch], spec["repeats"])
    return {"jax_img_s": batch / statistics.median(tj), "torch_img_s": batch / statistics.median(tt),
            "first_call_s": compile_s, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv):
    del argv
    unknown = set(FLAGS.variants) - set(VARIANT_XLA_FLAGS)
    if unknown:
        raise app.UsageError(f"unknown variants {sorted(unknown)}; expected {list(VARIANT_XLA_FLAGS)}")
    harness.setup()
    results: dict[str, list[dict]] = {v: [] for v in FLAGS.variants}
    for r in range(FLAGS.rounds):
        for v in FLAGS.variants:
            env = {key: val for key, val in os.environ.items() if key != "XLA_FLAGS"}
            if VARIANT_XLA_FLAGS[v] is not None:
                env["XLA_FLAGS"] = VARIANT_XLA_FLAGS[v]
            res = harness.run_case("embedded_speed", {"variant": v, "batch": FLAGS.batch,
                                                      "k": FLAGS.k, "repeats": FLAGS.repeats}, env=env)
            if "error" in res:
                sys.exit(f"{v} failed: {res['error']}")
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
