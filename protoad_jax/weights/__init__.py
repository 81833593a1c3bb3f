"""Backbone weights as data with a contract: registry and download, the torch-free ``.pth``
reader, conversion to ``.npz``, the ``.npz`` contract, and the backbone for a path or a model.

Imports Flax (the contract is checked against the Flax model): ``import protoad_jax`` and
``load_exported`` never import this package.
"""

from protoad_jax.errors import NoWeightsError
from protoad_jax.fileio import sha256_file
from protoad_jax.weights.backbones import (
    RANDOM_BACKBONE,
    Backbone,
    backbone_for_model,
    load_backbone,
    random_backbone,
    random_variables,
    resolve_backbone,
)
from protoad_jax.weights.convert import (
    DEFAULT_STAGES,
    STAGE_ORDER,
    ConvertResult,
    convert,
    ensure_weights,
    guess_arch,
    to_flax,
)
from protoad_jax.weights.download import (
    ENV_VAR,
    REGISTRY,
    ChecksumError,
    DownloadError,
    WeightsFile,
    WeightsSourceError,
    cache_dir,
    default_weights_path,
    download,
    fetch,
)
from protoad_jax.weights.npz import WeightsFileError, count_params, load_variables, save_variables
from protoad_jax.weights.torch_reader import CheckpointError, UnsafeCheckpointError, load_state_dict

__all__ = [
    "DEFAULT_STAGES", "ENV_VAR", "RANDOM_BACKBONE", "REGISTRY", "STAGE_ORDER", "Backbone",
    "CheckpointError", "ChecksumError", "ConvertResult", "DownloadError", "NoWeightsError",
    "UnsafeCheckpointError", "WeightsFile", "WeightsFileError", "WeightsSourceError",
    "backbone_for_model", "cache_dir", "convert", "count_params", "default_weights_path",
    "download", "ensure_weights", "fetch", "guess_arch", "load_backbone", "load_state_dict",
    "load_variables", "random_backbone", "random_variables", "resolve_backbone", "save_variables",
    "sha256_file", "to_flax",
]
