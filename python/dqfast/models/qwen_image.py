"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``)."""

from __future__ import annotations

from dqfast.models.base import MO_EXAMPLE, BlockRange, ModelPreset

PRESET = ModelPreset(
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
    # diffusers names the modulation Linear ``img_mod.1`` (inside a Sequential); SGLang ``img_mod``.
    canonical_renames=((r"\.(img_mod|txt_mod)\.1$", r".\1"),),
    # NVFP4: no BF16 fallback. SGLang 0.5.23's NVFP4 tool has only the `none` and `flux1-nvfp4`
    # presets; its Qwen-Image / Qwen-Image-Edit NVFP4 path serves ModelOpt's export as written (the
    # recipe's own ignore list: embedders, norm_out, proj_out, the first and last two blocks).
    nvfp4_fallback=(),
    ptq_disabled=(r"^(?!.*(?:^|\.)transformer_blocks\.\d+(?:\.|$)).*", r".*transformer_blocks\.(0|1|58|59)(\.|$)"),
    modelopt_model_types=("qwen-image",),
    block_range=BlockRange("transformer_blocks", 2, 2),
    source="FP8: sgl-project/sglang PR #23155 (not merged at 27b84fc; see docs/notes/sources.md), in sglang==0.5.23 "
    "tools/build_modelopt_fp8_transformer.py; NVFP4: none in sglang==0.5.23 tools/build_modelopt_nvfp4_transformer.py "
    "(its modelopt-quant skill serves the ModelOpt export as is); "
    f"PTQ: {MO_EXAMPLE} qwen-image (first/last two of 60 blocks)",
)
