"""Torch-free access to torchvision checkpoints: read ``.pth`` files, rename them to Flax variables.

``load_state_dict`` reads both formats ``torch.save`` has written -- the zip archive (torch >= 1.6)
and the older "legacy" stream of pickles (torchvision's 2019 ImageNet files) -- with a restricted
unpickler: only the handful of globals a tensor state dict needs are admitted, and even those are
replaced by local stand-ins that record (storage, offset, shape, strides). Nothing in the file is
ever executed; any other global is refused with an error that names it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

# Legacy-format header, from torch/serialization.py.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

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


class CheckpointError(ValueError):
    """A ``.pth`` that is no readable state dict (corrupt, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A ``.pth`` file whose pickle names a global outside the state-dict allow-list."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co: only its element dtype matters."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __setstate__(self, state):
        raise CheckpointError(f"unexpected pickle state for storage type {self.name}")


class _StorageRef:
    """A storage: ``numel`` ``dtype`` elements at ``offset`` in root ``key``."""

    __slots__ = ("dtype", "key", "numel", "offset")

    def __init__(self, key: str, dtype: np.dtype, offset: int, numel: int):
        self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel

    def __setstate__(self, state):
        raise CheckpointError("unexpected pickle state for a storage")


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
        raise CheckpointError("unexpected pickle state for a tensor")


def _check_rebuild_args(storage, offset, size, stride, metadata) -> None:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    if not (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(v, int) for v in size + stride)
        and all(n >= 0 for n in size)
    ):
        raise CheckpointError(
            f"malformed tensor: offset={offset!r} size={size!r} stride={stride!r}"
        )
    if metadata and (not isinstance(metadata, dict) or any(metadata.values())):
        raise CheckpointError(f"tensor with conj/neg metadata {metadata!r} is not supported")


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
    if not isinstance(dtype, np.dtype):
        raise CheckpointError(f"malformed tensor dtype {dtype!r}")
    return _TensorRef(storage, dtype, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise CheckpointError(f"parameter rebuilt from {type(data).__name__}, expected a tensor")
    return data


# (module, name) -> the local stand-in returned for it. Nothing else is ever imported.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): dt for name, dt in _TORCH_DTYPES.items()},
}


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
                f"{self._path}: refusing to unpickle global {module}.{name}; a tensor state dict "
                "only needs collections.OrderedDict, torch._utils._rebuild_tensor_v2/"
                "_rebuild_parameter and torch.*Storage types. Nothing in the file was executed."
            ) from None

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple) and pid and _ascii(pid[0]) == "storage" and len(pid) in (5, 6)
        ):
            raise CheckpointError(
                f"{self._path}: unsupported persistent id {str(pid)[:80]!r} "
                "(only tensor storages are supported, not pickled modules)"
            )
        storage_type, key, _location, numel = pid[1:5]
        key = _ascii(key)
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: storage {key} has type {storage_type!r}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self._path}: storage {key} has size {numel!r}")
        root = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, 0, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        # Legacy storage views (torch < 1.0): (view key, element offset, element count) in the root.
        _view_key, offset, view_numel = view
        return _StorageRef(key, root.dtype, offset, view_numel)


def _ascii(s):
    return s.decode("ascii") if isinstance(s, bytes) else s


def _materialise(t: _TensorRef, root: np.ndarray, path: str) -> np.ndarray:
    """The tensor's values as a C-contiguous array (a copy unless it is its whole storage).

    Bounds are checked here: ``as_strided`` would read past the buffer."""
    s = t.storage
    raw = root[s.offset * s.dtype.itemsize : (s.offset + s.numel) * s.dtype.itemsize]
    if s.offset < 0 or s.numel < 0 or raw.size != s.numel * s.dtype.itemsize:
        raise CheckpointError(
            f"{path}: storage view {s.key}[{s.offset}:+{s.numel}] is out of range"
        )
    if raw.size % t.dtype.itemsize:
        raise CheckpointError(
            f"{path}: storage {s.key} of {raw.size} bytes is not a whole number "
            f"of {t.dtype} elements"
        )
    flat = raw.view(t.dtype)
    if any(n == 0 for n in t.shape):
        return np.zeros(t.shape, t.dtype)
    if t.offset < 0 or any(st < 0 for st in t.strides):
        raise CheckpointError(f"{path}: negative offset/stride in tensor on storage {s.key}")
    last = t.offset + sum((n - 1) * st for n, st in zip(t.shape, t.strides))
    if last >= flat.size:
        raise CheckpointError(
            f"{path}: tensor of shape {t.shape}, strides {t.strides}, offset {t.offset} reads "
            f"element {last} of storage {s.key}, which has {flat.size} elements"
        )
    contiguous = all(
        n == 1 or st == int(np.prod(t.shape[i + 1 :]))
        for i, (n, st) in enumerate(zip(t.shape, t.strides))
    )
    if contiguous and t.offset == 0 and int(np.prod(t.shape)) == flat.size:
        return flat.reshape(t.shape)  # the whole storage: no copy (the storage buffer is ours)
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset :],
        shape=t.shape,
        strides=tuple(st * t.dtype.itemsize for st in t.strides),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)


def _resolve(obj, roots: dict[str, np.ndarray], path: str, big_endian: bool = False):
    """Replaces every ``_TensorRef`` in nested dicts/lists/tuples by its array."""
    if isinstance(obj, _TensorRef):
        arr = _materialise(obj, roots[obj.storage.key], path)
        n = arr.dtype.itemsize
        if big_endian and n > 1:  # zip archives record the writer's byte order; ours is little
            arr = arr.view(f">u{n}").astype(f"<u{n}").view(arr.dtype)
        return arr
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, roots, path, big_endian)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, roots, path, big_endian) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        if _has_zip_end_record(path):
            raise CheckpointError(
                f"{path}: corrupt .pth zip archive ({e}); download it again"
            ) from None
        raise CheckpointError(
            f"{path}: truncated .pth file: it starts like a zip archive but its end record is "
            f"missing ({os.path.getsize(path)} bytes); the download was probably interrupted, "
            "fetch it again"
        ) from None
    with zf:
        try:
            names = zf.namelist()
            pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise CheckpointError(
                    f"{path}: zip archive without exactly one <dir>/data.pkl "
                    f"(found {pkls or 'none'}); not a torch.save checkpoint"
                )
            prefix = pkls[0][: -len("data.pkl")]
            big = False
            if prefix + "byteorder" in names:
                order = zf.read(prefix + "byteorder")
                if order not in (b"little", b"big"):
                    raise CheckpointError(f"{path}: unknown byteorder record {order!r}")
                big = order == b"big"
            storages: dict[str, _StorageRef] = {}
            obj = _Unpickler(io.BytesIO(zf.read(pkls[0])), path, storages).load()
            roots = {}
            for key, ref in storages.items():
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise CheckpointError(f"{path}: storage record {name} is missing")
                raw = _read_member(zf, name, path)
                nbytes = ref.numel * ref.dtype.itemsize
                if raw.size < nbytes:
                    raise CheckpointError(
                        f"{path}: storage {name} has {raw.size} bytes, expected {nbytes}"
                    )
                roots[key] = raw[:nbytes]
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise CheckpointError(
                f"{path}: corrupt .pth zip archive ({e}); download it again"
            ) from None
        except (pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"{path}: corrupt .pth zip archive: data.pkl is not a valid "
                f"checkpoint pickle ({type(e).__name__}: {e})"
            ) from None
    return _resolve(obj, roots, path, big)


def _read_member(zf: zipfile.ZipFile, name: str, path: str) -> np.ndarray:
    """A zip member's bytes as a writable uint8 array, CRC-checked.

    torch writes storages uncompressed, so they are read straight into the array (no intermediate
    bytes object): the local header gives where the data starts.
    """
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(zf.read(name), np.uint8).copy()
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {name}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        buf = np.empty(info.file_size, np.uint8)
        if f.readinto(memoryview(buf)) != info.file_size:
            raise EOFError(f"{name} ends early")
    if zlib.crc32(buf) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
    return buf


def _has_zip_end_record(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (1 << 16) - 22))
        return b"PK\x05\x06" in f.read()


def _load_legacy(path: str) -> Any:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        storages: dict[str, _StorageRef] = {}

        def load():
            return _Unpickler(f, path, storages).load()

        try:
            magic = load()
        except CheckpointError:
            raise
        except Exception:  # noqa: BLE001 -- whatever the bytes are, they are not a checkpoint
            magic = None
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor "
                "a legacy torch.save stream: magic number mismatch)"
            )
        try:
            version = load()
            if version != _LEGACY_PROTOCOL:
                raise CheckpointError(f"{path}: unsupported legacy protocol version {version!r}")
            load()  # sys_info; storage bytes are little-endian whatever the writer was
            obj = load()
            keys = load()
        except (EOFError, pickle.UnpicklingError) as e:
            if isinstance(e, pickle.UnpicklingError) and "truncated" not in str(e):
                raise CheckpointError(
                    f"{path}: corrupt .pth file: not a valid checkpoint pickle ({e})"
                ) from None
            raise CheckpointError(
                f"{path}: truncated .pth file (the pickle ends early, "
                f"{size} bytes); download it again"
            ) from None
        except CheckpointError:
            raise
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error) as e:
            raise CheckpointError(
                f"{path}: corrupt .pth file: not a valid checkpoint pickle "
                f"({type(e).__name__}: {e})"
            ) from None
        if not isinstance(keys, list) or set(map(_ascii, keys)) != set(storages):
            raise CheckpointError(
                f"{path}: corrupt .pth file: storage key list does not match "
                "the storages the state dict refers to"
            )
        roots = {}
        for key in map(_ascii, keys):
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
            f.readinto(memoryview(roots[key]))
    return _resolve(obj, roots, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``torch.save``d state dict without torch and without executing anything in the file.

    Both formats are read: the zip archive (``<dir>/data.pkl`` + ``<dir>/data/<key>``, torch >= 1.6)
    and the legacy stream (magic, protocol, sys-info, object and storage-key pickles followed by
    ``int64 numel`` + raw little-endian bytes per storage), e.g. ``wide_resnet50_2-95faca4d.pth``.
    Storage offsets, shapes and strides are honoured; a checkpoint dict wrapping the state dict
    under
    ``"state_dict"`` or ``"model"`` is unwrapped.

    Args:
      path: the ``.pth`` file.

    Returns:
      ``{torch key: array}`` with the tensors' dtypes (float32, float16, ``ml_dtypes.bfloat16``,
      int64, ...), C-contiguous copies in native byte order.

    Raises:
      UnsafeCheckpointError: the pickle names a global outside the allow-list (named in the
        message).
      CheckpointError: corrupt, truncated or not a tensor state dict.
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
    obj = _load_zip(path) if head == b"PK\x03\x04" else _load_legacy(path)
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
            f"{path}: not a tensor state dict: entries {bad[:5]} are not name -> tensor"
        )
    return dict(obj)


def to_flax(
    state_dict: dict[str, np.ndarray], stages: tuple[str, ...] = ("layer1", "layer2", "layer3")
) -> dict[str, np.ndarray]:
    """Renames and transposes a torchvision ResNet ``state_dict`` to flat Flax variables.

    Conv ``weight`` OIHW -> ``params/.../kernel`` HWIO; Linear ``weight`` [out, in] -> kernel
    [in, out];
    BatchNorm ``weight``/``bias`` -> ``params/.../scale``/``bias``; ``running_mean``/``running_var``
    -> ``batch_stats/.../mean``/``var``; ``num_batches_tracked`` is dropped.

    Args:
      state_dict: torch key (``layer2.0.downsample.0.weight``) -> numpy array.
      stages: which of ``layer1`` .. ``layer4`` and ``fc`` to keep; the stem (``conv1``, ``bn1``)
        is always kept.

    Returns:
      ``{"params/layer2/0/downsample/0/kernel": array, ...}`` (keys joined with ``/``).
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        *module, leaf = key.split(".")
        top = module[0] if module else ""
        if (top.startswith("layer") or top == "fc") and top not in stages:
            continue
        path = "/".join(module)
        value = np.asarray(value)
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and value.ndim == 4:
            out[f"params/{path}/kernel"] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        elif leaf == "weight" and value.ndim == 2:
            out[f"params/{path}/kernel"] = np.ascontiguousarray(value.T)
        elif leaf == "weight":
            out[f"params/{path}/scale"] = value
        elif leaf == "bias":
            out[f"params/{path}/bias"] = value
        elif leaf == "running_mean":
            out[f"batch_stats/{path}/mean"] = value
        elif leaf == "running_var":
            out[f"batch_stats/{path}/var"] = value
        else:
            raise ValueError(
                f"unexpected state_dict entry {key!r}: not a ResNet conv, BatchNorm or fc tensor"
            )
    return out
