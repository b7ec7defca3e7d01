"""Every output kind the compat suite checks, built once per session from the ModelOpt fixtures.

Names are the rows of docs/compat.md's verdict table. SGLang's own builder outputs are built here
too (the references of the parity tests, and rows of their own in the verdict table).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# (kind, what it is) — the order of docs/compat.md and the README matrix.
KINDS = {
    "fp8-export": "dqfast build fp8 from a ModelOpt FP8 export (FLUX.1 preset)",
    "fp8-bf16-default": "dqfast build fp8 --from-bf16 (default --target any: per-tensor FP8, activation amax 448)",
    "fp8-bf16-tensor": "dqfast build fp8 --from-bf16 --weight-granularity tensor --activation-amax 448",
    "fp8-bf16-channel": "dqfast build fp8 --from-bf16 --target vllm-omni (its default: per-channel, FP8_PER_CHANNEL_PER_TOKEN)",
    "nvfp4-export": "dqfast build nvfp4 from a ModelOpt NVFP4 export --pattern-preset flux1-nvfp4 --target sglang",
    "nvfp4-bf16": "dqfast build nvfp4 --from-bf16 --target sglang",
    "nvfp4-bf16-fit": "dqfast build nvfp4 --from-bf16 --fit-target (default --target any)",
    "nvfp4-bf16-fit-vllm-omni": "dqfast build nvfp4 --from-bf16 --target vllm-omni --fit-target",
    "nvfp4-export-fit-vllm-omni": "dqfast build nvfp4 from a ModelOpt NVFP4 export --pattern-preset flux1-nvfp4 "
    "--target vllm-omni --fit-target",
    "mixed": "dqfast build mixed --target none (default policy, not fitted)",
    "mixed-vllm-omni": "dqfast build mixed --target vllm-omni (default policy, fitted to vLLM-Omni's FLUX.1)",
    "components": "dqfast build components fp8 --from-bf16 (transformer/ of a pipeline root; default --target any)",
    "sglang-fp8": "SGLang 0.5.23 build_modelopt_fp8_transformer (reference)",
    "sglang-nvfp4": "SGLang 0.5.23 build_modelopt_nvfp4_transformer --pattern-preset flux1-nvfp4 (reference)",
    "sglang-nvfp4-no-preset": "SGLang 0.5.23 build_modelopt_nvfp4_transformer, its default (no preset: the whole ModelOpt export)",
    "wan-fp8-export": "Wan2.2: dqfast build fp8 from a ModelOpt FP8 export",
    "wan-sglang-fp8": "Wan2.2: SGLang 0.5.23 build_modelopt_fp8_transformer (reference)",
    "wan-fp8-bf16": "Wan2.2: dqfast build fp8 --from-bf16 (default --target any; the wan preset keeps blocks 0-2 BF16)",
    "wan-nvfp4-bf16": "Wan2.2: dqfast build nvfp4 --from-bf16 (default --target any; the wan preset keeps blocks 0-2 BF16)",
    "wan-mixed-vllm-omni": 'Wan2.2: dqfast build mixed --target vllm-omni --policy \'{"fp8": ["attn"], "nvfp4": ["ffn"]}\'',
    "qwen-image-nvfp4-export": "Qwen-Image: dqfast build nvfp4 from a ModelOpt NVFP4 export --target sglang (no preset)",
    "qwen-image-nvfp4-export-fit": "Qwen-Image: dqfast build nvfp4 from a ModelOpt NVFP4 export --fit-target (default --target any)",
    "qwen-image-nvfp4-bf16-fit": "Qwen-Image: dqfast build nvfp4 --from-bf16 --fit-target (default --target any)",
    "qwen-image-sglang-nvfp4": "Qwen-Image: SGLang 0.5.23 build_modelopt_nvfp4_transformer (reference, no preset)",
}


def sglang_fp8(fx, out: Path, **kw) -> Path:
    from sglang.multimodal_gen.tools.build_modelopt_fp8_transformer import build_modelopt_fp8_transformer

    build_modelopt_fp8_transformer(
        modelopt_hf_dir=str(kw.pop("hf_dir", fx.hf_dir)),
        modelopt_backbone_ckpt=str(fx.backbone),
        output_dir=str(out),
        base_transformer_dir=str(fx.base_dir),
        **kw,
    )
    return out


def sglang_nvfp4(fx, out: Path, **kw) -> Path:
    from sglang.multimodal_gen.tools.build_modelopt_nvfp4_transformer import build_modelopt_nvfp4_transformer

    hf_dir = str(kw.pop("hf_dir", fx.hf_dir))
    build_modelopt_nvfp4_transformer(modelopt_hf_dir=hf_dir, base_transformer_dir=str(fx.base_dir), output_dir=str(out), **kw)
    return out


def build_kind(kind: str, flux: dict, root: Path) -> Path:
    """Build output ``kind`` under ``root`` from the fixtures in ``flux`` ("fp8", "nvfp4": FLUX.1;
    "wan-fp8"; "qwen-image-nvfp4"); returns the transformer dir."""
    from dqfast.components import build_components
    from dqfast.fp8 import build_fp8_transformer
    from dqfast.mixed import build_mixed_transformer
    from dqfast.nvfp4 import build_nvfp4_transformer

    f8, f4 = flux["fp8"], flux["nvfp4"]
    out = root / kind
    if kind == "fp8-export":
        build_fp8_transformer(out, modelopt_hf_dir=f8.hf_dir, modelopt_backbone_ckpt=f8.backbone, base_transformer_dir=f8.base_dir)
    elif kind == "fp8-bf16-default":
        build_fp8_transformer(out, from_bf16=True, base_transformer_dir=f8.base_dir)
    elif kind == "fp8-bf16-tensor":
        build_fp8_transformer(out, from_bf16=True, base_transformer_dir=f8.base_dir, weight_granularity="tensor", activation_amax=448.0)
    elif kind == "fp8-bf16-channel":
        build_fp8_transformer(out, from_bf16=True, base_transformer_dir=f8.base_dir, target="vllm-omni")
    elif kind == "nvfp4-export":
        build_nvfp4_transformer(out, modelopt_hf_dir=f4.hf_dir, base_transformer_dir=f4.base_dir, model_type="flux1", target="sglang")
    elif kind == "nvfp4-bf16":
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=f4.base_dir, target="sglang")
    elif kind == "nvfp4-bf16-fit":
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=f4.base_dir, fit_target=True)
    elif kind == "nvfp4-bf16-fit-vllm-omni":
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=f4.base_dir, target="vllm-omni", fit_target=True)
    elif kind == "nvfp4-export-fit-vllm-omni":
        build_nvfp4_transformer(
            out, modelopt_hf_dir=f4.hf_dir, base_transformer_dir=f4.base_dir, model_type="flux1", target="vllm-omni", fit_target=True
        )
    elif kind == "mixed":
        build_mixed_transformer(out, f4.base_dir, target="none")
    elif kind == "mixed-vllm-omni":
        build_mixed_transformer(out, f4.base_dir, target="vllm-omni")
    elif kind == "components":
        pipe = root / "pipeline-root"
        if not pipe.exists():
            (pipe).mkdir()
            shutil.copytree(f8.base_dir, pipe / "transformer")
        build_components("fp8", pipe, root / "components-out", from_bf16=True)
        return root / "components-out" / "transformer"
    elif kind == "sglang-fp8":
        sglang_fp8(f8, out)
    elif kind == "sglang-nvfp4":
        sglang_nvfp4(f4, out, pattern_preset="flux1-nvfp4")
    elif kind == "sglang-nvfp4-no-preset":
        sglang_nvfp4(f4, out)
    elif kind == "wan-fp8-export":
        w8 = flux["wan-fp8"]
        build_fp8_transformer(out, modelopt_hf_dir=w8.hf_dir, modelopt_backbone_ckpt=w8.backbone, base_transformer_dir=w8.base_dir)
    elif kind == "wan-fp8-bf16":
        build_fp8_transformer(out, from_bf16=True, base_transformer_dir=flux["wan-fp8"].base_dir)
    elif kind == "wan-nvfp4-bf16":
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux["wan-fp8"].base_dir)
    elif kind == "wan-mixed-vllm-omni":
        build_mixed_transformer(out, flux["wan-fp8"].base_dir, policy={"fp8": ["attn"], "nvfp4": ["ffn"]}, target="vllm-omni")
    elif kind == "wan-sglang-fp8":
        sglang_fp8(flux["wan-fp8"], out)
    elif kind == "qwen-image-nvfp4-export":
        q4 = flux["qwen-image-nvfp4"]
        build_nvfp4_transformer(out, modelopt_hf_dir=q4.hf_dir, base_transformer_dir=q4.base_dir, target="sglang")
    elif kind == "qwen-image-nvfp4-export-fit":
        q4 = flux["qwen-image-nvfp4"]
        build_nvfp4_transformer(out, modelopt_hf_dir=q4.hf_dir, base_transformer_dir=q4.base_dir, fit_target=True)
    elif kind == "qwen-image-nvfp4-bf16-fit":
        build_nvfp4_transformer(out, from_bf16=True, base_transformer_dir=flux["qwen-image-nvfp4"].base_dir, fit_target=True)
    elif kind == "qwen-image-sglang-nvfp4":
        sglang_nvfp4(flux["qwen-image-nvfp4"], out)
    else:
        raise KeyError(kind)
    return out
