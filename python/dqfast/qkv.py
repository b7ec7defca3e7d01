"""Packed (fused) vs split q/k/v layouts, converted exactly with the Rust plan engine.

FLUX.2's raw NVFP4 export (black-forest-labs/FLUX.2-dev-NVFP4) keeps BFL names with fused
projections: ``double_blocks.N.img_attn.qkv.{weight,weight_scale,weight_scale_2,input_scale}``
(NVFP4), ``double_blocks.N.txt_attn.qkv.weight`` (BF16) and ``single_blocks.N.linear1`` (fused
q/k/v + MLP). Diffusers-style loaders want ``to_q/to_k/to_v`` and ``add_{q,k,v}_proj``.

- **split**: a fused ``[3N, ...]`` tensor becomes three ``[N, ...]`` tensors (``slice_rows`` of the
  packed weight ``[3N, K/2]``, the block scales ``[3N, K/16]`` and the bias); the one global scale
  and input scale are copied to every shard (the shards then share them, as fused loaders need).
- **fused**: ``concat_rows`` of the shards. Shards whose ``weight_scale_2`` differ are reconciled
  exactly: each shard's block scales are re-expressed for ``gs_max`` (``rescale_e4m3`` with factor
  ``gs_i / gs_max``, one e4m3 rounding), never vLLM's silent ``max()``; see docs/nvfp4.md for the
  bound. That needs the rescaled scales as a *source* of the concatenation, so it runs as two plans:
  a small one writing only the rescaled block scales to a scratch directory, then the full one.

Swizzled (128x4 tiled) block scales stay valid under row slicing/concatenation only at multiples of
128 rows with a column count that is a multiple of 4; anything else is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dqfast._core import __version__
from dqfast.errors import PlanError
from dqfast.formats import NVFP4, classify
from dqfast.models import QkvRule, get_preset
from dqfast.plan import (
    F32,
    BuildReport,
    ConcatRows,
    Copy,
    IoMode,
    ModuleDecision,
    PlanBuilder,
    RescaleE4m3,
    SliceRows,
    copy_sidecar_files,
    execute,
    new_plan,
    split_module,
)
from dqfast.quant_config import load_json
from dqfast.reader import CheckpointInfo, TensorMeta, open_checkpoint, read_tensor

__all__ = [
    "PACKED_QKV_RE",
    "QkvRule",
    "FLUX2_BFL_RULES",
    "SGLANG_FUSED_RULES",
    "detect_qkv_layout",
    "split_packed_qkv",
    "fuse_qkv",
    "convert_qkv_layout",
]

#: SGLang's packed-QKV detector (runtime/utils/quantization_utils.py), searched in tensor names.
PACKED_QKV_RE = re.compile(r"^(double_blocks\.\d+\.(img|txt)_attn\.qkv|single_blocks\.\d+\.linear1)\.")
# Split q/k/v shards as diffusers / vLLM-Omni name them.
_SPLIT_RE = re.compile(r"\.(to_[qkv]|add_[qkv]_proj|[qkv]_proj)\.")

_SHARDS = ("q", "k", "v")
_SCALAR_SUFFIXES = ("weight_scale_2", "input_scale")
_ROW_SUFFIXES = ("weight", "weight_scale", "bias")


#: BFL FLUX.2 packed names <-> diffusers shards: the FLUX.2 family's rules (``dqfast.models.flux2``).
FLUX2_BFL_RULES: tuple[QkvRule, ...] = get_preset("flux2").qkv_rules

#: SGLang's FLUX.2 runtime names (``attn.to_qkv`` / ``attn.to_added_qkv``) <-> diffusers shards.
SGLANG_FUSED_RULES: tuple[QkvRule, ...] = (
    QkvRule(r"^(?P<p>.+)\.to_qkv$", r"^(?P<p>.+)\.to_(?P<s>[qkv])$", r"\g<p>.to_qkv", r"\g<p>.to_{s}"),
    QkvRule(r"^(?P<p>.+)\.to_added_qkv$", r"^(?P<p>.+)\.add_(?P<s>[qkv])_proj$", r"\g<p>.to_added_qkv", r"\g<p>.add_{s}_proj"),
)


def detect_qkv_layout(names: Iterable[str]) -> Literal["packed", "split", "none"]:
    """``packed`` when any tensor matches SGLang's packed-QKV regex, ``split`` when q/k/v shards
    are separate (diffusers names), else ``none``."""
    split = False
    for n in names:
        if PACKED_QKV_RE.search(n):
            return "packed"
        split = split or bool(_SPLIT_RE.search(n))
    return "split" if split else "none"


def _group(info: CheckpointInfo) -> OrderedDict[str, dict[str, TensorMeta]]:
    """Every tensor by module (``_quantizer`` state included: a layout change copies it all)."""
    mods: OrderedDict[str, dict[str, TensorMeta]] = OrderedDict()
    for name, meta in info.tensors.items():
        module, suffix = split_module(name)
        mods.setdefault(module, {})[suffix] = meta
    return mods


def _check_swizzle_rows(module: str, parts: dict[str, TensorMeta], shard_rows: int, swizzled: bool) -> None:
    ws = parts.get("weight_scale")
    if ws is None or not swizzled or ws.dtype != "F8_E4M3":
        return
    rows, cols = ws.shape[0], ws.shape[-1]
    if rows != parts["weight"].shape[0] or shard_rows % 128 or cols % 4:
        raise PlanError(
            f"{ws.file}: tensor '{ws.name}': swizzled (128x4) block scales {list(ws.shape)} can only be split "
            f"or fused at multiples of 128 rows with a multiple of 4 columns (shard rows {shard_rows})"
        )


def split_packed_qkv(
    plan: PlanBuilder,
    source: int,
    module: str,
    parts: dict[str, TensorMeta],
    shard_names: Sequence[str],
    *,
    swizzled: bool = False,
) -> None:
    """Add ops writing ``shard_names`` (q, k, v) from the fused ``module``.

    Row tensors (weight, block scales, bias) are split evenly along the output dimension; the
    global and input scales are copied unchanged to every shard (shared, as fused loaders need).
    """
    if "weight" not in parts:
        raise PlanError(f"fused module '{module}' has no weight")
    rows = parts["weight"].shape[0]
    n = len(shard_names)
    if rows % n:
        raise PlanError(f"{parts['weight'].file}: tensor '{parts['weight'].name}': {rows} rows do not split into {n} equal shards")
    per = rows // n
    _check_swizzle_rows(module, parts, per, swizzled)
    for suffix, meta in parts.items():
        if suffix in _ROW_SUFFIXES:
            if not meta.shape or meta.shape[0] != rows:
                raise PlanError(f"{meta.file}: tensor '{meta.name}': shape {list(meta.shape)} has no {rows} leading rows to split")
            for i, shard in enumerate(shard_names):
                plan.add(f"{shard}.{suffix}", SliceRows(src=plan.ref(source, meta.name), start=i * per, stop=(i + 1) * per))
        elif suffix in _SCALAR_SUFFIXES:
            if int(np.prod(meta.shape)) != 1:
                raise PlanError(f"{meta.file}: tensor '{meta.name}': shape {list(meta.shape)} is not a per-tensor scale")
            for shard in shard_names:
                plan.add(f"{shard}.{suffix}", Copy(src=plan.ref(source, meta.name)))
        else:
            raise PlanError(f"{meta.file}: tensor '{meta.name}': don't know how to split '{suffix or meta.name}'")


def _scalar(meta: TensorMeta) -> np.float32:
    v = read_tensor(meta.file, meta.name).reshape(-1)
    if v.size != 1:
        raise PlanError(f"{meta.file}: tensor '{meta.name}' has {v.size} values; expected a per-tensor scale")
    x = np.float32(v[0])
    if not np.isfinite(x) or x <= 0:
        raise PlanError(f"{meta.file}: tensor '{meta.name}' is {float(x)}; it must be finite and > 0")
    return x


@dataclass
class FuseResult:
    """What fusing one group did."""

    fused: str
    reconciled: bool
    global_scale: float | None
    factors: dict[str, float]
    max_relative_change: float
    input_scales_differed: bool


def fuse_qkv(
    plan: PlanBuilder,
    source: int,
    fused: str,
    shards: Sequence[tuple[str, dict[str, TensorMeta]]],
    *,
    rescale_plan: PlanBuilder | None = None,
    swizzled: bool = False,
) -> FuseResult:
    """Add ops writing ``fused`` as the row concatenation of ``shards`` (q, k, v order).

    NVFP4 shards with different ``weight_scale_2`` need ``rescale_plan``, which the caller executes
    *before* ``plan``: their block scales are rescaled there by ``gs_i / gs_max`` and ``plan``
    concatenates them from its output directory.
    """
    from dqfast.nvfp4 import _rescale_error

    names = [m for m, _ in shards]
    nv = [classify(p) is NVFP4 for _, p in shards]
    if any(nv) and not all(nv):
        raise PlanError(f"cannot fuse {names}: some shards are NVFP4 and some are not")
    suffixes = set(shards[0][1])
    for m, p in shards[1:]:
        if set(p) != suffixes:
            raise PlanError(f"cannot fuse {names}: tensors differ ({sorted(suffixes)} vs {sorted(p)} in '{m}')")
    w0 = shards[0][1]["weight"]
    for m, p in shards:
        w = p["weight"]
        if w.dtype != w0.dtype or w.shape[1:] != w0.shape[1:]:
            raise PlanError(f"cannot fuse {names}: '{w.name}' is {w.dtype} {list(w.shape)}, '{w0.name}' is {w0.dtype} {list(w0.shape)}")
        if w.dtype == "F8_E4M3":
            raise PlanError(f"cannot fuse FP8 shards {names}: per-shard weight scales are kept (loaders fuse them)")
        _check_swizzle_rows(m, p, w.shape[0], swizzled)
    result = FuseResult(fused, False, None, {}, 0.0, False)
    gs: dict[str, np.float32] = {}
    if all(nv) and "weight_scale_2" in suffixes:
        gs = {m: _scalar(p["weight_scale_2"]) for m, p in shards}
        result.global_scale = float(max(gs.values()))
    reconcile = len(set(gs.values())) > 1
    if reconcile and rescale_plan is None:
        raise PlanError(
            f"shards {names} have different weight_scale_2 {sorted(map(float, set(gs.values())))}: fusing them needs a rescale plan"
        )
    for suffix in sorted(suffixes):
        metas = [p[suffix] for _, p in shards]
        if suffix == "weight_scale" and reconcile:
            assert rescale_plan is not None
            gmax = max(gs.values())
            srcs = []
            worst = 0.0
            for (m, _), meta in zip(shards, metas):
                f = float(gs[m] / gmax)  # float32 division, as the bound in docs/nvfp4.md assumes
                result.factors[m] = f
                scratch = f"{m}.weight_scale"
                rescale_plan.add(scratch, RescaleE4m3(src=rescale_plan.ref(rescale_plan.source(meta.file), meta.name), factor=f))
                srcs.append(plan.ref(plan.source(rescale_plan.output_dir), scratch))
                worst = max(worst, _rescale_error(meta, f, float(gs[m]), float(gmax)))
            plan.add(f"{fused}.weight_scale", ConcatRows(srcs=srcs))
            result.reconciled = True
            result.max_relative_change = worst
        elif suffix in _ROW_SUFFIXES:
            plan.add(f"{fused}.{suffix}", ConcatRows(srcs=[plan.ref(source, m.name) for m in metas]))
        elif suffix == "weight_scale_2":
            if reconcile:
                plan.add(f"{fused}.weight_scale_2", F32(values=[float(max(gs.values()))], shape=list(metas[0].shape)))
            else:
                plan.add(f"{fused}.weight_scale_2", Copy(src=plan.ref(source, metas[0].name)))
        elif suffix == "input_scale":
            vals = [_scalar(m) for m in metas]
            if len(set(vals)) == 1:
                plan.add(f"{fused}.input_scale", Copy(src=plan.ref(source, metas[0].name)))
            else:
                # One activation feeds all shards: vLLM keeps the max, so do the same, visibly.
                result.input_scales_differed = True
                plan.add(f"{fused}.input_scale", F32(values=[float(max(vals))], shape=list(metas[0].shape)))
        else:
            raise PlanError(f"cannot fuse tensor '{metas[0].name}' ('{suffix}')")
    return result


def _rename_in_config(qc: dict[str, Any], rename: dict[str, list[str]]) -> dict[str, Any]:
    """Follow a module rename in ``ignore`` and ``quantized_layers`` (exact names only)."""
    out = dict(qc)
    for key in ("ignore", "exclude_modules"):
        if isinstance(out.get(key), list):
            new: list[str] = []
            for p in out[key]:
                for r in rename.get(p, [p]):
                    if r not in new:
                        new.append(r)
            out[key] = new
    if isinstance(out.get("quantized_layers"), dict):
        ql: dict[str, Any] = {}
        for k, v in out["quantized_layers"].items():
            for r in rename.get(k, [k]):
                ql[r] = v
        out["quantized_layers"] = ql
    return out


def convert_qkv_layout(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    to: Literal["split", "fused"] = "split",
    name_map: Sequence[QkvRule] = FLUX2_BFL_RULES,
    scale_layout: Literal["auto", "linear", "swizzled"] = "auto",
    swap_weight_nibbles: bool | None = None,
    max_shard_size: str | int | None = None,
    threads: int = 0,
    overwrite: bool = False,
    fsync: bool = True,
    io: IoMode = "auto",
) -> BuildReport:
    """Write a copy of the checkpoint at ``src_dir`` with q/k/v split (``to="split"``) or fused.

    Every other tensor is copied byte for byte. ``scale_layout`` / ``swap_weight_nibbles``: what the
    source's NVFP4 bytes are. ``auto`` follows SGLang: an explicit config key wins, else a packed-QKV
    checkpoint is swizzled and nibble-swapped. A split output no longer looks packed, so both facts
    are written explicitly into its quantization config (config.json and shard metadata).
    """
    if to not in ("split", "fused"):
        raise PlanError(f"to must be 'split' or 'fused', not {to!r}")
    src = Path(src_dir)
    out = Path(out_dir)
    plan = new_plan(out, overwrite=overwrite, max_shard_size=max_shard_size, threads=threads, fsync=fsync, io=io)
    plan.guard(src)
    info = open_checkpoint(src)
    root = info.root if info.root.is_dir() else info.root.parent
    cfg_path = root / "config.json"
    cfg = load_json(cfg_path) if cfg_path.is_file() else {}
    md = dict(info.first_metadata())
    qc: dict[str, Any] | None = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else None
    md_qc: dict[str, Any] | None = None
    for key in ("_quantization_metadata", "quantization_config"):
        if key in md:
            try:
                v = json.loads(md[key])
            except json.JSONDecodeError:
                continue
            if isinstance(v, dict):
                md_qc = v
                break
    explicit = qc or md_qc or {}
    layout = detect_qkv_layout(info.tensors)
    if scale_layout == "auto":
        scale_layout = explicit.get("checkpoint_weight_scale_layout") or ("swizzled" if layout == "packed" else "linear")
    if scale_layout not in ("linear", "swizzled"):
        raise PlanError(f"scale_layout must be linear or swizzled, not {scale_layout!r}")
    if swap_weight_nibbles is None:
        swap_weight_nibbles = bool(explicit.get("swap_weight_nibbles", layout == "packed"))
    swizzled = scale_layout == "swizzled"

    s = plan.source(info.root)
    mods = _group(info)
    report = BuildReport(output_dir=str(out), quant_algo=f"qkv-{to}")
    counts = {"split": 0, "fused": 0, "reconciled": 0, "copied_tensors": 0}
    rename: dict[str, list[str]] = {}
    scratch: Path | None = None
    rescale_plan: PlanBuilder | None = None
    try:
        if to == "split":
            for module, parts in mods.items():
                shards = next((r.shards_of(module) for r in name_map if r.shards_of(module)), None)
                if shards is None or "weight" not in parts:
                    for meta in parts.values():
                        plan.copy(meta.name, s)
                        counts["copied_tensors"] += 1
                    continue
                split_packed_qkv(plan, s, module, parts, shards, swizzled=swizzled)
                rename[module] = shards
                counts["split"] += 1
                report.decisions.append(ModuleDecision(module, "split", " + ".join(shards)))
        else:
            groups: dict[str, dict[str, str]] = {}
            for module in mods:
                for r in name_map:
                    hit = r.fused_of(module)
                    if hit:
                        groups.setdefault(hit[0], {})[hit[1]] = module
                        break
            members = {m: f for f, g in groups.items() for m in g.values()}
            scratch = Path(tempfile.mkdtemp(prefix=".dqfast-qkv-", dir=out.parent if out.parent.exists() else None))
            rescale_plan = PlanBuilder(scratch / "scales", fsync=False, threads=threads)
            done: set[str] = set()
            for module, parts in mods.items():
                f = members.get(module)
                if f is None:
                    for meta in parts.values():
                        plan.copy(meta.name, s)
                        counts["copied_tensors"] += 1
                    continue
                if f in done:
                    continue
                g = groups[f]
                if set(g) != set(_SHARDS):
                    raise PlanError(f"'{f}': found shards {sorted(g)} only; fusing needs q, k and v")
                res = fuse_qkv(plan, s, f, [(g[x], mods[g[x]]) for x in _SHARDS], rescale_plan=rescale_plan, swizzled=swizzled)
                done.add(f)
                for x in _SHARDS:
                    rename[g[x]] = [f]
                counts["fused"] += 1
                why = " + ".join(g[x] for x in _SHARDS)
                if res.reconciled:
                    counts["reconciled"] += 1
                    why += (
                        f"; weight_scale_2 unified to {res.global_scale:.6g}, block scales re-rounded, "
                        f"max relative change {res.max_relative_change:.3%}"
                    )
                if res.input_scales_differed:
                    report.warnings.append(f"{f}: shards had different input_scale; the fused layer keeps the max")
                report.decisions.append(ModuleDecision(f, "fuse" if not res.reconciled else "fuse+reconcile", why))
        # Config and metadata: follow the rename; state the NVFP4 byte layout explicitly.
        has_nv = any(classify(p) is NVFP4 for p in mods.values())

        def fix(q: dict[str, Any]) -> dict[str, Any]:
            q = _rename_in_config(q, rename)
            if has_nv:
                q["checkpoint_weight_scale_layout"] = scale_layout
                q["swap_weight_nibbles"] = bool(swap_weight_nibbles)
            return q

        if cfg:
            out_cfg = dict(cfg)
            if qc is not None:
                out_cfg["quantization_config"] = fix(qc)
            plan.text_file("config.json", json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
        new_md = {k: v for k, v in md.items()}
        new_md.setdefault("format", "pt")
        if md_qc is not None or qc is not None:
            qjson = json.dumps(fix(md_qc if md_qc is not None else qc or {}), sort_keys=True)
            new_md["quantization_config"] = qjson
            new_md["_quantization_metadata"] = qjson
        new_md["dqfast_version"] = __version__
        plan.shard_metadata = new_md
        if root.is_dir():
            copy_sidecar_files(plan, root)
        report.counts = counts
        if has_nv and (scale_layout == "swizzled" or swap_weight_nibbles):
            report.warnings.append(
                f"NVFP4 bytes kept as they are: block scales {scale_layout}, swap_weight_nibbles {swap_weight_nibbles} "
                "(written explicitly into the output's quantization config)"
            )
        if rescale_plan is not None and rescale_plan.tensors:
            execute(rescale_plan, BuildReport(output_dir=None, quant_algo="rescale"))
        return execute(plan, report)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
