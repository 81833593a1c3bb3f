"""Files written safely and read back: atomic writes of files and directories (nothing is ever
left half-written), JSON and CSV tables, sha256, and ``/``-keyed ``.npz`` trees."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it into place.

    On any failure (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was. The file gets the mode ``open()`` would give (0o666 less the umask), not
    ``mkstemp``'s 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None], *,
                     check: Callable[[Path], None] | None = None) -> Path:
    """Calls ``write(tmp)`` on a new temporary directory next to ``path``, then renames it into place.

    ``check(path)``, when given, runs after ``write`` and before anything at ``path`` is touched
    (it raises to refuse the replacement). An existing ``path`` is moved aside first and deleted
    after the rename (restored if the rename fails). On any failure the temporary directory is
    removed. The directory gets the mode ``os.mkdir`` would give (0o777 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if check is not None:
            check(path)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)  # onto the empty directory mkdtemp made
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``: NumPy scalars as numbers, paths as strings."""
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (NumPy scalars as numbers, paths as strings), atomically."""
    text = json.dumps(obj, indent=2, default=json_default) + "\n"
    return atomic_write(path, lambda f: f.write(text), mode="w")


def write_csv(path: str | os.PathLike, columns: Iterable[str], rows: Iterable[Mapping]) -> Path:
    """A CSV with a header of ``columns`` and one line per row (keys not in ``columns`` are
    ignored, missing ones empty), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, never unpickling anything.

    Raises:
      ValueError: the file is not a readable ``.npz`` (the reason, without the path: callers
        name the file and the fix).
    """
    if not zipfile.is_zipfile(path):
        raise ValueError("not an .npz file (no zip archive: empty, truncated or another format)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        why = str(e)
        if "allow_pickle" in why:  # numpy's advice to unpickle: never, for a file from elsewhere
            why = "it holds pickled (object) arrays, which are never loaded"
        raise ValueError(f"{type(e).__name__}: {why}") from e


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays as ``{"a/b/c": array}``: the keys of a ``.npz`` of variables.

    Raises:
      ValueError: a key contains ``/``.
    """
    out = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise ValueError(f"variable name {key!r} contains '/', which the .npz keys use as separator")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, name + "/"))
        else:
            out[name] = value
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict:
    """The inverse of ``flatten_tree``."""
    tree: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
