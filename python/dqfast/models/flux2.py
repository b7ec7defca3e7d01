"""FLUX.2 (diffusers ``Flux2Transformer2DModel``; BFL checkpoints pack q/k/v)."""

from __future__ import annotations

from dqfast.models.base import MO_EXAMPLE, NVFP4_FP8_MHA_RECIPE, SGL_FP8, ModelPreset, QkvRule
from dqfast.models.flux1 import FLUX_PTQ_DISABLED

#: BFL FLUX.2 names <-> diffusers Flux2Transformer2DModel shard names (the mapping SGLang's
#: FLUX.2 config applies at load: img_attn.qkv -> attn.to_qkv = to_q|to_k|to_v, txt_attn.qkv ->
#: attn.to_added_qkv = add_q|k|v_proj). ``single_blocks.N.linear1`` (q/k/v + MLP, unequal parts)
#: is fused in diffusers too (``to_qkv_mlp_proj``) and is never split.
FLUX2_BFL_RULES: tuple[QkvRule, ...] = (
    QkvRule(
        r"^double_blocks\.(?P<i>\d+)\.img_attn\.qkv$",
        r"^transformer_blocks\.(?P<i>\d+)\.attn\.to_(?P<s>[qkv])$",
        r"double_blocks.\g<i>.img_attn.qkv",
        r"transformer_blocks.\g<i>.attn.to_{s}",
    ),
    QkvRule(
        r"^double_blocks\.(?P<i>\d+)\.txt_attn\.qkv$",
        r"^transformer_blocks\.(?P<i>\d+)\.attn\.add_(?P<s>[qkv])_proj$",
        r"double_blocks.\g<i>.txt_attn.qkv",
        r"transformer_blocks.\g<i>.attn.add_{s}_proj",
    ),
)

PRESET = ModelPreset(
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
    ptq_disabled=FLUX_PTQ_DISABLED,
    qkv_rules=FLUX2_BFL_RULES,
    modelopt_model_types=("flux2-dev",),
    nvfp4_recipe=NVFP4_FP8_MHA_RECIPE,
    source=f"FP8: {SGL_FP8}; PTQ: {MO_EXAMPLE} flux2-dev",
)
