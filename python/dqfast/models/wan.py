"""Wan2.2 (diffusers ``WanTransformer3DModel``; A14B pipelines have two transformers)."""

from __future__ import annotations

from dqfast.models.base import MO_EXAMPLE, ModelPreset

PRESET = ModelPreset(
    name="wan",
    class_names=("WanTransformer3DModel",),
    # SGLang has no Wan FP8 preset; these follow ModelOpt's Wan2.2 filter so that a
    # converted checkpoint keeps the same layers in BF16 as ModelOpt's own recipe.
    fp8_fallback=(r"^(patch_embedding|condition_embedder)\.", r"^proj_out$"),
    ptq_disabled=(r".*(patch_embedding|condition_embedder|proj_out|blocks\.(0|1|2|37|38|39)\.).*",),
    components=("transformer", "transformer_2"),
    modelopt_model_types=("wan2.2-t2v-14b", "wan2.2-t2v-5b"),
    ptq_note="the filter names literal blocks 0-2 and 37-39 of the 40-block A14B (the 5B too)",
    calibration="wan",
    source=f"PTQ: {MO_EXAMPLE} wan2.2-t2v-14b; no upstream FP8 builder preset",
)
