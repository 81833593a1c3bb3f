"""The views through the command line (issue 19): ``scripts/evaluate.py --view=full_frame`` and
``--view=tiles`` end to end on a tiny folder dataset, ``scripts/predict.py`` with the tiles model
(calibration with another ``--tile_overlap`` leaves the model file as it was), and bad view
flags as one ``error:`` line.

Random-init WideResNet-50-2 (the ImageNet file cannot be downloaded here): the checks are on the
outputs' contract (views recorded, maps at the original resolution, the model file's settings),
not on detection quality. The runs share one compile cache folder: every view scores 224 x 224
inputs, so later runs reuse the first run's compiled programs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from protoad_jax import load_model, views, weights
from protoad_jax.datasets import demo

REPO = Path(__file__).resolve().parents[1]
SIDE = 160  # demo images; tiles of 128 with overlap 64 make 2 x 2 tiles per image
TILES = ["--view=tiles", "--tile_size=128", "--tile_overlap=64"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("views_cli")
    root = demo.make_demo_dataset(d / "data", seed=3, n_train=3, n_test_good=2, n_test_bad=2,
                                  size=SIDE, categories=("demo_object",))
    w = weights.save_variables(d / "random_wrn.npz", weights.random_variables("wide_resnet50_2"))
    return {"dir": d, "category": root / "demo_object", "weights": w, "cache": d / "compiled"}


def _run(setup, script: str, *args: str) -> subprocess.CompletedProcess:
    # This checkout's protoad_jax, not whichever copy is pip-installed.
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args, "--noprogress",
                          f"--compile_cache_dir={setup['cache']}"],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    print(script, *args, res.stdout[-2000:], res.stderr[-2000:], sep="\n")
    return res


def _evaluate(setup, out: Path, *view_flags: str) -> dict:
    res = _run(setup, "evaluate.py", "--dataset=folder", f"--data_dir={setup['category']}",
               f"--weights={setup['weights']}", f"--output_dir={out}", "--num_prototypes=20",
               "--max_patches=2000", "--num_overlays=1", *view_flags)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def _one_error_line(res: subprocess.CompletedProcess, *says: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[-1].startswith("error: ") and all(s in lines[-1] for s in says), lines[-1]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, lines
    return lines[-1]


def test_evaluate_full_frame_and_tiles_then_predict_with_the_tiles_model(setup, tmp_path):
    d = setup["dir"]
    frame = _evaluate(setup, d / "full_frame", "--view=full_frame")
    assert frame["settings"]["view"] == "full_frame"
    tiles = _evaluate(setup, d / "tiles", *TILES)
    assert tiles["settings"]["view"] == "tiles"
    assert (tiles["settings"]["config"]["tile_size"], tiles["settings"]["config"]["tile_overlap"]) == (128, 64)
    for summary in (frame, tiles):  # metrics computed on the defective test images' masks
        (cat,) = summary["categories"]
        print(summary["settings"]["view"], {k: v for k, v in cat.items() if "auroc" in k})
        assert 0.0 <= cat["image_auroc"] <= 1.0 and 0.0 <= cat["pixel_auroc"] <= 1.0, cat

    model_path = d / "tiles" / "demo_object" / "model.npz"
    model = load_model(model_path)
    per_image = views.tile_layout(SIDE, SIDE, 128, 64, None, "demo").num_tiles
    assert model.config.view == "tiles" and model.info["num_inputs"] == 3 * per_image == 12
    saved = model_path.read_bytes()

    # predict with the tiles model: --calibrate_dir with another overlap uses the threshold for
    # this run and leaves the model file byte for byte as it was.
    test_dir, train_dir = setup["category"] / "test", setup["category"] / "train" / "good"
    out = tmp_path / "pred"
    res = _run(setup, "predict.py", f"--model={model_path}", f"--input={test_dir}",
               f"--output_dir={out}", f"--calibrate_dir={train_dir}", "--calibrate_quantile=1.0",
               "--tile_overlap=32")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "not saved" in res.stdout and model_path.read_bytes() == saved
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["anomalous"] in ("yes", "no") for r in rows), rows
    assert json.loads((out / "regions.json").read_text())["view"] == "tiles"
    # Without an overlap override the threshold is saved, and the settings stay the model's;
    # --threshold=-1 (this run only) flags every image, so each gets its mask.
    out = tmp_path / "pred2"
    res = _run(setup, "predict.py", f"--model={model_path}", f"--input={test_dir}",
               f"--output_dir={out}", f"--calibrate_dir={train_dir}", "--threshold=-1")
    assert res.returncode == 0 and "saved into" in res.stdout, res.stderr[-2000:]
    again = load_model(model_path)
    assert again.threshold is not None and again.config == model.config
    doc = json.loads((out / "regions.json").read_text())
    assert doc["view"] == "tiles" and len(doc["images"]) == 4
    for entry in doc["images"]:  # masks at the original resolution, every pixel scored
        assert entry["image_size"] == [SIDE, SIDE]
        assert Image.open(out / entry["mask"]).size == (SIDE, SIDE)

    # The model's view only: another one is one line naming the flag and the fix.
    res = _run(setup, "predict.py", f"--model={model_path}", f"--input={test_dir}",
               f"--output_dir={tmp_path / 'pred3'}", "--view=full_frame")
    _one_error_line(res, "--view=full_frame", str(model_path), "refit")
    assert not (tmp_path / "pred3" / "predictions.csv").exists()


@pytest.mark.parametrize("args, says", [
    (["--view=diagonal"], ("--view", "diagonal")),
    (["--view=tiles", "--tile_size=128", "--tile_overlap=128"], ("overlap", "128")),
    (["--view=tiles", "--tile_size=512"], ("512",)),  # a tile larger than the 160 px images
], ids=["unknown_view", "overlap_not_below_tile", "tile_larger_than_image"])
def test_evaluate_bad_view_flags_are_one_line(setup, tmp_path, args, says):
    out = tmp_path / "out"
    res = _run(setup, "evaluate.py", "--dataset=folder", f"--data_dir={setup['category']}",
               f"--weights={setup['weights']}", f"--output_dir={out}", *args)
    print(_one_error_line(res, *says))
    assert not list(out.rglob("*.json")) and not list(out.rglob("*.npz"))

