"""HunyuanVideo (diffusers ``HunyuanVideoTransformer3DModel``; SGLang runs it under its own names)."""

from __future__ import annotations

from dqfast.models.base import SGL_FP8, ModelPreset

#: diffusers -> SGLang's HunyuanVideo runtime module names.
RUNTIME_NAMES = (
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

PRESET = ModelPreset(
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
    runtime_names=RUNTIME_NAMES,
    ptq_note="no HunyuanVideo model type upstream: filter_func_default",
    source=f"FP8: {SGL_FP8}; PTQ: ModelOpt's default filter (no HunyuanVideo model type upstream)",
)
