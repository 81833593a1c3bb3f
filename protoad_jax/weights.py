"""ImageNet backbone weights as data with a contract.

Registry of torchvision's ``IMAGENET1K_V1`` files (URL + sha256 prefix), download with progress,
checksum and atomic write, ``.pth`` -> ``.npz`` conversion (torch-free, see ``torch_weights``), and
``.npz`` save/load checked against ``jax.eval_shape`` of the Flax model: one error lists every
missing, unexpected and misshapen key.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import http.client
import importlib.metadata
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from protoad_jax import backbone, fileio, progress, torch_weights
from protoad_jax.config import EMBED_LAYERS


class WeightsFile(NamedTuple):
    """Published checkpoint: its URL and the first hex digits of its sha256 (as torchvision)."""

    url: str
    sha256_prefix: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


REGISTRY: dict[str, WeightsFile] = {
    "wide_resnet50_2": WeightsFile(
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth", "95faca4d"
    ),
    "resnet50": WeightsFile(
        "https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61"
    ),
    "wide_resnet101_2": WeightsFile(
        "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth", "32ee1156"
    ),
}
ENV_VAR = "PROTOAD_WEIGHTS_DIR"
# Stages a converted file may hold, in order; a conversion keeps a prefix of them (plus the stem).
STAGE_ORDER = backbone.STAGES[1:]
DEFAULT_STAGES = EMBED_LAYERS  # what ProtoAD uses
_CHUNK = 1 << 20


class DownloadError(OSError):
    """The file could not be fetched (offline, refused, HTTP error); says how to get it by hand.

    Attributes:
      url: what could not be downloaded.
      dest: where it was to be written (a file placed there by hand is used).
    """

    def __init__(self, message: str, url: str, dest: Path):
        super().__init__(message)
        self.url = url
        self.dest = Path(dest)


class ChecksumError(ValueError):
    """A file's sha256 does not start with the published prefix."""


class ConvertResult(NamedTuple):
    """What ``convert`` wrote."""

    output: Path  # the .npz
    metadata: Path  # the .json next to it
    source_sha256: str
    output_sha256: str
    keys: tuple[str, ...]  # flat variable names, e.g. "params/layer1/0/conv1/kernel"
    num_params: int  # elements in the "params" collection (batch_stats not counted)
    num_batch_stats: int


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where downloaded ``.pth`` and converted ``.npz`` files live.

    ``override`` (the ``--cache_dir`` flag) > ``$PROTOAD_WEIGHTS_DIR`` > the source checkout's
    ``weights/`` folder (when it exists and is writable) > ``~/.cache/protoad_jax``.
    """
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    repo = Path(__file__).resolve().parents[1] / "weights"
    if repo.is_dir() and os.access(repo, os.W_OK):
        return repo
    return Path.home() / ".cache" / "protoad_jax"


def default_weights_path(
    arch: str = "wide_resnet50_2",
    cache: str | os.PathLike | None = None,
    include_layer4: bool = False,
) -> Path:
    """``cache_dir(cache)/<arch>_imagenet1k_v1.npz`` (``..._with_fc.npz`` with layer4 and fc)."""
    backbone.get_arch(arch)
    return cache_dir(cache) / f"{arch}_imagenet1k_v1{'_with_fc' if include_layer4 else ''}.npz"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(digest: str, prefix: str | None, what: str) -> None:
    if prefix and not digest.startswith(prefix.lower()):
        raise ChecksumError(
            f"sha256 mismatch for {what}: expected a digest starting with {prefix}, "
            f"got {digest}; the file is corrupt or not the published one"
        )


def _manual_hint(url: str, dest: Path) -> str:
    return (
        f"Download it by hand from {url} (on a machine with internet access) and convert that "
        f"file, or place it at {dest}."
    )


def download(
    url: str, dest: str | os.PathLike, sha256_prefix: str | None = None, show_progress: bool = True
) -> Path:
    """Fetches ``url`` to ``dest`` via a temporary file next to it, checks its sha256, then renames.

    Args:
      url: http(s) URL.
      dest: final path; its folder is created.
      sha256_prefix: expected leading hex digits of the sha256 (torchvision publishes 8); None
        skips the check.
      show_progress: progress bar on stderr.

    Returns:
      ``dest``.

    Raises:
      DownloadError: no connection / HTTP error; the message gives the URL and where a file
        downloaded by hand goes.
      ChecksumError: the digest does not match; nothing is left at ``dest``.
    """
    dest = Path(dest)

    def stream(f) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with progress.Progress(dest.name, total, unit="B", enabled=show_progress) as bar:
                    while chunk := resp.read(_CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            TimeoutError,
            ConnectionError,
        ) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(
                f"could not download {url}: {reason}. {_manual_hint(url, dest)}", url, dest
            ) from None
        _check_hash(digest.hexdigest(), sha256_prefix, f"{url} (nothing was kept)")

    return fileio.atomic_write(dest, stream)


def _expected_prefix(source: str) -> str | None:
    """The hash a file should have: the registry's for a registered URL or file name, else a
    torch.hub-style ``name-<hex>.pth`` suffix, else None."""
    name = (
        urllib.parse.urlparse(source).path.rsplit("/", 1)[-1]
        if _is_url(source)
        else Path(source).name
    )
    for spec in REGISTRY.values():
        if source == spec.url or name == spec.filename:
            return spec.sha256_prefix
    m = re.fullmatch(r".+-([0-9a-f]{8,64})\.pth", name)
    return m.group(1) if m else None


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https")


def fetch(
    source: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    sha256_prefix: str | None = None,
    show_progress: bool = True,
) -> tuple[Path, str]:
    """A local ``.pth`` for ``source`` (a path, or a URL downloaded into ``cache_dir(cache)`` once).

    The sha256 is checked against ``sha256_prefix``, else the registry (registered URL or file
    name), else a torch.hub-style ``-<hex>.pth`` suffix of the name.

    Returns:
      (path, sha256 hex digest).
    """
    source = str(source)
    prefix = sha256_prefix or _expected_prefix(source)
    if _is_url(source):
        name = urllib.parse.urlparse(source).path.rsplit("/", 1)[-1] or "download.pth"
        path = cache_dir(cache) / name
        if path.exists():  # a cached (or hand-placed) copy is reused when it checks out
            digest = sha256_file(path)
            if not prefix or digest.startswith(prefix.lower()):
                return path, digest
        download(source, path, prefix, show_progress)
        return path, sha256_file(path)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights source {source}: no such file")
    digest = sha256_file(path)
    _check_hash(digest, prefix, str(path))
    return path, digest


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@functools.cache
def _expected_shapes(arch: str, last_stage: str) -> dict[str, tuple[int, ...]]:
    """Flat variable name -> shape of the model, via ``jax.eval_shape`` (traced once per config)."""
    return _flat_shapes(backbone.abstract_variables(arch, last_stage))


def _contract_problems(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> list[str]:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshapen = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    lines = [f"  missing: {k} (expected shape {expected[k]})" for k in missing]
    lines += [f"  unexpected: {k} (shape {found[k]})" for k in unexpected]
    lines += [f"  misshapen: {k}: expected {expected[k]}, found {found[k]}" for k in misshapen]
    return lines


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
      DownloadError, ChecksumError, torch_weights.CheckpointError (corrupt, truncated, refused
      global), ValueError (wrong architecture: the message names the one the file looks like).
      Nothing is written on failure.
    """
    backbone.get_arch(arch)
    stages = tuple(stages)
    last = _last_stage(stages)
    output = Path(output)
    if output.suffix != ".npz":
        raise ValueError(f"the output file must end in .npz, got {output}")
    path, digest = fetch(source, cache, sha256_prefix, show_progress)
    state_dict = torch_weights.load_state_dict(path)
    try:
        flat = torch_weights.to_flax(state_dict, stages)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    flat = {k: _as_float32(v, k, path) for k, v in flat.items()}
    expected = _expected_shapes(arch, last)
    problems = _contract_problems({k: v.shape for k, v in flat.items()}, expected)
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
        raise ValueError(
            f"{path} is not a {arch} checkpoint with stages {stages} ({looks}). "
            f"{len(problems)} problem(s):\n" + "\n".join(_head(problems))
        )
    meta = {
        "source": str(source) if _is_url(str(source)) else str(path.resolve()),
        "sha256": digest,
        "arch": arch,
        "stages": list(stages),
        "package_version": _package_version(),
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
        raise ValueError(f"{path}: {key} has dtype {value.dtype}, expected floating point")
    return np.ascontiguousarray(value.astype(np.float32, copy=False))


def _package_version() -> str:
    try:
        return importlib.metadata.version("protoad-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write_pair(npz: Path, flat: dict[str, np.ndarray], meta_path: Path, meta: dict) -> None:
    """Writes the .npz and its .json so that either both appear or neither changes."""
    fileio.atomic_write(npz, lambda f: np.savez(f, **flat))
    try:
        fileio.atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2) + "\n"), mode="w")
    except BaseException:
        npz.unlink(missing_ok=True)
        raise


def save_variables(path: str | os.PathLike, variables: dict) -> Path:
    """Writes ``{"params": ..., "batch_stats": ...}`` as a flat ``.npz`` (keys joined by ``/``).

    The write is atomic (temporary file + rename); arrays are stored as float32.
    """
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()
    }
    return fileio.atomic_write(path, lambda f: np.savez(f, **flat))


def load_variables(
    path: str | os.PathLike, arch: str = "wide_resnet50_2", last_stage: str = "layer3"
) -> dict:
    """Reads a converted ``.npz``, checked against ``abstract_variables(arch, last_stage)``.

    Args:
      path: ``.npz`` written by ``convert``/``save_variables``.
      arch: architecture the variables are for.
      last_stage: deepest stage of the model that will use them (``"layer3"`` or ``"fc"``).

    Returns:
      ``{"params": {...}, "batch_stats": {...}}`` of float32 numpy arrays, shaped like the model's.

    Raises:
      FileNotFoundError: no file (the message gives the command that makes it).
      ValueError: one error listing every missing, unexpected and misshapen key.
    """
    path = Path(path)
    fix = (
        f"convert the weights again with scripts/convert_weights.py, as arch {arch}"
        f"{' with layer4 and fc' if last_stage in ('layer4', 'fc') else ''}, to {path}"
    )
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}; {fix}")
    expected = _expected_shapes(arch, last_stage)
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz ({e}); {fix}") from None
    problems = _contract_problems({k: v.shape for k, v in flat.items()}, expected)
    bad_dtype = [
        k for k, v in flat.items() if k in expected and not np.issubdtype(v.dtype, np.floating)
    ]
    problems += [f"  wrong dtype: {k}: {flat[k].dtype}, expected float32" for k in bad_dtype]
    if problems:
        meta = path.with_suffix(".json")
        made = ""
        if meta.is_file():
            try:
                m = json.loads(meta.read_text())
                made = (
                    f" ({meta.name} says it was converted for arch {m.get('arch')}, "
                    f"stages {m.get('stages')})"
                )
            except (OSError, ValueError):
                pass
        raise ValueError(
            f"{path} does not match {arch} up to {last_stage}{made}; "
            f"{len(problems)} problem(s):\n" + "\n".join(problems) + f"\nFix: {fix}"
        )
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")


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
        raise ValueError(
            f"no registered ImageNet weights for {arch!r}; registered: {sorted(REGISTRY)}"
        )
    if not out.is_file():
        convert(REGISTRY[arch].url, out, arch, DEFAULT_STAGES, cache, show_progress=show_progress)
    return out


def count_params(variables: dict) -> int:
    """Elements in the ``params`` collection (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
