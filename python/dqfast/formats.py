"""The format registry: one :class:`WeightFormat` per way a Linear weight is stored.

Each entry holds everything the Python side decides about a format, so that the config reader
(``quant_config``), ``inspect``, ``check``, ``verify``, the runtime loader and the builders ask
here instead of keeping their own ``if algo == "NVFP4"`` chains:

- ``algos``: the ``quant_algo`` names that store it (the first is the one dqfast writes);
  ``quant_method``: the config's ``quant_method`` (``modelopt``, or vLLM-Omni's ``mxfp8``);
- how a layer's tensors are recognised (:func:`classify`: weight dtype, scale dtype and size);
- the tensors a layer of it carries besides ``weight`` and its block along K;
- its MIXED_PRECISION ``quantized_layers`` entry and its ``config_groups`` weight fields;
- the plan ops that write it and the builder (a :data:`dqfast.builders.BUILDERS` key) that does.

Every number comes from ``dqfast._core`` (the Rust engine), never written again here. A
weight-only block format (MXFP8) is mostly Rust's: its kernel file exports a ``BlockFormat``
(``_core.BLOCK_FORMATS``: block, dtypes, packing), :func:`weight_only_format` turns it into an entry
adding only what the serving engine's config needs, and the generic plan ops (``block_values``,
``block_scales``), builder (``dqfast.weight_only``) and its ``dqfast build <name>`` command follow.
This module imports nothing else from dqfast but ``_core`` and ``errors``: any module may use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dqfast import _core
from dqfast.errors import PlanError

__all__ = [
    "WeightFormat",
    "FORMATS",
    "BF16",
    "FP8",
    "FP8_CHANNEL",
    "NVFP4",
    "MXFP8",
    "MIXED_PRECISION",
    "weight_only_format",
    "weight_only_of_algo",
    "classify",
    "op_output",
    "algo_names",
    "format_of_algo",
    "family_algos",
    "format_for_method",
]

#: The ModelOpt quant_algo whose layers each carry their own format (``quantized_layers``).
MIXED_PRECISION = "MIXED_PRECISION"


class _Tensor(Protocol):
    """What :func:`classify` reads of a tensor: a reader ``TensorMeta`` (header only)."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class WeightFormat:
    """One storage format of a Linear weight."""

    #: Registry key ("bf16", "fp8", "fp8_channel", "nvfp4", "mxfp8").
    name: str
    #: As reports print it ("FP8 per-channel").
    label: str
    #: The family: both FP8 scale granularities are "fp8"; ``inspect`` counts modules by it.
    kind: str
    #: quant_algo values that store this format; the first is the one dqfast writes.
    algos: tuple[str, ...] = ()
    #: quant_algo values of ``algos`` whose activations have a static ``input_scale``.
    static_input_algos: tuple[str, ...] = ()
    #: The config's quant_method.
    quant_method: str = "modelopt"
    #: safetensors dtype of ``weight`` and of ``weight_scale`` (None: no scale).
    weight_dtype: str | None = None
    scale_dtype: str | None = None
    #: Weight-scale granularity: "tensor", "channel" or "block" (``block`` elements along K).
    scale_per: str | None = None
    block: int | None = None
    #: Weight elements per stored byte along K (NVFP4 packs two).
    elements_per_byte: int = 1
    #: A ``weight_scale`` byte that is NaN when the scale dtype cannot say so itself (U8 E8M0).
    scale_nan_byte: int | None = None
    #: Tensors a layer carries besides ``weight`` (``input_scale`` only for static algos).
    tensors: tuple[str, ...] = ()
    #: ``config_groups.*.weights`` fields (a builder adds its own ``strategy``).
    config_weights: Mapping[str, Any] = field(default_factory=dict)
    #: Plan ops (``dqfast.plan``) that write a layer of it; ``weight_op`` writes the stored weight
    #: and ``block_scale_op`` its block scales from a float ``[N, K]`` source (both None: no op of
    #: its own).
    ops: tuple[str, ...] = ()
    weight_op: str | None = None
    block_scale_op: str | None = None
    #: The builder (a ``dqfast.builders.BUILDERS`` key) that writes it.
    builder: str | None = None
    #: A non-ModelOpt ``quant_method``'s config: its fields besides ``quant_method`` and the
    #: list of modules left unquantized (``ignore_key``, matched by exact module name).
    method_config: Mapping[str, Any] = field(default_factory=dict)
    ignore_key: str = "ignored_layers"

    @property
    def weight_only(self) -> bool:
        """A weight-only block format (``_core.BLOCK_FORMATS``), built by ``dqfast.weight_only``."""
        return self.weight_op == BLOCK_VALUES_OP

    def layer_entry(self, algo: str | None = None) -> dict[str, Any]:
        """This format's MIXED_PRECISION ``quantized_layers`` entry (for ``algo``, one of
        ``algos``; by default the one dqfast writes)."""
        entry: dict[str, Any] = {"quant_algo": algo or self.algos[0]}
        if self.scale_per == "block":
            entry["group_size"] = self.block
        return entry

    def needs_input_scale(self, algo: str) -> bool:
        return algo in self.static_input_algos

    def op_output(self, op: str, src_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
        """dtype and shape that this format's ``op`` writes from a float ``[..., K]`` source (what
        ``check`` plans for ``--target`` before anything is written); None for another op."""
        if not src_shape or op not in (self.weight_op, self.block_scale_op):
            return None
        *lead, k = src_shape
        if op == self.weight_op and self.weight_dtype is not None:
            return self.weight_dtype, (*lead, k // self.elements_per_byte)
        if op == self.block_scale_op and self.scale_dtype is not None and self.block:
            return self.scale_dtype, (*lead, k // self.block)
        return None

    def block_scale_shape(self, weight_shape: tuple[int, ...]) -> list[int] | None:
        """The ``weight_scale`` shape a ``[N, K]`` stored weight needs (one scale per ``block``
        elements along K), or None when the weight is not 2-D or K is no multiple of ``block``."""
        if self.scale_per != "block" or self.block is None or len(weight_shape) != 2:
            return None
        k = weight_shape[1] * self.elements_per_byte
        return None if k % self.block else [weight_shape[0], k // self.block]


#: The engine's generic ops of a weight-only block format (their ``format`` field names it).
BLOCK_VALUES_OP = "block_values"
BLOCK_SCALES_OP = "block_scales"


def weight_only_format(
    name: str,
    *,
    quant_method: str,
    method_config: Mapping[str, Any],
    scale_nan_byte: int | None = None,
) -> WeightFormat:
    """The entry of the weight-only block format ``name`` of ``_core.BLOCK_FORMATS``: block, dtypes
    and packing from the Rust entry; ``quant_method`` and ``method_config``: the config the serving
    engine reads (``{"quant_method": ..., **method_config, "ignored_layers": [...]}``);
    ``scale_nan_byte``: a scale byte that means NaN (``inspect`` reports it). Its quant_algo (as
    reports and ``dqfast check`` name it) is the Rust entry's label."""
    core = _core.BLOCK_FORMATS.get(name)
    if core is None:
        raise PlanError(f"no block format '{name}' in the engine (known: {', '.join(_core.BLOCK_FORMATS)})")
    return WeightFormat(
        name,
        core["label"],
        name,
        algos=(core["label"],),
        quant_method=quant_method,
        weight_dtype=core["values_dtype"],
        scale_dtype=core["scales_dtype"],
        scale_per="block",
        block=core["block"],
        elements_per_byte=core["elements_per_byte"],
        scale_nan_byte=scale_nan_byte,
        tensors=("weight_scale",),
        ops=(BLOCK_VALUES_OP, BLOCK_SCALES_OP),
        weight_op=BLOCK_VALUES_OP,
        block_scale_op=BLOCK_SCALES_OP,
        builder=name,
        method_config=dict(method_config),
    )


BF16 = WeightFormat("bf16", "BF16", "float", weight_dtype=None)
FP8 = WeightFormat(
    "fp8",
    "FP8",
    "fp8",
    algos=("FP8",),
    static_input_algos=("FP8",),
    weight_dtype="F8_E4M3",
    scale_dtype="F32",
    scale_per="tensor",
    tensors=("weight_scale", "input_scale"),
    config_weights={"num_bits": 8, "type": "float", "dynamic": False},
    ops=("fp8", "scale_of", "scale_from_amax", "f32", "repair_nan_e4m3"),
    weight_op="fp8",
    builder="fp8",
)
FP8_CHANNEL = WeightFormat(
    "fp8_channel",
    "FP8 per-channel",
    "fp8",
    algos=("FP8_PER_CHANNEL_PER_TOKEN",),
    weight_dtype="F8_E4M3",
    scale_dtype="F32",
    scale_per="channel",
    tensors=("weight_scale",),
    config_weights={"num_bits": 8, "type": "float", "dynamic": False},
    ops=("fp8", "scale_of", "f32", "repair_nan_e4m3"),
    weight_op="fp8",
    builder="fp8",
)
NVFP4 = WeightFormat(
    "nvfp4",
    "NVFP4",
    "nvfp4",
    # W4A16_NVFP4: the same weights, activations left in BF16 (no input_scale needed).
    algos=("NVFP4", "W4A16_NVFP4"),
    static_input_algos=("NVFP4",),
    weight_dtype="U8",
    scale_dtype="F8_E4M3",
    scale_per="block",
    block=_core.NVFP4_GROUP,
    elements_per_byte=2,
    tensors=("weight_scale", "weight_scale_2", "input_scale"),
    config_weights={"num_bits": 4, "type": "float", "dynamic": False, "group_size": _core.NVFP4_GROUP},
    ops=("nvfp4_weight", "nvfp4_block_scales", "nvfp4_global_scale", "scale_from_amax", "f32", "swap_nibbles", "rescale_e4m3"),
    weight_op="nvfp4_weight",
    block_scale_op="nvfp4_block_scales",
    builder="nvfp4",
)
# vLLM-Omni 0.30's DiffusionMXFP8Config.from_config (docs/notes/sources.md §7). E8M0's NaN code
# (OCP MX spec) is 0xFF; the kernel never writes it.
MXFP8 = weight_only_format("mxfp8", quant_method="mxfp8", method_config={"is_checkpoint_mxfp8_serialized": True}, scale_nan_byte=0xFF)

#: Every format, in the order :func:`classify` tries them (the more specific first).
FORMATS: dict[str, WeightFormat] = {f.name: f for f in (MXFP8, NVFP4, FP8_CHANNEL, FP8, BF16)}

_FLOAT_WEIGHTS = frozenset({"BF16", "F16", "F32"})


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def classify(parts: Mapping[str, _Tensor]) -> WeightFormat | None:
    """The format of one module from its tensors (``suffix -> TensorMeta``, e.g. ``{"weight": …,
    "weight_scale": …}``), by dtypes and the weight scale's size; None when it has no weight or the
    weight is stored in no known format (an integer or F8_E5M2 weight)."""
    w = parts.get("weight")
    if w is None:
        return None
    if w.dtype in _FLOAT_WEIGHTS:
        return BF16
    ws = parts.get("weight_scale")
    for f in FORMATS.values():
        if f.scale_per == "block" and w.dtype == f.weight_dtype and ws is not None and ws.dtype == f.scale_dtype:
            return f
    if w.dtype == FP8.weight_dtype:
        # A missing weight_scale is FP8 all the same (inspect reports it missing).
        return FP8_CHANNEL if ws is not None and _numel(ws.shape) > 1 else FP8
    return None


def op_output(op: str, src_shape: tuple[int, ...], weight_format: str | None = None) -> tuple[str, tuple[int, ...]] | None:
    """What a format's own plan op writes from a ``[N, K]`` source (:meth:`WeightFormat.op_output`
    of the format it belongs to, or of ``weight_format``: a block op's ``format`` field); None for an
    op no format owns (copy, scales, ...)."""
    if weight_format is not None:
        f = FORMATS.get(weight_format)
        return None if f is None else f.op_output(op, src_shape)
    for f in FORMATS.values():
        if f.weight_only:
            continue  # its ops are shared by every block format: only with weight_format
        if (out := f.op_output(op, src_shape)) is not None:
            return out
    return None


def algo_names(quant_method: str = "modelopt") -> frozenset[str]:
    """Every quant_algo a ``quant_method`` config may name (for ModelOpt: its formats' and
    MIXED_PRECISION)."""
    names = frozenset(a for f in FORMATS.values() if f.quant_method == quant_method for a in f.algos)
    return names | {MIXED_PRECISION} if quant_method == "modelopt" else names


def format_of_algo(algo: str) -> WeightFormat:
    """The format a (per-layer) quant_algo stores; a PlanError for MIXED_PRECISION or an unknown name."""
    a = algo.upper()
    for f in FORMATS.values():
        if a in f.algos:
            return f
    known = sorted(a for f in FORMATS.values() for a in f.algos)
    raise PlanError(f"quant_algo '{algo}' is no weight format (known: {', '.join(known)})")


def family_algos(kind: str) -> tuple[str, ...]:
    """The quant_algo names of every format of a family (``"fp8"``: FP8, FP8_PER_CHANNEL_PER_TOKEN)."""
    return tuple(a for f in FORMATS.values() if f.kind == kind for a in f.algos)


def weight_only_of_algo(algo: str) -> WeightFormat | None:
    """The weight-only block format a (resolved) quant_algo names (``MXFP8``), else None."""
    return next((f for f in FORMATS.values() if f.weight_only and algo.upper() in f.algos), None)


def format_for_method(quant_method: str) -> WeightFormat | None:
    """The format a non-ModelOpt ``quant_method`` names (``mxfp8``), else None."""
    m = quant_method.lower()
    return next((f for f in FORMATS.values() if f.quant_method != "modelopt" and f.quant_method == m), None)
