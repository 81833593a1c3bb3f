"""A portable scorer: the whole scoring path as a ``jax.export`` artifact that runs without Flax.

``export_scorer(model, variables, D)`` writes the directory ``D``:

  ``scorer.jaxexport``: the serialized ``jax.export.Exported`` of
      ``(weights {name: [...]}, images [b, s, s, 3] float32) -> (maps [b, s, s], scores [b])``,
      the jitted region ``make_scorer`` runs (backbone -> embedding -> head), lowered for the
      platforms asked; ``b`` is symbolic unless a batch size is given;
  ``weights.npz``: its first argument, the backbone variables as given (keys joined by ``/``:
      ``"params/conv1/kernel"``, ...) and ``"prototypes"`` ``[k, 1792]`` float32;
  ``manifest.json``: input shape and dtype, preprocessing constants, threshold and its rule,
      every ``Config`` setting, package and jax versions, platforms, the sha256 of both files.

The directory appears complete or not at all (written under a temporary name, then renamed).
``load_exported(D)`` checks every file against the manifest and the manifest against the
artifact, and returns ``(scorer, manifest)``; it imports neither Flax nor the fitting code.

``export_scorer(..., format="onnx")`` writes the same kind of directory with ``scorer.onnx``
(weights inside, or in ``scorer.onnx.data`` beside it above 1.5 GiB, listed in the manifest as
``"weights"``) in place of the two files above, converted by jax2onnx from the same jitted
function; its manifest says ``"artifact_format": "onnx"`` and ``load_exported`` runs it with ONNX
Runtime or OpenVINO (``protoad_jax.onnx_export``; the ``[deploy]`` extra).

The weights travel as an argument rather than as constants inside the artifact: both give the
same numbers, but with the weights as constants XLA compiled markedly slower and with a larger
peak memory when this was measured (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from protoad_jax import fileio, input_pipeline, xla_cpu
from protoad_jax.config import IMAGENET_MEAN, IMAGENET_STD
from protoad_jax.errors import InputError, SettingsError

if TYPE_CHECKING:
    from protoad_jax.config import Config
    from protoad_jax.model import Model

ARTIFACT = "scorer.jaxexport"
WEIGHTS = "weights.npz"
MANIFEST = "manifest.json"
FORMAT = "protoad_jax exported scorer"
FORMAT_VERSION = 1
# The manifest's "artifact_format": absent in directories written before ONNX existed.
FORMATS = ("jax", "onnx")
ARTIFACT_FORMATS = {"jax": "jax_export", "onnx": "onnx"}
PLATFORMS = ("cpu", "cuda", "tpu")
PROTOTYPES = "prototypes"  # key of the prototypes in weights.npz
BATCH_DIM = "b"  # name of the symbolic batch dimension


class ExportError(InputError):
    """An export directory that cannot be written, read or trusted, or an input it cannot score.

    The message names the file and says how to fix it.
    """


# ----------------------------------------------------------------------------- export


def default_platforms() -> tuple[str, ...]:
    """The platform this process runs on (``jax.export.default_export_platform()``) plus cpu."""
    return tuple(dict.fromkeys((jax_export.default_export_platform(), "cpu")))


def _check_platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
    if platforms is None:
        platforms = default_platforms()
    if isinstance(platforms, str):
        platforms = (platforms,)
    platforms = tuple(dict.fromkeys(platforms))
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise SettingsError(f"platforms must be a non-empty subset of {PLATFORMS}; got {list(platforms)}")
    return platforms


def preprocessing(resize: int, crop: int) -> dict[str, Any]:
    """The manifest's description of ``protoad_jax.preprocess_image(path, resize, crop)``."""
    return {
        "function": f"protoad_jax.preprocess_image(path, resize={resize}, crop={crop})",
        "color": "RGB (PIL convert('RGB'); 16-bit grayscale rescaled to 8 bits first)",
        "resize": resize,
        "resize_rule": "shorter side to `resize`, longer side int(resize * long / short) "
                       "(torchvision Resize(int)); skipped when the size already matches",
        "interpolation": "LANCZOS",
        "interpolation_library": "PIL Image.resize(size, Image.LANCZOS)",
        "crop": crop,
        "crop_rule": "center crop, offsets int(round((size - crop) / 2)) (torchvision CenterCrop)",
        "scale": "uint8 / 255 in float32",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "formula": "(x / 255 - mean) / std per RGB channel, float32, HWC",
    }


def _dims(shape: Sequence[Any]) -> list[int | str]:
    """A shape for JSON: ints, and symbolic dimensions by name."""
    return [int(d) if isinstance(d, (int, np.integer)) else str(d) for d in shape]


def _versions() -> dict[str, str]:
    import jaxlib

    from protoad_jax import __version__

    return {"protoad_jax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def export_scorer(model: Model, variables: dict | None, output_dir: str | os.PathLike, *,
                  platforms: Sequence[str] | None = None, batch_size: int | None = None,
                  chunk_size: int | str | None = "auto", format: str = "jax") -> Path:
    """Writes ``model``'s whole scoring path as a portable directory (see the module docstring).

    ``load_exported(output_dir)`` then gives the same maps and scores as
    ``make_scorer(model, variables)`` on the same backend, without Flax or the fitting code.

    Args:
      model: a fitted or loaded ``protoad_jax.Model``.
      variables: backbone variables, as ``make_scorer`` takes them (BatchNorm-folded when they
        come from ``weights.load_backbone``); None loads them from ``model.weights``.
      output_dir: the directory to write. It must be new, empty, or an earlier export (which is
        replaced); on any error nothing is left there or next to it.
      platforms: any of ``"cpu"``, ``"cuda"``, ``"tpu"`` (lowered here; no accelerator needed);
        default ``default_platforms()``, the current platform plus cpu.
      batch_size: None: a symbolic batch dimension (any batch, one compile per batch size);
        an int fixes the batch.
      chunk_size: as ``make_scorer`` (default ``"auto"``; for ``format="onnx"``, ``"auto"`` is
        one matmul per stage up to ``ONNX_UNCHUNKED_MAX`` prototypes: OpenVINO runs the chunk
        loop's ONNX Loop slowly).
      format: ``"jax"`` (``scorer.jaxexport`` + ``weights.npz``) or ``"onnx"`` (``scorer.onnx``
        with the weights inside, converted by jax2onnx from the same function; ``platforms``
        does not apply; needs the ``[deploy]`` extra).

    Returns:
      ``output_dir``.

    Raises:
      ValueError: bad prototypes, platforms, batch size, chunk size or format; no weights.
      ExportError: ``output_dir`` exists and is not an export directory; ``format="onnx"``
        without the ``[deploy]`` extra installed.
    """
    from protoad_jax import pipeline  # the fitting side: only exporting needs it

    if format not in FORMATS:
        raise SettingsError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "onnx":
        if platforms is not None:
            raise SettingsError("platforms apply to format='jax' only; an ONNX file runs wherever "
                                "its runtime does")
        return _export_onnx(model, variables, output_dir, batch_size=batch_size,
                            chunk_size=chunk_size)
    platforms = _check_platforms(platforms)
    _check_batch_size(batch_size)
    out = Path(output_dir)
    _check_target(out)
    # Untuned: it is traced inside the jit below (compiler options belong to a top-level jit,
    # and an artifact carries none: its user's XLA compiles it).
    fn, variables, prototypes = pipeline.scoring_parts(model, variables, chunk_size=chunk_size,
                                                       tuned=False, caller="export_scorer")
    arrays = {k: np.asarray(v) for k, v in fileio.flatten_tree(variables).items()}
    if PROTOTYPES in arrays:
        raise ValueError(f"backbone variables must not have a top-level {PROTOTYPES!r} entry")
    arrays[PROTOTYPES] = np.asarray(prototypes, np.float32)

    def scoring(weights: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        weights = dict(weights)
        protos = weights.pop(PROTOTYPES)
        res = fn(fileio.unflatten_tree(weights), protos, images)
        return res.anomaly_map, res.score

    size = model.config.image_size
    shape = (jax_export.symbolic_shape(f"{BATCH_DIM}, {size}, {size}, 3") if batch_size is None
             else (int(batch_size), size, size, 3))
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
    exported = jax_export.export(jax.jit(scoring), platforms=platforms)(
        specs, jax.ShapeDtypeStruct(shape, jnp.float32))
    blob = exported.serialize()

    def write(tmp: Path) -> None:
        (tmp / ARTIFACT).write_bytes(blob)
        with open(tmp / WEIGHTS, "wb") as f:
            np.savez(f, **arrays)
        manifest = _manifest(model, exported, tmp, chunk_size=chunk_size,
                             folded="batch_stats" not in variables)
        fileio.write_json(tmp / MANIFEST, manifest)

    fileio.atomic_write_dir(out, write, check=_check_target)
    return out


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or
                                   not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise SettingsError(f"batch_size must be a positive integer or None (symbolic), got {batch_size!r}")


# ONNX exports with chunk_size="auto" use one matmul per stage up to this many prototypes
# ([56, 56, 4096] float32 similarities: 51 MB per image) and prototype chunks above it.
ONNX_UNCHUNKED_MAX = 4096


def _export_onnx(model: Model, variables: dict | None, output_dir: str | os.PathLike, *,
                 batch_size: int | None, chunk_size: int | str | None) -> Path:
    """``export_scorer(..., format="onnx")``: the jitted scoring function with its weights closed
    over (ONNX initializers), converted by jax2onnx."""
    from protoad_jax import onnx_export, pipeline

    _check_batch_size(batch_size)
    onnx_export.import_deploy("jax2onnx", ExportError, "export_scorer(format='onnx')")
    out = Path(output_dir)
    _check_target(out)
    if chunk_size == "auto" and model.num_prototypes <= ONNX_UNCHUNKED_MAX:
        # jax2onnx turns the chunk scan into an ONNX Loop, which OpenVINO runs slowly (28 of
        # 54 ms at batch 1, bf16, K = 1000: scripts/benchmarks/deploy.py); one matmul per stage
        # instead, while the [h, w, K] similarity block stays small.
        chunk_size = None
    fn, variables, prototypes = pipeline.scoring_parts(model, variables, chunk_size=chunk_size,
                                                       tuned=False, caller="export_scorer")

    def scoring(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        res = fn(variables, prototypes, images)
        return res.anomaly_map, res.score

    size = model.config.image_size
    batch = BATCH_DIM if batch_size is None else int(batch_size)
    shape = (batch, size, size, 3)

    def write(tmp: Path) -> None:
        conversion = onnx_export.convert(scoring, shape, tmp / onnx_export.ARTIFACT,
                                         np.asarray(prototypes), ExportError)
        files = {"artifact": onnx_export.ARTIFACT}
        if conversion["external_data"]:
            files["weights"] = conversion["external_data"]
        manifest = {
            **_manifest_common(model, "onnx", files, tmp,
                               [list(shape), [batch, size, size], [batch]], ["float32"] * 3,
                               chunk_size=chunk_size, folded="batch_stats" not in variables),
            "call": "an ONNX session of scorer.onnx: input 'images' = `input`; outputs 'maps', "
                    "'scores' as `outputs`. protoad_jax.load_exported(dir, runtime='onnxruntime' | "
                    "'openvino') does this after its checks.",
            "onnx": {**conversion, "batch": batch,
                     "runtimes": list(onnx_export.RUNTIMES),
                     "default_matmul_precision": jax.config.jax_default_matmul_precision},
            "versions": {**_versions(), **onnx_export.converter_versions()},
        }
        fileio.write_json(tmp / MANIFEST, manifest)

    fileio.atomic_write_dir(out, write, check=_check_target)
    return out


def _manifest_common(model: Model, kind: str, files: dict[str, str], folder: Path,
                     shapes: list[list], dtypes: list[str], *, chunk_size: int | str | None,
                     folded: bool) -> dict[str, Any]:
    """The manifest entries both formats write: format, the files' sizes and sha256 (``files``:
    manifest key -> file name in ``folder``), input and outputs (``shapes`` and ``dtypes`` of
    images, maps, scores), preprocessing, threshold, config and model."""
    config = model.config
    (image, maps, scores), (image_dt, maps_dt, scores_dt) = shapes, dtypes
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact_format": ARTIFACT_FORMATS[kind],
        "files": {key: {"name": name, "bytes": (folder / name).stat().st_size,
                        "sha256": fileio.sha256_file(folder / name)} for key, name in files.items()},
        "input": {"shape": image, "dtype": image_dt,
                  "layout": "NHWC, RGB, preprocessed as `preprocessing` says"},
        "outputs": {
            "maps": {"shape": maps, "dtype": maps_dt,
                     "meaning": "anomaly map per pixel of the crop (higher = more anomalous)"},
            "scores": {"shape": scores, "dtype": scores_dt,
                       "meaning": f"image anomaly score ({config.image_score})"},
        },
        "preprocessing": preprocessing(config.resize, config.image_size),
        "threshold": {"value": model.threshold, "rule": model.info.get("threshold_rule"),
                      "decision": "anomalous when score > value; null: no threshold was set"},
        "config": dataclasses.asdict(config),
        "model": {"num_prototypes": model.num_prototypes, "backbone_weights": model.weights,
                  "batchnorm": "folded into the convolutions" if folded else "unfolded",
                  "chunk_size": chunk_size, "info": model.info},
    }


def _manifest(model: Model, exported: jax_export.Exported, folder: Path, *,
              chunk_size: int | str | None,
              folded: bool) -> dict[str, Any]:
    image = exported.in_avals[-1]
    maps, scores = exported.out_avals
    return {
        **_manifest_common(model, "jax", {"artifact": ARTIFACT, "weights": WEIGHTS}, folder,
                           [_dims(a.shape) for a in (image, maps, scores)],
                           [str(a.dtype) for a in (image, maps, scores)],
                           chunk_size=chunk_size, folded=folded),
        "call": "jax.export.deserialize(bytearray(<scorer.jaxexport bytes>)).call(weights, images) "
                "with weights = dict(np.load('weights.npz')) and images as `input`; returns "
                "(maps, scores) as `outputs`. protoad_jax.load_exported(dir) does this after its checks.",
        "jax_export": {
            "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
            "batch": BATCH_DIM if isinstance(_dims(image.shape)[0], str) else int(image.shape[0]),
            "nr_devices": exported.nr_devices,
            "default_matmul_precision": jax.config.jax_default_matmul_precision,
        },
        "versions": _versions(),
    }


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ExportError(f"{out} exists and is not an export directory (no {MANIFEST}); refusing to "
                          "replace it. Choose a new or empty directory.")


# ----------------------------------------------------------------------------- load


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _version_advice(written: str) -> str | None:
    """What to do when this jax cannot run an artifact written by jax ``written``; None when
    ``written`` is this very version (then the files, not the versions, are at fault)."""
    found = jax.__version__
    if _version_tuple(found) == _version_tuple(written):
        return None
    if _version_tuple(found) < _version_tuple(written):
        return (f"the artifact was written by jax {written} and needs jax >= {written}, found "
                f"{found}: pip install 'jax>={written}', or re-export it with jax {found}")
    return (f"the artifact was written by jax {written}; this jax {found} no longer reads it: "
            f"re-export it with jax {found}, or run it with jax {written}")


def _read_manifest(folder: Path, fix: str) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} is missing: {folder} is not a complete export directory; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path} is not readable JSON ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not the manifest of a protoad_jax exported scorer "
                          f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT!r}); {fix}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path} has format version {manifest.get('format_version')!r}; this "
                          f"protoad_jax reads version {FORMAT_VERSION}; {fix}")
    kind = manifest.get("artifact_format", ARTIFACT_FORMATS["jax"])
    if kind not in ARTIFACT_FORMATS.values():
        raise ExportError(f"{path} has artifact_format {kind!r}; this protoad_jax reads "
                          f"{sorted(ARTIFACT_FORMATS.values())}; {fix}")
    try:
        # An ONNX export lists "weights" only when they are external data beside scorer.onnx.
        optional = () if kind == "jax_export" else ("weights",)
        for key in ("artifact", "weights"):
            if key in optional and key not in manifest["files"]:
                continue
            entry = manifest["files"][key]
            if not (isinstance(entry["name"], str) and isinstance(entry["bytes"], int)
                    and isinstance(entry["sha256"], str)):
                raise TypeError(f"files.{key}")
        if kind == "jax_export":
            jx = manifest["jax_export"]
            if not (isinstance(jx["platforms"], list)
                    and isinstance(jx["calling_convention_version"], int)):
                raise TypeError("jax_export")
        elif not isinstance(manifest["onnx"], dict):
            raise TypeError("onnx")
        elif not isinstance(manifest["model"]["num_prototypes"], int):
            raise TypeError("model.num_prototypes")
        elif not (manifest["onnx"].get("prototypes") is None or (
                isinstance(manifest["onnx"]["prototypes"], dict)
                and all(isinstance(d, list) for d in manifest["onnx"]["prototypes"].values()))):
            raise TypeError("onnx.prototypes")
        for key in ("jax",):
            if not isinstance(manifest["versions"][key], str):
                raise TypeError(f"versions.{key}")
        if not (isinstance(manifest["input"]["shape"], list) and isinstance(manifest["input"]["dtype"], str)):
            raise TypeError("input")
        for key in ("maps", "scores"):
            if not isinstance(manifest["outputs"][key]["shape"], list):
                raise TypeError(f"outputs.{key}")
        if not isinstance(manifest["threshold"], dict):
            raise TypeError("threshold")
    except (KeyError, TypeError) as e:
        raise ExportError(f"{path} lacks or mistypes the entry {e}; it was edited or written by "
                          f"another tool; {fix}") from e
    return manifest


def manifest_config(manifest: dict[str, Any]) -> Config:
    """The ``Config`` a manifest records.

    Raises:
      ExportError: the manifest's config is not a mapping of ``Config`` fields.
    """
    from protoad_jax.config import Config

    try:
        return Config(**manifest["config"])
    except (KeyError, TypeError, InputError) as e:
        raise ExportError(f"the manifest's config entry is not a protoad_jax Config ({e}); it was "
                          "edited or written by another tool; re-export the scorer") from e


def _check_file(folder: Path, entry: dict[str, Any], fix: str,
                names: tuple[str, ...] = (ARTIFACT, WEIGHTS)) -> Path:
    path = folder / entry["name"]
    if entry["name"] not in names:
        raise ExportError(f"{folder / MANIFEST} names the file {entry['name']!r}; expected "
                          f"{' and '.join(names)}; {fix}")
    if not path.is_file():
        raise ExportError(f"{path} is missing: the export directory is incomplete; {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ExportError(f"{path} is {size} bytes but {MANIFEST} says {entry['bytes']}: the file was "
                          f"truncated or replaced; {fix}")
    digest = fileio.sha256_file(path)
    if digest != entry["sha256"]:
        raise ExportError(f"{path} has sha256 {digest} but {MANIFEST} says {entry['sha256']}: the file "
                          f"was edited or replaced; {fix}")
    return path


def _check_against_artifact(manifest: dict[str, Any], exported: jax_export.Exported,
                            folder: Path, fix: str) -> tuple[dict, Any]:
    """Raises ExportError where the manifest and the deserialized artifact disagree; returns the
    artifact's weight avals ``{name: aval}`` and its image aval."""
    where = f"{folder / MANIFEST} does not match {folder / ARTIFACT}"
    try:
        (weights, image), kwargs = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
        if kwargs or not isinstance(weights, dict):
            raise TypeError(exported.in_tree)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{folder / ARTIFACT} takes {exported.in_tree}, not (weights, images): it is "
                          f"not a protoad_jax scorer; {fix}") from e
    jx = manifest["jax_export"]
    _check_io(manifest, folder, where, "artifact", fix, {
        "input shape": _dims(image.shape),
        "input dtype": str(image.dtype),
        "output shapes": [_dims(a.shape) for a in exported.out_avals],
        "platforms": (jx["platforms"], list(exported.platforms)),
        "calling convention version": (jx["calling_convention_version"],
                                       exported.calling_convention_version),
    })
    return weights, image


def _check_io(manifest: dict[str, Any], folder: Path, where: str, what_file: str, fix: str,
              found: dict[str, Any]) -> None:
    """Raises ExportError where the manifest disagrees with what the file declares: ``found``
    maps a check to the file's value (the manifest's input shape and dtype and output shapes
    are read here) or to a ``(manifest's, file's)`` pair; then the preprocessing crop against
    the input shape."""
    says_of = {"input shape": manifest["input"]["shape"], "input dtype": manifest["input"]["dtype"],
               "output shapes": [manifest["outputs"][k]["shape"] for k in ("maps", "scores")]}
    for what, has in found.items():
        says, has = (says_of[what], has) if what in says_of else has
        if says != has:
            raise ExportError(f"{where}: the manifest's {what} is {says}, the {what_file}'s {has}. "
                              f"The manifest was edited or belongs to another export; {fix}")
    shape = manifest["input"]["shape"]
    crop = manifest["preprocessing"].get("crop") if isinstance(manifest.get("preprocessing"), dict) else None
    if shape[1:] != [crop, crop, 3]:
        raise ExportError(f"{folder / MANIFEST}: preprocessing crop {crop} does not match the input shape "
                          f"{shape}; the manifest was edited; {fix}")


def _load_weights(path: Path, avals: dict[str, Any], fix: str) -> dict[str, np.ndarray]:
    try:
        arrays = fileio.read_npz(path)
    except ValueError as e:
        raise ExportError(f"{path} is not a readable .npz ({e}); {fix}") from e
    missing, unexpected = sorted(set(avals) - set(arrays)), sorted(set(arrays) - set(avals))
    bad = [f"{k}: {arrays[k].dtype}{list(arrays[k].shape)} != {avals[k].dtype}{list(avals[k].shape)}"
           for k in sorted(set(avals) & set(arrays))
           if arrays[k].shape != tuple(avals[k].shape) or arrays[k].dtype != avals[k].dtype]
    if missing or unexpected or bad:
        raise ExportError(f"{path} does not fit the artifact: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}, mismatched {bad[:5]}; {fix}")
    return arrays


def load_exported(directory: str | os.PathLike, *, runtime: str | None = None,
                  precision: str | None = None
                  ) -> tuple[Callable[[Any], tuple[jax.Array, jax.Array]], dict[str, Any]]:
    """Loads a directory written by ``export_scorer``, checking it first.

    An ONNX directory (``export_scorer(..., format="onnx")``) runs with ``runtime``
    ``"onnxruntime"`` (default) or ``"openvino"``, the latter at ``precision`` ``"f32"``
    (default: the live scorer's numbers), ``"bf16"`` or ``"f16"`` (OpenVINO's inference
    precision hint; faster where the CPU has the instructions, maps differ, docs/export.md).
    Its scorer takes and returns numpy arrays; the same checks apply (the files' sizes and
    sha256, including external data, the manifest against the file's input and outputs and its
    prototype count, the images). OpenVINO compiles the file once per batch size, at that
    batch's first call, with the batch made static (faster than the symbolic batch). Both
    arguments must be left None for a jax.export directory.

    Checks, in order: the manifest (format and version), each file's size and sha256 against
    the manifest, that this process's platform is among the artifact's, that this jax reads the
    artifact's calling convention, then the manifest's input and output shapes, dtype, platforms
    and version against the deserialized artifact, and the weights against its arguments.
    Neither Flax nor the fitting code is imported.

    Returns:
      ``(scorer, manifest)``: ``scorer(images [b, s, s, 3] float32) -> (maps [b, s, s],
      scores [b])`` runs the artifact with its weights on the default device; it is jitted
      (one compile per batch shape) and can be called inside the user's own ``jax.jit``.
      ``manifest`` is the parsed ``manifest.json`` (threshold, preprocessing, config, ...).

    Raises:
      ExportError: a missing, truncated, edited or mismatched file, a platform or jax version
        the artifact cannot run on, a runtime that is not installed (ONNX: ``pip install
        'protoad-jax[deploy]'``); the message names the file and the fix. The scorer raises
        ExportError for images of the wrong shape or dtype, or with NaN/inf.
    """
    folder = Path(directory)
    fix = f"re-export it to {folder} (scripts/export.py, or protoad_jax.export_scorer)"
    if not folder.is_dir():
        raise ExportError(f"exported scorer directory {folder} does not exist; write one with "
                          "scripts/export.py or protoad_jax.export_scorer")
    manifest = _read_manifest(folder, fix)
    if manifest.get("artifact_format", ARTIFACT_FORMATS["jax"]) == ARTIFACT_FORMATS["onnx"]:
        return _load_onnx(folder, manifest, runtime, precision, fix)
    if runtime is not None or precision is not None:
        raise ExportError(f"{folder / MANIFEST}: {folder} is a jax.export directory, which runs with "
                          "jax; runtime= and precision= apply to ONNX directories (re-export it "
                          "with format='onnx', scripts/export.py --format=onnx)")
    artifact = _check_file(folder, manifest["files"]["artifact"], fix)
    weights_path = _check_file(folder, manifest["files"]["weights"], fix)
    jx = manifest["jax_export"]
    here = jax_export.default_export_platform()
    if here not in jx["platforms"]:
        raise ExportError(f"{artifact} was exported for {jx['platforms']}, but this process runs on "
                          f"{here}: re-export it for platforms {','.join(jx['platforms'] + [here])}")
    written = manifest["versions"]["jax"]
    ccv = jx["calling_convention_version"]
    lo = jax_export.minimum_supported_calling_convention_version
    hi = jax_export.maximum_supported_calling_convention_version
    advice = _version_advice(written)
    if not lo <= ccv <= hi:
        why = advice or (f"{folder / MANIFEST} was edited (jax {written} wrote it, and this jax "
                         f"writes conventions {lo}..{hi}); {fix}")
        raise ExportError(f"{artifact} uses jax.export calling convention {ccv}; jax {jax.__version__} "
                          f"runs {lo}..{hi}: {why}")
    try:
        exported = jax_export.deserialize(bytearray(artifact.read_bytes()))
    except Exception as e:  # flatbuffers, struct, MLIR: many types, all meaning "cannot read"
        why = (f"{advice}; if jax is not the cause, the file is damaged: {fix}" if advice else
               f"it was written by this same jax version, so the file is damaged or is not a "
               f"jax.export artifact: {fix}")
        raise ExportError(f"{artifact} cannot be deserialized by jax {jax.__version__} "
                          f"({type(e).__name__}: {str(e)[:200]}); {why}") from e
    weight_avals, image_aval = _check_against_artifact(manifest, exported, folder, fix)
    weights = jax.device_put(_load_weights(weights_path, weight_avals, fix))
    # With the live scorer's XLA:CPU options (xla_cpu.compiler_options()): as fast, and the same
    # bits. Inside a user's jit the outer jit's options apply (JAX takes them on top-level only).
    call = jax.jit(exported.call, compiler_options=xla_cpu.compiler_options())
    traced_call = jax.jit(exported.call)
    image_size = int(image_aval.shape[1])
    fixed = image_aval.shape[0] if isinstance(image_aval.shape[0], (int, np.integer)) else None

    def scorer(images: Any) -> tuple[jax.Array, jax.Array]:
        input_pipeline.check_images(images, image_size, batch_size=fixed, owner=str(artifact),
                                    error=ExportError)
        return (traced_call if isinstance(images, jax.core.Tracer) else call)(weights, images)

    return scorer, manifest


def _load_onnx(folder: Path, manifest: dict[str, Any], runtime: str | None, precision: str | None,
               fix: str) -> tuple[Callable[[Any], tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    from protoad_jax import onnx_export

    runtime, precision = onnx_export.check_runtime(runtime, precision, ExportError)
    artifact = _check_file(folder, manifest["files"]["artifact"], fix, (onnx_export.ARTIFACT,))
    if "weights" in manifest["files"]:  # external data
        _check_file(folder, manifest["files"]["weights"], fix, (onnx_export.EXTERNAL_DATA,))
    elif (folder / onnx_export.EXTERNAL_DATA).exists():
        raise ExportError(f"{folder / onnx_export.EXTERNAL_DATA} is not listed in "
                          f"{folder / MANIFEST}, so it cannot be checked; the manifest was edited "
                          f"or the file comes from another export; {fix}")
    run, found = onnx_export.session(artifact, runtime, precision, ExportError, fix)
    where = f"{folder / MANIFEST} does not match {artifact}"
    if found["names"] != ([onnx_export.INPUT], list(onnx_export.OUTPUTS)):
        raise ExportError(f"{artifact} takes {found['names'][0]} and returns {found['names'][1]}, "
                          f"not {onnx_export.INPUT} -> {list(onnx_export.OUTPUTS)}: it is not a "
                          f"protoad_jax scorer; {fix}")
    _check_io(manifest, folder, where, "file", fix, {
        "input shape": found["input"], "input dtype": found["dtype"],
        "output shapes": [found[k] for k in onnx_export.OUTPUTS]})
    # After the runtime read it: a damaged file is the runtime's error first.
    onnx_export.check_prototypes(artifact, manifest["onnx"].get("prototypes"),
                                 manifest["model"]["num_prototypes"], ExportError, fix,
                                 folder / MANIFEST)
    shape = manifest["input"]["shape"]
    image_size = int(shape[1])
    fixed = shape[0] if isinstance(shape[0], int) else None
    owner = f"{artifact} ({runtime}{', ' + precision if runtime == 'openvino' else ''})"

    def scorer(images: Any) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(images, jax.core.Tracer):
            raise ExportError(f"{owner} runs outside jax: call it on concrete arrays, not inside "
                              "jax.jit (or export with format='jax' to trace it)")
        input_pipeline.check_images(images, image_size, batch_size=fixed, owner=owner,
                                    error=ExportError)
        maps, scores = run(np.ascontiguousarray(np.asarray(images)))
        return np.asarray(maps, np.float32), np.asarray(scores, np.float32)

    return scorer, manifest


# ----------------------------------------------------------------------------- files


def score_files(scorer: Callable, manifest: dict[str, Any], paths: Sequence[str | os.PathLike], *,
                batch_size: int = 8, progress: bool = True, skip_bad: bool = False
                ) -> input_pipeline.ScoredImages:
    """Decodes and preprocesses image files as ``manifest`` says and scores them with ``scorer``
    (from ``load_exported``), in batches of ``batch_size`` (the artifact's when it is fixed); the
    last batch is zero-padded so each batch size compiles once. ``patch_maps`` is None: the
    artifact returns maps and scores only.

    Raises:
      ExportError: the manifest asks for a preprocessing other than ``preprocess_image``'s.
      BadImageError: an undecodable file (unless ``skip_bad``), or every file was.
    """
    pre = manifest["preprocessing"]
    try:
        ours = preprocessing(pre["resize"], pre["crop"])
    except (KeyError, TypeError) as e:
        raise ExportError(f"manifest preprocessing lacks {e}; re-export the scorer") from e
    if pre != ours:
        diff = sorted(k for k in set(pre) | set(ours) if pre.get(k) != ours.get(k))
        raise ExportError(f"the manifest asks for a preprocessing that differs from this protoad_jax's "
                          f"preprocess_image in {diff}; preprocess the images as the manifest says "
                          "and call the scorer directly")
    fixed = manifest["input"]["shape"][0]
    batch_size = fixed if isinstance(fixed, int) else batch_size
    (maps, scores), inputs, skipped = input_pipeline.score_batches(
        scorer, paths, batch_size, pre["resize"], pre["crop"], progress=progress, skip_bad=skip_bad)
    return input_pipeline.ScoredImages(maps, scores, None, inputs, skipped)
