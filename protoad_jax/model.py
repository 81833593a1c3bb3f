"""A fitted ProtoAD model and its file: ``Model``, ``Model.save``, ``load_model``.

A model file is one ``.npz`` without pickles: the prototypes exactly as the head uses them, the
method settings (``Config``) and JSON metadata (backbone weights path, threshold, fit details),
and, from models fitted since they exist, each prototype's exemplar (``Exemplars``), the coverage
level, the calibration record and the update history (``protoad_jax.update``). Older files load
without them. Fitting (``pipeline.fit``) and scoring (``pipeline.make_scorer``) live in ``pipeline``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from protoad_jax.config import EMBED_CHANNELS, Config
from protoad_jax.errors import InputError
from protoad_jax.fileio import atomic_write, json_default, read_npz

FORMAT_VERSION = 1
MODEL_KEYS = ("format_version", "prototypes", "config", "meta")  # the arrays of a model file
# The optional arrays: one row per prototype (Exemplars), absent from older files.
EXEMPLAR_KEYS = ("exemplar_paths", "exemplar_rows", "exemplar_cols", "exemplar_boxes",
                 "exemplar_cosines")
NO_EXEMPLARS = ("no exemplars: this model file was written before exemplars were recorded; "
                "refit it (protoad evaluate or protoad_jax.fit) to see the closest normal look")


class Exemplars(NamedTuple):
    """Per prototype, its exemplar: the training patch most similar to it among the patches it
    was fitted on (``protoad_jax.exemplars``).

    Attributes:
      paths: ``[k]`` str, the patch's training image (``""`` for an image given as an array).
      rows, cols: ``[k]`` int32, the patch's position on the patch grid (``image_size // 4``).
      boxes: ``[k, 4]`` int32, the patch's cell ``[x0, y0, x1, y1]`` in the original image's
        pixels (``x1``, ``y1`` exclusive; all -1 when the image was an array).
      cosines: ``[k]`` float32, cosine of prototype and patch.
    """

    paths: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    boxes: np.ndarray
    cosines: np.ndarray

    def entry(self, i: int) -> dict:
        """Prototype ``i``'s exemplar as JSON-ready ``{"path", "row", "col", "box", "cosine"}``."""
        return {"path": str(self.paths[i]) or None, "row": int(self.rows[i]),
                "col": int(self.cols[i]),
                "box": None if self.boxes[i][0] < 0 else [int(v) for v in self.boxes[i]],
                "cosine": round(float(self.cosines[i]), 6)}

    def append(self, other: Exemplars) -> Exemplars:
        """These exemplars followed by ``other``'s (prototypes appended by an update)."""
        return Exemplars(*(np.concatenate([a, b]) for a, b in zip(self, other)))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A fitted ProtoAD model.

    Attributes:
      prototypes: ``[k, c]`` float32, exactly as the head uses them (L2-normalised when
        ``config.normalize_prototypes``).
      config: the method settings.
      weights: path of the backbone ``.npz`` the prototypes were fitted with.
      threshold: image-score threshold for anomalous/normal decisions, or None.
      info: fit statistics (number of images and patches, timings, clustering details).
      exemplars: per prototype, its exemplar (``Exemplars``); None for a model file written
        before exemplars were recorded (``NO_EXEMPLARS`` says so).
      coverage: the coverage level recorded at fit (``protoad_jax.exemplars.coverage``:
        ``{"level", "quantile", "statistic", "num_patches", "num_prototypes"}``), which
        ``protoad_jax.update`` needs; None for older files.
      calibration: how ``threshold`` was calibrated, ``{"quantile", "paths"}`` (the normal
        images scored), or None; ``update`` recalibrates with it.
      updates: one record per ``protoad_jax.update`` (images added, prototypes added, level).
    """

    prototypes: np.ndarray
    config: Config
    weights: str | None = None
    threshold: float | None = None
    info: dict = dataclasses.field(default_factory=dict)
    exemplars: Exemplars | None = None
    coverage: dict | None = None
    calibration: dict | None = None
    updates: tuple = ()

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[0])

    def with_threshold(self, threshold: float | None, rule: str | None = None,
                       calibration: dict | None = None) -> Model:
        """A copy with ``threshold`` (and its ``rule`` in ``info``); ``calibration``:
        ``{"quantile", "paths"}`` of normal images, kept so that ``update`` can recalibrate."""
        info = dict(self.info, threshold_rule=rule) if rule else self.info
        return dataclasses.replace(self, threshold=threshold, info=info, calibration=calibration)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the model as one ``.npz`` (no pickles; ``np.load(allow_pickle=False)`` opens it).

        The write is atomic. The file holds exactly these arrays (``MODEL_KEYS``):
          ``format_version``: ``[]`` int64, ``FORMAT_VERSION``;
          ``prototypes``: ``[k, c]`` float32, exactly as the head uses them;
          ``config``: ``[]`` unicode, ``Config.to_json()``;
          ``meta``: ``[]`` unicode, JSON ``{"weights", "threshold", "info", "coverage",
          "calibration", "updates"}``;
        and, when the model has exemplars, ``EXEMPLAR_KEYS`` (``Exemplars``' fields, one row per
        prototype; ``exemplar_paths`` unicode).

        Returns:
          ``path``.
        """
        path = Path(path)
        check_prototypes(self.prototypes, "Model.save")
        meta = {"weights": self.weights, "threshold": self.threshold, "info": self.info,
                "coverage": self.coverage, "calibration": self.calibration,
                "updates": list(self.updates)}
        arrays = {
            "format_version": np.array(FORMAT_VERSION, np.int64),
            "prototypes": np.asarray(self.prototypes, np.float32),
            "config": np.array(self.config.to_json()),
            "meta": np.array(json.dumps(meta, sort_keys=True, default=json_default)),
        }
        if self.exemplars is not None:
            check_exemplars(self.exemplars, self.num_prototypes, "Model.save")
            arrays.update(zip(EXEMPLAR_KEYS, (np.asarray(self.exemplars.paths, np.str_),
                                              *self.exemplars[1:])))
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path


class ModelFileError(InputError):
    """A model file is missing, truncated, not a protoad_jax model, or of another format version."""


class PrototypesError(InputError):
    """Prototypes that are not ``[k >= 1, 1792]`` finite floats."""


def load_model(path: str | os.PathLike) -> Model:
    """Reads a model written by ``Model.save``.

    Raises:
      ModelFileError: no such file; the file is truncated, not a protoad_jax model, or of
        another format version (the message names the file and the fix).
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist; fit one with protoad_jax.fit() "
                                "or `protoad evaluate` (it writes <output_dir>/<category>/model.npz)")
    try:
        contents = read_npz(path)
    except ValueError as e:
        raise ModelFileError(f"model file {path} is truncated or not an .npz written by protoad_jax "
                             f"({e}); re-create it with Model.save()") from e
    missing = sorted(set(MODEL_KEYS) - set(contents))
    if missing:
        raise ModelFileError(f"{path} is not a protoad_jax model file: missing {missing} "
                         f"(found {sorted(contents)}; expected {list(MODEL_KEYS)})")
    fv = contents["format_version"]
    if fv.shape != () or not np.issubdtype(fv.dtype, np.integer):
        raise ModelFileError(f"model file {path}: format_version must be an integer scalar, got "
                         f"{fv.dtype} of shape {fv.shape}")
    version = int(fv)
    if version != FORMAT_VERSION:
        raise ModelFileError(f"model file {path} has format version {version}; this protoad_jax reads "
                         f"version {FORMAT_VERSION}. Refit the model with this version.")
    try:
        meta = json.loads(str(contents["meta"]))
        config = Config.from_json(str(contents["config"]))
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"model file {path} has an unreadable config or meta entry "
                         f"({type(e).__name__}: {e}); re-create it with Model.save()") from e
    if not isinstance(meta, dict):
        msg = (f"model file {path}: meta is a JSON {type(meta).__name__}, expected an object; "
               "re-create it with Model.save()")
        raise ModelFileError(msg)
    prototypes = contents["prototypes"]
    if prototypes.dtype != np.float32:
        raise ModelFileError(f"model file {path}: prototypes must be float32, got {prototypes.dtype}")
    check_prototypes(prototypes, f"model file {path}")
    exemplars = None
    if any(k in contents for k in EXEMPLAR_KEYS):
        missing = [k for k in EXEMPLAR_KEYS if k not in contents]
        if missing:
            raise ModelFileError(f"model file {path} has exemplars without {missing}; re-create "
                                 "it with Model.save()")
        exemplars = Exemplars(*(contents[k] for k in EXEMPLAR_KEYS))
        check_exemplars(exemplars, len(prototypes), f"model file {path}")
    return Model(prototypes, config, meta.get("weights"), meta.get("threshold"), meta.get("info", {}),
                 exemplars, meta.get("coverage"), meta.get("calibration"),
                 tuple(meta.get("updates") or ()))


def check_exemplars(exemplars: Exemplars, k: int, what: str) -> None:
    """Raises ``ModelFileError`` unless ``exemplars`` has one row per prototype of the documented
    shapes and dtypes."""
    shapes = {"paths": (k,), "rows": (k,), "cols": (k,), "boxes": (k, 4), "cosines": (k,)}
    for name, shape in shapes.items():
        a = np.asarray(getattr(exemplars, name))
        kind_ok = (a.dtype.kind == "U" if name == "paths" else
                   np.issubdtype(a.dtype, np.floating) if name == "cosines" else
                   np.issubdtype(a.dtype, np.integer))
        if a.shape != shape or not kind_ok:
            raise ModelFileError(f"{what}: exemplar {name} must have shape {shape} (one per "
                                 f"prototype), got {a.dtype} of shape {a.shape}; re-create the "
                                 "model with Model.save()")


def check_prototypes(prototypes: Any, what: str) -> None:
    """Raises ``PrototypesError`` unless ``prototypes`` is ``[k >= 1, EMBED_CHANNELS]`` of finite floats."""
    shape = tuple(np.shape(prototypes))
    if len(shape) != 2 or shape[1] != EMBED_CHANNELS:
        raise PrototypesError(f"{what}: prototypes must be [k, {EMBED_CHANNELS}] (one row per prototype, "
                         f"{EMBED_CHANNELS} = layer1+2+3 channels); got shape {shape}")
    if shape[0] < 1:
        raise PrototypesError(f"{what}: prototypes are empty (k = 0, shape {shape}); a model needs at "
                         "least one prototype")
    p = np.asarray(prototypes)
    if not np.issubdtype(p.dtype, np.floating):
        raise PrototypesError(f"{what}: prototypes must be floating point, got {p.dtype}")
    finite = np.isfinite(p).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise PrototypesError(f"{what}: {bad.size} of {shape[0]} prototypes contain NaN or inf "
                         f"(rows {bad[:5].tolist()})")
