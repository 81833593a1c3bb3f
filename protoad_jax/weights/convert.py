"""torchvision ``.pth`` -> the ``.npz`` the Flax backbone loads: rename + transpose
(``to_flax``), the architecture check, and the ``.json`` that records the file's provenance."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from protoad_jax import __version__, backbone, fileio
from protoad_jax.config import EMBED_LAYERS
from protoad_jax.fileio import sha256_file
from protoad_jax.weights import torch_reader
from protoad_jax.weights.download import REGISTRY, default_weights_path, fetch, is_url
from protoad_jax.weights.npz import WeightsFileError, contract_problems, expected_shapes

# Stages a converted file may hold, in order; a conversion keeps a prefix of them (plus the stem).
STAGE_ORDER = backbone.STAGES[1:]
DEFAULT_STAGES = EMBED_LAYERS  # what ProtoAD uses


class ConvertResult(NamedTuple):
    """What ``convert`` wrote."""

    output: Path  # the .npz
    metadata: Path  # the .json next to it
    source_sha256: str
    output_sha256: str
    keys: tuple[str, ...]  # flat variable names, e.g. "params/layer1/0/conv1/kernel"
    num_params: int  # elements in the "params" collection (batch_stats not counted)
    num_batch_stats: int


def _last_stage(stages: tuple[str, ...]) -> str:
    stages = tuple(stages)
    if not stages or stages != STAGE_ORDER[: len(stages)]:
        raise ValueError(
            f"stages must be a prefix of {STAGE_ORDER} (the model computes every stage "
            f"up to the deepest), got {stages}"
        )
    return stages[-1]


def guess_arch(state_dict: dict[str, np.ndarray]) -> str | None:
    """The registered architecture a torchvision ``state_dict`` looks like (width, block counts)."""
    w = state_dict.get("layer1.0.conv1.weight")
    if w is None or np.ndim(w) != 4:
        return None
    blocks = []
    for s in range(1, 5):
        idx = {k.split(".")[1] for k in state_dict if k.startswith(f"layer{s}.")}
        blocks.append(len(idx))
    for name, spec in backbone.ARCHS.items():
        if spec.width_per_group == w.shape[0] and all(
            b in (0, n) for b, n in zip(blocks, spec.layers)
        ):
            return name
    return None


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    arch: str = "wide_resnet50_2",
    stages: tuple[str, ...] = DEFAULT_STAGES,
    cache: str | os.PathLike | None = None,
    sha256_prefix: str | None = None,
    show_progress: bool = True,
) -> ConvertResult:
    """Converts a torchvision ``.pth`` (path or URL) to ``output`` (``.npz``) and ``output.json``.

    Args:
      source: ``.pth`` path or http(s) URL (downloaded into ``cache_dir(cache)`` first).
      output: ``.npz`` path; the metadata goes to the same name with ``.json``.
      arch: ``backbone.ARCHS`` key the file must match.
      stages: a prefix of ``STAGE_ORDER`` to keep (the stem is always kept).
      cache: download folder override.
      sha256_prefix: expected digest prefix (default: see ``fetch``).
      show_progress: download progress bar.

    Returns:
      ConvertResult.

    Raises:
      DownloadError, ChecksumError, torch_reader.CheckpointError (corrupt, truncated, refused
      global), WeightsFileError (wrong architecture: the message names the one the file looks like).
      Nothing is written on failure.
    """
    backbone.get_arch(arch)
    stages = tuple(stages)
    last = _last_stage(stages)
    output = Path(output)
    if output.suffix != ".npz":
        raise WeightsFileError(f"the output file must end in .npz, got {output}")
    path, digest = fetch(source, cache, sha256_prefix, show_progress)
    state_dict = torch_reader.load_state_dict(path)
    try:
        flat = to_flax(state_dict, stages)
    except ValueError as e:
        raise WeightsFileError(f"{path}: {e}") from None
    flat = {k: _as_float32(v, k, path) for k, v in flat.items()}
    expected = expected_shapes(arch, last)
    problems = contract_problems({k: v.shape for k, v in flat.items()}, expected)
    if problems:
        guess = guess_arch(state_dict)
        if guess is None:
            looks = (
                "it does not look like a torchvision " + " / ".join(backbone.ARCHS) + " state dict"
            )
        elif guess != arch:
            looks = f"it looks like {guess}; convert it as arch {guess}"
        else:
            looks = (
                f"it looks like {arch}, but entries are missing or misshapen: a partial checkpoint?"
            )
        raise WeightsFileError(
            f"{path} is not a {arch} checkpoint with stages {stages} ({looks}). "
            f"{len(problems)} problem(s):\n" + "\n".join(_head(problems))
        )
    meta = {
        "source": str(source) if is_url(str(source)) else str(path.resolve()),
        "sha256": digest,
        "arch": arch,
        "stages": list(stages),
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta_path = output.with_suffix(".json")
    _write_pair(output, flat, meta_path, meta)
    return ConvertResult(
        output,
        meta_path,
        digest,
        sha256_file(output),
        tuple(sorted(flat)),
        _count(flat, "params/"),
        _count(flat, "batch_stats/"),
    )


def _count(flat: dict[str, np.ndarray], prefix: str) -> int:
    return sum(int(v.size) for k, v in flat.items() if k.startswith(prefix))


def _head(lines: list[str], n: int = 20) -> list[str]:
    return lines if len(lines) <= n else lines[:n] + [f"  ... and {len(lines) - n} more"]


def _as_float32(value: np.ndarray, key: str, path: Path) -> np.ndarray:
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16):
        raise WeightsFileError(f"{path}: {key} has dtype {value.dtype}, expected floating point")
    return np.ascontiguousarray(value.astype(np.float32, copy=False))



def _write_pair(npz: Path, flat: dict[str, np.ndarray], meta_path: Path, meta: dict) -> None:
    """Writes the .npz and its .json so that either both appear or neither changes."""
    fileio.atomic_write(npz, lambda f: np.savez(f, **flat))
    try:
        fileio.atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2) + "\n"), mode="w")
    except BaseException:
        npz.unlink(missing_ok=True)
        raise



def ensure_weights(
    arch: str = "wide_resnet50_2",
    cache: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> Path:
    """The default ``.npz`` for ``arch`` (layer1..3), converted from the registered download if
    missing.

    Raises:
      DownloadError: offline; the message says where to get the ``.pth`` by hand.
    """
    out = default_weights_path(arch, cache)
    if arch not in REGISTRY:
        raise WeightsFileError(
            f"no registered ImageNet weights for {arch!r}; registered: {sorted(REGISTRY)}"
        )
    if not out.is_file():
        convert(REGISTRY[arch].url, out, arch, DEFAULT_STAGES, cache, show_progress=show_progress)
    return out


def to_flax(
    state_dict: dict[str, np.ndarray], stages: tuple[str, ...] = EMBED_LAYERS
) -> dict[str, np.ndarray]:
    """Renames and transposes a torchvision ResNet ``state_dict`` to flat Flax variables.

    Conv ``weight`` OIHW -> ``params/.../kernel`` HWIO; Linear ``weight`` [out, in] -> kernel
    [in, out];
    BatchNorm ``weight``/``bias`` -> ``params/.../scale``/``bias``; ``running_mean``/``running_var``
    -> ``batch_stats/.../mean``/``var``; ``num_batches_tracked`` is dropped.

    Args:
      state_dict: torch key (``layer2.0.downsample.0.weight``) -> numpy array.
      stages: which of ``layer1`` .. ``layer4`` and ``fc`` to keep; the stem (``conv1``, ``bn1``)
        is always kept.

    Returns:
      ``{"params/layer2/0/downsample/0/kernel": array, ...}`` (keys joined with ``/``).
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        *module, leaf = key.split(".")
        top = module[0] if module else ""
        if (top.startswith("layer") or top == "fc") and top not in stages:
            continue
        path = "/".join(module)
        value = np.asarray(value)
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and value.ndim == 4:
            out[f"params/{path}/kernel"] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        elif leaf == "weight" and value.ndim == 2:
            out[f"params/{path}/kernel"] = np.ascontiguousarray(value.T)
        elif leaf == "weight":
            out[f"params/{path}/scale"] = value
        elif leaf == "bias":
            out[f"params/{path}/bias"] = value
        elif leaf == "running_mean":
            out[f"batch_stats/{path}/mean"] = value
        elif leaf == "running_var":
            out[f"batch_stats/{path}/var"] = value
        else:
            raise ValueError(
                f"unexpected state_dict entry {key!r}: not a ResNet conv, BatchNorm or fc tensor"
            )
    return out
