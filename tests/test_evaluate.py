"""The main job end to end: scripts/evaluate.py and scripts/predict.py on generated datasets.

The backbone is random-init (saved to a .npz like converted weights): the ImageNet file cannot be
downloaded here. Random conv features still separate the demo's defects from the background well
(pixel AUROC 0.87-0.95 measured on the full demo); the "better than chance" assertions use 0.6,
far below that and far above the 0.5 of a detector that ignores the image.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from layouts import make_btad_like
from PIL import Image
from scipy.integrate import trapezoid

import protoad_jax
from protoad_jax import Config, datasets, errors, evaluation, load_model, metrics, report, weights
from protoad_jax.datasets import demo

REPO = Path(__file__).resolve().parents[1]
FAST = Config(resize=128, image_size=112, num_prototypes=40)  # small grids keep the suite fast
BETTER_THAN_CHANCE = 0.6


@pytest.fixture(scope="module")
def weights_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "random_wrn.npz"
    weights.save_variables(path, weights.random_variables("wide_resnet50_2"))
    return path


@pytest.fixture(scope="module")
def net(weights_npz):
    return weights.resolve_backbone(str(weights_npz))


def _tiny_mvtec(root: Path) -> Path:
    return demo.make_demo_dataset(root, seed=3, n_train=4, n_test_good=3, n_test_bad=4, size=128)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    # This checkout's protoad_jax, not whichever copy is pip-installed.
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args, "--noprogress"],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    print(res.stdout[-3000:], res.stderr[-3000:])
    return res


def test_run_category_mvtec_layout_outputs_and_metrics(tmp_path, net):
    root = _tiny_mvtec(tmp_path / "data")
    out = tmp_path / "out"
    res = evaluation.run_category("mvtec", root, "demo_object", out, FAST, net, batch_size=4,
                                  save_raw_maps=True, num_overlays=2, progress=False)
    for key in evaluation.METRICS:
        assert 0.0 <= res[key] <= 1.0, (key, res[key])
    print({k: round(res[k], 4) for k in evaluation.METRICS})
    assert res["pixel_auroc"] > BETTER_THAN_CHANCE, res["pixel_auroc"]
    cat = out / "demo_object"
    model = load_model(cat / "model.npz")
    assert model.prototypes.shape == (40, 1792)
    with open(cat / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and {r["label"] for r in rows} == {"0", "1"}
    maps = sorted((cat / "maps").rglob("*.npy"))
    assert len(maps) == 7 and np.load(maps[0]).shape == (112, 112) and np.load(maps[0]).dtype == np.float32
    assert len(list((cat / "overlays").glob("*.png"))) == 4
    assert json.loads((cat / "result.json").read_text())["num_test"] == 7
    # Charts: valid PNGs of the documented size, one per defined curve.
    assert res["plots"] == ["plots/roc.png", "plots/pro.png", "plots/score_histogram.png"]
    for rel in res["plots"]:
        with Image.open(cat / rel) as img:
            assert img.format == "PNG" and img.size == report.PLOT_SIZE, (rel, img.format, img.size)
            img.verify()
    # The ROC drawn is the one measured: its area (scipy's trapezoid) is the reported image AUROC,
    # and the F1-max threshold attains the reported F1-max, from the scores written to scores.csv.
    labels = np.array([r["label"] == "1" for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    roc = metrics.roc_curve(labels, scores)
    err = abs(trapezoid(roc.y, roc.fpr) - res["image_auroc"])
    pred = scores >= res["image_f1_threshold"]
    f1 = 2 * np.sum(pred & labels) / (pred.sum() + labels.sum())
    print(f"ROC area err {err:.2e}; F1 at the threshold {f1:.4f}, reported {res['image_f1_max']:.4f}")
    assert err <= 1e-9 and abs(f1 - res["image_f1_max"]) <= 1e-9


def test_btad_layout(tmp_path, net):
    root = make_btad_like(tmp_path / "btad", seed=1, n_train=4, n_test_ok=2, n_test_ko=3, size=128)
    res = evaluation.run_category("btad", root, "01", tmp_path / "out", FAST, net, batch_size=4,
                                  progress=False, num_overlays=1)
    print({k: res[k] for k in evaluation.METRICS})
    for key in evaluation.METRICS:
        assert res[key] is not None and 0.0 <= res[key] <= 1.0, (key, res[key])


def test_missing_ground_truth_gives_null_pixel_metrics(tmp_path, net, caplog):
    root = _tiny_mvtec(tmp_path / "data")
    shutil.rmtree(root / "demo_texture" / "ground_truth")
    res = evaluation.run_category("mvtec", root, "demo_texture", tmp_path / "out", FAST, net,
                                  batch_size=4, progress=False, num_overlays=1)
    assert res["pixel_auroc"] is None and res["aupro"] is None and res["pixel_f1_max"] is None
    assert res["image_auroc"] is not None
    assert "pixel metrics" in caplog.text


def test_bad_inputs_are_clear_errors(tmp_path, net):
    root = _tiny_mvtec(tmp_path / "data")
    with pytest.raises(ValueError, match="unknown category 'bottle'|bottle"):
        datasets.read_mvtec(root, "bottle")
    # a mask whose size differs from its image
    mask = next((root / "demo_object" / "ground_truth").rglob("*_mask.png"))
    Image.new("L", (100, 90)).save(mask)
    with pytest.raises(ValueError, match=r"mask .* is 100x90 but its image"):
        evaluation.run_category("mvtec", root, "demo_object", tmp_path / "o1", FAST, net, progress=False)
    # an empty train folder
    for p in (root / "demo_texture" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="train"):
        evaluation.run_category("mvtec", root, "demo_texture", tmp_path / "o2", FAST, net, progress=False)
    assert not (tmp_path / "o2" / "demo_texture" / "result.json").exists()


def test_corrupt_test_image_error_or_skip(tmp_path, net):
    root = _tiny_mvtec(tmp_path / "data")
    bad = root / "demo_object" / "test" / "good" / "001.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="001.png"):
        evaluation.run_category("mvtec", root, "demo_object", tmp_path / "o1", FAST, net, progress=False)
    res = evaluation.run_category("mvtec", root, "demo_object", tmp_path / "o2", FAST, net,
                                  skip_bad_images=True, progress=False, num_overlays=1)
    assert res["skipped_images"] == [str(bad)] and res["num_test"] == 6


def test_evaluate_cli_resume_and_predict(tmp_path, weights_npz):
    """The command line: an interrupted run (second category fails) resumes without redoing the first;
    then predict with a threshold calibrated on normal images flags the defects."""
    root = demo.make_demo_dataset(tmp_path / "data", seed=3, n_train=8, n_test_good=4, n_test_bad=4)
    bad = root / "demo_texture" / "train" / "good" / "000.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    args = ["--dataset=mvtec", f"--data_dir={root}", "--categories=demo_object,demo_texture",
            f"--weights={weights_npz}", f"--output_dir={out}", "--num_prototypes=200",
            "--max_patches=10000", "--num_overlays=1"]
    first = _run("evaluate.py", *args)
    assert first.returncode == 1 and "000.png" in first.stderr and "Traceback" not in first.stderr
    assert "--skip_bad_images" not in first.stderr  # training images cannot be skipped
    assert (out / "demo_object" / "result.json").exists()
    assert not (out / "demo_texture" / "result.json").exists()
    stamp = (out / "demo_object" / "result.json").stat().st_mtime_ns
    bad.write_bytes(good_bytes)
    second = _run("evaluate.py", *args)
    assert second.returncode == 0
    assert "demo_object: finished earlier, kept" in second.stdout
    assert (out / "demo_object" / "result.json").stat().st_mtime_ns == stamp
    summary = json.loads((out / "results.json").read_text())
    assert [c["category"] for c in summary["categories"]] == ["demo_object", "demo_texture"]
    assert summary["settings"]["sigma"] == 4.0 and summary["settings"]["seed"] == 0
    with open(out / "results.csv") as f:
        assert [r["category"] for r in csv.DictReader(f)] == ["demo_object", "demo_texture", "mean"]
    html = (out / "report.html").read_text()
    assert "demo_texture" in html and "overlays/" in html
    for cat in ("demo_object", "demo_texture"):
        for name in ("roc", "pro", "score_histogram"):
            assert f"src='{cat}/plots/{name}.png'" in html, (cat, name)
            assert (out / cat / "plots" / f"{name}.png").is_file()

    # Held-out normal images (another seed) calibrate; the training images would score too low.
    # A random-init backbone separates the demo's small, realistic defects only weakly at the
    # image level (image AUROC ~0.8), so predict is checked on held-out normal images and on
    # copies of them with a large stain (a 48 px blotch), which any backbone must flag.
    calib = demo.make_demo_dataset(tmp_path / "calib", seed=11, n_train=0, n_test_good=6, n_test_bad=0,
                                   categories=("demo_object",))
    inputs = tmp_path / "pred_in"
    for i in range(4):
        img = demo.demo_sample("demo_object", "good", i, seed=21, size=256).image.copy()
        (inputs / "good").mkdir(parents=True, exist_ok=True)
        (inputs / "stain").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(inputs / "good" / f"{i}.png")
        yy, xx = np.mgrid[:256, :256]
        blot = (yy - 100 - 10 * i) ** 2 + (xx - 150) ** 2 < 24 ** 2
        img[blot] = (200, 40, 160)
        Image.fromarray(img).save(inputs / "stain" / f"{i}.png")
    model = out / "demo_object" / "model.npz"
    pred = _run("predict.py", f"--model={model}", f"--input={inputs}", f"--output_dir={tmp_path / 'pred'}",
                f"--calibrate_dir={calib / 'demo_object' / 'test' / 'good'}", "--calibrate_quantile=1.0")
    assert pred.returncode == 0
    assert load_model(model).threshold is not None  # saved for later runs
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    flagged_bad = [r["anomalous"] == "yes" for r in rows if "/stain/" in r["path"]]
    flagged_good = [r["anomalous"] == "yes" for r in rows if "/good/" in r["path"]]
    print("defective flagged", flagged_bad, "normal flagged", flagged_good)
    assert all(flagged_bad), flagged_bad
    assert sum(flagged_good) <= 1, flagged_good
    assert len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == len(rows) == 8
    with Image.open(tmp_path / "pred" / "score_histogram.png") as img:
        assert img.format == "PNG" and img.size == report.PLOT_SIZE
    # Each flagged stain has a defect region over the stain (its centre inside the region's box).
    found = {e["path"]: e for e in json.loads((tmp_path / "pred" / "regions.json").read_text())["images"]}
    for i in range(4):
        entry = found[str(inputs / "stain" / f"{i}.png")]
        print(f"stain {i} at (150, {100 + 10 * i}): regions", [(r["box"], r["peak"]) for r in entry["regions"]])
        assert any(r["box"][0] <= 150 < r["box"][2] and r["box"][1] <= 100 + 10 * i < r["box"][3]
                   for r in entry["regions"]), entry["regions"]
        assert Image.open(tmp_path / "pred" / entry["mask"]).size == (256, 256)


def test_predict_cli_bad_image_skip_and_regions(tmp_path, weights_npz, net):
    """predict.py on non-square images and one unreadable file: without --skip_bad_images one clean
    error line names the file and the flag, and nothing is written; with it, the file is a
    "skipped" row and counted. A threshold below every score makes each image's one region its
    whole crop window, so the regions and masks are checked through the command line."""
    from protoad_jax import pipeline, regions

    train = demo.make_demo_dataset(tmp_path / "data", seed=3, n_train=4, n_test_good=0, n_test_bad=0,
                                   size=128, categories=("demo_object",))
    model = pipeline.fit(sorted((train / "demo_object" / "train" / "good").glob("*.png")), str(weights_npz),
                         config=FAST, variables=net.variables, progress=False)
    model.save(tmp_path / "model.npz")
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {"a_wide.png": (300, 200), "b_tall.png": (200, 300), "d_square.png": (160, 160)}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        img = demo.demo_sample("demo_object", "good", i, seed=21, size=max(w, h)).image[:h, :w]
        Image.fromarray(np.ascontiguousarray(img)).save(inputs / name)
    bad = inputs / "c_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = [f"--model={tmp_path / 'model.npz'}", f"--input={inputs}", "--threshold=-1", "--batch_size=4"]

    fail = _run("predict.py", *args, f"--output_dir={tmp_path / 'o1'}")
    lines = fail.stderr.strip().splitlines()
    assert fail.returncode == 1 and "Traceback" not in fail.stderr, fail.stderr
    assert lines[-1].startswith("error: image file " + str(bad)) and "--skip_bad_images" in lines[-1]
    assert not (tmp_path / "o1" / "predictions.csv").exists()

    ok = _run("predict.py", *args, f"--output_dir={tmp_path / 'o2'}", "--skip_bad_images")
    assert ok.returncode == 0
    assert "3 of 3 scored images anomalous; 1 skipped" in ok.stdout
    with open(tmp_path / "o2" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(inputs / n) for n in sorted([*sizes, bad.name])]
    assert [r["status"].split(":")[0] for r in rows] == ["ok", "ok", "skipped", "ok"], rows
    assert rows[2]["score"] == "" and rows[2]["status"].startswith("skipped: cannot decode")
    doc = json.loads((tmp_path / "o2" / "regions.json").read_text())
    assert len(doc["images"]) == 3 and doc["threshold"] == -1.0
    for entry in doc["images"]:
        w, h = sizes[Path(entry["path"]).name]
        box = list(regions.crop_window(w, h, FAST.resize, FAST.image_size).box)
        assert entry["image_size"] == [w, h] and entry["crop_box"] == box
        assert [r["box"] for r in entry["regions"]] == [box], entry
        mask = np.asarray(Image.open(tmp_path / "o2" / entry["mask"]))
        assert mask.shape == (h, w) and (mask[box[1]:box[3], box[0]:box[2]] == 255).all()
        assert mask.sum() == 255 * (box[2] - box[0]) * (box[3] - box[1])


def test_error_line_names_the_flag_only_where_skipping_applies():
    from protoad_jax import cli

    e = errors.BadImageError("image file x.png: cannot decode. Remove or replace the file.", "x.png")
    assert cli.error_line(e) == f"error: {e}"
    e.skippable = True
    assert cli.error_line(e).startswith(f"error: {e}") and "--skip_bad_images" in cli.error_line(e)
    wrapped = cli.clean_errors(lambda argv: (_ for _ in ()).throw(errors.DatasetError("no images")))
    assert wrapped([]) == 1
    with pytest.raises(KeyError):  # not an input problem: a traceback
        cli.clean_errors(lambda argv: {}["x"])([])


def test_missing_weights_errors_name_no_flag_and_the_scripts_add_it(tmp_path, monkeypatch, capsys):
    from protoad_jax import cli

    def offline(arch):
        raise weights.DownloadError("could not download U: refused. Download it by hand.", "U",
                                    tmp_path / "w.pth")

    monkeypatch.setattr(weights.backbones, "ensure_weights", offline)
    with pytest.raises(weights.NoWeightsError) as e:
        weights.resolve_backbone(None)
    print("resolve_backbone:", e.value)
    assert "could not download U" in str(e.value) and "--" not in str(e.value)
    random_model = protoad_jax.Model(np.eye(2, 1792, dtype=np.float32), Config())
    with pytest.raises(weights.NoWeightsError) as e:
        weights.backbone_for_model(random_model)
    assert "random-init backbone" in str(e.value) and "--" not in str(e.value)
    monkeypatch.setattr(weights.backbones, "ensure_weights", lambda arch: {}["bug"])
    with pytest.raises(KeyError):  # a bug is not "no weights": it propagates
        weights.resolve_backbone(None, demo=True)

    # The scripts add their flags: predict.py on a model that records no weights.
    model_path = random_model.save(tmp_path / "m.npz")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    res = _run("predict.py", f"--model={model_path}", f"--input={image}",
               f"--output_dir={tmp_path / 'out'}")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[-1].startswith("error: this model was fitted with a random-init backbone"), lines
    assert lines[-1].endswith(cli.WEIGHTS_HINT) and "--allow_random_weights" in lines[-1], lines


def test_evaluate_cli_memory_error_is_one_line_with_the_flag(tmp_path, weights_npz):
    """A fit that would not fit in memory ends in one error line naming --max_patches (the check
    runs before the work; free memory is faked small in the script's process)."""
    root = _tiny_mvtec(tmp_path / "data")
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    code = ("import runpy, sys; from protoad_jax.clustering import memory; "
            "memory.available_host = lambda: 10**6; "
            f"sys.argv = ['evaluate.py', '--dataset=mvtec', '--data_dir={root}', "
            f"'--categories=demo_object', '--weights={weights_npz}', "
            f"'--output_dir={tmp_path / 'out'}', '--num_prototypes=7', '--noprogress']; "
            f"runpy.run_path('{REPO / 'scripts' / 'evaluate.py'}', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path), timeout=900,
                         check=False)
    print(res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[-1].startswith("error: finch: the first-neighbour search over"), lines[-1]
    assert "host memory" in lines[-1] and "--max_patches=N" in lines[-1], lines[-1]
    assert not (tmp_path / "out" / "demo_object" / "result.json").exists()
