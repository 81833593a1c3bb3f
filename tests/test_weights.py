"""Weights: torch-free .pth reader vs torch.load, the npz contract, download + convert end to end.

torch is the oracle: files are written by torch.save (both formats) and read back by torch.load.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from oracles import random_torchvision_model

from protoad_jax import backbone, weights
from protoad_jax.weights import CheckpointError, UnsafeCheckpointError, load_state_dict

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"zip": True, "legacy": False}
WRN50_PARAMS = 68_883_240  # torchvision wide_resnet50_2, all of it (stem .. fc)


def _save(obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _bits(x) -> np.ndarray:
    """Raw bits of a torch tensor or numpy array (bfloat16 has no numpy dtype of its own)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        x = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
        return x.numpy().copy(order="C")
    return x.view(np.int16) if x.dtype.name == "bfloat16" else x


def _assert_bitwise(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref), (sorted(ours), sorted(ref))
    for k, t in ref.items():
        a, b = _bits(ours[k]), _bits(t)
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, a.dtype, b.shape, b.dtype)
        assert a.tobytes() == b.tobytes(), f"{k}: not bitwise equal to torch.load"


def _torch_to_flax_oracle(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Independent transcription of torchvision -> Flax naming (OIHW -> HWIO, fc [o,i] -> [i,o])."""
    out = {}
    for k, t in sd.items():
        mod, leaf = k.rsplit(".", 1)
        mod = mod.replace(".", "/")
        v = t.numpy()
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and v.ndim == 4:
            out[f"params/{mod}/kernel"] = v.transpose(2, 3, 1, 0)
        elif leaf == "weight" and v.ndim == 2:
            out[f"params/{mod}/kernel"] = v.T
        else:
            name = {
                "weight": "params/{}/scale",
                "bias": "params/{}/bias",
                "running_mean": "batch_stats/{}/mean",
                "running_var": "batch_stats/{}/var",
            }[leaf]
            out[name.format(mod)] = v
    return out


def _flat(variables: dict) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return traverse_util.flatten_dict(variables, sep="/")


def _assert_variables_equal(variables: dict, sd: dict[str, torch.Tensor], stages) -> None:
    keep = {
        k: v
        for k, v in sd.items()
        if not k.startswith(("layer", "fc")) or k.split(".")[0] in stages
    }
    ref, got = _torch_to_flax_oracle(keep), _flat(variables)
    assert sorted(got) == sorted(ref), set(got) ^ set(ref)
    err = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
    print(f"  {len(ref)} arrays vs torch state dict: max abs error {err} (tolerance 0: a copy)")
    assert err == 0.0, f"converted weights differ from the torch state dict by {err}, expected 0"


@pytest.fixture(scope="module")
def r50_partial(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random resnet50 state dict cut to stem + layer1..3 (34 MB, enough for a layer3 model)."""
    sd = {
        k: v
        for k, v in random_torchvision_model("resnet50", seed=3).state_dict().items()
        if not k.startswith(("layer4", "fc"))
    }
    return _save(sd, tmp_path_factory.mktemp("r50") / "resnet50_random.pth", "zip"), sd


def _small_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 6, generator=g)
    hidden = torch.randn(
        50, generator=g
    )  # only a slice of it is saved: the whole storage goes along
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, 2, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.randint(-(10**12), 10**12, (4,), generator=g),
        "scalar_i64": torch.tensor(7),
        "transposed": torch.randn(4, 6, generator=g).t(),
        "base": base,
        "shared_view": base[3:7, 1:4],  # same storage as "base", offset 19, strides (6, 1)
        "slice_alone": hidden[10:17],
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        "empty": torch.zeros(0, 3),
        "mask": torch.randn(6, generator=g) > 0,
    }


# ---------------------------------------------------------------------------------------- reader
@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_bitwise_equals_torch_load(tmp_path, fmt):
    path = _save(_small_state_dict(), tmp_path / "small.pth", fmt)
    ref = torch.load(path, weights_only=True)
    assert ref["shared_view"].storage_offset() == 19 and ref["slice_alone"].storage_offset() == 10
    assert not ref["transposed"].is_contiguous()
    ours = load_state_dict(path)
    _assert_bitwise(ours, ref)
    print(
        f"  {fmt}: {len(ours)} tensors bitwise equal to torch.load "
        f"({sorted({str(v.dtype) for v in ours.values()})})"
    )
    assert ours["bf16"].dtype.name == "bfloat16" and ours["f16"].dtype == np.float16


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_unwraps_checkpoint_dict(tmp_path, fmt):
    sd = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    path = _save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth", fmt)
    _assert_bitwise(load_state_dict(path), sd)


def test_reader_full_wide_resnet50_2_and_parameter_count(tmp_path):
    sd = random_torchvision_model("wide_resnet50_2", seed=1).state_dict()
    path = _save(sd, tmp_path / "wrn50.pth", "zip")
    _assert_bitwise(load_state_dict(path), sd)

    res = weights.convert(path, tmp_path / "out" / "wrn50.npz", stages=weights.STAGE_ORDER)
    abstract = backbone.abstract_variables("wide_resnet50_2", last_stage="fc")
    print(
        f"  params: converted {res.num_params:,}, abstract_variables(fc) "
        f"{weights.count_params(abstract):,}"
    )
    assert res.num_params == weights.count_params(abstract) == WRN50_PARAMS
    variables = weights.load_variables(res.output, "wide_resnet50_2", last_stage="fc")
    _assert_variables_equal(variables, sd, weights.STAGE_ORDER)


class _Ref(NamedTuple):
    """Tensor in a hand-written legacy file: storage ``root`` (or a view), offset, size, stride."""

    root: str
    view: tuple | None
    offset: int
    size: tuple
    stride: tuple


class _StorageId(NamedTuple):
    root: str
    view: tuple | None


def _hand_written_legacy(
    path: Path, entries: dict[str, _Ref], roots: dict[str, np.ndarray]
) -> Path:
    """torch's legacy layout written by hand: pre-1.0 storage views and bad strides can be made."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageId):
                return (
                    "storage",
                    torch.FloatStorage,
                    obj.root,
                    "cpu",
                    roots[obj.root].size,
                    obj.view,
                )
            return None

        def reducer_override(self, obj):
            if isinstance(obj, _Ref):
                return torch._utils._rebuild_tensor_v2, (
                    _StorageId(obj.root, obj.view),
                    obj.offset,
                    obj.size,
                    obj.stride,
                    False,
                    collections.OrderedDict(),
                )
            return NotImplemented

    with open(path, "wb") as f:
        for header in (
            0x1950A86A20F9469CFC6C,
            1001,
            {"protocol_version": 1001, "little_endian": True},
        ):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(collections.OrderedDict(entries))
        pickle.dump(sorted(roots), f, protocol=2)
        f.writelines(
            struct.pack("<q", roots[k].size) + roots[k].astype("<f4").tobytes()
            for k in sorted(roots)
        )
    return path


def test_reader_legacy_storage_views_match_torch_load(tmp_path):
    root = np.random.default_rng(0).standard_normal(24).astype(np.float32)
    entries = {
        "plain": _Ref("0", None, 1, (2, 3), (1, 4)),
        "view": _Ref("0", ("v1", 5, 12), 2, (3, 2), (2, 1)),
    }  # torch < 1.0 storage views
    path = _hand_written_legacy(tmp_path / "views.pth", entries, {"0": root})
    ref = torch.load(path, weights_only=False)
    assert ref["view"].storage_offset() == 2 and float(ref["view"][0, 0]) == root[7]
    _assert_bitwise(load_state_dict(path), ref)


@pytest.mark.parametrize(
    "ref,why",
    [
        (_Ref("0", None, 0, (1000,), (1,)), "reads element 999"),
        (_Ref("0", None, 4, (3, 3), (4, 1)), "reads element 14"),
        (_Ref("0", None, 0, (3,), (-1,)), "negative"),
        (_Ref("0", ("v", 10, 5), 0, (3,), (1,)), "out of range"),
    ],
)
def test_reader_refuses_out_of_bounds_tensors(tmp_path, ref, why):
    """A tensor reaching past its storage is refused (as_strided would read foreign memory)."""
    path = _hand_written_legacy(
        tmp_path / "oob.pth", {"w": ref}, {"0": np.arange(12, dtype=np.float32)}
    )
    with pytest.raises(CheckpointError, match=why):
        load_state_dict(path)


# -------------------------------------------------------------------------------- unsafe pickles
class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpensFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "payload,global_name", [(_RunsShell, f"{os.system.__module__}.system"), (_OpensFile, "io.open")]
)
def test_refuses_globals_outside_allow_list(tmp_path, fmt, payload, global_name):
    marker = tmp_path / "MARKER"
    path = _save({"w": torch.randn(3), "evil": payload(marker)}, tmp_path / "evil.pth", fmt)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_state_dict(path)
    print(f"  {fmt}: {e.value}")
    assert global_name in str(e.value) and str(path) in str(e.value)
    assert not marker.exists(), "the payload ran"
    out = tmp_path / "out"
    with pytest.raises(UnsafeCheckpointError):
        weights.convert(path, out / "x.npz")
    assert not marker.exists() and (not out.exists() or not any(out.iterdir()))
    if payload is _RunsShell and fmt == "zip":  # the oracle: a general unpickler does run it
        torch.load(path, weights_only=False)
        assert marker.exists()


# ------------------------------------------------------------------------------ failure modes
def _corrupt(src: Path, dst: Path, sd: dict) -> None:
    data = bytearray(src.read_bytes())
    needle = sd["layer1.0.conv1.weight"].numpy().tobytes()[:64]
    at = data.find(needle)
    assert at > 0
    data[at : at + 4096] = os.urandom(4096)
    dst.write_bytes(bytes(data))


def _truncate(src: Path, dst: Path, sd: dict) -> None:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


@pytest.mark.parametrize(
    "case",
    [
        "corrupt_zip",
        "truncated_zip",
        "truncated_legacy",
        "wrong_hash",
        "wrong_arch",
        "not_a_checkpoint",
    ],
)
def test_failures_are_clear_and_leave_nothing(tmp_path, r50_partial, case):
    src, sd = r50_partial
    path, kwargs, arch = tmp_path / "in.pth", {}, "resnet50"
    if case == "corrupt_zip":
        _corrupt(src, path, sd)
        expect = "corrupt"
    elif case == "truncated_zip":
        _truncate(src, path, sd)
        expect = "truncated"
    elif case == "truncated_legacy":
        legacy = _save(sd, tmp_path / "legacy.pth", "legacy")
        _truncate(legacy, path, sd)
        expect = "truncated"
    elif case == "wrong_hash":
        path, kwargs, expect = src, {"sha256_prefix": "deadbeef"}, "sha256 mismatch"
    elif case == "wrong_arch":
        path, arch, expect = (
            src,
            "wide_resnet50_2",
            "looks like resnet50; convert it as arch resnet50",
        )
    else:
        path.write_bytes(os.urandom(1000))
        expect = "not a PyTorch checkpoint"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError) as e:
        weights.convert(path, out / "w.npz", arch=arch, **kwargs)
    msg = str(e.value)
    print(f"  {case}: {type(e.value).__name__}: {msg.splitlines()[0][:200]}")
    assert expect in msg and str(path) in msg, msg
    assert not any(out.iterdir()), list(out.iterdir())


# ---------------------------------------------------------------------------------- download
@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback HTTP server over a fresh folder: yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join()


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_weights.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        # This checkout's protoad_jax, not whichever copy is pip-installed.
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])),
        check=False,
    )


def test_download_convert_load_end_to_end(tmp_path, server, r50_partial):
    root, base = server
    src, sd = r50_partial
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    name = f"resnet50_random-{digest[:8]}.pth"  # torch.hub naming: the prefix is checked
    (root / name).write_bytes(src.read_bytes())
    url, out = f"{base}/{name}", tmp_path / "out" / "r50.npz"
    proc = _run_script(
        f"--source={url}", f"--output={out}", "--arch=resnet50", f"--cache_dir={tmp_path / 'cache'}"
    )
    print(proc.stdout + proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr
    assert f"source sha256: {digest}" in proc.stdout and "parameters" in proc.stdout
    assert (tmp_path / "cache" / name).read_bytes() == src.read_bytes()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["source"] == url and meta["sha256"] == digest and meta["arch"] == "resnet50"
    assert meta["stages"] == ["layer1", "layer2", "layer3"] and meta["created"].endswith("+00:00")
    variables = weights.load_variables(out, "resnet50", "layer3")
    _assert_variables_equal(variables, sd, weights.DEFAULT_STAGES)


def test_registered_download_hash_mismatch_and_ensure_weights(
    tmp_path, server, r50_partial, monkeypatch
):
    root, base = server
    src, sd = r50_partial
    (root / "r50.pth").write_bytes(src.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setitem(
        weights.REGISTRY, "resnet50", weights.WeightsFile(f"{base}/r50.pth", "deadbeef")
    )
    with pytest.raises(weights.ChecksumError) as e:
        weights.ensure_weights("resnet50", cache=cache, show_progress=False)
    print(f"  {e.value}")
    assert "deadbeef" in str(e.value) and f"{base}/r50.pth" in str(e.value)
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())

    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setitem(
        weights.REGISTRY, "resnet50", weights.WeightsFile(f"{base}/r50.pth", digest[:8])
    )
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the fallback progress bar (tqdm is optional)
    path = weights.ensure_weights("resnet50", cache=cache, show_progress=True)
    assert path == cache / "resnet50_imagenet1k_v1.npz"
    _assert_variables_equal(weights.load_variables(path, "resnet50"), sd, weights.DEFAULT_STAGES)


def test_offline_error_says_how_to_download_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/wide_resnet50_2-95faca4d.pth"
    with pytest.raises(weights.DownloadError) as e:
        weights.convert(url, tmp_path / "out" / "w.npz", cache=tmp_path / "cache")
    msg = str(e.value)
    print(f"  {msg}")
    assert "Download it by hand" in msg and url in msg and str(e.value.dest) in msg
    assert "--" not in msg, "library errors do not name command-line flags"
    assert not any((tmp_path / "cache").iterdir())
    proc = _run_script(
        f"--source={url}", f"--output={tmp_path / 'w.npz'}", f"--cache_dir={tmp_path / 'cache'}"
    )
    print(f"  script: rc={proc.returncode} stderr={proc.stderr.strip()[:300]}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--source=/path/to/wide_resnet50_2-95faca4d.pth" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------- npz contract
def _random_variables(arch: str, last_stage: str) -> dict:
    rng = np.random.default_rng(0)
    abstract = backbone.abstract_variables(arch, last_stage)
    import jax

    return jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract
    )


def test_save_load_variables_round_trip(tmp_path):
    variables = _random_variables("resnet50", "layer1")
    path = weights.save_variables(tmp_path / "v.npz", variables)
    got = weights.load_variables(path, "resnet50", "layer1")
    a, b = _flat(got), _flat(variables)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == np.float32 and np.array_equal(a[k], b[k]) for k in b)


def test_load_variables_lists_every_problem_in_one_error(tmp_path):
    flat = _flat(_random_variables("resnet50", "layer1"))
    del flat["params/layer1/0/conv2/kernel"]
    flat["params/layer1/0/conv9/kernel"] = np.ones((1, 1, 2, 2), np.float32)
    flat["batch_stats/bn1/mean"] = np.zeros((65,), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **flat)
    with pytest.raises(ValueError) as e:
        weights.load_variables(path, "resnet50", "layer1")
    msg = str(e.value)
    print(msg)
    assert "missing: params/layer1/0/conv2/kernel (expected shape (3, 3, 64, 64))" in msg
    assert "unexpected: params/layer1/0/conv9/kernel" in msg
    assert "misshapen: batch_stats/bn1/mean: expected (64,), found (65,)" in msg
    assert (
        str(path) in msg and "protoad convert-weights" in msg and "as arch resnet50" in msg
        and "3 problem(s)" in msg
    )
    with pytest.raises(weights.WeightsFileError, match="convert_weights.py"):
        weights.load_variables(tmp_path / "nope.npz")


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    assert weights.cache_dir() in (REPO / "weights", Path.home() / ".cache" / "protoad_jax")
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "env"))
    assert weights.cache_dir() == tmp_path / "env"
    assert weights.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert (
        weights.default_weights_path("wide_resnet50_2")
        == tmp_path / "env" / "wide_resnet50_2_imagenet1k_v1.npz"
    )
