"""Speed and memory of protoad_jax against the PyTorch reference, measured side by side in one run.

Commands (each prints markdown tables; one module per measurement in this folder, imported by
name: Python puts a script's own folder first on sys.path):
  python scripts/benchmarks/benchmark.py all [--output=PATH]   # every table below but backbone; rewrites docs/benchmarks.md
  python scripts/benchmarks/benchmark.py e2e --e2e_ks=100,1000,10000 --e2e_batch_sizes=8
  python scripts/benchmarks/benchmark.py head --head_ks=100,1000,10000 --head_chunked_ks=10000,100000
  python scripts/benchmarks/benchmark.py probe
  python scripts/benchmarks/benchmark.py data --data_images=32
  python scripts/benchmarks/benchmark.py cluster --cluster_sizes=10000,100000 [--full]   # --full adds 1.23M
  python scripts/benchmarks/benchmark.py scale --scale_images=391
  python scripts/benchmarks/benchmark.py backbone --batch_sizes=1,8
  python scripts/benchmarks/benchmark.py deploy --deploy_batch_sizes=1,8 --deploy_k=1000

Tables and their columns:
  e2e       (e2e.py) full scoring path, make_scorer vs the concatenated head (before) and
            torch_reference.reference_scores: K | measure (batch 1 latency p50/p90 ms, batch b
            img/s) | protoad_jax | before | torch reference | vs before | jax speed-up | jax
            compile s; notes: recompiles after warm-up.
  head      (head.py) backbone stages -> patch map, the factored head vs the concatenated one
            (before) and torch, per K, full and chunked: K | mode | jax, before and torch
            ms/img (b=1) and img/s (batch) | speed-ups | jax GFLOP/s | XLA temp MB.
  probe     (torch_probe.py) torch trunk at batch 1 with 1 and --threads threads:
            torch threads | min | median | max (s per call), and whether load disturbed torch.
  data      (data.py) input_pipeline.batched on generated PNGs: PNG size | mean file KB |
            decode threads | img/s; in ``all`` also score_images from files against e2e.
  cluster   (cluster.py) finch.finch and kmeans.kmeans on random clustered patches, one
            fresh process per case: method | N | storage | s (run) | compile s | peak RSS MB |
            data MB | runtime MB | result; larger N projected (marked) unless run; then the
            fit-stage tables of cluster_benchmark.py (--nofit_stage skips them).
  scale     (scale.py) fit() at MVTec's largest category size in a fresh process: case |
            patches kept | storage | features s | clustering s | total s | peak RSS MB.
  backbone  (backbone.py) Flax WideResNet to layer3 vs torchvision: batch | jax img/s |
            torch img/s | jax speed-up | jax compile s.
  deploy    (deploy.py; not in ``all``; needs the [deploy] extra and onnxscript) JAX make_scorer,
            our scorer.onnx under ONNX Runtime and OpenVINO f32/bf16 (bf16 where lscpu shows
            amx_bf16 or avx512_bf16), and the anchor: the published network to the patch map,
            torch.onnx dynamo export (opset 18), same OpenVINO and precision; also our export
            with chunk_size=512, an ONNX Loop (--nodeploy_chunked drops it): path | precision | batch 1
            latency ms | batch b img/s | GFLOP/s | % of the matmul peak at that precision |
            vs anchor | vs JAX f32.

A quick check that every measurement runs (tiny sizes, writes a throwaway file; about 2 min on
2 cores):
  python scripts/benchmarks/benchmark.py all --output=/tmp/benchmarks.md --e2e_ks=1000 \
    --e2e_batch_sizes=2 --latency_repeats=1 --repeats=1 --head_ks=10 --head_chunked_ks=10 \
    --chunk_size=4 --head_batch=2 --data_sizes=64 --data_images=2 --data_batch=2 \
    --cluster_sizes=200,400 --cluster_float16_sizes=200 --cluster_k=10 --kmeans_iters=2 \
    --scale_images=2 --nofit_stage

Random weights and prototypes: speed does not depend on their values. Needs the reference
extra: pip install -e ".[test]".
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import backbone
import cluster
import data
import deploy
import e2e
import harness
import head
import scale
import torch_probe
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "all: markdown file to rewrite (default docs/benchmarks.md).")


def run_all() -> list[harness.Table]:
    results: dict = {}  # e2e's images/s, for data's comparison table
    start, load_start = time.time(), os.getloadavg()
    tables = (e2e.run(results) + head.run() + torch_probe.run() + data.run(results)
              + cluster.run() + scale.run())
    out = Path(FLAGS.output) if FLAGS.output else harness.OUTPUT
    harness.write_benchmarks(out, tables, start, load_start)
    return tables


COMMANDS = {"e2e": e2e.run, "head": head.run, "probe": torch_probe.run, "data": data.run,
            "cluster": cluster.run, "scale": scale.run, "backbone": backbone.run, "deploy": deploy.run,
            "all": run_all}


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: benchmark.py {{{'|'.join(COMMANDS)}}} [flags]")
    harness.setup()
    COMMANDS[argv[1]]()


if __name__ == "__main__":
    sys.exit(app.run(main))
