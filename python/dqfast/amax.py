"""Calibrated maxima (amax) per module, from a ModelOpt ``backbone.pt`` or a safetensors sidecar.

A sidecar holds tensors named like ModelOpt's state dict (``<module>.weight_quantizer._amax``,
``<module>.input_quantizer._amax``) and needs neither torch nor pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dqfast.backbone import AmaxPair, read_amax
from dqfast.reader import open_checkpoint, read_tensor

__all__ = ["AmaxPair", "load_amax", "WEIGHT_AMAX", "INPUT_AMAX"]

WEIGHT_AMAX = ".weight_quantizer._amax"
INPUT_AMAX = ".input_quantizer._amax"


def load_amax(path: str | os.PathLike[str]) -> dict[str, AmaxPair]:
    """Module name -> (weight amax, input amax) as float32 arrays."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return read_amax(p)
    info = open_checkpoint(p)
    found: dict[str, dict[str, np.ndarray]] = {}
    for name in info.tensors:
        for suffix, field in ((WEIGHT_AMAX, "weight"), (INPUT_AMAX, "input")):
            if name.endswith(suffix):
                value = np.asarray(read_tensor(p, name), dtype=np.float32)
                found.setdefault(name[: -len(suffix)], {})[field] = value
    return {m: AmaxPair(f.get("weight"), f.get("input")) for m, f in found.items()}
