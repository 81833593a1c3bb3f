"""Torch-free reader of torchvision checkpoints (``.pth``): tensors out, nothing executed.

``load_state_dict`` reads both formats ``torch.save`` has written -- the zip archive (torch >= 1.6)
and the older "legacy" stream of pickles (torchvision's 2019 ImageNet files) -- with a restricted
unpickler: only the handful of globals a tensor state dict needs are admitted, and even those are
replaced by local stand-ins that record (storage, offset, shape, strides). Nothing in the file is
ever executed; any other global is refused with an error that names it.

The file is untrusted input. Each pickle is scanned before it is unpickled (data opcodes only,
every length inside the file, memo indices bounded by the pickle's size); zip records, storage
sizes, shapes, strides and offsets are checked against the file's size before anything is
allocated. A malformed file ends in ``CheckpointError`` (``OSError`` only for I/O), and no file
makes the reader allocate much more than its own size.
"""

from __future__ import annotations

import collections
import errno
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from protoad_jax.errors import InputError

# Legacy-format header, from torch/serialization.py.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Bounds on what a file may describe. Real state dicts stay far inside them.
_MAX_NDIM = 32  # numpy 1.x's limit
_MAX_COUNT = 1 << 62  # a size, stride, offset or element count
_MAX_DEPTH = 32  # dicts / lists / tuples nested around the tensors
_MAX_LINE = 1 << 12  # a GLOBAL opcode's module or name line
_MAX_KEY = 256  # a storage key's length
_COPY_FACTOR = 2  # views (not a whole storage) are copied: at most 2x the file's size in all
_MAX_INFLATE = 1032  # DEFLATE's largest expansion ratio (torch writes storages uncompressed)

# Storage classes as torch pickles them (``torch.FloatStorage`` ...) -> their element dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
# ``torch.<dtype>`` globals, which ``_rebuild_tensor_v3`` (dtypes without a storage class) names.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


class CheckpointError(InputError):
    """A ``.pth`` that is no readable state dict (corrupt, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A ``.pth`` file whose pickle names a global outside the state-dict allow-list."""


class _Malformed(Exception):
    """Raised by the stand-ins, which do not know the file; the unpickler names it."""


def _brief(obj, depth: int = 0) -> str:
    """A short description of a value read from the file, whatever it is (never raises)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, int):  # repr of a 5000-digit int raises
        return repr(obj) if abs(obj) < 1 << 64 else f"<{obj.bit_length()}-bit int>"
    if isinstance(obj, (str, bytes)):
        return repr(obj[:40]) + ("..." if len(obj) > 40 else "")
    if isinstance(obj, (tuple, list)) and depth < 2:
        inner = ", ".join(_brief(v, depth + 1) for v in obj[:6])
        inner += ", ..." if len(obj) > 6 else "," if len(obj) == 1 and type(obj) is tuple else ""
        return f"({inner})" if type(obj) is tuple else f"[{inner}]"
    return f"<{type(obj).__name__}>"


def _is_count(v) -> bool:
    """A size, stride, offset or element count: an int in [0, 2**62)."""
    return type(v) is int and 0 <= v < _MAX_COUNT


# ------------------------------------------------------------------------------- stand-ins
class _Frozen:
    """An admitted global as the unpickler sees it. BUILD on it is refused: on the real objects
    it would set attributes (``__defaults__`` of this module's functions, say)."""

    __slots__ = ("name",)

    def __setstate__(self, state):
        raise _Malformed(f"pickle state set on {self.name}")


class _StorageType(_Frozen):
    """Stand-in for ``torch.FloatStorage`` & co: only its element dtype matters."""

    __slots__ = ("dtype",)

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _DtypeGlobal(_Frozen):
    """Stand-in for ``torch.float32`` & co (``_rebuild_tensor_v3``'s dtype argument)."""

    __slots__ = ("dtype",)

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Function(_Frozen):
    """Stand-in for an admitted ``torch._utils`` function: calls the local replacement."""

    __slots__ = ("fn",)

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)


class _StorageRef:
    """A storage: ``numel`` ``dtype`` elements at ``offset`` in root ``key``."""

    __slots__ = ("dtype", "key", "numel", "offset")

    def __init__(self, key: str, dtype: np.dtype, offset: int, numel: int):
        self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel

    def __setstate__(self, state):
        raise _Malformed("unexpected pickle state for a storage")


class _TensorRef:
    """A tensor recorded while unpickling; materialised once the storage bytes are available."""

    __slots__ = ("dtype", "offset", "shape", "storage", "strides")

    def __init__(
        self, storage: _StorageRef, dtype: np.dtype, offset: int, shape: tuple, strides: tuple
    ):
        self.storage, self.dtype, self.offset, self.shape, self.strides = (
            storage,
            dtype,
            offset,
            shape,
            strides,
        )

    def __setstate__(self, state):
        raise _Malformed("unexpected pickle state for a tensor")


def _check_rebuild_args(storage, offset, size, stride, metadata) -> None:
    if not isinstance(storage, _StorageRef):
        raise _Malformed(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    where = f"offset={_brief(offset)} size={_brief(size)} stride={_brief(stride)}"
    if not (
        type(size) is tuple
        and type(stride) is tuple
        and len(size) == len(stride)
        and all(type(v) is int for v in (offset, *size, *stride))
    ):
        raise _Malformed(f"malformed tensor: {where}")
    if len(size) > _MAX_NDIM:
        raise _Malformed(f"tensor of {len(size)} dimensions (numpy allows {_MAX_NDIM})")
    if not all(_is_count(v) for v in (offset, *size, *stride)):
        raise _Malformed(f"tensor with a negative or absurd offset, size or stride: {where}")
    if metadata and (not isinstance(metadata, dict) or any(metadata.values())):
        raise _Malformed(f"tensor with conj/neg metadata {_brief(metadata)} is not supported")


def _rebuild_tensor(storage, storage_offset, size, stride):
    _check_rebuild_args(storage, storage_offset, size, stride, None)
    return _TensorRef(storage, storage.dtype, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    _check_rebuild_args(storage, storage_offset, size, stride, metadata)
    return _TensorRef(storage, storage.dtype, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    _check_rebuild_args(storage, storage_offset, size, stride, metadata)
    if not isinstance(dtype, _DtypeGlobal):
        raise _Malformed(f"malformed tensor dtype {_brief(dtype)}")
    return _TensorRef(storage, dtype.dtype, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise _Malformed(f"parameter rebuilt from {type(data).__name__}, expected a tensor")
    return data


# (module, name) -> the local stand-in returned for it. Nothing else is ever imported.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        ("torch._utils", fn.__name__): _Function(fn.__name__, fn)
        for fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
    },
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(
        "_rebuild_parameter_with_state", _rebuild_parameter
    ),
    **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): _DtypeGlobal(name, dt) for name, dt in _TORCH_DTYPES.items()},
}


# ------------------------------------------------------------------------------ pickles
# The opcodes a tensor state dict's pickle needs (protocols 2 to 5), by argument layout. All
# others -- protocol 0/1 text opcodes, INST/OBJ/NEWOBJ, the copyreg extension registry,
# out-of-band buffers -- are refused before anything is unpickled.
_NO_ARG = (
    "MARK", "STOP", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_DICT",
    "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET", "DICT", "LIST", "TUPLE", "TUPLE1", "TUPLE2",
    "TUPLE3", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "FROZENSET", "REDUCE",
    "BUILD", "BINPERSID", "STACK_GLOBAL", "MEMOIZE",
)  # fmt: skip
_FIXED_ARG = {
    "PROTO": "<B", "BININT1": "<B", "BINPUT": "<B", "BINGET": "<B", "BININT2": "<H",
    "BININT": "<i", "LONG_BINPUT": "<I", "LONG_BINGET": "<I", "BINFLOAT": ">d", "FRAME": "<Q",
}  # fmt: skip
_COUNTED_ARG = {  # length prefix, then that many bytes
    "LONG1": "<B", "LONG4": "<i", "SHORT_BINSTRING": "<B", "BINSTRING": "<i",
    "SHORT_BINUNICODE": "<B", "BINUNICODE": "<I", "BINUNICODE8": "<Q", "SHORT_BINBYTES": "<B",
    "BINBYTES": "<I", "BINBYTES8": "<Q",
}  # fmt: skip
_OPCODES = {getattr(pickle, n): n for n in (*_NO_ARG, *_FIXED_ARG, *_COUNTED_ARG, "GLOBAL")}

# What the C unpickler raises on a pickle that passed the scan but is still malformed: a missing
# mark or memo entry, stack underflow (UnpicklingError; KeyError for the memo in older Pythons), a
# call of a non-callable or with the wrong arguments, an unhashable key (TypeError), invalid UTF-8
# (UnicodeDecodeError, a ValueError), APPENDS or BUILD on an object without append / __dict__
# (AttributeError), input ending inside a FRAME (EOFError). The stand-ins raise _Malformed.
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    EOFError,
)


class _BoundedFile:
    """A read-only file whose reads never ask for more than it still holds.

    ``BufferedReader.read(n)`` allocates ``n`` bytes before reading, so a corrupt length field
    (a zip directory size, a pickle string length) would otherwise allocate gigabytes.
    """

    def __init__(self, f, size: int):
        self._f, self.size = f, size

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._f.tell(), os.SEEK_END: self.size}[whence]
        if base + offset < 0:  # what a file does; zipfile probes for its zip64 record this way
            raise OSError(errno.EINVAL, "seek before the start of the file")
        return self._f.seek(min(base + offset, self.size))

    def read(self, n: int | None = -1) -> bytes:
        left = self.size - self._f.tell()
        return self._f.read(left if n is None or n < 0 or n > left else n)

    def readinto(self, buf) -> int:
        return self._f.readinto(buf)


def _scan_pickle(data: bytes, available: int, path: str, what: str, base: int = 0) -> int | None:
    """The length of the pickle that starts ``data``, checked before anything unpickles it.

    Only ``_OPCODES`` pass, the first being PROTO 2..5; every argument must lie inside the file;
    a memo index must stay below the count of opcodes before it (the C unpickler sizes its memo by
    the largest index: one corrupt LONG_BINPUT would allocate 32 GiB). So the objects, stack and
    memo that unpickling builds grow with the pickle's length, not with the numbers in it.

    Args:
      data: the first bytes of the pickle (``base`` is its offset in the file, for messages).
      available: how many bytes the file holds from the pickle's start on (>= ``len(data)``).

    Returns:
      the pickle's length, or None when it runs past ``data`` but not past ``available``.
    """
    end, pos, ops = len(data), 0, 0

    def short(at: int, need: int, name: str) -> None:
        if need <= available and end < available:
            return  # read more of the file
        raise CheckpointError(
            f"{path}: truncated or corrupt .pth file: {what} needs {need - at} bytes for the "
            f"{name} at byte {base + at}, only {available - at} remain; download it again"
        )

    while True:
        at = pos
        if pos >= end:
            return short(at, pos + 1, "next opcode")
        name = _OPCODES.get(data[pos : pos + 1])
        if name is None or (ops == 0 and name != "PROTO"):
            raise CheckpointError(
                f"{path}: corrupt .pth file: {what} has opcode {data[pos : pos + 1]!r} at byte "
                f"{base + at}, which no torch.save state dict (pickle protocol 2 or later) has"
            )
        pos += 1
        arg = None
        if name in _FIXED_ARG or name in _COUNTED_ARG:
            fmt = _FIXED_ARG.get(name) or _COUNTED_ARG[name]
            width = struct.calcsize(fmt)
            if pos + width > end:
                return short(at, pos + width, name)
            (arg,) = struct.unpack_from(fmt, data, pos)
            pos += width
            if name in _COUNTED_ARG:
                if arg < 0:
                    raise CheckpointError(
                        f"{path}: corrupt .pth file: {what} has a {name} of {arg} bytes at "
                        f"byte {base + at}"
                    )
                if pos + arg > end:
                    return short(at, pos + arg, f"{name} of {arg} bytes")
                pos += arg
        elif name == "GLOBAL":
            for _ in range(2):
                newline = data.find(b"\n", pos, pos + _MAX_LINE)
                if newline < 0:
                    if pos + _MAX_LINE > end:
                        return short(at, min(pos + _MAX_LINE, available) + 1, "GLOBAL")
                    raise CheckpointError(
                        f"{path}: corrupt .pth file: {what} has a GLOBAL at byte {base + at} "
                        "without its module and name lines"
                    )
                pos = newline + 1
        if (name == "PROTO" and not 2 <= arg <= 5) or (name == "FRAME" and arg > available - pos):
            raise CheckpointError(f"{path}: corrupt .pth file: {what} has {name} {arg}")
        if name in ("BINPUT", "LONG_BINPUT") and arg >= ops:
            raise CheckpointError(
                f"{path}: corrupt .pth file: {what} stores memo entry {arg} at byte "
                f"{base + at}, after only {ops} opcodes"
            )
        ops += 1
        if name == "STOP":
            return pos


def _read_pickle(f: _BoundedFile, path: str, what: str) -> bytes:
    """The pickle at ``f``'s position, scanned; ``f`` is left just after it."""
    start, n = f.tell(), 1 << 16
    while True:  # a window that grows 4x: linear in the pickle's length
        f.seek(start)
        data = f.read(n)
        end = _scan_pickle(data, f.size - start, path, what, base=start)
        if end is not None:
            f.seek(start + end)
            return data[:end]
        n *= 4


class _Unpickler(pickle.Unpickler):
    """Only ``_ALLOWED`` globals; ``('storage', ...)`` persistent ids become ``_StorageRef``."""

    def __init__(self, file, path: str, storages: dict[str, _StorageRef]):
        super().__init__(file, encoding="utf-8")
        self._path = path
        # root key -> whole-storage ref, shared by the successive pickles of one legacy file
        self.storages = storages

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to unpickle global {module[:100]}.{name[:100]}; a tensor "
                "state dict only needs collections.OrderedDict, "
                "torch._utils._rebuild_tensor_v2/_rebuild_parameter and torch.*Storage types. "
                "Nothing in the file was executed."
            ) from None

    def persistent_load(self, pid):
        if not (
            type(pid) is tuple
            and len(pid) in (5, 6)
            and type(pid[0]) in (str, bytes)
            and pid[0] in ("storage", b"storage")
        ):
            raise CheckpointError(
                f"{self._path}: unsupported persistent id {_brief(pid)} "
                "(only tensor storages are supported, not pickled modules)"
            )
        storage_type, key, _location, numel = pid[1:5]
        key = _storage_key(key, self._path)
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(
                f"{self._path}: storage {key} has type {_brief(storage_type)}, "
                "expected a torch.*Storage"
            )
        if not _is_count(numel):
            raise CheckpointError(f"{self._path}: storage {key} has size {_brief(numel)}")
        root = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, 0, numel))
        if root.dtype != storage_type.dtype or root.numel != numel:
            raise CheckpointError(
                f"{self._path}: storage {key} is recorded as {root.numel} {root.dtype} and as "
                f"{numel} {storage_type.dtype} elements"
            )
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        # Legacy storage views (torch < 1.0): (view key, element offset, element count) in the root.
        if not (
            type(view) is tuple
            and len(view) == 3
            and _is_count(view[1])
            and _is_count(view[2])
            and view[1] + view[2] <= numel
        ):
            raise CheckpointError(
                f"{self._path}: storage view {_brief(view)} on storage {key} of {numel} "
                "elements is malformed or out of range"
            )
        return _StorageRef(key, root.dtype, view[1], view[2])

    def load(self):
        try:
            return super().load()
        except _Malformed as e:
            raise CheckpointError(f"{self._path}: corrupt .pth file: {e}") from None


def _storage_key(key, path: str) -> str:
    if isinstance(key, bytes) and key.isascii():
        key = key.decode("ascii")
    if type(key) is not str or not 0 < len(key) <= _MAX_KEY:
        raise CheckpointError(f"{path}: corrupt .pth file: storage key {_brief(key)}")
    return key


def _unpickle(data: bytes, path: str, storages: dict[str, _StorageRef], what: str) -> Any:
    try:
        return _Unpickler(io.BytesIO(data), path, storages).load()
    except CheckpointError:
        raise
    except _UNPICKLE_ERRORS as e:
        raise CheckpointError(
            f"{path}: corrupt .pth file: {what} is not a valid checkpoint pickle "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from None


# ------------------------------------------------------------------------------- tensors
def _materialise(t: _TensorRef, root: np.ndarray, path: str, budget: list[int]) -> np.ndarray:
    """The tensor's values as a C-contiguous array (a copy unless it is its whole storage).

    Bounds are checked here: ``as_strided`` would read past the buffer. Copies are charged to
    ``budget`` (bytes): overlapping views of one storage cannot make more than the file allows.
    """
    s = t.storage
    raw = root[s.offset * s.dtype.itemsize : (s.offset + s.numel) * s.dtype.itemsize]
    if raw.size != s.numel * s.dtype.itemsize:
        raise CheckpointError(
            f"{path}: storage view {s.key}[{s.offset}:+{s.numel}] is out of range"
        )
    if raw.size % t.dtype.itemsize:
        raise CheckpointError(
            f"{path}: storage {s.key} of {raw.size} bytes is not a whole number "
            f"of {t.dtype} elements"
        )
    flat = raw.view(t.dtype)
    numel = math.prod(t.shape)
    if numel == 0:
        if math.prod(n for n in t.shape if n) * t.dtype.itemsize >= _MAX_COUNT:
            raise CheckpointError(f"{path}: empty tensor of absurd shape {t.shape}")
        return np.zeros(t.shape, t.dtype)
    last = t.offset + sum((n - 1) * st for n, st in zip(t.shape, t.strides))
    if last >= flat.size:
        raise CheckpointError(
            f"{path}: tensor of shape {t.shape}, strides {t.strides}, offset {t.offset} reads "
            f"element {last} of storage {s.key}, which has {flat.size} elements"
        )
    contiguous = all(
        n == 1 or st == math.prod(t.shape[i + 1 :])
        for i, (n, st) in enumerate(zip(t.shape, t.strides))
    )
    if contiguous and t.offset == 0 and numel == flat.size:
        return flat.reshape(t.shape)  # the whole storage: no copy (the storage buffer is ours)
    budget[0] -= numel * t.dtype.itemsize
    if budget[0] < 0:
        raise CheckpointError(
            f"{path}: tensor of shape {t.shape}, strides {t.strides} on storage {s.key} takes "
            f"the copies of its views past {_COPY_FACTOR}x the file's size: self-overlapping "
            "strides (an expand()ed tensor) or overlapping views of one storage are only read "
            "that far; save tensor.contiguous() instead"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset :],  # a size-1 dimension's stride is never used: it may be anything
        shape=t.shape,
        strides=tuple(st * t.dtype.itemsize if n > 1 else 0 for n, st in zip(t.shape, t.strides)),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)


def _resolve(obj, roots: dict[str, np.ndarray], path: str, big_endian: bool, budget: list[int]):
    """Replaces every ``_TensorRef`` in nested dicts/lists/tuples by its array.

    Each object is resolved once (a pickle's memo can share one list a million times) and at
    most ``_MAX_DEPTH`` deep (a pickle can also make a list contain itself)."""
    done: dict[int, Any] = {}

    def walk(obj, depth: int):
        if id(obj) in done:
            return done[id(obj)]
        if depth > _MAX_DEPTH:
            raise CheckpointError(
                f"{path}: corrupt .pth file: containers nested more than {_MAX_DEPTH} deep "
                "(or containing themselves)"
            )
        if isinstance(obj, _TensorRef):
            out = _materialise(obj, roots[obj.storage.key], path, budget)
            n = out.dtype.itemsize
            if big_endian and n > 1:  # zip archives record the writer's byte order; ours is little
                out = out.view(f">u{n}").astype(f"<u{n}").view(out.dtype)
        elif isinstance(obj, dict):
            out = type(obj)((k, walk(v, depth + 1)) for k, v in obj.items())
        elif isinstance(obj, (list, tuple)):
            out = type(obj)(walk(v, depth + 1) for v in obj)
        else:
            return obj
        done[id(obj)] = out
        return out

    return walk(obj, 0)


# ------------------------------------------------------------------------------ zip format
def _load_zip(path: str, size: int) -> Any:
    with open(path, "rb") as raw:
        f = _BoundedFile(raw, size)
        try:
            zf = zipfile.ZipFile(f)
        except zipfile.BadZipFile as e:
            if _has_zip_end_record(f):
                raise CheckpointError(
                    f"{path}: corrupt .pth zip archive ({e}); download it again"
                ) from None
            raise CheckpointError(
                f"{path}: truncated .pth file: it starts like a zip archive but its end record "
                f"is missing ({size} bytes); the download was probably interrupted, "
                "fetch it again"
            ) from None
        except (NotImplementedError, UnicodeDecodeError) as e:  # a newer zip version, bad names
            raise CheckpointError(
                f"{path}: corrupt .pth zip archive ({type(e).__name__}: {e}); download it again"
            ) from None
        with zf:
            names = set(zf.namelist())
            pkls = sorted(n for n in names if n.count("/") == 1 and n.endswith("/data.pkl"))
            if len(pkls) != 1:
                raise CheckpointError(
                    f"{path}: zip archive without exactly one <dir>/data.pkl "
                    f"(found {_brief(pkls) if pkls else 'none'}); not a torch.save checkpoint"
                )
            prefix = pkls[0][: -len("data.pkl")]
            budget = [size]  # records may not overlap: no more bytes read than the file holds
            big = False
            if prefix + "byteorder" in names:
                order = _read_member(f, zf.getinfo(prefix + "byteorder"), path, budget).tobytes()
                if order not in (b"little", b"big"):
                    raise CheckpointError(f"{path}: unknown byteorder record {_brief(order)}")
                big = order == b"big"
            pkl = _read_member(f, zf.getinfo(pkls[0]), path, budget).tobytes()
            pkl = pkl[: _scan_pickle(pkl, len(pkl), path, "data.pkl")]
            storages: dict[str, _StorageRef] = {}
            obj = _unpickle(pkl, path, storages, "data.pkl")
            roots = {}
            for key, ref in storages.items():
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise CheckpointError(f"{path}: storage record {name} is missing")
                data = _read_member(f, zf.getinfo(name), path, budget)
                nbytes = ref.numel * ref.dtype.itemsize
                if data.size < nbytes:
                    raise CheckpointError(
                        f"{path}: storage {name} has {data.size} bytes, expected {nbytes}"
                    )
                roots[key] = data[:nbytes]
    return _resolve(obj, roots, path, big, [_COPY_FACTOR * size])


def _read_member(
    f: _BoundedFile, info: zipfile.ZipInfo, path: str, budget: list[int]
) -> np.ndarray:
    """A zip member's bytes as a writable uint8 array, CRC-checked, sizes checked before reading.

    torch writes storages uncompressed, so they are read straight into the array (no intermediate
    bytes object): the local header gives where the data starts.
    """
    name = info.filename

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt .pth zip archive: {name} {why}; download it again")

    if info.flag_bits & 0x41:
        raise corrupt("is marked encrypted")
    if info.external_attr & 0x10:  # the DOS directory bit: torch's reader would skip the data
        raise corrupt("is marked as a directory")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise corrupt(f"has compression method {info.compress_type}")
    if not 0 <= info.header_offset <= f.size - 30:
        raise corrupt(f"has its header at byte {info.header_offset} of {f.size}")
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise corrupt("has a bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    budget[0] -= info.compress_size
    if info.compress_size > f.size - start or budget[0] < 0:
        raise corrupt(
            f"claims {info.compress_size} bytes from byte {start}: beyond the file's "
            f"{f.size} bytes or overlapping other records"
        )
    f.seek(start)
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise corrupt(f"is stored, but {info.compress_size} bytes would make {info.file_size}")
        buf = np.empty(info.file_size, np.uint8)
        if f.readinto(memoryview(buf)) != info.file_size:
            raise corrupt("ends early")
    else:
        if info.file_size > _MAX_INFLATE * info.compress_size:
            raise corrupt(f"inflates {info.compress_size} bytes to {info.file_size}")
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:  # max_length 0 would mean no limit
            data = inflater.decompress(f.read(info.compress_size), max(info.file_size, 1))
        except zlib.error as e:
            raise corrupt(f"does not inflate ({e})") from None
        if len(data) != info.file_size or not inflater.eof:
            raise corrupt(f"does not inflate to {info.file_size} bytes")
        buf = np.frombuffer(data, np.uint8).copy()
    if zlib.crc32(buf) != info.CRC:
        raise corrupt("fails its CRC-32 check")
    return buf


def _has_zip_end_record(f: _BoundedFile) -> bool:
    f.seek(max(0, f.size - (1 << 16) - 22))
    return b"PK\x05\x06" in f.read()


# --------------------------------------------------------------------------- legacy format
def _load_legacy(path: str, size: int) -> Any:
    with open(path, "rb") as raw:
        f = _BoundedFile(raw, size)
        storages: dict[str, _StorageRef] = {}

        def load(what: str) -> Any:
            return _unpickle(_read_pickle(f, path, what), path, storages, what)

        try:
            magic = load("the magic number")
        except UnsafeCheckpointError:
            raise
        except CheckpointError:  # whatever the bytes are, they are not a legacy checkpoint
            magic = None
        if type(magic) is not int or magic != _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor "
                "a legacy torch.save stream: magic number mismatch)"
            )
        version = load("the protocol version")
        if type(version) is not int or version != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy protocol version {_brief(version)}")
        load("the system info")  # storage bytes are little-endian whatever the writer was
        obj = load("the state dict")
        keys = load("the storage key list")
        if type(keys) is not list:
            raise CheckpointError(f"{path}: corrupt .pth file: storage key list {_brief(keys)}")
        keys = [_storage_key(k, path) for k in keys]
        if len(set(keys)) != len(keys) or set(keys) != set(storages):
            raise CheckpointError(
                f"{path}: corrupt .pth file: storage key list does not match "
                "the storages the state dict refers to"
            )
        roots = {}
        for key in keys:
            ref = storages[key]
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated .pth file: storage {key} header missing "
                    f"({size} bytes); download it again"
                )
            (numel,) = struct.unpack("<q", head)
            if numel != ref.numel:
                raise CheckpointError(
                    f"{path}: corrupt .pth file: storage {key} records {numel} "
                    f"elements, the pickle says {ref.numel}"
                )
            nbytes = numel * ref.dtype.itemsize
            if nbytes > size - f.tell():
                raise CheckpointError(
                    f"{path}: truncated .pth file: storage {key} needs {nbytes} bytes, only "
                    f"{size - f.tell()} remain ({size} bytes in all); download it again"
                )
            roots[key] = np.empty(nbytes, np.uint8)
            if f.readinto(memoryview(roots[key])) != nbytes:
                raise CheckpointError(f"{path}: truncated .pth file: storage {key} ends early")
    return _resolve(obj, roots, path, False, [_COPY_FACTOR * size])


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``torch.save``d state dict without torch and without executing anything in the file.

    Both formats are read: the zip archive (``<dir>/data.pkl`` + ``<dir>/data/<key>``, torch >= 1.6)
    and the legacy stream (magic, protocol, sys-info, object and storage-key pickles followed by
    ``int64 numel`` + raw little-endian bytes per storage), e.g. ``wide_resnet50_2-95faca4d.pth``.
    Storage offsets, shapes and strides are honoured; a checkpoint dict wrapping the state dict
    under ``"state_dict"`` or ``"model"`` is unwrapped. Corrupt files are refused with an error
    that says what is wrong, in time and memory proportional to the file's size.

    Args:
      path: the ``.pth`` file.

    Returns:
      ``{torch key: array}`` with the tensors' dtypes (float32, float16, ``ml_dtypes.bfloat16``,
      int64, ...), C-contiguous copies in native byte order.

    Raises:
      UnsafeCheckpointError: the pickle names a global outside the allow-list (named in the
        message).
      CheckpointError: corrupt, truncated or not a tensor state dict; also tensors the reader does
        not support (self-overlapping strides, conj/neg bits).
      OSError: the file cannot be read (FileNotFoundError: no such file).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
        size = os.fstat(f.fileno()).st_size
    obj = _load_zip(path, size) if head == b"PK\x03\x04" else _load_legacy(path, size)
    if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise CheckpointError(
            f"{path}: not a tensor state dict: entries {_brief(bad)} are not name -> tensor"
        )
    return dict(obj)
