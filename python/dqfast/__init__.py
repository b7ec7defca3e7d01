"""dqfast: fast, memory-bounded, bit-exact FP8/NVFP4 conversion of diffusion-transformer checkpoints.

The core (``dqfast._core``, Rust) streams safetensors through memory maps; this package decides what
to write. Importing it needs neither torch nor modelopt.
"""

from dqfast._core import __version__
from dqfast.errors import (
    CheckpointError,
    DqfastError,
    DqfastIOError,
    InternalError,
    OutputExistsError,
    PlanError,
    UnsafeOutputError,
)
from dqfast.fp8 import build_fp8_transformer
from dqfast.models import PRESETS, ModelPreset, get_preset
from dqfast.plan import BuildReport, ModuleDecision
from dqfast.quant_config import QuantConfig, resolve_quant_config
from dqfast.reader import CheckpointInfo, TensorMeta, open_checkpoint, read_tensor

__all__ = [
    "__version__",
    "build_fp8_transformer",
    "BuildReport",
    "ModuleDecision",
    "open_checkpoint",
    "read_tensor",
    "CheckpointInfo",
    "TensorMeta",
    "resolve_quant_config",
    "QuantConfig",
    "PRESETS",
    "ModelPreset",
    "get_preset",
    "DqfastError",
    "CheckpointError",
    "PlanError",
    "UnsafeOutputError",
    "OutputExistsError",
    "DqfastIOError",
    "InternalError",
]
