"""Time an exported scorer in a fresh process, and optionally compare it with the live scorer.

Commands (D written by ``python scripts/export.py --model=M.npz --output=D``):
  python scripts/benchmarks/time_exported.py --exported=D
  python scripts/benchmarks/time_exported.py --exported=D --model=M.npz --allow_random_weights --batch_size=8

Prints one line each: the files and their sizes; import and load time (checks, sha256,
deserialize, weights to the device); the first call at --batch_size (compile + run) and the
median of --repeats further calls; peak RSS and whether Flax was imported until then; with
--model, the max abs difference of maps and scores from make_scorer on the same random batch.
"""

from __future__ import annotations

import resource
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("exported", None, "Directory written by scripts/export.py.", required=True)
flags.DEFINE_integer("batch_size", 1, "Images per call.")
flags.DEFINE_integer("repeats", 3, "Calls timed after the first.")
flags.DEFINE_string("model", None, "Model .npz to compare with (loads Flax, after the timings).")
flags.DEFINE_string("weights", None, "Backbone .npz for --model (default: the one it records).")
flags.DEFINE_bool("allow_random_weights", False, "Accept a --model fitted with a random-init backbone.")


def main(argv):
    del argv
    t0 = time.perf_counter()
    import jax
    import numpy as np

    import protoad_jax

    t1 = time.perf_counter()
    scorer, manifest = protoad_jax.load_exported(FLAGS.exported)
    t2 = time.perf_counter()
    size = manifest["input"]["shape"][1]
    x = np.random.default_rng(0).normal(size=(FLAGS.batch_size, size, size, 3)).astype(np.float32)
    got = jax.block_until_ready(scorer(x))
    t3 = time.perf_counter()
    times = []
    for _ in range(FLAGS.repeats):
        t = time.perf_counter()
        jax.block_until_ready(scorer(x))
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    files = ", ".join(f"{f['name']} {f['bytes'] / 1e6:.1f} MB" for f in manifest["files"].values())
    print(f"{FLAGS.exported}: {files}; platforms {','.join(manifest['jax_export']['platforms'])}; "
          f"{jax.devices()[0].device_kind}")
    print(f"import {t1 - t0:.2f} s, load_exported {t2 - t1:.2f} s")
    print(f"batch {FLAGS.batch_size}: first call (compile + run) {t3 - t2:.2f} s, then median "
          f"{np.median(times):.3f} s per call over {FLAGS.repeats}")
    print(f"peak RSS {rss:.0f} MiB; flax imported: {'flax' in sys.modules}")
    if FLAGS.model:
        from protoad_jax import weights

        model = protoad_jax.load_model(FLAGS.model)
        net = weights.backbone_for_model(model, FLAGS.weights, allow_random=FLAGS.allow_random_weights)
        want = protoad_jax.make_scorer(model, net.variables)(x)
        diffs = [float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(got, want)]
        same = all(np.array_equal(g, w) for g, w in zip(got, want))
        print(f"vs live make_scorer: max abs difference maps {diffs[0]:.3g}, scores {diffs[1]:.3g} "
              f"({'bit for bit' if same else 'not bitwise equal'})")


if __name__ == "__main__":
    sys.exit(app.run(main))
