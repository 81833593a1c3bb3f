"""The method's settings, in one frozen dataclass (docs/METHOD.md sections 1 and 2)."""

from __future__ import annotations

import dataclasses
import json

from protoad_jax.errors import SettingsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBED_LAYERS = ("layer1", "layer2", "layer3")
CPU_MAX_PATCHES = 50_000  # the "auto" subsample on CPU; see Config.max_patches
EMBED_CHANNELS = 256 + 512 + 1024  # layer1..3 widths of every bottleneck ResNet
# The image-score definitions (Config.image_score), with what each one means.
IMAGE_SCORES = {
    "smoothed_max": "max of the Gaussian-smoothed upsampled map (reference code)",
    "patch_max": "max of the raw patch map (paper's equation)",
}
CLUSTERINGS = ("finch", "kmeans")
PATCH_SAMPLERS = ("random", "coreset")
DTYPES = ("float32", "bfloat16")
# What the model looks at (Config.view), with what each one scores (docs/METHOD.md section 5).
VIEWS = {
    "center_crop": "shorter side resized, center crop scored (the reference code; the outer band "
                   "is not scored)",
    "full_frame": "the whole image resized to image_size x image_size (aspect ratio not kept), "
                  "every pixel scored",
    "tiles": "overlapping tile_size tiles of the image (long side first resized to "
             "tile_image_size when set), each scored at image_size, maps stitched (mean)",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """ProtoAD settings. Defaults follow docs/METHOD.md; every field is stored with a fitted model.

    Attributes:
      arch: backbone, a key of ``backbone.ARCHS``.
      resize: shorter side after PIL LANCZOS resize.
      image_size: center-crop size; the evaluation resolution.
      normalize_prototypes: L2-normalise prototypes (true cosine, the paper). False reproduces
        the published reference code exactly (raw cluster means as 1x1 kernels).
      sigma: Gaussian smoothing sigma of the upsampled map (pixels); 0 disables it.
      truncate: Gaussian truncation in sigmas (scipy's ``truncate``).
      image_score: ``"smoothed_max"`` (reference code: max of the smoothed map) or
        ``"patch_max"`` (the paper's equation: max of the raw patch map).
      clustering: ``"finch"`` or ``"kmeans"``.
      num_prototypes: K. For FINCH, the required number of clusters; ``None`` takes the FINCH
        partition given by ``finch_level``.
      finch_level: FINCH level used when ``num_prototypes`` is None (0 = finest).
      finch_early_exit: the FINCH authors' ``ensure_early_exit`` (their default): links longer
        than the longest level-0 link are cut above level 0.
      spherical: k-means with cosine assignment on L2-normalised patches.
      max_patches: keep at most this many training patches (seeded); None = all; ``"auto"``
        (default) = all on GPU/TPU, ``CPU_MAX_PATCHES`` on CPU, where exact FINCH costs
        ``O(n^2 d)`` (times in docs/speed.md, "Fit stage").
      patch_sampler: how ``max_patches`` are chosen: ``"random"`` (uniform, seeded) or
        ``"coreset"`` (greedy k-center on a seeded random projection, PatchCore's; needs all
        patches in memory first).
      seed: PRNG seed for subsampling and k-means++.
      dtype: backbone compute dtype, ``"float32"`` or ``"bfloat16"``.
      view: what is scored (``VIEWS``): ``"center_crop"`` (default, the reference code),
        ``"full_frame"`` or ``"tiles"``.
      tile_size: ``"tiles"``: tile side in pixels of the (optionally resized) image.
      tile_overlap: ``"tiles"``: minimum overlap of neighbouring tiles in pixels (< tile_size);
        the last tile of a row or column is flush with the edge, so it may overlap more.
      tile_image_size: ``"tiles"``: resize the image first so that its long side is this many
        pixels (PIL LANCZOS); None keeps the original resolution.
    """

    arch: str = "wide_resnet50_2"
    resize: int = 256
    image_size: int = 224
    normalize_prototypes: bool = True
    sigma: float = 4.0
    truncate: float = 4.0
    image_score: str = "smoothed_max"
    clustering: str = "finch"
    num_prototypes: int | None = 1000
    finch_level: int = 0
    finch_early_exit: bool = True
    spherical: bool = True
    max_patches: int | str | None = "auto"
    patch_sampler: str = "random"
    seed: int = 0
    dtype: str = "float32"
    view: str = "center_crop"
    tile_size: int = 256
    tile_overlap: int = 32
    tile_image_size: int | None = None

    def __post_init__(self):
        checks = {
            "image_score": (self.image_score, tuple(IMAGE_SCORES)),
            "clustering": (self.clustering, CLUSTERINGS),
            "patch_sampler": (self.patch_sampler, PATCH_SAMPLERS),
            "dtype": (self.dtype, DTYPES),
            "view": (self.view, tuple(VIEWS)),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise SettingsError(f"Config.{name} must be one of {allowed}, got {value!r}")
        if self.num_prototypes is not None and self.num_prototypes < 1:
            raise SettingsError(f"Config.num_prototypes must be >= 1 or None, got {self.num_prototypes}")
        if not (self.max_patches in (None, "auto") or (isinstance(self.max_patches, int)
                                                       and self.max_patches > 0)):
            raise SettingsError(f"Config.max_patches must be a positive int, None or 'auto', got {self.max_patches!r}")
        if self.image_size > self.resize:
            raise SettingsError(f"Config.image_size ({self.image_size}) must not exceed resize ({self.resize})")
        self._check_tiles()

    def _check_tiles(self) -> None:
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not (whole(self.tile_size) and self.tile_size >= 1):
            raise SettingsError(f"Config.tile_size must be a positive integer, got {self.tile_size!r}")
        if not (whole(self.tile_overlap) and 0 <= self.tile_overlap < self.tile_size):
            raise SettingsError(f"Config.tile_overlap must be an integer with 0 <= overlap < tile_size "
                                f"({self.tile_size}), got {self.tile_overlap!r}; a tile must advance")
        if self.tile_image_size is not None and not (whole(self.tile_image_size)
                                                     and self.tile_image_size >= self.tile_size):
            raise SettingsError(f"Config.tile_image_size must be None or an integer >= tile_size "
                                f"({self.tile_size}), got {self.tile_image_size!r}: the resized "
                                "image must hold at least one tile")

    def patch_budget(self, platform: str) -> int | None:
        """``max_patches`` resolved for a JAX platform (``"cpu"``, ``"gpu"``, ``"tpu"``)."""
        if self.max_patches == "auto":
            return CPU_MAX_PATCHES if platform == "cpu" else None
        return self.max_patches

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"model config has unknown fields {unknown}; written by a newer protoad_jax?")
        return cls(**data)
