"""XLA:CPU tuning for the WideResNet convolutions: a process-wide flag, set before JAX starts.

XLA:CPU in jaxlib 0.10 hands convolutions and their neighbours to YNNPACK library fusions by
default. For this backbone that is slower than XLA's own emitters: disabling them raised
end-to-end scoring from 4.52 to 5.33 images/s at batch 8 (K = 1000) on the 2-core CPU machine
(``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python scripts/benchmark.py e2e``).
GPU and TPU ignore the flag. The scripts call ``tune()``; library users may call it first thing.
"""

from __future__ import annotations

import logging
import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
TESTED_JAXLIB = ("0.10.",)  # an unknown XLA flag aborts the process, so only where it exists

log = logging.getLogger(__name__)


def tune() -> bool:
    """Adds ``FLAG`` to ``XLA_FLAGS`` unless JAX's backends already started, the user set the
    flag, or this jaxlib was not tested with it. Returns whether the flag was added."""
    import jaxlib
    from jax._src import xla_bridge

    current = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in current or not jaxlib.__version__.startswith(TESTED_JAXLIB):
        return False
    if xla_bridge.backends_are_initialized():
        log.info("JAX backends already started; call protoad_jax.xla_cpu.tune() before any JAX computation")
        return False
    os.environ["XLA_FLAGS"] = f"{current} {FLAG}".strip()
    return True
