"""MXFP8 weight-only transformers (vLLM-Omni 0.30 ``quant_method: mxfp8``) from a BF16 base.

Calibration-free: every 2-D float Linear weight whose in-features K are a multiple of 32 and
that no FP8 fallback pattern (the preset's, or ``fallback``) matches becomes e4m3 values
``weight [N, K]`` (F8_E4M3) plus one E8M0 power-of-two scale per 32 elements along K,
``weight_scale [N, K/32]`` stored as U8 (the scale's biased exponent bits, as vLLM-Omni's loader
takes them). The kernel is the Rust one (``dqfast-core::mxfp8``), bit-exact with vLLM 0.30's
reference quantizer; a NaN/inf weight is refused naming the tensor and row. Everything else is
copied; there is no ``input_scale`` (activations are quantized at run time).

The config is the one vLLM-Omni's ``DiffusionMXFP8Config.from_config`` reads
(docs/notes/sources.md §7)::

    {"quant_method": "mxfp8", "is_checkpoint_mxfp8_serialized": true, "ignored_layers": [...]}

``ignored_layers`` is matched by exact module name, so it lists every kept 2-D linear. Shards a
loader fuses (q/k/v) must all be quantized or all kept (vLLM raises on mixed shards): a fallback
that splits a group is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from dqfast import _core
from dqfast.errors import PlanError
from dqfast.fp8 import _fallback_res, _group_modules, _ignore_entries, _output_config, is_float_linear
from dqfast.nvfp4 import fused_groups
from dqfast.plan import BuildReport, IoMode, ModuleDecision, Mxfp8Scales, Mxfp8Weight, ProgressFn, check_quantized, finish, new_plan
from dqfast.presets import resolve_preset
from dqfast.quant_config import load_float_base
from dqfast.reader import open_checkpoint
from dqfast.targets import DEFAULT_TARGET, TargetName, refuse_format

__all__ = ["build_mxfp8_transformer", "BLOCK"]

#: Elements per E8M0 scale along K (the engine's constant).
BLOCK: int = _core.MXFP8_BLOCK


def build_mxfp8_transformer(
    output_dir: str | os.PathLike[str],
    *,
    base_transformer_dir: str | os.PathLike[str],
    model_type: str = "auto",
    fallback: Iterable[str] | str = (),
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
    """Build an MXFP8 weight-only transformer directory for vLLM-Omni from a BF16/F16/F32 base.

    ``fallback``: extra regexes (``re.search`` on the module name, as for FP8; one ``str`` is
    one pattern) of modules to keep in BF16, on top of the preset's FP8 fallbacks. A build that
    quantizes nothing warns (``report.warnings``), or fails with ``strict``.

    ``target``: ``any`` (the default) and ``sglang`` refuse (:class:`dqfast.errors.TargetError`):
    SGLang 0.5.23 does not load this layout; pass ``target="vllm-omni"`` (or ``"none"``).

    Raises :class:`dqfast.errors.DqfastError` subclasses naming the file, tensor and problem
    (a non-finite weight: :class:`~dqfast.errors.CheckpointError` with the tensor and row);
    nothing is left at ``output_dir`` on failure. ``progress``: see :data:`dqfast.plan.ProgressFn`.
    """
    plan = new_plan(output_dir, overwrite=overwrite, dry_run=dry_run, max_shard_size=max_shard_size, threads=threads, fsync=fsync, io=io)
    plan.guard(base_transformer_dir)
    extra = _fallback_res(fallback)
    base_dir, base_cfg = load_float_base(base_transformer_dir, component, "mxfp8")
    base = open_checkpoint(base_dir)
    preset = resolve_preset(model_type, base_cfg, force_model_type)
    src = plan.source(base.root)
    report = BuildReport(output_dir=str(plan.output_dir), quant_algo="MXFP8")
    counts = {"mxfp8": 0, "bf16_fallback": 0, "kept_unquantized": 0}
    ignore: set[str] = set()
    mods = _group_modules(base)
    kept: dict[str, str] = {}  # module with a weight -> why it stays as it is
    for module, parts in mods.items():
        w = parts.get("weight")
        if w is None:
            continue
        if not is_float_linear(w):
            kept[module] = "not a 2-D float weight (norm, conv or embedding)"
            continue
        if w.shape[1] % BLOCK:
            kept[module] = f"in-features {w.shape[1]} not a multiple of {BLOCK} (MXFP8 block)"
            counts["kept_unquantized"] += 1
        elif (m := preset.fp8_fallback_match(module, extra)) is not None:
            kept[module] = f"fallback pattern {m}"
            counts["bf16_fallback"] += 1
        else:
            continue
        # A kept 2-D linear: vLLM-Omni matches ignored_layers by exact name.
        ignore.update(_ignore_entries(preset, module))
    quantize = [m for m, parts in mods.items() if "weight" in parts and m not in kept]
    # vLLM raises on a fused layer whose shards are partly quantized: refuse it here, by name.
    for key, members in fused_groups(mods).items():
        split = [m for m in members if m in kept]
        if split and len(split) < len(members):
            detail = ", ".join(f"{m} ({kept[m]})" for m in split)
            raise PlanError(f"fused group '{key}' would mix MXFP8 and BF16 shards: {detail}; keep all of its shards (--fallback) or none")
    qset = set(quantize)
    for module, parts in mods.items():
        if module in kept:
            report.decisions.append(ModuleDecision(module, "keep", kept[module]))
        elif module in qset:
            report.decisions.append(ModuleDecision(module, "mxfp8", f"weights-only, one E8M0 scale per {BLOCK} elements of K"))
            counts["mxfp8"] += 1
        for suffix, meta in parts.items():
            if module in qset and suffix == "weight":
                ref = plan.ref(src, meta.name)
                plan.add(meta.name, Mxfp8Weight(src=ref))
                plan.add(f"{module}.weight_scale", Mxfp8Scales(src=ref))
            else:
                plan.copy(meta.name, src)
    quant_cfg: dict[str, Any] = {
        "quant_method": "mxfp8",
        "is_checkpoint_mxfp8_serialized": True,
        "ignored_layers": sorted(ignore),
    }
    _output_config(base_cfg, quant_cfg, plan)
    report.counts = counts
    check_quantized(report, counts["mxfp8"], strict)
    # Only whole-format rules exist for MXFP8 (no ModelOpt config for dqfast.check's layer rules).
    refuse_format(target, "build mxfp8 (quant_method mxfp8)", lambda t: t.mxfp8, lambda t: t.mxfp8_source)
    if fit_target:
        raise PlanError("--fit-target (fit_target=True): dqfast has no per-layer serving-engine rules for MXFP8 yet")
    report.target = None if target is None else str(target)
    return finish(plan, report, dry_run=dry_run, progress=progress)
