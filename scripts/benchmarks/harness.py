"""What every measurement shares: flags, tables, alternating timers, the compile counter, the
same-weights models, the PyTorch reference, the fresh-process runner and the docs/benchmarks.md
writer.

The measurements import it as ``harness`` (this folder is their script's folder, so it is on
``sys.path``; tests/test_benchmark.py puts it there).
"""

from __future__ import annotations

import datetime
import functools
import importlib
import json
import logging
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)),
                     "Cores for torch (set_num_threads) and JAX (process CPU affinity).")
flags.DEFINE_integer("repeats", 3, "Timed calls after warm-up; the median is reported.")
flags.DEFINE_float("budget_s", 20.0,
                   "Stop repeating a measurement (after 2 timed calls) past this many seconds.")
flags.DEFINE_string("arch", "wide_resnet50_2", "Backbone architecture.")
flags.DEFINE_string("weights", None,
                    "Converted .npz; default random weights (speed does not depend on values).")
flags.DEFINE_integer("cluster_timeout_s", 3600, "Timeout of each fresh-process case (run_case).")

C = 1792  # embedding channels
BENCHMARKS = Path(__file__).resolve().parent  # scripts/benchmarks
REPO = BENCHMARKS.parents[1]
TESTS = REPO / "tests"  # holds the PyTorch reference, torch_reference.py
OUTPUT = REPO / "docs" / "benchmarks.md"  # what ``benchmark.py all`` rewrites


class Table:
    """A titled markdown table with notes below it."""

    def __init__(self, title: str, header: list[str]):
        self.title, self.header, self.rows, self.notes = title, header, [], []

    def add(self, *cells) -> None:
        self.rows.append([_fmt(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def print(self) -> Table:
        print(self.markdown(), flush=True)
        return self


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return "—" if x is None else str(x)


class CompileLog(logging.Handler):
    """Counts JAX compilations (``jax_log_compiles``) and sums trace + lower + XLA compile seconds.

    Installed once on the ``jax`` logger with propagation off, so the compile log does not flood
    stderr; other warnings are passed on to stderr.
    """

    _TIMED = re.compile(r"Finished (tracing|jaxpr to MLIR|XLA compilation).* in ([0-9.eE+-]+) sec")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.compiles, self.seconds, self.names = 0, 0.0, []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        timed = self._TIMED.match(msg)
        if msg.startswith("Compiling "):
            self.compiles += 1
            self.names.append(msg[len("Compiling "):].split(" with ")[0])
        elif timed:
            self.seconds += float(timed.group(2))
        elif record.levelno >= logging.WARNING:
            sys.stderr.write(f"{record.name}: {msg}\n")

    def snapshot(self) -> tuple[int, float]:
        return self.compiles, self.seconds


COMPILE_LOG = CompileLog()


def log_compiles() -> None:
    import jax

    jax.config.update("jax_log_compiles", True)
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(COMPILE_LOG)
    jax_logger.propagate = False


def setup() -> None:
    """Pins the process (and so XLA's thread pool and any child) to --threads cores and counts
    compilations. Must run before JAX initialises its CPU client."""
    cores = sorted(os.sched_getaffinity(0))
    if FLAGS.threads < 1:
        raise app.UsageError(f"--threads must be >= 1, got {FLAGS.threads}")
    if FLAGS.threads < len(cores):
        os.sched_setaffinity(0, cores[:FLAGS.threads])
    log_compiles()


def torch_threads():
    """torch, with torch and OpenCV set to --threads threads."""
    import cv2
    import torch

    torch.set_num_threads(FLAGS.threads)
    cv2.setNumThreads(FLAGS.threads)
    return torch


def timed(fns, repeats: int, budget_s: float | None = None) -> list[list[float]]:
    """Seconds per call of each of ``fns`` (warmed up by the caller) over up to ``repeats``
    rounds; a round calls every function once in turn, so that all of them see the same
    background load. Stops after >= 2 rounds once ``budget_s`` has passed."""
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        if budget_s is not None and len(times[0]) >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def medians(*fns, repeats: int | None = None) -> list[float]:
    """Median seconds per call of each function, timed in alternating rounds (``timed``)."""
    times = timed(fns, repeats or FLAGS.repeats, FLAGS.budget_s)
    return [statistics.median(t) for t in times]


@functools.cache
def models():
    """``(torchvision model, Flax variables)`` with the same (random or given) weights."""
    import jax
    import numpy as np
    import torchvision
    from flax import traverse_util

    from protoad_jax.weights import to_flax

    torch = torch_threads()
    tmodel = getattr(torchvision.models, FLAGS.arch)().eval()
    if FLAGS.weights:
        from protoad_jax.weights import load_variables

        variables = load_variables(FLAGS.weights, arch=FLAGS.arch)
        flat = traverse_util.flatten_dict(variables, sep="/")
        sd = {}
        for key, value in tmodel.state_dict().items():  # torch side gets the same weights
            match = [k for k in to_flax({key: value.numpy()}) if k in flat]
            if match:
                v = np.asarray(flat[match[0]])
                v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
                sd[key] = torch.from_numpy(np.ascontiguousarray(v))
        tmodel.load_state_dict(sd, strict=False)
    else:
        sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
        variables = traverse_util.unflatten_dict(to_flax(sd), sep="/")
    return tmodel, jax.device_put(variables)


def torch_reference():
    """The PyTorch reference module (tests/torch_reference.py), with tests/ put on ``sys.path``."""
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    import torch_reference

    return torch_reference


def torch_trunk(tmodel, x):
    """torchvision trunk to layer3, no_grad: ``[b, 3, s, s]`` -> ``[b, 1024, s/16, s/16]``."""
    import torch

    with torch.no_grad():
        h = tmodel.maxpool(tmodel.relu(tmodel.bn1(tmodel.conv1(x))))
        return tmodel.layer3(tmodel.layer2(tmodel.layer1(h)))


def prototypes(k: int, seed: int = 0):
    """``[k, 1792]`` float32 unit rows (what ``fit`` stores with the default config)."""
    import numpy as np

    from protoad_jax import scoring

    p = np.random.default_rng(seed).standard_normal((k, C), dtype=np.float32)
    return np.asarray(scoring.prepare_prototypes(p, normalize=True))


def images(n: int, size: int = 224, seed: int = 0):
    """``[n, size, size, 3]`` float32 standard normal, as preprocessed images."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, size, size, 3), dtype=np.float32)


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- fresh-process cases


def run_case(module: str, case: dict, *, env: dict[str, str] | None = None,
             protoad_root: str | os.PathLike | None = None) -> dict:
    """Runs ``module.case(case)`` in a fresh Python process (``case_main``) and returns its result:
    ``case`` plus the dict it returned, ``runtime_mb`` (RSS after JAX start-up) and ``peak_mb``
    (the process's VmHWM), or ``case`` plus ``error``; ``error`` too after --cluster_timeout_s.

    ``module`` is a module of this folder (``"cluster"``, ``"scale"``, ...). The child inherits
    the CPU affinity and the working folder, gets the flags of this module given on the command
    line (--threads, --arch, --weights, ...), the environment ``env`` (default: this process's)
    and imports protoad_jax from ``protoad_root`` (default: where this process did;
    cluster_benchmark.py --baseline passes an older checkout).
    """
    import protoad_jax

    timeout_s = FLAGS.cluster_timeout_s
    env = dict(os.environ if env is None else env)
    root = protoad_root or Path(protoad_jax.__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root), str(BENCHMARKS), *filter(None, [env.get("PYTHONPATH")])])
    shared = [f.serialize() for f in FLAGS.get_flags_for_module(__name__) if f.present]
    # python -c puts the working folder first on sys.path: dropped, so protoad_jax comes from root.
    code = "import sys; sys.path = [p for p in sys.path if p]; import harness; harness.case_main()"
    cmd = [sys.executable, "-c", code, module, json.dumps(case), *shared]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired:
        return dict(case, error=f"timeout after {timeout_s} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(case, error=f"exit {proc.returncode}: {' / '.join(tail)[:300]}")
    return json.loads(lines[-1][len("RESULT "):])


def case_main() -> None:
    """The child of ``run_case``: ``sys.argv[1:] = [module, case json, *flags]``; prints
    ``RESULT {json}``."""
    import jax.numpy as jnp

    log_compiles()
    module = importlib.import_module(sys.argv[1])  # defines its flags before they are parsed
    FLAGS(sys.argv[:1] + sys.argv[3:])
    case = json.loads(sys.argv[2])
    jnp.zeros(1).block_until_ready()  # initialise the runtime before the baseline
    runtime_mb = rss_mb()
    info = module.case(case)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent process.
    print("RESULT " + json.dumps(dict(case, runtime_mb=runtime_mb, peak_mb=rss_mb("VmHWM"), **info)),
          flush=True)


# ----------------------------------------------------------------------------- docs/benchmarks.md

_SIMD = re.compile(r"sse4_2|avx\w*|fma|f16c|amx\w*|asimd\w*|sve\w*|sme(?!p$)\w*")  # not smep (x86)


def _cpu() -> dict[str, str]:
    """``lscpu``'s fields (``/proc/cpuinfo``'s where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                              env=dict(os.environ, LC_ALL="C")).stdout
    except (OSError, subprocess.CalledProcessError):
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first processor
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def machine() -> list[str]:
    """Lines describing CPU (model, family, hypervisor, caches, vector ISA flags), RAM, software."""
    import jax
    import jaxlib
    import torch

    cpu = _cpu()
    model = cpu.get("model name") or platform.processor() or "unknown"
    ident = ", ".join(f"{k} {cpu[k]}" for k in ("cpu family", "model", "stepping") if cpu.get(k))
    extra = [f"{cpu['hypervisor vendor']} guest"] if cpu.get("hypervisor vendor") else []
    extra += [f"{k} {cpu[k]}" for k in ("l2 cache", "l3 cache") if cpu.get(k)]
    simd = [f for f in cpu.get("flags", "").split() if _SIMD.fullmatch(f)]
    mem = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    return [
        (f"CPU: {model}" + (f" ({ident})" if ident else "") + f", {os.cpu_count()} cores "
         f"({len(os.sched_getaffinity(0))} used)" + "".join(f", {e}" for e in extra)),
        f"CPU vector flags: {' '.join(simd) or 'none reported'}",
        f"RAM: {int(mem.group(1)) / 2**20:.1f} GiB" if mem else "RAM: unknown",
        (f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib "
         f"{jaxlib.__version__}, torch {torch.__version__}, devices "
         f"{[str(d) for d in jax.devices()]}"),
        f"OS: {platform.platform()}",
    ]


def write_benchmarks(out: Path, tables: list[Table], start: float,
                     load_start: tuple[float, ...]) -> None:
    """Rewrites ``out`` atomically: command, date, duration since ``start`` (``time.time()``),
    machine, threads, XLA settings, load averages, then the tables."""
    from protoad_jax.fileio import atomic_write

    load_end = os.getloadavg()
    command = "python scripts/benchmarks/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# Benchmarks",
        "",
        ("Written by `python scripts/benchmarks/benchmark.py all` (rerun it to refresh this file; "
         "the narrative is in [speed.md](speed.md))."),
        "",
        f"- Command: `{command}`",
        f"- Date: {date}; the run took {(time.time() - start) / 60:.1f} min.",
        *[f"- {line}" for line in machine()],
        (f"- Threads: torch.set_num_threads({FLAGS.threads}), cv2.setNumThreads({FLAGS.threads}); "
         f"JAX/XLA on the same {FLAGS.threads} cores (process CPU affinity). {xla_settings()}"),
        (f"- Load average (1 min): {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end. "
         "JAX and torch calls alternate within each measurement, so background load affects "
         "their ratios less than their absolute timings."),
        ("- Weights and prototypes are random (speed does not depend on their values); float32; "
         "JAX default matmul precision. Timings are medians over repeats after warm-up, results "
         "blocked until ready, compile time reported apart (clustering: see its notes)."),
        "",
        *[t.markdown() for t in tables],
    ])
    atomic_write(out, lambda f: f.write(text), mode="w")
    print(f"wrote {out}")


def xla_settings() -> str:
    """What XLA compiled with: ``XLA_FLAGS`` and the library's per-computation options."""
    from protoad_jax import xla_cpu

    env = os.environ.get("XLA_FLAGS")
    options = xla_cpu.compiler_options()
    return (f"XLA_FLAGS={env!r}" if env else "XLA_FLAGS unset") + (
        f"; XLA:CPU options {options} per computation (protoad_jax.xla_cpu.compiler_options()) "
        "in pipeline.py's jitted regions, as in any program that imports protoad_jax, and in "
        "the head and backbone tables' jits; FINCH and k-means with XLA's defaults."
        if options else
        "; protoad_jax.xla_cpu.compiler_options() gave no options here (XLA_FLAGS chooses the "
        "library fusions, the backend is not CPU, or this XLA lacks the option).")


def matmul_gflops(dtype: str = "float32") -> float:
    """GFLOP/s of a jitted [4096, 1792] x [1792, 4096] matmul in ``dtype`` (float32 at HIGHEST
    precision; bfloat16 accumulating in float32), the median of 5 calls after warm-up: the
    machine's matmul peak the tables compare against."""
    import jax
    import jax.numpy as jnp

    dt, prec = {"float32": (jnp.float32, "highest"), "bfloat16": (jnp.bfloat16, None)}[dtype]
    a = jax.random.normal(jax.random.key(0), (4096, 1792))
    b = jax.random.normal(jax.random.key(1), (1792, 4096))
    f = jax.jit(lambda a, b: jnp.matmul(a.astype(dt), b.astype(dt), precision=prec,
                                        preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * 4096 * 1792 * 4096 / sorted(ts)[2] / 1e9
