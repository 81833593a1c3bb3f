"""Row-chunked maps and scans over ``[n, d]`` arrays, optionally split over a device mesh.

Shared by the clustering modules (k-means, the FINCH neighbour search, the coreset): ``n`` can be
millions of rows, so work is done ``chunk`` rows at a time and the data is never padded (a padded
copy of 1.2 M x 1792 patches would cost gigabytes). Chunk ``i`` covers rows ``[s, s + chunk)`` with
``s = min(i * chunk, n - chunk)``: the last chunk is clamped to end at row ``n`` and a validity mask
drops the rows an earlier chunk already covered. Float16 storage is cast to float32 one chunk at
a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def unchunk(out: jax.Array, n: int, chunk: int) -> jax.Array:
    """``[num_chunks, chunk, ...]`` chunk outputs -> ``[n, ...]`` (drops the clamped overlap)."""
    head = out[:-1].reshape((out.shape[0] - 1) * chunk, *out.shape[2:])
    skip = (out.shape[0] - 1) * chunk - (n - chunk)  # rows of the last chunk already in `head`
    return jnp.concatenate([head, out[-1, skip:]], axis=0)


def scan_rows(fn: Callable, init: Any, x: jax.Array, chunk: int,
               rows: Any = ()) -> tuple[Any, Any]:
    """Scans ``fn`` over row chunks of ``x`` (and of the per-row arrays ``rows``).

    Chunk ``i`` covers rows ``[s, s + chunk)`` with ``s = min(i * chunk, n - chunk)``; rows below
    ``i * chunk`` were seen by chunk ``i - 1`` and are marked invalid.

    Args:
      fn: ``fn(carry, xc [chunk, d] float32, rows_c, valid [chunk] bool, start) -> (carry, out)``,
        ``out`` a pytree of ``[chunk, ...]`` arrays.
      init: initial carry.
      x: ``[n, d]``, any float dtype (cast to float32 per chunk); ``chunk <= n``.
      chunk: static chunk size.
      rows: pytree of ``[n, ...]`` arrays sliced alongside ``x``.

    Returns:
      ``(carry, outs)`` with ``outs`` a pytree of ``[n, ...]`` arrays.
    """
    n = x.shape[0]
    num = -(-n // chunk)

    def body(carry, i):
        start = jnp.minimum(i * chunk, n - chunk)
        xc = lax.dynamic_slice_in_dim(x, start, chunk).astype(jnp.float32)
        rc = jax.tree.map(lambda r: lax.dynamic_slice_in_dim(r, start, chunk), rows)
        valid = start + jnp.arange(chunk) >= i * chunk
        return fn(carry, xc, rc, valid, start)

    carry, outs = lax.scan(body, init, jnp.arange(num))
    return carry, jax.tree.map(lambda o: unchunk(o, n, chunk), outs)


def is_sharded(mesh: Mesh | None) -> bool:
    return mesh is not None and mesh.size > 1


def map_rows(fn: Callable, x: jax.Array, chunk: int, rows: Any = (),
              mesh: Mesh | None = None) -> Any:
    """Maps ``fn`` over the row chunks of ``x`` (chunks as in ``scan_rows``, no carry).

    With a ``mesh`` of more than one device the chunk index is split across all its devices
    (``shard_map``; ``x``, ``rows`` and whatever ``fn`` closes over are replicated). The
    chunk count is padded up to a multiple of the device count by repeating the last chunk,
    whose extra copies are dropped. Each chunk runs the same computation on the same shapes
    as on one device, so the result does not depend on the device count.

    Args:
      fn: ``fn(xc [chunk, d] float32, rows_c, start) -> out``, a pytree of ``[chunk, ...]``.
      x: ``[n, d]``, any float dtype; ``chunk <= n``.
      chunk: static chunk size.
      rows: pytree of ``[n, ...]`` arrays sliced alongside ``x``.
      mesh: devices to split the chunks over; None = this computation's own device.

    Returns:
      pytree of ``[n, ...]`` arrays.
    """
    if not is_sharded(mesh):
        return scan_rows(lambda c, xc, rc, valid, start: (c, fn(xc, rc, start)), (), x, chunk,
                          rows)[1]
    n = x.shape[0]
    num = -(-n // chunk)
    per_device = -(-num // mesh.size)
    ids = jnp.minimum(jnp.arange(per_device * mesh.size), num - 1)

    def one(i):
        start = jnp.minimum(i * chunk, n - chunk)
        xc = lax.dynamic_slice_in_dim(x, start, chunk).astype(jnp.float32)
        rc = jax.tree.map(lambda r: lax.dynamic_slice_in_dim(r, start, chunk), rows)
        return fn(xc, rc, start)

    axes = mesh.axis_names  # the chunk axis split over every mesh axis

    def local(ids):  # this device's chunks, then every device's results (replicated)
        return lax.all_gather(lax.map(one, ids), axes, tiled=True)

    # check_vma=False: scans in ``fn`` may start from replicated constants (e.g. a running
    # best) that become per-device values; the all_gather makes the output replicated.
    outs = jax.shard_map(local, mesh=mesh, in_specs=P(axes), out_specs=P(),
                         check_vma=False)(ids)
    return jax.tree.map(lambda o: unchunk(o[:num], n, chunk), outs)


def replicate(x: Any, mesh: Mesh | None) -> Any:
    """``x`` (a pytree) placed on every device of ``mesh``; unchanged without a multi-device mesh."""
    if not is_sharded(mesh):
        return x
    sharding = NamedSharding(mesh, P())

    def put(a):  # a mesh over several processes takes PRNG keys as their key data only
        if sharding.is_fully_addressable or not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.device_put(a, sharding)
        return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(a), sharding),
                                        impl=jax.random.key_impl(a))

    return jax.tree.map(put, x)


def check_finite(name: str, a: jax.Array) -> None:
    if not isinstance(a, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(a))):
        raise ValueError(f"{name} must be finite; found NaN or inf")


def as_float(name: str, a: jax.typing.ArrayLike) -> jax.Array:
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.float32)
    return a
