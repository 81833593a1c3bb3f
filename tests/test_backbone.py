"""Backbone parity against torchvision with random, non-trivial weights (BatchNorm randomised too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from oracles import random_torchvision_model, state_dict_numpy, torch_stage_features

from protoad_jax import backbone
from protoad_jax.weights import to_flax

STAGE_PAIRS = (("stem", "relu"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"))
REL_TOL = 1e-4  # max |jax - torch| must stay below REL_TOL * max |torch activation| per stage


@pytest.fixture(scope="module")
def wrn():
    model = random_torchvision_model("wide_resnet50_2", seed=0)
    variables = traverse_util.unflatten_dict(to_flax(state_dict_numpy(model)), sep="/")
    return model, variables


@pytest.mark.parametrize("shape", [(2, 224, 224), (1, 160, 200)], ids=["224", "160x200"])
def test_stage_parity_with_torchvision(wrn, shape):
    torch_model, variables = wrn
    n, h, w = shape
    x = np.random.default_rng(h + w).normal(size=(n, 3, h, w)).astype(np.float32)
    ref = torch_stage_features(torch_model, x)
    out = jax.jit(backbone.ResNet().apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert set(out) == {"stem", "layer1", "layer2", "layer3"}
    for ours, theirs in STAGE_PAIRS:
        got, want = np.asarray(out[ours]), ref[theirs]
        assert got.shape == want.shape, (ours, got.shape, want.shape)
        err = np.abs(got - want).max()
        scale = np.abs(want).max()
        rel = (np.abs(got - want) / (np.abs(want) + 1e-6)).max()
        print(f"{shape} {ours:7s} max abs err {err:.3e}  max |act| {scale:.3e}  "
              f"ratio {err / scale:.2e} (tol {REL_TOL:.0e})  max rel err {rel:.2e}")
        assert err <= REL_TOL * scale, f"{ours}: max abs err {err} > {REL_TOL} * {scale}"


def test_bfloat16_compute_close_to_float32(wrn):
    _, variables = wrn
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32))
    f32 = backbone.ResNet().apply(variables, x)["layer3"]
    bf16 = backbone.ResNet(dtype=jnp.bfloat16).apply(variables, x)["layer3"]
    assert bf16.dtype == jnp.bfloat16
    rel = float(jnp.abs(bf16.astype(jnp.float32) - f32).max() / jnp.abs(f32).max())
    print(f"bfloat16 layer3 max abs err / max |act| = {rel:.3e} (tol 5e-2)")
    assert rel < 5e-2


def test_layer4_only_when_asked():
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    v = backbone.abstract_variables("wide_resnet50_2", last_stage="layer4")
    out = jax.eval_shape(backbone.ResNet(last_stage="layer4").apply, v, x)
    assert out["layer4"].shape == (1, 2, 2, 2048)
    assert "layer4" not in jax.eval_shape(backbone.ResNet().apply, backbone.abstract_variables(), x)


@pytest.mark.parametrize("arch", ["resnet50", "wide_resnet50_2", "wide_resnet101_2"])
def test_variable_shapes_match_torchvision_state_dict(arch):
    import torchvision

    sd = {k: v.numpy() for k, v in getattr(torchvision.models, arch)().state_dict().items()}
    ours = traverse_util.flatten_dict(backbone.abstract_variables(arch, last_stage="fc"), sep="/")
    theirs = to_flax(sd, stages=("layer1", "layer2", "layer3", "layer4", "fc"))
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:10]
    bad = [k for k in ours if ours[k].shape != theirs[k].shape]
    assert not bad, bad[:10]


def test_wide_resnet50_2_parameter_count():
    v = backbone.abstract_variables("wide_resnet50_2", last_stage="fc")
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))
    assert count == 68_883_240, count


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'resnet18'"):
        backbone.get_arch("resnet18")


def test_folded_batchnorm_equals_unfolded(wrn):
    _, variables = wrn
    folded = backbone.fold_batchnorm(variables)
    assert "batch_stats" not in folded and "bn1" not in folded["params"]
    assert folded["params"]["layer2"]["0"]["downsample"]["0"]["bias"].shape == (512,)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 96, 96, 3)).astype(np.float32))
    ref = backbone.ResNet().apply(variables, x)
    out = backbone.ResNet(folded=True).apply(folded, x)
    for stage in ("stem", "layer1", "layer2", "layer3"):
        err = float(jnp.abs(out[stage] - ref[stage]).max())
        scale = float(jnp.abs(ref[stage]).max())
        print(f"folded {stage}: max abs err {err:.2e} (tol {REL_TOL:.0e} x {scale:.2e})")
        assert err <= REL_TOL * scale, (stage, err, scale)
    # the folded variables have exactly the folded model's structure
    want = jax.tree.map(lambda a: a.shape, jax.eval_shape(
        backbone.ResNet(folded=True).init, jax.random.key(0), x))
    assert jax.tree.map(lambda a: a.shape, folded) == want
