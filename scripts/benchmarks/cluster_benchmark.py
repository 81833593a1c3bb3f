"""Fit-stage benchmark: matmul peaks, FINCH (optionally against an older commit), closest-pair
merging at scale, coreset memory.

Every case runs in a fresh process (harness.run_case; its peak RSS is the process's VmHWM) on
real-photo patch embeddings (demo.photo_crops of scikit-learn's sample photographs through the
random-init wide_resnet50_2, float16 as the pipeline stores them; cached under --workdir).

  peaks    jitted [4096, 1792] x [1792, 4096] matmul, float32 (HIGHEST) and bfloat16: GFLOP/s.
  finch    finch.finch(x, num_clusters=K) on --finch_n patches, this checkout (and, with
           --baseline=REV, that git revision, checked out to a temporary folder and run the same
           way): seconds, levels, level-0 effective GFLOP/s (2 n^2 d / level-0 seconds), queries
           re-ranked in float64, device fallbacks, exhaustive float64 searches.
  merge    merging.merge_closest from m singleton clusters (patches) down to K, for each
           --merge_sizes: seconds, refreshes, exact cosines, peak RSS; sizes above
           --merge_run_max are projected from the largest run (time ~m^2: the candidate pass is
           m^2 d, each merge screens O(m) rows; memory ~m), labelled as projections.
  coreset  pipeline's coreset sampler over --coreset_n patches (float16) down to --coreset_budget:
           seconds, peak RSS.
  factored every patch of --factored_images whole photo crops (float32, as the pipeline keeps
           them): the level-0 first-neighbour search unfactored and factored (neighbours.PatchGrid:
           layer2 / layer3 Gram blocks per cell), then finch.finch(K) both ways, in one process:
           seconds, same decisions (yes/no), re-ranked / fallbacks.

Commands (docs/speed.md "Fit stage"; needs scikit-learn, in the [test] extra):
  python scripts/benchmarks/cluster_benchmark.py --cases=peaks,finch,merge,coreset --output=fit.md
  python scripts/benchmarks/cluster_benchmark.py --cases=finch --baseline=d61e0d5   # before / after
  python scripts/benchmarks/cluster_benchmark.py --cases=factored --factored_images=12
Prints, per case: the matmul peaks line; the FINCH table (implementation | total s | level-0
search s | effective GFLOP/s | of float32 peak | levels | peak RSS MB) with one line per level;
the merging table (start clusters | seconds | refreshes | exact cosines | peak RSS MB | run or
projected); the coreset line. --output writes the same lines to a markdown file.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["peaks", "finch", "merge", "coreset"], "Cases to run.")
flags.DEFINE_integer("finch_n", 50000, "finch: patches.")
flags.DEFINE_integer("k", 1000, "finch/merge: required number of clusters.")
flags.DEFINE_string("baseline", "", "finch: a git revision to time too, as the 'before' "
                    "implementation (default: none, this checkout only).")
flags.DEFINE_list("merge_sizes", ["20000", "100000", "300000"], "merge: starting cluster counts.")
flags.DEFINE_integer("merge_run_max", 100000, "merge: larger sizes are projected, not run.")
flags.DEFINE_integer("coreset_n", 1226176, "coreset: patches (391 images x 3136).")
flags.DEFINE_integer("coreset_budget", 2000, "coreset: budget of the memory run (time per pick is "
                     "printed; memory does not depend on the budget).")
flags.DEFINE_integer("factored_images", 12, "factored: whole images (3136 patches each).")
flags.DEFINE_string("workdir", "/tmp/protoad_cluster_bench", "Cache of patch embeddings.")
flags.DEFINE_string("output", None, "Markdown file to write the tables to (atomically).")


def _patches(n: int) -> Path:
    """``[n, 1792]`` float16 real-photo patch embeddings, cached."""
    path = Path(FLAGS.workdir) / f"photo_{n}.npy"
    if path.exists():
        return path
    for other in sorted(Path(FLAGS.workdir).glob("photo_*.npy")):  # a larger cache: its rows
        if int(other.stem.split("_")[1]) >= n:
            return other
    import numpy as np
    from sklearn.datasets import load_sample_images

    from protoad_jax import Config, fileio, pipeline, weights
    from protoad_jax.datasets import demo

    net = weights.random_backbone("wide_resnet50_2", "benchmark")
    crops = demo.photo_crops(load_sample_images().images, -(-n // 3136), seed=11)
    x = pipeline.extract_patches(crops, net.variables, Config(max_patches=None), progress=False)
    return fileio.atomic_write(path, lambda f: np.save(f, x[:n].astype(np.float16)))


def _image_patches(images: int) -> Path:
    """Every ``[images * 3136, 1792]`` patch embedding of whole photo crops, float32, cached."""
    path = Path(FLAGS.workdir) / f"images_{images}_f32.npy"
    if path.exists():
        return path
    import numpy as np
    from sklearn.datasets import load_sample_images

    from protoad_jax import Config, fileio, pipeline, weights
    from protoad_jax.datasets import demo

    net = weights.random_backbone("wide_resnet50_2", "benchmark")
    crops = demo.photo_crops(load_sample_images().images, images, seed=11)
    x = pipeline.extract_patches(crops, net.variables, Config(max_patches=None), progress=False)
    return fileio.atomic_write(path, lambda f: np.save(f, x.astype(np.float32)))


def _clustering(name: str):
    """``protoad_jax.clustering.<name>``; in a --baseline from before that package,
    ``protoad_jax.<name>``."""
    try:
        return importlib.import_module(f"protoad_jax.clustering.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"protoad_jax.{name}")


def case(spec: dict) -> dict:
    """One measurement, run by ``harness.run_case`` in a fresh process."""
    import numpy as np

    kind = spec["kind"]
    if kind == "peaks":
        return {name: harness.matmul_gflops(name) for name in ("float32", "bfloat16")}
    x = np.load(spec["data"], mmap_mode="r")
    if kind == "merge" and len(x) < spec["m"]:
        raise ValueError(f"{spec['data']} has fewer than {spec['m']} rows")
    if kind == "finch":
        x = np.asarray(x[:spec["n"]])
        finch = _clustering("finch")
        t = time.perf_counter()
        res = finch.finch(x, num_clusters=spec["k"])
        seconds = time.perf_counter() - t
        out = {"seconds": seconds, "levels": [int(c) for c in res.num_clusters],
               "required_level": res.required_level}
        stats = getattr(res, "stats", None)
        if stats:
            out["stats"] = stats
        return out
    if kind == "level0":  # the level-0 neighbour search alone (both implementations)
        x = np.asarray(x[:spec["n"]])
        finch = _clustering("finch")
        t = time.perf_counter()
        if hasattr(finch, "_first_neighbours"):  # before: float32 argmax, rectangular sweep
            finch.first_neighbours(x).block_until_ready()
        else:
            _clustering("neighbours").first_neighbours(x)
        return {"seconds": time.perf_counter() - t}
    if kind == "factored":  # unfactored vs factored level-0 search and FINCH, one process
        from protoad_jax.clustering import finch, neighbours

        x = np.asarray(x)
        grid = neighbours.PatchGrid(spec["images"], 56, 56)
        out = {}
        for name, g in (("unfactored", None), ("factored", grid)):
            neighbours.first_neighbours(x[:4 * 3136], grid=None if g is None else  # compile
                                        neighbours.PatchGrid(4, 56, 56))
            t = time.perf_counter()
            nb = neighbours.first_neighbours(x, grid=g)
            out[name] = {"level0": time.perf_counter() - t, "index": nb.index,
                         "sim": nb.similarity, "reranked": nb.reranked,
                         "fallbacks": nb.fallbacks, "factored": nb.factored}
            t = time.perf_counter()
            res = finch.finch(x, num_clusters=spec["k"], grid=g)
            out[name].update(finch=time.perf_counter() - t, labels=res.required_labels,
                             levels=res.num_clusters)
        a, b = out["unfactored"], out["factored"]
        same = bool(np.array_equal(a.pop("index"), b.pop("index"))
                    and np.array_equal(a.pop("sim"), b.pop("sim"))
                    and np.array_equal(a.pop("labels"), b.pop("labels"))
                    and a["levels"] == b["levels"])
        return {"same": same, "unfactored": a, "factored": b}
    if kind == "merge":
        merging = _clustering("merging")
        m = spec["m"]
        sums = np.asarray(x[:m], np.float64)
        stats: dict = {}
        t = time.perf_counter()
        merging.merge_closest(sums, np.ones(m), spec["k"], stats=stats)
        return {"seconds": time.perf_counter() - t, **stats}
    if kind == "coreset":
        coreset = _clustering("coreset")
        big = np.empty((spec["n"], x.shape[1]), np.float16)  # the pipeline's all-patch array
        for s in range(0, spec["n"], len(x)):
            big[s:s + len(x)] = x[:min(len(x), spec["n"] - s)]
        big += np.float16(1e-3) * np.random.default_rng(0).standard_normal(
            (1, x.shape[1])).astype(np.float16)
        t = time.perf_counter()
        idx = coreset.greedy_coreset(big, spec["budget"], 0)
        return {"seconds": time.perf_counter() - t, "kept": len(idx)}
    raise ValueError(kind)


def _run(spec: dict, protoad_root: Path | None = None) -> dict:
    """``case(spec)`` in a fresh process, importing protoad_jax from ``protoad_root`` (default:
    this checkout)."""
    return harness.run_case("cluster_benchmark", spec, protoad_root=protoad_root)


def _baseline_tree(rev: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="protoad_baseline_"))
    archive = subprocess.run(["git", "-C", str(harness.REPO), "archive", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main(argv):
    del argv
    harness.setup()
    lines = [(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")]

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    peaks = {}
    if "peaks" in FLAGS.cases:
        peaks = _run({"kind": "peaks"})
        if "error" in peaks:
            emit(f"\nMatmul peaks: error {peaks.pop('error')[-300:]!r}")
            peaks = {}
        else:
            emit(f"\nMatmul peaks (jitted 4096 x 1792 x 4096): float32 {peaks['float32']:.0f} "
                 f"GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")
    if "finch" in FLAGS.cases:
        n, k = FLAGS.finch_n, FLAGS.k
        data = str(_patches(n))
        emit(f"\nFINCH, {n} real-photo patches (float16), K={k}:\n")
        emit("| implementation | total s | level-0 search s | effective GFLOP/s (2 n^2 d / s) | "
             "of float32 peak | levels | peak RSS MB |")
        emit("|---|---|---|---|---|---|---|")
        impls = [("this checkout", None)]
        if FLAGS.baseline:
            impls = [(f"before ({FLAGS.baseline})", _baseline_tree(FLAGS.baseline)),
                     ("after (this checkout)", None)]
        for name, tree in impls:
            r = _run({"kind": "finch", "data": data, "n": n, "k": k}, tree)
            l0 = _run({"kind": "level0", "data": data, "n": n}, tree)
            if "error" in r or "error" in l0:
                emit(f"| {name} | error: {(r.get('error') or l0.get('error'))[-200:]!r} |||||")
                continue
            gf = 2 * n * n * 1792 / l0["seconds"] / 1e9
            frac = f"{gf / peaks['float32']:.0%}" if peaks else "—"
            emit(f"| {name} | {r['seconds']:.1f} | {l0['seconds']:.1f} | {gf:.0f} | {frac} | "
                 f"{r['levels']} | {r['peak_mb']:.0f} |")
            if "stats" in r:
                for lv, s in enumerate(r["stats"]["levels"]):
                    emit(f"  level {lv}: {s['n']} rows, re-ranked in float64 {s['reranked'] / s['n']:.1%}, "
                         f"device fallbacks {s['fallbacks']}, exhaustive float64 {s['exhaustive']}, "
                         f"duplicates {s['duplicates']}")
                if "merge" in r["stats"]:
                    emit(f"  required K: merged from {r['stats']['merge']['start']} clusters "
                         f"(level {r['required_level']}), {r['stats']['merge']['refreshes']} refreshes")
    if "merge" in FLAGS.cases:
        emit(f"\nClosest-pair merging down to K={FLAGS.k} (merging.merge_closest; singleton clusters "
             "= real-photo patches):\n")
        emit("| start clusters | seconds | refreshes | exact cosines | peak RSS MB | run or projected |")
        emit("|---|---|---|---|---|---|")
        last = None
        for m in sorted(map(int, FLAGS.merge_sizes)):
            if m > FLAGS.merge_run_max and last is not None:
                lm, lr = last
                s = lr["seconds"] * (m / lm) ** 2  # candidate pass ~m^2 d, screens ~m per merge
                mb = lr["peak_mb"] * m / lm
                emit(f"| {m} | ~{s:.0f} | — | — | ~{mb:.0f} | projected from {lm} (time ~m^2, "
                     "memory ~m) |")
                continue
            r = _run({"kind": "merge", "data": str(_patches(m)), "m": m, "k": FLAGS.k})
            if "error" in r:
                emit(f"| {m} | error: {r['error'][-200:]!r} ||||")
                continue
            emit(f"| {m} | {r['seconds']:.1f} | {r['refreshes']} | {r['exact']} | "
                 f"{r['peak_mb']:.0f} | run |")
            last = (m, r)
    if "coreset" in FLAGS.cases:
        n, b = FLAGS.coreset_n, FLAGS.coreset_budget
        r = _run({"kind": "coreset", "data": str(_patches(min(n, 62720))), "n": n, "budget": b})
        emit(f"\nCoreset over {n} x 1792 float16 patches, budget {b}: " + (
            f"{r['seconds']:.1f} s ({r['seconds'] / b * 1000:.1f} ms per pick), peak RSS "
            f"{r['peak_mb']:.0f} MB" if "error" not in r else f"error {r['error'][-300:]!r}"))
    if "factored" in FLAGS.cases:
        m, k = FLAGS.factored_images, FLAGS.k
        r = _run({"kind": "factored", "data": str(_image_patches(m)), "images": m, "k": k})
        emit(f"\nLevel-0 first neighbours and FINCH (K={k}) on every patch of {m} whole images "
             f"({m * 3136} x 1792 float32), unfactored vs factored (PatchGrid), one process:\n")
        if "error" in r:
            emit(f"error {r['error'][-300:]!r}")
        else:
            emit("| candidate pass | level-0 search s | FINCH s | re-ranked | fallbacks |")
            emit("|---|---|---|---|---|")
            for name in ("unfactored", "factored"):
                s = r[name]
                emit(f"| {name} | {s['level0']:.1f} | {s['finch']:.1f} | {s['reranked']} | "
                     f"{s['fallbacks']} |")
            emit(f"\nSame first neighbours, levels and K labels: {'yes' if r['same'] else 'NO'}; "
                 f"level-0 speed-up {r['unfactored']['level0'] / r['factored']['level0']:.2f}x")
    if FLAGS.output:
        from protoad_jax import fileio
        fileio.atomic_write(Path(FLAGS.output), lambda f: f.write("\n".join(lines) + "\n"), mode="w")


if __name__ == "__main__":
    sys.exit(app.run(main))
