"""Quantization kernels for other converters: the builders' own Rust kernels on arrays.

Inputs are numpy arrays or torch CPU tensors (BF16, FP16, FP32; no torch import is needed here).
C-contiguous inputs are read in place, without a copy (others are made contiguous once); results
are written into arrays allocated here, or into ``out=`` (numpy or torch) when given; the work
runs with the GIL released on all cores. The bytes are the ones ``dqfast build`` writes: the same
kernels (``dqfast_core::fp8`` / ``nvfp4``) and the same scale rules (an all-zero weight gets scale 1,
a NaN or infinite weight is refused with :class:`~dqfast.errors.PlanError`).

numpy has no bfloat16 or float8: BF16 sources are passed as torch ``bfloat16`` tensors, ml_dtypes
``bfloat16`` arrays, or their bit patterns as ``uint16`` with ``dtype="BF16"`` (what
:func:`dqfast.read_tensor` with ``raw=True`` and :mod:`dqfast.stream` give); e4m3 results are
``uint8`` bit patterns (``torch.from_numpy(q).view(torch.float8_e4m3fn)`` for torch).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dqfast import _core
from dqfast.errors import PlanError

__all__ = [
    "Granularity",
    "Nvfp4Weight",
    "amax",
    "quantize_e4m3",
    "dequantize_e4m3",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "swap_nibbles",
]

Granularity = Literal["tensor", "channel", "block"]
Rounding = Literal["exact", "modelopt"]

_NUMPY_FLOAT = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_TORCH_FLOAT = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def _torch_as_numpy(t: Any, what: str) -> np.ndarray:
    """A numpy view of a torch CPU tensor's storage, as unsigned ints of the element size."""
    torch = sys.modules["torch"]
    if t.device.type != "cpu":
        raise PlanError(f"{what}: tensor is on {t.device}; dqfast.ops works on CPU tensors (call .cpu() first)")
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(t.element_size())
    if view is None:
        raise PlanError(f"{what}: unsupported tensor dtype {t.dtype}")
    a: np.ndarray = t.detach().view(view).numpy()
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[t.element_size()])


def _float_input(x: Any, dtype: str | None, what: str = "x") -> tuple[np.ndarray, str, tuple[int, ...]]:
    """(flat uint8 view of the element bytes, safetensors dtype, shape)."""
    if _is_torch(x):
        d = _TORCH_FLOAT.get(str(x.dtype))
        if d is None:
            raise PlanError(f"{what}: dtype {x.dtype} is not BF16, F16 or F32")
        a = _torch_as_numpy(x, what)
    else:
        a = np.asarray(x)
        d = _NUMPY_FLOAT.get(a.dtype.name)
        if d is None and a.dtype in (np.uint16, np.int16) and dtype is not None:
            d = dtype.upper()
        if d is None:
            hint = " (pass dtype='BF16' for bfloat16 bit patterns)" if a.dtype in (np.uint16, np.int16) else ""
            raise PlanError(f"{what}: dtype {a.dtype} is not bfloat16, float16 or float32{hint}")
    if dtype is not None and dtype.upper() != d:
        raise PlanError(f"{what}: dtype='{dtype}' given for a {d} input")
    if not a.dtype.isnative:
        raise PlanError(f"{what}: byte order must be native (little-endian)")
    shape = tuple(a.shape)
    return _flat_bytes(a), d, shape


def _flat_bytes(a: np.ndarray) -> np.ndarray:
    # reshape(-1) of a C-contiguous array is a view; anything else is copied once here.
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _byte_input(x: Any, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """A uint8 (e4m3 / packed FP4) input as a flat view, and its shape."""
    a = _torch_as_numpy(x, what) if _is_torch(x) else np.asarray(x)
    if a.dtype.itemsize != 1:
        raise PlanError(f"{what}: expected 1-byte elements (uint8 / float8 bits), got {a.dtype}")
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8), tuple(a.shape)


def _output(out: Any, shape: tuple[int, ...], dtype: type[np.generic], what: str, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, Any]:
    """(flat writable view the kernel fills, the object handed back to the caller)."""
    if out is None:
        a = np.empty(shape, dtype=dtype)
        return a.reshape(-1), a
    want = np.dtype(dtype)
    if _is_torch(out):
        if want.kind == "f" and str(out.dtype) != "torch.float32":
            raise PlanError(f"{what}: dtype {out.dtype} does not hold float32 results")
        a = _torch_as_numpy(out, what).view(want) if out.element_size() == want.itemsize else _torch_as_numpy(out, what)
    else:
        a = out
    if not isinstance(a, np.ndarray):
        raise PlanError(f"{what}: must be a numpy array or a torch CPU tensor")
    if a.dtype.itemsize != want.itemsize or (want.kind == "f" and a.dtype != want):
        raise PlanError(f"{what}: dtype {a.dtype} does not hold {want} results")
    if a.size != int(np.prod(shape, dtype=np.int64)):
        raise PlanError(f"{what}: has {a.size} elements, expected shape {list(shape)}")
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise PlanError(f"{what}: must be C-contiguous and writable")
    if any(np.may_share_memory(a, i) for i in inputs):
        raise PlanError(f"{what}: overlaps an input")
    return a.reshape(-1).view(want), out


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows are the first dimension (output channels), columns everything after it (a 1-D
    tensor is one column)."""
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return rows, cols


def _blocks(granularity: str, rows: int, cols: int, block_size: tuple[int, int]) -> tuple[int, int]:
    if granularity == "tensor":
        return max(rows, 1), max(cols, 1)
    if granularity == "channel":
        return 1, max(cols, 1)
    if granularity == "block":
        bm, bn = (int(b) for b in block_size)
        if bm < 1 or bn < 1:
            raise PlanError(f"block_size {tuple(block_size)} must be positive")
        return bm, bn
    raise PlanError(f"granularity must be 'tensor', 'channel' or 'block', not '{granularity}'")


def _scale_shape(granularity: str, shape: tuple[int, ...], rows: int, cols: int, bm: int, bn: int) -> tuple[int, ...]:
    if granularity == "tensor":
        return (1,)
    if granularity == "channel":
        return (shape[0],) if shape else (1,)
    return (-(-rows // bm), -(-cols // bn))


def amax(
    x: Any,
    *,
    granularity: Granularity = "tensor",
    block_size: tuple[int, int] = (128, 128),
    dtype: str | None = None,
) -> np.ndarray:
    """max |x| (NaN if any element is NaN) per tensor (shape ``[1]``), per output channel (first
    dimension, shape ``[rows]``) or per ``block_size`` block of ``[rows, cols]`` (shape of the grid)."""
    flat, d, shape = _float_input(x, dtype)
    rows, cols = _rows_cols(shape)
    bm, bn = _blocks(granularity, rows, cols, block_size)
    grid = _core.ops_block_amax(flat, d, rows, cols, bm, bn)
    return np.asarray(grid, dtype=np.float32).reshape(_scale_shape(granularity, shape, rows, cols, bm, bn))


def quantize_e4m3(
    x: Any,
    scale: Any = None,
    *,
    granularity: Granularity = "tensor",
    block_size: tuple[int, int] = (128, 128),
    dtype: str | None = None,
    rounding: Rounding = "exact",
    saturation: Literal["clamp", "none"] = "clamp",
    out: Any = None,
) -> tuple[Any, np.ndarray]:
    """``e4m3(x / scale)``: returns ``(q, scale)`` with ``q`` the e4m3 bytes (uint8, shape of ``x``)
    and ``scale`` float32 (``[1]``, ``[rows]`` or the block grid: what the builders write as
    ``weight_scale``).

    Without ``scale`` it comes from ``x``'s own max |x| at ``granularity`` (``amax / 448``; an
    all-zero tensor, row or block gets 1), as ``dqfast build fp8 --from-bf16`` does. ``rounding``:
    ``"exact"`` (divide in float32, round once) or ``"modelopt"`` (the quotient rounded to the
    source dtype first, as ModelOpt's export). ``saturation``: ``"clamp"`` to ±448 or ``"none"``
    (torch's plain cast, NaN above 464).
    """
    flat, d, shape = _float_input(x, dtype)
    rows, cols = _rows_cols(shape)
    bm, bn = _blocks(granularity, rows, cols, block_size)
    sshape = _scale_shape(granularity, shape, rows, cols, bm, bn)
    if scale is None:
        grid = _core.ops_block_amax(flat, d, rows, cols, bm, bn)
        sc = np.asarray(_core.ops_weight_scales(grid, "fp8"), dtype=np.float32)
    else:
        sc = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
        if sc.size != int(np.prod(sshape)):
            raise PlanError(f"scale has {sc.size} values; {granularity} scales of shape {list(shape)} need shape {list(sshape)}")
        bad = np.flatnonzero(~(np.isfinite(sc) & (sc > 0)))
        if bad.size:
            raise PlanError(f"scale is {sc[bad[0]]} at index {bad[0]}; it must be finite and > 0")
    o, ret = _output(out, shape, np.uint8, "out", (flat,))
    mode = {"exact": "exact", "modelopt": "source_dtype"}.get(rounding)
    if mode is None:
        raise PlanError(f"rounding must be 'exact' or 'modelopt', not '{rounding}'")
    _core.ops_quantize_e4m3(flat, d, rows, cols, sc, bm, bn, mode, saturation, o)
    return ret, sc.reshape(sshape)


def dequantize_e4m3(
    q: Any,
    scale: Any,
    *,
    block_size: tuple[int, int] = (128, 128),
    out: Any = None,
) -> Any:
    """``float32(q) * scale`` (float32, shape of ``q``). The granularity follows ``scale``'s shape:
    one value (per tensor), ``[rows]`` (per output channel) or a 2-D grid of ``block_size`` blocks."""
    flat, shape = _byte_input(q, "q")
    rows, cols = _rows_cols(shape)
    sc = np.ascontiguousarray(scale, dtype=np.float32)
    if sc.size == 1:
        granularity = "tensor"
    elif sc.ndim == 1 and shape and sc.size == shape[0]:
        granularity = "channel"
    else:
        granularity = "block"
    bm, bn = _blocks(granularity, rows, cols, block_size)
    want = _scale_shape(granularity, shape, rows, cols, bm, bn)
    if granularity == "block" and tuple(sc.shape) != want:
        raise PlanError(f"scale shape {list(sc.shape)} matches neither [1], [rows] nor the {list(want)} grid of {tuple(block_size)} blocks")
    o, ret = _output(out, shape, np.float32, "out", (flat,))
    _core.ops_dequantize_e4m3(flat, rows, cols, sc.reshape(-1), bm, bn, o)
    return ret


@dataclass(frozen=True)
class Nvfp4Weight:
    """An NVFP4 tensor as checkpoints store it: ``weight`` (packed E2M1 codes, uint8 ``[..., K/2]``,
    low nibble = even element), ``weight_scale`` (e4m3 block-scale bytes, uint8 ``[..., K/16]``) and
    ``weight_scale_2`` (the float32 global scale)."""

    weight: Any
    weight_scale: Any
    weight_scale_2: np.float32


def quantize_nvfp4(
    x: Any,
    *,
    global_amax: float | None = None,
    dtype: str | None = None,
    out: tuple[Any, Any] | None = None,
) -> Nvfp4Weight:
    """NVFP4 of a float tensor whose last dimension ``K`` is a multiple of 16 (ModelOpt 0.47's bytes).

    ``weight_scale_2 = global_amax / 2688``; without ``global_amax`` it is ``x``'s own max |x|
    (an all-zero tensor gets 1), as ``dqfast build nvfp4 --from-bf16`` does. Tensors a loader fuses
    (q, k, v) share one global scale: pass ``global_amax=max(amax(q), amax(k), amax(v))``.
    ``out``: optional ``(packed, block_scales)`` arrays to write into.
    """
    flat, d, shape = _float_input(x, dtype)
    if len(shape) == 0:
        raise PlanError("x: NVFP4 needs at least one dimension")
    k = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if global_amax is None:
        a = _core.ops_block_amax(flat, d, 1, rows * k, 1, max(rows * k, 1))
    else:
        a = [float(global_amax)]
        if not (np.isfinite(a[0]) and a[0] > 0):
            raise PlanError(f"global_amax is {global_amax}; it must be finite and > 0")
    (wsf2,) = _core.ops_weight_scales(a, "nvfp4")
    if k % 16:
        raise PlanError(f"x: NVFP4 needs the last dimension to be a multiple of 16, got {k}")
    pshape, sshape = (*shape[:-1], k // 2), (*shape[:-1], k // 16)
    po, pret = _output(None if out is None else out[0], pshape, np.uint8, "out[0]", (flat,))
    so, sret = _output(None if out is None else out[1], sshape, np.uint8, "out[1]", (flat, po))
    _core.ops_quantize_nvfp4(flat, d, rows, k, wsf2, po, so)
    return Nvfp4Weight(pret, sret, np.float32(wsf2))


def dequantize_nvfp4(packed: Any, block_scales: Any, weight_scale_2: float, *, out: Any = None) -> Any:
    """float32 values (``[..., K]``) of NVFP4 packed codes and e4m3 block scales, computed as
    ModelOpt does: ``e2m1 * (f32(block_scale) * weight_scale_2)``."""
    p, pshape = _byte_input(packed, "packed")
    s, sshape = _byte_input(block_scales, "block_scales")
    if not pshape:
        raise PlanError("packed: needs at least one dimension")
    k = pshape[-1] * 2
    if tuple(sshape) != (*pshape[:-1], k // 16):
        raise PlanError(f"block_scales shape {list(sshape)} does not match packed {list(pshape)} (expected {[*pshape[:-1], k // 16]})")
    o, ret = _output(out, (*pshape[:-1], k), np.float32, "out", (p, s))
    _core.ops_dequantize_nvfp4(p, s, k, float(np.float32(weight_scale_2)), o)
    return ret


def swap_nibbles(x: Any, *, out: Any = None) -> Any:
    """Exchange the two 4-bit halves of every byte (FP4 element order; ``--swap-weight-nibbles``)."""
    flat, shape = _byte_input(x, "x")
    o, ret = _output(out, shape, np.uint8, "out", (flat,))
    _core.ops_swap_nibbles(flat, o)
    return ret
