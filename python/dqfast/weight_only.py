"""Weight-only block-format transformers from a BF16 base (MXFP8: vLLM-Omni 0.30 ``quant_method: mxfp8``).

One builder for every weight-only block format of :data:`dqfast.formats.FORMATS` (the entries
:func:`dqfast.formats.weight_only_format` made from ``_core.BLOCK_FORMATS``), calibration-free:
every 2-D float Linear weight whose in-features K are a multiple of the format's block and that no
FP8 fallback pattern (the preset's, or ``fallback``) matches becomes the format's values
``weight`` plus one scale per block along K, ``weight_scale [N, K/block]``, written by the Rust
kernel of the format (``block_values`` / ``block_scales`` plan ops; a NaN/inf weight is refused
naming the tensor and row). Everything else is copied; there is no ``input_scale``
(activations are quantized at run time).

MXFP8 = e4m3 values ``[N, K]`` (F8_E4M3) and one E8M0 power-of-two scale per 32 elements along K
stored as U8 (the scale's biased exponent bits, as vLLM-Omni's loader takes them), bit-exact with
vLLM 0.30's reference quantizer. Its config is the one vLLM-Omni's
``DiffusionMXFP8Config.from_config`` reads (docs/notes/sources.md §7)::

    {"quant_method": "mxfp8", "is_checkpoint_mxfp8_serialized": true, "ignored_layers": [...]}

``ignored_layers`` is matched by exact module name, so it lists every kept 2-D linear. Shards a
loader fuses (q/k/v) must all be quantized or all kept (vLLM raises on mixed shards): a fallback
that splits a group is refused.

Each format's builder is also a function of this module, ``build_<name>_transformer`` (e.g.
``build_mxfp8_transformer``, made on first access): :func:`build_weight_only_transformer` with
``weight_format`` bound, the ``module:function`` the builder registry (``dqfast build <name>``,
batch) names.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

from dqfast.errors import PlanError
from dqfast.formats import FORMATS, WeightFormat
from dqfast.fp8 import _fallback_res, _group_modules, _ignore_entries, _output_config, is_float_linear
from dqfast.nvfp4 import fused_groups
from dqfast.plan import BlockScales, BlockValues, BuildReport, IoMode, ModuleDecision, ProgressFn, check_quantized, finish, new_plan
from dqfast.presets import resolve_preset
from dqfast.quant_config import load_float_base
from dqfast.reader import open_checkpoint
from dqfast.targets import DEFAULT_TARGET, TargetName

# Also build_<name>_transformer for each weight-only format (build_mxfp8_transformer), made on first
# access by __getattr__ below: the registry needs no line per format.
__all__ = ["build_weight_only_transformer", "weight_only_format_named"]


def weight_only_format_named(name: str) -> WeightFormat:
    """The weight-only block format ``name`` of :data:`dqfast.formats.FORMATS`; a PlanError naming
    the known ones otherwise."""
    f = FORMATS.get(name)
    if f is None or not f.weight_only:
        known = ", ".join(n for n, g in FORMATS.items() if g.weight_only)
        raise PlanError(f"weight_format '{name}' is no weight-only block format (known: {known})")
    return f


def build_weight_only_transformer(
    output_dir: str | os.PathLike[str],
    *,
    weight_format: str,
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
    """Build a weight-only transformer directory in block format ``weight_format`` (``"mxfp8"``:
    for vLLM-Omni) from a BF16/F16/F32 base.

    ``fallback``: extra regexes (``re.search`` on the module name, as for FP8; one ``str`` is
    one pattern) of modules to keep in BF16, on top of the preset's FP8 fallbacks. A build that
    quantizes nothing warns (``report.warnings``), or fails with ``strict``.

    ``target``: the serving-engine rules of :func:`dqfast.check.apply_target`: an engine of it that
    has no loader for the format's ``quant_method`` is a :class:`dqfast.errors.TargetError` (MXFP8:
    ``any``, the default, and ``sglang`` refuse, as SGLang 0.5.23 does not load this layout; pass
    ``target="vllm-omni"`` or ``"none"``), and so is a layer the engine's model class builds
    unquantized (vLLM-Omni's FLUX.1 quantizes only its single blocks): ``fit_target`` keeps such
    layers in BF16 and lists them. A platform restriction of the engine's loader (vLLM-Omni 0.30
    loads serialized MXFP8 on Ascend NPU only) is a line of ``report.warnings``.

    Raises :class:`dqfast.errors.DqfastError` subclasses naming the file, tensor and problem
    (a non-finite weight: :class:`~dqfast.errors.CheckpointError` with the tensor and row);
    nothing is left at ``output_dir`` on failure. ``progress``: see :data:`dqfast.plan.ProgressFn`.
    """
    fmt = weight_only_format_named(weight_format)
    block, name, method = fmt.block or 0, fmt.name, fmt.quant_method
    plan = new_plan(output_dir, overwrite=overwrite, dry_run=dry_run, max_shard_size=max_shard_size, threads=threads, fsync=fsync, io=io)
    plan.guard(base_transformer_dir)
    extra = _fallback_res(fallback)
    base_dir, base_cfg = load_float_base(base_transformer_dir, component, name)
    base = open_checkpoint(base_dir)
    preset = resolve_preset(model_type, base_cfg, force_model_type)
    src = plan.source(base.root)
    report = BuildReport(output_dir=str(plan.output_dir), quant_algo=fmt.algos[0])
    counts = {name: 0, "bf16_fallback": 0, "kept_unquantized": 0}
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
        if w.shape[1] % block:
            kept[module] = f"in-features {w.shape[1]} not a multiple of {block} ({fmt.label} block)"
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
            raise PlanError(
                f"fused group '{key}' would mix {fmt.label} and BF16 shards: {detail}; keep all of its shards (--fallback) or none"
            )
    qset = set(quantize)
    for module, parts in mods.items():
        if module in kept:
            report.decisions.append(ModuleDecision(module, "keep", kept[module]))
        elif module in qset:
            report.decisions.append(ModuleDecision(module, name, f"weights-only, one {fmt.scale_dtype} scale per {block} elements of K"))
            counts[name] += 1
        for suffix, meta in parts.items():
            if module in qset and suffix == "weight":
                ref = plan.ref(src, meta.name)
                plan.add(meta.name, BlockValues(src=ref, format=name))
                plan.add(f"{module}.weight_scale", BlockScales(src=ref, format=name))
            else:
                plan.copy(meta.name, src)
    quant_cfg: dict[str, Any] = {"quant_method": method, **fmt.method_config, fmt.ignore_key: sorted(ignore)}
    _output_config(base_cfg, quant_cfg, plan)
    report.counts = counts
    check_quantized(report, counts[name], strict)
    plan.target, plan.fit_target = target, fit_target
    return finish(plan, report, dry_run=dry_run, progress=progress)


def _bound_builder(name: str) -> Callable[..., BuildReport]:
    """:func:`build_weight_only_transformer` with ``weight_format=name``, as a function of its own
    whose signature and annotations lack ``weight_format`` (batch checks a manifest's options
    against them, and worker processes import it by its ``module:function`` name)."""
    fmt = weight_only_format_named(name)
    base = build_weight_only_transformer

    def build(output_dir: str | os.PathLike[str], **kwargs: Any) -> BuildReport:
        return base(output_dir, weight_format=name, **kwargs)

    sig = inspect.signature(base)
    build.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "weight_format"])  # type: ignore[attr-defined]
    build.__annotations__ = {k: v for k, v in base.__annotations__.items() if k != "weight_format"}
    build.__name__ = build.__qualname__ = f"build_{name}_transformer"
    build.__doc__ = f"Build a {fmt.label} weight-only transformer: :func:`build_weight_only_transformer` with weight_format={name!r}."
    return build


def __getattr__(attr: str) -> Callable[..., BuildReport]:
    # build_<name>_transformer for every weight-only format (the builder registry's targets).
    name = attr.removeprefix("build_").removesuffix("_transformer")
    f = FORMATS.get(name)
    if attr != f"build_{name}_transformer" or f is None or not f.weight_only:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    fn = globals()[attr] = _bound_builder(name)
    return fn
