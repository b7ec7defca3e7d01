"""Small helpers shared by the test modules."""

from __future__ import annotations

from pathlib import Path


def load_dir(d: str | Path) -> dict:
    """Every tensor of a checkpoint directory (all shards), via safetensors.torch."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
