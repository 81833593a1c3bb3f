"""Strict settings for every test: JAX rank promotion raises, float32 matmuls at full precision
in JAX and in the torch oracles (no TF32 on GPUs that have it)."""

import jax
import torch

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
