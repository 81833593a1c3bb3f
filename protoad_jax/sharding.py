"""Device placement: the 1-D mesh over this process's devices, batch and replicated placements.

Batches are split across all local devices (``local_mesh()``, axis ``"batch"``;
``batch_sharding()``), the backbone variables and prototypes replicated
(``replicated_sharding()``). The jitted regions of ``pipeline`` follow their inputs' shardings;
clustering splits its nearest-neighbour query chunks over the same mesh. With one device
nothing changes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def replicate(tree: Any) -> Any:
    """``tree`` on every local device (a no-op on one device or when already replicated)."""
    return tree if local_mesh().size == 1 else jax.device_put(tree, replicated_sharding())


def device_batch(batch: np.ndarray) -> jax.Array:
    """A host batch ``[b, ...]`` (``b`` a multiple of the device count) split across devices."""
    return jnp.asarray(batch) if local_mesh().size == 1 else jax.device_put(batch, batch_sharding())


def device_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of the local device count."""
    n = local_mesh().size
    return -(-int(batch_size) // n) * n
