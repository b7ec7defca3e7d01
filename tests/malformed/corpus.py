"""A corpus of malformed build inputs, generated on demand (no binary files in git).

Each :class:`Case` writes its inputs under a directory and returns the keyword arguments of
``dqfast.build_fp8_transformer``; the build must raise ``error`` (a typed dqfast error) with a
message matching ``match`` and leave nothing at the output path.

The files are written byte by byte here (not with a safetensors library) so that they can be
wrong in exactly one way.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dqfast.errors import CheckpointError, DqfastError, PlanError

ROWS, COLS = 32, 64
WEIGHT = "blocks.0.proj.weight"
MODULE = "blocks.0.proj"
E4M3_MAX = 448.0


def bf16_bytes(a: np.ndarray) -> bytes:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2").tobytes()


def e4m3_bytes(a: np.ndarray) -> bytes:
    """Crude float -> e4m3 codes (values already in range); exactness is irrelevant here."""
    codes = np.clip(np.round(np.abs(a) * 8), 0, 0x7E).astype(np.uint8)
    return (codes | ((a < 0).astype(np.uint8) << 7)).tobytes()


def header_json(entries: list[tuple[str, str, list[int], int, int]], metadata: dict[str, str] | None = None) -> str:
    """Header text from (name, dtype, shape, begin, end) — duplicates kept, order kept."""
    parts = []
    if metadata is not None:
        parts.append(f'"__metadata__":{json.dumps(metadata)}')
    for name, dtype, shape, b, e in entries:
        parts.append(f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":{json.dumps(shape)},"data_offsets":[{b},{e}]}}')
    return "{" + ",".join(parts) + "}"


def raw_file(path: Path, header: bytes | str, data: bytes = b"", length: int | None = None) -> Path:
    h = header.encode() if isinstance(header, str) else header
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file: tensors in the given order, contiguous offsets."""
    entries, data, off = [], b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        entries.append((name, dtype, shape, off, off + len(raw)))
        data += raw
        off += len(raw)
    hdr = header_json(entries, metadata)
    hdr += " " * (-(8 + len(hdr)) % 8)
    return raw_file(path, hdr, data)


def weight(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, cols)) * 0.02).astype(np.float32)


def base_tensors(w: np.ndarray | None = None) -> dict[str, tuple[str, list[int], bytes]]:
    w = weight() if w is None else w
    return {
        WEIGHT: ("BF16", list(w.shape), bf16_bytes(w)),
        f"{MODULE}.bias": ("BF16", [w.shape[0]], bf16_bytes(np.zeros(w.shape[0], np.float32))),
        "norm.weight": ("BF16", [COLS], bf16_bytes(np.ones(COLS, np.float32))),
    }


def write_base(d: Path, tensors: dict[str, tuple[str, list[int], bytes]] | None = None) -> Path:
    """A BF16 base transformer directory (config.json + one safetensors file)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"_class_name": "TinyTransformer"}))
    write_safetensors(d / "diffusion_pytorch_model.safetensors", base_tensors() if tensors is None else tensors)
    return d


def from_bf16_kwargs(base: Path) -> dict[str, Any]:
    return {"base_transformer_dir": base, "from_bf16": True, "model_type": "none"}


def write_export(root: Path, *, weight_amax: Any = None, input_amax: Any = 0.5, export_rows: int = ROWS) -> dict[str, Any]:
    """A ModelOpt-FP8-export-like directory (hf/transformer), an amax sidecar and a BF16 base;
    returns calibrated-build kwargs."""
    w = weight(rows=export_rows)
    wa = float(np.abs(w).max()) if weight_amax is None else weight_amax
    hf = root / "hf" / "transformer"
    hf.mkdir(parents=True, exist_ok=True)
    qc = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": [], "producer": {"name": "modelopt"}}
    (hf / "config.json").write_text(json.dumps({"_class_name": "TinyTransformer", "quantization_config": qc}))
    ws = np.float32(np.float32(wa if np.ndim(wa) == 0 else 1.0) / np.float32(E4M3_MAX)) if np.all(np.isfinite(wa)) else np.float32(1)
    write_safetensors(
        hf / "diffusion_pytorch_model.safetensors",
        {
            WEIGHT: ("F8_E4M3", [export_rows, COLS], e4m3_bytes(w / max(float(ws), 1e-12))),
            f"{MODULE}.weight_scale": ("F32", [], np.float32(ws).tobytes()),
            f"{MODULE}.input_scale": ("F32", [], np.float32(0.5 / E4M3_MAX).tobytes()),
            f"{MODULE}.bias": ("BF16", [export_rows], bf16_bytes(np.zeros(export_rows, np.float32))),
        },
    )
    amax = {}
    for key, v in ((f"{MODULE}.weight_quantizer._amax", wa), (f"{MODULE}.input_quantizer._amax", input_amax)):
        if v is None:
            continue
        a = np.asarray(v, dtype=np.float32)
        amax[key] = ("F32", list(a.shape), a.tobytes())
    sidecar = write_safetensors(root / "ckpt" / "amax.safetensors", amax)
    base = write_base(root / "base")
    return {"modelopt_hf_dir": root / "hf", "modelopt_backbone_ckpt": sidecar, "base_transformer_dir": base, "model_type": "none"}


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], dict[str, Any]]
    error: type[DqfastError]
    match: str


def _bad_base_file(builder: Callable[[Path], None]) -> Callable[[Path], dict[str, Any]]:
    """A base directory whose safetensors file is written by ``builder``."""

    def make(root: Path) -> dict[str, Any]:
        d = root / "base"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"_class_name": "TinyTransformer"}))
        builder(d / "diffusion_pytorch_model.safetensors")
        return from_bf16_kwargs(d)

    return make


def _valid_file_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        p = write_safetensors(Path(t) / "x.safetensors", base_tensors())
        return p.read_bytes()


def _truncate(n: int) -> Callable[[Path], dict[str, Any]]:
    def w(p: Path) -> None:
        b = _valid_file_bytes()
        p.write_bytes(b[:n])

    return _bad_base_file(w)


def _header_then(hdr: str | bytes, data: bytes = b"", length: int | None = None) -> Callable[[Path], dict[str, Any]]:
    def w(p: Path) -> None:
        raw_file(p, hdr, data, length)

    return _bad_base_file(w)


def _u8(name: str, shape: list[int], b: int, e: int) -> tuple[str, str, list[int], int, int]:
    return (name, "U8", shape, b, e)


def _sharded(
    index: Any,
    shards: dict[str, dict[str, tuple[str, list[int], bytes]]],
    index_name: str = "diffusion_pytorch_model.safetensors.index.json",
) -> Callable[[Path], dict[str, Any]]:
    def make(root: Path) -> dict[str, Any]:
        d = root / "base"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"_class_name": "TinyTransformer"}))
        for fname, ts in shards.items():
            write_safetensors(d / fname, ts)
        if index is not None:
            (d / index_name).write_text(index if isinstance(index, str) else json.dumps(index))
        return from_bf16_kwargs(d)

    return make


_T = base_tensors()
_A = {WEIGHT: _T[WEIGHT]}
_B = {k: v for k, v in _T.items() if k != WEIGHT}
S1, S2 = "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"
_GOOD_MAP = {**{k: S1 for k in _A}, **{k: S2 for k in _B}}


def _nan_weight(value: float) -> dict[str, tuple[str, list[int], bytes]]:
    w = weight()
    w[3, 5] = value
    return base_tensors(w)


def _export(**kw: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda root: write_export(root, **kw)


def _export_shape_mismatch(root: Path) -> dict[str, Any]:
    kw = write_export(root)
    # The base's module has fewer rows than the export's: a fallback cannot take it.
    write_base(root / "base", base_tensors(weight(rows=ROWS // 2)))
    return {**kw, "fallback": [r"blocks\.0\.proj"]}


def _export_wrong_algo(root: Path) -> dict[str, Any]:
    kw = write_export(root)
    cfg_p = root / "hf" / "transformer" / "config.json"
    cfg = json.loads(cfg_p.read_text())
    cfg["quantization_config"]["quant_algo"] = "NVFP4"
    cfg_p.write_text(json.dumps(cfg))
    return kw


def _metadata_key(root: Path) -> dict[str, Any]:
    return _bad_base_file(lambda p: (raw_file(p, '{"__metadata__":{"k":1}}'), None)[1])(root)


DATA = b"\0" * 8

CASES: list[Case] = [
    # ---- file and header framing
    Case("empty-file", _bad_base_file(lambda p: p.write_bytes(b"")), CheckpointError, "too short"),
    Case("seven-bytes", _bad_base_file(lambda p: p.write_bytes(b"\x10\0\0\0\0\0\0")), CheckpointError, "too short"),
    Case("header-length-past-eof", _header_then("{}", length=4096), CheckpointError, "past the end"),
    Case("header-length-huge", _header_then("{}", length=1 << 62), CheckpointError, "limit"),
    Case("truncated-header", _truncate(60), CheckpointError, "past the end"),
    Case("truncated-data", _truncate(-7), CheckpointError, "past the data section|data section holds"),
    Case(
        "trailing-bytes",
        lambda root: _bad_base_file(lambda p: p.write_bytes(_valid_file_bytes() + b"xx"))(root),
        CheckpointError,
        "data section holds",
    ),
    Case("non-utf8-header", _header_then(b'{"\xff\xfe":{}}'), CheckpointError, "not UTF-8"),
    Case("invalid-json", _header_then('{"a": {"dtype": "U8",'), CheckpointError, "not valid JSON"),
    Case("json-array-header", _header_then("[1, 2]"), CheckpointError, "start with"),
    Case("json-trailing-garbage", _header_then("{} {}"), CheckpointError, "not valid JSON"),
    # ---- tensor entries
    Case("unknown-dtype", _header_then(header_json([("w", "F4_QQ", [8], 0, 8)]), DATA), CheckpointError, "unknown dtype"),
    Case("shape-byte-range-mismatch", _header_then(header_json([("w", "F32", [4], 0, 8)]), DATA), CheckpointError, "needs 16 bytes"),
    Case("negative-shape", _header_then(header_json([("w", "U8", [-8], 0, 8)]), DATA), CheckpointError, "non-negative"),
    Case("float-shape", _header_then(header_json([("w", "U8", [8.0], 0, 8)]), DATA), CheckpointError, "non-negative"),
    Case("terabyte-tensor", _header_then(header_json([_u8("w", [1 << 40], 0, 1 << 40)]), DATA), CheckpointError, "past the data section"),
    Case(
        "shape-overflow", _header_then(header_json([("w", "F64", [1 << 32, 1 << 32, 1 << 32], 0, 8)]), DATA), CheckpointError, "overflows"
    ),
    Case("overlapping-offsets", _header_then(header_json([_u8("a", [6], 0, 6), _u8("b", [4], 4, 8)]), DATA), CheckpointError, "overlap"),
    Case("gap-between-tensors", _header_then(header_json([_u8("a", [2], 0, 2), _u8("b", [4], 4, 8)]), DATA), CheckpointError, "gap"),
    Case("offsets-out-of-bounds", _header_then(header_json([_u8("a", [16], 0, 16)]), DATA), CheckpointError, "past the data section"),
    Case("offsets-reversed", _header_then(header_json([_u8("a", [0], 8, 0)]), DATA), CheckpointError, "end before"),
    Case(
        "offsets-three-entries",
        _header_then('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,4,8]}}', DATA),
        CheckpointError,
        "expected 2",
    ),
    Case(
        "offset-beyond-u64",
        _header_then('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,18446744073709551616]}}', DATA),
        CheckpointError,
        "not a valid offset",
    ),
    Case("duplicate-names", _header_then(header_json([_u8("a", [4], 0, 4), _u8("a", [4], 4, 8)]), DATA), CheckpointError, "twice"),
    Case(
        "unknown-entry-key",
        _header_then('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8],"x":1}}', DATA),
        CheckpointError,
        "unknown key",
    ),
    Case("metadata-not-string", _metadata_key, CheckpointError, "not a string"),
    # ---- sharded checkpoints
    Case("index-missing-shard", _sharded({"weight_map": {k: S1 for k in _T}}, {}), CheckpointError, "does not exist"),
    Case("index-invalid-json", _sharded("{weight_map: ", {S1: _A, S2: _B}), CheckpointError, "not valid JSON"),
    Case("index-no-weight-map", _sharded({"metadata": {}}, {S1: _A, S2: _B}), CheckpointError, "weight_map"),
    Case(
        "index-wrong-shard",
        _sharded({"weight_map": {**_GOOD_MAP, WEIGHT: S2, "norm.weight": S1}}, {S1: _A, S2: _B}),
        CheckpointError,
        "but it is in",
    ),
    Case(
        "index-names-absent-tensor",
        _sharded({"weight_map": {**_GOOD_MAP, "ghost.weight": S1}}, {S1: _A, S2: _B}),
        CheckpointError,
        "does not contain",
    ),
    Case(
        "index-omits-tensor",
        _sharded({"weight_map": {k: v for k, v in _GOOD_MAP.items() if k != "norm.weight"}}, {S1: _A, S2: _B}),
        CheckpointError,
        "not in the weight_map",
    ),
    Case(
        "index-path-traversal",
        _sharded({"weight_map": {**_GOOD_MAP, WEIGHT: "../" + S1}}, {S1: _A, S2: _B}),
        CheckpointError,
        "not a plain file name",
    ),
    Case("tensor-in-two-shards", _sharded({"weight_map": _GOOD_MAP}, {S1: _A, S2: {**_B, **_A}}), CheckpointError, "also present"),
    Case("shards-without-index", _sharded(None, {S1: _A, S2: _B}), CheckpointError, "no index json"),
    # ---- values
    Case("weight-nan", lambda root: from_bf16_kwargs(write_base(root / "base", _nan_weight(float("nan")))), CheckpointError, "NaN"),
    Case("weight-inf", lambda root: from_bf16_kwargs(write_base(root / "base", _nan_weight(float("inf")))), CheckpointError, "inf"),
    Case("weight-amax-nan", _export(weight_amax=float("nan")), PlanError, "finite and > 0"),
    Case("weight-amax-inf", _export(weight_amax=float("inf")), PlanError, "finite and > 0"),
    Case("weight-amax-zero", _export(weight_amax=0.0), PlanError, "finite and > 0"),
    Case("weight-amax-negative", _export(weight_amax=-1.0), PlanError, "finite and > 0"),
    Case("input-amax-nan", _export(input_amax=float("nan")), PlanError, "finite and > 0"),
    Case("input-amax-negative", _export(input_amax=-0.5), PlanError, "finite and > 0"),
    Case("amax-wrong-shape", _export(weight_amax=np.full(ROWS, 0.05, np.float32)), PlanError, "per-tensor"),
    Case("input-amax-missing", _export(input_amax=None), PlanError, "input amax"),
    Case("export-vs-base-shape", _export_shape_mismatch, PlanError, "does not match"),
    Case("export-wrong-quant-algo", _export_wrong_algo, PlanError, "quant_algo is NVFP4"),
]
