"""What a model family is: the :class:`ModelPreset` record and the name rules every family shares.

A family's facts (class names, BF16 fallbacks per format, canonical renames, runtime names,
fused-QKV rules, the ModelOpt/PTQ settings, the mixed-precision default, components) are data in
one module per family (``dqfast/models/<family>.py``); the builders only ever ask a preset
questions ("is this module a fallback?", "what are this module's name variants?"), so no model
name appears in the conversion path. Each preset records where its lists come from, because
upstream versions differ (e.g. SGLang's FLUX.1 FP8 list gained and lost
``single_transformer_blocks.*.proj_mlp``).

This module imports nothing of dqfast but ``errors``: every other module may import it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dqfast.errors import PlanError

__all__ = [
    "ModelPreset",
    "BlockRange",
    "QkvRule",
    "MLP_PATTERNS",
    "FP8_RECIPE",
    "NVFP4_RECIPE",
    "NVFP4_FP8_MHA_RECIPE",
    "fused_groups",
    "glob_to_regex",
    "pattern_list",
    "ignore_pattern_matches",
]

# Where the families' lists were read from (cited in each family's ``source``).
SGL_FP8 = "sgl-project/sglang@27b84fc python/sglang/multimodal_gen/tools/build_modelopt_fp8_transformer.py"
SGL_NVFP4 = "sgl-project/sglang@25688fc python/sglang/multimodal_gen/tools/build_modelopt_nvfp4_transformer.py"
MO_EXAMPLE = "NVIDIA/Model-Optimizer@6b4ad85 examples/diffusers/quantization (filter functions)"
# The example tree the ModelOpt (PTQ) facts were read from (see docs/notes/sources.md §5).
MODELOPT_SOURCE = "NVIDIA/Model-Optimizer@6b4ad85 examples/diffusers/quantization"

# ModelOpt recipes the diffusion example picks per format.
FP8_RECIPE = "configs/ptq/presets/diffusers/fp8"
NVFP4_RECIPE = "configs/ptq/presets/diffusers/nvfp4"
NVFP4_FP8_MHA_RECIPE = "configs/ptq/presets/diffusers/nvfp4_fp8_mha"

# SGLang's builder: module-name variants that drop these wrapper prefixes.
_WRAPPER_PREFIXES = ("model.diffusion_model.", "velocity_model.")
# SGLang's builder: diffusers FeedForward names -> runtime names.
_FF_RENAMES = (
    (r"(\.audio_ff|\.ff)\.net\.0\.proj$", r"\1.proj_in"),
    (r"(\.audio_ff|\.ff)\.net\.2$", r"\1.proj_out"),
)

# Shards a loader fuses into one GEMM (vLLM-Omni: to_q/k/v -> to_qkv, add_*_proj -> add_kv_proj):
# they must share one input/global scale. The same for every family.
_LOADER_FUSED = (
    (re.compile(r"^(?P<p>.*)\.to_(?P<s>[qkv])$"), "to_qkv"),
    (re.compile(r"^(?P<p>.*)\.add_(?P<s>[qkv])_proj$"), "add_qkv"),
    (re.compile(r"^(?P<p>.*)\.(?P<s>[qkv])_proj$"), "qkv_proj"),
)


def fused_groups(modules: Iterable[str]) -> dict[str, list[str]]:
    """Group q/k/v projection modules that loaders fuse: ``{group key: [q, k, v] modules}``."""
    groups: dict[str, dict[str, str]] = {}
    for m in modules:
        for rx, kind in _LOADER_FUSED:
            mt = rx.match(m)
            if mt:
                groups.setdefault(f"{mt['p']}.{kind}", {})[mt["s"]] = m
                break
    return {k: [v[s] for s in sorted(v)] for k, v in groups.items() if len(v) > 1}


#: Heavy MLP projections (most of the FLOPs and bytes): NVFP4 in the default mixed policy.
MLP_PATTERNS = (
    r"\.ff(_context)?\.net\.(0\.proj|2)$",  # diffusers FeedForward (FLUX.1, HunyuanVideo)
    r"\.ff(_context)?\.(linear_in|linear_out|proj_in|proj_out)$",  # FLUX.2, LTX
    r"\.proj_mlp$",  # FLUX.1 single blocks
    r"\.ffn\.net\.(0\.proj|2)$",  # Wan
    r"\.(img|txt)_mlp\.net\.(0\.proj|2)$",  # Qwen-Image
)

_SHARDS = ("q", "k", "v")


@dataclass(frozen=True)
class QkvRule:
    """How one fused module relates to its three shards.

    ``fused`` matches fused module names; ``shard_name`` (``re.Match.expand`` template with ``{s}``
    for q/k/v) names the shards from that match. ``shard`` matches shard module names (named group
    ``s`` = q|k|v); ``fused_name`` names the fused module from that match.
    """

    fused: str
    shard: str
    fused_name: str
    shard_name: str

    def shards_of(self, module: str) -> list[str] | None:
        m = re.match(self.fused, module)
        if m is None:
            return None
        return [m.expand(self.shard_name.replace("{s}", s)) for s in _SHARDS]

    def fused_of(self, module: str) -> tuple[str, str] | None:
        """(fused name, shard letter) of a shard module, else None."""
        m = re.match(self.shard, module)
        if m is None:
            return None
        return m.expand(self.fused_name), m["s"]


@dataclass(frozen=True)
class BlockRange:
    """ModelOpt's diffusion example ``block_range`` recipe (``build_block_range_quant_cfg``):
    applied to the quant config *before* calibration, so excluded quantizers are never calibrated."""

    block_module: str = "transformer_blocks"
    exclude_first_n: int = 2
    exclude_last_n: int = 2

    def quant_cfg_rules(self, num_blocks: int) -> list[dict[str, Any]]:
        """quant_cfg entries: everything off, the block list on, the edge blocks off again."""
        # The example refuses models with fewer than two quantized middle blocks.
        need = self.exclude_first_n + self.exclude_last_n + 2
        if num_blocks < need:
            raise PlanError(f"block_range on '{self.block_module}' needs at least {need} blocks, the model has {num_blocks}")
        excluded = sorted(set(range(self.exclude_first_n)) | set(range(num_blocks - self.exclude_last_n, num_blocks)))
        m = self.block_module
        rules: list[dict[str, Any]] = [
            {"quantizer_name": "*weight_quantizer", "enable": False},
            {"quantizer_name": "*input_quantizer", "enable": False},
            {"quantizer_name": f"*{m}.*weight_quantizer", "enable": True},
            {"quantizer_name": f"*{m}.*input_quantizer", "enable": True},
        ]
        for i in excluded:
            rules.append({"quantizer_name": f"*{m}.{i}.*weight_quantizer", "enable": False})
            rules.append({"quantizer_name": f"*{m}.{i}.*input_quantizer", "enable": False})
        return rules


def glob_to_regex(pattern: str) -> str:
    """SGLang's/ModelOpt's ignore-pattern rule: ``.`` literal, ``*`` any run; full match."""
    return re.escape(pattern).replace(r"\*", ".*")


@dataclass(frozen=True)
class ModelPreset:
    """Facts about one model family (one instance per module of ``dqfast.models``)."""

    name: str
    #: diffusers ``_class_name`` values that select this preset under ``--model-type auto``.
    class_names: tuple[str, ...] = ()
    #: FP8 BF16-fallback regexes, searched (``re.search``) in every name variant of a module.
    fp8_fallback: tuple[str, ...] = ()
    #: NVFP4 BF16-fallback globs (SGLang's mixed builder: full match on the module name).
    nvfp4_fallback: tuple[str, ...] = ()
    #: Regexes (``re.match``) of modules ModelOpt's diffusion example leaves unquantized; used
    #: when dqfast quantizes without a ModelOpt export (``--from-bf16``) and by ``dqfast.ptq``.
    ptq_disabled: tuple[str, ...] = ()
    #: (regex, replacement) renames that canonicalize module names before matching
    #: (e.g. Qwen-Image's ``.img_mod.1`` -> ``.img_mod``).
    canonical_renames: tuple[tuple[str, str], ...] = ()
    #: diffusers -> runtime module names (SGLang's HunyuanVideo runtime layout).
    runtime_names: tuple[tuple[str, str], ...] = ()
    #: Names of the transformer components a pipeline of this family has.
    components: tuple[str, ...] = ("transformer",)
    #: Regexes (``re.search``) of the layers the default mixed policy makes NVFP4 (after the
    #: ``ptq_disabled`` set, which stays BF16); every other Linear is FP8.
    mixed_nvfp4: tuple[str, ...] = MLP_PATTERNS
    #: Fused-module <-> q/k/v shard names of a foreign layout (``dqfast.qkv``), e.g. BFL FLUX.2.
    qkv_rules: tuple[QkvRule, ...] = ()
    #: ModelOpt's diffusion example: its ``--model`` names, the recipe per format, the
    #: pre-calibration block range, and a note on how dqfast's filter differs.
    modelopt_model_types: tuple[str, ...] = ()
    fp8_recipe: str = FP8_RECIPE
    nvfp4_recipe: str = NVFP4_RECIPE
    block_range: BlockRange | None = None
    ptq_note: str = ""
    #: False when no ModelOpt filter is recorded for the family: ``dqfast.ptq`` refuses it.
    ptq: bool = True
    #: Which denoising-loop calibration inputs ``dqfast.ptq`` can synthesize (None: pass forward_loop=).
    calibration: str | None = None
    #: Where the lists come from.
    source: str = ""
    notes: str = ""

    @cached_property
    def _fp8_fallback_re(self) -> list[re.Pattern[str]]:
        return [re.compile(p) for p in self.fp8_fallback]

    @cached_property
    def _ptq_disabled_re(self) -> list[re.Pattern[str]]:
        return [re.compile(p) for p in self.ptq_disabled]

    @cached_property
    def _nvfp4_fallback_re(self) -> list[re.Pattern[str]]:
        return [re.compile(glob_to_regex(p)) for p in self.nvfp4_fallback]

    def name_variants(self, module: str) -> list[str]:
        """All names a module is known by; the last one is the preferred (runtime) name.

        Mirrors SGLang's FP8 builder: the name, the name without wrapper prefixes, FeedForward
        renames of each, preset canonicalizations, then runtime names.
        """
        variants = [module]
        for prefix in _WRAPPER_PREFIXES:
            if module.startswith(prefix):
                variants.append(module[len(prefix) :])
        for v in list(variants):
            for pat, repl in _FF_RENAMES:
                variants.append(re.sub(pat, repl, v))
        for v in list(variants):
            for pat, repl in self.canonical_renames:
                variants.append(re.sub(pat, repl, v))
        if self.runtime_names:
            for v in list(variants):
                for pat, repl in self.runtime_names:
                    if re.search(pat, v):
                        variants.append(re.sub(pat, repl, v))
        seen: dict[str, None] = {}
        for v in variants:
            seen.setdefault(v, None)
        return list(seen)

    def _first_match(self, pats: list[re.Pattern[str]], module: str, full: bool) -> str | None:
        """The first of ``pats`` matching any variant of ``module`` (``re.fullmatch`` when ``full``,
        else ``re.search``), else None."""
        for v in self.name_variants(module):
            for p in pats:
                if p.fullmatch(v) if full else p.search(v):
                    return p.pattern
        return None

    def fp8_fallback_match(self, module: str, extra: list[re.Pattern[str]] | None = None) -> str | None:
        """The first fallback regex (``re.search``) matching any variant of ``module``, else None."""
        return self._first_match(self._fp8_fallback_re + list(extra or ()), module, full=False)

    def nvfp4_fallback_match(self, module: str, extra: list[re.Pattern[str]] | None = None) -> str | None:
        """The first fallback glob (as a regex, full match) matching any variant of ``module``, else None."""
        return self._first_match(self._nvfp4_fallback_re + list(extra or ()), module, full=True)

    def default_mixed_policy(self) -> list[tuple[str, str]]:
        """Layers ModelOpt's recipe leaves unquantized stay BF16 (embedders, final projection, ...),
        heavy MLPs NVFP4, every other Linear (attention, modulation: the sensitive ones) FP8."""
        pol: list[tuple[str, str]] = [("bf16", f"^(?:{p})") for p in self.ptq_disabled]
        pol += [("nvfp4", p) for p in self.mixed_nvfp4]
        pol.append(("fp8", r"."))
        return pol

    def ptq_disabled_match(self, module: str) -> str | None:
        for v in self.name_variants(module):
            for p in self._ptq_disabled_re:
                if p.match(v):
                    return p.pattern
        return None


def pattern_list(patterns: Any, what: str = "fallback (--fallback)") -> list[str]:
    """A list of patterns from what the API accepts: None, one pattern as a ``str`` (never
    iterated per character), or an iterable of ``str``; anything else is a PlanError."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (bytes, dict)) or not isinstance(patterns, Iterable):
        raise PlanError(f"{what}: expected a pattern or a list of patterns, not {type(patterns).__name__}")
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise PlanError(f"{what}: pattern {p!r} is not a string")
    return out


def ignore_pattern_matches(pattern: str, name: str) -> bool:
    """Ignore-list semantics shared by SGLang and vLLM: exact, then fnmatch-style wildcards;
    ``module*`` also covers ``module`` and ``module.*``."""
    if pattern == name:
        return True
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return bool(re.fullmatch(glob_to_regex(pattern), name))
