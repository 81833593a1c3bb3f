"""The weights ``.npz`` contract: flat ``/``-joined float32 arrays, checked against
``jax.eval_shape`` of the Flax model; one error lists every missing, unexpected and misshapen key."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from protoad_jax import fileio
from protoad_jax.errors import InputError


class WeightsFileError(InputError):
    """A weights file is missing, unreadable, or does not fit the architecture; the message lists
    every problem and the command that makes a good file."""


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in fileio.flatten_tree(tree).items()}


@functools.cache
def expected_shapes(arch: str, last_stage: str) -> dict[str, tuple[int, ...]]:
    """Flat variable name -> shape of the model, via ``jax.eval_shape`` (traced once per config)."""
    from protoad_jax import backbone  # Flax: only when a weights file is checked

    return flat_shapes(backbone.abstract_variables(arch, last_stage))


def contract_problems(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> list[str]:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshapen = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    lines = [f"  missing: {k} (expected shape {expected[k]})" for k in missing]
    lines += [f"  unexpected: {k} (shape {found[k]})" for k in unexpected]
    lines += [f"  misshapen: {k}: expected {expected[k]}, found {found[k]}" for k in misshapen]
    return lines



def save_variables(path: str | os.PathLike, variables: dict) -> Path:
    """Writes ``{"params": ..., "batch_stats": ...}`` as a flat ``.npz`` (keys joined by ``/``).

    The write is atomic (temporary file + rename); arrays are stored as float32.
    """
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in fileio.flatten_tree(dict(variables)).items()
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
      WeightsFileError: no file (the message gives the command that makes it), an unreadable
        file, or one error listing every missing, unexpected and misshapen key.
    """
    path = Path(path)
    fix = (
        f"convert the weights again with `protoad convert-weights` (scripts/convert_weights.py), as arch {arch}"
        f"{' with layer4 and fc' if last_stage in ('layer4', 'fc') else ''}, to {path}"
    )
    if not path.is_file():
        raise WeightsFileError(f"no weights file {path}; {fix}")
    expected = expected_shapes(arch, last_stage)
    try:
        flat = fileio.read_npz(path)
    except ValueError as e:
        raise WeightsFileError(f"{path} is not a readable .npz ({e}); {fix}") from None
    problems = contract_problems({k: v.shape for k, v in flat.items()}, expected)
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
        raise WeightsFileError(
            f"{path} does not match {arch} up to {last_stage}{made}; "
            f"{len(problems)} problem(s):\n" + "\n".join(problems) + f"\nFix: {fix}"
        )
    return fileio.unflatten_tree({k: v.astype(np.float32) for k, v in flat.items()})



def count_params(variables: dict) -> int:
    """Elements in the ``params`` collection (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
