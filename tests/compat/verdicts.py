"""Expected verdict of each (output kind, engine) pair on the tiny FLUX.1, Wan2.2 and Qwen-Image — asserted by
test_engine_verdicts.py against the engines' own code, rendered into docs/compat.md and the README
matrix by matrix.py. A change in either engine (or in dqfast) fails a test until this table is
updated.
"""

from __future__ import annotations


def _blocks(fmts, double=(0, 1), single=(0, 1)) -> frozenset[str]:
    out = set()
    for f in fmts:
        for i in single if f.startswith("single_") else double:
            out.add(f.format(i=i))
    return frozenset(out)


# vLLM-Omni's FLUX.1 (diffusion/models/flux/flux_transformer.py) gives the double-stream blocks
# `safe_quant_config(...)` (no quantization): these checkpoint-quantized layers land in BF16 parameters.
VO_FLUX_DOUBLE = _blocks(
    [
        f"transformer_blocks.{{i}}.attn.{m}"
        for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
    ]
)
# SGLang's own tools write `proj_out` to `ignore`; vLLM matches it as a substring of
# `single_transformer_blocks.*.proj_out` too (dqfast writes `p*roj_out`, which does not).
VO_FLUX_BF16_LAYERS = VO_FLUX_DOUBLE | _blocks(["single_transformer_blocks.{i}.proj_out"])
# The mixed default policy puts these in NVFP4 (uint8) where vLLM-Omni's FLUX.1 has BF16 parameters.
VO_MIXED_ERRORS = _blocks([f"transformer_blocks.{{i}}.{f}.{m}" for f in ("ff", "ff_context") for m in ("net.0.proj", "net.2")])
VO_MIXED_BF16 = VO_FLUX_DOUBLE | _blocks(
    [
        "transformer_blocks.{i}.norm1.linear",
        "transformer_blocks.{i}.norm1_context.linear",
        "single_transformer_blocks.{i}.norm.linear",
        "single_transformer_blocks.{i}.attn.to_q",
        "single_transformer_blocks.{i}.attn.to_k",
        "single_transformer_blocks.{i}.attn.to_v",
    ]
)
# SGLang's FLUX.1 at tp_size 1 (runtime/models/dits/flux.py) builds the FeedForwards (diffusers
# FeedForward) and the modulation Linears without a quant config: the whole ModelOpt NVFP4 export
# (SGLang's NVFP4 tool without a preset) puts uint8 weights there.
SGL_FLUX_UNQUANTIZED = _blocks(
    [
        "single_transformer_blocks.{i}.norm.linear",
        "transformer_blocks.{i}.norm1.linear",
        "transformer_blocks.{i}.norm1_context.linear",
        *(f"transformer_blocks.{{i}}.{f}.{m}" for f in ("ff", "ff_context") for m in ("net.0.proj", "net.2")),
    ]
)

# vLLM-Omni's Wan2.2 fuses each block's self-attention q/k/v (the tiny Wan2.2 has 4 blocks).
VO_WAN_SELF_QKV = frozenset(f"blocks.{i}.attn1.to_{x}" for i in range(4) for x in "qkv")

# The tiny Qwen-Image has 6 blocks; ModelOpt's recipe quantizes blocks 2 and 3.
VO_QWEN_MOD = frozenset(f"transformer_blocks.{i}.{m}.1" for i in (2, 3) for m in ("img_mod", "txt_mod"))

#: (kind, engine) -> (status, bf16 layers, error layers or a config-error substring)
EXPECTED: dict[tuple[str, str], tuple[str, frozenset[str], frozenset[str] | str]] = {
    ("fp8-export", "sglang"): ("loads", frozenset(), frozenset()),
    ("fp8-export", "vllm-omni"): ("loads-bf16", VO_FLUX_DOUBLE, frozenset()),
    ("fp8-bf16-default", "sglang"): ("loads", frozenset(), frozenset()),
    ("fp8-bf16-default", "vllm-omni"): ("loads-bf16", VO_FLUX_DOUBLE, frozenset()),
    ("fp8-bf16-tensor", "sglang"): ("loads", frozenset(), frozenset()),
    ("fp8-bf16-tensor", "vllm-omni"): ("loads-bf16", VO_FLUX_DOUBLE, frozenset()),
    ("fp8-bf16-channel", "sglang"): ("fails", frozenset(), "Unsupported ModelOpt quant_algo for diffusion: FP8_PER_CHANNEL_PER_TOKEN"),
    ("fp8-bf16-channel", "vllm-omni"): ("loads-bf16", VO_FLUX_DOUBLE, frozenset()),
    ("nvfp4-export", "sglang"): ("loads", frozenset(), frozenset()),
    ("nvfp4-export", "vllm-omni"): ("fails", frozenset(), VO_FLUX_DOUBLE),
    ("nvfp4-bf16", "sglang"): ("loads", frozenset(), frozenset()),
    ("nvfp4-bf16", "vllm-omni"): ("fails", frozenset(), VO_FLUX_DOUBLE),
    ("mixed", "sglang"): ("fails", frozenset(), "ModelOpt mixed precision is not supported"),
    ("mixed", "vllm-omni"): ("fails", VO_MIXED_BF16, VO_MIXED_ERRORS),
    # The default policy fitted to vLLM-Omni's FLUX.1: what it would dequantize or fail on is written BF16.
    ("mixed-vllm-omni", "sglang"): ("fails", frozenset(), "ModelOpt mixed precision is not supported"),
    ("mixed-vllm-omni", "vllm-omni"): ("loads", frozenset(), frozenset()),
    ("components", "sglang"): ("loads", frozenset(), frozenset()),
    ("components", "vllm-omni"): ("loads-bf16", VO_FLUX_DOUBLE, frozenset()),
    # SGLang's FLUX.1 at tp_size 1 builds its FeedForwards unquantized (runtime/models/dits/flux.py), so
    # the BF16 FeedForward weights its own FP8 tool writes (listed only as `ff.proj_in`/`ff.proj_out`)
    # load as they are.
    ("sglang-fp8", "sglang"): ("loads", frozenset(), frozenset()),
    ("sglang-fp8", "vllm-omni"): ("loads-bf16", VO_FLUX_BF16_LAYERS, frozenset()),
    ("sglang-nvfp4", "sglang"): ("loads", frozenset(), frozenset()),
    ("sglang-nvfp4", "vllm-omni"): ("fails", frozenset(), VO_FLUX_BF16_LAYERS),
    ("sglang-nvfp4-no-preset", "sglang"): ("fails", frozenset(), SGL_FLUX_UNQUANTIZED),
    ("sglang-nvfp4-no-preset", "vllm-omni"): ("fails", frozenset(), VO_FLUX_BF16_LAYERS | SGL_FLUX_UNQUANTIZED),
    # --target vllm-omni --fit-target: the layers vLLM-Omni's FLUX.1 keeps BF16 are written in BF16.
    ("nvfp4-bf16-fit", "sglang"): ("loads", frozenset(), frozenset()),
    ("nvfp4-bf16-fit", "vllm-omni"): ("loads", frozenset(), frozenset()),
    ("nvfp4-bf16-fit-vllm-omni", "sglang"): ("loads", frozenset(), frozenset()),
    ("nvfp4-bf16-fit-vllm-omni", "vllm-omni"): ("loads", frozenset(), frozenset()),
    ("nvfp4-export-fit-vllm-omni", "sglang"): ("loads", frozenset(), frozenset()),
    ("nvfp4-export-fit-vllm-omni", "vllm-omni"): ("loads", frozenset(), frozenset()),
    # vLLM-Omni's Wan2.2 DiT quantizes every block Linear (fused attn1 q/k/v, ffn renamed net_0/net_2).
    ("wan-fp8-export", "sglang"): ("loads", frozenset(), frozenset()),
    ("wan-fp8-export", "vllm-omni"): ("loads", frozenset(), frozenset()),
    ("wan-sglang-fp8", "sglang"): ("loads", frozenset(), frozenset()),
    ("wan-sglang-fp8", "vllm-omni"): ("loads", frozenset(), frozenset()),
    # Before the `ignore` entries carried each engine's Wan2.2 names (SGLang: `blocks.N.to_q`,
    # `ffn.fc_in`, ...; vLLM-Omni: `ffn.net_0.proj`, `to_out`, ...), SGLang cast the kept BF16 blocks
    # into FP8 parameters without scales and vLLM-Omni's loader raised on the kept NVFP4 FeedForwards.
    ("wan-fp8-bf16", "sglang"): ("loads", frozenset(), frozenset()),
    ("wan-fp8-bf16", "vllm-omni"): ("loads", frozenset(), frozenset()),
    ("wan-nvfp4-bf16", "sglang"): ("loads", frozenset(), frozenset()),
    # vLLM-Omni looked MIXED_PRECISION entries up under its names too (`ffn.net_0.proj`): NVFP4 FFN
    # weights met BF16 parameters. Its fused self-attention q/k/v cannot be resolved from per-shard
    # entries (as for FLUX.1): FP8 there is dequantized.
    ("wan-mixed-vllm-omni", "sglang"): ("fails", frozenset(), "ModelOpt mixed precision is not supported"),
    ("wan-mixed-vllm-omni", "vllm-omni"): ("loads-bf16", VO_WAN_SELF_QKV, frozenset()),
    ("wan-nvfp4-bf16", "vllm-omni"): ("loads", frozenset(), frozenset()),
    # vLLM-Omni's Qwen-Image (diffusion/models/qwen_image/qwen_image_transformer.py) builds each block's
    # img_mod / txt_mod Linear unquantized; ModelOpt's export quantizes them in the middle blocks.
    ("qwen-image-nvfp4-export", "sglang"): ("loads", frozenset(), frozenset()),
    ("qwen-image-nvfp4-export", "vllm-omni"): ("fails", frozenset(), VO_QWEN_MOD),
    ("qwen-image-nvfp4-export-fit", "sglang"): ("loads", frozenset(), frozenset()),
    ("qwen-image-nvfp4-export-fit", "vllm-omni"): ("loads", frozenset(), frozenset()),
    # The preset keeps blocks outside its range BF16: vLLM-Omni (no packed mapping from its pipeline class)
    # decides for the fused `add_kv_proj`, which the shard entries `add_q_proj`, ... do not match
    # under its rule; before dqfast listed the fused name too, its loader raised on those blocks.
    ("qwen-image-nvfp4-bf16-fit", "sglang"): ("loads", frozenset(), frozenset()),
    ("qwen-image-nvfp4-bf16-fit", "vllm-omni"): ("loads", frozenset(), frozenset()),
    ("qwen-image-sglang-nvfp4", "sglang"): ("loads", frozenset(), frozenset()),
    ("qwen-image-sglang-nvfp4", "vllm-omni"): ("fails", frozenset(), VO_QWEN_MOD),
}

#: Why, in words (docs/compat.md and the README matrix).
WHY = {
    "vo-bf16": "double-stream blocks are BF16 in vLLM-Omni's FLUX.1: their FP8 weights are dequantized at load",
    "vo-bf16-sgl": "double-stream blocks and `single_transformer_blocks.*.proj_out` (`proj_out` in SGLang's `ignore` "
    "matches it as a substring) are BF16 in vLLM-Omni's FLUX.1: their FP8 weights are dequantized at load",
    "vo-nvfp4": "uint8 NVFP4 weights of the double-stream attention meet BF16 parameters (size mismatch); "
    "`build nvfp4 --target vllm-omni --fit-target` writes them in BF16",
    "vo-nvfp4-sgl": "uint8 NVFP4 weights of the double-stream attention and `single_transformer_blocks.*.proj_out` "
    "(`proj_out` substring in `ignore`) meet BF16 parameters (size mismatch)",
    "vo-wan-qkv": "vLLM-Omni's Wan2.2 fuses the self-attention q/k/v and cannot map per-shard `quantized_layers` "
    "entries to it: their FP8 weights are dequantized at load",
    "vo-mixed": "NVFP4 FeedForward weights of the double-stream blocks meet BF16 parameters; FP8 layers there are dequantized",
    "sgl-channel": "SGLang accepts only `FP8` and `NVFP4` (`Unsupported ModelOpt quant_algo ... FP8_PER_CHANNEL_PER_TOKEN`)",
    "sgl-mixed": "SGLang rejects `MIXED_PRECISION`",
    "vo-qwen-mod": "vLLM-Omni's Qwen-Image builds each block's `img_mod`/`txt_mod` Linear unquantized: "
    "ModelOpt's NVFP4 weights there meet BF16 parameters; `--fit-target` writes them in BF16",
    "sgl-nvfp4-all": "SGLang's FLUX.1 (tp_size 1) builds the FeedForwards and the modulation Linears (`norm1*.linear`, "
    "`norm.linear`) unquantized: the whole ModelOpt NVFP4 export puts uint8 weights in BF16 parameters there "
    "(the `flux1-nvfp4` preset keeps them BF16)",
    "vo-nvfp4-all": "uint8 NVFP4 weights of the double-stream blocks, FeedForwards, modulation Linears and "
    "`single_transformer_blocks.*.proj_out` meet BF16 parameters (size mismatch)",
}
WHY_OF = {
    ("fp8-export", "vllm-omni"): "vo-bf16",
    ("fp8-bf16-default", "vllm-omni"): "vo-bf16",
    ("fp8-bf16-tensor", "vllm-omni"): "vo-bf16",
    ("fp8-bf16-channel", "sglang"): "sgl-channel",
    ("fp8-bf16-channel", "vllm-omni"): "vo-bf16",
    ("nvfp4-export", "vllm-omni"): "vo-nvfp4",
    ("nvfp4-bf16", "vllm-omni"): "vo-nvfp4",
    ("mixed", "sglang"): "sgl-mixed",
    ("mixed", "vllm-omni"): "vo-mixed",
    ("mixed-vllm-omni", "sglang"): "sgl-mixed",
    ("wan-mixed-vllm-omni", "sglang"): "sgl-mixed",
    ("wan-mixed-vllm-omni", "vllm-omni"): "vo-wan-qkv",
    ("components", "vllm-omni"): "vo-bf16",
    ("sglang-fp8", "vllm-omni"): "vo-bf16-sgl",
    ("sglang-nvfp4", "vllm-omni"): "vo-nvfp4-sgl",
    ("sglang-nvfp4-no-preset", "sglang"): "sgl-nvfp4-all",
    ("sglang-nvfp4-no-preset", "vllm-omni"): "vo-nvfp4-all",
    ("qwen-image-nvfp4-export", "vllm-omni"): "vo-qwen-mod",
    ("qwen-image-sglang-nvfp4", "vllm-omni"): "vo-qwen-mod",
}
