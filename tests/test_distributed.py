"""Several processes, one job (protoad_jax.distributed), with real processes: 2 processes x 2
forced CPU devices, a localhost coordinator on a free port, gloo collectives.

Oracles are one-process runs of the same commands: fit's prototypes, and split scoring's maps,
scores and skip reasons, must be bit-for-bit those of one process on one device; evaluate's outputs those of one process on 2 devices (each category
is then the same computation); predict's tables exactly, its overlays to one 8-bit level (its
shares batch the images differently: the maps agree to float32 ulps, docs/evaluation.md). A
process killed mid-run ends the other with one error line, nothing half-written.
The backbone is a random-init wide_resnet50_2 saved to .npz; the images are tiny.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoad_jax import weights
from protoad_jax.datasets import demo

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds_", "fit_info")  # result keys that are wall-clock times (differ run to run)
EVAL_ARGS = ["--dataset=mvtec", "--num_prototypes=20", "--max_patches=2000", "--num_overlays=1",
             "--batch_size=2", "--noprogress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    weights.save_variables(root / "wrn.npz", weights.random_variables("wide_resnet50_2"))
    data = demo.make_demo_dataset(root / "data", seed=3, n_train=5, n_test_good=3, n_test_bad=3,
                                  size=96)
    return root, data


def _env(devices: int, **extra: str) -> dict:
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
    return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=path,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one(cmd: list[str], devices: int) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=_env(devices),
                         timeout=600, check=False)
    print(res.stdout[-2000:], res.stderr[-2000:])
    assert res.returncode == 0
    return res


def _start(cmd: list[str], processes: int = 2) -> list[subprocess.Popen]:
    """``processes`` processes of ``cmd`` (2 devices each) with the coordinator flags."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, *cmd, f"--coordinator_address=127.0.0.1:{port}",
                              f"--num_processes={processes}", f"--process_id={i}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(2)) for i in range(processes)]


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        print(f"--- rc {p.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}")
        out.append((p.returncode, stdout, stderr))
    return out


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if not k.startswith(TIMING)}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in csv.DictReader(f)]


def test_fit_and_scoring_across_processes_are_bit_identical(files):
    """FINCH on every patch (factored level 0) and on a seeded sample, k-means, the coreset:
    prototypes of 2 processes x 2 devices == one process on one device (np.array_equal).
    Scoring split over the processes (``score_images(..., across_processes=True)``, one image
    per device per batch in both runs): maps, scores, patch maps, tiles' stitched frames,
    inputs and skip reasons == one process's, for blocks of 3 + 3 with an unreadable file
    (center crop and tiles), one image (process 0 has none), and a block of unreadable files
    only (one process would still score the other two)."""
    root, data = files
    worker = str(REPO / "tests" / "distributed_worker.py")
    images = str(data / "demo_object" / "train" / "good")
    bad = root / "unreadable.png"
    bad.write_bytes(b"not an image")
    t0 = time.perf_counter()
    _one([worker, str(root / "wrn.npz"), images, str(bad), str(root / "fit1.npz")], devices=1)
    t1 = time.perf_counter()
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, worker, str(root / "wrn.npz"), images, str(bad),
                               str(root / "fit2.npz")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    assert [rc for rc, _, _ in _finish(procs)] == [0, 0]
    print(f"one process {t1 - t0:.1f} s, two processes {time.perf_counter() - t1:.1f} s")
    one, two = np.load(root / "fit1.npz"), np.load(root / "fit2.npz")
    assert list(one["devices"]) == [1, 1] and list(two["devices"]) == [4, 2]
    for name in ("finch_all", "finch_sample", "kmeans_sample", "coreset"):
        diff = np.abs(one[name].astype(np.float64) - two[name]).max()
        print(f"{name}: {one[name].shape}, max |diff| {diff}")
        assert np.array_equal(one[name], two[name]), name
    scored = sorted(k for k in one.files if "/" in k)
    assert scored == sorted(k for k in two.files if "/" in k)
    assert {"tiles/frame_0", "one_image/patch_maps"} <= set(scored)
    for key in scored:
        a, b = one[key], two[key]
        diff = np.abs(a.astype(np.float64) - b).max(initial=0) if a.dtype.kind == "f" else int((a != b).sum())
        print(f"{key}: {a.shape}, max |diff| {diff}")
        assert a.dtype == b.dtype and np.array_equal(a, b), key
    assert len(one["mixed/skipped"]) == 1 and one["mixed/skipped"][0].startswith(f"{bad}: ")
    assert len(one["unreadable_block/skipped"]) == 2
    assert len(one["mixed/scores"]) == 5 and len(one["unreadable_block/scores"]) == 2


def test_evaluate_and_predict_across_processes_match_one_process(files):
    root, data = files
    evaluate, predict = str(REPO / "scripts" / "evaluate.py"), str(REPO / "scripts" / "predict.py")
    base = [evaluate, *EVAL_ARGS, f"--data_dir={data}", f"--weights={root / 'wrn.npz'}"]
    both = "--categories=demo_object,demo_texture"
    _one([*base, both, f"--output_dir={root / 'e1'}"], devices=2)
    results = _finish(_start([*base, both, f"--output_dir={root / 'e2'}"]))
    assert [rc for rc, _, _ in results] == [0, 0]
    assert "== demo_object" in results[0][1] and "== demo_texture" in results[1][1]  # round robin
    # One category, two processes: fitted by both together (joint), written by process 0.
    joint = _finish(_start([*base, "--categories=demo_object", f"--output_dir={root / 'e3'}"]))
    assert [rc for rc, _, _ in joint] == [0, 0]
    for out, cats in ((root / "e2", ("demo_object", "demo_texture")), (root / "e3", ("demo_object",))):
        for cat in cats:
            a, b = root / "e1" / cat, out / cat
            for rel in ["scores.csv", *sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png"))]:
                assert (a / rel).read_bytes() == (b / rel).read_bytes(), (out, cat, rel)
            pa, pb = np.load(a / "model.npz")["prototypes"], np.load(b / "model.npz")["prototypes"]
            assert np.array_equal(pa, pb), (out, cat)
            ra, rb = (_without_timing(json.loads((d / "result.json").read_text())) for d in (a, b))
            assert ra == rb, (out, cat)
    summary = json.loads((root / "e2" / "results.json").read_text())
    assert _without_timing(summary) == _without_timing(json.loads((root / "e1" / "results.json").read_text()))
    assert _csv(root / "e2" / "results.csv") == _csv(root / "e1" / "results.csv")
    assert not list((root / "e2").rglob("*.tmp"))

    # predict: 6 images split 3 + 3; a threshold that flags some, so masks and regions exist.
    model = root / "e1" / "demo_object" / "model.npz"
    with open(root / "e1" / "demo_object" / "scores.csv") as f:
        threshold = float(np.median([float(r["score"]) for r in csv.DictReader(f)]))
    args = [predict, f"--model={model}", f"--input={data / 'demo_object' / 'test'}",
            f"--threshold={threshold}", "--noprogress", "--batch_size=2"]
    _one([*args, f"--output_dir={root / 'p1'}"], devices=1)
    assert [rc for rc, _, _ in _finish(_start([*args, f"--output_dir={root / 'p2'}"]))] == [0, 0]
    p1, p2 = root / "p1", root / "p2"
    for rel in ("predictions.csv", "regions.json"):
        assert (p1 / rel).read_bytes() == (p2 / rel).read_bytes(), rel
    rows = _csv(p1 / "predictions.csv")
    assert len(rows) == 6 and 0 < sum(r["anomalous"] == "yes" for r in rows) < 6
    pngs = sorted(p.relative_to(p1).as_posix() for p in p1.rglob("*.png"))
    assert pngs == sorted(p.relative_to(p2).as_posix() for p in p2.rglob("*.png") if ".shards" not in p.parts)
    for rel in pngs:  # maps to float32 ulps: a pixel may round to the next 8-bit level
        if rel == "score_histogram.png":  # a score an ulp across a bin edge moves a whole bar
            assert Image.open(p1 / rel).size == Image.open(p2 / rel).size
            continue
        a = np.asarray(Image.open(p1 / rel), np.int16)
        b = np.asarray(Image.open(p2 / rel), np.int16)
        worst, changed = int(np.abs(a - b).max()), float(np.mean(a != b))
        print(f"{rel}: max |diff| {worst} levels, {changed:.2e} of the pixels differ")
        assert a.shape == b.shape and worst <= 1 and changed <= 1e-3, rel
    # A rerun keeps both finished shards and writes the same tables.
    again = _finish(_start([*args, f"--output_dir={p2}"]))
    assert all(rc == 0 and "shard finished earlier, kept" in out for rc, out, _ in again)
    assert (p1 / "predictions.csv").read_bytes() == (p2 / "predictions.csv").read_bytes()


def test_a_killed_process_ends_the_run_with_one_line(files):
    """Process 1 is killed while fitting its category: process 0 finishes its own, then its
    barrier fails; it exits with status 1 and one error line, and writes no merged results."""
    root, data = files
    out = root / "killed"
    cmd = [str(REPO / "scripts" / "evaluate.py"), *EVAL_ARGS, f"--data_dir={data}",
           f"--weights={root / 'wrn.npz'}", "--categories=demo_object,demo_texture",
           f"--output_dir={out}"]
    procs = _start(cmd)
    for line in procs[1].stdout:  # process 1's "== demo_texture": it is in its category
        if "== demo_texture" in line:
            break
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    (rc, _, stderr), = _finish(procs[:1], timeout=240)
    procs[1].wait()
    print(f"process 0 ended {time.monotonic() - t0:.1f} s after the kill")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "another process of this run stopped" in errors[0]
    assert not (out / "results.json").exists() and not list(out.rglob("*.tmp"))
    assert (out / "demo_object" / "result.json").exists()  # its own category is finished and kept
