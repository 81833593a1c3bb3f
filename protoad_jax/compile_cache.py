"""The commands' cache of compiled programs: JAX's persistent compilation cache in a folder the
user can move or turn off. No jit here.

``enable(folder)`` is called by ``protoad predict`` and ``protoad evaluate`` before anything
compiles, so a second run loads the compiled scoring region instead of compiling it again
(docs/export.md "Start-up"). The library itself never turns the cache on: a program that
imports protoad_jax keeps JAX's settings.

Which folder, first match wins:
  the command's ``--compile_cache_dir`` (``override``; empty: no cache),
  ``$PROTOAD_COMPILE_CACHE_DIR`` (empty: no cache),
  ``$XDG_CACHE_HOME/protoad_jax/compiled``, else ``~/.cache/protoad_jax/compiled``.
JAX's entries go into ``<folder>/jax``, unless the user set JAX's own ``JAX_COMPILATION_CACHE_DIR``
and neither of ours: then JAX's folder is kept. OpenVINO's model cache is not used: it saved
about 0.1 s of a 0.15 s compile at load and wrote 100 MB per precision (docs/export.md).

JAX caches only programs that took at least ``jax_persistent_cache_min_compile_time_secs``
(default 1 s) to compile. The scoring region of ``wide_resnet50_2`` compiles in about 0.5 s on
a quiet 2-core Xeon (1.2 s under load; its weights are arguments, so the program is small: a
52 KB entry), mostly under that threshold, so with JAX's defaults it was mostly not written;
``enable`` sets the threshold to 0.

Like any JAX compilation cache, the folder is trusted code: keep it where only you can write.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from protoad_jax.errors import SettingsError

ENV_VAR = "PROTOAD_COMPILE_CACHE_DIR"
JAX_SUBDIR = "jax"

log = logging.getLogger(__name__)


def cache_dir(override: str | os.PathLike | None = None) -> Path | None:
    """The cache folder (see the module docstring), or None when the cache is turned off."""
    if override is not None:
        return Path(override).expanduser() if str(override) else None
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return Path(env).expanduser() if env else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "protoad_jax" / "compiled"


def enable(override: str | os.PathLike | None = None) -> Path | None:
    """Turns the cache on in ``cache_dir(override)`` (or off) for this process; returns the folder
    in use, or None when off. Call it before anything compiles: JAX decides once per process.

    A folder that cannot be created is an error when the user chose it (``override`` or
    ``$PROTOAD_COMPILE_CACHE_DIR``) and a logged warning (no cache) when it is the default.

    Raises:
      SettingsError: the chosen folder cannot be created or written.
    """
    folder = cache_dir(override)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    chosen = override is not None or os.environ.get(ENV_VAR) is not None
    jax_dir = folder / JAX_SUBDIR
    if not chosen and jax.config.jax_compilation_cache_dir:
        jax_dir = Path(jax.config.jax_compilation_cache_dir)  # the user's JAX_COMPILATION_CACHE_DIR
    try:
        jax_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(jax_dir, os.W_OK):
            raise PermissionError(f"no write permission for {jax_dir}")
    except OSError as e:
        why = f"the compiled-program cache folder {folder} cannot be used ({e})"
        if chosen:
            raise SettingsError(f"{why}; choose a writable folder, or an empty value to run without "
                                f"the cache (${ENV_VAR}=)") from e
        log.warning("%s; running without it (set $%s to a writable folder)", why, ENV_VAR)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(jax_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder

