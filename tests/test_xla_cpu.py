"""The per-computation XLA:CPU options: they reach the compiled code of the library's jitted
regions with no setup call (as a user's program imports protoad_jax), and they do what they say.

Oracle: the optimised HLO text of the compiled executable, where XLA:CPU names its YNNPACK
library fusions ``ynn_fusion``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from protoad_jax import Config, backbone, pipeline, xla_cpu

LIBRARY_FUSION = "ynn_fusion"


def _conv_relu(x, w):
    y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + 1.0)


def _hlo(fn, *args) -> str:
    return fn.lower(*args).compile().as_text()


@pytest.fixture(scope="module")
def options():
    opts = xla_cpu.compiler_options()
    if opts is None:
        pytest.skip("no XLA:CPU options here (not CPU, XLA_FLAGS sets them, or an older XLA)")
    return opts


def test_options_turn_off_library_fusions(options):
    x = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    default = _hlo(jax.jit(_conv_relu), x, w)
    tuned = _hlo(jax.jit(_conv_relu, compiler_options=options), x, w)
    print(f"{LIBRARY_FUSION} in HLO: default {default.count(LIBRARY_FUSION)}, "
          f"with {options}: {tuned.count(LIBRARY_FUSION)}")
    if LIBRARY_FUSION not in default:
        pytest.skip("this XLA:CPU makes no library fusion of a convolution by default")
    assert LIBRARY_FUSION not in tuned


def test_options_keep_the_numbers(options):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 32), dtype=np.float32)
    w = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    a = np.asarray(jax.jit(_conv_relu)(x, w), np.float64)
    b = np.asarray(jax.jit(_conv_relu, compiler_options=options)(x, w), np.float64)
    err = float(np.abs(a - b).max() / np.abs(a).max())
    print(f"default vs tuned conv: max relative err {err:.2e} (tol 1e-5)")
    assert err < 1e-5


def test_library_regions_compile_with_the_options(options):
    """The scoring and embedding regions make_scorer / fit run, compiled as a fresh user
    program compiles them: no library fusion anywhere in the backbone."""
    config = Config(resize=32, image_size=32)
    net = backbone.ResNet(arch=config.arch, folded=True)
    variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    protos = jax.ShapeDtypeStruct((4, 1792), jnp.float32)
    score = _hlo(pipeline.scoring_function(config), variables, protos, images)
    embed = _hlo(pipeline._embed_fn(config.arch, config.dtype, "float32"), variables, images)
    print(f"{LIBRARY_FUSION} in HLO: score region {score.count(LIBRARY_FUSION)}, "
          f"embed region {embed.count(LIBRARY_FUSION)}; convolutions "
          f"{score.count('convolution(')}, {embed.count('convolution(')}")
    assert "convolution(" in score and "convolution(" in embed  # the backbone is in there
    assert LIBRARY_FUSION not in score
    assert LIBRARY_FUSION not in embed
