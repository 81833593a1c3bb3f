"""backbone: the Flax WideResNet (to layer3, BatchNorm folded and compiled with
``xla_cpu.compiler_options()``, as the pipeline runs it) against torchvision's trunk, same
weights, batch and threads."""

from __future__ import annotations

import functools
import time

import harness
import jax
import jax.numpy as jnp
from absl import flags
from harness import FLAGS, Table

from protoad_jax import backbone, xla_cpu

flags.DEFINE_list("batch_sizes", ["1", "8"], "backbone: batch sizes to time.")


def run() -> list[Table]:
    torch = harness.torch_threads()
    tmodel, variables = harness.models()
    variables = backbone.fold_batchnorm(variables)  # as weights.load_backbone runs it
    net = backbone.ResNet(arch=FLAGS.arch, folded=True)
    fn = jax.jit(lambda v, x: net.apply(v, x)["layer3"], compiler_options=xla_cpu.compiler_options())

    table = Table(f"backbone: {FLAGS.arch} to layer3, 224x224, float32, threads={FLAGS.threads}",
                  ["batch", "jax img/s", "torch img/s", "jax speed-up", "jax compile s"])
    for b in map(int, FLAGS.batch_sizes):
        x = harness.images(b, seed=b)
        xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        t = time.perf_counter()
        fn(variables, xj).block_until_ready()
        compile_s = time.perf_counter() - t
        harness.torch_trunk(tmodel, xt)
        tj, tt = harness.medians(
            functools.partial(lambda x: fn(variables, x).block_until_ready(), xj),
            functools.partial(harness.torch_trunk, tmodel, xt))
        table.add(b, b / tj, b / tt, f"{tt / tj:.2f}x", compile_s)
    return [table.print()]
