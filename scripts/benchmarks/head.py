"""head: the head alone, embedding [56, 56, 1792] -> patch map (``scoring.patch_scores``,
jitted with ``xla_cpu.compiler_options()`` as the pipeline's region, per image and vmapped per
batch) against torch F.normalize + conv2d 1x1 + max, per K, plus the memory-bounded chunked mode
(``chunk_size``) with XLA's temp memory."""

from __future__ import annotations

import functools

import harness
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from harness import FLAGS, C, Table

from protoad_jax import scoring, xla_cpu

flags.DEFINE_list("head_ks", ["100", "1000", "10000"], "head: prototype counts K.")
flags.DEFINE_list("head_chunked_ks", ["10000"], "head: K timed in chunked mode (jax only).")
flags.DEFINE_integer("chunk_size", 1024, "head: prototypes per chunk in chunked mode.")
flags.DEFINE_integer("head_batch", 8, "head: batch size of the vmapped head.")


def run() -> list[Table]:
    torch = harness.torch_threads()
    b = FLAGS.head_batch
    rng = np.random.default_rng(0)
    emb = np.abs(rng.standard_normal((b, 56, 56, C), dtype=np.float32))  # post-ReLU-like
    emb_t = torch.from_numpy(emb.transpose(0, 3, 1, 2).copy())
    emb_j = jnp.asarray(emb)
    table = Table(f"head: embedding [56, 56, {C}] -> patch map, float32, threads={FLAGS.threads}",
                  ["K", "mode", "jax ms/img (b=1)", f"jax img/s (b={b})", "torch ms/img (b=1)",
                   f"torch img/s (b={b})", "speed-up b=1", f"speed-up b={b}",
                   f"jax GFLOP/s (b={b})", f"XLA temp MB (b={b})"])
    torch_times: dict[int, tuple[float, float]] = {}
    unreported = False  # a full head whose XLA temp memory reads 0
    cases = [(int(k), None) for k in FLAGS.head_ks] + [
        (int(k), FLAGS.chunk_size) for k in FLAGS.head_chunked_ks]
    for k, chunk in cases:
        protos = harness.prototypes(k, seed=k)
        one, batched, temp_mb = _head_jax(emb_j, jnp.asarray(protos), chunk)
        if chunk is None:  # jax and torch alternate
            t_one, t_batch = _head_torch(emb_t, protos)
            tj1, tt1 = harness.medians(one, t_one)
            tjb, ttb = harness.medians(batched, t_batch)
            torch_times[k] = tt1, ttb
            unreported |= temp_mb == 0
        else:  # torch has no chunked mode: compared with its full head at the same K
            (tj1,), (tjb,) = harness.medians(one), harness.medians(batched)
        tt1, ttb = torch_times.get(k, (None, None))
        flops = 2 * 56 * 56 * C * k * b
        table.add(k, "full" if chunk is None else f"chunked {chunk}", tj1 * 1e3, b / tjb,
                  tt1 and tt1 * 1e3, ttb and b / ttb, tt1 and f"{tt1 / tj1:.2f}x",
                  ttb and f"{ttb / tjb:.2f}x", flops / tjb / 1e9, temp_mb)
    if unreported:
        table.notes.append(
            "XLA temp MB 0 for a full head: XLA fused the matmul and the max over K into one "
            "library (YNNPACK) fusion whose buffers are not reported (seen in the compiled HLO); "
            "without it the [b, 56, 56, K] similarities are materialised.")
    table.notes += [
        (f"protoad_jax: jax.jit(scoring.patch_scores) per image and jax.jit(jax.vmap("
         f"patch_scores, in_axes=(0, None))) per batch, compiler_options="
         f"{xla_cpu.compiler_options()} as in pipeline.py (AOT-compiled, blocked until ready); "
         "torch: 1 - max_k conv2d(F.normalize(x), P[:, :, None, None]) under no_grad, NCHW."),
        ("chunked: patch_scores(chunk_size=...) scans prototype chunks with a running max, so "
         "the [56, 56, K] similarity block is never whole; speed-up for chunked rows is against "
         "torch's full head at the same K. XLA temp MB = "
         "compiled.memory_analysis().temp_size_in_bytes."),
        (f"median of up to {FLAGS.repeats} calls after warm-up, jax and torch calls alternating "
         f"(2 once a measurement passes {FLAGS.budget_s:.0f} s); GFLOP/s counts "
         "2 * 3136 * 1792 * K per image (the matmul)."),
    ]
    return [table.print()]


def _head_jax(emb, protos, chunk: int | None):
    """Warmed-up calls ``(one image, the batch)`` of the jitted ``patch_scores`` and the XLA temp
    MB of the batch."""
    head = functools.partial(scoring.patch_scores, chunk_size=chunk)
    options = xla_cpu.compiler_options()
    one = jax.jit(head, compiler_options=options).lower(emb[0], protos).compile()
    batched = jax.jit(jax.vmap(head, in_axes=(0, None)), compiler_options=options).lower(
        emb, protos).compile()
    calls = (lambda: one(emb[0], protos).block_until_ready(),
             lambda: batched(emb, protos).block_until_ready())
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
