"""Quantization-config resolution shared by the builders, ``inspect`` and the runtime.

Accepted forms (the ones SGLang Diffusion and vLLM-Omni read):
- flat ``config.json["quantization_config"]`` with ``quant_method: modelopt`` and ``quant_algo``
  FP8 / FP8_PER_CHANNEL_PER_TOKEN / NVFP4 / MIXED_PRECISION (+ ``quantized_layers``);
- flat ``quant_method: mxfp8`` (vLLM-Omni's MXFP8, ``ignored_layers``): quant_algo ``MXFP8``;
- legacy sidecar ``hf_quant_config.json``: ``{"quantization": {"quant_algo", "exclude_modules", ...}}``;
- a config rebuilt from safetensors metadata (``_quantization_metadata`` / ``quantization_config``)
  when a directory has no config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqfast._files import read_regular, typed_error
from dqfast.errors import PlanError
from dqfast.formats import FP8, MIXED_PRECISION, NVFP4, algo_names, format_for_method
from dqfast.models import ignore_pattern_matches

__all__ = [
    "QuantConfig",
    "find_component_dir",
    "load_json",
    "load_json_if_present",
    "parse_json",
    "resolve_quant_config",
    "quantized_layer_entry",
    "MODELOPT_METHODS",
]

MODELOPT_METHODS = frozenset({"modelopt", "modelopt_fp4", "modelopt_fp8", "modelopt_mixed"})
#: The quant_algo names a ModelOpt config may carry (the format registry's).
KNOWN_ALGOS = algo_names("modelopt")


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
        if self.quant_algo != MIXED_PRECISION:
            return self.quant_algo
        entry = quantized_layer_entry(self.quantized_layers, module)
        return None if entry is None else str(entry["quant_algo"]).upper()


def quantized_layer_entry(quantized_layers: Mapping[str, Any], module: str) -> Any:
    """The MIXED_PRECISION ``quantized_layers`` entry of ``module``: its own, else the entry of
    the nearest listed ancestor (``blocks.0.attn`` covers ``blocks.0.attn.to_q``), else None.
    The one matcher: the builders' ``QuantConfig.algo_for`` and the runtime loader use it."""
    if module in quantized_layers:
        return quantized_layers[module]
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in quantized_layers:
            return quantized_layers[prefix]
    return None


#: Deeper than this is no model config: refused before anything walks it recursively.
MAX_JSON_DEPTH = 64
#: A config or index JSON larger than this is refused before it is read.
MAX_JSON_BYTES = 64 << 20


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN/Infinity)")


def _depth(v: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
    return deepest


def parse_json(text: str | bytes, source: str) -> Any:
    """Strict JSON (UTF-8, no NaN/Infinity, at most :data:`MAX_JSON_DEPTH` deep) or a
    PlanError naming ``source``: whatever is read here may be written back into an output, which
    must be strict JSON too."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise typed_error(PlanError, f"{source}: not UTF-8 ({e.reason} at byte {e.start})", source) from None
    try:
        v = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise typed_error(PlanError, f"{source}: JSON nested too deeply", source) from None
    except ValueError as e:  # JSONDecodeError, and the NaN/Infinity refusal
        raise typed_error(PlanError, f"{source}: not valid JSON: {e}", source) from None
    if _depth(v) > MAX_JSON_DEPTH:
        raise typed_error(PlanError, f"{source}: JSON nested more than {MAX_JSON_DEPTH} levels deep", source)
    return v


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object file (regular file, strict JSON, see :func:`parse_json`)."""
    v = parse_json(read_regular(path, "JSON file", PlanError, limit=MAX_JSON_BYTES), str(path))
    if not isinstance(v, dict):
        raise typed_error(PlanError, f"{path}: expected a JSON object, found {_json_type(v)}", path)
    return v


def load_json_if_present(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """:func:`load_json`, or None when nothing is at ``path`` (a FIFO or dangling link there is
    an error, not an absence)."""
    return load_json(path) if os.path.lexists(path) else None


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(v), "a number")


def _field(cfg: dict[str, Any], key: str, want: type | tuple[type, ...], source: str, what: str) -> Any:
    """``cfg[key]`` (None when absent or null) if it has JSON type ``want``, else a PlanError
    naming the file and the field."""
    v = cfg.get(key)
    if v is None:
        return None
    wants = want if isinstance(want, tuple) else (want,)
    if isinstance(v, bool) and bool not in wants:
        ok = False
    else:
        ok = isinstance(v, wants)
    if not ok:
        names = " or ".join(_json_type(w()) if w is not int else "an integer" for w in wants)
        raise typed_error(PlanError, f"{source}: field '{key}' must be {names}, found {_json_type(v)} {json.dumps(v)[:60]}", source)
    return v


def find_component_dir(path: str | os.PathLike[str], component: str = "transformer") -> Path:
    """An export root or its component subfolder — whichever holds config.json (SGLang's rule).
    ``path`` may be a hub id (``org/name``, ``hf://org/name@rev/sub``) in the local hub cache."""
    from dqfast.hub import resolve_input

    p = resolve_input(path)
    if not p.exists():
        raise PlanError(f"{p}: does not exist", path=str(p))
    # lexists: a config.json that is a FIFO or a dangling link is this dir's config (and then
    # refused when read), never skipped.
    if os.path.lexists(p / "config.json"):
        return p
    if os.path.lexists(p / component / "config.json"):
        return p / component
    if p.is_dir() and any(p.glob("*.safetensors")):
        return p
    raise PlanError(f"{p}: no config.json here or in {component}/", path=str(p))


def _str_list(cfg: dict[str, Any], key: str, source: str) -> list[str] | None:
    v = _field(cfg, key, list, source, key)
    if v is not None and not all(isinstance(x, str) for x in v):
        raise typed_error(PlanError, f"{source}: field '{key}' must be a list of strings", source)
    return v


def _normalize(cfg: dict[str, Any], source: str) -> QuantConfig | None:
    method = _field(cfg, "quant_method", str, source, "") or _field(cfg, "method", str, source, "") or ""
    method = method.lower()
    producer = _field(cfg, "producer", dict, source, "") or {}
    own = format_for_method(method)
    if own is not None:  # a weight-only format (vLLM-Omni's MXFP8, dqfast.weight_only): exact-name ignore list
        ignored = _str_list(cfg, own.ignore_key, source)
        ignored = _str_list(cfg, "modules_to_not_convert", source) if ignored is None else ignored
        return QuantConfig(own.algos[0], ignore=list(ignored or []), source=source, raw=dict(cfg))
    if method not in MODELOPT_METHODS and producer.get("name") != "modelopt":
        return None
    algo = _field(cfg, "quant_algo", str, source, "")
    quantization = _field(cfg, "quantization", dict, source, "")
    if algo is None and quantization is not None:
        algo = _field(quantization, "quant_algo", str, f"{source} 'quantization'", "")
    if algo is None:
        algo = {"modelopt_fp4": NVFP4.algos[0], "modelopt_fp8": FP8.algos[0], "modelopt_mixed": MIXED_PRECISION}.get(method)
    if algo is None:
        raise typed_error(PlanError, f"{source}: modelopt quantization config without quant_algo", source)
    algo = algo.upper()
    if algo not in KNOWN_ALGOS:
        raise typed_error(PlanError, f"{source}: unsupported quant_algo '{algo}' (known: {', '.join(sorted(KNOWN_ALGOS))})", source)
    ignore = _str_list(cfg, "ignore", source)
    if ignore is None:
        ignore = _str_list(cfg, "exclude_modules", source)
    group_size = _field(cfg, "group_size", int, source, "")
    if group_size is None:
        for name, g in (_field(cfg, "config_groups", dict, source, "") or {}).items():
            if not isinstance(g, dict):
                raise typed_error(PlanError, f"{source}: field 'config_groups.{name}' must be an object", source)
            weights = _field(g, "weights", dict, f"{source} 'config_groups.{name}'", "") or {}
            gs = _field(weights, "group_size", int, f"{source} 'config_groups.{name}.weights'", "")
            if gs:
                group_size = gs
    if group_size is not None and group_size <= 0:
        raise typed_error(PlanError, f"{source}: field 'group_size' is {group_size}; it must be > 0", source)
    layers = _field(cfg, "quantized_layers", dict, source, "") or {}
    for name, spec in layers.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("quant_algo"), str):
            raise typed_error(PlanError, f"{source}: field 'quantized_layers.{name}' must be an object with a string 'quant_algo'", source)
    if algo == MIXED_PRECISION and not layers:
        raise typed_error(PlanError, f"{source}: MIXED_PRECISION config without quantized_layers", source)
    return QuantConfig(
        quant_algo=algo,
        ignore=list(ignore or []),
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
    cfg = load_json_if_present(cfg_path)
    if cfg is not None and cfg.get("quantization_config") is not None:
        return _normalize(_field(cfg, "quantization_config", dict, str(cfg_path), ""), str(cfg_path))
    legacy = d / "hf_quant_config.json"
    legacy_cfg = load_json_if_present(legacy)
    if legacy_cfg is not None:
        q = _field(legacy_cfg, "quantization", dict, str(legacy), "") or {}
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
            source = f"{info.files[0]} metadata '{key}'"
            cfg = parse_json(md[key], source)
            if isinstance(cfg, dict):
                return _normalize(cfg, source)
    return _from_tensor_families(info)


def _from_tensor_families(info: Any) -> QuantConfig | None:
    """SGLang's last resort (``runtime/utils/quantization_utils.py``): infer the config from the
    tensors — NVFP4 where ``.weight`` is U8 with an F8_E4M3 ``.weight_scale`` of ndim >= 2
    (group = 2 * K/2 / scale columns), FP8 where ``.weight`` is F8_E4M3; every other weight
    module is excluded."""
    weights = {n[: -len(".weight")]: t for n, t in info.tensors.items() if n.endswith(".weight")}
    nv, fp8, other = [], [], []
    group = None
    # SGLang's own test, not dqfast.formats.classify: its extra ndim conditions are what it loads.
    for m, w in weights.items():
        ws = info.tensors.get(f"{m}.weight_scale")
        if w.dtype == NVFP4.weight_dtype and ws is not None and ws.dtype == NVFP4.scale_dtype and len(ws.shape) >= 2 and len(w.shape) == 2:
            nv.append(m)
            group = 2 * w.shape[1] // max(ws.shape[-1], 1)
        elif w.dtype == FP8.weight_dtype:
            fp8.append(m)
        else:
            other.append(m)
    if not nv and not fp8:
        return None
    source = f"{info.root}: inferred from tensor dtypes (no config)"
    if nv and fp8:
        layers = {m: {**NVFP4.layer_entry(), "group_size": group} for m in nv}
        layers.update({m: FP8.layer_entry() for m in fp8})
        return QuantConfig(MIXED_PRECISION, ignore=sorted(other), quantized_layers=layers, group_size=group, source=source)
    if nv:
        return QuantConfig(NVFP4.algos[0], ignore=sorted(other), group_size=group, source=source)
    return QuantConfig(FP8.algos[0], ignore=sorted(other), source=source)


def load_modelopt_export(
    hf_dir: str | os.PathLike[str], component: str, algo_ok: Callable[[str], bool], what: str
) -> tuple[Path, dict[str, Any], QuantConfig]:
    """Locate a ModelOpt HF export's component dir, its config and its quantization config,
    refusing exports that are not ModelOpt or whose ``quant_algo`` this builder does not take."""
    export_dir = find_component_dir(hf_dir, component)
    cfg_path = export_dir / "config.json"
    export_cfg = load_json_if_present(cfg_path) or {}
    qc = resolve_quant_config(export_dir)
    if qc is None:
        raise PlanError(f"{cfg_path}: no ModelOpt quantization_config (quant_method must be 'modelopt')")
    if not algo_ok(qc.quant_algo):
        raise PlanError(f"{qc.source}: quant_algo is {qc.quant_algo}; this builder takes {what} exports")
    return export_dir, export_cfg, qc


def load_float_base(base_dir: str | os.PathLike[str], component: str, builder: str) -> tuple[Path, dict[str, Any]]:
    """A BF16/FP16/FP32 transformer dir and its config; an already quantized one is refused."""
    d = find_component_dir(base_dir, component)
    cfg = load_json_if_present(d / "config.json") or {}
    if resolve_quant_config(d) is not None:
        raise PlanError(f"{d}: already quantized; {builder} takes a BF16/FP16/FP32 transformer")
    return d, cfg
