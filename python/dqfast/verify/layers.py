"""Per-layer weight error of a quantized checkpoint against its high-precision base."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dqfast import _core
from dqfast.errors import CheckpointError, PlanError
from dqfast.formats import WeightFormat, classify, family_algos, weight_only_of_algo
from dqfast.quant_config import resolve_quant_config
from dqfast.reader import open_checkpoint

from ..runtime import quant as Q
from ..runtime.loader import _Reader, _tensor_files, read_quant_spec

# A layer whose weight SNR is this far below the median of layers with the same algo,
# or whose cosine falls under MIN_COSINE, is flagged as an outlier.
OUTLIER_DB_BELOW_MEDIAN = 6.0
MIN_COSINE = 0.99

#: ``progress(done, total, what)`` after each unit of work (a layer, a denoising step).
StepFn = Callable[[int, int, str], Any]


def _dequantize_fp8(reader: _Reader, module: str, swap_nibbles: bool) -> tuple[torch.Tensor, int]:
    w = reader.get(f"{module}.weight")
    scale = reader.get(f"{module}.weight_scale").float()
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
    return w.float() * s, 0


def _dequantize_nvfp4(reader: _Reader, module: str, swap_nibbles: bool) -> tuple[torch.Tensor, int]:
    w = reader.get(f"{module}.weight")
    block = reader.get(f"{module}.weight_scale")
    raw = block.view(torch.uint8)
    nan_bytes = int(((raw == 0x7F) | (raw == 0xFF)).sum())
    if swap_nibbles:
        w = Q.swap_nibbles(w)
    gs = reader.get(f"{module}.weight_scale_2").float().reshape(())
    return Q.nvfp4_dequantize(w, block, gs), nan_bytes


#: Dequantizer of each format family (``dqfast.formats``, ``WeightFormat.kind``) the runtime loads.
_DEQUANTIZE: dict[str, Callable[[_Reader, str, bool], tuple[torch.Tensor, int]]] = {"fp8": _dequantize_fp8, "nvfp4": _dequantize_nvfp4}


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _dequantize_block(reader: _Reader, module: str, fmt: WeightFormat) -> tuple[torch.Tensor, int]:
    """A weight-only block format (every ``_core.BLOCK_FORMATS`` entry): the engine's reference
    dequantization, in Rust; NaN scale bytes counted by the format's NaN code."""
    w = reader.get(f"{module}.weight")
    s = reader.get(f"{module}.weight_scale")
    rows, k = w.shape[0], w.shape[1] * fmt.elements_per_byte
    try:
        out = _core.block_dequantize(fmt.name, _raw(w), _raw(s), k)
    except PlanError as e:
        raise CheckpointError(f"{module}: {e}") from None
    nan_bytes = 0 if fmt.scale_nan_byte is None else int((s.view(torch.uint8) == fmt.scale_nan_byte).sum())
    return torch.frombuffer(bytearray(out), dtype=torch.float32).reshape(rows, k), nan_bytes


def _quant_spec(quant_dir: str | Path) -> tuple[str, bool]:
    """(quant_algo, swap_weight_nibbles): the runtime's reading of a ModelOpt config; the config
    reader's for a weight-only ``quant_method`` (which the runtime does not run)."""
    try:
        qc = resolve_quant_config(quant_dir)
    except PlanError:
        qc = None  # read_quant_spec says why, with the runtime's error
    if qc is not None and weight_only_of_algo(qc.quant_algo) is not None:
        return qc.quant_algo, False
    spec = read_quant_spec(quant_dir)
    return spec.quant_algo, spec.swap_weight_nibbles


def _metrics(ref: torch.Tensor, deq: torch.Tensor) -> dict:
    ref = ref.double().flatten()
    deq = deq.double().flatten()
    err = deq - ref
    signal = float((ref * ref).sum())
    noise = float((err * err).sum())
    denom = float(ref.norm() * deq.norm())
    return {
        "max_abs_err": float(err.abs().max()),
        "mean_abs_err": float(err.abs().mean()),
        "cosine": float((ref @ deq) / denom) if denom > 0 else float("nan"),
        "snr_db": 10 * math.log10(signal / noise) if noise > 0 else float("inf"),
    }


def layer_errors(base_dir: str | Path, quant_dir: str | Path, progress: StepFn | None = None) -> list[dict]:
    """For every quantized Linear in `quant_dir`: its dequantized weight vs `base_dir`'s.
    ``progress(done, total, module)`` is called after each layer.

    Each dict: module, algo, shape, max_abs_err, mean_abs_err, cosine, snr_db, nan (NaN in
    the dequantized weight or NaN scale bytes), nan_scale_bytes, outlier (see module constants).
    """
    quant_algo, swap_nibbles = _quant_spec(quant_dir)
    qreader = _Reader(_tensor_files(Path(quant_dir)))
    breader = _Reader(_tensor_files(Path(base_dir)))
    metas = open_checkpoint(quant_dir).tensors
    modules = sorted(name[: -len(".weight_scale")] for name in qreader.files if name.endswith(".weight_scale"))
    rows: list[dict] = []
    for module in modules:
        parts = {s: metas[f"{module}.{s}"] for s in ("weight", "weight_scale") if f"{module}.{s}" in metas}
        fmt = classify(parts)
        if fmt is None or fmt.weight_dtype is None:
            dtype = parts["weight"].dtype if "weight" in parts else "missing"
            raise CheckpointError(f"{module}.weight has dtype {dtype}; not a quantized weight")
        if fmt.weight_only:
            # Only under its own config: an e4m3 + U8 layer in a ModelOpt FP8 checkpoint is no MXFP8.
            if weight_only_of_algo(quant_algo) is not fmt:
                raise CheckpointError(f"{module}: {fmt.label} weights under quant_algo {quant_algo} are not verified")
            deq, nan_bytes = _dequantize_block(qreader, module, fmt)
        elif fmt.kind in _DEQUANTIZE:
            deq, nan_bytes = _DEQUANTIZE[fmt.kind](qreader, module, swap_nibbles)
        else:
            raise CheckpointError(f"{module}: {fmt.label} weights are not verified")
        # The config's name when it is of this family (FP8_PER_CHANNEL_PER_TOKEN), else the family's.
        algo = quant_algo if quant_algo in family_algos(fmt.kind) else fmt.kind.upper()
        base = breader.get(f"{module}.weight")
        if tuple(base.shape) != tuple(deq.shape):
            raise CheckpointError(f"{module}: base shape {tuple(base.shape)} != quantized {tuple(deq.shape)}")
        row: dict[str, Any] = {"module": module, "algo": algo, "shape": list(deq.shape)}
        row.update(_metrics(base.float(), deq))
        row["nan_scale_bytes"] = nan_bytes
        row["nan"] = bool(nan_bytes) or bool(torch.isnan(deq).any()) or math.isnan(row["cosine"])
        rows.append(row)
        if progress is not None:
            progress(len(rows), len(modules), module)
    for algo in {r["algo"] for r in rows}:
        finite = [r["snr_db"] for r in rows if r["algo"] == algo and math.isfinite(r["snr_db"])]
        median = statistics.median(finite) if finite else float("nan")
        for r in rows:
            if r["algo"] == algo:
                low = math.isfinite(median) and r["snr_db"] < median - OUTLIER_DB_BELOW_MEDIAN
                r["outlier"] = bool(r["nan"] or low or not (r["cosine"] >= MIN_COSINE))
    return rows
