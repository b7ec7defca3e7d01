"""LTX-2 (diffusers ``LTX2VideoTransformer3DModel``; audio + video streams)."""

from __future__ import annotations

from dqfast.models.base import ModelPreset

PRESET = ModelPreset(
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
    ptq=False,  # no ModelOpt diffusion-example filter recorded for LTX-2
    source="FP8: sglang==0.5.23 multimodal_gen/tools/build_modelopt_fp8_transformer.py (LTX-2 BF16 fallback set: "
    "embedders, adaLN, projections, attention/FF of blocks 0 and 43-47)",
    notes="fallback set only; SGLang's unwrapping of an LTX-2 X0Model export (model.diffusion_model.*) is not implemented",
)
