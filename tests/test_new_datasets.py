"""VisA, MVTec AD 2 and MVTec LOCO read as downloaded: tiny trees of real photographs with
painted defects in each layout (tests/layouts.py), evaluated end to end with a random-init
backbone; every metric is checked against scikit-learn on the scores and maps written, with masks
from an independent torchvision decode of the mask files.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from layouts import make_mvtec_ad2_like, make_mvtec_loco_like, make_visa_like
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from protoad_jax import Config, datasets, errors, evaluation, load_model, pipeline, weights

REPO = Path(__file__).resolve().parents[1]
FAST = Config(resize=128, image_size=112, num_prototypes=40)
TOL = 1e-6  # two exact AUC computations in float64; only summation order differs


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "random_wrn.npz"
    weights.save_variables(path, weights.random_variables("wide_resnet50_2"))
    return weights.resolve_backbone(str(path))


def _oracle_mask(mask_path: Path | None, image_path: Path) -> np.ndarray:
    """torchvision Resize(NEAREST) + CenterCrop of each mask file, non-zero = defect; a folder's
    files are united; no mask: all normal (the image's own size)."""
    files = [] if mask_path is None else (sorted(mask_path.glob("*.png")) if mask_path.is_dir()
                                          else [mask_path])
    out = None
    for f in files or [image_path]:
        with Image.open(f) as im:
            m = TF.center_crop(TF.resize(im.convert("L"), FAST.resize, InterpolationMode.NEAREST),
                               FAST.image_size)
        m = np.asarray(m) > 0 if files else np.zeros((FAST.image_size,) * 2, bool)
        out = m if out is None else out | m
    return out


def _written(cat_dir: Path, items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores (from scores.csv) and maps (maps/<type>/<stem>.npy) in item order."""
    with open(cat_dir / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(it.path) for it in items]
    assert all(r["status"] == "ok" for r in rows)
    maps = np.stack([np.load(cat_dir / "maps" / it.defect_type / f"{it.path.stem}.npy")
                     for it in items])
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows]), maps


def _check_metrics(values: dict, labels, scores, masks, maps, what: str) -> None:
    img = roc_auc_score(labels, scores)
    pix = roc_auc_score(masks.ravel(), maps.ravel())
    err = max(abs(img - values["image_auroc"]), abs(pix - values["pixel_auroc"]))
    print(f"{what}: image AUROC {values['image_auroc']:.4f} (sklearn {img:.4f}), pixel AUROC "
          f"{values['pixel_auroc']:.4f} (sklearn {pix:.4f}); max error {err:.2e} (tol {TOL})")
    assert err <= TOL


def test_visa_layout_end_to_end(tmp_path, net):
    root = make_visa_like(tmp_path / "VisA")
    assert datasets.list_categories("visa", root) == ["photo"]  # the CSV's "candle" has no folder
    res = evaluation.run_category("visa", root, "photo", tmp_path / "out", FAST, net, batch_size=4,
                                  save_raw_maps=True, num_overlays=1, progress=False)
    items = datasets.read_visa(root, "photo").test
    # The CSV's labels and masks, read back independently.
    with open(root / "split_csv" / "1cls.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["object"] == "photo" and r["split"] == "test"]
    assert sorted((str(root / r["image"]), r["label"] == "anomaly", r["mask"]) for r in rows) == \
        sorted((str(it.path), bool(it.label), str(it.mask_path.relative_to(root)) if it.mask_path else "")
               for it in items)
    assert {int(v) for it in items if it.mask_path for v in np.unique(np.asarray(Image.open(it.mask_path)))} \
        >= {1, 2}  # non-binary class values
    labels, scores, maps = _written(tmp_path / "out" / "photo", items)
    masks = np.stack([_oracle_mask(it.mask_path, it.path) for it in items])
    assert res["split"] == "test" and res["num_train"] == 4 and res["num_test"] == 5
    assert res["threshold"] is None  # VisA has no validation images
    _check_metrics(res, labels, scores, masks, maps, "visa")


def test_mvtec_ad2_public_threshold_and_private(tmp_path, net):
    root = make_mvtec_ad2_like(tmp_path / "mvtec_ad_2")
    out = tmp_path / "out"
    res = evaluation.run_category("mvtec_ad2", root, "photo", out, FAST, net, batch_size=4,
                                  save_raw_maps=True, num_overlays=1, progress=False)
    cat = datasets.read_mvtec_ad2(root, "photo")
    labels, scores, maps = _written(out / "photo", cat.test)
    masks = np.stack([_oracle_mask(it.mask_path, it.path) for it in cat.test])
    assert res["split"] == "test_public" and res["num_validation"] == 2
    _check_metrics(res, labels, scores, masks, maps, "mvtec_ad2 test_public")
    # The threshold: numpy's 0.99 quantile of the validation images' scores, saved in the model.
    model = load_model(out / "photo" / "model.npz")
    val = pipeline.score_images(model, list(cat.validation), net.variables, batch_size=4,
                                progress=False)
    want = float(np.quantile(val.scores, 0.99))
    print(f"threshold {res['threshold']:.6f}, numpy quantile {want:.6f}")
    assert abs(res["threshold"] - want) <= 1e-6 and model.threshold == res["threshold"]

    private = evaluation.run_category("mvtec_ad2", root, "photo", tmp_path / "out_private", FAST,
                                      net, split="test_private", batch_size=4, save_raw_maps=True,
                                      num_overlays=1, progress=False)
    assert private["split"] == "test_private" and private["num_test"] == 3
    assert all(private[k] is None for k in evaluation.METRICS)
    assert "no labels" in private["metrics_note"]
    cat_dir = tmp_path / "out_private" / "photo"
    with open(cat_dir / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [""] * 3 and all(float(r["score"]) > 0 for r in rows)
    assert len(list((cat_dir / "maps" / "unlabeled").glob("*.npy"))) == 3
    assert len(list((cat_dir / "overlays").glob("*.png"))) == 2
    assert (cat_dir / "plots" / "score_histogram.png").is_file()
    summary = evaluation.summarize([private], tmp_path / "out_private", {"split": "test_private"}, [])
    doc = json.loads((tmp_path / "out_private" / "results.json").read_text())
    assert doc["categories"][0]["image_auroc"] is None and doc["categories"][0]["metrics_note"]
    assert summary["mean"]["image_auroc"] is None


def test_mvtec_loco_union_masks_and_per_type_metrics(tmp_path, net):
    root = make_mvtec_loco_like(tmp_path / "loco")
    cat = datasets.read_mvtec_loco(root, "photo")
    # The union of each folder's files, non-binary values included, against torchvision.
    from protoad_jax import input_pipeline
    loaded = input_pipeline.load_masks(cat.test, FAST.resize, FAST.image_size)
    masks = np.stack([_oracle_mask(it.mask_path, it.path) for it in cat.test])
    for it in cat.test:
        if it.label:
            files = sorted(it.mask_path.glob("*.png"))
            assert len(files) == 2 and np.asarray(Image.open(files[1])).max() == 60
    assert np.array_equal(loaded, masks) and masks[2:].any(axis=(1, 2)).all()

    out = tmp_path / "out"
    res = evaluation.run_category("mvtec_loco", root, "photo", out, FAST, net, batch_size=4,
                                  save_raw_maps=True, num_overlays=1, progress=False)
    labels, scores, maps = _written(out / "photo", cat.test)
    _check_metrics(res, labels, scores, masks, maps, "loco all")
    types = np.array([it.defect_type for it in cat.test])
    assert sorted(res["per_type"]) == ["logical_anomalies", "structural_anomalies"]
    for t, values in res["per_type"].items():
        sel = (labels == 0) | (types == t)
        assert values["num_normal"] == 2 and values["num_anomalous"] == 2
        _check_metrics(values, labels[sel], scores[sel], masks[sel], maps[sel], f"loco {t}")

    summary = evaluation.summarize([res], out, {"split": "test"}, [])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["category"] for r in rows] == ["photo", "mean"] and rows[0]["split"] == "test"
    for t in res["per_type"]:
        for k in evaluation.METRICS:
            assert float(rows[0][f"{t}/{k}"]) == pytest.approx(res["per_type"][t][k], abs=1e-12)
            assert summary["mean_per_type"][t][k] == pytest.approx(res["per_type"][t][k], abs=1e-12)
    assert "logical_anomalies/image_auroc" in (out / "report.html").read_text()
    table = evaluation.format_table([res], summary["mean"])
    print(table)
    assert "photo structural_anomalies" in table


# ----------------------------------------------------------------------------- bad input


def test_visa_bad_inputs(tmp_path):
    root = make_visa_like(tmp_path / "VisA", n_train=2, n_test_good=1, n_test_bad=1)
    csv_path = root / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    # A row naming a missing file: the CSV, the line and the file.
    (root / "photo" / "Data" / "Images" / "Normal" / "0001.JPG").unlink()
    with pytest.raises(errors.DatasetError) as e:
        datasets.read_visa(root, "photo")
    print(e.value)
    assert str(csv_path) in str(e.value) and "line 3" in str(e.value) and "0001.JPG" in str(e.value)
    # A mask whose size differs from its image (checked from the headers at load).
    make_visa_like(tmp_path / "V2", n_train=2, n_test_good=1, n_test_bad=1)
    mask = tmp_path / "V2" / "photo" / "Data" / "Masks" / "Anomaly" / "000.png"
    Image.new("L", (100, 90)).save(mask)
    with pytest.raises(errors.DatasetError, match=r"mask .*000.png is 100x90 but its image"):
        datasets.load("visa", tmp_path / "V2", "photo", FAST)
    # A missing category folder; a category without test rows (an empty split); no CSV.
    with pytest.raises(errors.DatasetError, match="'candle': folder .* does not exist"):
        datasets.read_visa(tmp_path / "V2", "candle")
    csv2 = tmp_path / "V2" / "split_csv" / "1cls.csv"
    csv2.write_text("\n".join(line for line in text.splitlines() if ",test," not in line) + "\n")
    with pytest.raises(errors.DatasetError, match="no test rows for 'photo': an empty split"):
        datasets.read_visa(tmp_path / "V2", "photo")
    csv2.unlink()
    with pytest.raises(errors.DatasetError, match="1cls.csv does not exist"):
        datasets.list_categories("visa", tmp_path / "V2")


def test_mvtec_ad2_bad_inputs(tmp_path):
    root = make_mvtec_ad2_like(tmp_path / "ad2", n_train=2, n_val=1, n_test_good=1,
                               n_test_bad=1, n_private=1)
    with pytest.raises(errors.SettingsError, match="no split 'validation'"):
        datasets.load("mvtec_ad2", root, "photo", FAST, split="validation")
    with pytest.raises(errors.SettingsError, match="no split 'test_public'"):
        datasets.load("mvtec", root, "photo", FAST, split="test_public")
    with pytest.raises(errors.DatasetError, match="category 'can' not found"):
        datasets.read_mvtec_ad2(root, "can")
    mask = root / "photo" / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png"
    mask.unlink()
    with pytest.raises(errors.DatasetError, match="no ground-truth mask for anomalous test image .*"
                       "000_regular.png: expected .*000_regular_mask.png"):
        datasets.read_mvtec_ad2(root, "photo")
    for p in (root / "photo" / "test_private").iterdir():
        p.unlink()
    with pytest.raises(errors.DatasetError, match="test_private: an empty split"):
        datasets.read_mvtec_ad2(root, "photo", "test_private")


def test_mvtec_loco_bad_inputs(tmp_path):
    root = make_mvtec_loco_like(tmp_path / "loco", n_train=2, n_val=1, n_test_good=1,
                                n_logical=1, n_structural=1)
    gt = root / "photo" / "ground_truth"
    # A mask file of another size inside an image's folder: the file is named.
    Image.new("L", (50, 40)).save(gt / "structural_anomalies" / "000" / "001.png")
    with pytest.raises(errors.DatasetError, match=r"mask .*000/001.png is 50x40 but its image"):
        datasets.load("mvtec_loco", root, "photo", FAST)
    # An empty mask folder, then a missing one, for an anomalous image.
    for p in (gt / "logical_anomalies" / "000").iterdir():
        p.unlink()
    with pytest.raises(errors.DatasetError, match=r"logical_anomalies/000.png: expected .*"
                       r"ground_truth/logical_anomalies/000$"):
        datasets.read_mvtec_loco(root, "photo")
    (gt / "logical_anomalies" / "000").rmdir()
    with pytest.raises(errors.DatasetError, match="no ground-truth mask"):
        datasets.read_mvtec_loco(root, "photo")
    with pytest.raises(errors.DatasetError, match="category 'pushpins' not found"):
        datasets.read_mvtec_loco(root, "pushpins")


def test_evaluate_cli_unknown_split_is_one_line():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--dataset=mvtec_ad2",
                          "--data_dir=/nonexistent", "--split=test_secret", "--noprogress"],
                         capture_output=True, text=True, timeout=300, check=False,
                         env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
                              "PATH": "/usr/bin:/bin"})
    print(res.stderr[-1000:])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert lines[-1].startswith("error: dataset 'mvtec_ad2' has no split 'test_secret'"), lines
