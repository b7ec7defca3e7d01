"""``dqfast inspect``: what a checkpoint holds, how it is quantized, and what is wrong with it."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dqfast import _core
from dqfast.errors import PlanError
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
    w = parts.get("weight")
    if w is None:
        return "other"
    if w.dtype == "F8_E4M3":
        # MXFP8 (vLLM-Omni): e4m3 values with U8 E8M0 block scales [N, K/32].
        return "mxfp8" if "weight_scale" in parts and parts["weight_scale"].dtype == "U8" else "fp8"
    if w.dtype == "U8" and "weight_scale" in parts and parts["weight_scale"].dtype == "F8_E4M3":
        return "nvfp4"
    if w.dtype in ("BF16", "F16", "F32"):
        return "float"
    return w.dtype.lower()


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
        if kind == "fp8":
            for s in ("weight_scale",):
                if s not in parts:
                    problems.append(f"{m}: FP8 weight without {s}")
            if qc is not None and qc.quant_algo == "FP8" and "input_scale" not in parts:
                problems.append(f"{m}: FP8 weight without input_scale (quant_algo FP8 is static)")
        if kind == "mxfp8":
            w, ws, block = parts["weight"], parts["weight_scale"], _core.MXFP8_BLOCK
            want = [w.shape[0], w.shape[1] // block] if len(w.shape) == 2 else None
            if want is None or w.shape[1] % block or list(ws.shape) != want:
                problems.append(f"{m}: MXFP8 weight {list(w.shape)} needs K % {block} == 0 and weight_scale {want}, has {list(ws.shape)}")
            elif ws.nbytes <= _MAX_SCALE_BYTES and (n := int((read_tensor(ws.file, ws.name, raw=True) == 0xFF).sum())):
                problems.append(f"{m}: {n} NaN scale byte(s) (0xFF, E8M0 NaN) in weight_scale")
        if kind == "nvfp4":
            w, ws = parts["weight"], parts["weight_scale"]
            if len(w.shape) == 2 and len(ws.shape) == 2 and w.shape[1] * 2 != ws.shape[1] * 16:
                problems.append(f"{m}: weight {list(w.shape)} and weight_scale {list(ws.shape)} disagree on K")
            if "weight_scale_2" not in parts:
                problems.append(f"{m}: NVFP4 weight without weight_scale_2")
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
            if qc.quant_algo != "MIXED_PRECISION":
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
