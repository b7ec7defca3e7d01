"""Serving-engine targets as data: what SGLang Diffusion and vLLM-Omni do with a checkpoint.

Everything an engine decides about a ModelOpt checkpoint, written once, each rule with the upstream
file and version it was read from (described in our words; no upstream code here). ``dqfast check``
(``dqfast.check``) evaluates these rules; the compat suite (``tests/compat``, docs/compat.md) runs the
engines' own code on the same checkpoints and asserts that both agree.

``any`` (the default of every builder) is the intersection: a checkpoint meets ``any`` when both
engines load it as written. ``none`` opts out of every engine check (dqfast's own runtime, other
loaders). :func:`fp8_from_bf16_granularity` picks, for an option the caller did not set, the
value the target loads, and says why; :func:`other_targets` names the way out of a refusal (the
refusals themselves are ``dqfast.check.apply_target``'s, the same rules ``dqfast check`` runs).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

from dqfast.errors import PlanError, TargetError
from dqfast.models.base import glob_to_regex

__all__ = [
    "Target",
    "TargetName",
    "TARGETS",
    "TARGET_NAMES",
    "DEFAULT_TARGET",
    "get_target",
    "IGNORE_MATCHERS",
    "collision_free_ignore",
    "targets_of",
    "other_targets",
    "fp8_from_bf16_granularity",
]

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
    fp8_weight_scales_source: str
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
    #: family -> the file that rule was read from ("*": the rule for families not listed)
    quantized_modules_source: dict[str, str] = field(default_factory=dict)
    #: family -> (regex, replacement) renames from a checkpoint module name to the prefix the
    #: engine's DiT asks its quant config about (``ignore`` is matched against that prefix)
    runtime_names: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    runtime_names_source: str = ""
    #: what happens to an FP8 weight that meets an unquantized (BF16) layer
    fp8_into_bf16: str = "error"  # "error" | "dequantized"
    fp8_into_bf16_source: str = ""
    #: families whose ModelOpt NVFP4 export (built with the family's dqfast preset) this engine cannot
    #: load, because its model class leaves some of the exported layers unquantized (compat suite rows
    #: `nvfp4-export`, `qwen-image-nvfp4-export`): `ptq --build` refuses them before calibrating
    nvfp4_export_fails: frozenset[str] = frozenset()
    #: NVFP4: whether the engine replaces `ignore` by the layers the safetensors store in BF16
    nvfp4_excludes_from_tensors: bool = False
    nvfp4_excludes_source: str = ""
    #: whether a MIXED_PRECISION `quantized_layers` entry per shard (`to_q`) reaches the fused layer;
    #: where not, the fused layer's own name decides for `ignore` as well (only its matching rule,
    #: e.g. vLLM's substring, can let a shard entry exclude it)
    mixed_resolves_packed: bool = True
    mixed_source: str = ""
    #: the non-ModelOpt quant_methods (of the weight-only formats, ``dqfast.weight_only``) whose
    #: dqfast layout it loads, each with the upstream file that loads it; and, for a method it has
    #: a loader for but cannot load dqfast's layout with, why (a method in neither: no loader)
    quant_methods: dict[str, str] = field(default_factory=dict)
    quant_methods_refused: dict[str, str] = field(default_factory=dict)
    #: what a user of a loaded method must know (a platform restriction), shown by every build and
    #: ``dqfast check`` of such a checkpoint
    quant_method_caveats: dict[str, str] = field(default_factory=dict)

    #: per family, shards the model class does not fuse after all (regexes on the module name)
    unfused: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def packed_layer(self, module: str, family: str = "") -> str | None:
        """The fused runtime layer ``module`` is a shard of, else None."""
        if any(re.search(p, module) for p in self.unfused.get(family, ())):
            return None
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

    def runtime_name(self, family: str, module: str) -> str:
        """The prefix under which this engine decides whether ``module`` is quantized."""
        for pat, repl in self.runtime_names.get(family, ()):
            module = re.sub(pat, repl, module)
        return module

    def quantized_source(self, family: str) -> str:
        """Where the rule of :meth:`model_quantizes` for ``family`` comes from."""
        return self.quantized_modules_source.get(family) or self.quantized_modules_source.get("*", "")

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
        fp8_weight_scales_source="multimodal_gen/runtime/layers/quantization/modelopt_quant.py: ModelOptFp8Config's "
        "linear method creates a one-value weight_scale per shard, so a per-channel weight_scale does not load "
        "(and runtime/utils/quantization_utils.py refuses FP8_PER_CHANNEL_PER_TOKEN)",
        honours_swap_flag=True,
        nibble_source="modelopt_quant.py: ModelOptFp4Config reads swap_weight_nibbles (default: packed-QKV layout) and "
        "swaps bytes in process_weights_after_loading",
        needs_index=False,
        index_source="the builder tools always write one (tools/modelopt_checkpoint.py); the loader also reads one file",
        packed={"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")},
        packed_source="multimodal_gen/runtime/loader/transformer_load_utils.py takes the DiT class's "
        "packed_modules_mapping (runtime/models/dits/qwen_image.py: these; FLUX.1 builds separate q/k/v for ModelOpt)",
        quantized_modules={
            # FLUX.1 at tp_size 1 (SGLang's default): only the attention projections and the single
            # blocks' proj_mlp/proj_out get the quant config; the FeedForwards are diffusers-style
            # FeedForward without one (with tp_size > 1 they become FluxParallelFeedForward, quantized),
            # and the embedders, norm1/norm.linear, norm_out and proj_out are built without one.
            "flux1": (
                r"^transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)$",
                r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)$",
            ),
            # Wan2.x: the blocks' self/cross attention (I2V's add_k/add_v too) and FFN, and proj_out;
            # the condition embedders (text, time, time_modulation, image) are built without one.
            "wan": (
                r"^blocks\.\d+\.attn[12]\.(to_[qkv]|to_out\.0|add_[kv]_proj)$",
                r"^blocks\.\d+\.ffn\.net\.(0\.proj|2)$",
                r"^proj_out$",
            ),
            # Qwen-Image: everything but the timestep MLP and norm_out.linear.
            "qwen-image": (
                r"^(img_in|txt_in|proj_out)$",
                r"^transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
                r"|(img|txt)_mlp\.net\.(0\.proj|2)|(img|txt)_mod\.1)$",
            ),
        },
        quantized_modules_source={
            "flux1": "multimodal_gen/runtime/models/dits/flux.py (FluxAttention, FluxSingleTransformerBlock, "
            "FluxTransformerBlock at tp_size 1; module tree built by the compat suite)",
            "wan": "multimodal_gen/runtime/models/dits/wanvideo.py (module tree built by the compat suite)",
            "qwen-image": "multimodal_gen/runtime/models/dits/qwen_image.py (module tree built by the compat suite)",
            "*": "every Linear layer (not verified for this family)",
        },
        # Its Qwen-Image builds the modulation Linear inside nn.Sequential (weights `img_mod.1.*`) with
        # the quant prefix `...img_mod`: an `ignore` entry `...img_mod.1` does not exclude it.
        # Its Wan2.x flattens the self-attention into the block (`blocks.N.to_q`, `blocks.N.to_out`) and
        # names the FFN `fc_in` / `fc_out` (its param-name mapping, observed by the compat suite).
        runtime_names={
            "qwen-image": ((r"\.(img_mod|txt_mod)\.1$", r".\1"),),
            "wan": (
                (r"^(blocks\.\d+)\.attn1\.(to_[qkv])$", r"\1.\2"),
                (r"^(blocks\.\d+)\.attn1\.to_out\.0$", r"\1.to_out"),
                (r"\.attn2\.to_out\.0$", ".attn2.to_out"),
                (r"\.ffn\.net\.0\.proj$", ".ffn.fc_in"),
                (r"\.ffn\.net\.2$", ".ffn.fc_out"),
            ),
        },
        runtime_names_source="multimodal_gen/runtime/models/dits/qwen_image.py (QwenImageTransformerBlock); "
        "multimodal_gen/runtime/models/dits/wanvideo.py (its param_names_mapping)",
        fp8_into_bf16="dequantized",
        fp8_into_bf16_source="multimodal_gen/runtime/loader/fsdp_load.py: _maybe_dequantize_fp8 multiplies an FP8 "
        "weight that meets a higher-precision parameter by its weight_scale",
        nvfp4_excludes_from_tensors=True,
        nvfp4_excludes_source="multimodal_gen/runtime/loader/transformer_load_utils.py: _merge_modelopt_fp4_configs "
        "replaces the config's exclude list by the one inferred from the safetensors (every layer stored in BF16)",
        quant_methods_refused={
            "mxfp8": "multimodal_gen/runtime/layers/quantization/mxfp8.py: MXFP8Config builds on SRT's Fp8LinearMethod "
            "(srt/layers/quantization/fp8.py), whose block scale parameter is `weight_scale_inv`, not vLLM-Omni's "
            "`weight_scale`, and needs compute capability 10.0 or an Ascend NPU"
        },
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
        fp8_weight_scales_source="vllm/model_executor/layers/quantization/modelopt.py: ModelOptFp8Config (FP8) and its "
        "per-channel variant (FP8_PER_CHANNEL_PER_TOKEN)",
        honours_swap_flag=False,
        nibble_source="vLLM's NVFP4 path consumes ModelOpt's packing (low nibble = even element); no swap flag",
        needs_index=False,
        index_source="vLLM-Omni's diffusers loader globs *.safetensors",
        packed={"to_qkv": ("to_q", "to_k", "to_v"), "add_kv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")},
        packed_source="vllm_omni/diffusion/model_loader/checkpoint_adapters/modelopt.py: DEFAULT_PACKED_MODULES_MAPPING",
        # Its Wan2.2 fuses the self-attention's q/k/v only; the cross-attention keeps to_q/to_k/to_v.
        unfused={"wan": (r"\.attn2\.to_[qkv]$",)},
        quantized_modules={
            # The double-stream blocks, embedders, norm_out and the single blocks' norm.linear are built
            # with `safe_quant_config(...)`: unquantized whatever the checkpoint says.
            "flux1": (r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)$",),
            # Qwen-Image: the blocks' attention and MLPs only; img_in/txt_in, the timestep MLP,
            # img_mod (quant_config=None), txt_mod (safe_quant_config: None for ModelOpt), norm_out
            # and proj_out are built unquantized.
            "qwen-image": (
                r"^transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|(img|txt)_mlp\.net\.(0\.proj|2))$",
            ),
        },
        quantized_modules_source={
            "flux1": "vllm_omni/diffusion/models/flux/flux_transformer.py",
            "qwen-image": "vllm_omni/diffusion/models/qwen_image/qwen_image_transformer.py",
        },
        fp8_into_bf16="dequantized",
        fp8_into_bf16_source="vllm_omni/diffusion/model_loader/checkpoint_adapters/modelopt.py: FP8 weights that "
        "meet BF16 parameters are dequantized",
        nvfp4_export_fails=frozenset({"flux1", "qwen-image"}),
        mixed_resolves_packed=False,
        mixed_source="vllm_omni/diffusion/registry.py binds packed_modules_mapping of the *pipeline* class "
        "(FluxPipeline has none) into the quant config, so ModelOptMixedPrecisionConfig cannot map a fused "
        "layer (to_qkv) back to its shard entries: it stays BF16",
        # Its Wan2.2 names the FeedForward `net_0` / `net_2` and the attention output `to_out` (its
        # load_weights renames diffusers' `ffn.net.0.`, `ffn.net.2.`, `to_out.0.`): the quant prefix an
        # `ignore` entry must match (`…ffn.net.0.proj` is not a substring of `…ffn.net_0.proj`).
        runtime_names={
            "wan": ((r"\.ffn\.net\.0\.proj$", ".ffn.net_0.proj"), (r"\.ffn\.net\.2$", ".ffn.net_2"), (r"\.to_out\.0$", ".to_out"))
        },
        runtime_names_source="vllm_omni/diffusion/models/wan2_2/wan2_2_transformer.py (FeedForward net_0/net_2, "
        "attention to_out; WanTransformer3DModel.load_weights renames)",
        quant_methods={"mxfp8": "vllm_omni/quantization/factory.py: quant_method mxfp8 -> DiffusionMXFP8Config (docs/notes/sources.md §7)"},
        quant_method_caveats={
            "mxfp8": "vLLM-Omni 0.30.0 loads a serialized MXFP8 checkpoint on Ascend NPU only: "
            "DiffusionMXFP8Config.get_quant_method raises NotImplementedError on CUDA and XPU "
            "(vllm_omni/quantization/mxfp8_config.py)"
        },
    ),
}


def get_target(name: str) -> list[Target]:
    """The targets a name stands for: one engine, both for ``any``, none for ``none``."""
    if name == "any":
        return list(TARGETS.values())
    if name == "none":
        return []
    try:
        return [TARGETS[name]]
    except (KeyError, TypeError):
        raise ValueError(f"unknown target '{name}' (known: {', '.join(TARGET_NAMES)})") from None


#: What ``--target`` / ``target=`` accepts (``any`` = every engine above, ``none`` = no engine check).
TargetName = Literal["sglang", "vllm-omni", "any", "none"]
TARGET_NAMES = (*TARGETS, "any", "none")
#: The builders' default: an output both engines load.
DEFAULT_TARGET: TargetName = "any"
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


def targets_of(name: str | None) -> list[Target]:
    """:func:`get_target` for a builder's ``target=`` (None: as ``none``); an unknown name is a
    PlanError naming the flag."""
    try:
        return get_target("none" if name is None else name)
    except (ValueError, TypeError) as e:
        raise PlanError(f"--target (target): {e}") from None


def other_targets(name: str, ok: Callable[[Target], bool]) -> str:
    """The ``--target`` values (besides ``name``) whose engines all pass ``ok``, as a phrase
    (``--target vllm-omni or --target none``): the way out of a refusal."""
    alts = [n for n in TARGET_NAMES if n != name and all(ok(t) for t in get_target(n))]
    return " or ".join(f"--target {n}" for n in alts)


def fp8_from_bf16_granularity(name: str, given: str | None, fit: bool) -> tuple[str, list[str]]:
    """The weight-scale granularity of an FP8 ``--from-bf16`` build under target ``name``, and the
    choices the target forced (one line each). Unset (``given`` None): per channel
    (FP8_PER_CHANNEL_PER_TOKEN, dynamic activations) when every engine of the target loads it, else
    per tensor. An explicit per-channel choice the target cannot load is a TargetError, or with
    ``fit`` per tensor (reported)."""

    def channel_ok(t: Target) -> bool:
        return "channel" in t.fp8_weight_scales and "FP8_PER_CHANNEL_PER_TOKEN" in t.algos

    bad = [t for t in targets_of(name) if not channel_ok(t)]
    if given is not None and (given != "channel" or not bad):
        return given, []
    if given is None:
        if not bad:
            return "channel", []
        return "tensor", [f"weight scales per-tensor: {bad[0].engine_version} cannot load per-channel ({bad[0].fp8_weight_scales_source})"]
    msg = (
        f"--weight-granularity channel (weight_granularity='channel'): --target {name} includes {bad[0].engine_version}, "
        f"which cannot load per-channel FP8 ({bad[0].fp8_weight_scales_source})"
    )
    if fit:
        return "tensor", [f"{msg}: per-tensor instead (--fit-target)"]
    raise TargetError(f"{msg}; pass {other_targets(name, channel_ok)}, or --fit-target to use per-tensor scales")
