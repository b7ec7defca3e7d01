"""FLUX.1 (diffusers ``FluxTransformer2DModel``)."""

from __future__ import annotations

from dqfast.models.base import MO_EXAMPLE, NVFP4_FP8_MHA_RECIPE, SGL_FP8, SGL_NVFP4, ModelPreset

# ModelOpt's filter_func_flux_dev (also used for FLUX.2).
FLUX_PTQ_DISABLED = (r"(proj_out.*|.*(time_text_embed|context_embedder|x_embedder|norm_out|time_guidance_embed|stream_modulation).*)",)

PRESET = ModelPreset(
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
    ptq_disabled=FLUX_PTQ_DISABLED,
    # The example picks nvfp4_fp8_mha for every model type starting with "flux".
    modelopt_model_types=("flux-dev", "flux-schnell"),
    nvfp4_recipe=NVFP4_FP8_MHA_RECIPE,
    ptq_note="flux-schnell uses filter_func_default upstream; dqfast applies the flux-dev filter to both",
    calibration="flux",
    source=f"FP8: {SGL_FP8}; NVFP4: {SGL_NVFP4} (flux1-nvfp4); PTQ: {MO_EXAMPLE} flux-dev",
    notes="SGLang's skill document also lists single_transformer_blocks.*.proj_mlp for FP8; "
    "the builder at 27b84fc does not. Add it with --fallback if you follow the document.",
)
