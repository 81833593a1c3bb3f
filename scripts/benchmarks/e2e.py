"""e2e: the full scoring path, preprocessed batch -> (maps, scores): ``make_scorer`` (jitted,
blocked until ready) against ``torch_reference.reference_scores``, same weights, prototypes,
images, batch and threads; batch-1 latency, images/s per batch size, compile time apart, and
the compilations during the timed calls (expected: none)."""

from __future__ import annotations

import functools

import harness
import jax
import numpy as np
from absl import flags
from harness import COMPILE_LOG, FLAGS, Table

from protoad_jax import pipeline
from protoad_jax.config import Config

flags.DEFINE_list("e2e_ks", ["1000", "100"], "e2e: prototype counts K timed.")
flags.DEFINE_list("e2e_batch_sizes", ["8", "32"], "e2e: batch sizes timed for images/s.")
flags.DEFINE_integer("latency_repeats", 10, "e2e: batch-1 calls timed for p50/p90 latency.")


def run(results: dict | None = None) -> list[Table]:
    """Prints and returns the e2e table; stores ``results[("e2e_img_s", K, batch)]`` (img/s)."""
    torch = harness.torch_threads()
    ks = list(dict.fromkeys(int(k) for k in FLAGS.e2e_ks))
    sizes = sorted(set(map(int, FLAGS.e2e_batch_sizes)))
    images = harness.images(max([*sizes, 1]))
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    table = Table(f"e2e: preprocessed batch -> (maps, scores), 224x224, float32, "
                  f"threads={FLAGS.threads}",
                  ["K", "measure", "protoad_jax", "before: concatenated head", "torch reference",
                   "vs before", "jax speed-up", "jax compile s"])
    recompiles, cache_note, names = 0, [], []
    for k in ks:
        before = len(COMPILE_LOG.names)
        n, note = _one_k(table, k, sizes, images, images_t, results)
        recompiles += n
        cache_note.append(note)
        names += COMPILE_LOG.names[before:][-n:] if n else []
    table.notes += [
        (f"recompiles after warm-up: {recompiles} (compilations in JAX's compile log during all "
         f"timed calls); _score_fn jit cache entries {', '.join(cache_note)}"),
        ("protoad_jax: make_scorer(model, variables)(images) -> (maps, scores), "
         "jax.block_until_ready; includes check_images (host finite check). before: the same "
         "scoring path with the head on the concatenated [56, 56, 1792] embedding "
         "(pipeline.scoring_function(config, None, factored=False): one matmul, what make_scorer ran before the "
         "factored head), called on the same device arrays; vs before = before time / "
         "protoad_jax time. torch: "
         "torch_reference.reference_scores (no_grad trunk, F.normalize, conv2d 1x1, max, "
         "cv2.resize INTER_LINEAR, scipy gaussian_filter sigma 4) on NCHW tensors."),
        (f"latency over up to {FLAGS.latency_repeats} calls; images/s = batch / median of up to "
         f"{FLAGS.repeats} calls after warm-up (2 once a measurement passes "
         f"{FLAGS.budget_s:.0f} s), jax and torch calls alternating; jax speed-up = torch time "
         "/ jax time; compile s = trace + lower + XLA compile seconds from JAX's compile log "
         "(first call, reported apart)."),
    ]
    if recompiles:
        table.notes.append(f"WARNING: recompilation during the timed part ({', '.join(names)}); "
                           "the timings include it.")
    return [table.print()]


def _one_k(table: Table, k: int, sizes: list[int], images, images_t,
           results: dict | None) -> tuple[int, str]:
    """Times one K; returns (compilations during the timed calls, jit cache note)."""
    torch_reference = harness.torch_reference()
    tmodel, variables = harness.models()
    config = Config(num_prototypes=k, arch=FLAGS.arch)
    model = pipeline.Model(harness.prototypes(k), config)
    scorer = pipeline.make_scorer(model, variables)
    # the jitted function make_scorer calls, for its cache size
    jitted = pipeline.scoring_function(config)
    _, rep_vars, rep_protos = pipeline.scoring_parts(model, variables)
    before = pipeline.scoring_function(config, None, factored=False)  # what make_scorer ran before
    images_d = jax.device_put(images)

    def run_jax(b):
        return jax.block_until_ready(scorer(images[:b]))

    def run_before(b):
        return jax.block_until_ready(before(rep_vars, rep_protos, images_d[:b]))

    def run_torch(b):
        return torch_reference.reference_scores(tmodel, model.prototypes, images_t[:b],
                                                out_size=config.image_size, sigma=config.sigma)

    compile_s = {}
    for b in [1, *sizes]:  # warm-up: compile every batch shape, run torch once
        c0 = COMPILE_LOG.snapshot()[1]
        run_jax(b)
        compile_s[b] = COMPILE_LOG.snapshot()[1] - c0
        run_before(b)
        run_torch(b)
    entries = jitted._cache_size()
    n0 = COMPILE_LOG.snapshot()[0]
    lat_j, lat_b, lat_t = np.array(harness.timed(
        [lambda: run_jax(1), lambda: run_before(1), lambda: run_torch(1)],
        FLAGS.latency_repeats, FLAGS.budget_s)) * 1e3
    for q in (50, 90):
        pj, pb, pt = (np.percentile(x, q) for x in (lat_j, lat_b, lat_t))
        table.add(k, f"batch 1 latency p{q} ms", pj, pb, pt, f"{pb / pj:.2f}x", f"{pt / pj:.2f}x",
                  compile_s[1] if q == 50 else None)
    for b in sizes:
        tj, tb, tt = harness.medians(functools.partial(run_jax, b), functools.partial(run_before, b),
                                     functools.partial(run_torch, b))
        table.add(k, f"batch {b} img/s", b / tj, b / tb, b / tt, f"{tb / tj:.2f}x",
                  f"{tt / tj:.2f}x", compile_s[b])
        if results is not None:
            results[("e2e_img_s", k, b)] = b / tj
    return COMPILE_LOG.snapshot()[0] - n0, f"K={k}: {entries} -> {jitted._cache_size()}"
