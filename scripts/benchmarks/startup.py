"""Start-up of ``scripts/predict.py`` on one image, each run a fresh process: the first run with an
empty compiled-program cache, then second runs that find it filled, per mode (``--model``, a
jax.export directory, an ONNX directory under ONNX Runtime and under OpenVINO f32).

Command (needs the [deploy] extra for the ONNX modes; others are skipped without it):
  python scripts/benchmarks/startup.py [--k=1000] [--repeats=3] [--weights=W.npz] [--modes=model,jax,onnxruntime,openvino]

Writes into --workdir (default: a temporary folder) a backbone .npz (--weights, or the
random-init wide_resnet50_2), a model with --k random unit prototypes that records it, both
exports and one photograph (scikit-learn's china.jpg, 427 x 640), then runs predict and prints
one markdown table: per mode, the first run and the median second run (of --repeats), wall seconds
of the whole process and the first run's breakdown, exclusive seconds each (they add up to the
wall time): python, imports and JAX's CPU client | model file | backbone .npz read and checked
against the architecture | BatchNorm folding and copy to the device | exported artifact load
(checks, sha256, deserialize or the runtime's session) | JAX trace | lowering | XLA compile or
cache read | image decode | scoring | writing the outputs | other (flags, file search, exit) |
cache entries (hits / misses). Then the wall time of plain ``python scripts/predict.py`` (no
instrumentation) with the filled cache, and the CPU (lscpu).

The breakdown comes from wrapping those library functions in the child process
(``python startup.py child MODE ARGS...``) and from JAX's own monitoring spans (trace, lower,
compile); a span inside another is charged to the innermost, JAX's spans first.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parents[1]
PREDICT = REPO / "scripts" / "predict.py"
MODES = ("model", "jax", "onnxruntime", "openvino")
COLUMNS = ("imports", "model file", "weights read+check", "weights fold+device", "artifact load",
           "trace", "lower", "compile", "decode", "scoring", "write", "other")
JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "compile"}  # includes cache reads


# ----------------------------------------------------------------------------- child process


def _child(launched: float, mode: str, argv: list[str]) -> None:
    """Runs predict with ``argv`` in this process, timing its phases; prints ``RESULT {json}``."""
    import jax

    spans: list[tuple[str, float, float, int]] = []  # (label, start, end, priority)
    counts = {"cache_hits": 0, "cache_misses": 0}
    jax.monitoring.register_event_time_span_listener(
        lambda event, start, end, **kw: spans.append((JAX_EVENTS[event], start, end, 2))
        if event in JAX_EVENTS else None)

    def count(event, **kw):
        key = event.rsplit("/", 1)[-1]
        if key in counts:
            counts[key] += 1

    jax.monitoring.register_event_listener(count)
    import protoad_jax
    from protoad_jax import cli, input_pipeline, prediction, report
    from protoad_jax.commands import predict  # noqa: F401  (its flags)

    if mode == "model":  # what predict --model imports when it starts scoring
        from protoad_jax import weights
        from protoad_jax.weights import backbones

        for name in ("protoad_jax.pipeline", "protoad_jax.explain"):
            if importlib.util.find_spec(name):
                importlib.import_module(name)
    else:
        from protoad_jax import export, onnx_export
        if mode in onnx_export.RUNTIMES:
            onnx_export.import_deploy(mode, RuntimeError, "startup.py")
    jax.devices()  # JAX's CPU client, which any run starts first
    imported = time.time()

    def timed(owner, name: str, label: str, priority: int = 1) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((label, start, time.time(), priority))

        setattr(owner, name, wrapper)

    if mode == "model":
        timed(protoad_jax, "load_model", "model file")
        timed(weights, "backbone_for_model", "weights fold+device")
        timed(backbones, "load_variables", "weights read+check")  # inside backbone_for_model
    else:
        timed(export, "load_exported", "artifact load")
    timed(input_pipeline, "score_batches", "scoring")  # the batch loop every scoring path runs
    timed(input_pipeline, "preprocess_image", "decode", 2)  # a worker thread; scoring waits for it
    timed(prediction, "write_predictions", "write")
    timed(report, "write_score_histogram", "write")
    try:
        cli.run("predict", argv)
    except SystemExit as e:
        if e.code:
            raise
    end = time.time()
    print("RESULT " + json.dumps({"launched": launched, "imported": imported, "end": end,
                                  "spans": spans, **counts}), flush=True)


def _exclusive(spans: list, start: float, end: float) -> dict[str, float]:
    """Seconds per label between ``start`` and ``end``: each instant goes to the active span of
    highest priority, the latest started among equals; instants in no span are "other"."""
    cuts = sorted({start, end, *(t for s in spans for t in s[1:3] if start < t < end)})
    out = dict.fromkeys(COLUMNS, 0.0)
    for a, b in itertools.pairwise(cuts):
        mid = (a + b) / 2
        active = [s for s in spans if s[1] <= mid < s[2]]
        label = max(active, key=lambda s: (s[3], s[1]))[0] if active else "other"
        out[label] += b - a
    return out


# ----------------------------------------------------------------------------- parent


def _setup(workdir: Path, k: int, weights_path: str | None, arch: str) -> dict[str, Path]:
    import harness
    from PIL import Image
    from sklearn.datasets import load_sample_images

    import protoad_jax
    from protoad_jax import Config, export, weights

    workdir.mkdir(parents=True, exist_ok=True)
    w = Path(weights_path) if weights_path else workdir / f"{arch}_random.npz"
    if not w.exists():
        weights.save_variables(w, weights.random_variables(arch))
    model = protoad_jax.Model(harness.prototypes(k), Config(arch=arch), weights=str(w))
    files = {"model": model.save(workdir / "model.npz"), "image": workdir / "china.png"}
    Image.fromarray(load_sample_images().images[0]).save(files["image"])
    variables = weights.load_backbone(w, arch)
    files["jax"] = export.export_scorer(model, variables, workdir / "exported_jax")
    try:
        files["onnx"] = export.export_scorer(model, variables, workdir / "exported_onnx", format="onnx")
    except export.ExportError as e:  # no [deploy] extra
        print(f"ONNX modes skipped: {e}")
    return files


def _args(mode: str, files: dict[str, Path], out: Path, cache: Path) -> list[str]:
    source = {"model": [f"--model={files['model']}"], "jax": [f"--exported={files['jax']}"]}.get(
        mode, [f"--exported={files.get('onnx')}", f"--runtime={mode}"])
    return [*source, f"--input={files['image']}", f"--output_dir={out}", "--noprogress",
            f"--compile_cache_dir={cache}"]


def _run(cmd: list[str]) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(BENCHMARKS)]))
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.time() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _instrumented(mode: str, args: list[str]) -> dict:
    launched = time.time()
    wall, stdout = _run([sys.executable, __file__, "child", str(launched), mode, *args])
    res = json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    phases = _exclusive(res["spans"], res["imported"], res["end"])
    phases["imports"] = res["imported"] - launched
    phases["other"] += wall - (res["end"] - launched)  # interpreter exit
    return {"wall": wall, "phases": phases, "hits": res["cache_hits"], "misses": res["cache_misses"]}


def main(argv):
    del argv
    import harness

    FLAGS = harness.FLAGS
    workdir = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="protoad_startup_"))
    files = _setup(workdir, FLAGS.k, FLAGS.weights, FLAGS.arch)
    header = ["mode", "run", "wall s", *COLUMNS, "cache hits / misses"]
    rows, plain = [], {}
    for mode in FLAGS.modes:
        if mode not in MODES:
            raise ValueError(f"--modes: {mode!r} is not one of {MODES}")
        if mode in ("onnxruntime", "openvino") and "onnx" not in files:
            continue
        cache = workdir / f"cache_{mode}"
        shutil.rmtree(cache, ignore_errors=True)
        first = _instrumented(mode, _args(mode, files, workdir / f"out_{mode}", cache))
        again = [_instrumented(mode, _args(mode, files, workdir / f"out_{mode}", cache))
                 for _ in range(FLAGS.repeats)]
        median = sorted(again, key=lambda r: r["wall"])[len(again) // 2]
        for name, r in (("first (empty cache)", first), (f"second (median of {FLAGS.repeats})", median)):
            rows.append([mode, name, f"{r['wall']:.2f}", *(f"{r['phases'][c]:.2f}" for c in COLUMNS),
                         f"{r['hits']} / {r['misses']}"])
            print(" | ".join(rows[-1]), flush=True)
        plain[mode] = statistics.median(
            _run([sys.executable, str(PREDICT), *_args(mode, files, workdir / f"plain_{mode}", cache)])[0]
            for _ in range(FLAGS.repeats))
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for mode, wall in plain.items():
        print(f"- plain `python scripts/predict.py` ({mode}), filled cache: median wall {wall:.2f} s "
              f"of {FLAGS.repeats}")
    print(f"- K = {FLAGS.k}, {FLAGS.arch} "
          f"({FLAGS.weights or 'random-init weights'}), one 427 x 640 photograph; files in {workdir}")
    for line in harness.machine():
        print(f"- {line}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        _child(float(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        import harness  # noqa: F401  (--repeats: second runs per mode, --arch, --weights)
        from absl import app, flags

        flags.DEFINE_integer("k", 1000, "Prototypes in the model.", lower_bound=1)
        flags.DEFINE_list("modes", list(MODES), f"Any of {','.join(MODES)}.")
        flags.DEFINE_string("workdir", None, "Where the files go (default: a new temporary folder).")
        app.run(main)
