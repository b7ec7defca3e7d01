"""dqfast: fast, memory-bounded, bit-exact FP8/NVFP4 conversion of diffusion-transformer checkpoints.

The core (``dqfast._core``, Rust) streams safetensors through memory maps; this package decides what
to write. Importing it needs neither torch nor modelopt (nor ray: ``run_batch`` imports it only for
``executor="ray"``). Kernels for other converters: :mod:`dqfast.ops`; streaming I/O:
:mod:`dqfast.stream`. Every name below is documented with an example in ``docs/api.md``.
"""

from dqfast import ops, stream
from dqfast._core import __version__
from dqfast.batch import BatchSummary, Manifest, ManifestError, load_manifest, run_batch
from dqfast.components import ComponentsReport, build_components
from dqfast.errors import (
    CheckpointError,
    DqfastError,
    DqfastIOError,
    InternalError,
    OutputExistsError,
    PlanError,
    TargetError,
    UnsafeOutputError,
)
from dqfast.fp8 import build_fp8_transformer
from dqfast.mixed import build_mixed_transformer
from dqfast.models import PRESETS, ModelPreset, get_preset
from dqfast.nvfp4 import build_nvfp4_transformer
from dqfast.plan import BuildReport, ModuleDecision
from dqfast.quant_config import QuantConfig, resolve_quant_config
from dqfast.reader import CheckpointInfo, TensorMeta, open_checkpoint, read_tensor
from dqfast.weight_only import build_weight_only_transformer

__all__ = [
    "__version__",
    "build_fp8_transformer",
    "build_nvfp4_transformer",
    "build_mixed_transformer",
    "build_weight_only_transformer",
    "build_components",
    "ComponentsReport",
    "run_batch",
    "load_manifest",
    "Manifest",
    "BatchSummary",
    "ops",
    "stream",
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
    "TargetError",
    "UnsafeOutputError",
    "OutputExistsError",
    "DqfastIOError",
    "InternalError",
    "ManifestError",
]
