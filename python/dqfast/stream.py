"""Streaming checkpoint I/O for other converters: read tensor by tensor, write shards atomically.

:class:`CheckpointReader` opens a ``.safetensors`` file or a sharded directory after dqfast's Rust
reader has validated every header (offsets, sizes, dtypes, the index), and hands out read-only
numpy views over a memory map: no copy, and the pages of a tensor are released from this process
once iteration moves past it, so a pass over a 30 GB checkpoint keeps about one tensor resident.

:class:`CheckpointWriter` takes ``(name, array)`` pairs and writes sharded safetensors through the
same Rust writer as the builders: every tensor's bytes are written once, at their final place,
under a staging directory that becomes the output directory only when :meth:`~CheckpointWriter.close`
succeeds (with the index json when there is more than one shard). An exception inside
``with CheckpointWriter(...)`` leaves nothing at the output path.

Raw element types: BF16 arrays are ``uint16`` bit patterns, F8 ``uint8`` (numpy has neither type);
``dqfast.ops`` takes them as they are (``dtype="BF16"``).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from dqfast import _core
from dqfast.errors import CheckpointError, PlanError
from dqfast.plan import parse_size
from dqfast.reader import _NUMPY

__all__ = ["TensorView", "CheckpointReader", "CheckpointWriter", "write_checkpoint", "safetensors_dtype"]


@dataclass(frozen=True)
class TensorView:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    file: str
    offset: int  # byte offset of the data in ``file``
    nbytes: int


class CheckpointReader:
    """Validated, memory-mapped, tensor-by-tensor access to a checkpoint (file or directory)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        raw = json.loads(_core.checkpoint_offsets(str(path)))
        self.root = Path(raw["root"])
        self.tensors: dict[str, TensorView] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self._maps: dict[str, mmap.mmap] = {}
        try:
            for f in raw["files"]:
                p = f["path"]
                self.metadata[p] = f["metadata"]
                with open(p, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size != f["size"]:
                        raise CheckpointError(f"{p}: changed while being opened ({f['size']} bytes validated, {size} now)")
                    if size:
                        self._maps[p] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                for t in f["tensors"]:
                    self.tensors[t["name"]] = TensorView(t["name"], t["dtype"], tuple(t["shape"]), p, t["offset"], t["nbytes"])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the files (views handed out before stay valid only while referenced)."""
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive: the map goes when it does
        self._maps.clear()

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        """A read-only numpy view of one tensor (no copy)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.root}: no tensor '{name}'")
        if t.nbytes == 0:
            return np.empty(t.shape, dtype=_NUMPY[t.dtype])
        m = self._maps.get(t.file)
        if m is None:
            raise PlanError("the reader is closed")
        return np.frombuffer(m, dtype=_NUMPY[t.dtype], count=t.nbytes // np.dtype(_NUMPY[t.dtype]).itemsize, offset=t.offset).reshape(
            t.shape
        )

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process (they stay in the page cache; a view still in
        use faults them back in)."""
        t = self.tensors[name]
        m = self._maps.get(t.file)
        if m is None or t.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = t.offset // page * page
        m.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, array)`` in file order; each tensor's pages are released when the next one is
        requested."""
        prev: str | None = None
        for name in sorted(self.tensors, key=lambda n: (self.tensors[n].file, self.tensors[n].offset)):
            if prev is not None:
                self.release(prev)
            yield name, self.get(name)
            prev = name
        if prev is not None:
            self.release(prev)


_TORCH_DTYPES = {
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float32": "F32",
    "torch.float64": "F64",
    "torch.uint8": "U8",
    "torch.int8": "I8",
    "torch.int16": "I16",
    "torch.int32": "I32",
    "torch.int64": "I64",
    "torch.bool": "BOOL",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
    "torch.uint16": "U16",
    "torch.uint32": "U32",
    "torch.uint64": "U64",
}
_NUMPY_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
    "bfloat16": "BF16",  # ml_dtypes
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def safetensors_dtype(array: Any) -> str:
    """The safetensors dtype name of a numpy array or torch tensor."""
    if type(array).__module__.startswith("torch"):
        d = _TORCH_DTYPES.get(str(array.dtype))
    else:
        d = _NUMPY_DTYPES.get(np.asarray(array).dtype.name)
    if d is None:
        raise PlanError(f"dtype {array.dtype} has no safetensors equivalent")
    return d


def _bytes_view(array: Any, dtype: str | None) -> tuple[np.ndarray, str, list[int]]:
    """(flat uint8 view of the element bytes, safetensors dtype, shape) without copying a
    C-contiguous input."""
    d = safetensors_dtype(array)
    if dtype is not None:
        size = np.dtype(_NUMPY[dtype]).itemsize if dtype in _NUMPY else None
        if size is None:
            raise PlanError(f"unknown safetensors dtype '{dtype}'")
        if size != np.dtype(_NUMPY[d]).itemsize:
            raise PlanError(f"dtype='{dtype}' given for {d} data (element sizes differ)")
        d = dtype
    if type(array).__module__.startswith("torch"):
        import sys

        torch = sys.modules["torch"]
        if array.device.type != "cpu":
            raise PlanError(f"tensor is on {array.device}; move it to the CPU first")
        a = array.detach().contiguous().view(-1).view(torch.uint8).numpy()
        return a, d, list(array.shape)
    a = np.asarray(array)
    if not a.dtype.isnative and a.dtype.itemsize > 1:
        raise PlanError("byte order must be native (little-endian)")
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8), d, list(a.shape)


class CheckpointWriter:
    """Sharded safetensors from ``(name, array)`` pairs, moved into place atomically on close.

    ``max_shard_size`` ("5GB", bytes) starts a new shard when the next tensor would pass it
    (huggingface's rule); shards are named ``<prefix>.safetensors`` or
    ``<prefix>-0000i-of-0000n.safetensors`` with ``<prefix>.safetensors.index.json``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        max_shard_size: str | int = "5GB",
        overwrite: bool = False,
        prefix: str = "diffusion_pytorch_model",
        metadata: dict[str, str] | None = None,
        always_index: bool = False,
        fsync: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        meta = {"format": "pt", **(metadata or {})}
        self._w: _core.StreamWriterCore | None = _core.StreamWriterCore(
            str(output_dir), overwrite, parse_size(max_shard_size), prefix, meta, always_index, fsync
        )
        self.shards: list[str] = []
        self.total_bytes = 0

    def _core(self) -> _core.StreamWriterCore:
        if self._w is None:
            raise PlanError(f"{self.output_dir}: the writer is closed")
        return self._w

    def write(self, name: str, array: Any, *, dtype: str | None = None, shard: str | None = None) -> None:
        """Append one tensor. ``dtype`` overrides the inferred safetensors dtype for raw bit
        patterns of the same element size (``"BF16"`` for ``uint16``, ``"F8_E4M3"`` for ``uint8``).
        ``shard``: the file it goes into (``"diffusion_pytorch_model-00002-of-00003.safetensors"``,
        e.g. its source tensor's, to keep a checkpoint's sharding); a writer uses named shards or
        ``max_shard_size`` shards, not both."""
        data, d, shape = _bytes_view(array, dtype)
        self._core().write_tensor(name, d, shape, data, shard)

    def write_file(self, name: str, content: str | bytes) -> None:
        """A non-tensor file of the output directory (``config.json``)."""
        self._core().write_file(name, content.encode() if isinstance(content, str) else bytes(content))

    def close(self) -> list[str]:
        """Finish: headers, index, fsync, then the output appears at ``output_dir``."""
        w = self._core()
        self._w = None
        self.shards, self.total_bytes = w.finish()
        return self.shards

    def abort(self) -> None:
        """Discard everything written (nothing appears at ``output_dir``)."""
        if self._w is not None:
            self._w.abort()
            self._w = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_checkpoint(output_dir: str | os.PathLike[str], tensors: Iterable[tuple[str, Any]], **options: Any) -> list[str]:
    """Write ``(name, array)`` pairs as a sharded checkpoint (options as :class:`CheckpointWriter`);
    returns the shard file names. Nothing is left at ``output_dir`` if the iterable raises."""
    with CheckpointWriter(output_dir, **options) as w:
        for name, array in tensors:
            w.write(name, array)
    return w.shards
