"""Registered ImageNet checkpoints (URL + sha256 prefix), the weights cache folder, and download
with progress, checksum and atomic write."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

from protoad_jax import fileio, progress
from protoad_jax.errors import InputError
from protoad_jax.fileio import sha256_file

_CHUNK = 1 << 20  # download read size


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


class DownloadError(InputError, OSError):
    """The file could not be fetched (offline, refused, HTTP error); says how to get it by hand.

    Attributes:
      url: what could not be downloaded.
      dest: where it was to be written (a file placed there by hand is used).
    """

    def __init__(self, message: str, url: str, dest: Path):
        super().__init__(message)
        self.url = url
        self.dest = Path(dest)


class WeightsSourceError(InputError, FileNotFoundError):
    """The ``.pth`` to convert does not exist."""


class ChecksumError(InputError):
    """A file's sha256 does not start with the published prefix."""



def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where downloaded ``.pth`` and converted ``.npz`` files live.

    ``override`` (the ``--cache_dir`` flag) > ``$PROTOAD_WEIGHTS_DIR`` > the source checkout's
    ``weights/`` folder (when it exists and is writable) > ``~/.cache/protoad_jax``.
    """
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    repo = Path(__file__).resolve().parents[2] / "weights"
    if repo.is_dir() and os.access(repo, os.W_OK):
        return repo
    return Path.home() / ".cache" / "protoad_jax"


def default_weights_path(
    arch: str = "wide_resnet50_2",
    cache: str | os.PathLike | None = None,
    include_layer4: bool = False,
) -> Path:
    """``cache_dir(cache)/<arch>_imagenet1k_v1.npz`` (``..._with_fc.npz`` with layer4 and fc)."""
    if arch not in REGISTRY:
        raise InputError(f"unknown arch {arch!r}; registered: {sorted(REGISTRY)}")
    return cache_dir(cache) / f"{arch}_imagenet1k_v1{'_with_fc' if include_layer4 else ''}.npz"




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
        if is_url(source)
        else Path(source).name
    )
    for spec in REGISTRY.values():
        if source == spec.url or name == spec.filename:
            return spec.sha256_prefix
    m = re.fullmatch(r".+-([0-9a-f]{8,64})\.pth", name)
    return m.group(1) if m else None


def is_url(source: str) -> bool:
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
    if is_url(source):
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
        raise WeightsSourceError(f"weights source {source}: no such file; pass the path of a torchvision .pth file")
    digest = sha256_file(path)
    _check_hash(digest, prefix, str(path))
    return path, digest
