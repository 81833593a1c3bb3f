"""Several processes, one job: start-up, each process's share, gathering, and a peer's failure.

One process per host (or several on one machine), started with JAX's multi-process runtime
(``jax.distributed``): ``initialize`` reads ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (``define_flags``), else the environment (``JAX_COORDINATOR_ADDRESS`` with
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or a SLURM step of several tasks, which JAX reads
itself). Without any of them nothing starts and every helper here is the one-process identity.

Shares are contiguous blocks in input order (``block``), so gathering every process's rows in
process order (``allgather_rows``, bit-exact for any dtype) rebuilds the one-process order.
Collectives run on CPU over gloo; ``jax_enable_recoverability`` is set so that a process that
dies makes the others' next collective raise (``failures_as_errors`` turns that into one
``ProcessFailure`` line) instead of JAX's coordination client aborting them with a C++ stack.
No jit here: collectives are ``jax.experimental.multihost_utils``' own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from protoad_jax.errors import InputError, SettingsError

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"  # with JAX_PROCESS_ID: this package's, for plain shells
PROCESS_ID_ENV = "JAX_PROCESS_ID"
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
HEARTBEAT_TIMEOUT_S = 60  # the coordination service declares a silent process dead after this
GATHER_BYTES = 256 << 20  # allgather_rows sends at most this much per process per collective
# Runtime errors that mean a peer process is gone (gloo's transport, the coordination service).
_PEER_LOST = ("gloo", "connection closed", "connection reset", "heartbeat", "unavailable",
              "coordination service", "socket closed", "broken pipe")


class ProcessFailure(InputError):
    """Another process of a multi-process run stopped (crashed, killed, or ended with its own
    error); this process ends too. Not a bug here: the line says to read the other process's
    output and rerun; finished work is kept."""


def define_flags() -> None:
    """Defines ``--coordinator_address``, ``--num_processes``, ``--process_id`` (once)."""
    from absl import flags

    if "num_processes" in flags.FLAGS:
        return
    flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0 "
                        f"(default ${COORDINATOR_ENV}; docs/distributed.md).")
    flags.DEFINE_integer("num_processes", None, lower_bound=1, help="Multi-process runs: number "
                         f"of processes (default ${NUM_PROCESSES_ENV}, or SLURM's task count).")
    flags.DEFINE_integer("process_id", None, lower_bound=0, help="Multi-process runs: this "
                         f"process, 0 .. num_processes - 1 (default ${PROCESS_ID_ENV}, or SLURM's).")


def slurm_step() -> bool:
    """True inside a SLURM step (``srun``) of more than one task."""
    return all(k in os.environ for k in SLURM_ENV) and int(os.environ["SLURM_NTASKS"]) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts JAX's multi-process runtime when a launch asks for it; True when it did.

    Must run before anything else uses JAX. Explicit arguments win over the environment
    (``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``; or SLURM, which
    ``jax.distributed.initialize`` detects). One process (``num_processes == 1``) starts nothing.

    Raises:
      SettingsError: only some of the three settings are given, or they do not fit together.
    """
    env = os.environ
    address = coordinator_address or env.get(COORDINATOR_ENV)
    count = num_processes if num_processes is not None else _env_int(NUM_PROCESSES_ENV)
    index = process_id if process_id is not None else _env_int(PROCESS_ID_ENV)
    given = {"--coordinator_address": address, "--num_processes": count, "--process_id": index}
    if all(v is None for v in given.values()):
        if not slurm_step():
            return False
        _start()  # JAX reads the SLURM variables
        return jax.process_count() > 1
    missing = [k for k, v in given.items() if v is None]
    if missing and not slurm_step():
        raise SettingsError(f"a multi-process run needs --coordinator_address, --num_processes and "
                            f"--process_id (or ${COORDINATOR_ENV}, ${NUM_PROCESSES_ENV}, "
                            f"${PROCESS_ID_ENV}); missing {', '.join(missing)}")
    if count is not None and index is not None and not 0 <= index < count:
        raise SettingsError(f"--process_id must be in 0 .. --num_processes - 1 = {count - 1}; got {index}")
    if count == 1:
        return False
    _start(address, count, index)
    return True


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    if not text.strip().isdigit():
        raise SettingsError(f"${name} must be a non-negative integer; got {text!r}")
    return int(text)


def _start(*args) -> None:
    # gloo: CPU collectives between processes (XLA:CPU has none by default); recoverability:
    # a dead peer raises in the others' collectives instead of aborting them (module docstring).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(*args, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """True on process 0, the one that writes the merged outputs."""
    return jax.process_index() == 0


def block(n: int, index: int | None = None, count: int | None = None) -> slice:
    """Process ``index``'s contiguous share of ``n`` items: ``[n * i // p, n * (i + 1) // p)``."""
    i = jax.process_index() if index is None else index
    p = jax.process_count() if count is None else count
    return slice(n * i // p, n * (i + 1) // p)


def round_robin(items: Sequence[Any]) -> list:
    """This process's items: every ``process_count()``-th, starting at its index."""
    return list(items[jax.process_index()::jax.process_count()])


def global_mesh() -> Mesh:
    """1-D mesh (axis ``"batch"``) over every process's devices, ``jax.devices()``."""
    from protoad_jax.sharding import BATCH_AXIS

    return Mesh(np.array(jax.devices()), (BATCH_AXIS,))


def allgather_json(obj: Any) -> list:
    """Every process's ``obj`` (JSON-serialisable), in process order; ``[obj]`` on one process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(every[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def allgather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's ``[n_i, ...]`` rows concatenated in process order (bit-exact, any dtype;
    ``n_i`` may differ and be 0; sent at most ``GATHER_BYTES`` per collective)."""
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    meta = allgather_json({"rows": len(rows), "shape": list(rows.shape[1:]), "dtype": rows.dtype.str})
    full = [m for m in meta if m["rows"]] or meta
    shape, dtype = tuple(full[0]["shape"]), np.dtype(full[0]["dtype"])
    counts = [m["rows"] for m in meta]
    width = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    items = width // dtype.itemsize  # not -1: an empty share's rows may have any trailing shape
    raw = np.ascontiguousarray(rows, dtype).reshape(len(rows), items).view(np.uint8).reshape(len(rows), width)
    step = max(1, GATHER_BYTES // max(width, 1))
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for s in range(0, max(counts), step):
        chunk = np.zeros((min(step, max(counts) - s), width), np.uint8)
        mine = raw[s:s + len(chunk)]
        chunk[:len(mine)] = mine
        every = np.asarray(multihost_utils.process_allgather(chunk))  # [p, rows, width]
        for i, c in enumerate(counts):
            parts[i].append(every[i, :max(0, min(len(chunk), c - s))])
    out = np.concatenate([p for ps in parts for p in ps]) if sum(counts) else np.zeros((0, width), np.uint8)
    return out.view(dtype).reshape(sum(counts), *shape)


def allgather_arrays(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every process's list of arrays (any shapes, one dtype) concatenated in process order,
    bit-exact (``allgather_rows`` of their flattened values, shapes by ``allgather_json``)."""
    if jax.process_count() == 1:
        return list(arrays)
    shapes = [s for shares in allgather_json([list(a.shape) for a in arrays]) for s in shares]
    dtype = arrays[0].dtype if arrays else np.float32
    flat = allgather_rows(np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0, dtype))
    ends = np.cumsum([int(np.prod(s, dtype=np.int64)) for s in shapes])
    return [part.reshape(s) for part, s in zip(np.split(flat, ends[:-1]), shapes)]


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (raises when a process died)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def finish() -> None:
    """Ends a multi-process run cleanly: every process reaches a barrier, the others disconnect,
    and process 0 (which hosts JAX's coordination service) returns only once they have; a
    process whose coordinator is gone is aborted by JAX's client, so process 0 must end last."""
    if jax.process_count() == 1:
        return
    barrier("protoad_jax finish")
    if not is_main():
        jax.distributed.shutdown()
        return
    from jax._src import distributed as jax_distributed  # no public API waits for disconnects

    client = jax_distributed.global_state.client
    if client is not None and hasattr(client, "get_live_nodes"):
        # Returns once every listed process still alive has called it too: the others never
        # do, so it returns when they have disconnected (or were declared dead).
        client.get_live_nodes(list(range(jax.process_count())))


def broadcast_json(obj: Any) -> Any:
    """Process 0's ``obj`` on every process (decisions that must agree, e.g. what to resume)."""
    return allgather_json(obj)[0]


@contextlib.contextmanager
def failures_as_errors() -> Iterator[None]:
    """In a multi-process run, a collective failing because another process is gone becomes
    one ``ProcessFailure`` line; anything else passes through unchanged."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        text = str(e).lower()
        if jax.process_count() == 1 or not any(k in text for k in _PEER_LOST):
            raise
        first = " ".join(str(e).split())[:200]
        raise ProcessFailure(
            f"process {jax.process_index()} of {jax.process_count()}: another process of this run "
            f"stopped ({first}); see its output for why, then rerun the same command on every "
            "process (finished work is kept)") from e
