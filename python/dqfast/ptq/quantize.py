"""ModelOpt post-training quantization of a diffusers transformer, following the
steps of ModelOpt's diffusion example (``examples/diffusers/quantization/quantize.py``):

1. recipe: the diffusers FP8 / NVFP4 preset (FLUX gets the FP8-MHA NVFP4 preset),
   NVFP4 block size 16, ``--quantize-mha`` entry, the model's ``block_range`` rules
   (Qwen-Image), algorithm forced to ``max`` (the example's default ``--quant-algo``),
   ``trt_high_precision_dtype`` set on every quantizer entry (example default "Half");
2. ``mtq.quantize`` with a forward loop (the denoising-loop calibration of
   ``calibration.py``, or a list of forward-kwargs batches);
3. ``mtq.disable_quantizer`` with the model's filter (``dqfast.presets`` ``ptq_disabled``);
4. attention/conv fix-up (example's ``check_conv_and_mha``): attention BMM/softmax
   quantizers off unless ``quantize_mha`` and head size % 16 == 0; Conv1d/Conv2d
   quantizers off for NVFP4.

torch, diffusers and modelopt are imported inside the functions so that
``import dqfast.ptq`` works without them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from dqfast.errors import PlanError

from .presets import FP8_RECIPE, NVFP4_RECIPE, PtqPreset, compile_filter, get_preset

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
    block_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The ``mtq.quantize`` config the diffusion example would build for ``algo``.

    ``block_counts`` (module list name -> length) sizes the preset's ``block_range`` rules.
    """
    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    if algo not in ("fp8", "nvfp4"):
        raise PlanError(f"--algo (algo=): unknown algo {algo!r}: expected 'fp8' or 'nvfp4'")
    recipe = preset.recipe(algo) if preset else (FP8_RECIPE if algo == "fp8" else NVFP4_RECIPE)
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
    if preset is not None and preset.block_range is not None:
        br = preset.block_range
        count = (block_counts or {}).get(br.block_module)
        if count is None:
            raise PlanError(f"preset {preset.name!r} needs the length of {br.block_module!r}")
        entries.extend(br.quant_cfg_rules(count))
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

        attention_types: tuple[Any, ...] = (Attention, AttentionModuleMixin)
    except ImportError:  # older diffusers
        from diffusers.models.attention_processor import Attention

        attention_types = (Attention,)

    module: Any  # torch modules that grow quantizer attributes
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
    calib: Any = None,
    forward_loop: Callable[[Any], None] | None = None,
) -> Any:
    """Quantize ``transformer`` in place with ModelOpt and return it.

    ``filter``: a ``dqfast.presets`` model type or alias (``flux``/``flux1``, ``flux2``,
    ``wan``, ``qwen-image``, ``hunyuan-video``, ``none``); ``None`` applies no model filter
    and no block range. ``extra_disable``: more regexes.
    Calibration data, first match wins: ``forward_loop(model)`` (runs the model itself);
    ``calib`` (a :class:`~dqfast.ptq.calibration.CalibConfig`: denoising-loop calibration
    with prompt conditioning); ``calib_batches`` (forward-kwargs dicts); else two random
    batches.
    """
    import modelopt.torch.quantization as mtq
    import torch

    from .calibration import CalibConfig, calibrate_denoising, random_calibration_batches

    torch.manual_seed(seed)
    preset = get_preset(filter) if filter is not None else None
    config = build_quant_config(algo, preset, quantize_mha=quantize_mha, block_counts=_block_counts(transformer))

    loop: Callable[[Any], None]
    if forward_loop is not None:
        loop = forward_loop
    elif calib is not None:
        if not isinstance(calib, CalibConfig):
            raise TypeError(f"calib must be a CalibConfig, not {type(calib).__name__}")

        def loop(model: Any) -> None:
            calibrate_denoising({"transformer": model}, calib)
    else:
        batches = list(calib_batches) if calib_batches is not None else random_calibration_batches(transformer, 2, seed)
        if not batches:
            raise PlanError("calib_batches is empty: max calibration needs at least one batch")

        def loop(model: Any) -> None:
            for batch in batches:
                model(**batch)

    transformer.eval()
    with torch.no_grad():
        mtq.quantize(transformer, config, loop)

    patterns = list(extra_disable)
    if preset is not None:
        patterns += preset.disable_patterns()
    if patterns:
        mtq.disable_quantizer(transformer, compile_filter(patterns))
    _disable_conv_and_mha(transformer, is_fp4=(algo == "nvfp4"), quantize_mha=quantize_mha)
    return transformer


def save_backbone(transformer: Any, path: str | Path) -> Path:
    """``mto.save`` the quantized transformer (weights, ``_amax`` and ModelOpt state)."""
    import modelopt.torch.opt as mto

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mto.save(transformer, str(path))
    return path


def export_hf(transformer: Any, hf_dir: str | Path) -> Path:
    """``export_hf_checkpoint`` of one transformer into ``hf_dir`` (config.json + safetensors).

    The export converts the module's weights in place: run it after every calibration
    that still needs this module in its float form.
    """
    from modelopt.torch.export import export_hf_checkpoint

    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    export_hf_checkpoint(transformer, export_dir=str(hf_dir))
    return hf_dir


def save(
    transformer: Any,
    out_dir: str | Path,
    component: str = "transformer",
    backbone_file: str = "backbone.pt",
) -> tuple[Path, Path]:
    """Write ``<out>/ckpt/<backbone_file>`` (``mto.save``) then ``<out>/hf/<component>/``
    (``export_hf_checkpoint``), in the example's order: the export may rewrite modules.

    ModelOpt's example (0.44 and later) names the file after the backbone
    (``transformer.pt``, ``transformer_2.pt``); ``run_ptq`` does that. The default
    ``backbone.pt`` is the older example's single-backbone name.
    Returns (backbone_path, hf_component_dir).
    """
    out = Path(out_dir)
    backbone = save_backbone(transformer, out / "ckpt" / backbone_file)
    hf_dir = export_hf(transformer, out / "hf" / component)
    return backbone, hf_dir
