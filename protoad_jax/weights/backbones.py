"""The one place that turns a weights path, a fitted model or nothing into backbone variables:
the converted ImageNet file, a given ``.npz``, or a deterministic random-init backbone."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from protoad_jax import backbone
from protoad_jax.config import EMBED_LAYERS
from protoad_jax.errors import InputError, NoWeightsError
from protoad_jax.weights.convert import ensure_weights
from protoad_jax.weights.npz import load_variables

if TYPE_CHECKING:
    from protoad_jax.model import Model

log = logging.getLogger(__name__)

RANDOM_BACKBONE = "random-init backbone"


class Backbone(NamedTuple):
    """Backbone variables, the ``.npz`` they came from (None if random), a description, warnings."""

    variables: dict
    path: str | None
    description: str
    warnings: list[str]


def load_backbone(weights: str | os.PathLike, arch: str = "wide_resnet50_2", *,
                  fold: bool = True) -> dict:
    """Backbone variables from a converted ``.npz`` (``protoad convert-weights``), on device.

    With ``fold`` (default) BatchNorm is folded into the convolutions at load time
    (``backbone.fold_batchnorm``): one op fewer per conv, same function within float32 rounding.
    The ``.npz`` itself keeps the unfused tensors.

    Raises:
      WeightsFileError: no such file, unreadable, or not this architecture's variables.
    """
    variables = load_variables(weights, arch=arch, last_stage=EMBED_LAYERS[-1])
    return jax.device_put(backbone.fold_batchnorm(variables) if fold else variables)


def resolve_backbone(weights_path: str | None, arch: str = "wide_resnet50_2", *, demo: bool = False,
                     allow_random: bool = False) -> Backbone:
    """Loads the given weights, else the converted ImageNet file (converting/downloading it when
    missing); without them, a random-init backbone only for the demo or with ``allow_random``.

    Raises:
      NoWeightsError: the ImageNet weights could not be downloaded or converted and random
        weights are not allowed; the message says why and how to get them.
      WeightsFileError: ``weights_path`` is missing or not valid weights.
    """
    if weights_path is not None:
        return Backbone(load_backbone(weights_path, arch), str(weights_path),
                        f"{arch} from {weights_path}", [])
    try:
        path = ensure_weights(arch)
        return Backbone(load_backbone(path, arch), str(path),
                        f"{arch} IMAGENET1K_V1 (torchvision), converted to {path}", [])
    # Offline (DownloadError), a wrong hash (ChecksumError), a corrupt .pth (CheckpointError) or
    # a mismatched file (WeightsFileError): say why, then decide.
    except InputError as e:
        if not (demo or allow_random):
            raise NoWeightsError(f"no backbone weights: {e}\nConvert the ImageNet weights with "
                                 "`protoad convert-weights` and pass their path, or allow a "
                                 "random-init backbone (results are then not meaningful).") from e
        reason = str(e).splitlines()[0]
    return random_backbone(arch, f"the ImageNet weights are not available ({reason})")


def random_backbone(arch: str, reason: str) -> Backbone:
    """A deterministic (PRNG key 0) random-init backbone, with a prominent warning."""
    warning = (f"WARNING: {RANDOM_BACKBONE}: {reason}. Features come from a randomly initialised "
               "WideResNet, so the numbers are NOT those of ProtoAD. Convert the ImageNet weights "
               "with `protoad convert-weights` and rerun.")
    log.warning(warning)
    variables = backbone.fold_batchnorm(random_variables(arch))
    return Backbone(jax.device_put(variables), None, RANDOM_BACKBONE, [warning])


def random_variables(arch: str = "wide_resnet50_2") -> dict:
    """Flax's default initialisation of the backbone (PRNG key 0), BatchNorm unfolded."""
    return backbone.ResNet(arch=arch).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def backbone_for_model(model: Model, weights_path: str | None = None, *,
                       allow_random: bool = False) -> Backbone:
    """The backbone a model was fitted with: ``weights_path``, else the path recorded in the model.

    A model fitted with the random-init backbone (demo) needs ``allow_random``.

    Raises:
      NoWeightsError: the model records no weights file, none is given, and random weights are
        not allowed.
      WeightsFileError: the weights file is missing or does not fit the model's architecture.
    """
    path = weights_path or model.weights
    if path is not None:
        return Backbone(load_backbone(path, model.config.arch), str(path), str(path), [])
    if not allow_random:
        raise NoWeightsError("this model was fitted with a random-init backbone (no weights file "
                             "recorded); allow a random-init backbone to use it anyway, or give the "
                             "backbone weights")
    return random_backbone(model.config.arch, "the model was fitted with a random-init backbone")
