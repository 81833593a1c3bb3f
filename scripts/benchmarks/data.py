"""data: the host data path ``input_pipeline.batched`` (PIL decode + LANCZOS resize + crop on a thread
pool) in images/s on generated photo-like PNGs; within ``all``, also ``score_images`` from the
PNG files against e2e's preprocessed-batch rate."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import harness
import jax
import numpy as np
from absl import flags
from harness import FLAGS, Table
from PIL import Image

from protoad_jax import evaluation, input_pipeline, pipeline
from protoad_jax.config import Config

flags.DEFINE_list("data_sizes", ["700", "1024"], "data: side of the generated square PNGs.")
flags.DEFINE_integer("data_images", 32, "data: PNGs written per size.")
flags.DEFINE_integer("data_batch", 8, "data: batch size of input_pipeline.batched.")


def run(results: dict | None = None) -> list[Table]:
    """Prints and returns the data table, and with e2e's ``results`` at K = Config's default and
    batch --data_batch, the comparison table."""
    threads = sorted({1, input_pipeline.default_num_threads()})
    b = FLAGS.data_batch
    table = Table(f"data: input_pipeline.batched (PNG decode + LANCZOS resize 256 + crop 224), batch {b}",
                  ["PNG size", "mean file KB", "decode threads", "img/s"])
    compare = Table("data path vs scoring (same run)", ["measure", "img/s"])
    with tempfile.TemporaryDirectory(prefix="protoad_bench_") as tmp:
        rates, paths = {}, {}
        for size in map(int, FLAGS.data_sizes):
            paths[size] = _write_pngs(Path(tmp), size, FLAGS.data_images)
            kb = sum(p.stat().st_size for p in paths[size]) / len(paths[size]) / 1024
            for t in threads:
                run_once = functools.partial(_drain, paths[size], b, t)
                run_once()  # warm-up: page cache, thread pool start
                rates[size, t] = len(paths[size]) / harness.medians(run_once)[0]
                table.add(f"{size}x{size}", kb, t, rates[size, t])
        k = evaluation.DEFAULT_K
        if results is not None and ("e2e_img_s", k, b) in results:
            size, t = max(paths), threads[-1]
            device, host = results[("e2e_img_s", k, b)], rates[size, t]
            files = _score_files(paths[size], b)
            compare.add(f"e2e protoad_jax, preprocessed batch {b}, K={k}", device)
            compare.add(f"input_pipeline.batched alone, {size}x{size} PNG, {t} threads", host)
            compare.add(f"score_images on {size}x{size} PNG paths, batch {b} (decode overlapped "
                        "with scoring)", files)
            compare.notes += [
                (f"the data path alone is {host / device:.1f}x the scoring rate, so it "
                 f"{'keeps' if host >= device else 'does not keep'} up here; scoring from files "
                 f"reaches {files / device:.0%} of the preprocessed-batch rate."),
                ("on this CPU machine decoding and XLA share the same cores. On an accelerator "
                 "the scoring rate is far higher: divide it by the per-thread decode rate above "
                 "to size input_pipeline.batched's num_threads."),
            ]
    table.notes.append(f"{FLAGS.data_images} generated PNGs per size (smooth random RGB fields + "
                       "noise, PIL default compression); median of full passes after a warm-up "
                       "pass.")
    return [table.print()] + ([compare.print()] if compare.rows else [])


def _write_pngs(folder: Path, size: int, n: int) -> list[Path]:
    """``n`` photo-like RGB PNGs (smooth random fields + sensor noise) of ``size x size``."""
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


def _drain(paths, batch: int, threads: int) -> None:
    for _ in input_pipeline.batched(paths, batch, num_threads=threads):
        pass


def _score_files(paths: list[Path], batch: int) -> float:
    _, variables = harness.models()
    k = evaluation.DEFAULT_K
    model = pipeline.Model(harness.prototypes(k), Config(num_prototypes=k, arch=FLAGS.arch))
    run = functools.partial(pipeline.score_images, model, paths, variables, batch_size=batch,
                            progress=False)
    jax.block_until_ready(run().scores)  # compiled already by e2e; warms the file cache
    return len(paths) / harness.medians(run, repeats=min(FLAGS.repeats, 2))[0]
