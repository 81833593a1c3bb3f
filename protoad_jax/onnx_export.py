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
prototypes are initializers inside the file, or, when they pass ``EXTERNAL_DATA_BYTES`` (a
protobuf message cannot exceed 2 GiB: K above about 200,000 prototypes with wide_resnet50_2),
ONNX external data in ``scorer.onnx.data`` beside it, which both runtimes read from the file's
folder. The prototypes' initializers (whole ``[k, 1792]``, split by stage, or padded chunks) are
found at export and named in the manifest's ``onnx.prototypes``; ``check_prototypes`` checks
them against the manifest at load.
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
EXTERNAL_DATA = "scorer.onnx.data"
# Initializers above this many bytes go to EXTERNAL_DATA: protobuf refuses messages over 2 GiB,
# and the graph itself needs some room.
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB
EMBED_CHANNELS = 1792  # the prototypes' width (config: layer1..3 of the ResNets)
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


def _initializer_bytes(graph: Any) -> int:
    from onnx import helper

    return sum(len(t.raw_data) or int(np.prod(t.dims, dtype=np.int64))
               * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
               for t in graph.initializer)


def convert(fn: Callable, image_shape: tuple[int | str, ...], path: Path, prototypes: np.ndarray,
            error: type[Exception]) -> dict[str, Any]:
    """Converts ``fn(images) -> (maps, scores)`` with jax2onnx, rewrites the graph with ONNX
    Runtime's basic optimizations and writes ``path`` (and ``EXTERNAL_DATA`` beside it when the
    initializers pass ``EXTERNAL_DATA_BYTES``).

    The rewrite (``ORT_ENABLE_BASIC``: constant folding, redundant-node elimination and the
    transpose optimizer; standard ONNX operators only, so any runtime reads the result) removes
    27 of the 33 layout Transposes jax2onnx puts around NHWC convolutions, which OpenVINO runs
    with a reference kernel (5.3 of 20 ms at batch 1, bf16), and folds the prototypes' split.
    The same function: f32 maps equal before and after (docs/export.md "Speed").

    ``image_shape``: ``(b, s, s, 3)`` with ``b`` an int or a symbolic name; ``prototypes``:
    ``[k, 1792]``, to find them among the written initializers. Returns what the manifest
    records about the conversion (opset, IR version, converter, optimization, where the weights
    are: ``"external_data"`` is the data file's name or None, and the prototypes' initializers).
    """
    import shutil

    jax2onnx = import_deploy("jax2onnx", error, "exporting to ONNX")
    onnx = import_deploy("onnx", error, "exporting to ONNX")
    ort = import_deploy("onnxruntime", error, "exporting to ONNX")
    import jax

    # "allow": jax2onnx's own shape rule for flax Conv adds the bias by rank promotion, which
    # a user's (or the tests') jax_numpy_rank_promotion="raise" would refuse.
    with _quiet("onnx_ir", "onnx_ir.serde", "jax2onnx"), jax.numpy_rank_promotion("allow"):
        proto = jax2onnx.to_onnx(fn, [tuple(image_shape)], model_name="protoad_jax_scorer",
                                 opset=OPSET, input_names=[INPUT], output_names=list(OUTPUTS))
    external = _initializer_bytes(proto.graph) > EXTERNAL_DATA_BYTES
    raw = path.parent / "converted" / path.name  # its own folder: its external data file too
    raw.parent.mkdir()
    if external:
        onnx.save_model(proto, str(raw), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(proto, str(raw))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    if external:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", EXTERNAL_DATA)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    shutil.rmtree(raw.parent)
    onnx.checker.check_model(str(path))  # by path: the message alone may exceed 2 GiB
    return {"opset": OPSET, "ir_version": int(proto.ir_version), "input_name": INPUT,
            "output_names": list(OUTPUTS), "converter": "jax2onnx.to_onnx",
            "optimization": f"onnxruntime {ort.__version__} ORT_ENABLE_BASIC (constant folding, "
                            "redundant nodes, transpose optimizer), saved as standard ONNX",
            "weights": (f"initializers of 1 KiB and more in {EXTERNAL_DATA} (ONNX external data)"
                        if external else "initializers inside scorer.onnx"),
            "external_data": EXTERNAL_DATA if external else None,
            "prototypes": _find_prototypes(path, np.asarray(prototypes, np.float32), error)}


def _rows(dims: list[int]) -> tuple[int, int]:
    """``(rows, width)`` of a prototype block ``[..., width]`` (leading dimensions flattened)."""
    return int(np.prod(dims[:-1], dtype=np.int64)), int(dims[-1])


def _find_prototypes(path: Path, prototypes: np.ndarray, error: type[Exception]
                     ) -> dict[str, list[int]]:
    """``{name: dims}`` of the initializers that hold the prototypes: column blocks whose first
    ``k`` rows (leading dimensions flattened) equal the prototypes' (whole ``[k, 1792]``, split by
    stage ``[1, k, c_l]``, or padded into chunks ``[n, chunk, 1792]`` for the chunked head)."""
    from onnx import numpy_helper

    onnx = import_deploy("onnx", error, "exporting to ONNX")
    k, width = prototypes.shape
    graph = onnx.load(str(path), load_external_data=False).graph
    found, covered = {}, 0
    for t in graph.initializer:
        if len(t.dims) < 2:
            continue
        rows, w = _rows(list(t.dims))
        if rows < k or w > width or len(t.dims) > 3:
            continue
        value = numpy_helper.to_array(t, base_dir=str(path.parent)).reshape(rows, w)[:k]
        for start in range(width - w + 1):
            if np.array_equal(value, prototypes[:, start:start + w]):
                found[t.name] = list(t.dims)
                covered += w
                break
    if covered != width:
        raise error(f"{path}: the prototypes [{k}, {width}] were not found among its initializers "
                    f"(found {found}); this is a bug in the ONNX export")
    return found


def check_prototypes(path: Path, names: dict[str, list[int]] | None, k: int,
                     error: type[Exception], fix: str, manifest: Path) -> None:
    """Raises ``error`` unless the file's prototype initializers (``names``: ``{name: dims}`` as
    the manifest recorded them; None: the one ``[k, 1792]`` initializer of older exports) have
    those dims and hold ``k`` prototypes (exactly, or padded into the last chunk). Reads the
    graph only (external data unread)."""
    onnx = import_deploy("onnx", error, f"reading {path}")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf's DecodeError and others
        raise error(f"{path} is not a readable ONNX file ({type(e).__name__}: {str(e)[:200]}); "
                    f"{fix}") from e
    dims = {t.name: list(t.dims) for t in graph.initializer}
    if names is None:
        names = {n: d for n, d in dims.items() if len(d) == 2 and d[1] == EMBED_CHANNELS}
    has = {n: dims.get(n) for n in names}
    where = f"{manifest} does not match {path}"
    if not names or has != names:
        raise error(f"{where}: the manifest's prototype initializers are {names}, the file has "
                    f"{has}; the manifest was edited or belongs to another export; {fix}")
    for n, d in names.items():
        rows, _ = _rows(d)
        chunk = d[-2] if len(d) == 3 and d[0] > 1 else None  # [n, chunk, c]: padded chunks
        if not (rows == k or (chunk and rows - chunk < k <= rows)):
            raise error(f"{where}: the manifest's num_prototypes is {k}, the file's prototypes are "
                        f"{d} ({n}); the manifest was edited or belongs to another export; {fix}")


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
    config = {"INFERENCE_PRECISION_HINT": precision}
    try:
        core = ov.Core()
        model = core.read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError and its own types
        raise error(f"{path} cannot be read by OpenVINO {ov.__version__} "
                    f"({type(e).__name__}: {str(e)[:200]}); {fix}") from e
    ins, outs = model.inputs, model.outputs
    names = [o.get_any_name() for o in outs]
    shapes = {"input": _dims_ov(ins[0].get_partial_shape()) if len(ins) == 1 else None,
              "dtype": {"f32": "float32"}.get(ins[0].get_element_type().get_type_name(),
                                               ins[0].get_element_type().get_type_name()),
              "names": ([i.get_any_name() for i in ins], names),
              **{n: _dims_ov(o.get_partial_shape()) for n, o in zip(names, outs)}}
    # One static-shape compile per batch size, at its first call: with the symbolic batch the
    # graph keeps its shape arithmetic and broadcasts the prototypes at run time (about 3 ms
    # per call at batch 1, bf16, in OpenVINO's per-node profile: docs/export.md "Speed").
    compiled: dict[int, Any] = {}

    def request_for(batch: int) -> tuple[Any, Any]:
        if batch not in compiled:
            static = model.clone()
            if ins[0].get_partial_shape().is_dynamic:
                static.reshape({0: [batch, *ins[0].get_partial_shape()[1:].to_shape()]})
            try:
                c = core.compile_model(static, "CPU", config)
            except Exception as e:
                raise error(f"{path} cannot be compiled by OpenVINO {ov.__version__} for batch "
                            f"{batch} ({type(e).__name__}: {str(e)[:200]}); {fix}") from e
            compiled[batch] = (c, c.create_infer_request())
        return compiled[batch]

    if len(ins) == 1 and ins[0].get_partial_shape().rank.get_length() == 4 \
            and not ins[0].get_partial_shape()[0].is_dynamic:
        request_for(ins[0].get_partial_shape()[0].get_length())  # fixed batch: compile now

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, request = request_for(images.shape[0])
        res = request.infer({0: images})
        return tuple(np.array(res[c.output(n)]) for n in OUTPUTS)

    return run, shapes


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

