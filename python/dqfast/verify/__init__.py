"""Quality checks for quantized checkpoints: per-layer weight error and denoising trajectory."""
from .layers import layer_errors
from .trajectory import TrajectoryResult, trajectory

__all__ = ["TrajectoryResult", "layer_errors", "trajectory"]
