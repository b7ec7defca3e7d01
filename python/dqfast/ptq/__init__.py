"""ModelOpt PTQ bridge: quantize diffusers transformers with NVIDIA ModelOpt, write what its
diffusion example writes (``<out>/ckpt/<component>.pt`` and the HF export), and hand that to
the dqfast builders and verifier (``run_ptq``).

Importing this package needs neither torch nor modelopt; the functions import them.
"""

from .calibration import BUILTIN_PROMPTS, CalibConfig, calibrate_denoising, load_prompts, random_calibration_batches
from .flow import ComponentResult, PtqResult, load_transformer, run_ptq
from .presets import PRESETS, BlockRange, PtqPreset, get_preset
from .quantize import build_quant_config, export_hf, quantize, save, save_backbone

__all__ = [
    "BUILTIN_PROMPTS",
    "PRESETS",
    "BlockRange",
    "CalibConfig",
    "ComponentResult",
    "PtqPreset",
    "PtqResult",
    "build_quant_config",
    "calibrate_denoising",
    "export_hf",
    "get_preset",
    "load_prompts",
    "load_transformer",
    "quantize",
    "random_calibration_batches",
    "run_ptq",
    "save",
    "save_backbone",
]
