"""Byte-for-byte comparison of two transformer directories: files, tensors, config, index, metadata."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


def _tensors(d: Path) -> tuple[dict[str, bytes], dict[str, tuple[str, tuple[int, ...]]], dict[str, dict[str, str]]]:
    import torch

    data, meta, shard_md = {}, {}, {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            shard_md[f.name] = dict(h.metadata() or {})
            for n in h.keys():
                t = h.get_tensor(n).contiguous()
                data[n] = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                meta[n] = (str(t.dtype).replace("torch.", ""), tuple(t.shape))
    return data, meta, shard_md


def _dict_diff(a: dict, b: dict) -> dict[str, tuple]:
    return {
        k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")
    }


def compare_dirs(a: Path, b: Path) -> dict:
    """Differences of ``a`` (dqfast) against ``b`` (the reference). Empty values mean equal."""
    a, b = Path(a), Path(b)
    fa = {p.name for p in a.iterdir()}
    fb = {p.name for p in b.iterdir()}
    da, ma, mda = _tensors(a)
    db, mb, mdb = _tensors(b)
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    qa = ca.pop("quantization_config", {}) or {}
    qb = cb.pop("quantization_config", {}) or {}
    ia, ib = set(qa.pop("ignore", []) or []), set(qb.pop("ignore", []) or [])
    common = set(da) & set(db)
    out = {
        "files_only_dqfast": sorted(fa - fb),
        "files_only_reference": sorted(fb - fa),
        "tensors_only_dqfast": sorted(set(da) - set(db)),
        "tensors_only_reference": sorted(set(db) - set(da)),
        "tensors_dtype_shape_differ": sorted(n for n in common if ma[n] != mb[n]),
        "tensors_bytes_differ": sorted(n for n in common if ma[n] == mb[n] and da[n] != db[n]),
        "config_differ": _dict_diff(ca, cb),
        "quant_config_differ": _dict_diff(qa, qb),
        "ignore_only_dqfast": sorted(ia - ib),
        "ignore_only_reference": sorted(ib - ia),
    }
    # Shard metadata: keys present on one side only (per shard file name pair, first shards).
    if mda and mdb:
        first_a, first_b = mda[sorted(mda)[0]], mdb[sorted(mdb)[0]]
        out["metadata_keys_only_dqfast"] = sorted(set(first_a) - set(first_b))
        out["metadata_keys_only_reference"] = sorted(set(first_b) - set(first_a))
        out["metadata_values_differ"] = sorted(k for k in set(first_a) & set(first_b) if first_a[k] != first_b[k])
    idx_b = sorted(b.glob("*.index.json"))
    idx_a = sorted(a.glob("*.index.json"))
    if idx_a and idx_b:
        wa = json.loads(idx_a[0].read_text())
        wb = json.loads(idx_b[0].read_text())
        out["index_differ"] = _dict_diff(
            {"weight_map": wa.get("weight_map"), "metadata": wa.get("metadata")},
            {"weight_map": wb.get("weight_map"), "metadata": wb.get("metadata")},
        )
    return out
