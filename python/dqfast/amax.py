"""Calibrated maxima (amax) per module, from a ModelOpt ``backbone.pt`` or a safetensors sidecar.

A sidecar holds tensors named like ModelOpt's state dict (``<module>.weight_quantizer._amax``,
``<module>.input_quantizer._amax``) and needs neither torch nor pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dqfast._files import check_regular, typed_error
from dqfast.backbone import AmaxPair, read_amax
from dqfast.errors import CheckpointError
from dqfast.reader import FLOAT_DTYPES, open_checkpoint, read_tensor, to_float32

__all__ = ["AmaxPair", "load_amax", "WEIGHT_AMAX", "INPUT_AMAX"]

WEIGHT_AMAX = ".weight_quantizer._amax"
INPUT_AMAX = ".input_quantizer._amax"


def load_amax(path: str | os.PathLike[str]) -> dict[str, AmaxPair]:
    """Module name -> (weight amax, input amax) as float32 arrays."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return read_amax(p)
    check_regular(p, "amax sidecar", CheckpointError)
    info = open_checkpoint(p)
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, meta in info.tensors.items():
        for suffix, field in ((WEIGHT_AMAX, "weight"), (INPUT_AMAX, "input")):
            if name.endswith(suffix):
                if meta.dtype not in FLOAT_DTYPES:
                    raise typed_error(CheckpointError, f"{p}: tensor '{name}': amax has dtype {meta.dtype}, not a float dtype", p, name)
                # Decoded by dtype (FP8 bytes are codes, not values).
                value = to_float32(meta.dtype, read_tensor(p, name, raw=True))
                found.setdefault(name[: -len(suffix)], {})[field] = value
    return {m: AmaxPair(f.get("weight"), f.get("input")) for m, f in found.items()}
