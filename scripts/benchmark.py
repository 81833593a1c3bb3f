"""Speed of protoad_jax against the PyTorch reference, measured side by side in one run.

Subcommands:
  backbone   JAX Flax WideResNet (to layer3) vs torchvision, same weights, batch and threads.

Command and what it prints (numbers from one run on the 2-core CPU machine):
  python scripts/benchmark.py backbone --batch_sizes=1,8
  backbone wide_resnet50_2 to layer3, 224x224, float32, threads=2 (random weights; speed does not depend on them)
  batch | jax img/s | torch img/s | jax/torch | jax compile s
  ...
Needs the reference extra: pip install -e ".[test]".
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("threads", os.cpu_count(), "Threads for torch (JAX/XLA uses the same cores).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions after warm-up (median reported).")
flags.DEFINE_string("arch", "wide_resnet50_2", "Backbone architecture.")
flags.DEFINE_string("weights", None, "Converted .npz; default random weights (speed does not depend on values).")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_backbone() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchvision
    from flax import traverse_util

    from protoad_jax import backbone
    from protoad_jax.torch_weights import to_flax

    torch.set_num_threads(FLAGS.threads)
    tmodel = getattr(torchvision.models, FLAGS.arch)().eval()
    if FLAGS.weights:
        from protoad_jax.weights import load_variables
        variables = load_variables(FLAGS.weights, arch=FLAGS.arch)
    else:
        sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
        variables = traverse_util.unflatten_dict(to_flax(sd), sep="/")
    variables = jax.device_put(variables)
    net = backbone.ResNet(arch=FLAGS.arch)
    fn = jax.jit(lambda v, x: net.apply(v, x)["layer3"])

    def torch_trunk(x):
        with torch.no_grad():
            h = tmodel.maxpool(tmodel.relu(tmodel.bn1(tmodel.conv1(x))))
            return tmodel.layer3(tmodel.layer2(tmodel.layer1(h)))

    print(f"backbone {FLAGS.arch} to layer3, 224x224, float32, threads={FLAGS.threads}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}")
    print("batch | jax img/s | torch img/s | jax/torch | jax compile s")
    for b in map(int, FLAGS.batch_sizes):
        x = np.random.default_rng(b).normal(size=(b, 224, 224, 3)).astype(np.float32)
        xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        t = time.perf_counter()
        fn(variables, xj).block_until_ready()
        compile_s = time.perf_counter() - t
        torch_trunk(xt)
        tj = _median_seconds(lambda: fn(variables, xj).block_until_ready(), FLAGS.repeats)
        tt = _median_seconds(lambda: torch_trunk(xt), FLAGS.repeats)
        print(f"{b:5d} | {b / tj:9.2f} | {b / tt:11.2f} | {tt / tj:9.2f} | {compile_s:13.1f}", flush=True)


COMMANDS = {"backbone": bench_backbone}


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: benchmark.py {{{'|'.join(COMMANDS)}}} [flags]")
    COMMANDS[argv[1]]()


if __name__ == "__main__":
    sys.exit(app.run(main))
