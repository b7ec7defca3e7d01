"""Reading checkpoints: layout (names, dtypes, shapes, shards) and individual tensors.

Layout comes from the Rust reader, which validates every header completely before anything
else happens; tensors are read one at a time, never the whole checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dqfast import _core

__all__ = ["TensorMeta", "CheckpointInfo", "FLOAT_DTYPES", "open_checkpoint", "read_tensor", "to_float32"]


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str


@dataclass
class CheckpointInfo:
    root: Path
    files: list[Path]
    tensors: dict[str, TensorMeta]
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def first_metadata(self) -> dict[str, str]:
        return self.metadata.get(str(self.files[0]), {}) if self.files else {}


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Validate and describe a ``.safetensors`` file or a (sharded) checkpoint directory (through
    its diffusers variant inside :func:`dqfast.hub.input_variant`; ``root`` is then what was opened)."""
    from dqfast.hub import variant_path

    raw = json.loads(_core.read_checkpoint(str(variant_path(Path(path)))))
    tensors: dict[str, TensorMeta] = {}
    files = []
    metadata = {}
    for f in raw["files"]:
        files.append(Path(f["path"]))
        metadata[f["path"]] = f["metadata"]
        for t in f["tensors"]:
            tensors[t["name"]] = TensorMeta(t["name"], t["dtype"], tuple(t["shape"]), t["nbytes"], f["path"])
    return CheckpointInfo(Path(raw["root"]), files, tensors, metadata)


_NUMPY = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "U64": np.uint64,
    "BF16": np.uint16,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
    "F8_E8M0": np.uint8,
}


#: Float storage dtypes :func:`to_float32` decodes to their values (every other dtype is integer
#: or bool: ``astype`` would give bit patterns or counts, not values).
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def to_float32(dtype: str, raw: np.ndarray) -> np.ndarray:
    """Decode raw storage (as returned by :func:`read_tensor` with ``raw=True``) to float32."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return np.frombuffer(_core.e4m3_to_f32(raw.tobytes()), dtype=np.float32).reshape(raw.shape)
    if dtype == "F8_E5M2":
        # e5m2 is the high byte of an IEEE half (same sign/exponent layout): exact, NaN/inf kept.
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if dtype == "F8_E8M0":
        # Exponent-only scale: 2^(b - 127); 0xFF is NaN (OCP MX spec).
        scale = np.ldexp(np.float32(1.0), np.minimum(raw, 0xFE).astype(np.int32) - 127)
        out: np.ndarray = np.where(raw == 0xFF, np.float32(np.nan), scale).astype(np.float32)
        return out
    return raw.astype(np.float32)


def read_tensor(path: str | os.PathLike[str], name: str, *, raw: bool = False) -> np.ndarray:
    """One tensor as numpy. BF16 and F8_E4M3 come back as float32 unless ``raw`` (then their
    bit patterns as uint16 / uint8)."""
    dtype, shape, data = _core.read_tensor(str(path), name)
    arr: np.ndarray = np.frombuffer(data, dtype=_NUMPY[dtype]).reshape(shape)
    if raw or dtype not in ("BF16", "F8_E4M3"):
        return arr
    return to_float32(dtype, arr)
