"""head: the head alone, backbone stages -> patch map: the factored head
(``scoring.patch_scores_factored``, what the scoring path runs) and, as "before", the head on the
concatenated embedding (``features.embed`` + ``scoring.patch_scores``), both jitted with
``xla_cpu.compiler_options()`` as the pipeline's region, per image and vmapped per batch, against
torch F.normalize + conv2d 1x1 + max on the embedding, per K, plus the memory-bounded chunked
mode (``chunk_size``) with XLA's temp memory."""

from __future__ import annotations

import harness
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from harness import FLAGS, Table

from protoad_jax import features, scoring, xla_cpu
from protoad_jax.config import EMBED_LAYERS

flags.DEFINE_list("head_ks", ["100", "1000", "10000"], "head: prototype counts K.")
flags.DEFINE_list("head_chunked_ks", ["10000"], "head: K timed in chunked mode (jax only).")
flags.DEFINE_integer("chunk_size", 1024, "head: prototypes per chunk in chunked mode.")
flags.DEFINE_integer("head_batch", 8, "head: batch size of the vmapped head.")


def run() -> list[Table]:
    torch = harness.torch_threads()
    b = FLAGS.head_batch
    rng = np.random.default_rng(0)
    stages = [jnp.asarray(np.abs(rng.standard_normal((b, s, s, c), dtype=np.float32)))  # post-ReLU-like
              for s, c in ((56, 256), (28, 512), (14, 1024))]
    emb = jax.vmap(features.embed)(dict(zip(EMBED_LAYERS, stages)))
    emb_t = torch.from_numpy(np.asarray(emb).transpose(0, 3, 1, 2).copy())
    table = Table(f"head: backbone stages -> patch map, float32, threads={FLAGS.threads}",
                  ["K", "mode", "jax ms/img (b=1)", f"jax img/s (b={b})",
                   "before ms/img (b=1)", f"before img/s (b={b})", "torch ms/img (b=1)",
                   f"torch img/s (b={b})", "vs before b=1", f"vs before b={b}",
                   "vs torch b=1", f"vs torch b={b}", f"jax GFLOP/s (b={b})",
                   f"XLA temp MB (b={b})"])
    torch_times: dict[int, tuple[float, float]] = {}
    cases = [(int(k), None) for k in FLAGS.head_ks] + [
        (int(k), FLAGS.chunk_size) for k in FLAGS.head_chunked_ks]
    for k, chunk in cases:
        protos = jnp.asarray(harness.prototypes(k, seed=k))
        # default rows: the scoring path's defaults, factored "auto" against one matmul before
        one, batched, temp_mb = _compiled(_factored(chunk or scoring.AUTO), stages, protos)
        one_b, batched_b, _ = _compiled(_concatenated(chunk), stages, protos)
        fns = [one, one_b], [batched, batched_b]
        if chunk is None:  # jax, before and torch alternate
            t_one, t_batch = _head_torch(emb_t, protos)
            fns = [one, one_b, t_one], [batched, batched_b, t_batch]
        tj1, tb1, *tt1 = harness.medians(*fns[0])
        tjb, tbb, *ttb = harness.medians(*fns[1])
        if chunk is None:
            torch_times[k] = tt1[0], ttb[0]
        tt1, ttb = torch_times.get(k, (None, None))  # chunked rows: torch's full head
        flops = 2 * (56 * 56 * 256 + 28 * 28 * 512 + 14 * 14 * 1024) * k * b
        auto = scoring.resolve_chunk_size(scoring.AUTO, k)
        mode = f"default (auto: {'one matmul' if auto is None else f'chunks of {auto}'})"
        table.add(k, mode if chunk is None else f"chunked {chunk}", tj1 * 1e3, b / tjb,
                  tb1 * 1e3, b / tbb, tt1 and tt1 * 1e3, ttb and b / ttb, f"{tb1 / tj1:.2f}x",
                  f"{tbb / tjb:.2f}x", tt1 and f"{tt1 / tj1:.2f}x", ttb and f"{ttb / tjb:.2f}x",
                  flops / tjb / 1e9, temp_mb)
    table.notes += [
        ("default rows: each head as the scoring path runs it by default, the factored head with "
         f"chunk_size='auto' (chunks of {scoring.AUTO_CHUNK} above that many prototypes), "
         "before with one matmul (its default then); chunked rows: both with the same chunk."),
        (f"jax: jax.jit(scoring.patch_scores_factored) on the stages [56, 56, 256], "
         f"[28, 28, 512], [14, 14, 1024] per image and jax.jit(jax.vmap(...)) per batch; before: "
         f"the same on the concatenated embedding (features.embed, then scoring.patch_scores, "
         f"the head make_scorer ran before the factored head); compiler_options="
         f"{xla_cpu.compiler_options()} as in pipeline.py (AOT-compiled, blocked until ready); "
         "torch: 1 - max_k conv2d(F.normalize(x), P[:, :, None, None]) on the [1792, 56, 56] "
         "embedding under no_grad, NCHW (its concatenation is not timed)."),
        ("chunked: chunk_size=... scans prototype chunks with a running max, so the similarity "
         "block is never whole; torch columns of chunked rows are torch's full head at the same "
         "K. XLA temp MB = compiled.memory_analysis().temp_size_in_bytes of the factored head."),
        (f"median of up to {FLAGS.repeats} calls after warm-up, the heads' calls alternating "
         f"(2 once a measurement passes {FLAGS.budget_s:.0f} s); GFLOP/s counts the factored "
         "head's matmuls, 2 * (56^2 * 256 + 28^2 * 512 + 14^2 * 1024) * K per image "
         "(a quarter of the concatenated head's 2 * 3136 * 1792 * K)."),
    ]
    return [table.print()]


def _factored(chunk: int | None):
    return lambda s1, s2, s3, p: scoring.patch_scores_factored([s1, s2, s3], p, chunk)


def _concatenated(chunk: int | None):
    return lambda s1, s2, s3, p: scoring.patch_scores(
        features.embed(dict(zip(EMBED_LAYERS, (s1, s2, s3)))), p, chunk)


def _compiled(head, stages, protos):
    """Warmed-up calls ``(one image, the batch)`` of ``head`` jitted and the XLA temp MB of the
    batch."""
    options = xla_cpu.compiler_options()
    first = [s[0] for s in stages]
    one = jax.jit(head, compiler_options=options).lower(*first, protos).compile()
    batched = jax.jit(jax.vmap(head, in_axes=(0, 0, 0, None)), compiler_options=options).lower(
        *stages, protos).compile()
    calls = (lambda: one(*first, protos).block_until_ready(),
             lambda: batched(*stages, protos).block_until_ready())
    for call in calls:
        call()
    return *calls, batched.memory_analysis().temp_size_in_bytes / 2**20


def _head_torch(emb_t, protos):
    """Warmed-up calls ``(one image, the batch)`` of the reference head's patch-map part."""
    import torch
    import torch.nn.functional as F

    kernels = torch.tensor(protos)[:, :, None, None]  # a copy: protos may be read-only

    @torch.no_grad()
    def head(x):  # reference_head's first lines: F.normalize, 1x1 conv, max, 1 - x
        return 1 - torch.max(F.conv2d(F.normalize(x, dim=1), kernels), dim=1)[0]

    calls = (lambda: head(emb_t[:1]), lambda: head(emb_t))
    for call in calls:
        call()
    return calls
