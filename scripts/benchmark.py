"""Speed and memory of protoad_jax against the PyTorch reference, measured side by side in one run.

Subcommands (each prints markdown tables):
  e2e       full scoring path, preprocessed batch -> (maps, scores): ``make_scorer`` (jitted,
            blocked until ready) vs ``torch_reference.reference_scores`` (torchvision trunk +
            F.normalize + conv2d + max + cv2 resize + scipy blur). Same random weights,
            prototypes, images, batch, threads. Batch 1 latency p50/p90, batch 8 and 32 images/s,
            compile time apart, and the number of JAX compilations during the timed part (must
            be 0). K = Config().num_prototypes and --k.
  head      the head alone, embedding [56, 56, 1792] -> patch map (``scoring.patch_scores``, jitted,
            per image and vmapped at batch 8) vs torch F.normalize + conv2d 1x1 + max, K = 100 ..
            10,000, plus the memory-bounded chunked mode (``chunk_size``) with XLA's temp memory.
  cluster   ``finch.finch`` (required K) and ``kmeans.kmeans`` (K, capped iterations) on random
            clustered patches [N, 1792], float32 and float16 storage; each case in a fresh
            subprocess: wall time, compile time (from JAX's compile log), peak RSS. Larger N is
            projected from the measured scaling unless --full / --cluster_sizes runs it.
  data      host data path ``data.batched`` (PIL decode + LANCZOS resize + crop on a thread pool)
            in images/s on generated MVTec-like PNGs (700^2 and 1024^2 RGB).
  scale     fit() on 391 generated images (1.23M patches, MVTec's largest category) in a fresh
            process: time per phase and peak RSS, with the CPU default patch budget, and the
            memory of extracting and holding all 1.23M patches.
  backbone  JAX Flax WideResNet (to layer3) vs torchvision, same weights, batch and threads.
  all       e2e, head, a torch load-sensitivity probe, data (+ ``score_images`` from PNG files,
            against e2e), cluster; then rewrites BENCHMARKS.md atomically with the machine,
            command, date and tables.

Commands (defaults keep ``all`` near 10 minutes on a 2-core CPU; flags scale it up):
  python scripts/benchmark.py all
  python scripts/benchmark.py e2e --k=10000 --e2e_batch_sizes=8,32
  python scripts/benchmark.py head --head_ks=100,1000,10000 --head_chunked_ks=10000,100000
  python scripts/benchmark.py cluster --cluster_sizes=10000,100000 [--full]   # --full adds 1.23M
  python scripts/benchmark.py data --data_images=32
  python scripts/benchmark.py scale --scale_images=391
  python scripts/benchmark.py backbone --batch_sizes=1,8

What ``e2e`` prints (one run on the shared 2-core CPU machine; BENCHMARKS.md has all tables):
  ### e2e: preprocessed batch -> (maps, scores), 224x224, float32, threads=2
  | K | measure | protoad_jax | torch reference | jax speed-up | jax compile s |
  |---|---|---|---|---|---|
  | 1000 | batch 1 latency p50 ms | 231 | 221 | 0.95x | 1.22 |
  | 1000 | batch 1 latency p90 ms | 344 | 394 | 1.15x | — |
  | 1000 | batch 8 img/s | 4.18 | 3.51 | 1.19x | 1.15 |
  | 1000 | batch 32 img/s | 4 | 2.95 | 1.36x | 1.39 |
  | 100 | batch 1 latency p50 ms | 160 | 152 | 0.95x | 0.605 |
  ...
  - recompiles after warm-up: 0 (compilations in JAX's compile log during all timed calls);
    _score_fn jit cache entries K=1000: 3 -> 3, K=100: 6 -> 6
  - protoad_jax: make_scorer(model, variables)(images) -> (maps, scores), ...

Random weights and prototypes: speed does not depend on their values. Needs the reference
extra: pip install -e ".[test]".
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)),
                     "Cores for torch (set_num_threads) and JAX (process CPU affinity).")
flags.DEFINE_integer("repeats", 3, "Timed calls after warm-up; the median is reported.")
flags.DEFINE_float("budget_s", 20.0,
                   "Stop repeating a measurement (after 2 timed calls) past this many seconds.")
flags.DEFINE_string("arch", "wide_resnet50_2", "Backbone architecture.")
flags.DEFINE_string("weights", None,
                    "Converted .npz; default random weights (speed does not depend on values).")
flags.DEFINE_list("batch_sizes", ["1", "8"], "backbone: batch sizes to time.")
flags.DEFINE_integer("k", 100, "e2e: a second K timed besides Config().num_prototypes.")
flags.DEFINE_list("e2e_batch_sizes", ["8", "32"], "e2e: batch sizes timed for images/s.")
flags.DEFINE_integer("latency_repeats", 10, "e2e: batch-1 calls timed for p50/p90 latency.")
flags.DEFINE_list("head_ks", ["100", "1000", "10000"], "head: prototype counts K.")
flags.DEFINE_list("head_chunked_ks", ["10000"], "head: K timed in chunked mode (jax only).")
flags.DEFINE_integer("chunk_size", 1024, "head: prototypes per chunk in chunked mode.")
flags.DEFINE_integer("head_batch", 8, "head: batch size of the vmapped head.")
flags.DEFINE_list("cluster_sizes", ["10000", "20000"], "cluster: numbers of patches N.")
flags.DEFINE_list("cluster_methods", ["finch", "kmeans"], "cluster: methods.")
flags.DEFINE_list("cluster_float16_sizes", ["10000"], "cluster: N also run with float16 storage.")
flags.DEFINE_integer("cluster_k", 1000, "cluster: K (FINCH required clusters, k-means K).")
flags.DEFINE_integer("kmeans_iters", 20, "cluster: k-means max_iters.")
flags.DEFINE_integer("cluster_repeats", 0, "cluster: timed calls after the first (compiling) call; "
                     "0 reports the first call minus its logged compile time.")
flags.DEFINE_integer("cluster_timeout_s", 3600, "cluster: per-case subprocess timeout.")
flags.DEFINE_bool("full", False,
                  "cluster: also run N = 1,230,000 (MVTec's largest category; hours on CPU).")
flags.DEFINE_list("data_sizes", ["700", "1024"], "data: side of the generated square PNGs.")
flags.DEFINE_integer("data_images", 32, "data: PNGs written per size.")
flags.DEFINE_integer("data_batch", 8, "data: batch size of data.batched.")
flags.DEFINE_string("output", None, "all: markdown file to rewrite (default <repo>/BENCHMARKS.md).")
flags.DEFINE_integer("scale_images", 391, "scale: generated training images (391 = MVTec hazelnut).")
flags.DEFINE_string("case", None, "Internal: JSON of one case of the hidden _cluster_case.")

C = 1792  # embedding channels
FULL_N = 1_230_000  # patches of MVTec's largest category (391 train images x 3136)
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


class Table:
    """A titled markdown table with notes below it."""

    def __init__(self, title: str, header: list[str]):
        self.title, self.header, self.rows, self.notes = title, header, [], []

    def add(self, *cells) -> None:
        self.rows.append([_fmt(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def print(self) -> Table:
        print(self.markdown(), flush=True)
        return self


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return "—" if x is None else str(x)


class CompileLog(logging.Handler):
    """Counts JAX compilations (``jax_log_compiles``) and sums trace + lower + XLA compile seconds.

    Installed once on the ``jax`` logger with propagation off, so the compile log does not flood
    stderr; other warnings are passed on to stderr.
    """

    _TIMED = re.compile(r"Finished (tracing|jaxpr to MLIR|XLA compilation).* in ([0-9.eE+-]+) sec")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.compiles, self.seconds, self.names = 0, 0.0, []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        timed = self._TIMED.match(msg)
        if msg.startswith("Compiling "):
            self.compiles += 1
            self.names.append(msg[len("Compiling "):].split(" with ")[0])
        elif timed:
            self.seconds += float(timed.group(2))
        elif record.levelno >= logging.WARNING:
            sys.stderr.write(f"{record.name}: {msg}\n")

    def snapshot(self) -> tuple[int, float]:
        return self.compiles, self.seconds


COMPILE_LOG = CompileLog()


def _setup() -> None:
    """Pins the process (and so XLA's thread pool and any child) to --threads cores; torch and
    OpenCV get the same count. Must run before JAX initialises its CPU client."""
    cores = sorted(os.sched_getaffinity(0))
    if FLAGS.threads < 1:
        raise app.UsageError(f"--threads must be >= 1, got {FLAGS.threads}")
    if FLAGS.threads < len(cores):
        os.sched_setaffinity(0, cores[:FLAGS.threads])
    import jax

    jax.config.update("jax_log_compiles", True)
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(COMPILE_LOG)
    jax_logger.propagate = False


def _torch():
    import cv2
    import torch

    torch.set_num_threads(FLAGS.threads)
    cv2.setNumThreads(FLAGS.threads)
    return torch


def _timed(fns, repeats: int, budget_s: float | None = None) -> list[list[float]]:
    """Seconds per call of each of ``fns`` (warmed up by the caller) over up to ``repeats``
    rounds; a round calls every function once in turn, so that all of them see the same
    background load. Stops after >= 2 rounds once ``budget_s`` has passed."""
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        if budget_s is not None and len(times[0]) >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def _medians(*fns, repeats: int | None = None) -> list[float]:
    """Median seconds per call of each function, timed in alternating rounds (``_timed``)."""
    times = _timed(fns, repeats or FLAGS.repeats, FLAGS.budget_s)
    return [statistics.median(t) for t in times]


@functools.cache
def _models():
    """``(torchvision model, Flax variables)`` with the same (random or given) weights."""
    import jax
    import numpy as np
    import torchvision
    from flax import traverse_util

    from protoad_jax.torch_weights import to_flax

    _torch()
    tmodel = getattr(torchvision.models, FLAGS.arch)().eval()
    if FLAGS.weights:
        import torch

        from protoad_jax.weights import load_variables

        variables = load_variables(FLAGS.weights, arch=FLAGS.arch)
        flat = traverse_util.flatten_dict(variables, sep="/")
        sd = {}
        for key, value in tmodel.state_dict().items():  # torch side gets the same weights
            match = [k for k in to_flax({key: value.numpy()}) if k in flat]
            if match:
                v = np.asarray(flat[match[0]])
                v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
                sd[key] = torch.from_numpy(np.ascontiguousarray(v))
        tmodel.load_state_dict(sd, strict=False)
    else:
        sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
        variables = traverse_util.unflatten_dict(to_flax(sd), sep="/")
    return tmodel, jax.device_put(variables)


def _prototypes(k: int, seed: int = 0):
    """``[k, 1792]`` float32 unit rows (what ``fit`` stores with the default config)."""
    import numpy as np

    from protoad_jax import scoring

    p = np.random.default_rng(seed).standard_normal((k, C), dtype=np.float32)
    return np.asarray(scoring.prepare_prototypes(p, normalize=True))


def _images(n: int, size: int = 224, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, size, size, 3), dtype=np.float32)


# ----------------------------------------------------------------------------- backbone


def bench_backbone() -> list[Table]:
    import jax
    import jax.numpy as jnp
    import torch

    from protoad_jax import backbone

    tmodel, variables = _models()
    variables = backbone.fold_batchnorm(variables)  # as pipeline.load_backbone runs it
    net = backbone.ResNet(arch=FLAGS.arch, folded=True)
    fn = jax.jit(lambda v, x: net.apply(v, x)["layer3"])

    def torch_trunk(x):
        with torch.no_grad():
            h = tmodel.maxpool(tmodel.relu(tmodel.bn1(tmodel.conv1(x))))
            return tmodel.layer3(tmodel.layer2(tmodel.layer1(h)))

    table = Table(f"backbone: {FLAGS.arch} to layer3, 224x224, float32, threads={FLAGS.threads}",
                  ["batch", "jax img/s", "torch img/s", "jax speed-up", "jax compile s"])
    for b in map(int, FLAGS.batch_sizes):
        x = _images(b, seed=b)
        xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        t = time.perf_counter()
        fn(variables, xj).block_until_ready()
        compile_s = time.perf_counter() - t
        torch_trunk(xt)
        tj, tt = _medians(functools.partial(lambda x: fn(variables, x).block_until_ready(), xj),
                          functools.partial(torch_trunk, xt))
        table.add(b, b / tj, b / tt, f"{tt / tj:.2f}x", compile_s)
    return [table.print()]


# ----------------------------------------------------------------------------- e2e


def bench_e2e(results: dict | None = None) -> list[Table]:
    import torch

    from protoad_jax.config import Config

    default_k = Config().num_prototypes
    ks = [default_k] + ([FLAGS.k] if FLAGS.k != default_k else [])
    sizes = sorted(set(map(int, FLAGS.e2e_batch_sizes)))
    images = _images(max([*sizes, 1]))
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    table = Table(f"e2e: preprocessed batch -> (maps, scores), 224x224, float32, "
                  f"threads={FLAGS.threads}",
                  ["K", "measure", "protoad_jax", "torch reference", "jax speed-up",
                   "jax compile s"])
    recompiles, cache_note, names = 0, [], []
    for k in ks:
        before = len(COMPILE_LOG.names)
        n, note = _e2e_k(table, k, sizes, images, images_t, results)
        recompiles += n
        cache_note.append(note)
        names += COMPILE_LOG.names[before:][-n:] if n else []
    table.notes += [
        (f"recompiles after warm-up: {recompiles} (compilations in JAX's compile log during all "
         f"timed calls); _score_fn jit cache entries {', '.join(cache_note)}"),
        ("protoad_jax: make_scorer(model, variables)(images) -> (maps, scores), "
         "jax.block_until_ready; includes check_images (host finite check). torch: "
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


def _e2e_k(table: Table, k: int, sizes: list[int], images, images_t,
           results: dict | None) -> tuple[int, str]:
    """Times one K; returns (compilations during the timed calls, jit cache note)."""
    import jax
    import numpy as np
    import torch_reference

    from protoad_jax import pipeline
    from protoad_jax.config import Config

    tmodel, variables = _models()
    config = Config(num_prototypes=k, arch=FLAGS.arch)
    model = pipeline.Model(_prototypes(k), config)
    scorer = pipeline.make_scorer(model, variables)
    jitted = pipeline._score_fn(*pipeline._score_config(config, None))

    def run_jax(b):
        return jax.block_until_ready(scorer(images[:b]))

    def run_torch(b):
        return torch_reference.reference_scores(tmodel, model.prototypes, images_t[:b],
                                                out_size=config.image_size, sigma=config.sigma)

    compile_s = {}
    for b in [1, *sizes]:  # warm-up: compile every batch shape, run torch once
        c0 = COMPILE_LOG.snapshot()[1]
        run_jax(b)
        compile_s[b] = COMPILE_LOG.snapshot()[1] - c0
        run_torch(b)
    entries = jitted._cache_size()
    n0 = COMPILE_LOG.snapshot()[0]
    lat_j, lat_t = np.array(_timed([lambda: run_jax(1), lambda: run_torch(1)],
                                   FLAGS.latency_repeats, FLAGS.budget_s)) * 1e3
    for q in (50, 90):
        pj, pt = np.percentile(lat_j, q), np.percentile(lat_t, q)
        table.add(k, f"batch 1 latency p{q} ms", pj, pt, f"{pt / pj:.2f}x",
                  compile_s[1] if q == 50 else None)
    for b in sizes:
        tj, tt = _medians(functools.partial(run_jax, b), functools.partial(run_torch, b))
        table.add(k, f"batch {b} img/s", b / tj, b / tt, f"{tt / tj:.2f}x", compile_s[b])
        if results is not None:
            results[("e2e_img_s", k, b)] = b / tj
    return COMPILE_LOG.snapshot()[0] - n0, f"K={k}: {entries} -> {jitted._cache_size()}"


# ----------------------------------------------------------------------------- head


def bench_head() -> list[Table]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    _torch()
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
    cases = [(int(k), None) for k in FLAGS.head_ks] + [
        (int(k), FLAGS.chunk_size) for k in FLAGS.head_chunked_ks]
    for k, chunk in cases:
        protos = _prototypes(k, seed=k)
        one, batched, temp_mb = _head_jax(emb_j, jnp.asarray(protos), chunk)
        if chunk is None:  # jax and torch alternate
            t_one, t_batch = _head_torch(emb_t, protos)
            tj1, tt1 = _medians(one, t_one)
            tjb, ttb = _medians(batched, t_batch)
            torch_times[k] = tt1, ttb
        else:  # torch has no chunked mode: compared with its full head at the same K
            (tj1,), (tjb,) = _medians(one), _medians(batched)
        tt1, ttb = torch_times.get(k, (None, None))
        flops = 2 * 56 * 56 * C * k * b
        table.add(k, "full" if chunk is None else f"chunked {chunk}", tj1 * 1e3, b / tjb,
                  tt1 and tt1 * 1e3, ttb and b / ttb, tt1 and f"{tt1 / tj1:.2f}x",
                  ttb and f"{ttb / tjb:.2f}x", flops / tjb / 1e9, temp_mb)
    if jax.default_backend() == "cpu":
        table.notes.append(
            "XLA temp MB is 0 for the full head on CPU: XLA fuses the matmul and the max over K "
            "into one YNNPACK fusion whose buffers are not reported (seen in the compiled HLO); "
            "other backends may materialise the [b, 56, 56, K] similarities (not measured here).")
    table.notes += [
        ("protoad_jax: jax.jit(scoring.patch_scores) per image and jax.jit(jax.vmap("
         "patch_scores, in_axes=(0, None))) per batch (AOT-compiled, blocked until ready); "
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
    import jax

    from protoad_jax import scoring

    head = functools.partial(scoring.patch_scores, chunk_size=chunk)
    one = jax.jit(head).lower(emb[0], protos).compile()
    batched = jax.jit(jax.vmap(head, in_axes=(0, None))).lower(emb, protos).compile()
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


# ----------------------------------------------------------------------------- cluster


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _clustered(n: int, k: int, dtype, seed: int = 0):
    """``[n, 1792]`` random clustered data: ``2k`` Gaussian centres plus noise, written in chunks
    (no float64 temporaries, so the generator's peak is the array itself)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2 * k, C), dtype=np.float32)
    x = np.empty((n, C), dtype)
    step = 65536
    for s in range(0, n, step):
        m = min(step, n - s)
        noise = rng.standard_normal((m, C), dtype=np.float32)
        x[s:s + m] = centres[rng.integers(0, len(centres), m)] + 0.5 * noise
    return x


def cluster_case() -> None:
    """Hidden subcommand: one clustering case in this (fresh) process; prints ``RESULT {json}``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from protoad_jax import finch, kmeans

    case = json.loads(FLAGS.case)
    jnp.zeros(1).block_until_ready()  # initialise the runtime before the baseline
    runtime_mb = _rss_mb()
    if case["method"] == "fit":
        return _fit_case(case, runtime_mb)
    x = _clustered(case["n"], case["k"], np.dtype(case["dtype"]))
    data_mb = x.nbytes / 2**20

    def call():
        if case["method"] == "finch":
            res = finch.finch(x, num_clusters=case["k"])
            jax.block_until_ready(res.required_means)
            return {"levels": res.num_clusters, "required_level": res.required_level}
        res = kmeans.kmeans(x, case["k"], jax.random.key(0), max_iters=case["iters"],
                            spherical=True)
        jax.block_until_ready(res)
        return {"iterations": int(res.iterations)}

    c0 = COMPILE_LOG.snapshot()[1]
    t = time.perf_counter()
    info = call()
    first = time.perf_counter() - t
    compile_s = COMPILE_LOG.snapshot()[1] - c0
    warm = []
    for _ in range(case["repeats"]):
        t = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent process.
    peak_mb = _rss_mb("VmHWM")
    print("RESULT " + json.dumps(dict(
        case, first_s=first, compile_s=compile_s, warm_s=statistics.median(warm) if warm else None,
        runtime_mb=runtime_mb, data_mb=data_mb, peak_mb=peak_mb, **info)), flush=True)


def _fit_case(case: dict, runtime_mb: float) -> None:
    """fit() (or only its patch extraction) on the generated training images of ``case["root"]``."""
    from protoad_jax import Config, data, evaluation, pipeline

    paths = data.find_images(Path(case["root"]) / "demo_object" / "train" / "good")
    net = evaluation.random_backbone("wide_resnet50_2", "benchmark")
    config = Config(max_patches=case["max_patches"])
    t = time.perf_counter()
    if case["extract_only"]:
        patches = pipeline.extract_patches(paths, net.variables, config, progress=False)
        info = {"num_patches": len(patches), "patch_dtype": patches.dtype.name,
                "seconds_features": time.perf_counter() - t, "seconds_clustering": None}
    else:
        info = pipeline.fit(paths, config=config, variables=net.variables, progress=False).info
    print("RESULT " + json.dumps(dict(case, total_s=time.perf_counter() - t, runtime_mb=runtime_mb,
                                      peak_mb=_rss_mb("VmHWM"), **info)), flush=True)


def bench_scale() -> list[Table]:
    """fit() at MVTec's largest size: 391 training images = 1.23M patches, in a fresh process."""
    import tempfile

    from protoad_jax import config as config_lib
    from protoad_jax import demo

    table = Table(f"scale: fit on {FLAGS.scale_images} generated 256x256 images "
                  f"({FLAGS.scale_images * 3136:,} patches x 1792), threads={FLAGS.threads}",
                  ["case", "patches kept", "storage", "features s", "clustering s", "total s",
                   "peak RSS MB"])
    with tempfile.TemporaryDirectory() as tmp:
        root = demo.make_demo_dataset(Path(tmp), seed=0, n_train=FLAGS.scale_images, n_test_good=0,
                                      n_test_bad=0, categories=("demo_object",))
        cases = [("fit, default (CPU 'auto' budget), FINCH K=1000", "auto", False),
                 ("patch extraction only, all patches kept", None, True)]
        for name, budget, extract_only in cases:
            r = _run_case({"method": "fit", "root": str(root), "max_patches": budget,
                           "extract_only": extract_only})
            if "error" in r:
                table.add(name, r["error"], "", "", "", "", "")
                continue
            table.add(name, r["num_patches"], r["patch_dtype"], r["seconds_features"],
                      r["seconds_clustering"] if r["seconds_clustering"] is not None else "—",
                      r["total_s"], r["peak_mb"])
    table.notes += [
        (f"random-init backbone (speed and memory do not depend on weights); CPU 'auto' budget = "
         f"config.CPU_MAX_PATCHES = {config_lib.CPU_MAX_PATCHES:,} seeded patches; patches are "
         "stored float16 above 4 GiB of float32 (pipeline.FLOAT16_PATCHES_ABOVE_BYTES)."),
        ("exact FINCH over all 1.23M patches is not run on this CPU: see the cluster table's "
         "projection; the second row shows the memory of holding all of them."),
        "peak RSS = the subprocess's VmHWM (JAX runtime + backbone + patches + clustering).",
    ]
    return [table.print()]


def _run_case(case: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_cluster_case",
           f"--case={json.dumps(case)}", f"--threads={FLAGS.threads}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=FLAGS.cluster_timeout_s)
    except subprocess.TimeoutExpired:
        return dict(case, error=f"timeout after {FLAGS.cluster_timeout_s} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(case, error=f"exit {proc.returncode}: {' / '.join(tail)[:300]}")
    return json.loads(lines[-1][len("RESULT "):])


def bench_cluster() -> list[Table]:
    sizes = sorted(set(map(int, FLAGS.cluster_sizes)) | ({FULL_N} if FLAGS.full else set()))
    f16 = set(map(int, FLAGS.cluster_float16_sizes))
    k = FLAGS.cluster_k
    table = Table(f"cluster: random clustered patches [N, {C}], K={k}, threads={FLAGS.threads}",
                  ["method", "N", "storage", "s (run)", "compile s", "peak RSS MB", "data MB",
                   "runtime MB", "result"])
    measured: dict[tuple[str, str, int], tuple[float, float]] = {}
    for method in FLAGS.cluster_methods:
        if method not in ("finch", "kmeans"):
            raise app.UsageError(f"--cluster_methods: expected finch/kmeans, got {method!r}")
        for n in sizes:
            # float16 above 4 GiB of float32, as pipeline.extract_patches stores the patches.
            dtypes = ["float16"] if n * C * 4 > (4 << 30) else (
                ["float32"] + (["float16"] if n in f16 else []))
            for dtype in dtypes if n >= k else []:
                r = _run_case({"method": method, "n": n, "k": k, "dtype": dtype,
                               "iters": FLAGS.kmeans_iters, "repeats": FLAGS.cluster_repeats})
                if "error" in r:
                    table.add(method, n, dtype, None, None, None, None, None, r["error"])
                    print(f"  {method} N={n} {dtype}: {r['error']}", flush=True)
                    continue
                run_s = r["warm_s"] if r["warm_s"] is not None else r["first_s"] - r["compile_s"]
                result = (f"levels {r['levels']}, merged from level {r['required_level']}"
                          if method == "finch" else f"{r['iterations']} iterations")
                table.add(method, n, dtype, run_s, r["compile_s"], r["peak_mb"], r["data_mb"],
                          r["runtime_mb"], result)
                print(f"  {method} N={n} {dtype}: {run_s:.1f} s, peak {r['peak_mb']:.0f} MB",
                      flush=True)
                measured[(method, dtype, n)] = (run_s, r["peak_mb"])
    for method in FLAGS.cluster_methods:
        for dtype in ("float32", "float16"):
            _project(table, method, dtype, measured)
    table.notes += [
        ("each case runs in a fresh subprocess: peak RSS = its VmHWM (JAX runtime + data + the "
         "algorithm's working memory); runtime MB = RSS after JAX start-up, before the data."),
        ("data: 2K Gaussian centres + 0.5 N(0, 1) noise; float16 rows store the same data as "
         "float16 (pipeline.extract_patches does so above 4 GiB; compute is float32 per chunk)."),
        (f"finch: finch.finch(x, num_clusters={k}); kmeans: kmeans.kmeans(x, {k}, key, "
         f"max_iters={FLAGS.kmeans_iters}, spherical=True), k-means++ seeding + Lloyd, default "
         "tol (the pipeline itself uses max_iters=100)."),
        (f"s (run): median of {FLAGS.cluster_repeats} call(s) after the first (compiling) call"
         if FLAGS.cluster_repeats else
         "s (run): one call's wall time minus its compile s (trace + lower + XLA compile from "
         "JAX's compile log; FINCH compiles per level shape); --cluster_repeats=N times N more "
         "calls instead"),
        ("projected rows are extrapolations, not measurements: time from the largest measured N "
         "by the algorithm's scaling (FINCH level 0 = exact first neighbours, n^2 d; k-means++ "
         "and each Lloyd pass, n K d), memory linear through the two largest measured N."),
    ]
    return [table.print()]


def _project(table: Table, method: str, dtype: str, measured: dict) -> None:
    """Adds projected rows for N = 100,000 and 1.23 M from the measured cases."""
    import numpy as np

    ns = sorted(n for (m, d, n) in measured if m == method and d == dtype)
    if not ns:
        return
    n1 = ns[-1]
    t1, p1 = measured[(method, dtype, n1)]
    row_mb = C * np.dtype(dtype).itemsize / 2**20
    slope, fitted = row_mb, ""
    if len(ns) >= 2:
        n0 = ns[-2]
        t0, p0 = measured[(method, dtype, n0)]
        slope = max(row_mb, (p1 - p0) / (n1 - n0))
        fitted = f"; measured time exponent {math.log(t1 / t0) / math.log(n1 / n0):.2f}"
    power = {"finch": 2, "kmeans": 1}[method]
    for n in (100_000, FULL_N):
        if n > n1:
            table.add(method, n, dtype, f"~{_hms(t1 * (n / n1) ** power)} (projected)", None,
                      f"~{p1 + slope * (n - n1):.0f} (projected)", n * row_mb, None,
                      f"from N={n1}: time x (N/{n1})^{power}{fitted}")


def _hms(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------- data


def _write_pngs(folder: Path, size: int, n: int) -> list[Path]:
    """``n`` photo-like RGB PNGs (smooth random fields + sensor noise) of ``size x size``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(size)
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8))
        img = np.asarray(low.resize((size, size), Image.BICUBIC), np.int16)
        img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"{size}_{i:03d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def bench_data(results: dict | None = None) -> list[Table]:
    from protoad_jax import data

    threads = sorted({1, data.default_num_threads()})
    b = FLAGS.data_batch
    table = Table(f"data: data.batched (PNG decode + LANCZOS resize 256 + crop 224), batch {b}",
                  ["PNG size", "mean file KB", "decode threads", "img/s"])
    compare = Table("data path vs scoring (same run)", ["measure", "img/s"])
    with tempfile.TemporaryDirectory(prefix="protoad_bench_") as tmp:
        rates, paths = {}, {}
        for size in map(int, FLAGS.data_sizes):
            paths[size] = _write_pngs(Path(tmp), size, FLAGS.data_images)
            kb = sum(p.stat().st_size for p in paths[size]) / len(paths[size]) / 1024
            for t in threads:
                run = functools.partial(_drain, data.batched, paths[size], b, t)
                run()  # warm-up: page cache, thread pool start
                rates[size, t] = len(paths[size]) / _medians(run)[0]
                table.add(f"{size}x{size}", kb, t, rates[size, t])
        k = _default_k()
        if results is not None and ("e2e_img_s", k, b) in results:
            size, t = max(paths), threads[-1]
            device, host = results[("e2e_img_s", k, b)], rates[size, t]
            files = _score_files(paths[size], b)
            compare.add(f"e2e protoad_jax, preprocessed batch {b}, K={k}", device)
            compare.add(f"data.batched alone, {size}x{size} PNG, {t} threads", host)
            compare.add(f"score_images on {size}x{size} PNG paths, batch {b} (decode overlapped "
                        "with scoring)", files)
            compare.notes += [
                (f"the data path alone is {host / device:.1f}x the scoring rate, so it "
                 f"{'keeps' if host >= device else 'does not keep'} up here; scoring from files "
                 f"reaches {files / device:.0%} of the preprocessed-batch rate."),
                ("on this CPU machine decoding and XLA share the same cores. On an accelerator "
                 "the scoring rate is far higher: divide it by the per-thread decode rate above "
                 "to size data.batched's num_threads."),
            ]
    table.notes.append(f"{FLAGS.data_images} generated PNGs per size (smooth random RGB fields + "
                       "noise, PIL default compression); median of full passes after a warm-up "
                       "pass.")
    return [table.print()] + ([compare.print()] if compare.rows else [])


def _drain(batched, paths, batch: int, threads: int) -> None:
    for _ in batched(paths, batch, num_threads=threads):
        pass


def _default_k() -> int:
    from protoad_jax.config import Config

    return Config().num_prototypes


def _score_files(paths: list[Path], batch: int) -> float:
    import jax

    from protoad_jax import pipeline
    from protoad_jax.config import Config

    _, variables = _models()
    k = _default_k()
    model = pipeline.Model(_prototypes(k), Config(num_prototypes=k, arch=FLAGS.arch))
    run = functools.partial(pipeline.score_images, model, paths, variables, batch_size=batch,
                            progress=False)
    jax.block_until_ready(run().scores)  # compiled already by e2e; warms the file cache
    return len(paths) / _medians(run, repeats=min(FLAGS.repeats, 2))[0]


# ----------------------------------------------------------------------------- all


def _machine() -> list[str]:
    import jax
    import jaxlib
    import torch

    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    mem = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    return [
        (f"CPU: {cpu.group(1) if cpu else platform.processor()}, {os.cpu_count()} cores "
         f"({len(os.sched_getaffinity(0))} used)"),
        f"RAM: {int(mem.group(1)) / 2**20:.1f} GiB" if mem else "RAM: unknown",
        (f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib "
         f"{jaxlib.__version__}, torch {torch.__version__}, devices "
         f"{[str(d) for d in jax.devices()]}"),
        f"OS: {platform.platform()}",
    ]


def _torch_probe() -> list[Table]:
    """Spread of torch's trunk at batch 1 with 1 thread and with --threads: on a shared machine
    OpenMP's spinning barriers can make the multi-threaded run much slower and bimodal."""
    import torch

    tmodel, _ = _models()
    x = torch.from_numpy(_images(1).transpose(0, 3, 1, 2).copy())

    @torch.no_grad()
    def trunk():
        h = tmodel.maxpool(tmodel.relu(tmodel.bn1(tmodel.conv1(x))))
        return tmodel.layer3(tmodel.layer2(tmodel.layer1(h)))

    table = Table("torch sensitivity to co-running load: trunk to layer3, batch 1, s per call",
                  ["torch threads", "min", "median", "max"])
    medians = {}
    for threads in sorted({1, FLAGS.threads}):
        torch.set_num_threads(threads)
        trunk()
        (times,) = _timed([trunk], 6, FLAGS.budget_s)
        table.add(threads, min(times), statistics.median(times), max(times))
        medians[threads] = statistics.median(times), max(times) / min(times)
    torch.set_num_threads(FLAGS.threads)
    (one, _), (many, spread) = medians[1], medians[FLAGS.threads]
    disturbed = spread > 2 or many > 1.5 * one
    table.notes.append(
        f"at the time of this probe: {FLAGS.threads} threads took {many / one:.2f}x the time of "
        f"1 thread, max/min {spread:.1f}. " + (
            "More threads being slower, or a large spread, means torch's OpenMP threads waited "
            "on each other at barriers while other processes held the cores; torch timings "
            "taken in such a phase overstate JAX's lead (JAX's work-stealing pool suffers "
            "less). Rerun on an idle machine for clean ratios." if disturbed else
            "torch was not visibly disturbed by other load at that time."))
    return [table.print()]


def bench_all() -> list[Table]:
    results: dict = {}
    start, load0 = time.time(), os.getloadavg()
    tables = (bench_e2e(results) + bench_head() + _torch_probe() + bench_data(results)
              + bench_cluster() + bench_scale())
    load1 = os.getloadavg()
    command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# Benchmarks",
        "",
        "Written by `scripts/benchmark.py all` (rerun it to refresh this file).",
        "",
        f"- Command: `{command}`",
        f"- Date: {date}; the run took {(time.time() - start) / 60:.1f} min.",
        *[f"- {line}" for line in _machine()],
        (f"- Threads: torch.set_num_threads({FLAGS.threads}), cv2.setNumThreads({FLAGS.threads}); "
         f"JAX/XLA on the same {FLAGS.threads} cores (process CPU affinity). "
         f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (protoad_jax.xla_cpu.tune(), as every script)."),
        (f"- Load average (1 min): {load0[0]:.1f} at the start, {load1[0]:.1f} at the end. "
         "JAX and torch calls alternate within each measurement, so background load affects "
         "their ratios less than their absolute timings."),
        ("- Weights and prototypes are random (speed does not depend on their values); float32; "
         "JAX default matmul precision. Timings are medians over repeats after warm-up, results "
         "blocked until ready, compile time reported apart (clustering: see its notes)."),
        "",
        *[t.markdown() for t in tables],
    ])
    out = Path(FLAGS.output) if FLAGS.output else REPO / "BENCHMARKS.md"
    from protoad_jax.fileio import atomic_write

    atomic_write(out, lambda f: f.write(text), mode="w")
    print(f"wrote {out}")
    return tables


COMMANDS = {"e2e": bench_e2e, "head": bench_head, "cluster": bench_cluster, "data": bench_data,
            "scale": bench_scale, "backbone": bench_backbone, "all": bench_all}


def main(argv):
    from protoad_jax import xla_cpu

    xla_cpu.tune()  # as the other scripts run; before any JAX computation
    if len(argv) == 2 and argv[1] == "_cluster_case":
        _setup()
        cluster_case()
        return
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: benchmark.py {{{'|'.join(COMMANDS)}}} [flags]")
    _setup()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_reference
    COMMANDS[argv[1]]()


if __name__ == "__main__":
    sys.exit(app.run(main))
