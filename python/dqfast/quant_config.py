"""Quantization-config resolution shared by the builders, ``inspect`` and the runtime.

Accepted forms (the ones SGLang Diffusion and vLLM-Omni read):
- flat ``config.json["quantization_config"]`` with ``quant_method: modelopt`` and ``quant_algo``
  FP8 / FP8_PER_CHANNEL_PER_TOKEN / NVFP4 / MIXED_PRECISION (+ ``quantized_layers``);
- legacy sidecar ``hf_quant_config.json``: ``{"quantization": {"quant_algo", "exclude_modules", ...}}``;
- a config rebuilt from safetensors metadata (``_quantization_metadata`` / ``quantization_config``)
  when a directory has no config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqfast.errors import PlanError
from dqfast.presets import ignore_pattern_matches

__all__ = ["QuantConfig", "find_component_dir", "load_json", "resolve_quant_config", "MODELOPT_METHODS"]

MODELOPT_METHODS = frozenset({"modelopt", "modelopt_fp4", "modelopt_fp8", "modelopt_mixed"})
KNOWN_ALGOS = frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_NVFP4", "MIXED_PRECISION"})


@dataclass
class QuantConfig:
    """A normalized view of a checkpoint's quantization config."""

    quant_algo: str
    ignore: list[str] = field(default_factory=list)
    quantized_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_size: int | None = None
    producer: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def is_ignored(self, module: str) -> bool:
        return any(ignore_pattern_matches(p, module) for p in self.ignore)

    def algo_for(self, module: str) -> str | None:
        """The algorithm a module is quantized with, or None when it stays unquantized."""
        if self.is_ignored(module):
            return None
        if self.quant_algo != "MIXED_PRECISION":
            return self.quant_algo
        if module in self.quantized_layers:
            return str(self.quantized_layers[module]["quant_algo"]).upper()
        for prefix, spec in self.quantized_layers.items():
            if module.startswith(prefix + "."):
                return str(spec["quant_algo"]).upper()
        return None


def load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise PlanError(f"{path}: expected a JSON object")
    return v


def find_component_dir(path: str | os.PathLike[str], component: str = "transformer") -> Path:
    """An export root or its component subfolder — whichever holds config.json (SGLang's rule).
    ``path`` may be a hub id (``org/name``, ``hf://org/name@rev/sub``) in the local hub cache."""
    from dqfast.hub import resolve_input

    p = resolve_input(path)
    if not p.exists():
        raise PlanError(f"{p}: does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / component / "config.json").is_file():
        return p / component
    if p.is_dir() and any(p.glob("*.safetensors")):
        return p
    raise PlanError(f"{p}: no config.json here or in {component}/")


def _normalize(cfg: dict[str, Any], source: str) -> QuantConfig | None:
    method = str(cfg.get("quant_method", cfg.get("method", ""))).lower()
    producer = cfg.get("producer") or {}
    if method not in MODELOPT_METHODS and producer.get("name") != "modelopt":
        return None
    algo = cfg.get("quant_algo")
    if algo is None and isinstance(cfg.get("quantization"), dict):
        algo = cfg["quantization"].get("quant_algo")
    if algo is None:
        algo = {"modelopt_fp4": "NVFP4", "modelopt_fp8": "FP8", "modelopt_mixed": "MIXED_PRECISION"}.get(method)
    if algo is None:
        raise PlanError(f"{source}: modelopt quantization config without quant_algo")
    algo = str(algo).upper()
    if algo not in KNOWN_ALGOS:
        raise PlanError(f"{source}: unsupported quant_algo '{algo}' (known: {', '.join(sorted(KNOWN_ALGOS))})")
    ignore = cfg.get("ignore", cfg.get("exclude_modules")) or []
    group_size = cfg.get("group_size")
    if group_size is None:
        for g in (cfg.get("config_groups") or {}).values():
            gs = (g.get("weights") or {}).get("group_size")
            if gs:
                group_size = int(gs)
    layers = cfg.get("quantized_layers") or {}
    if algo == "MIXED_PRECISION" and not layers:
        raise PlanError(f"{source}: MIXED_PRECISION config without quantized_layers")
    return QuantConfig(
        quant_algo=algo,
        ignore=list(ignore),
        quantized_layers=dict(layers),
        group_size=group_size,
        producer=dict(producer),
        source=source,
        raw=dict(cfg),
    )


def resolve_quant_config(component_dir: str | os.PathLike[str]) -> QuantConfig | None:
    """The quantization config of a component directory, from whichever form it carries."""
    d = Path(component_dir)
    cfg_path = d / "config.json"
    if cfg_path.is_file():
        qc = load_json(cfg_path).get("quantization_config")
        if isinstance(qc, dict):
            return _normalize(qc, str(cfg_path))
    legacy = d / "hf_quant_config.json"
    if legacy.is_file():
        q = load_json(legacy).get("quantization") or {}
        flat = {
            "quant_method": "modelopt",
            "quant_algo": q.get("quant_algo"),
            "ignore": q.get("exclude_modules") or [],
            "group_size": q.get("group_size"),
            "quantized_layers": q.get("quantized_layers") or {},
            "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
        }
        return _normalize(flat, str(legacy))
    return _from_safetensors_metadata(d)


def _from_safetensors_metadata(d: Path) -> QuantConfig | None:
    from dqfast.reader import open_checkpoint

    try:
        info = open_checkpoint(d)
    except Exception:
        return None
    md = info.first_metadata()
    for key in ("_quantization_metadata", "quantization_config"):
        if key in md:
            try:
                cfg = json.loads(md[key])
            except json.JSONDecodeError:
                continue
            if isinstance(cfg, dict):
                return _normalize(cfg, f"{info.files[0]} metadata '{key}'")
    return _from_tensor_families(info)


def _from_tensor_families(info: Any) -> QuantConfig | None:
    """SGLang's last resort (``runtime/utils/quantization_utils.py``): infer the config from the
    tensors — NVFP4 where ``.weight`` is U8 with an F8_E4M3 ``.weight_scale`` of ndim >= 2
    (group = 2 * K/2 / scale columns), FP8 where ``.weight`` is F8_E4M3; every other weight
    module is excluded."""
    weights = {n[: -len(".weight")]: t for n, t in info.tensors.items() if n.endswith(".weight")}
    nv, fp8, other = [], [], []
    group = None
    for m, w in weights.items():
        ws = info.tensors.get(f"{m}.weight_scale")
        if w.dtype == "U8" and ws is not None and ws.dtype == "F8_E4M3" and len(ws.shape) >= 2 and len(w.shape) == 2:
            nv.append(m)
            group = 2 * w.shape[1] // max(ws.shape[-1], 1)
        elif w.dtype == "F8_E4M3":
            fp8.append(m)
        else:
            other.append(m)
    if not nv and not fp8:
        return None
    source = f"{info.root}: inferred from tensor dtypes (no config)"
    if nv and fp8:
        layers = {m: {"quant_algo": "NVFP4", "group_size": group} for m in nv}
        layers.update({m: {"quant_algo": "FP8"} for m in fp8})
        return QuantConfig("MIXED_PRECISION", ignore=sorted(other), quantized_layers=layers, group_size=group, source=source)
    if nv:
        return QuantConfig("NVFP4", ignore=sorted(other), group_size=group, source=source)
    return QuantConfig("FP8", ignore=sorted(other), source=source)


def load_modelopt_export(
    hf_dir: str | os.PathLike[str], component: str, algo_ok: Callable[[str], bool], what: str
) -> tuple[Path, dict[str, Any], QuantConfig]:
    """Locate a ModelOpt HF export's component dir, its config and its quantization config,
    refusing exports that are not ModelOpt or whose ``quant_algo`` this builder does not take."""
    export_dir = find_component_dir(hf_dir, component)
    cfg_path = export_dir / "config.json"
    export_cfg = load_json(cfg_path) if cfg_path.is_file() else {}
    qc = resolve_quant_config(export_dir)
    if qc is None:
        raise PlanError(f"{cfg_path}: no ModelOpt quantization_config (quant_method must be 'modelopt')")
    if not algo_ok(qc.quant_algo):
        raise PlanError(f"{qc.source}: quant_algo is {qc.quant_algo}; this builder takes {what} exports")
    return export_dir, export_cfg, qc


def load_float_base(base_dir: str | os.PathLike[str], component: str, builder: str) -> tuple[Path, dict[str, Any]]:
    """A BF16/FP16/FP32 transformer dir and its config; an already quantized one is refused."""
    d = find_component_dir(base_dir, component)
    cfg = load_json(d / "config.json") if (d / "config.json").is_file() else {}
    if resolve_quant_config(d) is not None:
        raise PlanError(f"{d}: already quantized; {builder} takes a BF16/FP16/FP32 transformer")
    return d, cfg
