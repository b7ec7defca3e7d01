"""Load a ModelOpt-format FP8 / NVFP4 / mixed checkpoint directory into a torch model.

`load_quantized(model, path)` reads `config.json` -> `quantization_config` (flat ModelOpt
form; the legacy `hf_quant_config.json` sidecar too), swaps each quantized nn.Linear for an
Fp8Linear / Nvfp4Linear, and loads every tensor from safetensors (one file, several, or an
index), refusing anything that does not fit: a missing or unexpected tensor, a wrong shape
or dtype, each named with its file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dqfast.errors import CheckpointError, CheckpointMismatch
from dqfast.formats import family_algos

from . import quant as Q
from .linear import Fp8Linear, Nvfp4Linear

# The formats this loader runs (dqfast.formats; MXFP8 is not one of them yet).
FP8_ALGOS = set(family_algos("fp8"))
NVFP4_ALGOS = set(family_algos("nvfp4"))


@dataclass
class QuantSpec:
    """What the checkpoint's quantization config says."""

    quant_algo: str
    ignore: list[str] = field(default_factory=list)
    quantized_layers: dict[str, dict] = field(default_factory=dict)
    group_size: int = 16
    swap_weight_nibbles: bool = False

    def is_ignored(self, module: str) -> bool:
        return any(_pattern_matches(p, module) for p in self.ignore)

    def algo_for(self, module: str) -> str | None:
        """Quant algo of a module, or None when it stays in high precision."""
        if self.is_ignored(module):
            return None
        if self.quant_algo == "MIXED_PRECISION":
            from dqfast.quant_config import quantized_layer_entry  # the builders' matcher (prefixes too)

            entry = quantized_layer_entry(self.quantized_layers, module)
            if entry is None:
                return None
            algo = str(entry.get("quant_algo", "")).upper()
            group = int(entry.get("group_size", 16))
            if algo in NVFP4_ALGOS and group != 16:
                raise CheckpointMismatch(f"{module}: NVFP4 group_size {group} is not supported (16)")
            if algo not in FP8_ALGOS | NVFP4_ALGOS:
                raise CheckpointMismatch(f"{module}: unsupported quant_algo {algo!r}")
            return algo
        return self.quant_algo


def _pattern_matches(pattern: str, name: str) -> bool:
    """Ignore-list semantics, shared with the builders (``dqfast.presets``)."""
    from dqfast.presets import ignore_pattern_matches

    return ignore_pattern_matches(pattern, name)


def read_quant_spec(path: str | Path) -> QuantSpec:
    """The ModelOpt quantization config of a checkpoint directory, resolved by the same code the
    builders use (``dqfast.quant_config``: flat config, legacy ``hf_quant_config.json``,
    safetensors metadata, tensor dtypes)."""
    from dqfast.errors import PlanError
    from dqfast.quant_config import resolve_quant_config

    path = Path(path)
    try:
        qc = resolve_quant_config(path)
    except PlanError as e:
        raise CheckpointMismatch(str(e)) from None
    if qc is None:
        raise CheckpointMismatch(
            f"{path}: not a ModelOpt checkpoint (no modelopt quantization_config in config.json, "
            "hf_quant_config.json or safetensors metadata)"
        )
    algo = qc.quant_algo
    if algo not in FP8_ALGOS | NVFP4_ALGOS | {"MIXED_PRECISION"}:
        raise CheckpointMismatch(f"{qc.source}: unsupported quant_algo {algo!r}")
    return QuantSpec(
        quant_algo=algo,
        ignore=list(qc.ignore),
        quantized_layers=dict(qc.quantized_layers),
        group_size=int(qc.group_size or 16),
        swap_weight_nibbles=bool(qc.raw.get("swap_weight_nibbles", False)),
    )


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to its safetensors file: the Rust reader's shard/index rule
    (``dqfast.reader.open_checkpoint``), the one the builders use."""
    from dqfast.reader import open_checkpoint

    try:
        info = open_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointMismatch(str(e)) from None
    return {name: Path(meta.file) for name, meta in info.tensors.items()}


@dataclass
class LoadReport:
    """What load_quantized did."""

    quant_algo: str
    fp8_layers: list[str] = field(default_factory=list)
    nvfp4_layers: list[str] = field(default_factory=list)
    high_precision_layers: list[str] = field(default_factory=list)
    nan_scales_clamped: dict[str, int] = field(default_factory=dict)
    nibbles_swapped: bool = False
    tensors_loaded: int = 0
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.quant_algo}: {len(self.fp8_layers)} FP8, {len(self.nvfp4_layers)} NVFP4, "
            f"{len(self.high_precision_layers)} high-precision Linears; {self.tensors_loaded} tensors "
            f"from {len(self.files)} file(s); NaN block-scale bytes clamped: "
            f"{sum(self.nan_scales_clamped.values())}"
        )


class _Reader:
    """Lazily opened safetensors files; tracks which tensors were consumed."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.used: set[str] = set()
        self._open: dict[Path, object] = {}

    def has(self, name: str) -> bool:
        return name in self.files

    def where(self, name: str) -> str:
        return self.files[name].name if name in self.files else "<absent>"

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.files.get(name)
        if f is None:
            raise CheckpointMismatch(f"missing tensor {name}")
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        self.used.add(name)
        return self._open[f].get_tensor(name)  # type: ignore[attr-defined]

    def expect(self, name: str, dtype: torch.dtype | Iterable[torch.dtype], shapes: Iterable[tuple]) -> torch.Tensor:
        t = self.get(name)
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in dtypes:
            raise CheckpointMismatch(f"tensor {name} in {self.where(name)}: dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
        shapes = [tuple(s) for s in shapes]
        if tuple(t.shape) not in shapes:
            raise CheckpointMismatch(
                f"tensor {name} in {self.where(name)}: shape {tuple(t.shape)}, expected {' or '.join(map(str, shapes))}"
            )
        return t


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _load_bias(reader: _Reader, name: str, linear: nn.Linear, new: Fp8Linear | Nvfp4Linear, n: int) -> None:
    if linear.bias is None or new.bias is None:  # `new` was built with bias=linear.bias is not None
        if reader.has(f"{name}.bias"):
            raise CheckpointMismatch(f"unexpected tensor {name}.bias in {reader.where(name + '.bias')}: the model's {name} has no bias")
        return
    b = reader.expect(f"{name}.bias", (torch.bfloat16, torch.float16, torch.float32), [(n,)])
    new.bias.data.copy_(b.to(new.bias.dtype))


def _build_fp8(reader: _Reader, name: str, linear: nn.Linear, algo: str, backend: str | None) -> Fp8Linear:
    n, k = linear.weight.shape
    dev = linear.weight.device
    w = reader.expect(f"{name}.weight", torch.float8_e4m3fn, [(n, k)])
    ws = reader.expect(f"{name}.weight_scale", torch.float32, [(), (1,), (n,), (n, 1)])
    per_channel = ws.numel() == n and n > 1
    static = algo == "FP8"
    in_name = f"{name}.input_scale"
    if static and not reader.has(in_name):
        raise CheckpointMismatch(
            f"missing tensor {in_name} (quant_algo FP8 needs a static input scale; weight is in {reader.where(name + '.weight')})"
        )
    if not static and reader.has(in_name):
        raise CheckpointMismatch(f"unexpected tensor {in_name} in {reader.where(in_name)}: {algo} quantizes activations per token")
    mod = Fp8Linear(
        k,
        n,
        bias=linear.bias is not None,
        per_channel=per_channel,
        static_input_scale=static,
        dtype=linear.weight.dtype,
        device=dev,
        backend=backend,
    )
    mod.weight.copy_(w)
    mod.weight_scale.copy_(ws.reshape(mod.weight_scale.shape))
    if mod.input_scale is not None:  # built with static_input_scale=static
        mod.input_scale.copy_(reader.expect(in_name, torch.float32, [(), (1,)]).reshape(()))
    _load_bias(reader, name, linear, mod, n)
    return mod


def _build_nvfp4(
    reader: _Reader, name: str, linear: nn.Linear, algo: str, spec: QuantSpec, report: LoadReport, backend: str | None
) -> Nvfp4Linear:
    n, k = linear.weight.shape
    if k % 16:
        raise CheckpointMismatch(f"{name}: in_features {k} is not a multiple of 16")
    w = reader.expect(f"{name}.weight", torch.uint8, [(n, k // 2)])
    s = reader.expect(f"{name}.weight_scale", torch.float8_e4m3fn, [(n, k // 16)])
    gs = reader.expect(f"{name}.weight_scale_2", torch.float32, [(), (1,)])
    in_name = f"{name}.input_scale"
    act_quant = algo == "NVFP4"
    if act_quant and not reader.has(in_name):
        raise CheckpointMismatch(f"missing tensor {in_name} (NVFP4 W4A4 needs it; weight is in {reader.where(name + '.weight')})")
    s, bad = Q.clamp_nan_e4m3(s)
    if bad:
        report.nan_scales_clamped[f"{name}.weight_scale"] = bad
        warnings.warn(
            f"{name}.weight_scale in {reader.where(name + '.weight_scale')}: {bad} NaN e4m3 byte(s) clamped to 0x7E (448)",
            RuntimeWarning,
            stacklevel=3,
        )
    if spec.swap_weight_nibbles:
        w = Q.swap_nibbles(w)
    mod = Nvfp4Linear(
        k, n, bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device, backend=backend, act_quant=act_quant
    )
    mod.weight.copy_(w)
    mod.weight_scale.copy_(s)
    mod.weight_scale_2.copy_(gs.reshape(()))
    if reader.has(in_name):
        mod.input_scale.copy_(reader.expect(in_name, torch.float32, [(), (1,)]).reshape(()))
    _load_bias(reader, name, linear, mod, n)
    return mod


def load_quantized(
    model: nn.Module,
    path: str | Path,
    fp8_backend: str | None = None,
    fp4_backend: str | None = None,
) -> LoadReport:
    """Replace the quantized Linears of `model` and load all tensors from checkpoint `path`.

    Every parameter and buffer of the (resulting) model must come from the checkpoint and
    every checkpoint tensor must be used; high-precision tensors are cast to the model's
    dtype, quantized tensors must have exactly the expected dtype and shape.
    """
    path = Path(path)
    spec = read_quant_spec(path)
    files = _tensor_files(path)
    reader = _Reader(files)
    report = LoadReport(quant_algo=spec.quant_algo, nibbles_swapped=spec.swap_weight_nibbles)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quant_suffixes = (".weight_scale", ".weight_scale_2", ".input_scale")
    for name, linear in linears:
        algo = spec.algo_for(name)
        if algo is None:
            stray = [name + s for s in quant_suffixes if reader.has(name + s)]
            if stray:
                raise CheckpointMismatch(f"unexpected tensor {stray[0]} in {reader.where(stray[0])}: {name} is not quantized by the config")
            report.high_precision_layers.append(name)
            continue
        if algo in FP8_ALGOS:
            new: nn.Module = _build_fp8(reader, name, linear, algo, fp8_backend)
            report.fp8_layers.append(name)
        else:
            new = _build_nvfp4(reader, name, linear, algo, spec, report, fp4_backend)
            report.nvfp4_layers.append(name)
        _set_module(model, name, new)
    quantized = set(report.fp8_layers) | set(report.nvfp4_layers)
    # Everything else (high-precision Linears, norms, embeddings) loads by name.
    state = model.state_dict(keep_vars=True)
    for key, target in state.items():
        owner = key.rpartition(".")[0]
        if owner in quantized:
            continue
        if not reader.has(key):
            raise CheckpointMismatch(f"missing tensor {key} (needed by the model)")
        t = reader.get(key)
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointMismatch(f"tensor {key} in {reader.where(key)}: shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        if (
            t.is_floating_point() != target.is_floating_point()
            or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            or t.dtype == torch.uint8 != target.dtype
        ):
            raise CheckpointMismatch(
                f"tensor {key} in {reader.where(key)}: dtype {t.dtype} does not fit "
                f"the model's {target.dtype} (quantized tensor for a layer the config "
                f"leaves in high precision?)"
            )
        with torch.no_grad():
            target.data.copy_(t.to(target.dtype))
    unused = sorted(set(files) - reader.used)
    if unused:
        raise CheckpointMismatch(f"unexpected tensor {unused[0]} in {reader.where(unused[0])} ({len(unused)} unused in all)")
    report.tensors_loaded = len(reader.used)
    report.files = sorted({str(f.name) for f in files.values()})
    return report
