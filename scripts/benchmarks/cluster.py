"""cluster: ``finch.finch`` (required K) and ``kmeans.kmeans`` (K, capped iterations) on random
clustered patches [N, 1792], float32 and float16 storage; each case in a fresh process: wall
time, compile time (from JAX's compile log), peak RSS. Larger N is projected from the measured
scaling unless --full / --cluster_sizes runs it."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import harness
import jax
import numpy as np
from absl import app, flags
from harness import COMPILE_LOG, FLAGS, C, Table

from protoad_jax.clustering import finch, kmeans

flags.DEFINE_list("cluster_sizes", ["10000", "20000"], "cluster: numbers of patches N.")
flags.DEFINE_list("cluster_methods", ["finch", "kmeans"], "cluster: methods.")
flags.DEFINE_list("cluster_float16_sizes", ["10000"], "cluster: N also run with float16 storage.")
flags.DEFINE_integer("cluster_k", 1000, "cluster: K (FINCH required clusters, k-means K).")
flags.DEFINE_integer("kmeans_iters", 20, "cluster: k-means max_iters.")
flags.DEFINE_integer("cluster_repeats", 0, "cluster: timed calls after the first (compiling) call; "
                     "0 reports the first call minus its logged compile time.")
flags.DEFINE_bool("fit_stage", True, "cluster: also run cluster_benchmark.py (FINCH on real-photo "
                  "patches, matmul peaks, merging at scale, coreset memory).")
flags.DEFINE_list("fit_stage_args", [], "cluster: extra flags for cluster_benchmark.py, e.g. "
                  "--fit_stage_args=--finch_n=5000,--merge_sizes=2000.")
flags.DEFINE_bool("full", False,
                  "cluster: also run N = 1,230,000 (MVTec's largest category; hours on CPU).")

FULL_N = 1_230_000  # patches of MVTec's largest category (391 train images x 3136)


def run() -> list[Table]:
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
                r = harness.run_case(__name__, {"method": method, "n": n, "k": k, "dtype": dtype,
                                                "iters": FLAGS.kmeans_iters,
                                                "repeats": FLAGS.cluster_repeats})
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
    tables = [table.print()]
    if FLAGS.fit_stage:
        tables.append(_fit_stage())
    return tables


class _Markdown:
    """Tables written by another script, kept as they are."""

    def __init__(self, text: str):
        self.text = text

    def markdown(self) -> str:
        return self.text

    def print(self) -> _Markdown:
        print(self.text, flush=True)
        return self


def _fit_stage() -> _Markdown:
    import subprocess
    import sys
    import tempfile

    out = Path(tempfile.mkdtemp()) / "fit.md"
    cmd = [sys.executable, str(harness.BENCHMARKS / "cluster_benchmark.py"), f"--output={out}",
           *FLAGS.fit_stage_args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    body = out.read_text() if out.exists() else f"failed: {res.stderr[-1000:]}"
    title = " ".join(["python scripts/benchmarks/cluster_benchmark.py", *FLAGS.fit_stage_args])
    return _Markdown(f"### fit stage: {title}\n\n{body}").print()


def case(spec: dict) -> dict:
    """One clustering case, run by ``harness.run_case`` in a fresh process."""
    x = _clustered(spec["n"], spec["k"], np.dtype(spec["dtype"]))

    def call():
        if spec["method"] == "finch":
            res = finch.finch(x, num_clusters=spec["k"])
            jax.block_until_ready(res.required_means)
            return {"levels": res.num_clusters, "required_level": res.required_level}
        res = kmeans.kmeans(x, spec["k"], jax.random.key(0), max_iters=spec["iters"],
                            spherical=True)
        jax.block_until_ready(res)
        return {"iterations": int(res.iterations)}

    c0 = COMPILE_LOG.snapshot()[1]
    t = time.perf_counter()
    info = call()
    first = time.perf_counter() - t
    compile_s = COMPILE_LOG.snapshot()[1] - c0
    warm = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t)
    return dict(first_s=first, compile_s=compile_s,
                warm_s=statistics.median(warm) if warm else None, data_mb=x.nbytes / 2**20, **info)


def _clustered(n: int, k: int, dtype, seed: int = 0) -> np.ndarray:
    """``[n, 1792]`` random clustered data: ``2k`` Gaussian centres plus noise, written in chunks
    (no float64 temporaries, so the generator's peak is the array itself)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2 * k, C), dtype=np.float32)
    x = np.empty((n, C), dtype)
    step = 65536
    for s in range(0, n, step):
        m = min(step, n - s)
        noise = rng.standard_normal((m, C), dtype=np.float32)
        x[s:s + m] = centres[rng.integers(0, len(centres), m)] + 0.5 * noise
    return x


def _project(table: Table, method: str, dtype: str, measured: dict) -> None:
    """Adds projected rows for N = 100,000 and 1.23 M from the measured cases."""
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
