"""Read calibrated maxima from a ModelOpt ``backbone.pt`` without torch.

``mto.save`` writes a torch zip checkpoint: ``<archive>/data.pkl`` (the pickled
``{"modelopt_state": ..., "model_state_dict": ...}``), one zip entry per storage at
``<archive>/data/<key>``, and ``<archive>/byteorder``. The state dict holds the
whole model, so we never materialise it: ``data.pkl`` is unpickled with a
restricted unpickler that turns every class into an inert placeholder (nothing
from the file is executed) and every storage into a lazy reference; only the
storages of the selected ``*_quantizer._amax`` tensors are then read.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqfast._files import open_regular
from dqfast.errors import BackboneError

BACKBONE_FILENAME = "backbone.pt"
_WEIGHT_SUFFIX = ".weight_quantizer._amax"
_INPUT_SUFFIX = ".input_quantizer._amax"

# Legacy typed-storage class name (as pickled) -> (numpy dtype of the raw bytes, item size).
_STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("f4", 4),
    "HalfStorage": ("f2", 2),
    "BFloat16Storage": ("u2", 2),  # widened to float32 by a 16-bit shift
    "DoubleStorage": ("f8", 8),
}


#: ``torch.save`` writes every entry uncompressed; anything else is not its output (and a
#: compressed entry can expand without bound).
_FLAG_ENCRYPTED = 0x1
#: data.pkl of a whole-model state dict: a few MB per thousand tensors.
_MAX_PICKLE_BYTES = 256 << 20


@dataclass(frozen=True)
class AmaxPair:
    """Calibrated maxima of one module's quantizers (float32, shapes as saved)."""

    weight: np.ndarray | None
    input: np.ndarray | None


@dataclass(frozen=True)
class _StorageRef:
    key: str
    storage_type: str
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Inert:
    """Stands in for any class named in the pickle; records, never executes."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_items"] = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        # e.g. getattr(cls, "method")(...) in a reduce: yields another inert value.
        return type(self)(*args)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_items"].append((key, value))

    def append(self, value: Any) -> None:
        self.__dict__["_items"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_items"].extend(values)

    def __repr__(self) -> str:
        return f"<inert {self._qualname}>"


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _LazyTensor:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a storage reference")
    return _LazyTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


class _AmaxUnpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # a plain container: safe to build
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = type(name, (_Inert,), {"_qualname": f"{module}.{name}"})
        return self._placeholders[key]

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', <storage class>, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_cls = pid[1]
        type_name = storage_cls.__name__ if isinstance(storage_cls, type) else str(storage_cls)
        return _StorageRef(key=str(pid[2]), storage_type=type_name, numel=int(pid[4]))


def _resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / BACKBONE_FILENAME
    if not os.path.lexists(p):
        raise BackboneError(f"{p}: no such file", p)
    return p


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    for name in zf.namelist():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            return parts[0]
    raise BackboneError(f"{path}: no <archive>/data.pkl entry: not a torch zip checkpoint", path)


def _entry(zf: zipfile.ZipFile, name: str, archive_size: int, path: Path, key: str = "") -> zipfile.ZipInfo:
    """The zip entry ``name``, refused unless it is what torch.save writes: stored (not
    compressed), not encrypted, and inside the file."""
    where = f"{path}: {key + ': ' if key else ''}{name}"
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise BackboneError(f"{where}: entry missing", path, key or None) from None
    if info.flag_bits & _FLAG_ENCRYPTED:
        raise BackboneError(f"{where}: encrypted zip entry (torch.save never encrypts)", path, key or None)
    if info.compress_type != zipfile.ZIP_STORED:
        raise BackboneError(
            f"{where}: zip compression method {info.compress_type} (torch.save stores entries uncompressed)", path, key or None
        )
    if info.compress_size != info.file_size or info.header_offset + info.file_size > archive_size:
        raise BackboneError(f"{where}: entry claims {info.file_size} bytes, beyond the file's {archive_size}", path, key or None)
    return info


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, key: str = "") -> bytes:
    try:
        data = zf.read(info)  # checks the CRC
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as e:
        raise BackboneError(f"{path}: {key + ': ' if key else ''}{info.filename}: unreadable zip entry ({e})", path, key or None) from None
    if len(data) != info.file_size:
        raise BackboneError(f"{path}: {info.filename}: {len(data)} bytes read, {info.file_size} expected", path, key or None)
    return data


def _read_tensor(zf: zipfile.ZipFile, prefix: str, big_endian: bool, t: _LazyTensor, path: Path, key: str, archive_size: int) -> np.ndarray:
    st = t.storage
    if st.storage_type not in _STORAGE_DTYPES:
        raise BackboneError(f"{path}: {key}: unsupported storage dtype {st.storage_type}", path, key)
    raw_code, itemsize = _STORAGE_DTYPES[st.storage_type]
    entry = f"{prefix}/data/{st.key}"
    if "/" in st.key or st.key in ("", ".", ".."):
        raise BackboneError(f"{path}: {key}: storage key {st.key!r} is not an entry name", path, key)
    try:
        zf.getinfo(entry)
    except KeyError:
        raise BackboneError(f"{path}: {key}: storage entry {entry} missing", path, key) from None
    info = _entry(zf, entry, archive_size, path, key)
    # Every size below comes from the file; each is checked against a real size before use.
    if st.numel < 0 or info.file_size != st.numel * itemsize:
        raise BackboneError(f"{path}: {key}: storage {entry} has {info.file_size} bytes, expected {st.numel * itemsize}", path, key)
    if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride) or t.offset < 0:
        raise BackboneError(f"{path}: {key}: negative size, stride or offset", path, key)
    count = 1
    for n in t.size:
        count *= n  # Python int: no overflow
    if count > st.numel:
        # An amax view never repeats storage elements (stride-0 expansion): its element count
        # is bounded by the storage's, so a tiny file cannot ask for gigabytes.
        raise BackboneError(f"{path}: {key}: view of {count} elements over a storage of {st.numel}", path, key)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if count else t.offset - 1
    if count and last >= st.numel:
        raise BackboneError(f"{path}: {key}: view {t.size}/{t.stride}+{t.offset} exceeds storage of {st.numel}", path, key)
    flat = np.frombuffer(_read_entry(zf, info, path, key), dtype=("<" if not big_endian else ">") + raw_code)
    if count:
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset :], shape=t.size, strides=tuple(s * itemsize for s in t.stride), writeable=False
        )
    else:
        view = np.empty(t.size, dtype=flat.dtype)
    values = np.array(view, copy=True)
    if st.storage_type == "BFloat16Storage":
        # bf16 is the top half of an f32: widen exactly.
        widened = np.left_shift(values.astype(np.uint32), np.uint32(16)).view(np.float32)
        return np.asarray(widened, dtype=np.float32).reshape(t.size)
    return np.asarray(values, dtype=np.float32).reshape(t.size)


class _OwnedZip(zipfile.ZipFile):
    """A ZipFile over a file object it also closes (the regular-file check needs our own open)."""

    def __init__(self, f: Any) -> None:
        self._owned = f
        try:
            super().__init__(f)
        except BaseException:
            f.close()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._owned.close()


def _load_state(path: Path) -> tuple[zipfile.ZipFile, str, bool, dict[str, Any], int]:
    f = open_regular(path, "backbone checkpoint", BackboneError)
    archive_size = os.fstat(f.fileno()).st_size
    try:
        zf = _OwnedZip(f)
    except Exception as e:  # BadZipFile, and the struct/overflow/unicode errors of a forged directory
        raise BackboneError(f"{path}: not a torch zip checkpoint ({e})", path) from None
    try:
        prefix = _archive_prefix(zf, path)
        byteorder = b"little"
        if f"{prefix}/byteorder" in zf.namelist():
            info = _entry(zf, f"{prefix}/byteorder", archive_size, path)
            if info.file_size > 16:
                raise BackboneError(f"{path}: {prefix}/byteorder: {info.file_size} bytes; not a byte order", path)
            byteorder = _read_entry(zf, info, path).strip()
            if byteorder not in (b"little", b"big"):
                raise BackboneError(f"{path}: {prefix}/byteorder: unknown byte order {byteorder!r}", path)
        info = _entry(zf, f"{prefix}/data.pkl", archive_size, path)
        if info.file_size > _MAX_PICKLE_BYTES:
            raise BackboneError(f"{path}: {prefix}/data.pkl is {info.file_size} bytes; more than {_MAX_PICKLE_BYTES}", path)
        pkl = _read_entry(zf, info, path)
        try:
            obj = _AmaxUnpickler(io.BytesIO(pkl)).load()
        except BackboneError:
            raise
        except Exception as e:  # any pickle-level failure is a malformed file
            raise BackboneError(f"{path}: {prefix}/data.pkl: cannot unpickle ({type(e).__name__}: {e})", path) from None
        if not isinstance(obj, dict) or "model_state_dict" not in obj:
            raise BackboneError(f"{path}: top-level object has no 'model_state_dict' (not an mto.save checkpoint)", path)
        state = obj["model_state_dict"]
        if not isinstance(state, dict):
            raise BackboneError(f"{path}: model_state_dict is {type(state).__name__}, not a dict", path)
        return zf, prefix, byteorder == b"big", state, archive_size
    except BaseException:
        zf.close()
        raise


def list_state_keys(path: str | Path) -> list[str]:
    """The names in ``model_state_dict`` (reads only ``data.pkl``)."""
    p = _resolve_path(path)
    zf, _, _, state, _ = _load_state(p)
    zf.close()
    return list(state)


def read_amax(path: str | Path) -> dict[str, AmaxPair]:
    """Module name -> its weight/input quantizer ``_amax`` (float32, shapes as saved).

    ``path`` is ``backbone.pt`` or a directory holding it. Only the selected
    storages are read from the archive.
    """
    p = _resolve_path(path)
    zf, prefix, big_endian, state, archive_size = _load_state(p)
    found: dict[str, dict[str, np.ndarray]] = {}
    with zf:
        for key, value in state.items():
            if not isinstance(key, str):
                continue
            for suffix, slot in ((_WEIGHT_SUFFIX, "weight"), (_INPUT_SUFFIX, "input")):
                if key.endswith(suffix):
                    if not isinstance(value, _LazyTensor):
                        raise BackboneError(f"{p}: {key}: value is {type(value).__name__}, not a tensor", p, key)
                    module = key[: -len(suffix)]
                    found.setdefault(module, {})[slot] = _read_tensor(zf, prefix, big_endian, value, p, key, archive_size)
    return {m: AmaxPair(weight=d.get("weight"), input=d.get("input")) for m, d in found.items()}
