"""The nearest-prototype index map's cost: the plain head against the head with the argmax
beside the max, side by side in one run.

Both are ``scoring.patch_scores_factored`` (the scoring path's head, ``chunk_size="auto"``),
jitted with ``xla_cpu.compiler_options()`` and vmapped over a batch of post-ReLU-like random
stages ([56, 56, 256], [28, 28, 512], [14, 14, 1024]); "plain" is what ``make_scorer`` runs,
"index map" is ``nearest=True`` (what ``explain.nearest_maps`` runs). Also the whole scoring
region (``pipeline.scoring_function`` with and without ``nearest``, random-init backbone) at
one K. Calls alternate (``harness.medians``), so both see the same background load.

Command (docs/update.md's "Speed of the index map" table comes from it):
  python scripts/benchmarks/explain.py --explain_ks=100,1000,4000 --head_batch=8
Prints one markdown table: K | part | plain ms/img | index map ms/img | index map / plain.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run from anywhere

import harness
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from harness import FLAGS, Table

from protoad_jax import Config, pipeline, scoring, weights, xla_cpu

flags.DEFINE_list("explain_ks", ["100", "1000", "4000"], "Prototype counts K of the head rows.")
flags.DEFINE_integer("explain_region_k", 1000, "K of the whole-region row (0: skip it).")
flags.DEFINE_integer("head_batch", 8, "Images per vmapped call.")


def run() -> list[Table]:
    b = FLAGS.head_batch
    rng = np.random.default_rng(0)
    stages = [jnp.asarray(np.abs(rng.standard_normal((b, s, s, c), dtype=np.float32)))
              for s, c in ((56, 256), (28, 512), (14, 1024))]
    table = Table(f"index map cost, float32, batch {b}, threads={FLAGS.threads}",
                  ["K", "part", "plain ms/img", "index map ms/img", "index map / plain"])
    options = xla_cpu.compiler_options()
    for k in map(int, FLAGS.explain_ks):
        protos = jnp.asarray(harness.prototypes(k, seed=k))
        calls = []
        for nearest in (False, True):
            head = jax.jit(jax.vmap(
                lambda s1, s2, s3, p, nearest=nearest: scoring.patch_scores_factored(
                    [s1, s2, s3], p, scoring.AUTO, nearest=nearest), in_axes=(0, 0, 0, None)),
                compiler_options=options).lower(*stages, protos).compile()
            calls.append(lambda head=head, protos=protos: jax.block_until_ready(head(*stages, protos)))
            calls[-1]()
        plain, indexed = harness.medians(*calls)
        table.add(k, "head (stages -> patch map)", plain / b * 1e3, indexed / b * 1e3,
                  f"{indexed / plain:.3f}x")
    if FLAGS.explain_region_k:
        k = FLAGS.explain_region_k
        variables = weights.random_variables("wide_resnet50_2")
        protos = jnp.asarray(harness.prototypes(k, seed=k))
        images = jnp.asarray(harness.images(b))
        calls = []
        for nearest in (False, True):
            fn = pipeline.scoring_function(Config(), nearest=nearest)
            calls.append(lambda fn=fn: jax.block_until_ready(fn(variables, protos, images)))
            calls[-1]()
        plain, indexed = harness.medians(*calls)
        table.add(k, "scoring region (backbone + head + upsample + blur)", plain / b * 1e3,
                  indexed / b * 1e3, f"{indexed / plain:.3f}x")
    table.notes += [
        (f"median of up to {FLAGS.repeats} alternating calls after warm-up; chunk_size='auto' "
         f"(chunks of {scoring.AUTO_CHUNK} above that many prototypes, a running argmax beside "
         "the running max); compiler options as pipeline.py.")]
    return [table.print()]


def main(argv):
    del argv
    harness.setup()
    run()


if __name__ == "__main__":
    app.run(main)
