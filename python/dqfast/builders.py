"""The builder registry: one table of build functions, used by the CLI (``dqfast build
components``), ``dqfast.components``, ``dqfast.batch`` and ``dqfast.ptq``.

A builder is a ``"module:function"`` taking the output directory first and keywords after (as
:func:`dqfast.build_fp8_transformer` does), imported on use so that a builder whose optional
dependency is missing fails only where it is used. ``inputs`` are its keywords that are input
paths (checked to exist, fingerprinted by ``batch``, guarded against every output);
``main_input`` is the keyword a pipeline root feeds (``dqfast.components``); ``help`` and
``options`` are its command ``dqfast build <name>``, which ``dqfast.cli.build`` generates (adding
the options every builder shares: output, target, threads, ...).
To add a builder: one :class:`Builder` line in :data:`BUILDERS` (or :func:`register_builder`).
Each weight-only block format of :data:`dqfast.formats.FORMATS` has its builder here without a
line of its own (:func:`_weight_only_builder`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dqfast.errors import PlanError
from dqfast.formats import FORMATS, WeightFormat

__all__ = ["Builder", "BUILDERS", "Option", "register_builder", "get_builder"]


@dataclass(frozen=True)
class Option:
    """One of a builder's own options on ``dqfast build <name>``, written without the CLI library
    (``dqfast.cli.build`` makes the click option). Its value is passed to the build function as the
    keyword :attr:`name`, except where the CLI gives an SGLang flag name its meaning
    (``keep_bf16``, ``pattern_preset``, ``no_reconcile_fused``, ``policy``, ``components``).

    ``flags``: the flag, aliases after it (``--x/--no-x`` for an on/off pair); ``kind``: ``input``
    (a directory, or a hub id), ``file`` (an existing path), ``flag``, ``amax`` (a finite float
    > 0), ``text``, or the tuple of accepted values."""

    flags: tuple[str, ...]
    help: str | None = None
    kind: str | tuple[str, ...] = "input"
    dest: str | None = None
    required: bool = False
    default: float | str | bool | None = None
    show_default: bool = False
    multiple: bool = False
    metavar: str | None = None

    @property
    def name(self) -> str:
        """The keyword (and click parameter name): ``dest``, else the first flag's."""
        return self.dest or self.flags[0].split("/")[0].lstrip("-").replace("-", "_")


_MODELOPT_BACKBONE = Option(
    ("--modelopt-backbone-ckpt",),
    "ModelOpt backbone.pt (or its folder), or an amax .safetensors sidecar. A pickle: trusted files only "
    "(dqfast never executes it, but still reads it).",
    kind="file",
)
_BASE_FALLBACK = Option(("--base-transformer-dir",), "BF16 base transformer (fallback weights).")
_ROUNDING = ("exact", "modelopt")

FP8_OPTIONS = (
    Option(("--modelopt-hf-dir",), "ModelOpt HF export (root or transformer/)."),
    _MODELOPT_BACKBONE,
    _BASE_FALLBACK,
    Option(("--from-bf16",), "Calibration-free: scales from the base weights themselves.", kind="flag"),
    Option(
        ("--weight-granularity",),
        "--from-bf16: per output channel (FP8_PER_CHANNEL_PER_TOKEN) or per tensor (FP8, needs --activation-amax). "
        "Default: from --target (tensor, with activation amax 448, where SGLang is a target; else channel).",
        kind=("channel", "tensor"),
    ),
    Option(("--activation-amax",), "--from-bf16: static activation amax -> input_scale = amax/448.", kind="amax"),
    Option(
        ("--rounding",),
        "When dqfast quantizes: divide in float32 (exact) or in the weight's dtype as ModelOpt's export does.",
        kind=_ROUNDING,
        default="exact",
        show_default=True,
    ),
    Option(("--requantize",), "Re-quantize FP8 weights from the base instead of copying the export's bytes.", kind="flag"),
    Option(("--repair-nan",), "Replace NaN e4m3 bytes (0x7F/0xFF) in the export's weights by 448 instead of refusing.", kind="flag"),
    Option(
        ("--keep-bf16-pattern",),
        "SGLang's name for --fallback (regexes, re.search on every name variant).",
        kind="text",
        dest="keep_bf16",
        multiple=True,
        metavar="REGEX",
    ),
    Option(
        ("--maxbound",),
        "SGLang's flag: scales from backbone.pt are amax / maxbound (the export's bytes must agree unless --requantize).",
        kind="amax",
        default=448.0,
        show_default=True,
    ),
)

NVFP4_OPTIONS = (
    Option(("--modelopt-hf-dir",), "ModelOpt NVFP4 HF export (root or transformer/)."),
    _BASE_FALLBACK,
    Option(
        ("--pattern-preset",),
        "SGLang's name for the BF16 fallback preset (none, flux1-nvfp4; or a --model-type name). Without it and "
        "--model-type, no preset is applied, as SGLang's tool does (--from-bf16: auto).",
        kind="text",
    ),
    Option(("--keep-bf16-pattern",), "SGLang's name for --fallback (globs).", kind="text", dest="keep_bf16", multiple=True, metavar="GLOB"),
    Option(
        ("--swap-weight-nibbles/--no-swap-weight-nibbles",),
        "Rewrite every packed byte (b>>4)|(b<<4) in place; the output then says swap_weight_nibbles: false.",
        kind="flag",
        default=False,
        show_default=True,
    ),
    Option(("--repair-nan", "--repair-nan-scales"), "Clamp NaN block-scale bytes (0x7F/0xFF) to 448 instead of refusing.", kind="flag"),
    Option(("--no-reconcile-fused",), "Leave q/k/v shards with different global scales as they are (warn only).", kind="flag"),
    Option(("--from-bf16",), "No export: quantize the base weights in Rust (weights-only amax).", kind="flag"),
    Option(("--activation-amax",), "--from-bf16: activation amax -> input_scale = amax/2688 (default 2688).", kind="amax"),
)

MIXED_OPTIONS = (
    Option(("--base-transformer-dir",), "BF16 base transformer (or pipeline root with --components).", required=True),
    Option(
        ("--policy",),
        'Per-layer policy {"fp8": [regex], "nvfp4": [regex], "bf16": [regex]} (key order = priority, '
        "first match wins, unmatched stay BF16); default: preset's unquantized set BF16, MLPs NVFP4, rest FP8.",
        kind="text",
        metavar="JSON|FILE",
    ),
    Option(("--fp8-activation-amax",), "FP8 input_scale = amax/448 (default 448).", kind="amax"),
    Option(("--nvfp4-activation-amax",), "NVFP4 input_scale = amax/2688 (default 2688).", kind="amax"),
    Option(("--rounding",), kind=_ROUNDING, default="exact", show_default=True),
    Option(
        ("--components",),
        "Build these components of a pipeline root (comma list, or 'auto' for every transformer*/) into <output-dir>/<component>.",
        kind="text",
    ),
)


@dataclass(frozen=True)
class Builder:
    """A build function that can be named (CLI, batch manifests, components, PTQ)."""

    target: str
    inputs: tuple[str, ...]
    #: The input a pipeline root (``dqfast build components --root``) feeds.
    main_input: str = "modelopt_hf_dir"
    #: ``dqfast build <name> --help``.
    help: str = ""
    #: Its own options on ``dqfast build <name>``, in the order ``--help`` lists them.
    options: tuple[Option, ...] = ()

    def load(self) -> Callable[..., Any]:
        mod, _, fn = self.target.partition(":")
        f: Callable[..., Any] = getattr(importlib.import_module(mod), fn)
        return f

    def main_input_for(self, kwargs: Mapping[str, Any]) -> str:
        """``main_input``, except for a calibration-free build (``from_bf16``), which reads the base."""
        return "base_transformer_dir" if kwargs.get("from_bf16") else self.main_input


BUILDERS: dict[str, Builder] = {
    "fp8": Builder(
        "dqfast.fp8:build_fp8_transformer",
        ("modelopt_hf_dir", "modelopt_backbone_ckpt", "base_transformer_dir"),
        help="FP8 transformer (SGLang build_modelopt_fp8_transformer semantics).",
        options=FP8_OPTIONS,
    ),
    "nvfp4": Builder(
        "dqfast.nvfp4:build_nvfp4_transformer",
        ("modelopt_hf_dir", "base_transformer_dir"),
        help="Mixed BF16+NVFP4 transformer (SGLang build_modelopt_nvfp4_transformer semantics). --fallback takes globs.",
        options=NVFP4_OPTIONS,
    ),
    "mixed": Builder(
        "dqfast.mixed:build_mixed_transformer",
        ("base_transformer_dir",),
        main_input="base_transformer_dir",
        help="ModelOpt MIXED_PRECISION transformer (FP8 + NVFP4 + BF16 per layer) from the BF16 base, weights-only.",
        options=MIXED_OPTIONS,
    ),
}


def _weight_only_builder(f: WeightFormat) -> Builder:
    """The builder of a weight-only block format: ``dqfast.weight_only`` with the format bound."""
    return Builder(
        f"dqfast.weight_only:build_{f.name}_transformer",
        ("base_transformer_dir",),
        main_input="base_transformer_dir",
        help=f"{f.label} weight-only transformer (quant_method {f.quant_method}: one scale per {f.block} elements "
        "along K) from the BF16 base, calibration-free; --target says which engines load it.",
        options=(Option(("--base-transformer-dir",), "BF16 base transformer.", required=True),),
    )


BUILDERS.update({f.name: _weight_only_builder(f) for f in FORMATS.values() if f.weight_only})


def register_builder(
    name: str,
    target: str,
    inputs: Iterable[str],
    main_input: str | None = None,
    help: str = "",
    options: Iterable[Option] = (),
) -> None:
    """Add (or replace) a builder under ``name`` (its ``dqfast build`` command exists from the
    next import of ``dqfast.cli``)."""
    ins = tuple(inputs)
    BUILDERS[name] = Builder(target, ins, main_input or (ins[0] if ins else "modelopt_hf_dir"), help, tuple(options))


def get_builder(name: str) -> Builder:
    try:
        return BUILDERS[name]
    except KeyError:
        raise PlanError(f"unknown build kind '{name}' (known: {', '.join(BUILDERS)})") from None
