"""Quality checks for quantized checkpoints: per-layer weight error and denoising trajectory."""

from .checkpoint import summarize_layers, verify_checkpoint
from .layers import layer_errors
from .trajectory import TrajectoryResult, trajectory

__all__ = ["TrajectoryResult", "layer_errors", "summarize_layers", "trajectory", "verify_checkpoint"]
