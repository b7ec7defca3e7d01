"""Small helpers shared by the test modules."""

from __future__ import annotations

import json
from pathlib import Path


def assert_safetensors_readable(d: str | Path) -> int:
    """Every ``*.safetensors`` file under ``d`` (recursively: pipelines and batch outputs hold
    several components) opens with the ``safetensors`` library and every tensor in it loads; each
    index json lists exactly the tensors of its shards. dqfast promises that every file it writes
    is readable by safetensors (issue 11): call this on the output of every build test.
    Returns the number of files checked (> 0)."""
    from safetensors import safe_open

    d = Path(d)
    files = sorted(d.rglob("*.safetensors")) if d.is_dir() else [d]
    assert files, f"{d}: no .safetensors file"
    names: dict[Path, set[str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            keys = set(h.keys())
            for k in keys:
                h.get_tensor(k)
        names[f] = keys
    for idx in d.rglob("*.safetensors.index.json") if d.is_dir() else []:
        wm = json.loads(idx.read_text())["weight_map"]
        assert wm, f"{idx}: empty weight_map"
        listed: dict[str, set[str]] = {}
        for t, shard in wm.items():
            listed.setdefault(shard, set()).add(t)
        for shard, ts in listed.items():
            assert names.get(idx.parent / shard) == ts, f"{idx}: {shard} holds other tensors than the index says"
        stray = {f.name for f in files if f.parent == idx.parent} - set(listed)
        assert not stray, f"{idx}: shards {stray} not in the index"
    return len(files)


def load_dir(d: str | Path) -> dict:
    """Every tensor of a checkpoint directory (all shards), via safetensors.torch, after checking
    that every file under it is readable by safetensors."""
    from safetensors.torch import load_file

    assert_safetensors_readable(d)
    out: dict = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
