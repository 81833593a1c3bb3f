"""protoad_jax: training-free image anomaly detection and localisation (ProtoAD) in pure JAX."""

from protoad_jax.config import Config
from protoad_jax.data import preprocess_image, preprocess_mask
from protoad_jax.export import ExportError, export_scorer, load_exported
from protoad_jax.model import Model, load_model
from protoad_jax.pipeline import ScoredImages, fit, make_scorer, score_images
from protoad_jax.regions import find_regions

__all__ = [
    "Config",
    "ExportError",
    "Model",
    "ScoredImages",
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
__version__ = "0.1.0"
