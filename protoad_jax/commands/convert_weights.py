"""Converts torchvision ImageNet weights (.pth, path or URL) to the .npz the JAX backbone loads.

No torch needed: the .pth is read by a restricted unpickler that executes nothing.

Command (``protoad convert-weights ...`` is the same) and what it prints (a random-weight wide_resnet50_2 .pth here; the real file prints
its own sha256, starting 95faca4d):
  python scripts/convert_weights.py --source=PATH_OR_URL --output=OUT.npz
  source: PATH_OR_URL
  source sha256: <64 hex digits>
  wrote OUT.npz: 215 arrays (params 129, batch_stats 86), 24,862,528 parameters, arch wide_resnet50_2, stages layer1,layer2,layer3
  OUT.npz sha256: <64 hex digits>
  metadata: OUT.json
With --include_layer4: 267 arrays (params 161, batch_stats 106), 68,883,240 parameters.

Without --source the registered torchvision IMAGENET1K_V1 file for --arch is downloaded (with a
progress bar and a sha256 check) into --cache_dir; without --output the file goes to
<cache_dir>/<arch>_imagenet1k_v1.npz, where the demo and evaluation scripts look for it.
Offline: download the URL by hand and pass --source=/path/to/file.pth.
Expected errors (offline, corrupt or truncated file, wrong hash, wrong --arch, a file that
asks to run code) print one message and exit with status 1.
"""

from __future__ import annotations

from absl import flags, logging

from protoad_jax import cli, weights

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "source",
    None,
    "Path or http(s) URL of a torchvision .pth "
    "(default: the registered IMAGENET1K_V1 file for --arch).",
)
flags.DEFINE_string(
    "output",
    None,
    "Output .npz (default: <cache_dir>/<arch>_imagenet1k_v1.npz); "
    "metadata goes next to it as .json.",
)
flags.DEFINE_enum("arch", "wide_resnet50_2", sorted(weights.REGISTRY), "Backbone architecture.")
flags.DEFINE_string(
    "cache_dir",
    None,
    "Download/cache folder (default: $PROTOAD_WEIGHTS_DIR, else "
    "the repository's weights/, else ~/.cache/protoad_jax).",
)
flags.DEFINE_bool(
    "include_layer4", False, "Also keep layer4 and fc (the full ImageNet classifier)."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.CommandError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
    source = FLAGS.source or weights.REGISTRY[FLAGS.arch].url
    stages = weights.STAGE_ORDER if FLAGS.include_layer4 else weights.DEFAULT_STAGES
    output = FLAGS.output or weights.default_weights_path(
        FLAGS.arch, FLAGS.cache_dir, FLAGS.include_layer4
    )
    print(f"source: {source}")
    try:
        res = weights.convert(source, output, FLAGS.arch, stages, cache=FLAGS.cache_dir)
    except weights.DownloadError as e:
        raise cli.CommandError.hinted(e, f"Pass that file with --source=/path/to/{e.dest.name}.") from e
    print(f"source sha256: {res.source_sha256}")
    n_stats = sum(k.startswith("batch_stats/") for k in res.keys)
    print(
        f"wrote {res.output}: {len(res.keys)} arrays (params {len(res.keys) - n_stats}, "
        f"batch_stats {n_stats}), {res.num_params:,} parameters, arch {FLAGS.arch}, "
        f"stages {','.join(stages)}"
    )
    print(f"{res.output.name} sha256: {res.output_sha256}")
    print(f"metadata: {res.metadata}")
