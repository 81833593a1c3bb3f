"""The one place that jits and batches: fit(), make_scorer(), batch scoring.

Library functions elsewhere are per-image and plain; here they are composed into two jitted
regions, each built once per static configuration and cached (15 categories never recompile):
  * ``_embed_fn``: images ``[b, s, s, 3]`` -> L2-normalised patch embeddings ``[b, h, w, 1792]``;
  * ``scoring_function``: images ``[b, s, s, 3]`` -> ``ScoreResult`` batched (backbone -> embed
    -> head).
Both compile with ``xla_cpu.compiler_options()`` (XLA:CPU's faster convolution emitters; none on
GPU/TPU), so a user's program gets the same code as the scripts without any setup call. The
fitted model and its file are ``protoad_jax.model``.

Devices: batches are split across all local devices (``local_mesh()``, axis ``"batch"``;
``batch_sharding()``), the backbone variables and prototypes replicated (``replicated_sharding()``,
once per call, not per batch); the jitted regions follow their inputs' shardings. FINCH / k-means
split their nearest-neighbour query chunks over the same mesh. With one device nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# backbone (Flax) is imported where the backbone is traced or loaded, so that `import protoad_jax`
# and protoad_jax.load_exported never import Flax (tests/test_export.py checks it).
from protoad_jax import coreset, data, features, finch, kmeans, scoring, xla_cpu
from protoad_jax.config import EMBED_CHANNELS, EMBED_LAYERS, Config
from protoad_jax.model import Model, check_prototypes
from protoad_jax.progress import Progress

# Patches are stored on the host in float16 above this many bytes of float32 (halves memory at
# MVTec scale: 1.23M x 1792 is 8.8 GB in float32); clustering computes in float32 per chunk.
FLOAT16_PATCHES_ABOVE_BYTES = 4 << 30


# ----------------------------------------------------------------------------- jitted regions


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _embed_batch(arch: str, dtype: str, variables: dict, images: jax.Array) -> jax.Array:
    """``[b, s, s, 3]`` -> per-position embeddings ``[b, h, w, 1792]`` (float32).

    Variables without ``batch_stats`` are BatchNorm-folded (``backbone.fold_batchnorm``); the
    choice is made from the pytree structure at trace time.
    """
    from protoad_jax import backbone

    net = backbone.ResNet(arch=arch, dtype=_dtype(dtype), folded="batch_stats" not in variables)
    feats = net.apply(variables, images)
    return jax.vmap(features.embed)({k: feats[k] for k in EMBED_LAYERS})


@functools.cache
def _embed_fn(arch: str, dtype: str, out_dtype: str) -> Callable:
    def fn(variables, images):
        return scoring.l2_normalize(_embed_batch(arch, dtype, variables, images)).astype(out_dtype)

    return jax.jit(fn, compiler_options=xla_cpu.compiler_options())


@functools.cache
def _score_fn(arch: str, dtype: str, image_size: int, sigma: float, truncate: float,
              image_score: str, chunk_size: int | None, tuned: bool = True) -> Callable:
    """The jitted scoring region; ``tuned=False`` without compiler options, for use inside a
    user's ``jit`` (JAX accepts compiler options on top-level ``jit`` only)."""
    head = functools.partial(scoring.score_image, out_size=(image_size, image_size), sigma=sigma,
                             truncate=truncate, image_score=image_score, chunk_size=chunk_size)

    def fn(variables, prototypes, images):
        emb = _embed_batch(arch, dtype, variables, images)
        return jax.vmap(head, in_axes=(0, None))(emb, prototypes)

    return jax.jit(fn, compiler_options=xla_cpu.compiler_options() if tuned else None)


def scoring_function(config: Config, chunk_size: int | None = None, *,
                     tuned: bool = True) -> Callable:
    """The cached jitted scoring region for ``config``'s static settings.

    ``fn(variables, prototypes [k, c], images [b, s, s, 3]) -> ScoreResult`` batched: backbone,
    embedding and head (``scoring.score_image``, vmapped). Configs with the same architecture,
    dtype, image size, sigma, truncate and image score share one function (``fn._cache_size()``
    counts its compiled shapes). ``tuned=False``: without ``xla_cpu.compiler_options()``, for
    use inside a user's ``jit`` (JAX accepts compiler options on a top-level ``jit`` only).

    Raises:
      ValueError: ``chunk_size`` is not a positive integer or None.
    """
    return _score_fn(config.arch, config.dtype, config.image_size, float(config.sigma),
                     float(config.truncate), config.image_score,
                     scoring.check_chunk_size(chunk_size), tuned)


# ----------------------------------------------------------------------------- devices

BATCH_AXIS = "batch"


@functools.cache
def local_mesh() -> Mesh:
    """1-D mesh (axis ``"batch"``) over this process's devices, ``jax.local_devices()``.

    On several hosts (after ``jax.distributed.initialize()``) each process shards over its own
    host's devices only: the work is data parallel, with no cross-host communication.
    """
    return Mesh(np.array(jax.local_devices()), (BATCH_AXIS,))


def batch_sharding() -> NamedSharding:
    """The leading (batch) axis split across ``local_mesh()``; it must divide by its size."""
    return NamedSharding(local_mesh(), P(BATCH_AXIS))


def replicated_sharding() -> NamedSharding:
    """A full copy on every device of ``local_mesh()``."""
    return NamedSharding(local_mesh(), P())


def _replicated(tree: Any) -> Any:
    """``tree`` on every local device (a no-op on one device or when already replicated)."""
    return tree if local_mesh().size == 1 else jax.device_put(tree, replicated_sharding())


def _device_batch(batch: np.ndarray) -> jax.Array:
    """A host batch ``[b, ...]`` (``b`` a multiple of the device count) split across devices."""
    return jnp.asarray(batch) if local_mesh().size == 1 else jax.device_put(batch, batch_sharding())


def _device_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of the local device count."""
    n = local_mesh().size
    return -(-int(batch_size) // n) * n


# ----------------------------------------------------------------------------- inputs


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    """On the array's device: one small compiled reduction per shape, no host copy."""
    return jnp.isfinite(x).all()


def check_images(images: Any, image_size: int) -> None:
    """Raises ValueError unless ``images`` is ``[b, image_size, image_size, 3]`` float32 of finite values.

    Shape and dtype are checked on tracers too (inside a user's ``jit``/``vmap``); values only on
    concrete arrays (a jax array is reduced on its device, not copied to the host).
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise ValueError(f"images must be a numpy or jax array [batch, {image_size}, {image_size}, 3] "
                         f"float32; got a {type(images).__name__}")
    shape, dtype = tuple(images.shape), images.dtype
    if len(shape) != 4 or shape[1:] != (image_size, image_size, 3) or shape[0] < 1:
        raise ValueError(f"images must be [batch >= 1, {image_size}, {image_size}, 3] (NHWC, preprocessed "
                         f"with protoad_jax.preprocess_image); got shape {shape}")
    if dtype != np.float32:
        raise ValueError(f"images must be float32 (ImageNet-normalised); got dtype {dtype}. "
                         "Use protoad_jax.preprocess_image, which returns float32.")
    if isinstance(images, jax.core.Tracer):
        return
    finite = _all_finite(images) if isinstance(images, jax.Array) else np.isfinite(images).all()
    if not bool(finite):
        raise ValueError("images contain NaN or inf pixels; check the decoding and normalisation")


def iter_batches(images: Sequence[Any], batch_size: int, config: Config, *, skip_bad: bool = False,
                 skipped: list[data.SkippedImage] | None = None) -> Iterator[tuple[np.ndarray, list]]:
    """Yields ``(batch [batch_size, s, s, 3] float32, items)`` where ``items`` are the inputs in the
    batch's valid rows; the last batch is zero-padded to ``batch_size`` so a jitted consumer sees
    one shape and never recompiles.

    ``images`` holds image paths (decoded on a thread pool with prefetch; with ``skip_bad``,
    undecodable files are skipped, left out of ``items`` and, once iteration ends, appended to
    ``skipped`` as ``data.SkippedImage``) or preprocessed arrays.
    """
    if len(images) and isinstance(images[0], (str, os.PathLike)):
        stream = data.batched(images, batch_size, resize=config.resize, crop=config.image_size,
                              skip_bad=skip_bad)
        for batch in stream:
            yield batch.images, batch.paths
        if skipped is not None:
            skipped += stream.skipped
        return
    for start in range(0, len(images), batch_size):
        items = images[start:start + batch_size]
        chunk = np.stack([np.asarray(a) for a in items])
        check_images(chunk, config.image_size)
        yield data.pad_to(chunk, batch_size), list(items)


# ----------------------------------------------------------------------------- fit


def load_backbone(weights: str | os.PathLike, arch: str = "wide_resnet50_2", *, fold: bool = True) -> dict:
    """Backbone variables from a converted ``.npz`` (see scripts/convert_weights.py), on device.

    With ``fold`` (default) BatchNorm is folded into the convolutions at load time
    (``backbone.fold_batchnorm``): one op fewer per conv, same function within float32 rounding.
    The ``.npz`` itself keeps the unfused tensors.
    """
    from protoad_jax import backbone
    from protoad_jax import weights as weights_lib

    variables = weights_lib.load_variables(weights, arch=arch, last_stage=EMBED_LAYERS[-1])
    return jax.device_put(backbone.fold_batchnorm(variables) if fold else variables)


def extract_patches(images: Sequence[Any], variables: dict, config: Config, *, batch_size: int = 8,
                    progress: bool = True) -> np.ndarray:
    """All (or ``config.patch_budget(...)`` seeded-sampled) L2-normalised patch embeddings ``[n, 1792]``.

    ``config.patch_sampler``: ``"random"`` keeps a uniform seeded sample (drawn before the
    extraction, so only the kept patches are stored); ``"coreset"`` extracts every patch, then
    keeps the greedy k-center coreset (``coreset.greedy_coreset``). Batches of ``batch_size``
    (rounded up to a multiple of the local device count) are split across the local devices.
    """
    per_image = (config.image_size // 4) ** 2
    total = len(images) * per_image
    keep = None
    budget = config.patch_budget(jax.default_backend())
    if budget is not None and budget < total:
        if config.patch_sampler == "coreset":
            patches = extract_patches(images, variables,
                                      dataclasses.replace(config, max_patches=None),
                                      batch_size=batch_size, progress=progress)
            with Progress(f"coreset ({budget} of {len(patches)} patches)", None, "", progress):
                return patches[coreset.greedy_coreset(patches, budget, config.seed)]
        rng = np.random.default_rng(config.seed)
        keep = np.sort(rng.choice(total, size=budget, replace=False))
    n_out = total if keep is None else len(keep)
    channels = EMBED_CHANNELS
    store = np.float16 if n_out * channels * 4 > FLOAT16_PATCHES_ABOVE_BYTES else np.float32
    out = np.empty((n_out, channels), store)
    fn = _embed_fn(config.arch, config.dtype, np.dtype(store).name)
    variables = _replicated(variables)
    pos = written = 0
    with Progress("features", len(images), "img", progress) as bar:
        for batch, items in iter_batches(images, _device_batch_size(batch_size), config):
            n_valid = len(items)
            emb = np.asarray(fn(variables, _device_batch(batch)))[:n_valid].reshape(-1, channels)
            if keep is not None:
                lo, hi = np.searchsorted(keep, [pos, pos + len(emb)])
                emb = emb[keep[lo:hi] - pos]
            out[written:written + len(emb)] = emb
            pos += n_valid * per_image
            written += len(emb)
            bar.update(n_valid)
    return out[:written]


def cluster(patches: np.ndarray, config: Config, *, progress: bool = True) -> tuple[np.ndarray, dict]:
    """Prototypes ``[k, c]`` (cluster means of the patches) and clustering details.

    The nearest-neighbour searches are split across the local devices (same result on any
    number of devices).
    """
    info: dict[str, Any] = {"clustering": config.clustering}
    with Progress(f"clustering ({config.clustering})", None, "", progress):
        if config.clustering == "kmeans":
            if config.num_prototypes is None:
                raise ValueError("k-means needs num_prototypes (K); got None")
            res = kmeans.kmeans(patches, min(config.num_prototypes, len(patches)),
                                jax.random.key(config.seed), spherical=config.spherical,
                                mesh=local_mesh())
            info.update(iterations=int(res.iterations), inertia=float(res.inertia))
            centres = np.asarray(res.centroids)
        else:
            k = None if config.num_prototypes is None else min(config.num_prototypes, len(patches))
            res = finch.finch(patches, num_clusters=k, ensure_early_exit=config.finch_early_exit,
                              mesh=local_mesh())
            info.update(finch_levels=[int(c) for c in res.num_clusters],
                        finch_early_exit=config.finch_early_exit, finch_min_sim=res.min_sim,
                        finch_required_level=res.required_level, finch_stats=res.stats)
            if config.num_prototypes is None:
                level = min(config.finch_level, len(res.means) - 1)
                info["finch_level"] = level
                centres = np.asarray(res.means[level])
            else:
                centres = np.asarray(res.required_means)
    return centres, info


def fit(images: Iterable[Any], weights: str | os.PathLike | None = None, clustering: str = "finch",
        num_prototypes: int | None = 1000, seed: int = 0, *, config: Config | None = None,
        variables: dict | None = None, batch_size: int = 8, progress: bool = True, **settings) -> Model:
    """Fits ProtoAD prototypes on normal images.

    Args:
      images: image paths, or preprocessed ``[s, s, 3]`` float32 arrays (``preprocess_image``).
      weights: backbone ``.npz`` from scripts/convert_weights.py (ignored when ``variables`` is given).
      clustering: ``"finch"`` (the paper) or ``"kmeans"``.
      num_prototypes: K; for FINCH the required number of clusters, None = FINCH level ``finch_level``.
      seed: seed for patch subsampling and k-means++.
      config: full settings; when given, ``clustering``, ``num_prototypes``, ``seed`` and
        ``settings`` must be left at their defaults.
      variables: backbone variables already in memory (skips loading ``weights``).
      batch_size: images per jitted backbone call (rounded up to a multiple of the local device
        count; each device gets ``batch_size / devices`` images).
      settings: other ``Config`` fields (``max_patches``, ``normalize_prototypes``, ``image_score``...).

    Returns:
      A ``Model``; ``model.save(path)`` writes it.

    Raises:
      ValueError: empty training set, bad images, bad settings.
    """
    if config is None:
        config = Config(clustering=clustering, num_prototypes=num_prototypes, seed=seed, **settings)
    elif settings or (clustering, num_prototypes, seed) != ("finch", 1000, 0):
        raise ValueError("fit(): pass either config= or the individual settings (clustering, "
                         "num_prototypes, seed, ...), not both")
    images = list(images)
    if not images:
        raise ValueError("fit() got an empty training set; pass at least one normal image")
    if variables is None:
        if weights is None:
            raise ValueError("fit() needs backbone weights: weights=PATH.npz (scripts/convert_weights.py)")
        variables = load_backbone(weights, config.arch)
    t0 = time.perf_counter()
    patches = extract_patches(images, variables, config, batch_size=batch_size, progress=progress)
    t1 = time.perf_counter()
    centres, info = cluster(patches, config, progress=progress)
    t2 = time.perf_counter()
    prototypes = np.asarray(scoring.prepare_prototypes(centres, config.normalize_prototypes))
    info.update(num_images=len(images), num_patches=len(patches), patch_dtype=patches.dtype.name,
                seconds_features=round(t1 - t0, 3), seconds_clustering=round(t2 - t1, 3))
    return Model(prototypes, config, str(weights) if weights is not None else None, info=info)


# ----------------------------------------------------------------------------- scoring


def calibrate_threshold(normal_scores: np.ndarray, quantile: float = 0.99) -> tuple[float, str]:
    """Threshold from normal images only: the ``quantile`` of their scores (numpy linear).

    Returns ``(threshold, rule)``; an image is anomalous when its score is above the threshold.
    """
    scores = np.asarray(normal_scores, np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"calibration needs the scores of at least one normal image; got shape {scores.shape}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    return float(np.quantile(scores, quantile)), f"{quantile:g} quantile of {len(scores)} normal image scores"


def scoring_parts(model: Model, variables: dict | None = None, *, chunk_size: int | None = None,
                  tuned: bool = True, caller: str = "scoring_parts"
                  ) -> tuple[Callable, dict, jax.Array]:
    """What every scoring path runs: ``(fn, variables, prototypes)``.

    ``fn`` is ``scoring_function(model.config, chunk_size, tuned=tuned)``; the backbone variables
    (loaded from ``model.weights`` when not given) and the prototypes are replicated on the local
    devices. ``caller`` names the public function in error messages.

    Raises:
      ValueError: prototypes not ``[k >= 1, 1792]`` or not finite; no weights; bad ``chunk_size``.
    """
    check_prototypes(model.prototypes, caller)
    if variables is None:
        if model.weights is None:
            raise ValueError("the model records no backbone weights path; pass variables= "
                             "(pipeline.load_backbone(PATH.npz))")
        variables = load_backbone(model.weights, model.config.arch)
    fn = scoring_function(model.config, chunk_size, tuned=tuned)
    variables, prototypes = _replicated((variables, jnp.asarray(model.prototypes, jnp.float32)))
    return fn, variables, prototypes


def make_scorer(model: Model, variables: dict | None = None, *, chunk_size: int | None = None
                ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """A pure, jitted function ``images [b, s, s, 3] float32 -> (maps [b, s, s], scores [b])``.

    The backbone runs batched; the head is vmapped per image. The jitted region is shared by
    every model with the same static settings (``scoring_function``) and compiles once per batch
    shape, with ``xla_cpu.compiler_options()``. The scorer can be called inside the user's own
    ``jax.jit`` and ``jax.vmap``; its shape and dtype checks run at trace time, the NaN/inf check
    only on concrete inputs. Inside the user's ``jax.jit`` the outer computation's compiler
    options apply: ``jax.jit(f, compiler_options=protoad_jax.xla_cpu.compiler_options())`` keeps
    the CPU speed.

    Devices: the variables and prototypes are replicated on every local device once, here.
    A concrete batch (numpy or jax array) is split across the local devices
    (``batch_sharding()``), zero-padded to a multiple of the device count when needed (the
    padding is dropped from the outputs), and the outputs stay split the same way. Inside the
    user's own ``jit`` the scorer leaves placement to the user: pass uncommitted or
    ``batch_sharding()``-placed inputs (inputs committed to a single device conflict with the
    replicated variables when there are several devices).

    Args:
      model: a fitted or loaded ``Model``; its prototypes are used as stored.
      variables: backbone variables (default: loaded from ``model.weights``).
      chunk_size: prototypes per step of a running max over prototype chunks (bounds the head's
        memory for large K); None = one matmul.

    Raises:
      ValueError: prototypes not ``[k >= 1, 1792]`` or not finite; no weights; bad ``chunk_size``.
        The returned scorer raises ValueError for images that are not
        ``[b, s, s, 3]`` float32 or hold NaN/inf.
    """
    fn, variables, prototypes = scoring_parts(model, variables, chunk_size=chunk_size,
                                              caller="make_scorer")
    traced_fn = scoring_function(model.config, chunk_size, tuned=False)
    size = model.config.image_size
    devices = local_mesh().size

    def scorer(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        check_images(images, size)
        b = images.shape[0]
        traced = isinstance(images, jax.core.Tracer)
        if devices > 1 and not traced:
            if b % devices:
                pad = ((0, devices - b % devices),) + ((0, 0),) * 3
                images = np.pad(images, pad) if isinstance(images, np.ndarray) else jnp.pad(images, pad)
            images = jax.device_put(images, batch_sharding())
        res = (traced_fn if traced else fn)(variables, prototypes, images)
        if res.score.shape[0] != b:
            return res.anomaly_map[:b], res.score[:b]
        return res.anomaly_map, res.score

    return scorer


@dataclasses.dataclass
class ScoredImages:
    """Per-image results of ``score_images``: maps ``[n, s, s]``, scores ``[n]``, patch maps
    ``[n, h, w]``, the ``n`` inputs scored, and the inputs ``skipped`` as unreadable with
    ``skip_bad`` (``data.SkippedImage(path, reason)``, in input order; absent from the arrays)."""

    maps: np.ndarray
    scores: np.ndarray
    patch_maps: np.ndarray
    inputs: list
    skipped: list[data.SkippedImage] = dataclasses.field(default_factory=list)


def score_images(model: Model, images: Sequence[Any], variables: dict | None = None, *,
                 batch_size: int = 8, progress: bool = True, chunk_size: int | None = None,
                 skip_bad: bool = False) -> ScoredImages:
    """Scores paths or preprocessed arrays in fixed-size batches (one compile for any count).

    Batches of ``batch_size`` (rounded up to a multiple of the local device count) are split
    across the local devices; variables and prototypes are replicated once per call.

    Raises:
      data.BadImageError: an image file is missing or undecodable (``skip_bad=False``; its
        ``skippable`` is True), or every image was (``skip_bad=True``).
    """
    fn, variables, prototypes = scoring_parts(model, variables, chunk_size=chunk_size,
                                              caller="score_images")
    images = list(images)
    maps, scores, patch_maps, inputs, skipped = [], [], [], [], []
    with Progress("scoring", len(images), "img", progress) as bar:
        try:
            for batch, items in iter_batches(images, _device_batch_size(batch_size), model.config,
                                             skip_bad=skip_bad, skipped=skipped):
                n = len(items)
                res = jax.device_get(fn(variables, prototypes, _device_batch(batch)))
                maps.append(res.anomaly_map[:n])
                scores.append(res.score[:n])
                patch_maps.append(res.patch_map[:n])
                inputs += items
                bar.update(n)
        except data.BadImageError as e:
            e.skippable = True  # skip_bad=True would have skipped it
            raise
    if not inputs and skipped:
        listed = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise data.BadImageError(f"none of the {len(skipped)} images could be read: {listed}{more}",
                                 skipped[0].path, "every image was unreadable")
    if not inputs:
        raise ValueError("score_images() got no images")
    return ScoredImages(np.concatenate(maps), np.concatenate(scores), np.concatenate(patch_maps),
                        inputs, skipped)
