"""Memory checks made before heavy steps: a clear error instead of an out-of-memory crash.

A step estimates what it will hold (host bytes, and device bytes on an accelerator) and calls
``check`` first; when the estimate exceeds what is free, ``MemoryBudgetError`` (an
``InputError`` and a ``MemoryError``) names the step, both
numbers and the setting to change. The free amounts come from ``/proc/meminfo``
(``MemAvailable``) and from the device's ``memory_stats()`` (``bytes_limit - bytes_in_use``;
CPU devices report none, so only the host is checked there).
"""

from __future__ import annotations

import jax

from protoad_jax.errors import InputError


class MemoryBudgetError(InputError, MemoryError):
    """A step would need more memory than is free; the message names the setting to change."""


def available_host() -> int | None:
    """Bytes the host can still give (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return None


def available_device(device: jax.Device | None = None) -> int | None:
    """Free bytes on ``device`` (default: the first device), or None where it does not say."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def check(what: str, hint: str, *, host: int = 0, device: int = 0) -> None:
    """Raises ``MemoryBudgetError`` when ``what`` needs more host or device bytes than are free.

    Args:
      what: the step, as the message should name it ("finch: merging 90000 clusters ...").
      hint: what to change, appended to the message.
      host, device: estimated bytes the step needs on the host and on each device.
    """
    for where, need, free in (("host memory", host, available_host() if host else None),
                              ("device memory", device,
                               available_device() if device else None)):
        if free is not None and need > free:
            raise MemoryBudgetError(f"{what} needs about {need / 2**30:.1f} GiB of {where} but "
                              f"{free / 2**30:.1f} GiB are free; {hint}")
