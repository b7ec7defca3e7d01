"""Synthetic diffusers transformer checkpoints with real tensor names and shapes.

Used by tests and benchmarks to stand in for multi-GB checkpoints that cannot be downloaded here.
Everything streams to disk: safetensors headers are computed up front from the shapes, then each
tensor is generated in chunks and written straight to its shard, so memory stays at about one
tensor (only the FP8 export needs a whole tensor, for its amax) whatever the model size.

Families:
- ``flux1``: ``FluxTransformer2DModel`` (FLUX.1-dev: hidden 3072 = 24 x 128, 19 double + 38 single).
- ``wan``: ``WanTransformer3DModel`` (Wan2.2-A14B: dim 5120 = 40 x 128, ffn 13824, 40 blocks).

Optionally also writes a ModelOpt-FP8-export-like directory (``hf/transformer``), the calibrated
maxima as a safetensors sidecar (``ckpt/amax.safetensors``) and, when torch is importable, a
``ckpt/backbone.pt`` in ``mto.save``'s layout holding only those maxima.

Weights are BF16 ``normal * 0.02``. Drawing fresh normals is slow in numpy (~30 M/s), so each
call draws a pool of 2^22 normals once and fills tensors from it in chunks at random offsets:
values are normal-distributed and deterministic in ``seed``, fast enough for 10+ GB checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from dqfast._core import E4M3_MAX  # 448, written once in dqfast-core
from dqfast.errors import PlanError

__all__ = ["TensorSpec", "SynthPaths", "family_config", "tensor_specs", "make_transformer", "FAMILIES"]

FAMILIES = ("flux1", "wan")
_POOL_BITS = 22
_CHUNK = 1 << 20  # elements per generated chunk
_DTYPE_SIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1}

ExportFilter = Literal["modelopt", "no-block-filter"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    #: "linear" (2-D weight of a Linear), "bias", "norm" (ones-centred), "other" (tables, convs).
    kind: str

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class SynthPaths:
    root: Path
    family: str
    config: dict[str, Any]
    base: Path  # BF16 transformer dir
    base_bytes: int
    export_root: Path | None = None  # ModelOpt-like export root (has transformer/)
    export: Path | None = None  # its transformer dir
    amax: Path | None = None  # safetensors sidecar of calibrated maxima
    backbone: Path | None = None  # backbone.pt with the maxima (None without torch)
    quantized_modules: list[str] = field(default_factory=list)
    ignored_modules: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- configs and names


def family_config(family: str, **overrides: Any) -> dict[str, Any]:
    """The diffusers config (without ``_class_name``) of the real model, with overrides."""
    if family == "flux1":
        cfg: dict[str, Any] = {
            "patch_size": 1,
            "in_channels": 64,
            "out_channels": None,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56],
        }
    elif family == "wan":
        cfg = {
            "patch_size": [1, 2, 2],
            "num_attention_heads": 40,
            "attention_head_dim": 128,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": 13824,
            "num_layers": 40,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024,
            "pos_embed_seq_len": None,
        }
    else:
        raise PlanError(f"unknown family '{family}' (known: {', '.join(FAMILIES)})")
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise PlanError(f"unknown {family} config keys: {sorted(unknown)}")
    cfg.update(overrides)
    return cfg


CLASS_NAMES = {"flux1": "FluxTransformer2DModel", "wan": "WanTransformer3DModel"}


def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list[TensorSpec]:
    specs = [TensorSpec(f"{prefix}.weight", (out_f, in_f), "linear")]
    if bias:
        specs.append(TensorSpec(f"{prefix}.bias", (out_f,), "bias"))
    return specs


def _flux_specs(c: dict[str, Any]) -> list[TensorSpec]:
    h = c["num_attention_heads"] * c["attention_head_dim"]
    d = c["attention_head_dim"]
    mlp = 4 * h  # diffusers' FLUX mlp_ratio is fixed at 4
    out_ch = c["out_channels"] or c["in_channels"]
    s: list[TensorSpec] = []
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if c["guidance_embeds"] else [])
    for e in embedders:
        s += _linear(f"time_text_embed.{e}.linear_1", h, 256) + _linear(f"time_text_embed.{e}.linear_2", h, h)
    s += _linear("time_text_embed.text_embedder.linear_1", h, c["pooled_projection_dim"])
    s += _linear("time_text_embed.text_embedder.linear_2", h, h)
    s += _linear("context_embedder", h, c["joint_attention_dim"]) + _linear("x_embedder", h, c["in_channels"])
    for i in range(c["num_layers"]):
        p = f"transformer_blocks.{i}"
        s += _linear(f"{p}.norm1.linear", 6 * h, h) + _linear(f"{p}.norm1_context.linear", 6 * h, h)
        s += [TensorSpec(f"{p}.attn.norm_q.weight", (d,), "norm"), TensorSpec(f"{p}.attn.norm_k.weight", (d,), "norm")]
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            s += _linear(f"{p}.attn.{n}", h, h)
        s += [TensorSpec(f"{p}.attn.norm_added_q.weight", (d,), "norm"), TensorSpec(f"{p}.attn.norm_added_k.weight", (d,), "norm")]
        for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            s += _linear(f"{p}.attn.{n}", h, h)
        for ff in ("ff", "ff_context"):
            s += _linear(f"{p}.{ff}.net.0.proj", mlp, h) + _linear(f"{p}.{ff}.net.2", h, mlp)
    for i in range(c["num_single_layers"]):
        p = f"single_transformer_blocks.{i}"
        s += _linear(f"{p}.norm.linear", 3 * h, h) + _linear(f"{p}.proj_mlp", mlp, h)
        s += _linear(f"{p}.proj_out", h, h + mlp)
        s += [TensorSpec(f"{p}.attn.norm_q.weight", (d,), "norm"), TensorSpec(f"{p}.attn.norm_k.weight", (d,), "norm")]
        for n in ("to_q", "to_k", "to_v"):
            s += _linear(f"{p}.attn.{n}", h, h)
    s += _linear("norm_out.linear", 2 * h, h)
    s += _linear("proj_out", c["patch_size"] ** 2 * out_ch, h)
    return s


def _wan_specs(c: dict[str, Any]) -> list[TensorSpec]:
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    pt, ph, pw = c["patch_size"]
    if c["image_dim"] is not None or c["added_kv_proj_dim"] is not None or c["pos_embed_seq_len"] is not None:
        raise PlanError("synthetic wan supports the T2V layout only (image_dim/added_kv_proj_dim None)")
    if c["qk_norm"] != "rms_norm_across_heads":
        raise PlanError("synthetic wan supports qk_norm='rms_norm_across_heads' only")
    s = [
        TensorSpec("scale_shift_table", (1, 2, dim), "other"),
        TensorSpec("patch_embedding.weight", (dim, c["in_channels"], pt, ph, pw), "other"),
        TensorSpec("patch_embedding.bias", (dim,), "bias"),
    ]
    s += _linear("condition_embedder.time_embedder.linear_1", dim, c["freq_dim"])
    s += _linear("condition_embedder.time_embedder.linear_2", dim, dim)
    s += _linear("condition_embedder.time_proj", 6 * dim, dim)
    s += _linear("condition_embedder.text_embedder.linear_1", dim, c["text_dim"])
    s += _linear("condition_embedder.text_embedder.linear_2", dim, dim)
    for i in range(c["num_layers"]):
        p = f"blocks.{i}"
        s.append(TensorSpec(f"{p}.scale_shift_table", (1, 6, dim), "other"))
        for a in ("attn1", "attn2"):
            for n in ("to_q", "to_k", "to_v", "to_out.0"):
                s += _linear(f"{p}.{a}.{n}", dim, dim)
            s += [TensorSpec(f"{p}.{a}.norm_q.weight", (dim,), "norm"), TensorSpec(f"{p}.{a}.norm_k.weight", (dim,), "norm")]
        if c["cross_attn_norm"]:
            s += [TensorSpec(f"{p}.norm2.weight", (dim,), "norm"), TensorSpec(f"{p}.norm2.bias", (dim,), "bias")]
        s += _linear(f"{p}.ffn.net.0.proj", c["ffn_dim"], dim) + _linear(f"{p}.ffn.net.2", dim, c["ffn_dim"])
    s += _linear("proj_out", c["out_channels"] * pt * ph * pw, dim)
    return s


def tensor_specs(family: str, config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the family's diffusers state dict for ``config``, in state-dict order."""
    return _flux_specs(config) if family == "flux1" else _wan_specs(config)


# --------------------------------------------------------------------------- safetensors writing


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * _DTYPE_SIZE[dtype] if shape else _DTYPE_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the safetensors crate does
    return raw, offset


class _ShardedWriter:
    """Writes a (sharded) diffusers safetensors checkpoint tensor by tensor, in plan order."""

    def __init__(
        self,
        directory: Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        prefix: str = "diffusion_pytorch_model",
    ) -> None:
        self.dir = directory
        self.shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for e in entries:
            n = _nbytes(e[1], e[2])
            if self.shards[-1] and size + n > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(e)
            size += n
        k = len(self.shards)
        self.names = [f"{prefix}.safetensors"] if k == 1 else [f"{prefix}-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.total = sum(_nbytes(e[1], e[2]) for e in entries)
        self.metadata = metadata
        self._order = [(si, e) for si, shard in enumerate(self.shards) for e in shard]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1
        self._remaining = 0
        directory.mkdir(parents=True, exist_ok=True)
        if k > 1:
            wm = {e[0]: self.names[si] for si, e in self._order}
            index = {"metadata": {"total_size": self.total}, "weight_map": wm}
            (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def next_entry(self) -> tuple[str, str, tuple[int, ...]]:
        return self._order[self._pos][1]

    def begin(self, name: str) -> None:
        si, e = self._order[self._pos]
        if e[0] != name:
            raise RuntimeError(f"writer expected tensor '{e[0]}', got '{name}'")
        if si != self._shard:
            self._close_shard()
            self._shard = si
            raw, _ = _header_bytes(self.shards[si], self.metadata)
            self._file = open(self.dir / self.names[si], "wb")
            self._file.write(len(raw).to_bytes(8, "little"))
            self._file.write(raw)
        self._remaining = _nbytes(e[1], e[2])
        self._pos += 1

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        mv = memoryview(data).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
        if mv.nbytes > self._remaining:
            raise RuntimeError("tensor data overruns its header entry")
        assert self._file is not None
        self._file.write(mv)
        self._remaining -= mv.nbytes

    def _close_shard(self) -> None:
        if self._file is not None:
            if self._remaining:
                raise RuntimeError("previous tensor was not fully written")
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"only {self._pos} of {len(self._order)} tensors written")
        self._close_shard()


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return (int(np.prod(shape, dtype=np.int64)) if shape else 1) * _DTYPE_SIZE[dtype]


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A small single-file safetensors from {name: (dtype, array of its storage)}."""
    entries = [(n, d, tuple(a.shape)) for n, (d, a) in tensors.items()]
    raw, _ = _header_bytes(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


# --------------------------------------------------------------------------- random BF16 data


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> BF16 bit patterns (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _bf16_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


class _Source:
    """Deterministic BF16 chunks of ``normal * std`` (+ 1 for norms), from a shared pool."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))
        n = 1 << _POOL_BITS
        self.pool = _f32_to_bf16(self.rng.standard_normal(n, dtype=np.float32) * np.float32(0.02))
        self.pool_norm = _f32_to_bf16(1.0 + self.rng.standard_normal(n, dtype=np.float32) * np.float32(0.02))

    def chunks(self, spec: TensorSpec) -> Iterable[np.ndarray]:
        pool = self.pool_norm if spec.kind == "norm" else self.pool
        n = spec.numel
        for start in range(0, n, _CHUNK):
            m = min(_CHUNK, n - start)
            off = int(self.rng.integers(0, pool.size - m + 1))
            yield pool[off : off + m]

    def whole(self, spec: TensorSpec) -> np.ndarray:
        out = np.empty(spec.numel, dtype=np.uint16)
        pos = 0
        for c in self.chunks(spec):
            out[pos : pos + c.size] = c
            pos += c.size
        return out


# --------------------------------------------------------------------------- the generator


def _modelopt_disabled(family: str, module: str, export_filter: ExportFilter) -> bool:
    """Whether ModelOpt's diffusion example (flux-dev / wan2.2 filter) leaves ``module`` unquantized."""
    from dqfast.models import get_preset

    if export_filter == "no-block-filter" and family == "wan":
        # The Wan filter's block indices (0-2, 37-39) are meant for 40 blocks; at a few blocks
        # they would leave almost nothing quantized, so benchmarks may drop them.
        import re

        return re.match(r".*(patch_embedding|condition_embedder|proj_out).*", module) is not None
    return get_preset(family).ptq_disabled_match(module) is not None


def _quant_config(ignore: list[str]) -> dict[str, Any]:
    fmt = {"num_bits": 8, "type": "float", "dynamic": False}
    return {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "ignore": ignore,
        "config_groups": {"group_0": {"weights": dict(fmt), "input_activations": dict(fmt), "targets": ["Linear"]}},
    }


def make_transformer(
    out_dir: str | os.PathLike[str],
    family: str,
    *,
    blocks: int | None = None,
    single_blocks: int | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    max_shard_bytes: int = 5_000_000_000,
    modelopt_fp8_export: bool = False,
    export_filter: ExportFilter = "modelopt",
    write_backbone: bool = True,
) -> SynthPaths:
    """Write ``<out>/base/transformer`` (BF16) and, with ``modelopt_fp8_export``, ``<out>/hf/transformer``
    plus ``<out>/ckpt/amax.safetensors`` (and ``backbone.pt`` when torch is importable).

    ``blocks`` sets the (double) block count, ``single_blocks`` FLUX's single blocks; ``heads`` /
    ``head_dim`` scale the width; ``config_overrides`` sets any other diffusers config key.
    """
    root = Path(out_dir)
    over = dict(config_overrides or {})
    if blocks is not None:
        over["num_layers"] = blocks
    if single_blocks is not None:
        if family != "flux1":
            raise PlanError("single_blocks applies to flux1 only")
        over["num_single_layers"] = single_blocks
    if heads is not None:
        over["num_attention_heads"] = heads
    if head_dim is not None:
        over["attention_head_dim"] = head_dim
    cfg = family_config(family, **over)
    specs = tensor_specs(family, cfg)
    full_cfg = {"_class_name": CLASS_NAMES[family], "_diffusers_version": "0.42.1", **cfg}

    base_dir = root / "base" / "transformer"
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "config.json").write_text(json.dumps(full_cfg, indent=2) + "\n")
    base_w = _ShardedWriter(base_dir, [(s.name, "BF16", s.shape) for s in specs], max_shard_bytes, {"format": "pt"})
    paths = SynthPaths(root=root, family=family, config=full_cfg, base=base_dir, base_bytes=base_w.total)

    quantized: set[str] = set()
    export_w: _ShardedWriter | None = None
    rng_amax = np.random.Generator(np.random.PCG64(seed + 1_000_003))
    amax_tensors: dict[str, tuple[str, np.ndarray]] = {}
    if modelopt_fp8_export:
        ignore: list[str] = []
        entries: list[tuple[str, str, tuple[int, ...]]] = []
        for s in specs:
            module = s.name[: -len(".weight")] if s.name.endswith(".weight") else None
            if s.kind == "linear" and module is not None:
                if _modelopt_disabled(family, module, export_filter):
                    ignore.append(module)
                else:
                    quantized.add(module)
                    entries += [(s.name, "F8_E4M3", s.shape), (f"{module}.weight_scale", "F32", ()), (f"{module}.input_scale", "F32", ())]
                    continue
            entries.append((s.name, "BF16", s.shape))
        qcfg = _quant_config(sorted(ignore))
        exp_root = root / "hf"
        exp_dir = exp_root / "transformer"
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "config.json").write_text(json.dumps({**full_cfg, "quantization_config": qcfg}, indent=2) + "\n")
        export_w = _ShardedWriter(exp_dir, entries, max_shard_bytes, {"format": "pt"})
        paths.export_root, paths.export = exp_root, exp_dir
        paths.quantized_modules = sorted(quantized)
        paths.ignored_modules = sorted(ignore)

    from dqfast import _core

    src = _Source(seed)
    for s in specs:
        base_w.begin(s.name)
        module = s.name[: -len(".weight")]
        if s.name.endswith(".weight") and module in quantized:
            assert export_w is not None
            w = src.whole(s)
            base_w.write(w)
            w_amax = np.abs(_bf16_to_f32(w)).max()  # exact in BF16: it is one of the weights
            in_amax = _f32_to_bf16(np.asarray([rng_amax.uniform(0.5, 32.0)], dtype=np.float32))[0]
            w_scale = np.float32(w_amax) / np.float32(E4M3_MAX)
            in_scale = np.float32(_bf16_to_f32(np.asarray([in_amax]))[0]) / np.float32(E4M3_MAX)
            q = _core.quantize_e4m3(w.tobytes(), "BF16", [float(w_scale)], s.shape[-1], rounding="modelopt")
            export_w.begin(s.name)
            export_w.write(q)
            export_w.begin(f"{module}.weight_scale")
            export_w.write(np.asarray(w_scale, dtype=np.float32))
            export_w.begin(f"{module}.input_scale")
            export_w.write(np.asarray(in_scale, dtype=np.float32))
            amax_tensors[f"{module}.weight_quantizer._amax"] = ("BF16", _f32_to_bf16(np.asarray(w_amax, dtype=np.float32)))
            amax_tensors[f"{module}.input_quantizer._amax"] = ("BF16", np.asarray(in_amax, dtype=np.uint16))
            continue
        if export_w is not None:
            export_w.begin(s.name)
        for chunk in src.chunks(s):
            base_w.write(chunk)
            if export_w is not None:
                export_w.write(chunk)
    base_w.close()
    if export_w is not None:
        export_w.close()
        ckpt = root / "ckpt"
        ckpt.mkdir(parents=True, exist_ok=True)
        paths.amax = ckpt / "amax.safetensors"
        write_safetensors(paths.amax, amax_tensors)
        if write_backbone:
            paths.backbone = _write_backbone(ckpt / "backbone.pt", amax_tensors)
    return paths


def _write_backbone(path: Path, amax_tensors: dict[str, tuple[str, np.ndarray]]) -> Path | None:
    """``mto.save``'s layout with only the maxima (BF16 0-dim), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    sd = {}
    for name, (_, bits) in amax_tensors.items():
        f = torch.from_numpy(_bf16_to_f32(np.asarray(bits).reshape(1))).to(torch.bfloat16).reshape(())
        sd[name] = f
    torch.save({"modelopt_state": {}, "model_state_dict": sd}, path)
    return path
