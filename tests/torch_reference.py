"""The PyTorch reference of docs/METHOD.md section 1, written from the method alone; a test
oracle, not a CLI.

Tests import it as ``torch_reference`` (pytest's ``pythonpath`` holds tests/); ``protoad
compare-reference`` and the benchmarks load it from this file. It follows the published ProtoAD inference code: torchvision transforms,
the torchvision trunk, nearest x2 upsampling + concatenation, ``F.normalize``, prototypes as
1x1 conv kernels, channel max, ``1 - x``, ``cv2.resize`` (INTER_LINEAR) and
``scipy.ndimage.gaussian_filter``. Needs torch, torchvision, opencv and scipy (the ``[test]`` extra).
"""

from __future__ import annotations

import cv2
import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_transform(resize: int = 256, crop: int = 224) -> transforms.Compose:
    """PIL image -> normalised ``[3, crop, crop]`` tensor, as the published code did.

    The reference wrote ``transforms.Resize(256, Image.ANTIALIAS)``; ``ANTIALIAS`` was PIL's old
    alias of ``LANCZOS``.
    """
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


@torch.no_grad()
def reference_embed(model: torch.nn.Module, x_nchw) -> torch.Tensor:
    """torchvision trunk up to layer3 -> ``[B, 1792, 56, 56]`` embedding (for 224 x 224 input).

    layer3 nearest-upsampled x2 and concatenated after layer2, that upsampled x2 and concatenated
    after layer1: channels [layer1, layer2, layer3].
    """
    x = torch.as_tensor(x_nchw, dtype=torch.float32)
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    f1 = model.layer1(h)
    f2 = model.layer2(f1)
    f3 = model.layer3(f2)
    f23 = torch.cat([f2, F.interpolate(f3, scale_factor=2, mode="nearest")], dim=1)
    return torch.cat([f1, F.interpolate(f23, scale_factor=2, mode="nearest")], dim=1)


@torch.no_grad()
def reference_head(embedding_nchw, prototypes: np.ndarray, out_size: int = 224, sigma: float = 4.0,
                   return_patch_score: bool = False):
    """The reference scoring head on a given embedding.

    Args:
      embedding_nchw: ``[B, C, h, w]`` torch tensor or numpy array.
      prototypes: ``[K, C]`` numpy, used AS GIVEN as 1x1 conv kernels (the reference does not
        normalise them).
      out_size: side of the square anomaly map.
      sigma: Gaussian sigma (scipy defaults: truncate 4.0, mode 'reflect').
      return_patch_score: also return the max of each raw patch map (the paper's equation).

    Returns:
      ``(patch_maps [B, h, w], maps [B, out, out], scores [B])`` numpy float32, plus
      ``patch_scores [B]`` when ``return_patch_score``.
    """
    emb = F.normalize(torch.as_tensor(embedding_nchw, dtype=torch.float32), dim=1)
    kernels = torch.from_numpy(np.array(prototypes, np.float32))[:, :, None, None]  # a copy
    sim = F.conv2d(emb, kernels.to(emb.device))  # [B, K, h, w], on the embedding's device
    patch_maps = (1 - torch.max(sim, dim=1)[0]).cpu().numpy()  # [B, h, w]; the rest on the host
    maps = []
    for pm in patch_maps:
        up = cv2.resize(pm, (out_size, out_size), interpolation=cv2.INTER_LINEAR)
        maps.append(scipy.ndimage.gaussian_filter(up, sigma=sigma))
    maps = np.stack(maps)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    if return_patch_score:
        return patch_maps, maps, scores, patch_maps.reshape(len(patch_maps), -1).max(axis=1)
    return patch_maps, maps, scores


def reference_scores(model: torch.nn.Module, prototypes: np.ndarray, x_nchw, out_size: int = 224,
                     sigma: float = 4.0, return_patch_score: bool = False):
    """Images ``[B, 3, 224, 224]`` (normalised) -> ``(patch_maps, maps, scores[, patch_scores])``.

    See ``reference_head`` for the outputs; prototypes ``[K, 1792]`` are used as given.
    """
    return reference_head(reference_embed(model, x_nchw), prototypes, out_size, sigma,
                          return_patch_score)
