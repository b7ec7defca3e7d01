"""FP8 (ModelOpt ``quant_algo: FP8``) transformer builds.

Two ways in:
- **calibrated** (SGLang ``build_modelopt_fp8_transformer`` semantics): a ModelOpt HF export, the
  calibrated maxima from ``backbone.pt`` and the BF16 base transformer. Quantized weights keep the
  export's e4m3 bytes (or are re-quantized from the base with ``requantize=True``); scales are
  ``amax / 448`` as float32 ``[1]``; preset fallback modules come back from the base in BF16 (decided
  *before* ModelOpt's ignore list is consulted); ``_quantizer`` state and fallback scales are dropped.
- **from_bf16** (calibration-free): the base alone; weight scales from the weights' own max |w|
  (per output channel by default: ``FP8_PER_CHANNEL_PER_TOKEN``, dynamic activations), or per
  tensor with a static ``input_scale`` from a given activation amax (``FP8``).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dqfast import _core
from dqfast._core import E4M3_MAX, __version__  # 448, from dqfast-core
from dqfast.errors import PlanError
from dqfast.formats import FP8, FP8_CHANNEL, family_algos
from dqfast.models import ModelPreset, pattern_list, resolve_preset
from dqfast.plan import (
    F32,
    BuildReport,
    EngineRounding,
    Fp8,
    IoMode,
    ModuleDecision,
    PlanBuilder,
    ProgressFn,
    RepairNanE4m3,
    ScaleFromAmax,
    ScaleOf,
    SrcRef,
    check_quantized,
    copy_sidecar_files,
    finish,
    new_plan,
    split_module,
)
from dqfast.quant_config import find_component_dir, load_float_base, load_json, load_modelopt_export
from dqfast.reader import CheckpointInfo, TensorMeta, open_checkpoint, read_tensor
from dqfast.targets import DEFAULT_TARGET, TARGETS, TargetName, fp8_from_bf16_granularity

__all__ = ["build_fp8_transformer"]

FLOAT_DTYPES = ("BF16", "F16", "F32")


def is_float_linear(weight: TensorMeta) -> bool:
    """A 2-D float weight: a Linear layer a builder can quantize (not a norm, conv or embedding)."""
    return weight.dtype in FLOAT_DTYPES and len(weight.shape) == 2


FP8_ALGOS = family_algos("fp8")

Rounding = Literal["exact", "modelopt"]


def _rounding(r: str) -> EngineRounding:
    if r not in ("exact", "modelopt"):
        raise PlanError(f"rounding must be 'exact' or 'modelopt', not '{r}'")
    return "exact" if r == "exact" else "source_dtype"


def _group_modules(info: CheckpointInfo) -> OrderedDict[str, dict[str, TensorMeta]]:
    mods: OrderedDict[str, dict[str, TensorMeta]] = OrderedDict()
    for name, meta in info.tensors.items():
        if "_quantizer." in name:
            continue
        module, suffix = split_module(name)
        mods.setdefault(module, {})[suffix] = meta
    return mods


def _ignore_entries(preset: ModelPreset, module: str) -> list[str]:
    """The diffusers name (vLLM-Omni matches it) and SGLang's preferred runtime name."""
    preferred = preset.name_variants(module)[-1]
    return [module] if preferred == module else [module, preferred]


def check_activation_amax(value: float | None, default: float, what: str = "activation_amax") -> float:
    """A static activation amax (``default`` when not given); finite and > 0."""
    a = default if value is None else float(value)
    if not (np.isfinite(a) and a > 0):
        raise PlanError(f"{what} is {value}; it must be finite and > 0")
    return a


def _output_config(src_cfg: dict[str, Any], quant_cfg: dict[str, Any], plan: PlanBuilder) -> None:
    plan.write_config(src_cfg, quant_cfg)


def _fallback_res(patterns: Iterable[str] | str) -> list[re.Pattern[str]]:
    out = []
    for p in pattern_list(patterns):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise PlanError(f"--fallback pattern '{p}' is not a valid regex: {e}") from None
    return out


def _check_base_tensor(base: CheckpointInfo, name: str, want_shape: tuple[int, ...] | None) -> TensorMeta:
    meta = base.tensors.get(name)
    if meta is None:
        raise PlanError(f"{base.root}: base transformer has no tensor '{name}' (needed for a BF16 fallback)")
    if want_shape is not None and meta.shape != want_shape:
        raise PlanError(f"{base.root}: tensor '{name}': base shape {list(meta.shape)} does not match the export's {list(want_shape)}")
    return meta


def add_fp8_layer(
    plan: PlanBuilder, module: str, weight: TensorMeta, ref: SrcRef, *, per_row: bool, rounding: EngineRounding, input_amax: float | None
) -> None:
    """The plan ops of one FP8 layer quantized from a float weight (``ref``): e4m3 values with the
    scale of their own amax (per row or per tensor), that scale as ``weight_scale``, and with
    ``input_amax`` a static ``input_scale = input_amax / 448``. The one place the builders (``fp8``
    from BF16, ``mixed``) write an FP8 layer."""
    plan.add(weight.name, Fp8(src=ref, scale={"kind": "weight_amax", "per_row": per_row}, rounding=rounding))
    plan.add(f"{module}.weight_scale", ScaleOf(of=weight.name, shape=[weight.shape[0]] if per_row else [1]))
    if input_amax is not None:
        plan.add(f"{module}.input_scale", ScaleFromAmax(amax=[float(input_amax)], bound=E4M3_MAX, shape=[1]))


def build_fp8_transformer(
    output_dir: str | os.PathLike[str],
    *,
    modelopt_hf_dir: str | os.PathLike[str] | None = None,
    modelopt_backbone_ckpt: str | os.PathLike[str] | None = None,
    base_transformer_dir: str | os.PathLike[str] | None = None,
    model_type: str = "auto",
    fallback: Iterable[str] | str = (),
    from_bf16: bool = False,
    weight_granularity: Literal["channel", "tensor"] | None = None,
    activation_amax: float | None = None,
    rounding: Rounding = "exact",
    requantize: bool = False,
    repair_nan: bool = False,
    max_shard_size: str | int | None = None,
    threads: int = 0,
    overwrite: bool = False,
    dry_run: bool = False,
    fsync: bool = True,
    io: IoMode = "auto",
    component: str = "transformer",
    force_model_type: bool = False,
    strict: bool = False,
    progress: ProgressFn | None = None,
    target: TargetName = DEFAULT_TARGET,
    fit_target: bool = False,
    maxbound: float = E4M3_MAX,
) -> BuildReport:
    """Build an FP8 transformer directory that SGLang Diffusion / vLLM-Omni load.

    ``target`` (``any``: both engines, the default; ``sglang``, ``vllm-omni``; ``none``: no engine
    check): refuse, before writing, an output that engine cannot load
    (:class:`dqfast.errors.TargetError`, :func:`dqfast.check.apply_target`); ``fit_target``: keep
    such layers in BF16 instead (``report.warnings`` lists each). ``ignore`` entries never match a
    quantized module under either engine's rule (``proj_out`` is written ``p*roj_out``).

    ``weight_granularity`` (``from_bf16``; None: from the target): per output channel
    (``FP8_PER_CHANNEL_PER_TOKEN``) where every engine of the target loads it (``vllm-omni``,
    ``none``), else per tensor (``FP8``, and ``activation_amax`` 448 unless given); each choice the
    target made is a line of ``report.target_forced``.

    ``maxbound``: SGLang's ``--maxbound`` (backbone amax / maxbound).
    ``fallback``: regexes (one ``str`` is one pattern). ``model_type`` must match config.json's
    ``_class_name`` unless ``force_model_type``; a build that quantizes nothing warns
    (``report.warnings``), or fails with ``strict``.

    Raises :class:`dqfast.errors.DqfastError` subclasses naming the file, tensor and problem;
    nothing is left at ``output_dir`` on failure. The export's e4m3 weights are refused when they
    hold NaN bytes (0x7F/0xFF) unless ``repair_nan`` (then replaced by 448, as vLLM-Omni does at
    load). ``progress``: see :data:`dqfast.plan.ProgressFn`.
    """
    plan = new_plan(output_dir, overwrite=overwrite, dry_run=dry_run, max_shard_size=max_shard_size, threads=threads, fsync=fsync, io=io)
    plan.guard(modelopt_hf_dir, modelopt_backbone_ckpt, base_transformer_dir)
    extra = _fallback_res(fallback)
    # SGLang's --maxbound: the FP8 bound backbone amax values are divided by (scale = amax / maxbound).
    if isinstance(maxbound, bool) or not isinstance(maxbound, (int, float)) or not (np.isfinite(maxbound) and maxbound > 0):
        raise PlanError(f"--maxbound (maxbound) is {maxbound!r}; it must be finite and > 0")
    if from_bf16 and maxbound != E4M3_MAX:
        raise PlanError("--maxbound (maxbound) applies to scales from backbone.pt amax; --from-bf16 uses 448 (E4M3's maximum)")
    if from_bf16:
        if base_transformer_dir is None:
            raise PlanError("from_bf16 (--from-bf16) needs base_transformer_dir (--base-transformer-dir)")
        for flag, given in (("--modelopt-hf-dir", modelopt_hf_dir), ("--modelopt-backbone-ckpt", modelopt_backbone_ckpt)):
            if given is not None:
                # The export would be silently ignored: --from-bf16 quantizes the base itself.
                raise PlanError(f"--from-bf16 and {flag} exclude each other (from_bf16=True ignores the export): pass one")
        granularity, forced = fp8_from_bf16_granularity(target, weight_granularity, fit_target)
        if granularity == "tensor" and activation_amax is None and weight_granularity != "tensor":
            # Both engines' per-tensor FP8 layers need a static input_scale; 448 gives 1.0, as `build mixed`.
            activation_amax = E4M3_MAX
            forced.append(
                f"activation amax {E4M3_MAX:g} (input_scale 1.0): per-tensor FP8 needs a static input_scale in both engines; "
                f"activations above {E4M3_MAX:g} will be clipped: pass --activation-amax from a calibration (dqfast ptq), "
                "or --target vllm-omni for dynamic per-token activations"
            )
        report = _plan_from_bf16(
            plan,
            Path(base_transformer_dir),
            model_type,
            extra,
            granularity,
            activation_amax,
            _rounding(rounding),
            component,
            force_model_type,
        )
        report.target_forced += forced
    else:
        if modelopt_hf_dir is None:
            raise PlanError("a calibrated FP8 build needs --modelopt-hf-dir (modelopt_hf_dir), or use --from-bf16 (from_bf16=True)")
        report = _plan_calibrated(
            plan,
            Path(modelopt_hf_dir),
            Path(modelopt_backbone_ckpt) if modelopt_backbone_ckpt else None,
            Path(base_transformer_dir) if base_transformer_dir else None,
            model_type,
            extra,
            _rounding(rounding),
            requantize,
            component,
            force_model_type,
            repair_nan,
            float(maxbound),
        )
    check_quantized(report, report.counts.get("quantized", 0), strict)
    plan.target, plan.fit_target = target, fit_target
    return finish(plan, report, dry_run=dry_run, progress=progress)


def _plan_calibrated(
    plan: PlanBuilder,
    hf_dir: Path,
    backbone: Path | None,
    base_dir: Path | None,
    model_type: str,
    extra: list[re.Pattern[str]],
    rounding: EngineRounding,
    requantize: bool,
    component: str,
    force_model_type: bool = False,
    repair_nan: bool = False,
    maxbound: float = E4M3_MAX,
) -> BuildReport:
    from dqfast.amax import load_amax

    export_dir, export_cfg, qc = load_modelopt_export(hf_dir, component, lambda a: a in FP8_ALGOS, "FP8")
    per_channel = qc.quant_algo in FP8_CHANNEL.algos
    export = open_checkpoint(export_dir)
    preset = resolve_preset(model_type, export_cfg, force_model_type)
    base = open_checkpoint(find_component_dir(base_dir, component)) if base_dir else None
    if backbone is not None:
        amax = load_amax(backbone)
        amax_source = str(backbone)
    else:
        amax = {}
        amax_source = ""
    src_export = plan.source(export_dir)
    src_base = plan.source(base.root) if base else -1

    report = BuildReport(output_dir=str(plan.output_dir), quant_algo=qc.quant_algo)
    counts = {
        "quantized": 0,
        "bf16_fallback": 0,
        "kept_unquantized": 0,
        "added_scales": 0,
        "dropped_quantizer_tensors": 0,
        "dropped_fallback_scales": 0,
    }
    counts["dropped_quantizer_tensors"] = sum(1 for n in export.tensors if "_quantizer." in n)
    # Only when repair is asked: one parallel scan in Rust, so the report says what was repaired.
    nan_bytes = _core.count_nan_e4m3(str(export_dir)) if repair_nan else {}
    if repair_nan:
        counts["nan_bytes_repaired"] = 0
    ignore: set[str] = set(qc.ignore)
    for module, parts in _group_modules(export).items():
        weight = parts.get("weight")
        fb = preset.fp8_fallback_match(module, extra) if weight is not None else None
        is_fp8 = weight is not None and (weight.dtype == "F8_E4M3" or "weight_scale" in parts)
        if fb is not None:
            # Fallbacks first: a fallback weight never stays FP8, whatever ModelOpt's ignore says.
            if base is None:
                raise PlanError(
                    f"module '{module}' matches fallback pattern {fb!r} but no base transformer was given "
                    "(--base-transformer-dir): its BF16 weights can only come from there"
                )
            report.decisions.append(ModuleDecision(module, "bf16-fallback", f"matches {fb}"))
            counts["bf16_fallback"] += 1
            ignore.update(_ignore_entries(preset, module))
            for suffix, meta in parts.items():
                if suffix in ("weight_scale", "input_scale", "weight_scale_2"):
                    counts["dropped_fallback_scales"] += 1
                    continue
                bmeta = _check_base_tensor(base, meta.name, meta.shape)
                if bmeta.dtype not in FLOAT_DTYPES:
                    raise PlanError(f"{bmeta.file}: tensor '{meta.name}': base dtype {bmeta.dtype} is not BF16/F16/F32")
                plan.copy(meta.name, src_base)
            continue
        if is_fp8:
            pair = amax.get(module)
            scale_from = "backbone"
            if backbone is None:
                pair = None
                scale_from = "export"
            elif pair is None or pair.weight is None or (pair.input is None and not per_channel):
                missing = "module" if pair is None else ("weight amax" if pair.weight is None else "input amax")
                raise PlanError(
                    f"{amax_source}: no calibrated {missing} for '{module}' "
                    f"({module}.weight_quantizer._amax / .input_quantizer._amax), but the export quantizes it"
                )
            w_scale, in_scale = _fp8_scales(
                export, parts, module, pair, scale_from, per_channel, check_export=not requantize, bound=maxbound
            )
            report.decisions.append(ModuleDecision(module, "fp8", f"quantized in the export; scales from {scale_from}"))
            counts["quantized"] += 1
            for suffix, meta in parts.items():
                if suffix in ("weight_scale", "input_scale"):
                    continue
                if suffix != "weight":
                    plan.copy(meta.name, src_export)
                    continue
                if requantize or meta.dtype != "F8_E4M3":
                    if requantize:
                        if base is None:
                            raise PlanError("--requantize (requantize=True) needs --base-transformer-dir (base_transformer_dir)")
                        src_meta = _check_base_tensor(base, meta.name, meta.shape)
                        src = src_base
                    else:
                        src_meta, src = meta, src_export
                    if src_meta.dtype not in FLOAT_DTYPES:
                        raise PlanError(f"{src_meta.file}: tensor '{meta.name}': cannot quantize dtype {src_meta.dtype}")
                    plan.add(meta.name, Fp8(src=plan.ref(src, meta.name), scale={"kind": "values", "values": w_scale}, rounding=rounding))
                elif repair_nan:
                    # The engine refuses NaN e4m3 bytes in a copy; this op replaces them by 448.
                    plan.add(meta.name, RepairNanE4m3(src=plan.ref(src_export, meta.name)))
                    counts["nan_bytes_repaired"] += nan_bytes.get(meta.name, 0)
                else:
                    plan.copy(meta.name, src_export)
                if len(w_scale) != 1 and len(w_scale) != meta.shape[0]:
                    raise PlanError(f"'{module}': {len(w_scale)} per-channel weight maxima for {meta.shape[0]} output rows")
                # SGLang's builder writes [1]; per-channel scales keep one value per output row.
                plan.add(f"{module}.weight_scale", F32(values=w_scale, shape=[len(w_scale)]))
                counts["added_scales"] += 1
                if in_scale is not None:
                    plan.add(f"{module}.input_scale", F32(values=[in_scale], shape=[1]))
                    counts["added_scales"] += 1
            continue
        # Neither quantized in the export nor a fallback: kept as ModelOpt wrote it.
        if weight is not None:
            why = "in ModelOpt's ignore list" if qc.is_ignored(module) else "not quantized by ModelOpt"
            calibrated = module in amax and amax[module].weight is not None
            if calibrated:
                why += " (its quantizer was disabled after calibration)"
            report.decisions.append(ModuleDecision(module, "keep", why))
            counts["kept_unquantized"] += 1
            # SGLang's tool lists every kept weight without a calibrated scale (Linears, RMSNorms, ...)
            # and relies on ModelOpt's own entries for the rest; dqfast lists a calibrated one too
            # unless ModelOpt's ignore already excludes it for both engines.
            if not (calibrated and all(t.ignored(list(qc.ignore), module) for t in TARGETS.values())):
                ignore.update(_ignore_entries(preset, module))
        for meta in parts.values():
            plan.copy(meta.name, src_export)

    quant_cfg = dict(qc.raw)
    quant_cfg.update({"quant_method": "modelopt", "quant_algo": qc.quant_algo, "ignore": sorted(ignore)})
    quant_cfg.setdefault("quant_type", qc.quant_algo)
    _output_config(export_cfg or (load_json(base.root / "config.json") if base else {}), quant_cfg, plan)
    copy_sidecar_files(plan, export_dir)
    report.counts = counts
    return report


def _scalar(x: np.ndarray, what: str, module: str, source: str) -> float:
    a = np.asarray(x, dtype=np.float32)
    if a.size != 1:
        raise PlanError(
            f"{source}: {what} of '{module}' has shape {list(a.shape)}; quant_algo FP8 takes one "
            "per-tensor value (per-channel maxima need FP8_PER_CHANNEL_PER_TOKEN)"
        )
    v = float(a.reshape(()))
    if not np.isfinite(v) or v <= 0:
        raise PlanError(f"{source}: {what} of '{module}' is {v}; it must be finite and > 0")
    return v


def _positive(v: np.ndarray, what: str, module: str, source: str) -> np.ndarray:
    bad = ~np.isfinite(v) | (v <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        at = f" (element {i} of {v.size})" if v.size > 1 else ""
        raise PlanError(f"{source}: {what} of '{module}' is {float(v.reshape(-1)[i])}{at}; it must be finite and > 0")
    return v


def _fp8_scales(
    export: CheckpointInfo,
    parts: dict[str, TensorMeta],
    module: str,
    pair: Any,
    scale_from: str,
    per_channel: bool,
    check_export: bool = True,
    bound: float = E4M3_MAX,
) -> tuple[list[float], float | None]:
    """(weight scale values — one, or one per output row —, input scale or None when dynamic).

    ``check_export``: the export's e4m3 bytes will be kept, so its own weight_scale must agree."""

    # Scales come from the engine's one scale rule (amax / 448 in float32; a zero or subnormal
    # scale is refused): the same numbers and checks as the plan's own scale ops.
    def scales(amax: np.ndarray, what: str) -> np.ndarray:
        return np.asarray(_core.scales_from_amax(amax.tolist(), bound, f"backbone.pt: {what} of '{module}'"), dtype=np.float32)

    if scale_from == "backbone":
        if per_channel:
            w = scales(
                _positive(np.asarray(pair.weight, dtype=np.float32).reshape(-1), "weight amax", module, "backbone.pt"), "weight amax"
            )
        else:
            w = scales(np.array([_scalar(pair.weight, "weight amax", module, "backbone.pt")], dtype=np.float32), "weight amax")
        i = None
        if not per_channel:
            i = float(scales(np.array([_scalar(pair.input, "input amax", module, "backbone.pt")], dtype=np.float32), "input amax")[0])
        ws_meta = parts.get("weight_scale")
        if check_export and ws_meta is not None and parts["weight"].dtype == "F8_E4M3":
            exported = read_tensor(ws_meta.file, ws_meta.name).astype(np.float32).reshape(-1)
            if exported.shape != w.shape or np.any(exported != w):
                raise PlanError(
                    f"{ws_meta.file}: tensor '{ws_meta.name}' is {exported[:4].tolist()} but backbone.pt gives "
                    f"amax/{bound:g} = {w[:4].tolist()}: the export and backbone.pt come from different calibrations"
                )
        return [float(x) for x in w], i
    needed = ("weight_scale",) if per_channel else ("weight_scale", "input_scale")
    for s in needed:
        if s not in parts:
            raise PlanError(f"{export.root}: '{module}.{s}' missing and no backbone.pt given to rebuild it")
    w = read_tensor(parts["weight_scale"].file, parts["weight_scale"].name).astype(np.float32).reshape(-1)
    _positive(w, "weight_scale", module, str(export.root))
    _core.check_scales(w.tolist(), f"{export.root}: '{module}.weight_scale'")
    if not per_channel and w.size != 1:
        raise PlanError(f"{export.root}: '{module}.weight_scale' has {w.size} values; quant_algo FP8 is per tensor")
    i = None
    if not per_channel:
        i = _scalar(read_tensor(parts["input_scale"].file, parts["input_scale"].name), "input_scale", module, str(export.root))
        _core.check_scales([i], f"{export.root}: '{module}.input_scale'")
    return [float(x) for x in w], i


def _plan_from_bf16(
    plan: PlanBuilder,
    base_dir: Path,
    model_type: str,
    extra: list[re.Pattern[str]],
    granularity: str,
    activation_amax: float | None,
    rounding: EngineRounding,
    component: str,
    force_model_type: bool = False,
) -> BuildReport:
    base_dir, base_cfg = load_float_base(base_dir, component, "from_bf16")
    base = open_checkpoint(base_dir)
    preset = resolve_preset(model_type, base_cfg, force_model_type)
    if granularity not in ("channel", "tensor"):
        raise PlanError(f"weight_granularity must be 'channel' or 'tensor', not '{granularity}'")
    per_row = granularity == "channel"
    if not per_row and activation_amax is None:
        raise PlanError(
            "per-tensor FP8 (quant_algo FP8) needs a static input_scale: pass activation_amax, "
            "or use weight_granularity='channel' (FP8_PER_CHANNEL_PER_TOKEN, dynamic activations)"
        )
    if activation_amax is not None and not (np.isfinite(activation_amax) and activation_amax > 0):
        raise PlanError(f"--activation-amax (activation_amax) is {activation_amax}; it must be finite and > 0")
    algo = (FP8_CHANNEL if per_row else FP8).algos[0]
    src = plan.source(base.root)
    report = BuildReport(output_dir=str(plan.output_dir), quant_algo=algo)
    counts = {"quantized": 0, "bf16_fallback": 0, "kept_unquantized": 0, "added_scales": 0}
    ignore: set[str] = set()
    for module, parts in _group_modules(base).items():
        weight = parts.get("weight")
        reason = None
        if weight is None:
            pass
        elif not is_float_linear(weight):
            reason = "not a 2-D float weight (norm, conv or embedding)"
        elif (m := preset.fp8_fallback_match(module, extra)) is not None:
            reason = f"fallback pattern {m}"
            counts["bf16_fallback"] += 1
        elif (m := preset.ptq_disabled_match(module)) is not None:
            reason = f"left unquantized by ModelOpt's recipe ({m})"
            counts["kept_unquantized"] += 1
        if weight is None or reason is not None:
            if weight is not None:
                report.decisions.append(ModuleDecision(module, "keep", reason or ""))
                ignore.update(_ignore_entries(preset, module))
            for meta in parts.values():
                plan.copy(meta.name, src)
            continue
        report.decisions.append(ModuleDecision(module, "fp8", f"weight amax per {granularity}"))
        counts["quantized"] += 1
        for suffix, meta in parts.items():
            if suffix != "weight":
                plan.copy(meta.name, src)
                continue
            add_fp8_layer(plan, module, meta, plan.ref(src, meta.name), per_row=per_row, rounding=rounding, input_amax=activation_amax)
            counts["added_scales"] += 1 if activation_amax is None else 2
    quant_cfg: dict[str, Any] = {
        "quant_method": "modelopt",
        "quant_algo": algo,
        "quant_type": algo,
        "ignore": sorted(ignore),
        "producer": {"name": "dqfast", "version": __version__},
        "config_groups": {
            "group_0": {
                "weights": {**FP8.config_weights, "strategy": "channel" if per_row else "tensor"},
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "dynamic": activation_amax is None,
                    "strategy": "token" if activation_amax is None else "tensor",
                },
                "targets": ["Linear"],
            }
        },
        "calibration": "weights-only (dqfast from_bf16)"
        + ("" if activation_amax is None else f"; static activation amax {activation_amax}"),
    }
    _output_config(base_cfg, quant_cfg, plan)
    report.counts = counts
    return report
