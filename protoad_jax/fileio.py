"""Atomic writes of files and directories (nothing is ever left half-written), and the JSON
encoding of the NumPy scalars and paths the written metadata holds."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
