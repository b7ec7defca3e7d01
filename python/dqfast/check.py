"""``dqfast check``: what a serving engine will do with each tensor of a checkpoint, by the rules in
``dqfast.targets`` — on CPU, reading only headers and config (nothing is loaded onto a GPU, no
tensor data is read). Works on any ModelOpt-style transformer directory (dqfast's, SGLang's,
ModelOpt's, a downloaded one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqfast.errors import PlanError
from dqfast.models import detect_preset
from dqfast.quant_config import find_component_dir, load_json, resolve_quant_config
from dqfast.reader import open_checkpoint
from dqfast.targets import Target, get_target

__all__ = ["LayerVerdict", "CheckReport", "check_checkpoint"]


@dataclass
class LayerVerdict:
    module: str
    stored: str  # BF16 | FP8 | FP8 per-channel | NVFP4 (what the checkpoint holds)
    outcome: str  # "quantized" | "bf16" | "dequantized" | "error"
    detail: str  # e.g. "quantized as NVFP4", or the reason of an error


@dataclass
class CheckReport:
    target: str
    engine_version: str
    family: str
    config_error: str | None = None
    layers: list[LayerVerdict] = field(default_factory=list)

    def modules(self, outcome: str) -> set[str]:
        return {v.module for v in self.layers if v.outcome == outcome}

    @property
    def status(self) -> str:
        if self.config_error or self.modules("error"):
            return "fails"
        return "loads-bf16" if self.modules("dequantized") else "loads"

    def summary(self) -> str:
        if self.config_error:
            return f"{self.target}: does not load: {self.config_error}"
        err, deq = self.modules("error"), self.modules("dequantized")
        q = self.modules("quantized")
        if err:
            return f"{self.target}: does not load: {len(err)} layer(s) fail, e.g. {sorted(err)[0]}"
        extra = f", {len(deq)} quantized layer(s) dequantized to BF16" if deq else ""
        return f"{self.target}: loads ({len(q)} layer(s) quantized{extra})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine_version,
            "family": self.family,
            "status": self.status,
            "config_error": self.config_error,
            "layers": [vars(v) for v in self.layers],
        }


def _stored(tensors: dict, module: str) -> str:
    w = tensors[f"{module}.weight"]
    ws = tensors.get(f"{module}.weight_scale")
    if w.dtype == "U8" and ws is not None and ws.dtype == "F8_E4M3":
        return "NVFP4"
    if w.dtype in ("F8_E4M3", "F8_E5M2"):
        n = 1
        for d in ws.shape if ws is not None else ():
            n *= d
        return "FP8" if n <= 1 else "FP8 per-channel"
    return "BF16"


def _engine_algo(t: Target, family: str, qc: Any, module: str) -> tuple[str | None, str]:
    """The algorithm the engine builds ``module`` with (None: unquantized), and why."""
    if not t.model_quantizes(family, module):
        return None, f"{t.name}'s {family} model class does not quantize this layer ({t.quantized_modules_source})"
    hit = t.ignored(qc.ignore, module)
    if hit is not None:
        return None, f"matched by ignore entry '{hit}' ({t.ignore_matching})"
    if qc.quant_algo != "MIXED_PRECISION":
        return qc.quant_algo, ""
    layers = qc.quantized_layers
    fused = t.packed_layer(module)
    if fused is not None and not t.mixed_resolves_packed and fused not in layers:
        return None, f"fused layer {fused} not resolvable from per-shard quantized_layers ({t.mixed_source})"
    spec = layers.get(module) or next((s for p, s in layers.items() if module.startswith(p + ".")), None)
    if spec is None:
        return None, "not listed in quantized_layers"
    return str(spec.get("quant_algo", "")).upper(), ""


def _check_one(t: Target, d: Path, family: str, qc: Any, tensors: dict) -> CheckReport:
    rep = CheckReport(t.name, t.engine_version, family)
    if qc is not None and qc.quant_algo not in t.algos:
        rep.config_error = f"quant_algo {qc.quant_algo} is not accepted ({t.algos_source})"
        return rep
    linears = sorted(n[: -len(".weight")] for n, m in tensors.items() if n.endswith(".weight") and len(m.shape) == 2)
    for m in linears:
        stored = _stored(tensors, m)
        algo, why = _engine_algo(t, family, qc, m) if qc is not None else (None, "no quantization config")
        if stored == "BF16":
            if algo is None:
                rep.layers.append(LayerVerdict(m, stored, "bf16", "loaded as BF16"))
            else:
                rep.layers.append(LayerVerdict(m, stored, "error", f"BF16 weight for a layer {t.name} quantizes as {algo} (no scales)"))
            continue
        if algo is None:
            if stored.startswith("FP8") and t.fp8_into_bf16 == "dequantized":
                rep.layers.append(LayerVerdict(m, stored, "dequantized", f"loaded as BF16 (dequantized): {why}"))
            else:
                rep.layers.append(LayerVerdict(m, stored, "error", f"{stored} weight for an unquantized (BF16) layer: {why}"))
            continue
        base = "FP8" if stored.startswith("FP8") else stored
        if not algo.startswith(base) and not (base == "NVFP4" and algo == "W4A16_NVFP4"):
            rep.layers.append(LayerVerdict(m, stored, "error", f"{stored} weight for a layer {t.name} builds as {algo}"))
        elif stored == "FP8 per-channel" and "channel" not in t.fp8_weight_scales:
            rep.layers.append(LayerVerdict(m, stored, "error", f"per-channel weight_scale; {t.name} takes per-tensor only"))
        else:
            rep.layers.append(LayerVerdict(m, stored, "quantized", f"quantized as {algo}"))
    return rep


def check_checkpoint(path: str | os.PathLike[str], target: str = "any") -> list[CheckReport]:
    """One report per engine of ``target`` (``sglang``, ``vllm-omni``, or ``any`` = both)."""
    targets = get_target(target)
    d = find_component_dir(path)
    cfg = load_json(d / "config.json") if (d / "config.json").is_file() else {}
    cfg_error: str | None = None
    try:
        qc = resolve_quant_config(d)
    except PlanError as e:
        qc, cfg_error = None, str(e)
    family = detect_preset(cfg).name
    tensors = open_checkpoint(d).tensors
    reports = []
    for t in targets:
        if cfg_error:
            reports.append(CheckReport(t.name, t.engine_version, family, config_error=cfg_error))
        else:
            reports.append(_check_one(t, d, family, qc, tensors))
    return reports
