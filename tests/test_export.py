"""The exported scorer (protoad_jax.export): same numbers as the live scorer, loadable without
Flax, lowered for accelerators on CPU, and every damaged or mismatched file refused with a
clear error.

Oracles: the live ``make_scorer`` on the same backend (bitwise), ``hashlib`` for the manifest's
checksums, the model and ``Config`` for its contents, and a fresh Python process for "no Flax".
The backbone is a random ``resnet50`` (same code path as ``wide_resnet50_2``, a third of the
weights) at 112 x 112 with K = 8 prototypes, so the module stays quick.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
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
from protoad_jax import backbone, export, scoring, weights, xla_cpu
from protoad_jax.config import IMAGENET_MEAN, IMAGENET_STD, Config
from protoad_jax.export import ExportError

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet50"
K = 8
CONFIG = Config(arch=ARCH, resize=128, image_size=112, num_prototypes=K)
S = CONFIG.image_size
THRESHOLD = (0.3125, "a test threshold")


def _random_variables(seed: int = 0) -> dict:
    """Unfolded backbone variables with random, non-trivial BatchNorm statistics (numpy, fast)."""
    rng = np.random.default_rng(seed)

    def fill(path, aval):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = np.prod(aval.shape[:-1])
            return (rng.normal(size=aval.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if "var" in name or "scale" in name:
            return rng.uniform(0.5, 1.5, aval.shape).astype(np.float32)
        return (0.1 * rng.normal(size=aval.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, backbone.abstract_variables(ARCH, "layer3", S))


@pytest.fixture(scope="module")
def weights_npz(tmp_path_factory) -> Path:
    return weights.save_variables(tmp_path_factory.mktemp("w") / "rn50.npz", _random_variables())


@pytest.fixture(scope="module")
def variables(weights_npz) -> dict:
    return weights.load_backbone(weights_npz, ARCH)  # BatchNorm folded, as the scripts load it


@pytest.fixture(scope="module")
def model(weights_npz) -> protoad_jax.Model:
    rng = np.random.default_rng(1)
    prototypes = np.asarray(scoring.prepare_prototypes(rng.normal(size=(K, 1792)), True))
    return protoad_jax.Model(prototypes, CONFIG, str(weights_npz)).with_threshold(*THRESHOLD)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two photographs (preprocessed) and one random image: ``[3, S, S, 3]`` float32."""
    photos = [protoad_jax.preprocess_image(Image.fromarray(a), CONFIG.resize, S)
              for a in load_sample_images().images]
    noise = np.random.default_rng(2).normal(size=(1, S, S, 3)).astype(np.float32)
    return np.concatenate([np.stack(photos), noise])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, variables) -> Path:
    return export.export_scorer(model, variables, tmp_path_factory.mktemp("e") / "scorer")


@pytest.fixture(scope="module")
def exported_b2(tmp_path_factory, model, variables) -> Path:
    return export.export_scorer(model, variables, tmp_path_factory.mktemp("e") / "b2", batch_size=2)


@pytest.fixture(scope="module")
def live(model, variables):
    return protoad_jax.make_scorer(model, variables)


def _assert_same(got, want, what: str) -> None:
    for name, g, w in zip(("maps", "scores"), got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, (what, name, g.shape, w.shape)
        print(f"{what} {name}: max abs difference {float(np.abs(g - w).max()):.3g}")
        np.testing.assert_array_equal(g, w, err_msg=f"{what} {name}: not bit for bit")


# ----------------------------------------------------------------------------- same numbers


def test_exported_equals_live_bit_for_bit(exported, live, images):
    scorer, _ = protoad_jax.load_exported(exported)
    for batch in (images, images[:1], images[1:]):  # one artifact, any batch (symbolic b)
        _assert_same(scorer(batch), live(batch), f"batch {len(batch)}")
    # Inside a user's jit the outer jit's XLA options apply, to both scorers alike.
    _assert_same(jax.jit(scorer)(images), jax.jit(live)(images), "inside the user's jit")
    options = xla_cpu.compiler_options()
    _assert_same(jax.jit(scorer, compiler_options=options)(images), live(images),
                 "inside the user's jit with xla_cpu.compiler_options()")
    assert np.ptp(np.asarray(scorer(images)[1])) > 0  # scores vary: not a constant function


def test_fixed_batch_artifact(exported_b2, live, images):
    scorer, manifest = protoad_jax.load_exported(exported_b2)
    assert manifest["input"]["shape"] == [2, S, S, 3]
    assert manifest["jax_export"]["batch"] == 2
    _assert_same(scorer(images[:2]), live(images[:2]), "fixed batch 2")
    with pytest.raises(ExportError, match=r"scorer\.jaxexport scores images of shape \[2, 112.*fixed batch"):
        scorer(images)


def _program(directory: Path, batch: np.ndarray) -> list[str]:
    """The optimized XLA program the artifact compiles to for ``batch``, as sorted lines with
    instruction numbers, metadata and source locations removed (they differ run to run)."""
    ex = jax.export.deserialize(bytearray((directory / export.ARTIFACT).read_bytes()))
    w = dict(np.load(directory / export.WEIGHTS))
    text = jax.jit(ex.call).lower(w, batch).compile().as_text()
    text = re.sub(r"\n(FileNames|FunctionNames|FileLocations|StackFrames)\n(.+\n)*", "\n", text)
    text = re.sub(r", (metadata|frontend_attributes)=\{[^{}]*\}", "", text)
    text = re.sub(r"\b([A-Za-z_][\w\-]*?)(\.\d+)+\b", r"\1", text)
    return sorted(line.strip() for line in text.splitlines() if line.strip())


def test_symbolic_batch_compiles_to_the_fixed_batch_program(exported, exported_b2, images):
    """The symbolic batch costs nothing: at b = 2 XLA gets the same program as a fixed batch 2."""
    sym, fixed = _program(exported, images[:2]), _program(exported_b2, images[:2])
    diff = sorted(set(sym) ^ set(fixed))
    print(f"{len(sym)} lines; {len(diff)} differ")
    assert sym == fixed, diff[:10]


# ----------------------------------------------------------------------------- the manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_states_everything(exported, model, variables):
    m = json.loads((exported / export.MANIFEST).read_text())
    for key, name in (("artifact", "scorer.jaxexport"), ("weights", "weights.npz")):
        entry = m["files"][key]
        assert entry["name"] == name
        assert entry["sha256"] == _sha256(exported / name)
        assert entry["bytes"] == (exported / name).stat().st_size
    assert m["input"]["shape"] == ["b", S, S, 3] and m["input"]["dtype"] == "float32"
    assert m["outputs"]["maps"]["shape"] == ["b", S, S] and m["outputs"]["scores"]["shape"] == ["b"]
    pre = m["preprocessing"]
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (CONFIG.resize, S, "LANCZOS")
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    assert m["threshold"]["value"] == THRESHOLD[0] and m["threshold"]["rule"] == THRESHOLD[1]
    assert m["config"] == dataclasses.asdict(CONFIG)
    assert Config(**m["config"]) == CONFIG
    assert m["model"]["num_prototypes"] == K and m["model"]["backbone_weights"] == model.weights
    assert m["model"]["batchnorm"].startswith("folded")
    import jaxlib
    assert m["versions"]["jax"] == jax.__version__ and m["versions"]["jaxlib"] == jaxlib.__version__
    assert m["versions"]["protoad_jax"] == protoad_jax.__version__
    assert m["jax_export"]["platforms"] == ["cpu"]  # this machine's platform (+ cpu)
    assert m["jax_export"]["batch"] == "b"
    assert m["format_version"] == export.FORMAT_VERSION
    with np.load(exported / export.WEIGHTS, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["prototypes"], model.prototypes)
        flat = {"/".join(str(k.key) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
        assert sorted(set(z.files) - {"prototypes"}) == sorted(flat)
        for name, value in flat.items():
            np.testing.assert_array_equal(z[name], value, err_msg=name)


# ----------------------------------------------------------------------------- portability


def _env() -> dict:
    # PYTHONPATH: the subprocess imports this checkout's protoad_jax; both processes compile
    # the same way (xla_cpu.compiler_options() per computation).
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def test_fresh_process_loads_and_runs_without_flax(exported, live, images, tmp_path):
    np.save(tmp_path / "x.npy", images)
    code = f"""
import sys
import numpy as np
import protoad_jax
scorer, manifest = protoad_jax.load_exported({str(exported)!r})
maps, scores = scorer(np.load({str(tmp_path / 'x.npy')!r}))
np.savez({str(tmp_path / 'out.npz')!r}, maps=np.asarray(maps), scores=np.asarray(scores))
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "flax"
                or m in ("protoad_jax.backbone", "protoad_jax.weights", "protoad_jax.evaluation"))
assert not loaded, loaded
print("no flax; threshold", manifest["threshold"]["value"])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                         timeout=600, check=False)
    print(res.stdout, res.stderr[-3000:])
    assert res.returncode == 0
    assert "no flax" in res.stdout
    with np.load(tmp_path / "out.npz") as z:
        _assert_same((z["maps"], z["scores"]), live(images), "fresh process")


def test_export_for_cuda_and_tpu_on_cpu(model, variables, exported, images, tmp_path):
    """Lowering for accelerators needs none; the multi-platform artifact still runs here."""
    assert jax.default_backend() == "cpu"
    multi = export.export_scorer(model, variables, tmp_path / "multi", platforms=("cpu", "cuda", "tpu"))
    scorer, manifest = protoad_jax.load_exported(multi)
    assert manifest["jax_export"]["platforms"] == ["cpu", "cuda", "tpu"]
    _assert_same(scorer(images), protoad_jax.load_exported(exported)[0](images), "cpu+cuda+tpu vs cpu")
    gpu_only = export.export_scorer(model, variables, tmp_path / "cuda", platforms=["cuda"])
    assert json.loads((gpu_only / export.MANIFEST).read_text())["jax_export"]["platforms"] == ["cuda"]
    with pytest.raises(ExportError, match=r"exported for \['cuda'\].*runs on cpu.*platforms cuda,cpu"):
        protoad_jax.load_exported(gpu_only)


def test_bad_arguments(model, variables, tmp_path):
    with pytest.raises(ValueError, match="platforms"):
        export.export_scorer(model, variables, tmp_path / "x", platforms=("gpu",))
    with pytest.raises(ValueError, match="batch_size"):
        export.export_scorer(model, variables, tmp_path / "x", batch_size=0)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- bad artifacts


def _set(keys: tuple, value):
    def edit(m):
        node = m
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


CORRUPTIONS = {
    # name: (damage(folder), file the error must name, pattern)
    "truncated artifact": (lambda d: truncate(d / export.ARTIFACT), export.ARTIFACT, r"bytes but .*truncated"),
    "edited artifact byte": (lambda d: flip_byte(d / export.ARTIFACT), export.ARTIFACT, "sha256"),
    "truncated weights": (lambda d: truncate(d / export.WEIGHTS), export.WEIGHTS, "truncated"),
    "edited weights byte": (lambda d: flip_byte(d / export.WEIGHTS), export.WEIGHTS, "sha256"),
    "manifest sha mismatch": (lambda d: edit_manifest(d, _set(("files", "artifact", "sha256"), "0" * 64)),
                              export.ARTIFACT, "sha256 .* but manifest.json says 0000"),
    "manifest edited input shape": (lambda d: edit_manifest(d, _set(("input", "shape"), ["b", 224, 224, 3])),
                                    export.MANIFEST, "input shape is .*224.* the artifact's .*112"),
    "manifest edited platforms": (lambda d: edit_manifest(d, _set(("jax_export", "platforms"), ["cpu", "tpu"])),
                                  export.MANIFEST, "platforms"),
    "manifest edited crop": (lambda d: edit_manifest(d, _set(("preprocessing", "crop"), 100)),
                             export.MANIFEST, "crop 100 does not match"),
    "manifest not JSON": (lambda d: (d / export.MANIFEST).write_text("{\"format\": "),
                          export.MANIFEST, "not readable JSON"),
    "manifest lacks an entry": (lambda d: edit_manifest(d, lambda m: m.pop("input")),
                                export.MANIFEST, "lacks or mistypes the entry 'input'"),
    "manifest of a newer format": (lambda d: edit_manifest(d, _set(("format_version",), 2)),
                                   export.MANIFEST, "format version 2"),
    "missing manifest": (lambda d: (d / export.MANIFEST).unlink(), export.MANIFEST, "is missing"),
    "missing artifact": (lambda d: (d / export.ARTIFACT).unlink(), export.ARTIFACT, "is missing"),
    "missing weights": (lambda d: (d / export.WEIGHTS).unlink(), export.WEIGHTS, "is missing"),
    "damaged artifact, checksum updated": (
        lambda d: (truncate(d / export.ARTIFACT), refresh_checksum(d, "artifact", export.ARTIFACT)),
        export.ARTIFACT, "cannot be deserialized by jax .*same jax version, so the file is damaged"),
    "weights of another model, checksum updated": (
        lambda d: (np.savez(d / export.WEIGHTS, prototypes=np.zeros((3, 1792), np.float32)),
                   refresh_checksum(d, "weights", export.WEIGHTS)),
        export.WEIGHTS, r"does not fit the artifact: missing \['params/"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_artifact_is_refused_naming_file_and_fix(case, exported, tmp_path):
    damage, name, pattern = CORRUPTIONS[case]
    folder = copy_folder(exported, tmp_path)
    damage(folder)
    assert_refused(case, folder, name, pattern, fixes=("re-export", "pip install"))


def test_missing_directory(tmp_path):
    with pytest.raises(ExportError, match=r"nope does not exist; write one with scripts/export\.py"):
        protoad_jax.load_exported(tmp_path / "nope")


def test_jax_that_cannot_run_the_artifact(exported, tmp_path, monkeypatch):
    # An artifact from a newer jax: its calling convention is beyond this jax's range.
    folder = copy_folder(exported, tmp_path)
    edit_manifest(folder, _set(("versions", "jax"), "99.0.0"))
    edit_manifest(folder, _set(("jax_export", "calling_convention_version"), 99))
    with pytest.raises(ExportError, match=rf"calling convention 99; jax {re.escape(jax.__version__)} runs "
                       rf".*needs jax >= 99\.0\.0, found {re.escape(jax.__version__)}"):
        protoad_jax.load_exported(folder)
    # Same convention, but the deserializer refuses (a newer flatbuffer schema, say).
    edit_manifest(folder, _set(("jax_export", "calling_convention_version"),
                               json.loads((exported / export.MANIFEST).read_text())["jax_export"]
                               ["calling_convention_version"]))

    def refuse(blob):
        raise ValueError("unsupported serialization version")

    monkeypatch.setattr(jax.export, "deserialize", refuse)
    with pytest.raises(ExportError, match=r"cannot be deserialized .*unsupported serialization.*"
                       r"needs jax >= 99\.0\.0.*if jax is not the cause, the file is damaged"):
        protoad_jax.load_exported(folder)
    # An artifact from an older jax this one no longer reads.
    edit_manifest(folder, _set(("versions", "jax"), "0.0.1"))
    with pytest.raises(ExportError, match=r"written by jax 0\.0\.1; this jax .* no longer reads it: re-export"):
        protoad_jax.load_exported(folder)
    # This jax's own version but an impossible convention: the manifest was edited.
    monkeypatch.undo()
    edit_manifest(folder, _set(("versions", "jax"), jax.__version__))
    edit_manifest(folder, _set(("jax_export", "calling_convention_version"), 99))
    with pytest.raises(ExportError, match=r"calling convention 99; .*manifest\.json was edited .*re-export"):
        protoad_jax.load_exported(folder)


@pytest.mark.parametrize("shape, dtype, what", [
    ((1, 128, 128, 3), np.float32, r"shape \[1, 128, 128, 3\]"),
    ((S, S, 3), np.float32, r"shape \[112, 112, 3\]"),
    ((0, S, S, 3), np.float32, r"shape \[0, 112, 112, 3\]"),
    ((1, S, S, 3), np.float64, "dtype float64"),
    ((1, S, S, 3), np.uint8, "dtype uint8"),
])
def test_wrong_images_at_call_time(exported, shape, dtype, what):
    scorer, _ = protoad_jax.load_exported(exported)
    with pytest.raises(ExportError, match=what) as info:
        scorer(np.zeros(shape, dtype))
    assert str(exported / export.ARTIFACT) in str(info.value) and "preprocess_image" in str(info.value)


def test_nan_images_are_refused(exported, images):
    scorer, _ = protoad_jax.load_exported(exported)
    bad = images[:1].copy()
    bad[0, 5, 5, 1] = np.nan
    with pytest.raises(ExportError, match="NaN or inf"):
        scorer(bad)


# ----------------------------------------------------------------------------- atomic writes


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir())}


def test_failed_export_leaves_nothing_behind(model, variables, tmp_path, monkeypatch):
    parent = tmp_path / "exports"
    first = export.export_scorer(model, variables, parent / "a")
    before = _snapshot(first)

    def fail(*args, **kwargs):  # midway: artifact and weights written, manifest not yet
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_manifest", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_scorer(model, variables, parent / "b")  # a new directory
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_scorer(model, variables, first)  # over an earlier export
    assert sorted(p.name for p in parent.iterdir()) == ["a"]  # no b, no temporary directories
    assert _snapshot(first) == before
    monkeypatch.undo()
    protoad_jax.load_exported(first)


def test_replace_earlier_export_and_refuse_foreign_directory(model, variables, tmp_path):
    out = export.export_scorer(model, variables, tmp_path / "d")
    out = export.export_scorer(model.with_threshold(0.5, "replaced"), variables, out)
    assert protoad_jax.load_exported(out)[1]["threshold"]["rule"] == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export directory .*refusing to replace it"):
        export.export_scorer(model, variables, foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "notes"]


# ----------------------------------------------------------------------------- scripts


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True,
                         text=True, env=_env(), timeout=900, check=False)
    print(res.stdout[-3000:], res.stderr[-3000:])
    return res


def test_scripts_export_then_predict_equals_live_predict(model, tmp_path):
    model_path = model.save(tmp_path / "model.npz")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, a in enumerate(load_sample_images().images):  # 640 x 427: resized and cropped
        Image.fromarray(a).save(photos / f"p{i}.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (150, 190, 3), np.uint8)).save(photos / "noise.png")
    out = tmp_path / "exported"
    res = _run("export.py", f"--model={model_path}", f"--output={out}")
    assert res.returncode == 0
    assert f"wrote {out}: scorer.jaxexport" in res.stdout
    assert f"platforms cpu; input [b, {S}, {S}, 3] float32" in res.stdout
    res = _run("predict.py", f"--exported={out}", f"--input={photos}", f"--output_dir={tmp_path / 'p1'}",
               "--noprogress")
    assert res.returncode == 0
    assert "of 3 scored images anomalous; 0 skipped" in res.stdout
    res = _run("predict.py", f"--model={model_path}", f"--input={photos}", f"--output_dir={tmp_path / 'p2'}",
               "--noprogress")
    assert res.returncode == 0
    exported_csv = (tmp_path / "p1" / "predictions.csv").read_text()
    live_csv = (tmp_path / "p2" / "predictions.csv").read_text()
    print(exported_csv)
    assert exported_csv == live_csv
    assert len(list((tmp_path / "p1" / "overlays").glob("*.png"))) == 3
    res = _run("predict.py", f"--exported={out}", f"--model={model_path}", f"--input={photos}",
               f"--output_dir={tmp_path / 'p3'}")
    assert res.returncode != 0 and "exactly one of --model" in res.stderr
