"""NVFP4 (ModelOpt ``quant_algo: NVFP4``, W4A4, group 16) transformer builds.

- **from a ModelOpt export** (SGLang ``build_modelopt_nvfp4_transformer`` semantics): preset
  modules come back from the BF16 base, ``_quantizer`` state is dropped, everything else is kept
  byte for byte — except where dqfast is asked to fix known defects:
  ``swap_weight_nibbles`` rewrites every packed byte in Rust (the config then says
  ``swap_weight_nibbles: false``, since the bytes are already in runtime order — never both;
  ``target="vllm-omni"``: no flag at all, vLLM-Omni ignores it) — except with ``target="sglang"``,
  where the bytes are kept and the config says ``swap_weight_nibbles: true`` (SGLang's own tool);
  NaN block-scale bytes (ModelOpt 0.44) are refused, or clamped to 448 with ``repair_nan_scales``;
  q/k/v shards that a loader fuses but whose ``weight_scale_2`` differ are reconciled exactly
  (block scales rescaled to the shared maximum and re-rounded) instead of vLLM's silent max().
- **from_bf16** (no export): weights quantized in Rust, bit-identical to ModelOpt's
  ``NVFP4QTensor`` given the same amax; q/k/v shards share one global scale; ``input_scale`` from a
  given activation amax (default 2688, i.e. ``input_scale = 1``), stated in the config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dqfast import _core
from dqfast._core import E4M3_MAX_BYTE, NVFP4_BOUND, NVFP4_GROUP, __version__
from dqfast.errors import PlanError
from dqfast.formats import NVFP4, classify
from dqfast.fp8 import (
    FLOAT_DTYPES,
    _check_base_tensor,
    _group_modules,
    _ignore_entries,
    _output_config,
    check_activation_amax,
    is_float_linear,
)
from dqfast.models import ModelPreset, fused_groups, glob_to_regex, pattern_list, resolve_preset
from dqfast.plan import (
    F32,
    BuildReport,
    IoMode,
    MaxOfAmax,
    ModuleDecision,
    NvAmax,
    Nvfp4BlockScales,
    Nvfp4GlobalScale,
    Nvfp4Weight,
    PlanBuilder,
    ProgressFn,
    RepairNanE4m3,
    RescaleE4m3,
    ScaleFromAmax,
    SrcRef,
    SwapNibbles,
    check_quantized,
    copy_sidecar_files,
    finish,
    new_plan,
)
from dqfast.quant_config import find_component_dir, load_float_base, load_json, load_modelopt_export
from dqfast.reader import TensorMeta, open_checkpoint, read_tensor
from dqfast.targets import DEFAULT_TARGET, TargetName, targets_of

__all__ = ["build_nvfp4_transformer", "fused_groups", "nan_scale_bytes", "nibble_order_report", "NVFP4_BOUND"]

# ``NVFP4_BOUND`` = 6 * 448 (E2M1 max times E4M3 max; global scale = amax / NVFP4_BOUND) and
# ``GROUP`` = 16 elements per block scale: the numbers of dqfast-core, exported by ``_core``.
GROUP = NVFP4_GROUP


def _e4m3_nan(raw: np.ndarray) -> np.ndarray:
    """Mask of e4m3 NaN codes (0x7F/0xFF: every exponent and mantissa bit set)."""
    return np.asarray((raw & 0x7F) == 0x7F)


def _scalar_f32(meta: TensorMeta) -> float:
    v = read_tensor(meta.file, meta.name).reshape(-1)
    if v.size != 1:
        raise PlanError(f"{meta.file}: tensor '{meta.name}' has {v.size} values; expected a scalar")
    x = float(np.float32(v[0]))
    if not np.isfinite(x) or x <= 0:
        raise PlanError(f"{meta.file}: tensor '{meta.name}' is {x}; it must be finite and > 0")
    return x


def nan_scale_bytes(meta: TensorMeta) -> int:
    """How many NaN codes (0x7F/0xFF) an e4m3 tensor holds."""
    raw = read_tensor(meta.file, meta.name, raw=True)
    return int(np.count_nonzero(_e4m3_nan(raw)))


def _fallback_globs(patterns: Iterable[str] | str) -> list[re.Pattern[str]]:
    return [re.compile(glob_to_regex(p)) for p in pattern_list(patterns)]


def build_nvfp4_transformer(
    output_dir: str | os.PathLike[str],
    *,
    modelopt_hf_dir: str | os.PathLike[str] | None = None,
    base_transformer_dir: str | os.PathLike[str] | None = None,
    model_type: str | None = None,
    fallback: Iterable[str] | str = (),
    swap_weight_nibbles: bool = False,
    repair_nan_scales: bool = False,
    repair_nan: bool = False,
    reconcile_fused_scales: bool = True,
    from_bf16: bool = False,
    activation_amax: float | None = None,
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
) -> BuildReport:
    """Build a mixed BF16+NVFP4 transformer directory (SGLang Diffusion / vLLM-Omni layout).

    ``target`` (``any``: both engines, the default; ``sglang``, ``vllm-omni``; ``none``: no engine
    check): refuse, before writing, an output that engine cannot load
    (:class:`dqfast.errors.TargetError`, :func:`dqfast.check.apply_target`); ``fit_target``: keep
    such layers in BF16 instead (``report.warnings`` lists each). ``ignore`` entries never match a
    quantized module under either engine's rule (``proj_out`` is written ``p*roj_out``).
    vLLM-Omni's FLUX.1 quantizes only the single-stream blocks, so a FLUX.1 export under ``any``
    or ``vllm-omni`` needs ``fit_target`` (and ``base_transformer_dir`` for the BF16 weights).

    ``model_type`` (None: the default): from an export, the BF16 fallback preset, as SGLang's
    ``--pattern-preset``: None applies none (SGLang's tool's default), ``"auto"`` the family's from
    config.json (FLUX.1: ``flux1-nvfp4``); with ``from_bf16`` None means ``"auto"``.

    ``fallback`` takes globs (``.`` literal, ``*`` any run, full match; one ``str`` is one glob),
    like SGLang's ``--keep-bf16-pattern`` for this builder. ``force_model_type`` and ``strict``
    as in :func:`dqfast.fp8.build_fp8_transformer`.
    """
    plan = new_plan(output_dir, overwrite=overwrite, dry_run=dry_run, max_shard_size=max_shard_size, threads=threads, fsync=fsync, io=io)
    plan.guard(modelopt_hf_dir, base_transformer_dir)
    fallback = pattern_list(fallback)
    if from_bf16:
        if base_transformer_dir is None:
            raise PlanError("from_bf16 (--from-bf16) needs base_transformer_dir (--base-transformer-dir)")
        if modelopt_hf_dir is not None:
            # The export would be silently ignored: --from-bf16 quantizes the base itself.
            raise PlanError("--from-bf16 and --modelopt-hf-dir exclude each other (from_bf16=True ignores the export): pass one")
        mt = "auto" if model_type is None else model_type
        report = _plan_from_bf16(plan, Path(base_transformer_dir), mt, fallback, activation_amax, component, force_model_type)
    else:
        if modelopt_hf_dir is None:
            raise PlanError("an NVFP4 build needs --modelopt-hf-dir (modelopt_hf_dir), or use --from-bf16 (from_bf16=True)")
        report = _plan_export(
            plan,
            Path(modelopt_hf_dir),
            Path(base_transformer_dir) if base_transformer_dir else None,
            # SGLang's tool applies no fallback preset unless one is named.
            "none" if model_type is None else model_type,
            fallback,
            _swap_mode(swap_weight_nibbles, target),
            # One name for NaN repair across builders (repair_nan_scales: the older spelling).
            repair_nan_scales or repair_nan,
            reconcile_fused_scales,
            component,
            force_model_type,
            bool(_target_list(target)) and not any(t.honours_swap_flag for t in _target_list(target)),
        )
    check_quantized(report, report.counts.get("nvfp4", 0), strict)
    plan.target, plan.fit_target = target, fit_target
    return finish(plan, report, dry_run=dry_run, progress=progress)


def _preset_fallback(preset: ModelPreset, module: str, extra: list[re.Pattern[str]]) -> str | None:
    return preset.nvfp4_fallback_match(module, extra)


def _swap_mode(swap: bool, target: str | None) -> str:
    """How ``--swap-weight-nibbles`` is honoured: "flag" (keep the bytes, write
    ``swap_weight_nibbles: true``) when every engine of ``target`` swaps at load by that flag
    (SGLang, as its own tool does), else "bytes" (swap in place: vLLM-Omni ignores the flag);
    "none" without the option."""
    if not swap:
        return "none"
    ts = _target_list(target)
    return "flag" if ts and all(t.honours_swap_flag for t in ts) else "bytes"


def _target_list(target: str | None) -> list[Any]:
    return targets_of(target)


def _plan_export(
    plan: PlanBuilder,
    hf_dir: Path,
    base_dir: Path | None,
    model_type: str,
    fallback: list[str],
    swap: str,
    repair: bool,
    reconcile: bool,
    component: str,
    force_model_type: bool = False,
    target_ignores_flag: bool = False,
) -> BuildReport:
    export_dir, export_cfg, qc = load_modelopt_export(hf_dir, component, lambda a: a in NVFP4.algos, "NVFP4")
    export = open_checkpoint(export_dir)
    preset = resolve_preset(model_type, export_cfg, force_model_type)
    extra = _fallback_globs(fallback)
    base = open_checkpoint(find_component_dir(base_dir, component)) if base_dir else None
    src_export = plan.source(export_dir)
    src_base = plan.source(base.root) if base else -1
    mods = _group_modules(export)

    report = BuildReport(output_dir=str(plan.output_dir), quant_algo="NVFP4")
    counts = {
        "nvfp4": 0,
        "bf16_fallback": 0,
        "kept_unquantized": 0,
        "nibble_swapped": 0,
        "nan_scale_bytes_repaired": 0,
        "fused_groups_reconciled": 0,
        "dropped_quantizer_tensors": sum(1 for n in export.tensors if "_quantizer." in n),
    }

    # Exact reconciliation of fused shards whose global scales differ.
    rescale: dict[str, tuple[float, float, float]] = {}  # module -> (factor, gs_max, input_max)
    fb = {m: _preset_fallback(preset, m, extra) for m in mods}
    nv_mods = [m for m, p in mods.items() if classify(p) is NVFP4 and fb[m] is None]
    for key, group in fused_groups(nv_mods).items():
        gs = {m: _scalar_f32(mods[m]["weight_scale_2"]) for m in group if "weight_scale_2" in mods[m]}
        if len(gs) != len(group):
            continue
        ins = {m: _scalar_f32(mods[m]["input_scale"]) for m in group if "input_scale" in mods[m]}
        if len(set(gs.values())) == 1 and len(set(ins.values())) <= 1:
            continue
        if not reconcile:
            report.warnings.append(
                f"{key}: shards have different weight_scale_2 {sorted(set(gs.values()))}; a loader that fuses them "
                "keeps the max and mis-scales the others (pass reconcile_fused_scales=True)"
            )
            continue
        gmax = max(gs.values())
        imax = max(ins.values()) if ins else 0.0
        worst = 0.0
        for m in group:
            f = float(np.float32(gs[m]) / np.float32(gmax))
            rescale[m] = (f, gmax, imax)
            worst = max(worst, _rescale_error(mods[m]["weight_scale"], f, gs[m], gmax))
        counts["fused_groups_reconciled"] += 1
        report.decisions.append(
            ModuleDecision(
                key, "reconcile", f"weight_scale_2 unified to {gmax:.6g}; block scales re-rounded, max relative change {worst:.3%}"
            )
        )

    ignore = list(qc.ignore)
    for module, parts in mods.items():
        if fb[module] is not None and "weight" in parts:
            if base is None:
                raise PlanError(
                    f"module '{module}' matches fallback pattern {fb[module]!r} but no base transformer was given (--base-transformer-dir)"
                )
            report.decisions.append(ModuleDecision(module, "bf16-fallback", f"matches {fb[module]}"))
            counts["bf16_fallback"] += 1
            for suffix, meta in parts.items():
                if suffix in ("weight_scale", "weight_scale_2", "input_scale"):
                    continue
                want: tuple[int, ...] | None = None
                if suffix == "weight" and meta.dtype == "U8":
                    want = (meta.shape[0], meta.shape[1] * 2)
                elif suffix != "weight" or meta.dtype in FLOAT_DTYPES:
                    want = meta.shape
                _check_base_tensor(base, meta.name, want)
                plan.copy(meta.name, src_base)
            continue
        if classify(parts) is NVFP4:
            counts["nvfp4"] += 1
            report.decisions.append(ModuleDecision(module, "nvfp4", "quantized in the export"))
            ws = parts["weight_scale"]
            nan = nan_scale_bytes(ws)
            if nan and not repair:
                raise PlanError(
                    f"{ws.file}: tensor '{ws.name}': {nan} NaN byte(s) in the block scales (a known ModelOpt 0.44 "
                    "defect; one ruins the layer): pass --repair-nan (repair_nan=True) to clamp them to 448"
                )
            counts["nan_scale_bytes_repaired"] += nan
            for suffix, meta in parts.items():
                ref = plan.ref(src_export, meta.name)
                if suffix == "weight":
                    if swap == "bytes":
                        plan.add(meta.name, SwapNibbles(src=ref))
                        counts["nibble_swapped"] += 1
                    else:
                        plan.copy(meta.name, src_export)
                elif suffix == "weight_scale" and module in rescale:
                    plan.add(meta.name, RescaleE4m3(src=ref, factor=rescale[module][0], repair_nan=bool(nan)))
                elif suffix == "weight_scale" and nan:
                    plan.add(meta.name, RepairNanE4m3(src=ref))
                elif suffix == "weight_scale_2" and module in rescale:
                    plan.add(meta.name, F32(values=[rescale[module][1]], shape=list(meta.shape)))
                elif suffix == "input_scale" and module in rescale and rescale[module][2] > 0:
                    plan.add(meta.name, F32(values=[rescale[module][2]], shape=list(meta.shape)))
                else:
                    plan.copy(meta.name, src_export)
            continue
        if "weight" in parts and is_float_linear(parts["weight"]):
            report.decisions.append(ModuleDecision(module, "keep", "not quantized in the export"))
            counts["kept_unquantized"] += 1
        for meta in parts.values():
            plan.copy(meta.name, src_export)
    for p in [*fallback, *preset.nvfp4_fallback]:
        if p not in ignore:
            ignore.append(p)
    quant_cfg = dict(qc.raw)
    quant_cfg.update({"quant_method": "modelopt", "ignore": ignore, "swap_weight_nibbles": swap == "flag"})
    if target_ignores_flag:
        # Every engine of the target ignores the flag (vLLM-Omni): the bytes are in its order, no flag.
        quant_cfg.pop("swap_weight_nibbles")
    quant_cfg.setdefault("quant_type", qc.quant_algo.upper())
    quant_cfg.setdefault("group_size", qc.group_size or GROUP)
    quant_cfg.setdefault("checkpoint_weight_scale_layout", "linear")
    if swap == "bytes":
        report.warnings.append("packed weights were nibble-swapped in place; the config says swap_weight_nibbles: false")
    elif swap == "flag":
        report.warnings.append("packed weights kept as exported; the config says swap_weight_nibbles: true (the target swaps at load)")
    _output_config(export_cfg or (load_json(base.root / "config.json") if base else {}), quant_cfg, plan)
    copy_sidecar_files(plan, export_dir)
    report.counts = counts
    return report


def _rescale_error(ws: TensorMeta, factor: float, gs_old: float, gs_new: float) -> float:
    """Largest relative change of a block's dequantization multiplier after rescaling."""
    raw = read_tensor(ws.file, ws.name, raw=True)
    raw = np.where(_e4m3_nan(raw), np.uint8(E4M3_MAX_BYTE), raw).astype(np.uint8)
    old = np.frombuffer(_core.e4m3_to_f32(raw.tobytes()), dtype=np.float32).astype(np.float64) * gs_old
    new_b = _core.rescale_block_scales(raw.tobytes(), factor)
    new = np.frombuffer(_core.e4m3_to_f32(new_b), dtype=np.float32).astype(np.float64) * gs_new
    nz = old > 0
    return float(np.max(np.abs(new[nz] - old[nz]) / old[nz])) if nz.any() else 0.0


def _plan_from_bf16(
    plan: PlanBuilder,
    base_dir: Path,
    model_type: str,
    fallback: list[str],
    activation_amax: float | None,
    component: str,
    force_model_type: bool = False,
) -> BuildReport:
    base_dir, base_cfg = load_float_base(base_dir, component, "from_bf16")
    a_amax = check_activation_amax(activation_amax, NVFP4_BOUND)
    base = open_checkpoint(base_dir)
    preset = resolve_preset(model_type, base_cfg, force_model_type)
    extra = _fallback_globs(fallback)
    src = plan.source(base.root)
    mods = _group_modules(base)
    report = BuildReport(output_dir=str(plan.output_dir), quant_algo="NVFP4")
    counts = {"nvfp4": 0, "bf16_fallback": 0, "kept_unquantized": 0}
    quantize: list[str] = []
    ignore: set[str] = set()
    for module, parts in mods.items():
        w = parts.get("weight")
        reason = None
        if w is None:
            continue
        if not is_float_linear(w):
            reason = "not a 2-D float weight"
        elif w.shape[1] % GROUP:
            reason = f"in-features {w.shape[1]} not a multiple of {GROUP}"
        elif (m := (preset.nvfp4_fallback_match(module, extra) or preset.fp8_fallback_match(module))) is not None:
            reason = f"fallback pattern {m}"
            counts["bf16_fallback"] += 1
        elif (m := preset.ptq_disabled_match(module)) is not None:
            reason = f"left unquantized by ModelOpt's recipe ({m})"
            counts["kept_unquantized"] += 1
        if reason is None:
            quantize.append(module)
        else:
            report.decisions.append(ModuleDecision(module, "keep", reason))
            if is_float_linear(w):
                ignore.update(_ignore_entries(preset, module))
    # Shards that loaders fuse share one global scale (the max over the group).
    group_of: dict[str, list[str]] = {}
    for g in fused_groups(quantize).values():
        for m in g:
            group_of[m] = g
    qset = set(quantize)
    for module, parts in mods.items():
        if module not in qset:
            for meta in parts.values():
                plan.copy(meta.name, src)
            continue
        counts["nvfp4"] += 1
        members = group_of.get(module, [module])
        report.decisions.append(
            ModuleDecision(
                module,
                "nvfp4",
                "weights-only amax" + (f", global scale shared with {len(members) - 1} fused shard(s)" if len(members) > 1 else ""),
            )
        )
        amax: MaxOfAmax = {"kind": "max_of", "srcs": [plan.ref(src, f"{m}.weight") for m in members]}
        for suffix, meta in parts.items():
            if suffix != "weight":
                plan.copy(meta.name, src)
                continue
            add_nvfp4_layer(plan, module, meta.name, plan.ref(src, meta.name), amax, a_amax)
    quant_cfg: dict[str, Any] = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "quant_type": "NVFP4",
        "group_size": GROUP,
        "ignore": sorted(ignore),
        "swap_weight_nibbles": False,
        "checkpoint_weight_scale_layout": "linear",
        "producer": {"name": "dqfast", "version": __version__},
        "config_groups": {
            "group_0": {
                "weights": dict(NVFP4.config_weights),
                "input_activations": dict(NVFP4.config_weights),
                "targets": ["Linear"],
            }
        },
        "calibration": f"weights-only (dqfast from_bf16); activation amax {a_amax:g} -> input_scale {np.float32(a_amax) / np.float32(NVFP4_BOUND):g}",
    }
    _output_config(base_cfg, quant_cfg, plan)
    report.counts = counts
    return report


def add_nvfp4_layer(plan: PlanBuilder, module: str, weight: str, ref: SrcRef, amax: NvAmax, input_amax: float) -> None:
    """The plan ops of one NVFP4 layer quantized from a float weight (``ref``): packed values, e4m3
    block scales and the global scale, all from ``amax`` (a ``max_of`` over fused shards shares
    one global scale), and the static ``input_scale = input_amax / NVFP4_BOUND``. The one place
    the builders (``nvfp4`` from BF16, ``mixed``) write an NVFP4 layer."""
    plan.add(weight, Nvfp4Weight(src=ref, amax=amax))
    plan.add(f"{module}.weight_scale", Nvfp4BlockScales(src=ref, amax=amax))
    plan.add(f"{module}.weight_scale_2", Nvfp4GlobalScale(src=ref, amax=amax, shape=[]))
    plan.add(f"{module}.input_scale", ScaleFromAmax(amax=[input_amax], bound=NVFP4_BOUND, shape=[]))


def nibble_order_report(quant_dir: str | os.PathLike[str], reference_dir: str | os.PathLike[str], limit: int = 8) -> dict[str, Any]:
    """Which nibble order a checkpoint's packed weights use, judged against a reference.

    Dequantizes up to ``limit`` NVFP4 modules both ways and compares with the reference weights
    (the BF16 base): the right order gives the E2M1 quantization error (~10% relative), the wrong
    one an error of order 100%.
    """
    q = open_checkpoint(quant_dir)
    ref = open_checkpoint(reference_dir)
    mods = _group_modules(q)
    rows = []
    for m, parts in mods.items():
        if classify(parts) is not NVFP4 or f"{m}.weight" not in ref.tensors or "weight_scale_2" not in parts:
            continue
        w = read_tensor(parts["weight"].file, parts["weight"].name, raw=True)
        s = read_tensor(parts["weight_scale"].file, parts["weight_scale"].name, raw=True)
        gs = float(read_tensor(parts["weight_scale_2"].file, parts["weight_scale_2"].name).reshape(-1)[0])
        k = w.shape[1] * 2
        r = read_tensor(ref.tensors[f"{m}.weight"].file, f"{m}.weight").astype(np.float64)
        errs = {}
        for order, data in (("low_first", w.tobytes()), ("high_first", _core.swap_nibbles(w.tobytes()))):
            deq = np.frombuffer(_core.nvfp4_dequantize(data, s.tobytes(), k, gs), dtype=np.float32).reshape(r.shape)
            errs[order] = float(np.linalg.norm(deq - r) / max(np.linalg.norm(r), 1e-30))
        rows.append({"module": m, **errs})
        if len(rows) >= limit:
            break
    if not rows:
        return {"order": "unknown", "modules": [], "reason": "no NVFP4 module with a reference weight"}
    low = float(np.median([r["low_first"] for r in rows]))
    high = float(np.median([r["high_first"] for r in rows]))
    order = "low_first" if low < high else "high_first"
    return {
        "order": order,
        "low_first_rel_err": low,
        "high_first_rel_err": high,
        "modules": rows,
        "advice": "bytes are in runtime order (swap_weight_nibbles: false)"
        if order == "low_first"
        else "bytes are swapped: rebuild with swap_weight_nibbles=True or set swap_weight_nibbles: true",
    }
