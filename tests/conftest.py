"""Strict settings for every test: JAX rank promotion raises, float32 matmuls at full precision
in JAX and in the torch oracles (no TF32 on GPUs that have it). The commands the tests run in
subprocesses share one compiled-program cache for the session, not the user's
~/.cache/protoad_jax/compiled (protoad_jax.compile_cache)."""

import atexit
import os
import shutil
import tempfile

import jax
import torch

if "PROTOAD_COMPILE_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="protoad_test_compile_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["PROTOAD_COMPILE_CACHE_DIR"] = _cache

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
