"""Import-time shims that let the engines' own code run on a CPU-only machine.

Each one is listed and justified in docs/compat.md. A shim replaces a GPU-only *choice* (which
GEMM kernel, which attention backend); none touches config parsing, module construction,
parameter creation or weight loading, which is what the compat suite tests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

_init_method = ""


def world_group() -> str:
    """A one-process gloo WORLD process group, created once per test session by whichever engine
    comes first (both engines' own group set-up then skips creating one); its init method."""
    import torch.distributed as dist

    global _init_method
    if not dist.is_initialized():
        _init_method = f"file://{Path(tempfile.mkdtemp(prefix='dqfast-compat-')) / 'dist'}"
        dist.init_process_group(backend="gloo", init_method=_init_method, world_size=1, rank=0)
    return _init_method
