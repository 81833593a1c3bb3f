"""Clustering of patch embeddings into prototypes, behind one door: ``cluster(patches, config)``.

Inside: FINCH as its authors ship it (``finch``, its exact first neighbours ``neighbours``, the
projection bound ``screen`` and closest-pair ``merging``), k-means (``kmeans``), PatchCore's
greedy coreset (``coreset``), the chunked maps they share (``chunking``) and the memory checks
made before heavy steps (``memory``). The jitted regions are inside ``kmeans``, ``neighbours``
and ``coreset``, each built once per static shape; ``cluster`` itself runs on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from protoad_jax import sharding
from protoad_jax.clustering import finch, kmeans
from protoad_jax.clustering.neighbours import PatchGrid
from protoad_jax.config import Config
from protoad_jax.errors import SettingsError
from protoad_jax.progress import Progress

__all__ = ["PatchGrid", "cluster"]


def cluster(patches: np.ndarray, config: Config, *, grid: PatchGrid | None = None,
            progress: bool = True, mesh: Mesh | None = None) -> tuple[np.ndarray, dict]:
    """Prototypes ``[k, c]`` (cluster means of the patches) and clustering details.

    The nearest-neighbour searches are split across the local devices (same result on any
    number of devices). ``grid``: the patches are every patch of whole images
    (``PatchGrid``; FINCH's level-0 search then shares each cell's Gram blocks, same result).
    ``mesh``: the devices to split over (default ``sharding.local_mesh()``); a mesh over every
    process's devices (``distributed.global_mesh()``, each process passing the same patches)
    gives the same prototypes.
    """
    mesh = sharding.local_mesh() if mesh is None else mesh
    info: dict[str, Any] = {"clustering": config.clustering}
    with Progress(f"clustering ({config.clustering})", None, "", progress):
        if config.clustering == "kmeans":
            if config.num_prototypes is None:
                raise SettingsError("k-means needs num_prototypes (K); got None")
            res = kmeans.kmeans(patches, min(config.num_prototypes, len(patches)),
                                jax.random.key(config.seed), spherical=config.spherical,
                                mesh=mesh)
            info.update(iterations=int(res.iterations), inertia=float(res.inertia))
            centres = np.asarray(res.centroids)
        else:
            k = None if config.num_prototypes is None else min(config.num_prototypes, len(patches))
            res = finch.finch(patches, num_clusters=k, ensure_early_exit=config.finch_early_exit,
                              mesh=mesh, grid=grid)
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
