"""``dqfast check``: what a serving engine will do with each tensor of a checkpoint, by the rules in
``dqfast.targets`` — on CPU, reading only headers and config (nothing is loaded onto a GPU, no
tensor data is read). Works on any ModelOpt-style transformer directory (dqfast's, SGLang's,
ModelOpt's, a downloaded one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqfast.errors import PlanError, TargetError
from dqfast.formats import BF16, MIXED_PRECISION, WeightFormat, classify, family_algos, op_output, weight_only_of_algo
from dqfast.models import detect_preset
from dqfast.quant_config import find_component_dir, load_json, quantized_layer_entry, resolve_quant_config
from dqfast.reader import open_checkpoint
from dqfast.targets import TARGETS, Target, get_target, other_targets

__all__ = ["LayerVerdict", "CheckReport", "check_checkpoint", "plan_tensors", "apply_target"]


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
    #: what the engine's verdict depends on (a platform restriction of the quant method)
    notes: list[str] = field(default_factory=list)

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
        notes = "".join(f"; {n}" for n in self.notes)
        return f"{self.target}: loads ({len(q)} layer(s) quantized{extra}){notes}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine_version,
            "family": self.family,
            "status": self.status,
            "config_error": self.config_error,
            "notes": self.notes,
            "layers": [vars(v) for v in self.layers],
        }


def _stored(tensors: dict, module: str) -> WeightFormat | None:
    """The module's weight format (``dqfast.formats.classify``); None: a dtype no format stores."""
    parts = {s: tensors[f"{module}.{s}"] for s in ("weight", "weight_scale") if f"{module}.{s}" in tensors}
    return classify(parts)


def weight_only_of(qc: Any) -> WeightFormat | None:
    """The weight-only format of a non-ModelOpt ``quant_method`` config (MXFP8), else None."""
    return weight_only_of_algo(qc.quant_algo)


def _refusal(t: Target, qc: Any) -> tuple[str, str] | None:
    """What of the config engine ``t`` refuses as a whole and the rule's source (None: it takes it):
    the quant_algo of a ModelOpt config, the quant_method of a weight-only one."""
    wo = weight_only_of(qc)
    if wo is not None:
        m = wo.quant_method
        return None if m in t.quant_methods else (f"quant_method {m}", t.quant_methods_refused.get(m, "it has no loader for it"))
    return None if qc.quant_algo in t.algos else (f"quant_algo {qc.quant_algo}", t.algos_source)


def _caveats(t: Target, qc: Any) -> list[str]:
    wo = weight_only_of(qc) if qc is not None else None
    note = t.quant_method_caveats.get(wo.quant_method) if wo is not None else None
    return [f"{t.engine_version}: {note}"] if note else []


def _engine_algo(t: Target, family: str, qc: Any, module: str, fmt: WeightFormat | None = None) -> tuple[str | None, str]:
    """The algorithm the engine builds ``module`` (stored as ``fmt``) with (None: unquantized), and why."""
    if not t.model_quantizes(family, module):
        return None, f"{t.name}'s {family} model class does not quantize this layer ({t.quantized_source(family)})"
    wo = weight_only_of(qc)
    if wo is not None:
        # vLLM's is_layer_skipped in its exact mode: the layer's own (runtime) name is listed.
        if module in qc.ignore or t.runtime_name(family, module) in qc.ignore:
            return None, f"listed in {wo.ignore_key} (exact name)"
        return qc.quant_algo, ""
    if qc.quant_algo == "NVFP4" and t.nvfp4_excludes_from_tensors and fmt is not None:
        # `ignore` is not consulted: the layers stored in BF16 are the exclusions.
        return (None, f"stored in BF16 ({t.nvfp4_excludes_source})") if fmt is BF16 else ("NVFP4", "")
    runtime = t.runtime_name(family, module)
    fused = t.packed_layer(module, family)
    # An engine that cannot map a fused layer back to its shards decides for the fused layer.
    hit = t.ignored(qc.ignore, runtime if fused is None or t.mixed_resolves_packed else fused)
    if hit is not None:
        return None, f"matched by ignore entry '{hit}' ({t.ignore_matching})"
    if qc.quant_algo != MIXED_PRECISION:
        return qc.quant_algo, ""
    layers = qc.quantized_layers
    if fused is not None and not t.mixed_resolves_packed and fused not in layers:
        return None, f"fused layer {fused} not resolvable from per-shard quantized_layers ({t.mixed_source})"
    spec = quantized_layer_entry(layers, runtime)  # the builders' and the runtime's matcher, on the engine's name
    if spec is None:
        return None, "not listed in quantized_layers"
    return str(spec.get("quant_algo", "")).upper(), ""


def _check_one(t: Target, d: Path, family: str, qc: Any, tensors: dict) -> CheckReport:
    rep = CheckReport(t.name, t.engine_version, family)
    if qc is not None and (refused := _refusal(t, qc)) is not None:
        rep.config_error = f"{refused[0]} is not accepted ({refused[1]})"
        return rep
    rep.notes = _caveats(t, qc)
    for m in sorted(_linears(tensors)):
        fmt = _stored(tensors, m)
        stored = fmt.label if fmt is not None else tensors[f"{m}.weight"].dtype
        algo, why = _engine_algo(t, family, qc, m, fmt) if qc is not None else (None, "no quantization config")
        if fmt is None:
            rep.layers.append(LayerVerdict(m, stored, "error", f"{stored} weight: stored in no format {t.name} loads"))
            continue
        if fmt is BF16:
            if algo is None:
                rep.layers.append(LayerVerdict(m, stored, "bf16", "loaded as BF16"))
            else:
                rep.layers.append(LayerVerdict(m, stored, "error", f"BF16 weight for a layer {t.name} quantizes as {algo} (no scales)"))
            continue
        if algo is None:
            if fmt.kind == "fp8" and t.fp8_into_bf16 == "dequantized":
                rep.layers.append(LayerVerdict(m, stored, "dequantized", f"loaded as BF16 (dequantized): {why}"))
            else:
                rep.layers.append(LayerVerdict(m, stored, "error", f"{stored} weight for an unquantized (BF16) layer: {why}"))
            continue
        # The stored family must be the one the algo builds (either FP8 granularity for an FP8 algo).
        if algo not in family_algos(fmt.kind):
            rep.layers.append(LayerVerdict(m, stored, "error", f"{stored} weight for a layer {t.name} builds as {algo}"))
        elif fmt.scale_per == "channel" and "channel" not in t.fp8_weight_scales:
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


# --- The same rules applied to a build plan, before anything is written (``--target``) -------------


@dataclass(frozen=True)
class _Planned:
    dtype: str
    shape: tuple[int, ...]


_SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")


def plan_tensors(plan: Any) -> dict[str, _Planned]:
    """dtype and shape of every tensor ``plan`` (a :class:`dqfast.plan.PlanBuilder`) will write,
    from its ops and the headers of its sources (no tensor data is read)."""
    infos: dict[int, Any] = {}

    def src(ref: dict[str, Any]) -> Any:
        i = ref["source"]
        if i not in infos:
            infos[i] = open_checkpoint(plan.sources[i]).tensors
        return infos[i][ref["tensor"]]

    out: dict[str, _Planned] = {}
    for t in plan.tensors:
        op = t["op"]
        if op in ("copy", "swap_nibbles", "repair_nan_e4m3"):
            m = src(t["src"])
            out[t["name"]] = _Planned(m.dtype, tuple(m.shape))
        elif op in ("scale_of", "scale_from_amax", "f32", "nvfp4_global_scale"):
            out[t["name"]] = _Planned("F32", tuple(t["shape"]))
        elif op in ("slice_rows", "rescale_e4m3"):
            m = src(t["src"])
            rows = t.get("stop", 0) - t.get("start", 0) or m.shape[0]
            out[t["name"]] = _Planned("F8_E4M3" if op == "rescale_e4m3" else m.dtype, (rows, *m.shape[1:]))
        elif op == "concat_rows":
            ms = [src(s) for s in t["srcs"]]
            out[t["name"]] = _Planned(ms[0].dtype, (sum(m.shape[0] for m in ms), *ms[0].shape[1:]))
        elif "src" in t and (planned := op_output(op, tuple(src(t["src"]).shape), t.get("format"))) is not None:
            out[t["name"]] = _Planned(*planned)  # a format's own op: dqfast.formats says what it writes
        else:
            raise PlanError(f"internal: op '{op}' of tensor '{t['name']}' has no output description for --target")
    return out


def _float_source(plan: Any, name: str) -> int | None:
    """A source of ``plan`` holding ``name`` as a BF16/F16/F32 tensor (the base transformer)."""
    for i, p in enumerate(plan.sources):
        try:
            m = open_checkpoint(p).tensors.get(name)
        except Exception:
            continue
        if m is not None and m.dtype in ("BF16", "F16", "F32"):
            return i
    return None


def _ignore_names(family: str, module: str) -> list[str]:
    """``module`` and the prefix each engine decides it under (SGLang's Qwen-Image: `img_mod`, not
    `img_mod.1`): what ``ignore`` must list so that every engine keeps it unquantized."""
    names = [module]
    for t in TARGETS.values():
        if (r := t.runtime_name(family, module)) not in names:
            names.append(r)
    return names


def _keep_bf16(plan: Any, qcfg: dict[str, Any], module: str, why: str, family: str, key: str = "ignore") -> None:
    """Rewrite ``module`` of ``plan`` to its float weight (no scales), listed in ``ignore`` (``key``)."""
    s = _float_source(plan, f"{module}.weight")
    if s is None:
        raise PlanError(
            f"--fit-target: '{module}' must stay BF16 ({why}) but no input holds its float weight (pass --base-transformer-dir)"
        )
    drop = {f"{module}.{x}" for x in ("weight", *_SCALE_SUFFIXES)}
    plan.tensors = [t for t in plan.tensors if t["name"] not in drop]
    plan.copy(f"{module}.weight", s)
    qcfg[key] = [*qcfg.get(key, []), *_ignore_names(family, module)]
    if isinstance(qcfg.get("quantized_layers"), dict):
        for name in _ignore_names(family, module):
            qcfg["quantized_layers"].pop(name, None)


def _linears(tensors: dict[str, Any]) -> set[str]:
    """The modules with a 2-D weight (the Linears) of a checkpoint's or a plan's tensors."""
    return {n[: -len(".weight")] for n, m in tensors.items() if n.endswith(".weight") and len(m.shape) == 2}


def _add_engine_names(qcfg: dict[str, Any], key: str, family: str, linears: set[str]) -> None:
    """Every entry naming a Linear, in the exclusion list (``key``) and in MIXED_PRECISION's
    ``quantized_layers``, also under each engine's runtime name (vLLM-Omni's Wan2.2
    `ffn.net_0.proj`, SGLang's Qwen-Image `img_mod`), where the name as written would not reach
    the layer; then the fused layers whose shards are all excluded (:func:`_add_fused_names`).
    Idempotent."""
    if isinstance(qcfg.get(key), list):
        named = [p for p in qcfg[key] if p in linears]
        qcfg[key] = [*qcfg[key], *(r for p in named for r in _ignore_names(family, p)[1:] if r not in qcfg[key])]
        _add_fused_names(qcfg, key, family, linears)
    layers = qcfg.get("quantized_layers")
    if isinstance(layers, dict):
        qcfg["quantized_layers"] = {
            **layers,
            **{r: spec for m, spec in layers.items() if m in linears for r in _ignore_names(family, m)[1:] if r not in layers},
        }


def _add_fused_names(qcfg: dict[str, Any], key: str, family: str, linears: set[str]) -> None:
    """A fused layer every shard of which is excluded is excluded by its own name too: an engine
    that cannot map its shards back (vLLM-Omni binds the pipeline class's packed mapping, which
    has none) decides for the fused layer (Qwen-Image's `add_kv_proj`) alone."""
    listed = set(qcfg[key])
    for t in TARGETS.values():
        if t.mixed_resolves_packed:  # it maps shard entries to its fused layers itself
            continue
        groups: dict[str, list[str]] = {}
        for m in linears:
            if (fused := t.packed_layer(m, family)) is not None:
                groups.setdefault(fused, []).append(m)
        for fused, shards in sorted(groups.items()):
            # Only where no entry already excludes it under the engine's rule (vLLM's substring
            # rule lets `…attn.to_q` exclude `…attn.to_qkv`, not `…add_q_proj` `…add_kv_proj`).
            if fused not in listed and all(m in listed for m in shards) and t.ignored(qcfg[key], fused) is None:
                qcfg[key].append(fused)
                listed.add(fused)


def _record_kept(report: Any, module: str, why: str) -> None:
    """The report follows a layer the target keeps in BF16: its decision says so and the count of
    its former action moves to ``kept_for_target`` (the report said it was quantized)."""
    for d in report.decisions:
        if d.module == module and d.action != "keep":
            if report.counts.get(d.action, 0) > 0:
                report.counts[d.action] -= 1
            report.counts["kept_for_target"] = report.counts.get("kept_for_target", 0) + 1
            d.action, d.reason = "keep", why


def apply_target(plan: Any, report: Any) -> None:
    """The serving-engine pass of every builder (called by :func:`dqfast.plan.finish`):

    1. always, for a ModelOpt config: an ``ignore`` entry that an engine's matching rule applies to
       a module the output quantizes is rewritten (vLLM's substring rule: ``proj_out`` would exclude
       ``single_transformer_blocks.*.proj_out``); a weight-only config's list matches exact names;
    2. with ``plan.target`` (the builders' default ``any``; ``none`` and None check nothing): the
       target's acceptance rules (the ones ``dqfast check`` runs) on the planned tensors and config;
       a quant_algo (or weight-only quant_method) an engine refuses, or a layer it cannot load, is a
       TargetError naming it, the rule and the ``--target`` values that would load it; with
       ``plan.fit_target`` such a layer is kept in BF16 / added to ``ignore`` instead (listed in
       ``report.warnings``). A quant method's platform caveat is a warning.
    """
    from dqfast.quant_config import _normalize
    from dqfast.targets import collision_free_ignore

    qcfg = dict(plan.quant_config)
    tensors = plan_tensors(plan)
    family = detect_preset(plan.src_config).name
    first = _normalize(qcfg, "planned config")
    wo = weight_only_of(first) if first is not None else None
    key = wo.ignore_key if wo is not None else "ignore"

    linears = _linears(tensors)
    _add_engine_names(qcfg, key, family, linears)

    def planned() -> Any:
        if wo is not None:  # exact names: nothing to rewrite
            return _normalize(qcfg, "planned config")
        return _normalize(_fix_ignore(qcfg, tensors, collision_free_ignore), "planned config")

    targets: list[Target] = []
    if plan.target is not None:
        try:
            targets = get_target(plan.target)
        except ValueError as e:
            raise PlanError(f"--target (target): {e}") from None
        report.target = plan.target
    if plan.fit_target and not targets:
        raise PlanError(f"--fit-target (fit_target=True) needs a --target naming an engine (target={plan.target!r} checks none)")
    for _ in range(3):
        if plan.fit_target and targets:
            forced = False
            for t in targets:
                qc = planned()
                if qc is None or _refusal(t, qc) is not None:
                    break
                for v in _check_one(t, plan.output_dir, family, qc, tensors).layers:
                    if v.outcome in ("error", "dequantized") and v.stored != "BF16":
                        _keep_bf16(plan, qcfg, v.module, f"{t.name}: {v.detail}", family, key)
                        _record_kept(report, v.module, f"--target {plan.target}: {t.name}: {v.detail}")
                        report.warnings.append(f"--target {plan.target}: kept {v.module} in BF16 ({t.name}: {v.detail})")
                        forced = True
                    elif v.outcome == "error":
                        qcfg[key] = [*qcfg.get(key, []), *_ignore_names(family, v.module)]
                        report.warnings.append(f"--target {plan.target}: listed {v.module} in {key} ({t.name}: {v.detail})")
                        forced = True
                if forced:  # the next engine is checked against the layers this one kept in BF16
                    tensors = plan_tensors(plan)
            if forced:
                continue
        break
    _add_engine_names(qcfg, key, family, linears)  # again for what --fit-target listed
    if wo is not None:
        qcfg[key] = sorted(set(qcfg.get(key, [])))
    else:
        qcfg["ignore"] = _fix_ignore(qcfg, tensors, collision_free_ignore, report if targets else None)["ignore"]
    qc = _normalize(qcfg, "planned config")
    refused = [(t, r) for t in targets if qc is not None and (r := _refusal(t, qc)) is not None]
    if refused:  # a whole format: --fit-target cannot help
        t, (what, source) = refused[0]
        alts = other_targets(plan.target, lambda e: _refusal(e, qc) is None) or "--target none"
        raise TargetError(f"--target {plan.target}: {t.engine_version} cannot load {what} ({source}); pass {alts}")
    failures: dict[str, str] = {}  # engine -> the first layer it cannot load, and why
    for t in targets:
        rep = _check_one(t, plan.output_dir, family, qc, tensors)
        report.warnings.extend(n for n in rep.notes if n not in report.warnings)
        bad = [v for v in rep.layers if v.outcome == "error"]
        if bad:
            more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
            failures[t.name] = f"{t.engine_version} cannot load '{bad[0].module}': {bad[0].detail}{more}"
    if failures:

        def loads(e: Target) -> bool:  # another target, by the same rules
            if e.name in failures or _refusal(e, qc) is not None:
                return False
            return not any(v.outcome == "error" for v in _check_one(e, plan.output_dir, family, qc, tensors).layers)

        alts = other_targets(plan.target, loads) or "--target none"
        raise TargetError(
            f"--target {plan.target}: {next(iter(failures.values()))}; "
            f"pass --fit-target (fit_target=True) to keep such layers in BF16, or {alts}"
        )
    plan.write_config(plan.src_config, qcfg)


def _fix_ignore(qcfg: dict[str, Any], tensors: dict[str, _Planned], fix: Any, report: Any = None) -> dict[str, Any]:
    quantized = {n[: -len(".weight")] for n, m in tensors.items() if n.endswith(".weight") and m.dtype in ("F8_E4M3", "F8_E5M2", "U8")}
    seen: list[str] = []
    for p in qcfg.get("ignore", []):
        if p not in seen:
            seen.append(p)
    try:
        ignore, rewrites = fix(seen, quantized)
    except ValueError as e:
        raise PlanError(f"quantization_config.ignore: {e}") from None
    if report is not None:
        for old, new in rewrites.items():
            report.warnings.append(f"ignore entry '{old}' written as '{new}' (vLLM matches '{old}' as a substring of quantized layers)")
    qcfg["ignore"] = ignore
    return qcfg
