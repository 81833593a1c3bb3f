"""protoad_jax: training-free image anomaly detection and localisation (ProtoAD) in pure JAX."""

__version__ = "0.1.0"  # the one source of the version (pyproject.toml reads it)

from protoad_jax.config import Config
from protoad_jax.errors import (
    BadImageError,
    DatasetError,
    InputError,
    NoWeightsError,
    SettingsError,
)
from protoad_jax.export import ExportError, export_scorer, load_exported
from protoad_jax.model import Model, ModelFileError, load_model
from protoad_jax.pipeline import ScoredImages, fit, make_scorer, score_images
from protoad_jax.preprocess import preprocess_image, preprocess_mask
from protoad_jax.regions import find_regions

__all__ = [
    "BadImageError",
    "Config",
    "DatasetError",
    "ExportError",
    "InputError",
    "Model",
    "ModelFileError",
    "NoWeightsError",
    "ScoredImages",
    "SettingsError",
    "__version__",
    "export_scorer",
    "find_regions",
    "fit",
    "load_exported",
    "load_model",
    "make_scorer",
    "preprocess_image",
    "preprocess_mask",
    "score_images",
]
