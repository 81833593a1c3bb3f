"""Add normal images to a fitted model without a refit: new prototypes for what it does not cover.

Command (``protoad update ...`` is the same as ``python scripts/update.py ...``):
  python scripts/update.py --model=M.npz --add_normal=/data/new_good --output=M2.npz

Prints one line, e.g.
  8 images, 6272 patches: 5702 uncovered (similarity to the nearest prototype below the coverage
  level 0.853170); 143 prototypes added (1000 -> 1143); threshold 0.3102 -> 0.3087 (recalibrated); wrote M2.npz
The new images' patches are extracted as at fit (same preprocessing and patch budget); those less
similar to their nearest prototype than the model's coverage level (recorded at fit) are
clustered with the model's clustering settings into new prototypes, appended to the old ones
(which are unchanged), each with its exemplar. A model whose threshold was calibrated
(predict --calibrate_dir) is recalibrated on the same normal images. The update is recorded in
the output model (Model.updates). Deterministic for the model's seed. Images of any size are
accepted (each is resized and center-cropped like the training images).
--output must differ from --model (the old model is never overwritten). When every new patch is
already covered nothing is added: the line says so and no file is written (exit status 0).
A model file written before coverage levels were recorded cannot be updated: the error says to
refit. docs/update.md: the rules and the measurement.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from protoad_jax import cli, datasets

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model .npz to update (read only).", required=True)
flags.DEFINE_string("add_normal", None, "An image file or a folder of normal images (searched "
                    "recursively).", required=True)
flags.DEFINE_string("output", None, "Where the updated model .npz goes (not --model).", required=True)
flags.DEFINE_string("weights", None, "Backbone .npz (default: the one recorded in the model).")
flags.DEFINE_bool("allow_random_weights", False, "Accept a model fitted with a random-init backbone (demo).")
flags.DEFINE_integer("batch_size", 8, "Images per jitted call.", lower_bound=1)
flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    del argv
    from protoad_jax import load_model, update, weights

    source, output = Path(FLAGS.model), Path(FLAGS.output)
    if output.suffix != ".npz":
        raise cli.CommandError(f"--output={output} must be a .npz file name")
    if output.resolve() == source.resolve():
        raise cli.CommandError(f"--output={output} is --model: the old model is never overwritten "
                               "in place; pass another file name")
    model = load_model(source)
    paths = datasets.find_images(FLAGS.add_normal)
    net = weights.backbone_for_model(model, FLAGS.weights, allow_random=FLAGS.allow_random_weights)
    try:
        result = update.update(model, paths, net.variables, batch_size=FLAGS.batch_size,
                               progress=FLAGS.progress, source=str(FLAGS.add_normal))
    except update.UpdateError as e:
        raise cli.CommandError(f"{source}: {e}") from e
    if not result.added:
        print(f"{result.line()}; {output} not written")
        return
    result.model.save(output)
    print(f"{result.line()}; wrote {output}")
