"""Serving-engine targets as data: what SGLang Diffusion and vLLM-Omni do with a checkpoint.

Everything an engine decides about a ModelOpt checkpoint, written once, each rule with the upstream
file and version it was read from (described in our words; no upstream code here). ``dqfast check``
(``dqfast.check``) evaluates these rules; the compat suite (``tests/compat``, docs/compat.md) runs the
engines' own code on the same checkpoints and asserts that both agree.

``any`` is the intersection: a checkpoint meets ``any`` when both engines load it as written.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

from dqfast.models.base import glob_to_regex

__all__ = ["Target", "TargetName", "TARGETS", "TARGET_NAMES", "get_target", "IGNORE_MATCHERS", "collision_free_ignore"]

SGLANG = "sglang==0.5.23"
VLLM_OMNI = "vllm-omni==0.30.0 (with vllm==0.30.0)"


def _glob_fullmatch(pattern: str, module: str) -> bool:
    return re.fullmatch(glob_to_regex(pattern), module) is not None  # SGLang's rule, as the builders use it


def _vllm_match(pattern: str, module: str) -> bool:
    # exact, then substring (kept by vLLM for checkpoints of ModelOpt < 0.39), then fnmatch.
    return pattern == module or pattern in module or fnmatch.fnmatchcase(module, pattern)


#: How an engine matches one `ignore` entry against a module name.
IGNORE_MATCHERS: dict[str, Callable[[str, str], bool]] = {"glob-fullmatch": _glob_fullmatch, "exact-substring-fnmatch": _vllm_match}


@dataclass(frozen=True)
class Target:
    name: str
    engine_version: str
    #: key of IGNORE_MATCHERS, and where the rule comes from
    ignore_matching: str
    ignore_source: str
    #: quant_algo values the engine's config loader accepts (others: it refuses the checkpoint)
    algos: frozenset[str]
    algos_source: str
    #: FP8 weight_scale granularities its FP8 linear layers take ("tensor", "channel")
    fp8_weight_scales: frozenset[str]
    #: whether `swap_weight_nibbles: true` in the config makes it swap the packed bytes at load
    honours_swap_flag: bool
    nibble_source: str
    #: whether it needs a `*.safetensors.index.json` for a single-file checkpoint
    needs_index: bool
    index_source: str
    #: fused runtime layer -> checkpoint shards (exclusion of a fused layer needs all shards to agree)
    packed: dict[str, tuple[str, ...]]
    packed_source: str
    #: model family (dqfast preset name) -> regexes of the Linear modules its DiT gives a quant config;
    #: a family not listed: every Linear layer (not verified for that family)
    quantized_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    quantized_modules_source: str = ""
    #: what happens to an FP8 weight that meets an unquantized (BF16) layer
    fp8_into_bf16: str = "error"  # "error" | "dequantized"
    #: whether a MIXED_PRECISION `quantized_layers` entry per shard (`to_q`) reaches the fused layer
    mixed_resolves_packed: bool = True
    mixed_source: str = ""

    def packed_layer(self, module: str) -> str | None:
        """The fused runtime layer ``module`` is a shard of, else None."""
        head, _, last = module.rpartition(".")
        for fused, shards in self.packed.items():
            if last in shards:
                return f"{head}.{fused}" if head else fused
        return None

    def ignored(self, ignore: list[str], module: str) -> str | None:
        """The first `ignore` entry that excludes ``module`` under this engine's rule, else None."""
        match = IGNORE_MATCHERS[self.ignore_matching]
        for p in ignore:
            if match(p, module):
                return p
        return None

    def model_quantizes(self, family: str, module: str) -> bool:
        pats = self.quantized_modules.get(family)
        return True if pats is None else any(re.search(p, module) for p in pats)


TARGETS: dict[str, Target] = {
    "sglang": Target(
        name="sglang",
        engine_version=SGLANG,
        ignore_matching="glob-fullmatch",
        ignore_source="multimodal_gen/runtime/layers/quantization/modelopt_quant.py: is_layer_excluded escapes the "
        "entry, turns `*` into `.*` and needs a full match of the runtime prefix",
        algos=frozenset({"FP8", "NVFP4"}),
        algos_source="multimodal_gen/runtime/utils/quantization_utils.py: _resolve_quant_method_name maps only FP8 and "
        "NVFP4; MIXED_PRECISION and other ModelOpt algos (FP8_PER_CHANNEL_PER_TOKEN) raise",
        fp8_weight_scales=frozenset({"tensor"}),
        honours_swap_flag=True,
        nibble_source="modelopt_quant.py: ModelOptFp4Config reads swap_weight_nibbles (default: packed-QKV layout) and "
        "swaps bytes in process_weights_after_loading",
        needs_index=False,
        index_source="the builder tools always write one (tools/modelopt_checkpoint.py); the loader also reads one file",
        packed={"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")},
        packed_source="multimodal_gen/runtime/models/dits/flux.py (FLUX.1 fused q/k/v)",
        quantized_modules={},
        quantized_modules_source="multimodal_gen/runtime/models/dits/flux.py: every Linear of FLUX.1 gets the quant config",
        fp8_into_bf16="error",
    ),
    "vllm-omni": Target(
        name="vllm-omni",
        engine_version=VLLM_OMNI,
        ignore_matching="exact-substring-fnmatch",
        ignore_source="vllm/model_executor/layers/quantization/modelopt.py: is_layer_excluded tries an exact match "
        "(fused layers included), then `entry in prefix` (substring), then fnmatch",
        algos=frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "MIXED_PRECISION"}),
        algos_source="vllm_omni/quantization/factory.py: _detect_modelopt_method",
        fp8_weight_scales=frozenset({"tensor", "channel"}),
        honours_swap_flag=False,
        nibble_source="vLLM's NVFP4 path consumes ModelOpt's packing (low nibble = even element); no swap flag",
        needs_index=False,
        index_source="vLLM-Omni's diffusers loader globs *.safetensors",
        packed={"to_qkv": ("to_q", "to_k", "to_v"), "add_kv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")},
        packed_source="vllm_omni/diffusion/model_loader/checkpoint_adapters/modelopt.py: DEFAULT_PACKED_MODULES_MAPPING",
        quantized_modules={
            # The double-stream blocks, embedders, norm_out and the single blocks' norm.linear are built
            # with `safe_quant_config(...)`: unquantized whatever the checkpoint says.
            "flux1": (r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)$",),
        },
        quantized_modules_source="vllm_omni/diffusion/models/flux/flux_transformer.py (FLUX.1)",
        fp8_into_bf16="dequantized",
        mixed_resolves_packed=False,
        mixed_source="vllm_omni/diffusion/registry.py binds packed_modules_mapping of the *pipeline* class "
        "(FluxPipeline has none) into the quant config, so ModelOptMixedPrecisionConfig cannot map a fused "
        "layer (to_qkv) back to its shard entries: it stays BF16",
    ),
}


def get_target(name: str) -> list[Target]:
    """The targets a name stands for: one engine, or both for ``any``."""
    if name == "any":
        return list(TARGETS.values())
    try:
        return [TARGETS[name]]
    except KeyError:
        raise ValueError(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))}, any)") from None


#: What ``--target`` / ``target=`` accepts (``any`` = every engine above).
TargetName = Literal["sglang", "vllm-omni", "any"]
TARGET_NAMES = (*TARGETS, "any")
assert set(TARGET_NAMES) == set(get_args(TargetName))  # the Literal is the same list, for type checks


def collision_free_ignore(ignore: list[str], quantized: set[str]) -> tuple[list[str], dict[str, str]]:
    """``ignore`` with every entry that some engine's rule matches against a quantized module
    rewritten, and the rewrites ({old: new}).

    The rewrite puts a ``*`` after the first character (``proj_out`` -> ``p*roj_out``): for SGLang
    (glob, full match) and vLLM's fnmatch it still matches the module it names, and it is no longer
    a literal substring of a longer name (vLLM's substring rule). It is checked under every rule;
    an entry that cannot be rewritten so (already a pattern) raises ValueError naming it.
    """
    engines = list(TARGETS.values())

    def hits(entry: str) -> str | None:
        for t in engines:
            for q in sorted(quantized):
                if IGNORE_MATCHERS[t.ignore_matching](entry, q):
                    return f"{q} ({t.name}: {t.ignore_matching})"
        return None

    out: list[str] = []
    rewrites: dict[str, str] = {}
    for p in ignore:
        hit = hits(p)
        if hit is None:
            out.append(p)
            continue
        alt = p[:1] + "*" + p[1:]
        if "*" in p or len(p) < 2 or hits(alt) is not None or not all(IGNORE_MATCHERS[t.ignore_matching](alt, p) for t in engines):
            raise ValueError(f"ignore entry '{p}' also matches the quantized module {hit}")
        rewrites[p] = alt
        if alt not in out:
            out.append(alt)
    return out, rewrites
