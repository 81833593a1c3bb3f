"""Compares protoad_jax with the PyTorch reference on the same weights, prototypes and images.

Reference side (torch): torchvision builds the backbone from --pth with ``load_state_dict``;
each image is decoded with ``Image.open(p).convert("RGB")`` and preprocessed with
``tests/torch_reference.reference_transform``; ``torch_reference.reference_scores`` scores it with the
model's prototypes used as stored. JAX side (no torch): the same --pth is converted with
``protoad_jax.weights.convert`` (the torch-free reader) to a temporary .npz, each image is
preprocessed with ``protoad_jax.preprocess_image`` and scored by ``pipeline.score_images``, the
batched loop around the same jitted region ``make_scorer`` returns. Each side scores its own
preprocessed input, so the comparison is end to end.

Command (``protoad compare-reference ...`` is the same) and what it prints (random-init weights from ``torch.save(model.state_dict())``, a FINCH
model with K=8 raw prototypes fitted on the two scikit-learn sample photographs, scored on them):
  python scripts/compare_reference.py --pth=WEIGHTS.pth --model=MODEL.npz --images=DIR_OR_FILES [--max_images=N]
  reference: torchvision wide_resnet50_2 from WEIGHTS.pth; model MODEL.npz: K=8 prototypes, normalize_prototypes=False, image_score=smoothed_max, sigma=4.0
  max |torch - jax| per image (score = torch / jax):
  image                                 input  patch_map        map      score  torch / jax score
  china.png                         <err>      <err>      <err>      <err>      <score> / <score>
  flower.png                        <err>      <err>      <err>      <err>      <score> / <score>
  overall                           <err>      <err>      <err>      <err>      2 images
Columns: the max abs difference of the preprocessed input [224, 224, 3], the 56 x 56 patch map,
the smoothed 224 x 224 map and the image score. With --tol=T the exit status is 1 when an overall
column exceeds T. Measured errors: docs/parity.md's table and the command beside it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from absl import flags, logging

from protoad_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("pth", None, "torchvision state dict (.pth) of the backbone.", required=True)
flags.DEFINE_string("model", None, "Model .npz written by Model.save / evaluate.py.", required=True)
flags.DEFINE_list("images", None,
                  "Image files and/or folders (searched recursively), comma-separated.", required=True)
flags.DEFINE_integer("max_images", None, "Compare at most this many images (in listed order).")
flags.DEFINE_integer("batch_size", 8, "Images per batch on both sides.")
flags.DEFINE_float("tol", None, "Exit with status 1 when an overall max abs difference exceeds it.")

COLUMNS = ("input", "patch_map", "map", "score")


def _image_list(specs: list[str], max_images: int | None) -> list[tuple[str, Path]]:
    from protoad_jax import datasets

    out = []
    for spec in specs:
        root = Path(spec)
        for p in datasets.find_images(root):
            out.append((p.relative_to(root).as_posix() if root.is_dir() else p.name, p))
    return out[:max_images] if max_images is not None else out


def _reference():
    """The PyTorch reference, ``tests/torch_reference.py`` of the source checkout (it is a test
    oracle: torch never enters the library)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tests" / "torch_reference.py"
    if not path.is_file():
        raise cli.CommandError(f"compare-reference needs the PyTorch reference {path}, which ships "
                               "with the source checkout, not the wheel: clone the repository and "
                               "pip install -e '.[test]' there")
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        raise cli.CommandError(f"compare-reference needs torch and torchvision ({e}); "
                               "pip install -e '.[test]'") from e
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.CommandError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    torch_reference = _reference()
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from protoad_jax import load_model, pipeline, preprocess_image, weights

    model = load_model(FLAGS.model)
    cfg = model.config
    if cfg.truncate != 4.0:
        print(f"warning: the model uses truncate={cfg.truncate}; the reference uses scipy's 4.0")
    images = _image_list(FLAGS.images, FLAGS.max_images)
    if not images:
        raise cli.CommandError("no images to compare")
    bs = max(1, min(FLAGS.batch_size, len(images)))

    with tempfile.TemporaryDirectory() as tmp:  # first: a bad file is one CheckpointError line
        npz = Path(tmp) / "backbone.npz"
        weights.convert(FLAGS.pth, npz, cfg.arch, show_progress=False)
        variables = weights.load_backbone(npz, cfg.arch)
    net = getattr(torchvision.models, cfg.arch)(weights=None)
    net.load_state_dict(torch.load(FLAGS.pth, map_location="cpu", weights_only=True))
    net.eval()

    tf = torch_reference.reference_transform(cfg.resize, cfg.image_size)
    rows, overall = [], np.zeros(len(COLUMNS))
    print(f"reference: torchvision {cfg.arch} from {FLAGS.pth}; model {FLAGS.model}: "
          f"K={model.num_prototypes} prototypes, normalize_prototypes={cfg.normalize_prototypes}, "
          f"image_score={cfg.image_score}, sigma={cfg.sigma}")
    print("max |torch - jax| per image (score = torch / jax):")
    print(f"{'image':32s} " + " ".join(f"{c:>10s}" for c in COLUMNS) + "  torch / jax score")
    for start in range(0, len(images), bs):
        chunk = images[start:start + bs]
        x_torch = np.stack([tf(Image.open(p).convert("RGB")).numpy() for _, p in chunk])
        x_jax = np.stack([preprocess_image(p, cfg.resize, cfg.image_size) for _, p in chunk])
        t_patch, t_maps, t_scores, t_patch_scores = torch_reference.reference_scores(
            net, model.prototypes, x_torch, cfg.image_size, cfg.sigma, return_patch_score=True)
        if cfg.image_score == "patch_max":
            t_scores = t_patch_scores
        ours = pipeline.score_images(model, list(x_jax), variables, batch_size=bs, progress=False)
        for i, (name, _) in enumerate(chunk):
            errs = np.array([np.abs(x_torch[i].transpose(1, 2, 0) - x_jax[i]).max(),
                             np.abs(t_patch[i] - ours.patch_maps[i]).max(),
                             np.abs(t_maps[i] - ours.maps[i]).max(),
                             abs(float(t_scores[i]) - float(ours.scores[i]))], np.float64)
            overall = np.maximum(overall, errs)
            rows.append(name)
            print(f"{name:32s} " + " ".join(f"{e:10.3e}" for e in errs)
                  + f"  {float(t_scores[i]):.6f} / {float(ours.scores[i]):.6f}")
    print(f"{'overall':32s} " + " ".join(f"{e:10.3e}" for e in overall) + f"  {len(rows)} images")
    if FLAGS.tol is not None and overall.max() > FLAGS.tol:
        worst = COLUMNS[int(overall.argmax())]
        print(f"FAIL: max abs difference {overall.max():.3e} ({worst}) exceeds --tol={FLAGS.tol}",
              file=sys.stderr)
        sys.exit(1)
