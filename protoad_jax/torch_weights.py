"""Torch-free access to torchvision checkpoints: read ``.pth`` files and rename them to Flax variables."""

from __future__ import annotations

import numpy as np


def to_flax(state_dict: dict[str, np.ndarray], stages: tuple[str, ...] = ("layer1", "layer2", "layer3")
            ) -> dict[str, np.ndarray]:
    """Renames and transposes a torchvision ResNet ``state_dict`` to flat Flax variables.

    Conv ``weight`` OIHW -> ``params/.../kernel`` HWIO; Linear ``weight`` [out, in] -> kernel [in, out];
    BatchNorm ``weight``/``bias`` -> ``params/.../scale``/``bias``; ``running_mean``/``running_var``
    -> ``batch_stats/.../mean``/``var``; ``num_batches_tracked`` is dropped.

    Args:
      state_dict: torch key (``layer2.0.downsample.0.weight``) -> numpy array.
      stages: which of ``layer1`` .. ``layer4`` and ``fc`` to keep; the stem (``conv1``, ``bn1``) is always kept.

    Returns:
      ``{"params/layer2/0/downsample/0/kernel": array, ...}`` (keys joined with ``/``).
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        *module, leaf = key.split(".")
        top = module[0] if module else ""
        if top.startswith("layer") or top == "fc":
            if top not in stages:
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
            raise ValueError(f"unexpected state_dict entry {key!r}: not a ResNet conv, BatchNorm or fc tensor")
    return out
