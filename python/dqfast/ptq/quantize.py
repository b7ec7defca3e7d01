"""ModelOpt post-training quantization of a diffusers transformer, following the
steps of ModelOpt's diffusion example (``examples/diffusers/quantization/quantize.py``):

1. recipe: the diffusers FP8 / NVFP4 preset (FLUX gets the FP8-MHA NVFP4 preset),
   algorithm forced to ``max`` (the example's default ``--quant-algo``),
   ``trt_high_precision_dtype`` set on every quantizer entry (example default "Half");
2. ``mtq.quantize`` with a forward loop over the calibration batches;
3. ``mtq.disable_quantizer`` with the model's filter (``presets.py``);
4. attention/conv fix-up (example's ``check_conv_and_mha``): attention BMM/softmax
   quantizers off unless ``quantize_mha`` and head size % 16 == 0; Conv1d/Conv2d
   quantizers off for NVFP4.

torch, diffusers and modelopt are imported inside the functions so that
``import dqfast.ptq`` works without them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from .presets import PtqPreset, compile_filter, get_preset

Algo = Literal["fp8", "nvfp4"]

_ATTENTION_QUANTIZERS = (
    "q_bmm_quantizer",
    "k_bmm_quantizer",
    "v_bmm_quantizer",
    "softmax_quantizer",
    "bmm2_output_quantizer",
)


def build_quant_config(
    algo: Algo,
    preset: PtqPreset | None,
    quantize_mha: bool = False,
    block_size: int = 16,
    trt_high_precision_dtype: str = "Half",
) -> dict[str, Any]:
    """The ``mtq.quantize`` config the diffusion example would build for ``algo``."""
    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    if algo == "fp8":
        recipe = (preset.fp8_recipe if preset else "configs/ptq/presets/diffusers/fp8")
    elif algo == "nvfp4":
        recipe = (preset.nvfp4_recipe if preset else "configs/ptq/presets/diffusers/nvfp4")
    else:
        raise ValueError(f"unknown algo {algo!r}: expected 'fp8' or 'nvfp4'")
    base = load_config(recipe, schema_type=QuantizeConfig).model_dump(exclude_unset=True)
    base = copy.deepcopy(base)

    entries: list[dict[str, Any]] = []
    for entry in base["quant_cfg"]:
        entry = dict(entry)
        cfg = entry.get("cfg")
        if algo == "nvfp4" and isinstance(cfg, dict) and "block_sizes" in cfg:
            entry["cfg"] = {**cfg, "block_sizes": {**cfg["block_sizes"], -1: block_size}}
        entries.append(entry)
    if quantize_mha:
        entries.append({"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}})
    for entry in entries:
        cfg = entry.get("cfg")
        if isinstance(cfg, dict) and "num_bits" in cfg and "trt_high_precision_dtype" not in cfg:
            cfg["trt_high_precision_dtype"] = trt_high_precision_dtype
    # The example replaces the recipe's algorithm (svdquant in nvfp4_fp8_mha) with --quant-algo.
    return {**base, "quant_cfg": entries, "algorithm": {"method": "max"}}


def _block_counts(transformer: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, child in transformer.named_children():
        if hasattr(child, "__len__"):
            counts[name] = len(child)
    return counts


def _disable_conv_and_mha(transformer: Any, is_fp4: bool, quantize_mha: bool) -> None:
    import torch

    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        attention_types: tuple[type, ...] = (Attention, AttentionModuleMixin)
    except ImportError:  # older diffusers
        from diffusers.models.attention_processor import Attention

        attention_types = (Attention,)

    for module in transformer.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) and is_fp4:
            for attr in ("weight_quantizer", "input_quantizer"):
                if hasattr(module, attr):
                    getattr(module, attr).disable()
        elif isinstance(module, attention_types) and hasattr(module, "heads"):
            head_size = int(module.inner_dim / module.heads)
            if not quantize_mha or head_size % 16 != 0:
                for attr in _ATTENTION_QUANTIZERS:
                    if hasattr(module, attr):
                        getattr(module, attr).disable()
                module._disable_fp8_mha = True
            else:
                module._disable_fp8_mha = False


def quantize(
    transformer: Any,
    algo: Algo,
    calib_batches: Iterable[dict[str, Any]] | None = None,
    filter: str | None = None,
    quantize_mha: bool = False,
    seed: int = 0,
    extra_disable: Iterable[str] = (),
) -> Any:
    """Quantize ``transformer`` in place with ModelOpt and return it.

    ``filter``: a preset name from ``dqfast.ptq.presets.PRESETS`` (``flux``, ``wan``,
    ``qwen-image``, ``hunyuan-video``, ``default``); ``None`` applies no model filter
    (every Linear the recipe covers stays quantized). ``extra_disable``: more regexes.
    ``calib_batches``: forward kwargs dicts; ``None`` uses two random batches.
    """
    import torch
    import modelopt.torch.quantization as mtq

    from .calibration import random_calibration_batches

    torch.manual_seed(seed)
    preset = get_preset(filter) if filter is not None else None
    config = build_quant_config(algo, preset, quantize_mha=quantize_mha)
    batches = list(calib_batches) if calib_batches is not None else random_calibration_batches(transformer, 2, seed)
    if not batches:
        raise ValueError("calib_batches is empty: max calibration needs at least one batch")

    def forward_loop(model: Any) -> None:
        for batch in batches:
            model(**batch)

    transformer.eval()
    with torch.no_grad():
        mtq.quantize(transformer, config, forward_loop)

    patterns = list(extra_disable)
    if preset is not None:
        patterns += preset.disable_patterns(_block_counts(transformer))
    if patterns:
        mtq.disable_quantizer(transformer, compile_filter(patterns))
    _disable_conv_and_mha(transformer, is_fp4=(algo == "nvfp4"), quantize_mha=quantize_mha)
    return transformer


def save(transformer: Any, out_dir: str | Path, component: str = "transformer") -> tuple[Path, Path]:
    """Write ``<out>/ckpt/backbone.pt`` (``mto.save``) then ``<out>/hf/<component>/``
    (``export_hf_checkpoint``), in the example's order: the export may rewrite modules.

    Returns (backbone_path, hf_component_dir).
    """
    import modelopt.torch.opt as mto
    from modelopt.torch.export import export_hf_checkpoint

    out = Path(out_dir)
    ckpt_dir = out / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    backbone = ckpt_dir / "backbone.pt"
    mto.save(transformer, str(backbone))
    hf_dir = out / "hf" / component
    hf_dir.mkdir(parents=True, exist_ok=True)
    export_hf_checkpoint(transformer, export_dir=str(hf_dir))
    return backbone, hf_dir
