"""Predict across processes: each process's shard of the tables, and process 0's merge.

In a multi-process ``predict`` (docs/distributed.md) every process scores its block of the
inputs (``distributed.block``) and writes its images' overlays and masks straight into the
output folder ``O`` (distinct files), and its tables into its shard folder
``O/.shards/process_<i>_of_<n>/``: ``predictions.csv``, ``regions.json`` (as
``prediction.write_predictions`` writes them), ``scores.npy`` (the exact float32 scores, for the
histogram) and, last, ``done.json`` (what the shard covered, its maps' value range): a rerun
with the same inputs and settings keeps a shard that has it. Process 0 merges the shards in
process order into ``O/predictions.csv``, ``O/regions.json`` and ``O/score_histogram.png``:
the rows in input order, as one process writes them. Every file is written atomically.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from protoad_jax import fileio, prediction, report

FOLDER = ".shards"


def folder(out_dir: str | os.PathLike, index: int, count: int) -> Path:
    """Process ``index``'s shard folder of ``count`` under the output folder."""
    return Path(out_dir) / FOLDER / f"process_{index}_of_{count}"


def finished(shard: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's ``done.json`` when it exists and covered ``key`` (inputs and settings)."""
    done = shard / "done.json"
    if not done.is_file():
        return None
    with open(done) as f:
        record = json.load(f)
    return record if record.get("key") == key else None


def mark_done(shard: Path, key: dict[str, Any], scores: np.ndarray,
              value_range: tuple[float, float], threshold: float | None) -> None:
    """Writes the shard's ``scores.npy``, then ``done.json`` (last: marks the shard finished)."""
    fileio.atomic_write(shard / "scores.npy", lambda f: np.save(f, np.asarray(scores, np.float32)))
    fileio.write_json(shard / "done.json", {"key": key, "value_range": list(value_range),
                                            "threshold": threshold})


def mark_empty(shard: Path, key: dict[str, Any]) -> None:
    """A finished shard of no inputs (more processes than inputs)."""
    fileio.write_csv(shard / "predictions.csv", prediction.CSV_COLUMNS, [])
    fileio.write_json(shard / "regions.json", {"images": []})
    mark_done(shard, key, np.zeros(0, np.float32), (float("inf"), float("-inf")), None)


def merge(out_dir: str | os.PathLike, count: int, threshold: float | None) -> prediction.Summary:
    """Process 0: the ``count`` shards' tables as ``O/predictions.csv``, ``O/regions.json`` and
    ``O/score_histogram.png``; returns the ``Summary`` of every row."""
    out = Path(out_dir)
    rows: list[dict[str, str]] = []
    images: list[dict] = []
    header: dict | None = None
    scores = []
    for i in range(count):
        shard = folder(out, i, count)
        with open(shard / "predictions.csv", newline="") as f:
            rows += list(csv.DictReader(f))
        with open(shard / "regions.json") as f:
            table = json.load(f)
        images += table.pop("images")
        header = header or table
        scores.append(np.load(shard / "scores.npy", allow_pickle=False))
    fileio.write_csv(out / "predictions.csv", prediction.CSV_COLUMNS, rows)
    fileio.write_json(out / "regions.json", {**(header or {}), "images": images})
    report.write_score_histogram(out / "score_histogram.png", np.concatenate(scores), threshold)
    return prediction.Summary([_row(r) for r in rows], threshold)


def _row(r: dict[str, str]) -> prediction.Prediction:
    return prediction.Prediction(Path(r["path"]), r["status"], float(r["score"]) if r["score"] else None,
                                 r["anomalous"], int(r["regions"]) if r["regions"] else None)
