"""Strict JAX settings for every test: rank promotion raises, float32 matmuls at full precision."""

import jax

from protoad_jax import xla_cpu

xla_cpu.tune()  # test what the scripts run

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
