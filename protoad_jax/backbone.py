"""Flax port of torchvision's ResNet-bottleneck family (resnet50, wide_resnet50_2, wide_resnet101_2).

Module names mirror torchvision ``state_dict`` keys (``conv1``, ``bn1``, ``layer2/0/downsample/0``),
so converting weights is rename + transpose. Inputs and features are NHWC.
Torch numerics are explicit: symmetric padding ``((p, p), (p, p))`` (never ``'SAME'``, which
pads (0, 1) at stride 2), max-pool pads with -inf, BatchNorm in eval mode with eps 1e-5,
stride on the 3x3 conv (torchvision's "ResNet v1.5").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Arch:
    """A bottleneck ResNet: blocks per stage and the bottleneck width multiplier."""

    name: str
    layers: tuple[int, int, int, int]
    width_per_group: int = 64


ARCHS = {
    "resnet50": Arch("resnet50", (3, 4, 6, 3)),
    "wide_resnet50_2": Arch("wide_resnet50_2", (3, 4, 6, 3), 128),
    "wide_resnet101_2": Arch("wide_resnet101_2", (3, 4, 23, 3), 128),
}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
NUM_CLASSES = 1000
BN_EPS = 1e-5


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[name]


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str, bias: bool = False) -> nn.Conv:
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((p, p), (p, p)), use_bias=bias, dtype=dtype, name=name)


def _bn(dtype: Any, name: str) -> nn.BatchNorm:
    # Eval-mode BatchNorm, torch's epsilon; statistics live in the "batch_stats" collection.
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=dtype, name=name)


def _conv_bn(x: jax.Array, features: int, kernel: int, stride: int, dtype: Any, conv: str, bn: str,
             folded: bool) -> jax.Array:
    """conv -> eval BatchNorm; with ``folded`` the BatchNorm lives in the conv's kernel and bias
    (see ``fold_batchnorm``) and module ``bn`` does not exist."""
    if folded:
        return _conv(features, kernel, stride, dtype, conv, bias=True)(x)
    return _bn(dtype, bn)(_conv(features, kernel, stride, dtype, conv)(x))


class Downsample(nn.Module):
    """torchvision's ``downsample`` Sequential: 1x1 strided conv (``0``) then BatchNorm (``1``)."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv_bn(x, self.features, 1, self.stride, self.dtype, "0", "1", self.folded)


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck``: 1x1 -> 3x3 (stride here) -> 1x1 (x4), residual, ReLU."""

    planes: int
    width: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f, dt = self.folded, self.dtype
        out = nn.relu(_conv_bn(x, self.width, 1, 1, dt, "conv1", "bn1", f))
        out = nn.relu(_conv_bn(out, self.width, 3, self.stride, dt, "conv2", "bn2", f))
        out = _conv_bn(out, self.planes * 4, 1, 1, dt, "conv3", "bn3", f)
        identity = x
        if self.downsample:
            identity = Downsample(self.planes * 4, self.stride, dt, f, name="downsample")(x)
        return nn.relu(out + identity)


class Stage(nn.Module):
    """One ``layerN`` Sequential; its blocks are named ``0``, ``1``, ... like torch's."""

    planes: int
    blocks: int
    stride: int
    width: int
    in_features: int
    dtype: Any = jnp.float32
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        needs_ds = self.stride != 1 or self.in_features != self.planes * 4
        for i in range(self.blocks):
            x = Bottleneck(self.planes, self.width, self.stride if i == 0 else 1,
                           downsample=needs_ds and i == 0, dtype=self.dtype, folded=self.folded,
                           name=str(i))(x)
        return x


class ResNet(nn.Module):
    """Bottleneck ResNet trunk returning named stage features.

    Attributes:
      arch: architecture name, one of ``ARCHS``.
      dtype: compute dtype (``jnp.float32`` default; ``jnp.bfloat16`` allowed). Parameters stay float32.
      last_stage: deepest stage computed: ``"layer3"`` (default, ProtoAD), ``"layer4"``, or
        ``"fc"`` (layer4, global average pool and the ImageNet classifier, as ``feats["fc"]``).
      folded: BatchNorm folded into the convolutions (variables from ``fold_batchnorm``): the same
        function with one op fewer per conv. The stored ``.npz`` keeps BatchNorm unfused.
    """

    arch: str = "wide_resnet50_2"
    dtype: Any = jnp.float32
    last_stage: str = "layer3"
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """Args: x ``[n, h, w, 3]`` normalised images. Returns ``{stage: [n, h', w', c]}``."""
        spec = get_arch(self.arch)
        if self.last_stage not in STAGES[1:]:
            raise ValueError(f"last_stage must be one of {STAGES[1:]}, got {self.last_stage!r}")
        x = x.astype(self.dtype)
        x = nn.relu(_conv_bn(x, 64, 7, 2, self.dtype, "conv1", "bn1", self.folded))
        feats = {"stem": x}
        # torch's MaxPool2d(3, 2, padding=1): an explicit -inf pad, then a VALID pool. The same
        # numbers as nn.max_pool(padding=((1, 1), (1, 1))), but ONNX converters (jax2onnx 0.17)
        # drop reduce_window's padding, shrinking the grid to 55 x 55 (docs/export.md).
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
        in_features = 64
        depth = STAGES.index(self.last_stage)
        for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), spec.layers), start=1):
            if s > depth:
                break
            width = planes * spec.width_per_group // 64
            x = Stage(planes, blocks, 1 if s == 1 else 2, width, in_features, self.dtype,
                      self.folded, name=f"layer{s}")(x)
            in_features = planes * 4
            feats[f"layer{s}"] = x
        if self.last_stage == "fc":
            feats["fc"] = nn.Dense(NUM_CLASSES, dtype=self.dtype, name="fc")(jnp.mean(x, axis=(1, 2)))
        return feats


def abstract_variables(arch: str = "wide_resnet50_2", last_stage: str = "layer3",
                       size: int = 224) -> dict:
    """Shapes and dtypes of the model's variables, via ``jax.eval_shape`` (no FLOPs, no memory)."""
    model = ResNet(arch=arch, last_stage=last_stage)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def fold_batchnorm(variables: dict) -> dict:
    """Folds every eval-mode BatchNorm into the convolution before it (for ``ResNet(folded=True)``).

    ``y = (conv(x, W) - mean) * scale / sqrt(var + eps) + bias`` becomes ``conv(x, W') + b'`` with
    ``W' = W * scale / sqrt(var + eps)`` (per output channel, HWIO last axis) and
    ``b' = bias - mean * scale / sqrt(var + eps)``; computed in float64, stored float32.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of an unfolded ``ResNet``.

    Returns:
      ``{"params": ...}``: BatchNorm modules removed, their convs given a ``bias``.
    """
    params, stats = variables["params"], variables["batch_stats"]
    pairs = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "0": "1"}

    def fold(p: dict, s: dict) -> dict:
        out = {}
        for name, sub in p.items():
            if name in pairs and "kernel" in sub and pairs[name] in p:
                bn_p, bn_s = p[pairs[name]], s[pairs[name]]
                inv = np.asarray(bn_p["scale"], np.float64) / np.sqrt(np.asarray(bn_s["var"], np.float64) + BN_EPS)
                out[name] = {
                    "kernel": (np.asarray(sub["kernel"], np.float64) * inv).astype(np.float32),
                    "bias": (np.asarray(bn_p["bias"], np.float64)
                             - np.asarray(bn_s["mean"], np.float64) * inv).astype(np.float32),
                }
            elif name in pairs.values() and "scale" in sub:
                continue  # folded into its conv
            elif "kernel" in sub:  # fc
                out[name] = sub
            else:
                out[name] = fold(sub, s.get(name, {}))
        return out

    return {"params": fold(params, stats)}
