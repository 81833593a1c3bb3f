"""XLA:CPU compiler options for the WideResNet convolutions, set per computation.

XLA:CPU (jaxlib 0.10) hands convolutions and their neighbours to YNNPACK library fusions by
default. For this backbone XLA's own emitters are faster (docs/speed.md, measured side by side
by ``python scripts/benchmarks/embedded_speed.py``), so ``pipeline.py`` compiles its jitted regions
(backbone -> embed, backbone -> embed -> score) with ``compiler_options()``, which turns the
library fusions off for those computations only. FINCH and k-means keep XLA's defaults: the
option did not speed them up. It is a per-computation option (``jax.jit(...,
compiler_options=...)``): it takes effect in any program that imports protoad_jax, before or
after JAX's backends started, and changes no process-wide setting, so library users call
nothing. JAX accepts compiler options on the outermost ``jax.jit`` only: a user's own jit
around the scorer passes ``compiler_options=compiler_options()`` to keep them.

No options (XLA's defaults) when the default backend is not CPU, when ``XLA_FLAGS`` already
chooses ``--xla_cpu_experimental_ynn_fusion_type`` (the user's choice wins), or when this jaxlib's
XLA does not know the option (older releases: it is tried once on a one-element computation).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

# Empty list of library fusion types: no YNNPACK fusions (the same as the command-line flag
# ``--xla_cpu_experimental_ynn_fusion_type=``).
OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

log = logging.getLogger(__name__)


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """``OPTIONS`` for ``jax.jit(..., compiler_options=...)`` where they apply, else None."""
    if "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return None
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=OPTIONS).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError as e:  # "No such compile option": an older XLA
        log.info("XLA:CPU options %s not applied: %s", OPTIONS, e)
        return None
    return dict(OPTIONS)
