"""Export a fitted model as a portable scorer: a jax.export artifact, its weights and a manifest.

Commands (``protoad export ...`` is the same as ``python scripts/export.py ...``):
  python scripts/export.py --model=runs/mvtec/bottle/model.npz --output=exported/bottle
  python scripts/export.py --model=M.npz --output=D --platforms=cpu,cuda   # lowered here, no GPU needed
  python scripts/export.py --model=M.npz --output=D --batch_size=8         # a fixed batch
  python scripts/export.py --model=M.npz --output=D --format=onnx          # scorer.onnx ([deploy] extra)

Prints the directory and its files, then what the artifact takes:
  wrote exported/bottle: scorer.jaxexport (A MB), weights.npz (W MB), manifest.json
  platforms cpu; input [b, 224, 224, 3] float32 -> maps [b, 224, 224], scores [b]; threshold T (rule)
With --format=onnx: ``wrote D: scorer.onnx (A MB), manifest.json`` and
``onnx opset 17; input [b, 224, 224, 3] float32 -> ...``.
Run it with scripts/predict.py --exported=D or protoad_jax.load_exported(D) (no Flax needed).
"""

from __future__ import annotations

import json

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model .npz written by fit()/evaluate.py.", required=True)
flags.DEFINE_string("output", None, "Directory to write (new, empty, or an earlier export).", required=True)
flags.DEFINE_enum("format", "jax", ["jax", "onnx"],
                  "jax: a jax.export artifact + weights.npz; onnx: scorer.onnx for ONNX Runtime or "
                  "OpenVINO (pip install 'protoad-jax[deploy]').")
flags.DEFINE_list("platforms", None, "Any of cpu,cuda,tpu (default: this machine's platform plus cpu).")
flags.DEFINE_integer("batch_size", None, "Fix the batch size (default: a symbolic batch, any size).",
                     lower_bound=1)
flags.DEFINE_string("weights", None, "Backbone .npz (default: the one recorded in the model).")
flags.DEFINE_bool("allow_random_weights", False, "Accept a model fitted with a random-init backbone (demo).")


def _shape(dims: list) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def main(argv):
    del argv
    import jax

    from protoad_jax import export, load_model, weights

    model = load_model(FLAGS.model)
    net = weights.backbone_for_model(model, FLAGS.weights, allow_random=FLAGS.allow_random_weights)
    out = export.export_scorer(model, net.variables, FLAGS.output, platforms=FLAGS.platforms,
                               batch_size=FLAGS.batch_size, format=FLAGS.format)
    manifest = json.loads((out / export.MANIFEST).read_text())
    onnx = FLAGS.format == "onnx"
    if onnx or jax.export.default_export_platform() in manifest["jax_export"]["platforms"]:
        export.load_exported(out)  # checks the directory as a user's load will
    files = ", ".join(f"{f['name']} ({f['bytes'] / 1e6:.1f} MB)" for f in manifest["files"].values())
    t = manifest["threshold"]
    threshold = ("none (pass --threshold to predict)" if t["value"] is None
                 else f"{t['value']:.6f} ({t['rule'] or 'rule not recorded'})")
    print(f"wrote {out}: {files}, {export.MANIFEST}")
    where = (f"onnx opset {manifest['onnx']['opset']}" if onnx
             else f"platforms {','.join(manifest['jax_export']['platforms'])}")
    print(f"{where}; input "
          f"{_shape(manifest['input']['shape'])} {manifest['input']['dtype']} -> maps "
          f"{_shape(manifest['outputs']['maps']['shape'])}, scores "
          f"{_shape(manifest['outputs']['scores']['shape'])}; threshold {threshold}")
