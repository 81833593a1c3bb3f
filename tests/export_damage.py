"""Damaging a copy of an exported directory, and the check that loading it is refused with one
error naming the file and the fix (tests/test_export.py, tests/test_onnx.py)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

import protoad_jax
from protoad_jax import export
from protoad_jax.export import ExportError


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def edit_manifest(folder: Path, edit) -> None:
    path = folder / export.MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def refresh_checksum(folder: Path, key: str, name: str) -> None:
    """Makes the manifest's ``files[key]`` agree with ``name`` again, so a later check has to
    catch the damage."""
    path = folder / name
    edit_manifest(folder, lambda m: m["files"][key].update(
        bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_refused(case: str, folder: Path, name: str, pattern: str, fixes: tuple[str, ...]
                   ) -> None:
    """``load_exported(folder)`` raises an ``ExportError`` naming ``folder / name``, matching
    ``pattern`` and holding one of the ``fixes``."""
    with pytest.raises(ExportError) as info:
        protoad_jax.load_exported(folder)
    msg = str(info.value)
    print(f"{case}: {msg}")
    assert str(folder / name) in msg, msg
    assert re.search(pattern, msg), (pattern, msg)
    assert any(fix in msg for fix in fixes), msg
