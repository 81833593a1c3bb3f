"""deploy: the deployment paths side by side in one run, same weights, prototypes and images:
our JAX ``make_scorer``, our exported ``scorer.onnx`` (``export_scorer(..., format="onnx")``)
under ONNX Runtime and under OpenVINO at f32 and bf16 (bf16 where the CPU has bfloat16 units),
and the anchor an anomalib user deploys: the published ProtoAD network (torchvision trunk to
layer3, nearest-upsampled concatenation, ``F.normalize``, prototypes as 1x1 conv kernels, channel
max, ``1 - x``: the ``[b, 56, 56]`` patch map, no upsampling or blur) exported with
``torch.onnx.export(dynamo=True, opset_version=18)`` and run by the same OpenVINO at the same
precision, compiled with a static batch as load_exported compiles ours (and once more as
exported, dynamic batch, for information). Batch-1 latency and images/s per batch, GFLOP/s
against the machine's matmul peak. --deploy_profile adds OpenVINO's per-node profile of ours
and the anchor at batch 1.

Needs the ``[deploy]`` extra plus ``onnxscript`` (the dynamo exporter).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import harness
import jax
import numpy as np
from absl import flags
from harness import FLAGS, Table

from protoad_jax import backbone, export, onnx_export, pipeline
from protoad_jax.config import Config

flags.DEFINE_list("deploy_batch_sizes", ["1", "8"], "deploy: batch sizes (1: latency, else img/s).")
flags.DEFINE_integer("deploy_k", 1000, "deploy: prototype count K.")
flags.DEFINE_bool("deploy_profile", False,
                  "deploy: also print OpenVINO's per-node profile (PERF_COUNT) of ours and the "
                  "anchor at batch 1, summed per node type.")
flags.DEFINE_bool("deploy_chunked", True,
                  "deploy: also export with chunk_size=512 (the head's prototype chunks as an "
                  "ONNX Loop, what 'auto' exported before it became one matmul for ONNX) and "
                  "time it under OpenVINO.")

HEAD_MACS = 56 * 56 * 256 + 28 * 28 * 512 + 14 * 14 * 1024  # factored head, per prototype
ANCHOR = "anchor: published network, torch.onnx dynamo, OpenVINO (static batch)"
ANCHOR_DYNAMIC = "anchor, as exported (dynamic batch)"


def _bf16_flags() -> list[str]:
    cpu = harness._cpu()
    return [f for f in cpu.get("flags", "").split() if f in ("amx_bf16", "avx512_bf16")]


def _anchor_module(tmodel, prototypes: np.ndarray):
    """The published network part of tests/torch_reference.py as one ``nn.Module``."""
    import torch
    import torch.nn.functional as F

    class Anchor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = tmodel
            self.register_buffer("kernels", torch.from_numpy(
                np.ascontiguousarray(prototypes, np.float32))[:, :, None, None])

        def forward(self, x):
            m = self.m
            f1 = m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
            f2 = m.layer2(f1)
            f3 = m.layer3(f2)
            f23 = torch.cat([f2, F.interpolate(f3, scale_factor=2, mode="nearest")], dim=1)
            emb = torch.cat([f1, F.interpolate(f23, scale_factor=2, mode="nearest")], dim=1)
            sim = F.conv2d(F.normalize(emb, dim=1), self.kernels)
            return 1 - torch.max(sim, dim=1)[0]

    return Anchor().eval()


def _export_anchor(module, path: Path) -> None:
    import torch

    x = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=18,
                          input_names=["x"], output_names=["patch_map"],
                          dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=1024)}},
                          external_data=False, verbose=False)


def _ov_compiled(path: Path, precision: str, batch: int | None, profile: bool = False):
    """``path`` compiled by OpenVINO at ``precision``; with ``batch`` its input reshaped to that
    static batch first (what load_exported does per batch size)."""
    ov = onnx_export.import_deploy("openvino", RuntimeError, "the deploy benchmark")
    core = ov.Core()
    model = core.read_model(str(path))
    if batch is not None:
        model.reshape({0: [batch, *model.inputs[0].get_partial_shape()[1:].to_shape()]})
    config = {"INFERENCE_PRECISION_HINT": precision, **({"PERF_COUNT": True} if profile else {})}
    return core.compile_model(model, "CPU", config)


def _ov_session(path: Path, precision: str, static: bool):
    """``fn(x) -> first output``: the dynamic-batch model as exported, or (``static``) one
    static-shape compile per batch size, as load_exported runs ours."""
    compiled = {}

    def run(x):
        b = x.shape[0] if static else None
        if b not in compiled:
            c = _ov_compiled(path, precision, b)
            compiled[b] = (c, c.create_infer_request())
        c, request = compiled[b]
        return np.array(request.infer({0: x})[c.output(0)])

    return run


def _trunk_flops(tmodel) -> float:
    """FLOPs per 224x224 image of the torchvision trunk to layer3 (torch's flop counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        harness.torch_trunk(tmodel, torch.zeros(1, 3, 224, 224))
    return float(counter.get_total_flops())


def _ov_peak(precision: str) -> float:
    """GFLOP/s of the same matmul as an OpenVINO model at ``precision``, median of 5."""
    ov = onnx_export.import_deploy("openvino", RuntimeError, "the deploy benchmark")
    from openvino import opset13 as ops

    a = ops.parameter([4096, 1792], np.float32)
    b = ops.constant(np.random.default_rng(0).standard_normal((1792, 4096), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    req = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((4096, 1792), dtype=np.float32)
    req.infer({0: x})
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        req.infer({0: x})
        ts.append(time.perf_counter() - t)
    return 2 * 4096 * 1792 * 4096 / sorted(ts)[2] / 1e9


def run() -> list[Table]:
    torch = harness.torch_threads()
    k = FLAGS.deploy_k
    sizes = sorted(set(map(int, FLAGS.deploy_batch_sizes)))
    bf16 = _bf16_flags()
    precisions = ["f32", "bf16"] if bf16 else ["f32"]
    tmodel, variables = harness.models()
    folded = backbone.fold_batchnorm(variables) if "batch_stats" in variables else variables
    protos = harness.prototypes(k)
    images = harness.images(max(sizes))
    images_nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    model = pipeline.Model(protos, Config(num_prototypes=k, arch=FLAGS.arch))

    trunk = _trunk_flops(tmodel)
    flops = {"ours": trunk + 2 * HEAD_MACS * k, "anchor": trunk + 2 * 56 * 56 * harness.C * k}
    paths = {}  # (name, precision, kind) -> fn(batch)
    scorer = pipeline.make_scorer(model, folded)
    paths[("protoad_jax make_scorer (JAX)", "f32", "ours")] = \
        lambda b: jax.block_until_ready(scorer(images[:b]))
    setup_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ours_dir = export.export_scorer(model, folded, Path(tmp) / "ours", format="onnx")
        setup_s["ours export"] = time.perf_counter() - t
        run_ort, _ = export.load_exported(ours_dir, runtime="onnxruntime")
        paths[("ours scorer.onnx, ONNX Runtime", "f32", "ours")] = lambda b: run_ort(images[:b])
        for p in precisions:
            t = time.perf_counter()
            run_ov, _ = export.load_exported(ours_dir, runtime="openvino", precision=p)
            setup_s[f"ours OpenVINO {p} load"] = time.perf_counter() - t
            paths[("ours scorer.onnx, OpenVINO", p, "ours")] = functools.partial(
                lambda r, b: r(images[:b]), run_ov)
        if FLAGS.deploy_chunked:
            t = time.perf_counter()
            loop_dir = export.export_scorer(model, folded, Path(tmp) / "chunked", format="onnx",
                                            chunk_size=512)
            setup_s["ours chunk_size=512 export"] = time.perf_counter() - t
            for p in precisions:
                run_ov, _ = export.load_exported(loop_dir, runtime="openvino", precision=p)
                paths[("ours scorer.onnx chunk_size=512 (Loop), OpenVINO", p, "ours")] = \
                    functools.partial(lambda r, b: r(images[:b]), run_ov)
        anchor_path = Path(tmp) / "anchor.onnx"
        anchor = _anchor_module(tmodel, protos)
        t = time.perf_counter()
        _export_anchor(anchor, anchor_path)
        setup_s["anchor torch.onnx export"] = time.perf_counter() - t
        for p in precisions:
            for static, name in ((True, ANCHOR), (False, ANCHOR_DYNAMIC)):
                run_a = _ov_session(anchor_path, p, static)
                paths[(name, p, "anchor")] = functools.partial(lambda r, b: r(images_nchw[:b]), run_a)
        # sanity: the anchor's f32 patch map against the PyTorch reference's
        ref = harness.torch_reference().reference_scores(tmodel, protos, torch.from_numpy(images_nchw[:1]))[0]
        got = paths[(ANCHOR, "f32", "anchor")](1)
        anchor_diff = float(np.abs(got - ref).max())
        maps_j = np.asarray(scorer(images[:1])[0])
        ours_diff = {p: float(np.abs(np.asarray(
            paths[("ours scorer.onnx, OpenVINO", p, "ours")](1)[0]) - maps_j).max())
            for p in precisions}
        keys = list(paths)
        for key in keys:  # warm-up at every batch size
            for b in sizes:
                paths[key](b)
        secs = {}
        for b in sizes:
            med = harness.medians(*[functools.partial(paths[key], b) for key in keys])
            for key, s in zip(keys, med):
                secs[(key, b)] = s
        profile = (_profile(ours_dir / onnx_export.ARTIFACT, anchor_path, precisions)
                   if FLAGS.deploy_profile else None)
    jax_peak = harness.matmul_gflops("float32")
    ov_peaks = {p: _ov_peak(p) for p in precisions}
    peaks = {"f32": max(jax_peak, ov_peaks["f32"]), **{p: ov_peaks[p] for p in precisions[1:]}}

    big = max(sizes)
    measure = [f"batch {b} latency ms" if b == 1 else f"batch {b} img/s" for b in sizes]
    table = Table(f"deploy: preprocessed batch -> maps, 224x224, K={k}, threads={FLAGS.threads}",
                  ["path", "precision", *measure, f"GFLOP/s (b={big})", "% of peak, same precision",
                   "vs anchor, same precision", "vs JAX f32"])
    jax_key = keys[0]
    anchor_of = {p: (ANCHOR, p, "anchor") for p in precisions}
    for key in keys:
        name, p, kind = key
        cells = [secs[(key, b)] * 1e3 if b == 1 else b / secs[(key, b)] for b in sizes]
        gflops = big * flops[kind] / secs[(key, big)] / 1e9
        def ratio(other, key=key):
            return " / ".join(f"{secs[(other, b)] / secs[(key, b)]:.2f}x" for b in sizes)

        vs_anchor = ratio(anchor_of[p]) if name.startswith("ours scorer.onnx") and name.endswith("OpenVINO") else None
        vs_jax = ratio(jax_key) if key != jax_key else None
        table.add(name, p, *cells, gflops, f"{100 * gflops / peaks[p]:.0f}%", vs_anchor, vs_jax)
    cpu = harness._cpu()
    table.notes += [
        (f"CPU: {cpu.get('model name', 'unknown')}; bfloat16 flags: {' '.join(bf16) or 'none'} "
         f"(bf16 rows {'run' if bf16 else 'skipped: no amx_bf16 / avx512_bf16'}); "
         f"{len(os.sched_getaffinity(0))} cores used."),
        (f"matmul peaks: [4096,1792]x[1792,4096] jitted in JAX, float32 (HIGHEST), "
         f"{jax_peak:.0f} GFLOP/s; the same matmul as an OpenVINO model: "
         + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in ov_peaks.items())
         + ". % of peak: f32 rows against the larger f32 figure, bf16 rows against OpenVINO's "
         "bf16 matmul."),
        (f"FLOPs per image: trunk to layer3 {trunk / 1e9:.1f} GFLOP (torch flop counter; "
         f"2 per multiply-add) + head: ours 2 x (3136 x 256 + 784 x 512 + 196 x 1024) x K "
         f"= {2 * HEAD_MACS * k / 1e9:.2f} GFLOP (factored: each layer's similarities on its own "
         f"grid before upsampling), anchor 2 x 3136 x 1792 x K = "
         f"{2 * 3136 * harness.C * k / 1e9:.2f} GFLOP; GFLOP/s = batch x FLOPs / median s."),
        ("ratios are speed-ups (other's time / this row's time) at batch "
         + " / ".join(map(str, sizes)) + "; > 1x: this row is faster. vs anchor only for our "
         "OpenVINO rows, at the same precision hint."),
        ("ours scorer.onnx: export_scorer(..., format='onnx') with its default chunk_size "
         f"'auto' (one matmul per stage up to {export.ONNX_UNCHUNKED_MAX} prototypes: no ONNX "
         "Loop); chunk_size=512: the head in prototype chunks, converted to an ONNX Loop."),
        ("OpenVINO: load_exported compiles our scorer.onnx once per batch size with that static "
         "batch (model.reshape; the symbolic batch keeps shape arithmetic and run-time "
         "broadcasts of the prototypes in the graph); the anchor row gets the same treatment, "
         "its dynamic-batch row runs the file as exported. vs anchor: against the static row."),
        ("ours: make_scorer / load_exported scorers give (maps [b,224,224], scores) with the "
         "bilinear upsampling and Gaussian blur in the graph, check_images included; BatchNorm "
         "folded into the convolutions (backbone.fold_batchnorm, as weights.load_backbone does). "
         "anchor: [b,56,56] patch map only (no upsampling, blur or score), NCHW input, "
         "BatchNorm as exported (OpenVINO fuses it)."),
        (f"same random weights, prototypes and images; medians of up to {FLAGS.repeats} calls "
         f"after warm-up, all paths alternating in each round (2 rounds once past "
         f"{FLAGS.budget_s:.0f} s); OpenVINO precision via INFERENCE_PRECISION_HINT, as "
         "load_exported sets it."),
        (f"checks at batch 1: anchor f32 patch map vs torch_reference max abs diff "
         f"{anchor_diff:.2g}; our OpenVINO maps vs make_scorer: "
         + ", ".join(f"{p} {v:.2g}" for p, v in ours_diff.items()) + "."),
        "setup s: " + ", ".join(f"{n} {v:.1f}" for n, v in setup_s.items()) + ".",
    ]
    tables = [table.print()]
    if FLAGS.deploy_profile:
        tables.append(profile.print())
    return tables


def _profile(ours: Path, anchor: Path, precisions: list[str]) -> Table:
    """OpenVINO's per-node times (PERF_COUNT), batch 1, static shapes, summed per node type and
    implementation: where ours and the anchor spend their time."""
    x = harness.images(1)
    inputs = {"ours": x, "anchor": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
    table = Table("deploy profile: OpenVINO per-node time at batch 1 (ms per call, PERF_COUNT)",
                  ["precision", "node type", "implementation", "ours ms", "anchor ms"])
    for p in precisions:
        per = {}
        for name, path in (("ours", ours), ("anchor", anchor)):
            compiled = _ov_compiled(path, p, 1, profile=True)
            request = compiled.create_infer_request()
            sums: dict[tuple[str, str], float] = {}
            for _ in range(3):
                request.infer({0: inputs[name]})
            rounds = max(FLAGS.repeats, 5)
            for _ in range(rounds):
                request.infer({0: inputs[name]})
                for node in request.profiling_info:
                    key = (node.node_type, node.exec_type)
                    sums[key] = sums.get(key, 0.0) + node.real_time.total_seconds() * 1e3 / rounds
            per[name] = sums
        keys = sorted(set(per["ours"]) | set(per["anchor"]),
                      key=lambda k: -max(per["ours"].get(k, 0), per["anchor"].get(k, 0)))
        for key in keys[:12]:
            table.add(p, *key, per["ours"].get(key, 0.0), per["anchor"].get(key, 0.0))
        table.add(p, "all nodes", "", sum(per["ours"].values()), sum(per["anchor"].values()))
    table.notes.append("sums of OpenVINO's profiling_info real_time, mean per call "
                       f"over {max(FLAGS.repeats, 5)} calls after 3 warm-up calls; the 12 largest "
                       "node types of either model, then the total.")
    return table
