"""Shared oracles for the tests: torchvision models with random, non-trivial weights.

torch enters only here and in the tests, never in the library.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision


def random_torchvision_model(arch: str = "wide_resnet50_2", seed: int = 0) -> torch.nn.Module:
    """A torchvision ResNet in eval mode with random weights, BatchNorm statistics and affine too.

    torchvision initialises BatchNorm to the identity (mean 0, var 1, scale 1, bias 0), which
    would hide a missing or swapped BN tensor; every one of them is randomised here.
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def torch_stage_features(model: torch.nn.Module, x_nchw: np.ndarray,
                         stages=("relu", "layer1", "layer2", "layer3")) -> dict[str, np.ndarray]:
    """Runs the torchvision trunk up to layer3; returns NHWC numpy features per torch stage name."""
    feats: dict[str, np.ndarray] = {}
    handles = [getattr(model, s).register_forward_hook(
        lambda mod, i, o, s=s: feats.__setitem__(s, o.detach().numpy().transpose(0, 2, 3, 1)))
        for s in stages]
    x = torch.from_numpy(np.ascontiguousarray(x_nchw))
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in ("layer1", "layer2", "layer3"):
            h = getattr(model, layer)(h)
    for h_ in handles:
        h_.remove()
    return feats
