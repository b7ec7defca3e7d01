"""ModelOpt PTQ bridge: quantize diffusers transformers with NVIDIA ModelOpt, write what its
diffusion example writes (``<out>/ckpt/<component>.pt`` and the HF export), and hand that to
the dqfast builders and verifier (``run_ptq``).

Importing this package needs neither torch nor modelopt; the functions import them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .calibration import BUILTIN_PROMPTS, CalibConfig, calibrate_denoising, load_prompts, random_calibration_batches
from .loading import load_transformer
from .presets import PRESETS, BlockRange, PtqPreset, get_preset
from .quantize import build_quant_config, export_hf, quantize, save, save_backbone

if TYPE_CHECKING:
    from .flow import ComponentResult, PtqResult, run_ptq

# The flow (which runs ``dqfast.verify``, which uses this package's calibration inputs) is
# imported on first use, so that ``dqfast.verify`` -> ``dqfast.ptq`` is no import cycle.
_FLOW = ("ComponentResult", "PtqResult", "run_ptq")


def __getattr__(name: str) -> Any:
    if name in _FLOW:
        from . import flow

        return getattr(flow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
