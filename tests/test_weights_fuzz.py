"""Seeded mutation fuzz of the torch-free ``.pth`` reader (``weights.load_state_dict``).

Two small state dicts (float32/16, bfloat16, float64, int64, bool, a parameter, an empty tensor, a
transposed and an offset view sharing one storage, one dict wrapped as a checkpoint) are written
by ``torch.save`` in both formats (zip and legacy) and mutated: bit flips, byte sets, "interesting"
integers (0, -1, 2**31, 2**63 ...) over length and count fields, truncation, zeroed, spliced,
duplicated and removed runs, one to three per mutant, positions biased to the pickles and the zip
records. Every mutant must either

- load, and then equal, bit for bit, what ``torch.load(weights_only=True)`` returns for the same
  bytes (the oracle) or, where torch refuses them, be a dict of numpy arrays none of which holds
  more than twice the file's bytes; or
- fail with ``CheckpointError`` (``OSError`` only for I/O),

each within ``SECONDS_PER_MUTANT``, with a traced allocation peak within ``MEMORY_PER_MUTANT``,
and with nothing on stderr (CPython's "SystemError: deallocated bytearray object has exported
buffers" is printed, not raised) and no unraisable exception.

Run: ``python -m pytest tests/test_weights_fuzz.py -q -s`` prints the outcome classes, e.g.
``N mutants: a loaded (b equal to torch.load, c refused by torch), d CheckpointError, 0 other``.

Hand-made hostile pickles (memo indices, lengths, opcodes, self-containing and exponentially
shared containers, BUILD on the admitted globals) and expanded tensors complete it: what random
mutation of small files rarely reaches.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import pickletools
import re
import resource
import struct
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from protoad_jax.weights import CheckpointError, load_state_dict, torch_reader

SEED = 20240610
MUTANTS_PER_FILE = 800  # x 4 seed files (2 state dicts x 2 formats)
SECONDS_PER_MUTANT = 2.0
# Traced allocation peak per mutant: a few times the file plus a fixed allowance for the zip
# directory, the unpickled objects and the error message (a healthy load of these files peaks
# far below it; the failures this guards against asked for gigabytes).
MEMORY_PER_MUTANT = lambda size: 4 * size + (1 << 18)
INTERESTING = (
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0xFFFF,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**40,
    2**63 - 1,
)


def _state_dicts() -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    plain = {
        "f32": torch.randn(2, 3, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "i64": torch.randint(-(10**12), 10**12, (3,), generator=g),
        "base": base,
        "view": base[1:3, 1:].t(),  # storage offset 5, strides (1, 4): non-contiguous
    }
    wrapped = {
        "state_dict": collections.OrderedDict(
            f64=torch.randn(3, generator=g).double(),
            mask=torch.randn(4, generator=g) > 0,
            param=torch.nn.Parameter(torch.randn(2, generator=g)),
            scalar=torch.tensor(7),
            empty=torch.zeros(0, 3),
        ),
        "epoch": 3,
    }
    return {"plain": plain, "wrapped": wrapped}


def _skip_pickle(f: io.BytesIO) -> None:
    for _ in pickletools.genops(f):  # reads, executes nothing
        pass


_ITEMSIZE = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "DoubleStorage": 8}
_ITEMSIZE |= {"LongStorage": 8, "BoolStorage": 1}


def _legacy_canonical(data: bytes) -> bytes:
    """The legacy file with storage keys 0, 1, ... in order of first use, storages in that order.

    torch names legacy storages by memory address and writes them in sorted key order, so the
    bytes would differ from run to run; renamed, the seed files (and the mutants) are seeded.
    """
    f = io.BytesIO(data)
    for _ in range(3):
        _skip_pickle(f)
    types: dict[str, str] = {}

    class Peek(pickle.Unpickler):  # executes nothing: every global becomes an inert stand-in
        def find_class(self, module, name):
            if name == "OrderedDict":
                return collections.OrderedDict
            return name if name.endswith("Storage") else lambda *args: None

        def persistent_load(self, pid):
            types.setdefault(pid[2], pid[1])

    head, pickled = data[: f.tell()], f.tell()
    Peek(f).load()
    pickled = data[pickled : f.tell()]
    keys = pickle.load(f)
    blocks, at = {}, f.tell()
    for key in keys:
        n = 8 + int.from_bytes(data[at : at + 8], "little") * _ITEMSIZE[types[key]]
        blocks[key], at = data[at : at + n], at + n
    assert at == len(data) and sorted(types) == sorted(keys)
    new = {key: str(i) for i, key in enumerate(types)}
    for key, name in new.items():
        pickled = pickled.replace(_binunicode(key), _binunicode(name))
    order = sorted(new, key=new.get)
    return b"".join(
        [head, pickled, pickle.dumps([new[k] for k in order], protocol=2)]
        + [blocks[k] for k in order]
    )


def _binunicode(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s)) + s.encode()


def _hot_ranges(data: bytes, fmt: str) -> list[tuple[int, int]]:
    """Byte ranges worth mutating more often: the pickles, the headers, the zip directory."""
    if fmt == "legacy":
        f = io.BytesIO(data)
        for _ in range(5):
            _skip_pickle(f)
        return [(0, f.tell()), (f.tell(), f.tell() + 8)]
    zf = zipfile.ZipFile(io.BytesIO(data))
    ranges = [(zf.start_dir, len(data))]
    for info in zf.infolist():
        at = info.header_offset
        head = 30 + len(info.filename) + int.from_bytes(data[at + 28 : at + 30], "little")
        ranges.append((at, at + head))
        if info.filename.endswith("data.pkl"):
            ranges.append((at + head, at + head + info.file_size))
    return ranges


def _seed_files() -> list[tuple[str, bytes]]:
    out = []
    for name, sd in _state_dicts().items():
        for fmt in ("zip", "legacy"):
            buf = io.BytesIO()
            torch.save(sd, buf, _use_new_zipfile_serialization=fmt == "zip")
            data = buf.getvalue()
            if fmt == "legacy":
                data = _legacy_canonical(data)
            out.append((f"{name}.{fmt}", data))
    return out


def _mutate(
    rng: np.random.Generator, data: bytes, hot: list[tuple[int, int]], donor: bytes
) -> tuple[bytes, list[str]]:
    b, done = bytearray(data), []

    def pos() -> int:
        if rng.random() < 0.7:
            lo, hi = hot[rng.integers(len(hot))]
            return int(rng.integers(lo, max(lo + 1, min(hi, len(b)))))
        return int(rng.integers(len(b)))

    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        if len(b) < 2:
            break
        kind, at, n = rng.integers(8), min(pos(), len(b) - 1), int(rng.integers(1, 65))
        if kind == 0:
            for _ in range(rng.integers(1, 5)):
                i = min(pos(), len(b) - 1)
                b[i] ^= 1 << int(rng.integers(8))
            done.append(f"flip@{at}")
        elif kind == 1:
            b[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.integers(256)]))
            done.append(f"set@{at}={b[at]}")
        elif kind == 2:
            width = int(rng.choice([1, 2, 4, 8]))
            v = int(rng.choice(INTERESTING)) & ((1 << 8 * width) - 1)
            if rng.random() < 0.2:
                v = (1 << 8 * width) - 1 - v  # and their negatives
            b[at : at + width] = v.to_bytes(width, "little")
            done.append(f"int{width}@{at}={v}")
        elif kind == 3:
            b = b[: int(rng.integers(len(b)))]
            done.append(f"truncate@{len(b)}")
        elif kind == 4:
            b[at : at + n] = bytes(n)
            done.append(f"zero@{at}+{n}")
        elif kind == 5:
            src = donor if rng.random() < 0.3 else bytes(b)
            s = int(rng.integers(len(src)))
            b[at : at + n] = src[s : s + n]
            done.append(f"splice@{at}<-{s}+{n}")
        elif kind == 6:
            s = int(rng.integers(len(b)))
            b[at:at] = b[s : s + n]
            done.append(f"dup@{at}<-{s}+{n}")
        else:
            del b[at : at + n]
            done.append(f"remove@{at}+{n}")
    return bytes(b), done


def _bits(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        x = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
        return x.numpy().copy(order="C")
    return x.view(np.int16) if x.dtype.name == "bfloat16" else x


def _torch_oracle(path) -> dict | None:
    """What torch.load(weights_only=True) makes of the bytes, unwrapped like ours; None: refused."""
    try:
        ref = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 -- the oracle's refusal, whatever its form, is only counted
        return None
    if isinstance(ref, dict) and not any(isinstance(v, torch.Tensor) for v in ref.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(ref.get(wrapper), dict):
                return ref[wrapper]
    return ref


def _check_loaded(ours: dict, data: bytes, path) -> bool:
    """Ours loaded: equal to torch.load where torch accepts the bytes (True), else sane (False)."""
    assert isinstance(ours, dict) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in ours.items()
    )
    for k, v in ours.items():  # a view is copied only while the copies stay within 2x the file
        assert v.nbytes <= 2 * len(data), f"{k}: {v.shape} {v.dtype} from a {len(data)}-byte file"
    ref = _torch_oracle(path)
    if ref is None:
        return False
    assert isinstance(ref, dict) and sorted(ref) == sorted(ours), (sorted(ref), sorted(ours))
    for k, t in ref.items():
        a, r = _bits(ours[k]), _bits(t)
        assert (a.shape, a.dtype) == (r.shape, r.dtype), (k, a.shape, a.dtype, r.shape, r.dtype)
        assert a.tobytes() == r.tobytes(), f"{k}: not bitwise equal to torch.load"
    return True


@contextlib.contextmanager
def _address_space_cap(extra: int):
    """A safety net, not the check: an allocation of gigabytes fails instead of paging."""
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _load(path) -> tuple[str, str, dict | None, float, int]:
    """Ours on one file: (outcome class, message, state dict, CPU seconds, traced peak bytes)."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.process_time()  # CPU time: other engineers' jobs on the machine do not count
    ours, outcome, msg = None, "loaded", ""
    try:
        ours = load_state_dict(path)
    except CheckpointError as e:
        outcome, msg = type(e).__name__, str(e)
    except OSError as e:
        outcome, msg = "OSError", str(e)
    except Exception as e:  # noqa: BLE001 -- what the test is for: counted, and it fails
        outcome, msg = f"other {type(e).__name__}", str(e)
    seconds = time.process_time() - t0
    return outcome, msg, ours, seconds, tracemalloc.get_traced_memory()[1] - before


def test_reader_survives_seeded_mutations(tmp_path, capfd, monkeypatch):
    seeds, originals = _seed_files(), _state_dicts()
    for name, data in seeds:  # the seed files hold the state dicts: torch.load and ours agree
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        sd = originals[name.split(".")[0]]
        sd = sd.get("state_dict", sd)
        assert _check_loaded(load_state_dict(path), data, path), name
        ref = _torch_oracle(path)
        assert sorted(ref) == sorted(sd)
        assert all(_bits(ref[k]).tobytes() == _bits(sd[k]).tobytes() for k in sd), name

    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    counts: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    loaded, slowest, biggest = [], (0.0, ""), (0, "")
    path = tmp_path / "mutant.pth"
    path.touch()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    tracemalloc.start()
    try:
        with _address_space_cap(4 << 30):
            for fi, (name, data) in enumerate(seeds):
                hot, donor = _hot_ranges(data, name.split(".")[1]), seeds[(fi + 1) % len(seeds)][1]
                for i in range(MUTANTS_PER_FILE):
                    mutant, how = _mutate(np.random.default_rng([SEED, fi, i]), data, hot, donor)
                    with open(path, "r+b") as f:  # "wb" truncates: ~5 ms a file on ext4
                        f.write(mutant)
                        f.truncate()
                    tag = f"{name}#{i} {' '.join(how)} ({len(mutant)} bytes)"
                    outcome, msg, ours, seconds, peak = _load(path)
                    slowest, biggest = max(slowest, (seconds, tag)), max(biggest, (peak, tag))
                    if seconds > SECONDS_PER_MUTANT:
                        examples["slow"].append(f"{seconds:.2f} s: {tag}")
                    if peak > MEMORY_PER_MUTANT(len(mutant)):
                        examples["memory"].append(f"{peak} bytes: {tag}")
                    if ours is not None:
                        loaded.append((tag, mutant, ours))
                        continue
                    counts[outcome] += 1
                    if outcome.startswith(("other", "OSError")):
                        examples[outcome].append(f"{msg[:200]}: {tag}")
                    elif str(path) not in msg:
                        examples["message without the file name"].append(f"{msg}: {tag}")
    finally:
        tracemalloc.stop()
    for tag, mutant, ours in loaded:  # the oracle, untraced
        path.write_bytes(mutant)
        try:
            counts["loaded" if _check_loaded(ours, mutant, path) else "loaded*"] += 1
        except AssertionError as e:
            counts["loaded, differs from torch.load"] += 1
            examples["loaded, differs from torch.load"].append(f"{str(e)[:300]}: {tag}")
    elapsed, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    err = capfd.readouterr().err

    n = sum(counts.values())
    other = sum(c for k, c in counts.items() if k.startswith("other"))
    print(
        f"\n  {n} mutants: {len(loaded)} loaded ({counts['loaded']} equal to torch.load, "
        f"{counts['loaded*']} refused by torch), {counts['CheckpointError']} CheckpointError, "
        f"{counts['UnsafeCheckpointError']} UnsafeCheckpointError, {counts['OSError']} OSError, "
        f"{other} other, {counts['loaded, differs from torch.load']} differing from torch.load; "
        f"{elapsed:.1f} s ({cpu:.1f} s CPU)"
    )
    print(f"  all classes: {dict(sorted(counts.items()))}")
    print(f"  slowest mutant {slowest[0] * 1e3:.1f} ms CPU ({slowest[1]})")
    print(f"  largest traced allocation peak {biggest[0]} bytes ({biggest[1]})")
    for kind, lines in examples.items():
        print(f"  {kind}: {len(lines)}\n    " + "\n    ".join(lines[:4]))
    sys_errors = [line for line in err.splitlines() if "SystemError" in line]
    print(
        f"  stderr SystemError lines: {len(sys_errors)}, unraisable exceptions: {len(unraisable)}"
    )

    assert n == len(seeds) * MUTANTS_PER_FILE
    assert other == counts["OSError"] == 0, dict(counts)  # OSError: only for I/O, none here
    assert not examples["loaded, differs from torch.load"]
    assert not examples["slow"], f"mutants over {SECONDS_PER_MUTANT} s: {examples['slow'][:4]}"
    assert not examples["memory"], examples["memory"][:4]
    missing_name = examples["message without the file name"]
    assert not missing_name, missing_name[:4]
    assert not sys_errors and not unraisable, (sys_errors[:4], unraisable[:4])
    assert counts["loaded"] > 0 and counts["CheckpointError"] > 0  # the fuzz reaches both ends


# ------------------------------------------------------------------------- hand-made pickles
def _legacy_file(pickled: bytes) -> bytes:
    """A legacy .pth whose state-dict pickle is ``pickled`` (no storages)."""
    header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
    return b"".join(pickle.dumps(x, protocol=2) for x in header) + pickled + b"\x80\x02]."


def _shared_lists(levels: int) -> bytes:
    """{'a': L[levels]}, L[i] = [L[i-1], L[i-1]]: levels + 1 lists, 2**levels paths."""
    out = b"\x80\x02}q\x00X\x01\x00\x00\x00a]q\x010"  # "0": POP, the list stays memoised
    for i in range(1, levels + 1):
        out += b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1]) + b"0"
    return out + b"h" + bytes([levels + 1]) + b"s."


_SET_DEFAULTS = (  # BUILD (None, {"__defaults__": (1, 2, 3)}) on an admitted function
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__"
    b"(K\x01K\x02K\x03ts\x86b}."
)


@pytest.mark.parametrize(
    "pickled,why",
    [
        (b"\x80\x02}r\xff\xff\xff\x7f.", "memo entry 2147483647"),  # a 16 GiB memo
        (b"\x80\x02X\xff\xff\xff\x7f" + b"a" * 16 + b".", "needs 2147483652 bytes"),
        (b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".", "opcode b'\\x96'"),  # bytearray
        (b"\x80\x02I12\n.", "opcode b'I'"),  # protocol 0
        (b"\x80\x02\x82\x01.", "opcode b'\\x82'"),  # copyreg extension registry
        (b"\x80\x02c__builtin__\neval\n.", "refusing to unpickle global __builtin__.eval"),
        (_SET_DEFAULTS, "pickle state set on _rebuild_tensor_v2"),
        (b"\x80\x02}q\x00X\x01\x00\x00\x00a]q\x01h\x01as.", "containing themselves"),
        (_shared_lists(30), "not name -> tensor"),  # 2**30 paths: each list is visited once
        (_shared_lists(40), "nested more than 32 deep"),
    ],
    ids=[
        "memo",
        "length",
        "bytearray8",
        "text_opcode",
        "ext1",
        "global",
        "build",
        "cycle",
        "shared",
        "deep",
    ],
)
def test_reader_refuses_hostile_pickles(tmp_path, pickled, why):
    path = tmp_path / "hostile.pth"
    path.write_bytes(_legacy_file(pickled))
    defaults = torch_reader._rebuild_tensor_v2.__defaults__
    tracemalloc.start()
    t0 = time.process_time()
    try:
        with pytest.raises(CheckpointError, match=re.escape(why)) as e:
            load_state_dict(path)
    finally:
        seconds, peak = time.process_time() - t0, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"  {seconds * 1e3:.1f} ms, peak {peak} bytes: {e.value}")
    assert str(path) in str(e.value)
    assert seconds < SECONDS_PER_MUTANT and peak < MEMORY_PER_MUTANT(path.stat().st_size)
    assert torch_reader._rebuild_tensor_v2.__defaults__ == defaults  # the file changed nothing


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_expanded_tensors_within_the_file_budget(tmp_path, fmt):
    """A self-overlapping (expand()ed) tensor is copied while the copies stay within 2x the file."""
    g = torch.Generator().manual_seed(1)
    sd = {"e": torch.randn(1, 3, generator=g).expand(50, 3), "w": torch.randn(500, generator=g)}
    path = tmp_path / "small.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=fmt == "zip")
    ref = torch.load(path, weights_only=True)
    assert ref["e"].stride() == (0, 1)
    assert _check_loaded(load_state_dict(path), path.read_bytes(), path)

    torch.save(
        {"e": torch.randn(1).expand(10**6)}, path, _use_new_zipfile_serialization=fmt == "zip"
    )
    with pytest.raises(CheckpointError, match="expand") as e:
        load_state_dict(path)
    print(f"  {fmt}, 4 MB from {path.stat().st_size} bytes: {e.value}")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reader_reads_pickle_protocols(tmp_path, fmt, protocol):
    """torch.save(pickle_protocol=...) 2 to 5 (FRAME, MEMOIZE, STACK_GLOBAL ...) all read."""
    sd = _state_dicts()["plain"]
    path = tmp_path / "p.pth"
    torch.save(sd, path, pickle_protocol=protocol, _use_new_zipfile_serialization=fmt == "zip")
    ours = load_state_dict(path)
    assert sorted(ours) == sorted(sd)
    for k, t in sd.items():  # the oracle: the tensors saved (torch.load refuses protocol 4 and 5)
        a, r = _bits(ours[k]), _bits(t)
        assert (a.shape, a.dtype) == (r.shape, r.dtype) and a.tobytes() == r.tobytes(), k


def test_reader_refuses_storage_marked_as_directory(tmp_path):
    """torch's zip reader skips a record whose DOS attributes say directory and returns
    uninitialised memory for its tensor (found by this fuzz, seed 1); ours refuses the record."""
    data = bytearray(dict(_seed_files())["plain.zip"])
    start_dir = zipfile.ZipFile(io.BytesIO(bytes(data))).start_dir
    entry = data.index(b"archive/data/0", start_dir) - 46  # its central directory entry
    assert data[entry : entry + 4] == b"PK\x01\x02"
    data[entry + 38] |= 0x10  # external attributes, low byte: the DOS directory bit
    path = tmp_path / "dir.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="archive/data/0 is marked as a directory") as e:
        load_state_dict(path)
    print(f"  {e.value}")
