"""The scoring path's jitted regions and what runs them: fit(), make_scorer(), score_images().

Library functions elsewhere are per-image and plain; here they are composed into two jitted
regions, each built once per static configuration and cached (15 categories never recompile).
The other jits: clustering's inside its wing (``protoad_jax.clustering``), the exported
artifact's call (``export``) and the on-device NaN check of ``input_pipeline.check_images``.
  * ``_embed_fn``: images ``[b, s, s, 3]`` -> L2-normalised patch embeddings ``[b, h, w, 1792]``;
  * ``scoring_function``: images ``[b, s, s, 3]`` -> ``ScoreResult`` batched (backbone -> the
    factored head, ``scoring.score_features``: the embedding is never concatenated).
Both compile with ``xla_cpu.compiler_options()`` (XLA:CPU's faster convolution emitters; none on
GPU/TPU), so a user's program gets the same code as the scripts without any setup call. The
fitted model and its file are ``protoad_jax.model``.

Devices (``protoad_jax.sharding``): batches are split across all local devices, the backbone
variables and prototypes replicated once per call, not per batch; the jitted regions follow
their inputs' shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# backbone (Flax) is imported where the backbone is traced or loaded, so that `import protoad_jax`
# and protoad_jax.load_exported never import Flax (tests/test_export.py checks it).
from protoad_jax import (
    distributed,
    exemplars,
    features,
    input_pipeline,
    preprocess,
    scoring,
    sharding,
    views,
    xla_cpu,
)
from protoad_jax.clustering import PatchGrid, cluster, coreset
from protoad_jax.config import EMBED_CHANNELS, EMBED_LAYERS, Config
from protoad_jax.errors import BadImageError, NoWeightsError, SettingsError
from protoad_jax.input_pipeline import ScoredImages
from protoad_jax.model import Model, check_prototypes
from protoad_jax.progress import Progress

# Patches are stored on the host in float16 above this many bytes of float32 (halves memory at
# MVTec scale: 1.23M x 1792 is 8.8 GB in float32); clustering computes in float32 per chunk.
FLOAT16_PATCHES_ABOVE_BYTES = 4 << 30


# ----------------------------------------------------------------------------- jitted regions


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _stages_batch(arch: str, dtype: str, variables: dict, images: jax.Array) -> list[jax.Array]:
    """``[b, s, s, 3]`` -> the embedded stages, finest first: ``[b, h_l, w_l, c_l]`` each.

    Variables without ``batch_stats`` are BatchNorm-folded (``backbone.fold_batchnorm``); the
    choice is made from the pytree structure at trace time.
    """
    from protoad_jax import backbone

    net = backbone.ResNet(arch=arch, dtype=_dtype(dtype), folded="batch_stats" not in variables)
    feats = net.apply(variables, images)
    return [feats[k] for k in EMBED_LAYERS]


def _embed_batch(arch: str, dtype: str, variables: dict, images: jax.Array) -> jax.Array:
    """``[b, s, s, 3]`` -> per-position embeddings ``[b, h, w, 1792]`` (float32), for fitting."""
    stages = _stages_batch(arch, dtype, variables, images)
    return jax.vmap(features.embed)(dict(zip(EMBED_LAYERS, stages)))


@functools.cache
def _embed_fn(arch: str, dtype: str, out_dtype: str) -> Callable:
    def fn(variables, images):
        return scoring.l2_normalize(_embed_batch(arch, dtype, variables, images)).astype(out_dtype)

    return jax.jit(fn, compiler_options=xla_cpu.compiler_options())


@functools.cache
def _score_fn(arch: str, dtype: str, image_size: int, sigma: float, truncate: float,
              image_score: str, chunk_size: int | str | None, tuned: bool = True,
              factored: bool = True, nearest: bool = False) -> Callable:
    """The jitted scoring region; ``tuned=False`` without compiler options, for use inside a
    user's ``jit`` (JAX accepts compiler options on top-level ``jit`` only)."""
    # The factored head: prototype similarities at each stage's own resolution (exact up to
    # float32 rounding, 4x fewer head FLOPs; docs/METHOD.md section 1).
    kw = {"out_size": (image_size, image_size), "sigma": sigma, "truncate": truncate,
          "image_score": image_score, "chunk_size": chunk_size}

    def fn(variables, prototypes, images):
        stages = _stages_batch(arch, dtype, variables, images)
        if nearest:  # (ScoreResult, nearest prototype [b, h, w]): protoad_jax.explain
            return jax.vmap(functools.partial(scoring.score_features_nearest, **kw),
                            in_axes=(0, None))(stages, prototypes)
        if factored:
            return jax.vmap(functools.partial(scoring.score_features, **kw),
                            in_axes=(0, None))(stages, prototypes)
        emb = jax.vmap(features.embed)(dict(zip(EMBED_LAYERS, stages)))
        return jax.vmap(functools.partial(scoring.score_image, **kw), in_axes=(0, None))(emb, prototypes)

    return jax.jit(fn, compiler_options=xla_cpu.compiler_options() if tuned else None)


def scoring_function(config: Config, chunk_size: int | str | None = scoring.AUTO, *,
                     tuned: bool = True, factored: bool = True, nearest: bool = False) -> Callable:
    """The cached jitted scoring region for ``config``'s static settings.

    ``fn(variables, prototypes [k, c], images [b, s, s, 3]) -> ScoreResult`` batched: backbone
    and the factored head (``scoring.score_features``, vmapped: ``score_image`` of the
    embedding, computed per stage). Configs with the same architecture,
    dtype, image size, sigma, truncate and image score share one function (``fn._cache_size()``
    counts its compiled shapes). ``tuned=False``: without ``xla_cpu.compiler_options()``, for
    use inside a user's ``jit`` (JAX accepts compiler options on a top-level ``jit`` only).
    ``factored=False``: the head on the concatenated embedding (``scoring.score_image``), the
    same numbers up to float32 rounding at 4x the head's FLOPs, for comparisons (the benchmark).
    ``nearest=True``: ``(ScoreResult, nearest [b, h, w] int32)``, each patch's nearest prototype
    beside the max (``scoring.score_features_nearest``; ``protoad_jax.explain`` runs it).

    Raises:
      ValueError: ``chunk_size`` is not a positive integer, ``"auto"`` or None.
    """
    return _score_fn(config.arch, config.dtype, config.image_size, float(config.sigma),
                     float(config.truncate), config.image_score,
                     scoring.check_chunk_size(chunk_size), tuned, factored, nearest)


# ----------------------------------------------------------------------------- views


def check_view_inputs(images: Sequence[Any], config: Config) -> None:
    """Raises ``SettingsError`` for preprocessed arrays in the ``tiles`` view (it cuts image
    files; an array is one model input already)."""
    if config.view == "tiles" and len(images) and not isinstance(images[0], (str, os.PathLike)):
        raise SettingsError("the tiles view cuts image files into tiles; pass image paths, not "
                            "preprocessed arrays (TFDS datasets give center crops: use a folder "
                            "dataset, or --view=center_crop)")


def count_inputs(images: Sequence[Any], config: Config) -> int:
    """Model inputs (rows of the scorer's batches) ``images`` make in ``config.view``: one per
    image, or (``tiles``) the tiles of every image, counted from the file headers.

    Raises:
      views.TileError: (tiles) an image is smaller than one tile (the message names the file).
      BadImageError: (tiles) a header cannot be read.
    """
    check_view_inputs(images, config)
    if config.view != "tiles":
        return len(images)
    return sum(_num_tiles(p, config) for p in images)


def _num_tiles(path, config: Config) -> int:
    return views.tile_layout(*preprocess.image_size(path), config.tile_size, config.tile_overlap,
                             config.tile_image_size, f"image file {path}").num_tiles


def batch_size_for(images: Sequence[Any], batch_size: int, config: Config) -> int:
    """``batch_size`` capped at the inputs ``images`` make in ``config.view``: a batch of 8 for
    one image would score 7 padding rows. ``tiles`` caps at the tiles (counted from the headers
    only until there are ``batch_size``), so one image's tiles still share batches. A header
    that cannot be read, or an image smaller than a tile, stops the count at ``batch_size``:
    scoring reports (or skips) that file."""
    check_view_inputs(images, config)
    if config.view != "tiles":
        return max(1, min(batch_size, len(images)))
    tiles = 0
    for p in images:
        try:
            tiles += _num_tiles(p, config)
        except (BadImageError, views.TileError):
            return batch_size
        if tiles >= batch_size:
            return batch_size
    return max(1, tiles)


def view_batches(images: Sequence[Any], batch_size: int, config: Config, *, skip_bad: bool = False,
                 skipped: list | None = None) -> Iterator[tuple[np.ndarray, list]]:
    """``(batch [batch_size, s, s, 3], rows)`` of ``images`` in ``config.view``: rows are the
    inputs (``center_crop``, ``full_frame``: ``input_pipeline.iter_batches``) or
    ``input_pipeline.Tile`` rows (``tiles``: ``input_pipeline.tile_batches``)."""
    check_view_inputs(images, config)
    if config.view == "tiles":
        return input_pipeline.tile_batches(images, batch_size, config.image_size, config.tile_size,
                                           config.tile_overlap, config.tile_image_size,
                                           skip_bad=skip_bad, skipped=skipped)
    return input_pipeline.iter_batches(images, batch_size, config.resize, config.image_size,
                                       skip_bad=skip_bad, skipped=skipped,
                                       frame=config.view == "full_frame")


# ----------------------------------------------------------------------------- fit


def extract_patches(images: Sequence[Any], variables: dict, config: Config, *, batch_size: int = 8,
                    progress: bool = True, with_index: bool = False, across_processes: bool = False
                    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """All (or ``config.patch_budget(...)`` seeded-sampled) L2-normalised patch embeddings ``[n, 1792]``.

    ``config.patch_sampler``: ``"random"`` keeps a uniform seeded sample (drawn before the
    extraction, so only the kept patches are stored); ``"coreset"`` extracts every patch, then
    keeps the greedy k-center coreset (``coreset.greedy_coreset``). Without a budget below the
    total, every patch is kept in image-major, row-major order (``clustering.PatchGrid``; ``fit``
    passes that structure on). ``with_index``: also each kept patch's origin, its ``[n]`` int64
    position in that order (image ``i // side^2``, row and column ``divmod(i % side^2, side)``;
    ``protoad_jax.exemplars`` turns it into image, row, column). Batches of ``batch_size``
    (rounded up to a multiple of the local device count) are split across the local devices.
    ``across_processes``: each process of a multi-process run embeds its block of the images
    (``distributed.block``; the same sample positions) and every process gets all of them, in
    the one-process order (``distributed.allgather_rows``).
    """
    per_image = (config.image_size // 4) ** 2
    n_inputs = count_inputs(images, config)  # tiles: every tile is an input with its own grid
    total = n_inputs * per_image
    keep = None
    budget = config.patch_budget(jax.default_backend())
    if budget is not None and budget < total:
        if config.patch_sampler == "coreset":
            patches = extract_patches(images, variables,
                                      dataclasses.replace(config, max_patches=None),
                                      batch_size=batch_size, progress=progress,
                                      across_processes=across_processes)
            with Progress(f"coreset ({budget} of {len(patches)} patches)", None, "", progress):
                chosen = np.asarray(coreset.greedy_coreset(patches, budget, config.seed))
            return (patches[chosen], chosen.astype(np.int64)) if with_index else patches[chosen]
        rng = np.random.default_rng(config.seed)
        keep = np.sort(rng.choice(total, size=budget, replace=False))
    n_out = total if keep is None else len(keep)
    channels = EMBED_CHANNELS
    store = np.float16 if n_out * channels * 4 > FLOAT16_PATCHES_ABOVE_BYTES else np.float32
    out = np.empty((n_out, channels), store)
    fn = _embed_fn(config.arch, config.dtype, np.dtype(store).name)
    variables = sharding.replicate(variables)
    share = distributed.block(len(images)) if across_processes else slice(0, len(images))
    pos = count_inputs(images[:share.start], config) * per_image if share.start else 0
    written = 0
    unit = "tile" if config.view == "tiles" else "img"
    with Progress("features", n_inputs, unit, progress) as bar:
        mine = images[share] if share.stop > share.start else []
        for batch, items in (view_batches(mine, sharding.device_batch_size(batch_size), config)
                             if mine else ()):
            n_valid = len(items)
            emb = np.asarray(fn(variables, sharding.device_batch(batch)))[:n_valid].reshape(-1, channels)
            if keep is not None:
                lo, hi = np.searchsorted(keep, [pos, pos + len(emb)])
                emb = emb[keep[lo:hi] - pos]
            out[written:written + len(emb)] = emb
            pos += n_valid * per_image
            written += len(emb)
            bar.update(n_valid)
    out = distributed.allgather_rows(out[:written]) if across_processes else out[:written]
    if with_index:
        return out, (np.arange(len(out), dtype=np.int64) if keep is None else keep)
    return out


def fit(images: Iterable[Any], weights: str | os.PathLike | None = None, clustering: str = "finch",
        num_prototypes: int | None = 1000, seed: int = 0, *, config: Config | None = None,
        variables: dict | None = None, batch_size: int = 8, progress: bool = True,
        across_processes: bool = False, **settings) -> Model:
    """Fits ProtoAD prototypes on normal images.

    Args:
      images: image paths, or preprocessed ``[s, s, 3]`` float32 arrays (``preprocess_image``).
      weights: backbone ``.npz`` from ``protoad convert-weights`` (ignored when ``variables`` is given).
      clustering: ``"finch"`` (the paper) or ``"kmeans"``.
      num_prototypes: K; for FINCH the required number of clusters, None = FINCH level ``finch_level``.
      seed: seed for patch subsampling and k-means++.
      config: full settings; when given, ``clustering``, ``num_prototypes``, ``seed`` and
        ``settings`` must be left at their defaults.
      variables: backbone variables already in memory (skips loading ``weights``).
      batch_size: images per jitted backbone call (rounded up to a multiple of the local device
        count; each device gets ``batch_size / devices`` images).
      across_processes: every process of a multi-process run calls ``fit`` with the same
        arguments: the patch extraction is split by images over the processes, the clustering
        over every process's devices (``distributed.global_mesh()``); the same model as one
        process fits (bit for bit; docs/distributed.md).
      settings: other ``Config`` fields (``max_patches``, ``normalize_prototypes``, ``image_score``...).

    Returns:
      A ``Model``; ``model.save(path)`` writes it.

    Raises:
      ValueError: empty training set, bad images, bad settings.
    """
    if config is None:
        config = Config(clustering=clustering, num_prototypes=num_prototypes, seed=seed, **settings)
    elif settings or (clustering, num_prototypes, seed) != ("finch", 1000, 0):
        raise SettingsError("fit(): pass either config= or the individual settings (clustering, "
                         "num_prototypes, seed, ...), not both")
    images = list(images)
    if not images:
        raise SettingsError("fit() got an empty training set; pass at least one normal image")
    if variables is None:
        if weights is None:
            raise NoWeightsError("fit() needs backbone weights: weights=PATH.npz (protoad "
                                 "convert-weights makes it)")
        from protoad_jax.weights import load_backbone  # Flax: only when weights are loaded

        variables = load_backbone(weights, config.arch)
    t0 = time.perf_counter()
    patches, origin = extract_patches(images, variables, config, batch_size=batch_size,
                                      progress=progress, with_index=True,
                                      across_processes=across_processes)
    t1 = time.perf_counter()
    side = config.image_size // 4  # the patch grid (layer1); layer2 and 3 at 1/2, 1/4 of it
    n_inputs = count_inputs(images, config)  # tiles: every tile is an input with its own grid
    grid = (PatchGrid(n_inputs, side, side)
            if len(patches) == n_inputs * side * side and config.image_size % 16 == 0 else None)
    centres, info = cluster(patches, config, grid=grid, progress=progress,
                            mesh=distributed.global_mesh() if across_processes else None)
    t2 = time.perf_counter()
    prototypes = np.asarray(scoring.prepare_prototypes(centres, config.normalize_prototypes))
    found, near = exemplars.locate(prototypes, patches, origin, images, config)  # any view
    info.update(num_images=len(images), num_inputs=n_inputs, num_patches=len(patches), patch_dtype=patches.dtype.name,
                seconds_features=round(t1 - t0, 3), seconds_clustering=round(t2 - t1, 3),
                seconds_exemplars=round(time.perf_counter() - t2, 3))
    return Model(prototypes, config, str(weights) if weights is not None else None, info=info,
                 exemplars=found, coverage=exemplars.coverage(near.patch_sim, len(prototypes)))


# ----------------------------------------------------------------------------- scoring


def calibrate_threshold(normal_scores: np.ndarray, quantile: float = 0.99) -> tuple[float, str]:
    """Threshold from normal images only: the ``quantile`` of their scores (numpy linear).

    Returns ``(threshold, rule)``; an image is anomalous when its score is above the threshold.
    """
    scores = np.asarray(normal_scores, np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise SettingsError(f"calibration needs the scores of at least one normal image; got shape {scores.shape}")
    if not 0.0 < quantile <= 1.0:
        raise SettingsError(f"quantile must be in (0, 1], got {quantile}")
    return float(np.quantile(scores, quantile)), f"{quantile:g} quantile of {len(scores)} normal image scores"


def scoring_parts(model: Model, variables: dict | None = None, *,
                  chunk_size: int | str | None = scoring.AUTO,
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
            raise NoWeightsError("the model records no backbone weights path; pass variables= "
                                 "(protoad_jax.weights.load_backbone(PATH.npz))")
        from protoad_jax.weights import load_backbone  # Flax: only when weights are loaded

        variables = load_backbone(model.weights, model.config.arch)
    fn = scoring_function(model.config, chunk_size, tuned=tuned)
    variables, prototypes = sharding.replicate((variables, jnp.asarray(model.prototypes, jnp.float32)))
    return fn, variables, prototypes


def make_scorer(model: Model, variables: dict | None = None, *,
                chunk_size: int | str | None = scoring.AUTO
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
    (``sharding.batch_sharding()``), zero-padded to a multiple of the device count when needed (the
    padding is dropped from the outputs), and the outputs stay split the same way. Inside the
    user's own ``jit`` the scorer leaves placement to the user: pass uncommitted or
    ``sharding.batch_sharding()``-placed inputs (inputs committed to a single device conflict with the
    replicated variables when there are several devices).

    Args:
      model: a fitted or loaded ``Model``; its prototypes are used as stored.
      variables: backbone variables (default: loaded from ``model.weights``).
      chunk_size: prototypes per step of a running max over prototype chunks (bounds the head's
        memory for large K); None = one matmul per stage; ``"auto"`` (default) = chunks of
        ``scoring.AUTO_CHUNK`` when K exceeds it (faster from K ~ 1000 on, docs/benchmarks.md).

    Raises:
      ValueError: prototypes not ``[k >= 1, 1792]`` or not finite; no weights; bad ``chunk_size``.
        The returned scorer raises ValueError for images that are not
        ``[b, s, s, 3]`` float32 or hold NaN/inf.
    """
    fn, variables, prototypes = scoring_parts(model, variables, chunk_size=chunk_size,
                                              caller="make_scorer")
    traced_fn = scoring_function(model.config, chunk_size, tuned=False)
    size = model.config.image_size
    devices = sharding.local_mesh().size

    def scorer(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        input_pipeline.check_images(images, size)
        b = images.shape[0]
        traced = isinstance(images, jax.core.Tracer)
        if devices > 1 and not traced:
            if b % devices:
                pad = ((0, devices - b % devices),) + ((0, 0),) * 3
                images = np.pad(images, pad) if isinstance(images, np.ndarray) else jnp.pad(images, pad)
            images = jax.device_put(images, sharding.batch_sharding())
        res = (traced_fn if traced else fn)(variables, prototypes, images)
        if res.score.shape[0] != b:
            return res.anomaly_map[:b], res.score[:b]
        return res.anomaly_map, res.score

    return scorer


def score_images(model: Model, images: Sequence[Any], variables: dict | None = None, *,
                 batch_size: int = 8, progress: bool = True,
                 chunk_size: int | str | None = scoring.AUTO,
                 skip_bad: bool = False, across_processes: bool = False) -> ScoredImages:
    """Scores paths or preprocessed arrays in fixed-size batches (one compile for any count).

    Batches of ``batch_size`` (rounded up to a multiple of the local device count) are split
    across the local devices; variables and prototypes are replicated once per call.
    ``across_processes``: every process of a multi-process run calls this with the same images;
    each scores its block and every process gets the whole result (``score_shared``).

    Raises:
      BadImageError: an image file is missing or undecodable (``skip_bad=False``; its
        ``skippable`` is True), or every image was (``skip_bad=True``).
      SettingsError: no images.
    """
    if across_processes and distributed.process_count() > 1:
        return score_shared(model, images, variables, batch_size=batch_size, progress=progress,
                            chunk_size=chunk_size, skip_bad=skip_bad)
    fn, variables, prototypes = scoring_parts(model, variables, chunk_size=chunk_size,
                                              caller="score_images")

    def call(batch: np.ndarray) -> tuple:
        res = fn(variables, prototypes, sharding.device_batch(batch))
        return res.anomaly_map, res.score, res.patch_map

    if model.config.view == "tiles":
        return _score_tiles(call, list(images), model.config,
                            sharding.device_batch_size(batch_size), progress, skip_bad)
    (maps, scores, patch_maps), inputs, skipped = input_pipeline.score_batches(
        call, images, sharding.device_batch_size(batch_size), model.config.resize,
        model.config.image_size, progress=progress, skip_bad=skip_bad,
        frame=model.config.view == "full_frame")
    return ScoredImages(maps, scores, patch_maps, inputs, skipped)


def score_shared(model: Model, images: Sequence[Any], variables: dict | None = None, *,
                 batch_size: int = 8, progress: bool = True,
                 chunk_size: int | str | None = scoring.AUTO,
                 skip_bad: bool = False) -> ScoredImages:
    """``score_images`` split over the processes of a multi-process run (every process calls it
    with the same images): each scores its contiguous block (``distributed.block``); maps,
    scores, patch maps, stitched frames and skip reasons are gathered on every process in input
    order (``distributed.allgather_rows``, bit-exact). The result is the one-process result,
    bit for bit when each device's batch has the same size in both runs (float32 ulps
    otherwise: XLA's CPU kernels depend on the batch shape).

    A block whose every image is unreadable (``skip_bad``) is an error only when every image
    is: then every process scores every image, so the one-process rule decides.

    Raises:
      As ``score_images``; a bad image in another process's block fails this process's gather
      (``distributed.failures_as_errors`` turns it into one ``ProcessFailure`` line).
    """
    images = list(images)
    if not images:
        raise SettingsError("no images to score; pass at least one image")
    mine = images[distributed.block(len(images))]
    part, unreadable = None, False
    if mine:
        try:
            part = score_images(model, mine, variables, batch_size=batch_size, progress=progress,
                                chunk_size=chunk_size, skip_bad=skip_bad)
        except BadImageError as e:
            if not skip_bad or e.skippable:
                raise
            unreadable = True  # skip_bad, and none of this block's images could be read
    if any(distributed.allgather_json(unreadable)):
        return score_images(model, images, variables, batch_size=batch_size, progress=progress,
                            chunk_size=chunk_size, skip_bad=skip_bad)
    s, tiles = model.config.image_size, model.config.view == "tiles"
    empty = np.zeros((0, s, s), np.float32)  # a process with no images (more processes than images)
    maps = distributed.allgather_rows(empty if part is None else part.maps)
    scores = distributed.allgather_rows(np.zeros(0, np.float32) if part is None else part.scores)
    patch_maps = None if tiles else distributed.allgather_rows(empty if part is None else part.patch_maps)
    frames = distributed.allgather_arrays(part.frames if part else []) if tiles else None
    skipped = [input_pipeline.SkippedImage(Path(p), reason) for share in distributed.allgather_json(
        [[str(x.path), x.reason] for x in (part.skipped if part else [])]) for p, reason in share]
    if isinstance(images[0], (str, os.PathLike)):  # paths: scored as Path, the skipped left out
        gone = {x.path for x in skipped}
        inputs = [Path(p) for p in images if Path(p) not in gone]
    else:
        inputs = images
    return ScoredImages(maps, scores, patch_maps, inputs, skipped, frames)


def _score_tiles(call: Callable, images: list, config: Config, batch_size: int, progress: bool,
                 skip_bad: bool) -> ScoredImages:
    """The tiles view (docs/METHOD.md section 5): tiles of all images batched through ``call``;
    an image's tile maps are stitched (``views.stitch``, the mean over overlaps) as soon as its
    last tile is scored. Its map is the stitched map resampled to ``s x s`` (the evaluation
    resolution), its score the max of the stitched map (``smoothed_max``) or the max of its
    tiles' patch maxima (``patch_max``)."""
    if not images:
        raise SettingsError("no images to score; pass at least one image")
    s = config.image_size
    pending: dict[Path, list] = {}
    maps, scores, frames, inputs, skipped = [], [], [], [], []
    with Progress("scoring (tiles)", len(images), "img", progress) as bar:
        try:
            for batch, rows in view_batches(images, batch_size, config, skip_bad=skip_bad,
                                            skipped=skipped):
                tile_maps, tile_scores, _ = jax.device_get(call(batch))
                for row, m, score in zip(rows, tile_maps, tile_scores):  # padding rows dropped
                    done = pending.setdefault(row.path, [])
                    done.append((np.asarray(m), float(score)))
                    if len(done) < row.layout.num_tiles:
                        continue
                    del pending[row.path]
                    frame = views.stitch(np.stack([d[0] for d in done]), row.layout)
                    frames.append(frame)
                    maps.append(views.resample(frame, s, s))
                    scores.append(frame.max() if config.image_score == "smoothed_max"
                                  else max(d[1] for d in done))
                    inputs.append(row.path)
                    bar.update(1)
        except BadImageError as e:
            e.skippable = True  # skip_bad=True would have skipped it
            raise
    input_pipeline.check_any_scored(inputs, skipped)
    return ScoredImages(np.stack(maps), np.asarray(scores, np.float32), None, inputs, skipped, frames)
