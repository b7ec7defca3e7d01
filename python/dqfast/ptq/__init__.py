"""ModelOpt PTQ bridge: quantize a diffusers transformer with NVIDIA ModelOpt and
write the two artefacts dqfast converts from (``backbone.pt`` and the HF export).

Importing this package needs neither torch nor modelopt; the functions import them.
"""

from .calibration import random_calibration_batches
from .presets import PRESETS, PtqPreset, get_preset
from .quantize import build_quant_config, quantize, save

__all__ = [
    "PRESETS",
    "PtqPreset",
    "build_quant_config",
    "get_preset",
    "quantize",
    "random_calibration_batches",
    "save",
]
