"""The exported scorer as ONNX: ``scorer.onnx``, converted by jax2onnx from the jitted scoring
function ``make_scorer`` runs, and run by ONNX Runtime or OpenVINO (no jit here: the runtimes
compile it).

``export.export_scorer(..., format="onnx")`` and ``export.load_exported(D, runtime=...,
precision=...)`` are the doors; this module holds what only the ONNX format needs. The
converter and the runtimes come with the ``[deploy]`` extra and are imported inside functions,
so ``import protoad_jax`` never needs them.

``scorer.onnx``: one input ``images`` ``[b, s, s, 3]`` float32 (preprocessed exactly as the
jax.export artifact takes them, ``b`` symbolic unless a batch size is fixed), two outputs
``maps`` ``[b, s, s]`` and ``scores`` ``[b]`` float32; the BatchNorm-folded backbone and the
prototypes are initializers inside the file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ARTIFACT = "scorer.onnx"
INPUT = "images"
OUTPUTS = ("maps", "scores")
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16", "f16")  # OpenVINO's INFERENCE_PRECISION_HINT
OPSET = 17  # ONNX Runtime >= 1.11 and OpenVINO 2022+ read it
INSTALL = "pip install 'protoad-jax[deploy]'"


def import_deploy(module: str, error: type[Exception], what: str) -> Any:
    """``importlib.import_module(module)``, or ``error`` naming the ``[deploy]`` extra."""
    import importlib
    import sys

    try:
        if module == "openvino" and "openvino" not in sys.modules:
            # `import openvino` also imports its model converter (openvino.tools.ovc), which
            # sends a usage-telemetry event from a forked process (os.fork in a multithreaded
            # JAX process can deadlock). The runtime does not need the converter, and
            # openvino/__init__ skips it on ImportError; a later `import openvino.tools.ovc`
            # still works.
            saved = sys.modules.get("openvino.tools.ovc")
            sys.modules["openvino.tools.ovc"] = None  # type: ignore[assignment]
            try:
                return importlib.import_module(module)
            finally:
                if saved is None:
                    sys.modules.pop("openvino.tools.ovc", None)
                else:
                    sys.modules["openvino.tools.ovc"] = saved
        return importlib.import_module(module)
    except ImportError as e:
        raise error(f"{what} needs the Python package {module.split('.')[0]!r}, which is not "
                    f"installed ({e}): {INSTALL}") from e


@contextlib.contextmanager
def _quiet(*names: str):
    """Silences the converter's per-initializer warnings (one line per constant)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def convert(fn: Callable, image_shape: tuple[int | str, ...], path: Path,
            error: type[Exception]) -> dict[str, Any]:
    """Converts ``fn(images) -> (maps, scores)`` with jax2onnx and writes ``path``.

    ``image_shape``: ``(b, s, s, 3)`` with ``b`` an int or a symbolic name. Returns what the
    manifest records about the conversion (opset, IR version, converter versions).
    """
    jax2onnx = import_deploy("jax2onnx", error, "exporting to ONNX")
    onnx = import_deploy("onnx", error, "exporting to ONNX")
    import jax

    # "allow": jax2onnx's own shape rule for flax Conv adds the bias by rank promotion, which
    # a user's (or the tests') jax_numpy_rank_promotion="raise" would refuse.
    with _quiet("onnx_ir", "onnx_ir.serde", "jax2onnx"), jax.numpy_rank_promotion("allow"):
        proto = jax2onnx.to_onnx(fn, [tuple(image_shape)], model_name="protoad_jax_scorer",
                                 opset=OPSET, input_names=[INPUT], output_names=list(OUTPUTS))
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return {"opset": OPSET, "ir_version": int(proto.ir_version), "input_name": INPUT,
            "output_names": list(OUTPUTS), "converter": "jax2onnx.to_onnx",
            "weights": "initializers inside scorer.onnx"}


def converter_versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("jax2onnx", "onnx")}


def _dims_ort(shape: list) -> list[int | str]:
    return [d if isinstance(d, int) else "b" for d in shape]


def _dims_ov(partial_shape: Any) -> list[int | str]:
    return [d.get_length() if d.is_static else "b" for d in partial_shape]


def session(path: Path, runtime: str, precision: str, error: type[Exception], fix: str
            ) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], dict[str, list]]:
    """Opens ``path`` with ``runtime``; returns ``(run, shapes)``: ``run(images) -> (maps,
    scores)`` numpy, and the file's input and output shapes (symbolic dimensions as ``"b"``) and
    input dtype as ``{"input": [...], "maps": [...], "scores": [...], "dtype": str}``."""
    if runtime == "onnxruntime":
        ort = import_deploy("onnxruntime", error, f"running {path} with ONNX Runtime")
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # no warnings about unused initializers
            sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable models
            raise error(f"{path} cannot be read by onnxruntime {ort.__version__} "
                        f"({type(e).__name__}: {str(e)[:200]}); {fix}") from e
        ins, outs = sess.get_inputs(), sess.get_outputs()
        names = [o.name for o in outs]
        shapes = {"input": _dims_ort(ins[0].shape) if len(ins) == 1 else None,
                  "dtype": {"tensor(float)": "float32"}.get(ins[0].type, ins[0].type),
                  "names": ([i.name for i in ins], names),
                  **{n: _dims_ort(o.shape) for n, o in zip(names, outs)}}

        def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return tuple(sess.run(list(OUTPUTS), {INPUT: images}))

        return run, shapes
    ov = import_deploy("openvino", error, f"running {path} with OpenVINO")
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": precision})
    except Exception as e:  # OpenVINO raises RuntimeError and its own types
        raise error(f"{path} cannot be read by OpenVINO {ov.__version__} "
                    f"({type(e).__name__}: {str(e)[:200]}); {fix}") from e
    ins, outs = compiled.inputs, compiled.outputs
    names = [o.get_any_name() for o in outs]
    shapes = {"input": _dims_ov(ins[0].get_partial_shape()) if len(ins) == 1 else None,
              "dtype": {"f32": "float32"}.get(ins[0].get_element_type().get_type_name(),
                                               ins[0].get_element_type().get_type_name()),
              "names": ([i.get_any_name() for i in ins], names),
              **{n: _dims_ov(o.get_partial_shape()) for n, o in zip(names, outs)}}
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = request.infer({0: images})
        return tuple(np.array(res[compiled.output(n)]) for n in OUTPUTS)

    return run, shapes


def runtime_version(runtime: str) -> str:
    from importlib import metadata

    return metadata.version(runtime)


def check_runtime(runtime: str | None, precision: str | None, error: type[Exception]
                  ) -> tuple[str, str]:
    """The runtime and precision asked for, defaults filled: onnxruntime, f32."""
    runtime = "onnxruntime" if runtime is None else runtime
    if runtime not in RUNTIMES:
        raise error(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if precision is None:
        precision = "f32"
    if precision not in PRECISIONS:
        raise error(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if runtime == "onnxruntime" and precision != "f32":
        raise error(f"precision {precision!r} needs runtime='openvino'; ONNX Runtime runs the "
                    "file in float32")
    return runtime, precision

