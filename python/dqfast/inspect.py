"""``dqfast inspect``: what a checkpoint holds, how it is quantized, and what is wrong with it."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dqfast import _core
from dqfast.errors import PlanError
from dqfast.formats import FORMATS, MIXED_PRECISION, WeightFormat, classify
from dqfast.plan import split_module
from dqfast.quant_config import QuantConfig, load_json, resolve_quant_config
from dqfast.reader import CheckpointInfo, open_checkpoint, read_tensor

__all__ = ["InspectReport", "inspect_checkpoint"]

# Scale tensors are small; reading them all stays cheap even for 14B models.
_MAX_SCALE_BYTES = 64 << 20


@dataclass
class InspectReport:
    path: str
    files: int
    tensors: int
    total_bytes: int
    dtypes: dict[str, int]
    class_name: str | None
    quant_algo: str | None
    quant_config_source: str | None
    ignore: list[str]
    modules: dict[str, int]
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module_kind(parts: dict[str, Any]) -> str:
    """The module's format family (``dqfast.formats``), ``other`` without a weight, else the
    weight's own dtype."""
    f = classify(parts)
    if f is not None:
        return f.kind
    w = parts.get("weight")
    return "other" if w is None else str(w.dtype).lower()


def _format_problems(m: str, f: WeightFormat, parts: dict[str, Any], qc: QuantConfig | None) -> list[str]:
    """What a layer of format ``f`` lacks or has wrong: its tensors (``f.tensors``) and the shape
    of its block scales."""
    problems: list[str] = []
    label = f.kind.upper()  # FP8 per-channel is reported as FP8
    for s in f.tensors:
        if s in parts:
            continue
        if s != "input_scale":
            problems.append(f"{m}: {label} weight without {s}")
            continue
        # Only a static-activation algo needs it, and the config says which the layer has.
        algo = qc.algo_for(m) if qc is not None else None
        if algo is not None and any(g.kind == f.kind and g.needs_input_scale(algo) for g in FORMATS.values()):
            problems.append(f"{m}: {label} weight without {s} (quant_algo {algo} is static)")
    w, ws = parts["weight"], parts.get("weight_scale")
    if f.scale_per == "block" and ws is not None:
        want = f.block_scale_shape(w.shape)
        if want is None or list(ws.shape) != want:
            k = w.shape[-1] * f.elements_per_byte if w.shape else 0
            need = f"needs K % {f.block} == 0 and weight_scale {want}, has {list(ws.shape)}"
            problems.append(f"{m}: {label} weight {list(w.shape)} (K = {k} elements) {need}")
        elif f.scale_nan_byte is not None and ws.nbytes <= _MAX_SCALE_BYTES:
            n = int((read_tensor(ws.file, ws.name, raw=True) == f.scale_nan_byte).sum())
            if n:
                problems.append(f"{m}: {n} NaN scale byte(s) (0x{f.scale_nan_byte:02X}, the scale's NaN code) in weight_scale")
    return problems


def inspect_checkpoint(path: str | os.PathLike[str]) -> InspectReport:
    p = Path(path)
    comp = p
    if p.is_dir() and not (p / "config.json").is_file() and (p / "transformer" / "config.json").is_file():
        comp = p / "transformer"
    info: CheckpointInfo = open_checkpoint(comp)
    cfg = load_json(comp / "config.json") if comp.is_dir() and (comp / "config.json").is_file() else {}
    qc: QuantConfig | None = resolve_quant_config(comp) if comp.is_dir() else None
    mods: dict[str, dict[str, Any]] = {}
    for name, tmeta in info.tensors.items():
        m, suffix = split_module(name)
        mods.setdefault(m, {})[suffix or name] = tmeta
    kinds = Counter(_module_kind(parts) for parts in mods.values())
    problems: list[str] = []
    # NaN codes in any e4m3 tensor (FP8 weights, NVFP4 block scales): counted by the engine over
    # the whole data, in parallel. Builds refuse them unless repaired.
    nan_e4m3: dict[str, int] = _core.count_nan_e4m3(str(comp))
    for m, parts in mods.items():
        kind = _module_kind(parts)
        fmt = classify(parts)
        if fmt is not None and fmt.weight_dtype is not None:
            problems += _format_problems(m, fmt, parts, qc)
        for suffix, meta in parts.items():
            nan = nan_e4m3.get(meta.name, 0)
            if nan:
                problems.append(f"{m}: {nan} NaN byte(s) (0x7F/0xFF) in {suffix or meta.name} (repair with --repair-nan)")
        for s in ("weight_scale", "input_scale", "weight_scale_2"):
            meta = parts.get(s)
            if meta is None or meta.dtype != "F32" or meta.nbytes > _MAX_SCALE_BYTES:
                continue
            v = read_tensor(meta.file, meta.name).reshape(-1)
            try:
                # The engine's scale rule: finite, > 0 and a normal float32 (no zero/subnormal).
                _core.check_scales(v.tolist(), meta.name)
            except PlanError as e:
                problems.append(str(e))
        if qc is not None and kind == "float" and len(parts["weight"].shape) == 2 and qc.algo_for(m) not in (None,):
            if qc.quant_algo != MIXED_PRECISION:
                problems.append(f"{m}: float weight but not covered by the ignore list (loaders expect it quantized)")
    return InspectReport(
        path=str(comp),
        files=len(info.files),
        tensors=len(info.tensors),
        total_bytes=info.total_bytes,
        dtypes=dict(Counter(t.dtype for t in info.tensors.values())),
        class_name=cfg.get("_class_name"),
        quant_algo=qc.quant_algo if qc else None,
        quant_config_source=qc.source if qc else None,
        ignore=list(qc.ignore) if qc else [],
        modules=dict(kinds),
        problems=problems,
    )
