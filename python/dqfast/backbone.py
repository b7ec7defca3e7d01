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
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqfast.errors import CheckpointError

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


class BackboneError(CheckpointError, ValueError):
    """A ``backbone.pt`` that cannot be read as a ModelOpt checkpoint (a ``ValueError`` too, as
    it always was)."""


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
    if not p.is_file():
        raise BackboneError(f"{p}: no such file", path=str(p))
    return p


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    for name in zf.namelist():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            return parts[0]
    raise BackboneError(f"{path}: no <archive>/data.pkl entry: not a torch zip checkpoint")


def _read_tensor(zf: zipfile.ZipFile, prefix: str, big_endian: bool, t: _LazyTensor, path: Path, key: str) -> np.ndarray:
    st = t.storage
    if st.storage_type not in _STORAGE_DTYPES:
        raise BackboneError(f"{path}: {key}: unsupported storage dtype {st.storage_type}")
    raw_code, itemsize = _STORAGE_DTYPES[st.storage_type]
    entry = f"{prefix}/data/{st.key}"
    try:
        info = zf.getinfo(entry)
    except KeyError:
        raise BackboneError(f"{path}: {key}: storage entry {entry} missing") from None
    if info.file_size != st.numel * itemsize:
        raise BackboneError(f"{path}: {key}: storage {entry} has {info.file_size} bytes, expected {st.numel * itemsize}")
    if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride) or t.offset < 0:
        raise BackboneError(f"{path}: {key}: negative size, stride or offset")
    count = int(np.prod(t.size, dtype=np.int64))
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if count else t.offset - 1
    if count and last >= st.numel:
        raise BackboneError(f"{path}: {key}: view {t.size}/{t.stride}+{t.offset} exceeds storage of {st.numel}")
    flat = np.frombuffer(zf.read(entry), dtype=("<" if not big_endian else ">") + raw_code)
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


def _load_state(path: Path) -> tuple[zipfile.ZipFile, str, bool, dict[str, Any]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BackboneError(f"{path}: not a torch zip checkpoint ({e})") from None
    try:
        prefix = _archive_prefix(zf, path)
        byteorder = b"little"
        if f"{prefix}/byteorder" in zf.namelist():
            byteorder = zf.read(f"{prefix}/byteorder").strip()
            if byteorder not in (b"little", b"big"):
                raise BackboneError(f"{path}: {prefix}/byteorder: unknown byte order {byteorder!r}")
        with zf.open(f"{prefix}/data.pkl") as f:
            try:
                obj = _AmaxUnpickler(f).load()
            except BackboneError:
                raise
            except Exception as e:  # any pickle-level failure is a malformed file
                raise BackboneError(f"{path}: {prefix}/data.pkl: cannot unpickle ({e})") from None
        if not isinstance(obj, dict) or "model_state_dict" not in obj:
            raise BackboneError(f"{path}: top-level object has no 'model_state_dict' (not an mto.save checkpoint)")
        state = obj["model_state_dict"]
        if not isinstance(state, dict):
            raise BackboneError(f"{path}: model_state_dict is {type(state).__name__}, not a dict")
        return zf, prefix, byteorder == b"big", state
    except BaseException:
        zf.close()
        raise


def list_state_keys(path: str | Path) -> list[str]:
    """The names in ``model_state_dict`` (reads only ``data.pkl``)."""
    p = _resolve_path(path)
    zf, _, _, state = _load_state(p)
    zf.close()
    return list(state)


def read_amax(path: str | Path) -> dict[str, AmaxPair]:
    """Module name -> its weight/input quantizer ``_amax`` (float32, shapes as saved).

    ``path`` is ``backbone.pt`` or a directory holding it. Only the selected
    storages are read from the archive.
    """
    p = _resolve_path(path)
    zf, prefix, big_endian, state = _load_state(p)
    found: dict[str, dict[str, np.ndarray]] = {}
    with zf:
        for key, value in state.items():
            if not isinstance(key, str):
                continue
            for suffix, slot in ((_WEIGHT_SUFFIX, "weight"), (_INPUT_SUFFIX, "input")):
                if key.endswith(suffix):
                    if not isinstance(value, _LazyTensor):
                        raise BackboneError(f"{p}: {key}: value is {type(value).__name__}, not a tensor")
                    module = key[: -len(suffix)]
                    found.setdefault(module, {})[slot] = _read_tensor(zf, prefix, big_endian, value, p, key)
    return {m: AmaxPair(weight=d.get("weight"), input=d.get("input")) for m, d in found.items()}
