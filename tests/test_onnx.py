"""The ONNX export (export_scorer(..., format="onnx"), protoad_jax.onnx_export): the same maps and
scores as the live scorer under ONNX Runtime and OpenVINO, and every damaged or mismatched file,
bad image or missing runtime refused with one error naming the file and the fix.

Oracle: the live ``make_scorer`` on real photographs (crops of scikit-learn's sample images).
Tolerances: ONNX Runtime 1e-5, OpenVINO f32 1e-4 (it may pick other convolution algorithms);
OpenVINO bf16 / f16 only print their difference. ``-s`` prints every max difference. A random
``resnet50`` (layer1..3 as wide as wide_resnet50_2's) at 64 x 64, with K = 6 (one matmul) and
K = 600 (the head's ``lax.scan`` over prototype chunks), keeps the module to a few minutes.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from export_damage import (
    assert_refused,
    copy_folder,
    edit_manifest,
    flip_byte,
    refresh_checksum,
    truncate,
)
from PIL import Image
from sklearn.datasets import load_sample_images

import protoad_jax
from protoad_jax import Config, Model, export, onnx_export, scoring, weights
from protoad_jax.datasets import demo
from protoad_jax.export import ExportError

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet50"
S = 64
KS = (6, 600)  # 600 exported with chunk_size=512: the chunked head (lax.scan) is converted too
TOLERANCE = {("onnxruntime", "f32"): 1e-5, ("openvino", "f32"): 1e-4}


@pytest.fixture(scope="module")
def weights_npz(tmp_path_factory) -> Path:
    return weights.save_variables(tmp_path_factory.mktemp("w") / "rn50.npz", weights.random_variables(ARCH))


@pytest.fixture(scope="module")
def variables(weights_npz) -> dict:
    return weights.load_backbone(weights_npz, ARCH)  # BatchNorm folded, as the scripts load it


def _model(k: int, weights_npz: Path) -> Model:
    rng = np.random.default_rng(k)
    prototypes = np.asarray(scoring.prepare_prototypes(rng.normal(size=(k, 1792)), True))
    config = Config(arch=ARCH, image_size=S, resize=72, num_prototypes=k)
    return Model(prototypes, config, str(weights_npz)).with_threshold(0.25, "a test threshold")


@pytest.fixture(scope="module")
def models(weights_npz) -> dict[int, Model]:
    return {k: _model(k, weights_npz) for k in KS}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, models, variables) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {k: export.export_scorer(m, variables, root / f"k{k}", format="onnx",
                                    chunk_size=512 if k > 512 else "auto")
            for k, m in models.items()}


def test_onnx_auto_chunking_is_one_matmul(models, variables, tmp_path):
    """chunk_size="auto" exports one matmul per stage up to ONNX_UNCHUNKED_MAX prototypes (no
    ONNX Loop, which OpenVINO runs slowly); an explicit chunk size keeps the scan as a Loop."""
    import onnx

    out = export.export_scorer(models[600], variables, tmp_path / "auto", format="onnx")
    ops = {n.op_type for n in onnx.load(str(out / "scorer.onnx")).graph.node}
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert "Loop" not in ops and manifest["model"]["chunk_size"] is None, (sorted(ops), manifest["model"])
    assert models[600].num_prototypes <= export.ONNX_UNCHUNKED_MAX


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Three crops of real photographs, preprocessed: ``[3, S, S, 3]`` float32."""
    return np.stack(demo.photo_crops(load_sample_images().images, 3, seed=0, size=S))


@pytest.fixture(scope="module")
def live(models, variables, images) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k, m in models.items():
        scorer = protoad_jax.make_scorer(m, variables)
        for b in (1, 3):
            out[k, b] = tuple(np.asarray(a) for a in scorer(images[:b]))
    return out


@functools.cache
def _load(folder: Path, runtime: str, precision: str):
    return protoad_jax.load_exported(folder, runtime=runtime, precision=precision)[0]


def _diffs(got, want) -> tuple[float, float]:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == np.float32, (g.shape, g.dtype, w.shape)
    return tuple(float(np.abs(g - w).max()) for g, w in zip(got, want))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("runtime, precision", list(TOLERANCE))
def test_onnx_equals_live_scorer(exports, live, images, k, runtime, precision):
    scorer = _load(exports[k], runtime, precision)
    tol = TOLERANCE[runtime, precision]
    for b in (1, 3):
        dmap, dscore = _diffs(scorer(images[:b]), live[k, b])
        print(f"{runtime} {precision} K={k} batch {b}: max |map diff| {dmap:.3g}, "
              f"max |score diff| {dscore:.3g} (tolerance {tol:g})")
        assert dmap <= tol and dscore <= tol, (dmap, dscore)


@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_openvino_low_precision_is_reported(exports, live, images, precision):
    scorer = _load(exports[KS[0]], "openvino", precision)
    for b in (1, 3):
        got = scorer(images[:b])
        dmap, dscore = _diffs(got, live[KS[0], b])
        want = live[KS[0], b][0]
        print(f"openvino {precision} K={KS[0]} batch {b}: max |map diff| {dmap:.3g} "
              f"(map range {want.min():.3g}..{want.max():.3g}), max |score diff| {dscore:.3g}")
        assert all(np.isfinite(a).all() for a in got)


def test_manifest_states_everything(exports, models):
    folder = exports[KS[0]]
    m = json.loads((folder / export.MANIFEST).read_text())
    assert m["artifact_format"] == "onnx" and m["format_version"] == export.FORMAT_VERSION
    assert sorted(p.name for p in folder.iterdir()) == [export.MANIFEST, onnx_export.ARTIFACT]
    entry = m["files"]["artifact"]
    assert entry["name"] == onnx_export.ARTIFACT
    import hashlib
    assert entry["sha256"] == hashlib.sha256((folder / onnx_export.ARTIFACT).read_bytes()).hexdigest()
    assert m["input"] == {"shape": ["b", S, S, 3], "dtype": "float32", "layout": m["input"]["layout"]}
    assert m["outputs"]["maps"]["shape"] == ["b", S, S] and m["outputs"]["scores"]["shape"] == ["b"]
    assert m["preprocessing"] == export.preprocessing(72, S)
    assert m["threshold"]["value"] == 0.25 and m["threshold"]["rule"] == "a test threshold"
    assert Config(**m["config"]) == models[KS[0]].config
    assert m["model"]["batchnorm"].startswith("folded")
    assert {"jax2onnx", "onnx", "jax", "protoad_jax"} <= set(m["versions"])
    assert m["onnx"]["opset"] == onnx_export.OPSET and m["onnx"]["batch"] == "b"


def test_external_data(models, variables, images, live, tmp_path, monkeypatch):
    """Weights above EXTERNAL_DATA_BYTES (protobuf's 2 GiB limit, lowered here) go to
    scorer.onnx.data, listed with its sha256; both runtimes read it; damage is refused."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1 << 20)
    data = onnx_export.EXTERNAL_DATA
    folder = export.export_scorer(models[KS[0]], variables, tmp_path / "ext", format="onnx")
    m = json.loads((folder / export.MANIFEST).read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([ONNX, data, export.MANIFEST])
    assert m["files"]["weights"]["name"] == data and m["onnx"]["external_data"] == data
    assert m["files"]["weights"]["bytes"] == (folder / data).stat().st_size > 20e6  # resnet50 to layer3
    assert (folder / ONNX).stat().st_size < 1e6
    for (runtime, precision), tol in TOLERANCE.items():
        scorer, _ = protoad_jax.load_exported(folder, runtime=runtime, precision=precision)
        dmap, dscore = _diffs(scorer(images[:3]), live[KS[0], 3])
        print(f"external data, {runtime} {precision}: max |map diff| {dmap:.3g}, score {dscore:.3g}")
        assert dmap <= tol and dscore <= tol
    for damage, pattern in ((truncate, "truncated"), (flip_byte, "sha256"),
                            (lambda p: p.unlink(), "is missing")):
        copy = Path(shutil.copytree(folder, tmp_path / f"c{damage.__name__}"))
        damage(copy / data)
        with pytest.raises(ExportError, match=pattern) as info:
            protoad_jax.load_exported(copy)
        assert str(copy / data) in str(info.value) and "re-export" in str(info.value)
    # Without the lowered threshold the same model is one file (test_manifest_states_everything).
    monkeypatch.undo()
    assert "weights" not in json.loads((export.export_scorer(
        models[KS[0]], variables, tmp_path / "one", format="onnx") / export.MANIFEST).read_text())["files"]


def test_fixed_batch(models, variables, images, live, tmp_path):
    folder = export.export_scorer(models[KS[0]], variables, tmp_path / "b1", format="onnx", batch_size=1)
    scorer, m = protoad_jax.load_exported(folder)
    assert m["input"]["shape"] == [1, S, S, 3]
    dmap, dscore = _diffs(scorer(images[:1]), live[KS[0], 1])
    assert dmap <= 1e-5 and dscore <= 1e-5
    with pytest.raises(ExportError, match="fixed batch"):
        scorer(images[:3])


# ----------------------------------------------------------------------------- bad input


ONNX = onnx_export.ARTIFACT
CORRUPTIONS = {
    # name: (damage(folder, other export), file the error must name, pattern)
    "truncated scorer.onnx": (lambda d, o: truncate(d / ONNX), ONNX, r"bytes but .*truncated"),
    "edited byte": (lambda d, o: flip_byte(d / ONNX), ONNX, "sha256"),
    "manifest sha mismatch": (
        lambda d, o: edit_manifest(d, lambda m: m["files"]["artifact"].update(sha256="0" * 64)),
        ONNX, "sha256 .* but manifest.json says 0000"),
    "scorer.onnx of another model": (lambda d, o: shutil.copy(o / ONNX, d / ONNX), ONNX,
                                     "truncated or replaced|edited or replaced"),
    "damaged, checksum updated": (
        lambda d, o: (truncate(d / ONNX), refresh_checksum(d, "artifact", ONNX)),
        ONNX, "cannot be read by onnxruntime"),
    "manifest edited input shape": (
        lambda d, o: edit_manifest(d, lambda m: m["input"].update(shape=["b", 224, 224, 3])),
        export.MANIFEST, r"input shape is \['b', 224, 224, 3\], the file's \['b', 64, 64, 3\]"),
    "manifest lacks its onnx entry": (lambda d, o: edit_manifest(d, lambda m: m.pop("onnx")),
                                      export.MANIFEST, "lacks or mistypes the entry 'onnx'"),
    "manifest of an unknown artifact format": (
        lambda d, o: edit_manifest(d, lambda m: m.update(artifact_format="tflite")),
        export.MANIFEST, "artifact_format 'tflite'"),
    "missing scorer.onnx": (lambda d, o: (d / ONNX).unlink(), ONNX, "is missing"),
    "scorer.onnx of another K, checksum updated": (
        lambda d, o: (shutil.copy(o / ONNX, d / ONNX), refresh_checksum(d, "artifact", ONNX)),
        export.MANIFEST,
        r"the manifest's prototype initializers are \{.*\[1, 6, 256\].*\}, the file has"),
    "manifest edited num_prototypes": (
        lambda d, o: edit_manifest(d, lambda m: m["model"].update(num_prototypes=7)),
        export.MANIFEST, r"num_prototypes is 7, the file's prototypes are \[1, 6, \d+\]"),
    "external data not in the manifest": (
        lambda d, o: (d / onnx_export.EXTERNAL_DATA).write_bytes(b"x"), onnx_export.EXTERNAL_DATA,
        "not listed in"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_directory_is_refused_naming_file_and_fix(case, exports, tmp_path):
    damage, name, pattern = CORRUPTIONS[case]
    folder = copy_folder(exports[KS[0]], tmp_path)
    damage(folder, exports[KS[1]])
    assert_refused(case, folder, name, pattern, fixes=("re-export",))


@pytest.mark.parametrize("runtime", onnx_export.RUNTIMES)
@pytest.mark.parametrize("shape, dtype, what", [
    ((1, 128, 128, 3), np.float32, r"shape \[1, 128, 128, 3\]"),
    ((S, S, 3), np.float32, r"shape \[64, 64, 3\]"),
    ((1, S, S, 3), np.float64, "dtype float64"),
])
def test_wrong_images(exports, runtime, shape, dtype, what):
    scorer = _load(exports[KS[0]], runtime, "f32")
    with pytest.raises(ExportError, match=what) as info:
        scorer(np.zeros(shape, dtype))
    assert str(exports[KS[0]] / ONNX) in str(info.value) and "preprocess_image" in str(info.value)


def test_nan_images_are_refused(exports, images):
    bad = images[:1].copy()
    bad[0, 5, 5, 1] = np.nan
    with pytest.raises(ExportError, match="NaN or inf"):
        _load(exports[KS[0]], "onnxruntime", "f32")(bad)


@pytest.mark.parametrize("module, runtime", [("onnxruntime", "onnxruntime"), ("openvino", "openvino")])
def test_missing_runtime_names_the_extra(exports, monkeypatch, module, runtime):
    monkeypatch.setitem(sys.modules, module, None)  # import fails with ImportError
    with pytest.raises(ExportError, match=re.escape("pip install 'protoad-jax[deploy]'")) as info:
        protoad_jax.load_exported(exports[KS[0]], runtime=runtime)
    assert str(exports[KS[0]] / ONNX) in str(info.value)


def test_missing_converter_names_the_extra(models, variables, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    with pytest.raises(ExportError, match=re.escape("pip install 'protoad-jax[deploy]'")):
        export.export_scorer(models[KS[0]], variables, tmp_path / "e", format="onnx")
    assert not (tmp_path / "e").exists()


def test_bad_runtime_arguments(exports, tmp_path, models, variables):
    with pytest.raises(ExportError, match="runtime must be one of"):
        protoad_jax.load_exported(exports[KS[0]], runtime="tensorrt")
    with pytest.raises(ExportError, match="precision 'bf16' needs runtime='openvino'"):
        protoad_jax.load_exported(exports[KS[0]], precision="bf16")
    with pytest.raises(ValueError, match="format must be one of"):
        export.export_scorer(models[KS[0]], variables, tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match="platforms apply to format='jax'"):
        export.export_scorer(models[KS[0]], variables, tmp_path / "x", format="onnx", platforms=["cpu"])


def test_runtime_arguments_refused_for_a_jax_directory(models, variables, tmp_path):
    folder = export.export_scorer(models[KS[0]], variables, tmp_path / "jax")
    with pytest.raises(ExportError, match="runtime= and precision= apply to ONNX directories"):
        protoad_jax.load_exported(folder, runtime="onnxruntime")


# ----------------------------------------------------------------------------- scripts


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True,
                         text=True, env=env, timeout=900, check=False)
    print(res.stdout[-3000:], res.stderr[-3000:])
    return res


def _scores(csv_path: Path) -> dict[str, float]:
    with open(csv_path, newline="") as f:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(f)}


def test_scripts_export_onnx_then_predict_equals_live_predict(models, tmp_path):
    model_path = models[KS[0]].save(tmp_path / "model.npz")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, a in enumerate(load_sample_images().images):
        Image.fromarray(a).save(photos / f"p{i}.png")
    out = tmp_path / "exported"
    res = _run("export.py", f"--model={model_path}", f"--output={out}", "--format=onnx")
    assert res.returncode == 0
    assert f"wrote {out}: scorer.onnx" in res.stdout
    assert f"onnx opset {onnx_export.OPSET}; input [b, {S}, {S}, 3] float32" in res.stdout
    res = _run("predict.py", f"--model={model_path}", f"--input={photos}",
               f"--output_dir={tmp_path / 'live'}", "--noprogress")
    assert res.returncode == 0
    want = _scores(tmp_path / "live" / "predictions.csv")
    for runtime in onnx_export.RUNTIMES:
        res = _run("predict.py", f"--exported={out}", f"--runtime={runtime}", f"--input={photos}",
                   f"--output_dir={tmp_path / runtime}", "--noprogress")
        assert res.returncode == 0
        got = _scores(tmp_path / runtime / "predictions.csv")
        assert got.keys() == want.keys() and len(got) == 2
        assert max(abs(got[p] - want[p]) for p in got) <= 1e-4, (got, want)
    res = _run("predict.py", f"--model={model_path}", "--runtime=openvino", f"--input={photos}",
               f"--output_dir={tmp_path / 'x'}")
    assert res.returncode != 0 and "--runtime and --precision apply to --exported" in res.stderr
