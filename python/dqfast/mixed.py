"""ModelOpt ``MIXED_PRECISION`` transformers (FP8 + NVFP4 + BF16 per layer) from a BF16 base.

A policy maps each Linear to an algorithm by regex (``re.search`` on the module name; the first
match in policy order wins; no match stays BF16). Calibration is weights-only, in Rust: FP8 layers
get a per-tensor ``weight_scale = max|w| / 448`` and a static ``input_scale`` (vLLM's
``ModelOptMixedPrecisionConfig`` builds its FP8 sub-config as per-tensor ``quant_method="FP8"``, so
both scales are required); NVFP4 layers get ModelOpt's NVFP4 recipe with one global scale shared
over every fused q/k/v group. All shards of a fused group must resolve to the same algorithm (vLLM
raises on mixed shards) — a policy that splits one is refused.

The config is what vLLM-Omni's ``modelopt_mixed`` path reads (docs/notes/sources.md §4)::

    {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
     "quantized_layers": {"<module>": {"quant_algo": "FP8"} | {"quant_algo": "NVFP4", "group_size": 16}},
     "ignore": [...], "producer": {...}, "config_groups": {...}}

SGLang Diffusion refuses MIXED_PRECISION at load (sources.md §3).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dqfast._core import E4M3_MAX, __version__
from dqfast.errors import PlanError
from dqfast.formats import FP8, NVFP4
from dqfast.fp8 import _group_modules, _ignore_entries, _output_config, _rounding, add_fp8_layer, check_activation_amax, is_float_linear
from dqfast.models import MLP_PATTERNS, ModelPreset, fused_groups, pattern_list, resolve_preset
from dqfast.nvfp4 import GROUP, NVFP4_BOUND, add_nvfp4_layer
from dqfast.plan import BuildReport, IoMode, MaxOfAmax, ModuleDecision, ProgressFn, finish, new_plan
from dqfast.quant_config import load_float_base
from dqfast.reader import open_checkpoint
from dqfast.targets import DEFAULT_TARGET, TargetName, targets_of

__all__ = ["ALGOS", "MLP_PATTERNS", "default_policy", "parse_policy", "build_mixed_transformer"]

ALGOS = ("fp8", "nvfp4", "bf16")

Policy = Sequence[tuple[str, str]]


def default_policy(preset: ModelPreset) -> list[tuple[str, str]]:
    """The family's default policy (:meth:`dqfast.models.ModelPreset.default_mixed_policy`)."""
    return preset.default_mixed_policy()


def parse_policy(policy: Any, source: str = "policy") -> list[tuple[str, str]]:
    """``{"fp8": [regex...], "nvfp4": [...], "bf16": [...]}`` (key order is priority order; one
    ``str`` is one regex) or a list of ``(algo, regex)`` pairs -> validated ordered rules.
    Any other shape is a PlanError naming ``source`` and the shape expected."""
    shape = 'expected {"fp8"|"nvfp4"|"bf16": [regex, ...]} or [[algo, regex], ...]'
    pairs: list[tuple[Any, Any]] = []
    if isinstance(policy, Mapping):
        for algo, pats in policy.items():
            if isinstance(pats, (str, bytes)) or not isinstance(pats, Iterable) or isinstance(pats, Mapping):
                pats = [pats]
            pairs += [(algo, p) for p in pats]
    elif isinstance(policy, Iterable) and not isinstance(policy, (str, bytes)):
        for item in policy:
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
                raise PlanError(f"{source}: rule {item!r} is not an [algo, regex] pair; {shape}"[:300])
            pairs.append((item[0], item[1]))
    else:
        raise PlanError(f"{source}: a policy cannot be {type(policy).__name__}; {shape}")
    out = []
    for algo, p in pairs:
        a = str(algo).lower()
        if not isinstance(algo, str) or a not in ALGOS:
            raise PlanError(f"{source}: policy algorithm {algo!r} is not one of {', '.join(ALGOS)}; {shape}")
        if not isinstance(p, str):
            raise PlanError(f"{source}: {a} pattern {p!r} is not a string; {shape}"[:300])
        try:
            re.compile(p)
        except re.error as e:
            raise PlanError(f"{source}: policy pattern '{p}' ({a}) is not a valid regex: {e}") from None
        out.append((a, p))
    return out


def _match(rules: list[tuple[str, str]], module: str) -> tuple[str, str] | None:
    for algo, p in rules:
        if re.search(p, module):
            return algo, p
    return None


def build_mixed_transformer(
    output_dir: str | os.PathLike[str],
    base_transformer_dir: str | os.PathLike[str],
    policy: Mapping[str, Iterable[str]] | Policy | None = None,
    *,
    fallback: Iterable[str] | str = (),
    model_type: str = "auto",
    fp8_activation_amax: float | None = None,
    nvfp4_activation_amax: float | None = None,
    rounding: str = "exact",
    max_shard_size: str | int | None = None,
    threads: int = 0,
    overwrite: bool = False,
    dry_run: bool = False,
    fsync: bool = True,
    io: IoMode = "auto",
    component: str = "transformer",
    guard_inputs: Iterable[str | os.PathLike[str]] = (),
    force_model_type: bool = False,
    strict: bool = False,
    progress: ProgressFn | None = None,
    target: TargetName = DEFAULT_TARGET,
    fit_target: bool = False,
) -> BuildReport:
    """Write a MIXED_PRECISION transformer directory built from the BF16 base.

    ``fallback``: regexes of modules kept in BF16 before any policy rule (the preset's default
    policy or ``policy``) is consulted; one ``str`` is one regex. A policy that quantizes no
    layer is always an error (``strict`` is accepted for the builders' common signature).

    ``fp8_activation_amax`` -> FP8 ``input_scale = amax / 448`` (default 448, i.e. 1.0);
    ``nvfp4_activation_amax`` -> NVFP4 ``input_scale = amax / 2688`` (default 2688, i.e. 1.0).
    Both are stated in the config's ``calibration`` entry. ``guard_inputs``: files the caller
    read to make the arguments (the CLI's ``--policy`` file); like the base, the output may never
    be, contain or lie inside one.
    ``target`` / ``fit_target``: as for :func:`dqfast.fp8.build_fp8_transformer`. SGLang rejects
    MIXED_PRECISION, so ``sglang`` and ``any`` (the default) refuse it before anything is written
    (:class:`dqfast.errors.TargetError`): pass ``target="vllm-omni"`` (or ``"none"``). With the
    default policy, the layers the target's model class cannot load quantized stay BF16 (as
    ``fit_target``; ``report.target_forced`` says so, the warnings name each layer); an explicit
    ``policy`` is checked as written.
    """
    out = Path(output_dir)
    plan = new_plan(out, overwrite=overwrite, dry_run=dry_run, max_shard_size=max_shard_size, threads=threads, fsync=fsync, io=io)
    plan.guard(base_transformer_dir, *guard_inputs)
    if rounding not in ("exact", "modelopt"):
        raise PlanError(f"rounding must be 'exact' or 'modelopt', not '{rounding}'")
    base_dir, base_cfg = load_float_base(base_transformer_dir, component, "a mixed build")
    report = BuildReport(output_dir=str(out), quant_algo="MIXED_PRECISION")
    amax: dict[str, float] = {}
    for key, val, dflt in (("fp8", fp8_activation_amax, E4M3_MAX), ("nvfp4", nvfp4_activation_amax, NVFP4_BOUND)):
        amax[key] = check_activation_amax(val, dflt, f"{key}_activation_amax")
    preset = resolve_preset(model_type, base_cfg, force_model_type)
    # --fallback comes first: merged with the policy, never replaced by its own bf16 key.
    rules = [("bf16", p) for p in pattern_list(fallback, "fallback (--fallback)")]
    rules = parse_policy(rules) + (default_policy(preset) if policy is None else parse_policy(policy))
    base = open_checkpoint(base_dir)
    src = plan.source(base.root)
    mods = _group_modules(base)

    algo_of: dict[str, str] = {}
    why: dict[str, str] = {}
    ignore: set[str] = set()
    counts = {"fp8": 0, "nvfp4": 0, "bf16": 0, "not_linear": 0, "nvfp4_demoted_to_fp8": 0}
    algo: str | None
    for module, parts in mods.items():
        w = parts.get("weight")
        if w is None:
            continue
        if not is_float_linear(w):
            counts["not_linear"] += 1
            continue
        hit = _match(rules, module)
        algo, pat = hit if hit else ("bf16", "no policy rule matched")
        if algo == "nvfp4" and w.shape[1] % GROUP:
            report.warnings.append(f"{module}: in-features {w.shape[1]} not a multiple of {GROUP}; FP8 instead of NVFP4")
            counts["nvfp4_demoted_to_fp8"] += 1
            algo, pat = "fp8", f"{pat} (NVFP4 impossible: K={w.shape[1]})"
        algo_of[module], why[module] = algo, pat

    # Fused shards must agree (vLLM: "Mixed quant_algo within fused layer").
    groups = fused_groups(list(algo_of))
    group_of: dict[str, list[str]] = {}
    for key, members in groups.items():
        algos = {m: algo_of[m] for m in members}
        if len(set(algos.values())) > 1:
            detail = ", ".join(f"{m} -> {a} ({why[m]})" for m, a in algos.items())
            raise PlanError(f"fused group '{key}' would mix algorithms: {detail}; all shards a loader fuses need one algorithm")
        for m in members:
            group_of[m] = members

    quantized_layers: dict[str, dict[str, Any]] = {}
    for module, parts in mods.items():
        algo = algo_of.get(module)
        if algo is None or algo == "bf16":
            if algo == "bf16":
                counts["bf16"] += 1
                report.decisions.append(ModuleDecision(module, "bf16", why[module]))
                ignore.update(_ignore_entries(preset, module))
            for meta in parts.values():
                plan.copy(meta.name, src)
            continue
        counts[algo] += 1
        members = group_of.get(module, [module])
        shared = f"; global scale shared with {len(members) - 1} fused shard(s)" if algo == "nvfp4" and len(members) > 1 else ""
        report.decisions.append(ModuleDecision(module, algo, f"{why[module]}{shared}"))
        for suffix, meta in parts.items():
            if suffix != "weight":
                plan.copy(meta.name, src)
                continue
            ref = plan.ref(src, meta.name)
            if algo == "fp8":
                add_fp8_layer(plan, module, meta, ref, per_row=False, rounding=_rounding(rounding), input_amax=amax["fp8"])
                quantized_layers[module] = FP8.layer_entry()
            else:
                am: MaxOfAmax = {"kind": "max_of", "srcs": [plan.ref(src, f"{m}.weight") for m in members]}
                add_nvfp4_layer(plan, module, meta.name, ref, am, amax["nvfp4"])
                quantized_layers[module] = NVFP4.layer_entry()
    if not quantized_layers:
        raise PlanError("the policy quantizes no layer (MIXED_PRECISION needs a non-empty quantized_layers)")

    fp8_layers = sorted(m for m, v in quantized_layers.items() if v["quant_algo"] in FP8.algos)
    nv_layers = sorted(m for m, v in quantized_layers.items() if v["quant_algo"] in NVFP4.algos)
    config_groups: dict[str, Any] = {}
    if fp8_layers:
        config_groups[f"group_{len(config_groups)}"] = {
            "weights": dict(FP8.config_weights),
            "input_activations": dict(FP8.config_weights),
            "targets": fp8_layers,
        }
    if nv_layers:
        config_groups[f"group_{len(config_groups)}"] = {
            "weights": dict(NVFP4.config_weights),
            "input_activations": dict(NVFP4.config_weights),
            "targets": nv_layers,
        }
    quant_cfg: dict[str, Any] = {
        "quant_method": "modelopt",
        "quant_algo": "MIXED_PRECISION",
        "quantized_layers": dict(sorted(quantized_layers.items())),
        "ignore": sorted(ignore),
        "producer": {"name": "dqfast", "version": __version__},
        "config_groups": config_groups,
        "swap_weight_nibbles": False,
        "checkpoint_weight_scale_layout": "linear",
        "calibration": (
            f"weights-only (dqfast mixed); FP8 activation amax {amax['fp8']:g} -> input_scale "
            f"{np.float32(amax['fp8']) / np.float32(E4M3_MAX):g}; NVFP4 activation amax {amax['nvfp4']:g} -> "
            f"input_scale {np.float32(amax['nvfp4']) / np.float32(NVFP4_BOUND):g}"
        ),
    }
    _output_config(base_cfg, quant_cfg, plan)
    counts["quantized_layers"] = len(quantized_layers)
    report.counts = counts
    if fp8_layers and fp8_activation_amax is None:
        report.warnings.append("FP8 input_scale = 1.0 (activation amax 448 assumed); pass fp8_activation_amax from calibration")
    report.warnings.append("MIXED_PRECISION loads in vLLM-Omni (modelopt_mixed) and dqfast.runtime; SGLang Diffusion rejects it")
    plan.target, plan.fit_target = target, fit_target
    if policy is None and not fit_target and targets_of(target):
        # The default policy is dqfast's choice, not the user's: fit it to the target.
        plan.fit_target = True
        report.target_forced.append(
            "default policy: layers the target's model class cannot load quantized stay BF16 (as --fit-target; the warnings name each)"
        )
    return finish(plan, report, dry_run=dry_run, progress=progress)
