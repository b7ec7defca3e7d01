"""Model presets: which modules stay BF16, how names are canonicalized, how models are detected.

Everything model-specific lives here, as data. The builders only ever ask a preset questions
("is this module a fallback?", "what are this module's name variants?"); no model name appears in
the conversion path. Each preset records where its lists come from, because upstream versions
differ (e.g. SGLang's FLUX.1 FP8 list gained and lost ``single_transformer_blocks.*.proj_mlp``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dqfast.errors import PlanError

__all__ = ["ModelPreset", "PRESETS", "get_preset", "detect_preset", "resolve_preset", "glob_to_regex", "pattern_list"]

# SGLang's builder: module-name variants that drop these wrapper prefixes.
_WRAPPER_PREFIXES = ("model.diffusion_model.", "velocity_model.")
# SGLang's builder: diffusers FeedForward names -> runtime names.
_FF_RENAMES = (
    (r"(\.audio_ff|\.ff)\.net\.0\.proj$", r"\1.proj_in"),
    (r"(\.audio_ff|\.ff)\.net\.2$", r"\1.proj_out"),
)

_HUNYUAN_RUNTIME_MAP = (
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_1$", "txt_in.t_embedder.mlp.fc_in"),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_2$", "txt_in.t_embedder.mlp.fc_out"),
    (r"^context_embedder\.proj_in$", "txt_in.input_embedder"),
    (r"^context_embedder\.time_text_embed\.text_embedder\.linear_1$", "txt_in.c_embedder.fc_in"),
    (r"^context_embedder\.time_text_embed\.text_embedder\.linear_2$", "txt_in.c_embedder.fc_out"),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm1$", r"txt_in.refiner_blocks.\1.norm1"),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm2$", r"txt_in.refiner_blocks.\1.norm2"),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_[qkv]$", r"txt_in.refiner_blocks.\1.self_attn_qkv"),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0$", r"txt_in.refiner_blocks.\1.self_attn_proj"),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0(?:\.proj)?$", r"txt_in.refiner_blocks.\1.mlp.fc_in"),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2(?:\.proj)?$", r"txt_in.refiner_blocks.\1.mlp.fc_out"),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear$", r"txt_in.refiner_blocks.\1.adaLN_modulation.linear"),
    (r"^x_embedder\.proj$", "img_in.proj"),
    (r"^time_text_embed\.timestep_embedder\.linear_1$", "time_in.mlp.fc_in"),
    (r"^time_text_embed\.timestep_embedder\.linear_2$", "time_in.mlp.fc_out"),
    (r"^time_text_embed\.guidance_embedder\.linear_1$", "guidance_in.mlp.fc_in"),
    (r"^time_text_embed\.guidance_embedder\.linear_2$", "guidance_in.mlp.fc_out"),
    (r"^time_text_embed\.text_embedder\.linear_1$", "vector_in.fc_in"),
    (r"^time_text_embed\.text_embedder\.linear_2$", "vector_in.fc_out"),
    (r"^transformer_blocks\.(\d+)\.norm1\.linear$", r"double_blocks.\1.img_mod.linear"),
    (r"^transformer_blocks\.(\d+)\.norm1_context\.linear$", r"double_blocks.\1.txt_mod.linear"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q$", r"double_blocks.\1.img_attn_q_norm"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k$", r"double_blocks.\1.img_attn_k_norm"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_[qkv]$", r"double_blocks.\1.img_attn_qkv"),
    (r"^transformer_blocks\.(\d+)\.attn\.add_[qkv]_proj$", r"double_blocks.\1.txt_attn_qkv"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0$", r"double_blocks.\1.img_attn_proj"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out$", r"double_blocks.\1.txt_attn_proj"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q$", r"double_blocks.\1.txt_attn_q_norm"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k$", r"double_blocks.\1.txt_attn_k_norm"),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0(?:\.proj)?$", r"double_blocks.\1.img_mlp.fc_in"),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2(?:\.proj)?$", r"double_blocks.\1.img_mlp.fc_out"),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0(?:\.proj)?$", r"double_blocks.\1.txt_mlp.fc_in"),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2(?:\.proj)?$", r"double_blocks.\1.txt_mlp.fc_out"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q$", r"single_blocks.\1.q_norm"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k$", r"single_blocks.\1.k_norm"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_[qkv]$", r"single_blocks.\1.linear1"),
    (r"^single_transformer_blocks\.(\d+)\.proj_mlp$", r"single_blocks.\1.linear1"),
    (r"^single_transformer_blocks\.(\d+)\.proj_out$", r"single_blocks.\1.linear2"),
    (r"^single_transformer_blocks\.(\d+)\.norm\.linear$", r"single_blocks.\1.modulation.linear"),
    (r"^norm_out\.linear$", "final_layer.adaLN_modulation.linear"),
    (r"^proj_out$", "final_layer.linear"),
)


def glob_to_regex(pattern: str) -> str:
    """SGLang's/ModelOpt's ignore-pattern rule: ``.`` literal, ``*`` any run; full match."""
    return re.escape(pattern).replace(r"\*", ".*")


@dataclass(frozen=True)
class ModelPreset:
    """Facts about one model family."""

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

    def fp8_fallback_match(self, module: str, extra: list[re.Pattern[str]] | None = None) -> str | None:
        """The first fallback pattern matching any variant of ``module``, else None."""
        pats = self._fp8_fallback_re + list(extra or ())
        for v in self.name_variants(module):
            for p in pats:
                if p.search(v):
                    return p.pattern
        return None

    def nvfp4_fallback_match(self, module: str, extra: list[re.Pattern[str]] | None = None) -> str | None:
        pats = self._nvfp4_fallback_re + list(extra or ())
        for v in self.name_variants(module):
            for p in pats:
                if p.fullmatch(v):
                    return p.pattern
        return None

    def ptq_disabled_match(self, module: str) -> str | None:
        for v in self.name_variants(module):
            for p in self._ptq_disabled_re:
                if p.match(v):
                    return p.pattern
        return None


_SGL_FP8 = "sgl-project/sglang@27b84fc python/sglang/multimodal_gen/tools/build_modelopt_fp8_transformer.py"
_SGL_NVFP4 = "sgl-project/sglang@25688fc python/sglang/multimodal_gen/tools/build_modelopt_nvfp4_transformer.py"
_MO_EXAMPLE = "NVIDIA/Model-Optimizer@6b4ad85 examples/diffusers/quantization (filter functions)"

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset(
            name="flux1",
            class_names=("FluxTransformer2DModel",),
            fp8_fallback=(
                r"^transformer_blocks\.\d+\.norm1\.linear$",
                r"^transformer_blocks\.\d+\.norm1_context\.linear$",
                r"^transformer_blocks\.\d+\.ff\.net\.0\.proj$",
                r"^transformer_blocks\.\d+\.ff\.net\.2$",
                r"^transformer_blocks\.\d+\.ff_context\.net\.0\.proj$",
                r"^transformer_blocks\.\d+\.ff_context\.net\.2$",
                r"^single_transformer_blocks\.\d+\.norm\.linear$",
            ),
            nvfp4_fallback=(
                "transformer_blocks.*.norm1.linear*",
                "transformer_blocks.*.norm1_context.linear*",
                "transformer_blocks.*.ff.net.0.proj*",
                "transformer_blocks.*.ff.net.2*",
                "transformer_blocks.*.ff_context.net.0.proj*",
                "transformer_blocks.*.ff_context.net.2*",
                "single_transformer_blocks.*.norm.linear*",
                "single_transformer_blocks.*.proj_mlp*",
            ),
            ptq_disabled=(
                r"(proj_out.*|.*(time_text_embed|context_embedder|x_embedder|norm_out|time_guidance_embed|stream_modulation).*)",
            ),
            source=f"FP8: {_SGL_FP8}; NVFP4: {_SGL_NVFP4} (flux1-nvfp4); PTQ: {_MO_EXAMPLE} flux-dev",
            notes="SGLang's skill document also lists single_transformer_blocks.*.proj_mlp for FP8; "
            "the builder at 27b84fc does not. Add it with --fallback if you follow the document.",
        ),
        ModelPreset(
            name="flux2",
            class_names=("Flux2Transformer2DModel",),
            fp8_fallback=(
                r"^time_guidance_embed\.(timestep_embedder|guidance_embedder)\.linear_[12]$",
                r"^double_stream_modulation_(img|txt)\.linear$",
                r"^single_stream_modulation\.linear$",
                r"^x_embedder$",
                r"^context_embedder$",
                r"^norm_out\.linear$",
            ),
            ptq_disabled=(
                r"(proj_out.*|.*(time_text_embed|context_embedder|x_embedder|norm_out|time_guidance_embed|stream_modulation).*)",
            ),
            source=f"FP8: {_SGL_FP8}; PTQ: {_MO_EXAMPLE} flux2-dev",
        ),
        ModelPreset(
            name="hunyuan-video",
            class_names=("HunyuanVideoTransformer3DModel",),
            fp8_fallback=(
                r"^context_embedder\.",
                r"^x_embedder\.proj$",
                r"^time_text_embed\.(timestep_embedder|guidance_embedder|text_embedder)\.linear_[12]$",
                r"^norm_out\.linear$",
                r"^proj_out$",
                r"^transformer_blocks\.\d+\.norm1\.linear$",
                r"^transformer_blocks\.\d+\.norm1_context\.linear$",
                r"^single_transformer_blocks\.\d+\.norm\.linear$",
            ),
            ptq_disabled=(
                r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed|time_text_embed|context_embedder|norm_out|x_embedder).*",
            ),
            runtime_names=_HUNYUAN_RUNTIME_MAP,
            source=f"FP8: {_SGL_FP8}; PTQ: ModelOpt's default filter (no HunyuanVideo model type upstream)",
        ),
        ModelPreset(
            name="qwen-image",
            class_names=("QwenImageTransformer2DModel",),
            fp8_fallback=(
                r"^img_in$",
                r"^txt_in$",
                r"^time_text_embed\.timestep_embedder\.linear_[12]$",
                r"^norm_out\.linear$",
                r"^proj_out$",
                r"^transformer_blocks\.\d+\.img_mlp\.net\.2$",
                r"^transformer_blocks\.\d+\.(img_mod|txt_mod)$",
            ),
            canonical_renames=((r"\.(img_mod|txt_mod)\.1$", r".\1"),),
            ptq_disabled=(r"^(?!.*(?:^|\.)transformer_blocks\.\d+(?:\.|$)).*", r".*transformer_blocks\.(0|1|58|59)(\.|$)"),
            source="FP8: sgl-project/sglang PR #23155 (not merged at 27b84fc; see docs/notes/sources.md); "
            f"PTQ: {_MO_EXAMPLE} qwen-image (first/last two of 60 blocks)",
        ),
        ModelPreset(
            name="wan",
            class_names=("WanTransformer3DModel",),
            # SGLang has no Wan FP8 preset; these follow ModelOpt's Wan2.2 filter so that a
            # converted checkpoint keeps the same layers in BF16 as ModelOpt's own recipe.
            fp8_fallback=(r"^(patch_embedding|condition_embedder)\.", r"^proj_out$"),
            ptq_disabled=(r".*(patch_embedding|condition_embedder|proj_out|blocks\.(0|1|2|37|38|39)\.).*",),
            components=("transformer", "transformer_2"),
            source=f"PTQ: {_MO_EXAMPLE} wan2.2-t2v-14b; no upstream FP8 builder preset",
        ),
        ModelPreset(
            name="ltx2",
            class_names=("LTX2VideoTransformer3DModel",),
            fp8_fallback=(
                r"^(audio_)?adaln_single\.emb\.timestep_embedder\.linear_[12]$",
                r"^(audio_)?adaln_single\.linear$",
                r"^audio_caption_projection\.linear_[12]$",
                r"^audio_patchify_proj$",
                r"^audio_proj_out$",
                r"^av_ca_(a2v_gate|audio_scale_shift|v2a_gate|video_scale_shift)_adaln_single\.emb\.timestep_embedder\.linear_[12]$",
                r"^av_ca_(a2v_gate|audio_scale_shift|v2a_gate|video_scale_shift)_adaln_single\.linear$",
                r"^caption_projection\.linear_[12]$",
                r"^patchify_proj$",
                r"^proj_out$",
                r"^transformer_blocks\.(0|43|44|45|46|47)\.(attn1|attn2|audio_attn1|audio_attn2|audio_to_video_attn|video_to_audio_attn)\.to_(q|k|v)$",
                r"^transformer_blocks\.(0|43|44|45|46|47)\.(attn1|attn2|audio_attn1|audio_attn2|audio_to_video_attn|video_to_audio_attn)\.to_out\.0$",
                r"^transformer_blocks\.(0|43|44|45|46|47)\.(ff|audio_ff)\.proj_(in|out)$",
            ),
            source="FP8: sglang==0.5.23 multimodal_gen/tools/build_modelopt_fp8_transformer.py (LTX-2 BF16 fallback set: "
            "embedders, adaLN, projections, attention/FF of blocks 0 and 43-47)",
            notes="fallback set only; SGLang's unwrapping of an LTX-2 X0Model export (model.diffusion_model.*) is not implemented",
        ),
        ModelPreset(name="none", source="no fallbacks: only ModelOpt's own ignore list is honoured"),
    ]
}

#: Aliases accepted on the command line.
_ALIASES = {"hunyuanvideo": "hunyuan-video", "qwen": "qwen-image", "wan2.2": "wan", "flux": "flux1"}


def get_preset(name: str) -> ModelPreset:
    key = _ALIASES.get(name, name)
    try:
        return PRESETS[key]
    except KeyError:
        raise PlanError(f"unknown model type '{name}' (known: {', '.join(sorted(PRESETS))}, auto)") from None


def _class_name(config: dict | None) -> str:
    cls = (config or {}).get("_class_name", "")
    if not isinstance(cls, str):
        raise PlanError(f"config.json field '_class_name' must be a string, not {type(cls).__name__}")
    return cls


def detect_preset(config: dict | None) -> ModelPreset:
    """The preset whose class names include the config's ``_class_name``, else ``none``."""
    cls = _class_name(config)
    for p in PRESETS.values():
        if cls in p.class_names:
            return p
    return PRESETS["none"]


def resolve_preset(model_type: str, config: dict | None, force: bool = False) -> ModelPreset:
    """The preset for ``model_type`` (``auto``: from config.json's ``_class_name``).

    A named preset whose ``class_names`` do not include the checkpoint's ``_class_name`` would
    choose the wrong modules to keep in BF16 without a word: refused unless ``force``."""
    if not isinstance(model_type, str):
        raise PlanError(f"model_type (--model-type) must be a string, not {type(model_type).__name__}")
    if model_type == "auto":
        return detect_preset(config)
    preset = get_preset(model_type)
    cls = _class_name(config)
    if preset.class_names and cls and cls not in preset.class_names and not force:
        raise PlanError(
            f"--model-type {model_type} is for {', '.join(preset.class_names)}, but config.json says _class_name "
            f"'{cls}' (preset {detect_preset(config).name}); use --model-type auto, or --force-model-type "
            "(force_model_type=True) if you mean it"
        )
    return preset


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
