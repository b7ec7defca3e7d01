"""A small torch reference exporter: quantize a model's Linears into a ModelOpt-format
checkpoint directory (config.json with quantization_config + safetensors).

Slow and whole-model-in-memory by design: it exists to produce independent test
checkpoints for the runtime loader and to cross-check the Rust converter's bytes.
Weights are divided in float32 (the "accurate" rounding, not ModelOpt's BF16 division).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from dqfast.formats import MIXED_PRECISION, format_of_algo

from ..runtime import quant as Q
from ..runtime.loader import _pattern_matches


@torch.no_grad()
def calibrate_input_amax(model: nn.Module, batches: Iterable[Mapping]) -> dict[str, float]:
    """max|x| seen at the input of every nn.Linear while running model(**batch)."""
    amax: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):

            def hook(_m, args, _name=name):
                v = float(args[0].detach().abs().max())
                amax[_name] = max(amax.get(_name, 0.0), v)

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return amax


def _layer_tensors(name: str, lin: nn.Linear, algo: str, in_amax: float | None) -> dict[str, torch.Tensor]:
    w = lin.weight.detach().float()
    out: dict[str, torch.Tensor] = {}
    fmt = format_of_algo(algo)
    if fmt.kind == "fp8":
        q, s = Q.fp8_quantize_weight(w, per_channel=fmt.scale_per == "channel")
        out[f"{name}.weight"] = q
        out[f"{name}.weight_scale"] = s.float()
        if fmt.needs_input_scale(algo):
            if in_amax is None:
                raise ValueError(f"{name}: FP8 needs a calibrated input amax")
            out[f"{name}.input_scale"] = torch.tensor(max(in_amax, Q.MIN_AMAX) / Q.E4M3_MAX)
    elif fmt.kind == "nvfp4":
        packed, s, gs = Q.nvfp4_quantize(w)
        out[f"{name}.weight"] = packed
        out[f"{name}.weight_scale"] = s
        out[f"{name}.weight_scale_2"] = gs.reshape(())
        if fmt.needs_input_scale(algo):
            if in_amax is None:
                raise ValueError(f"{name}: NVFP4 needs a calibrated input amax")
            out[f"{name}.input_scale"] = torch.tensor(max(in_amax, Q.MIN_AMAX) / (Q.E2M1_MAX * Q.E4M3_MAX))
    else:
        raise ValueError(f"unknown algo {algo}")
    if lin.bias is not None:
        out[f"{name}.bias"] = lin.bias.detach().to(torch.bfloat16)
    return out


def export_reference_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    quant_algo: str,
    input_amax: Mapping[str, float] | None = None,
    ignore: Iterable[str] = (),
    layer_algos: Mapping[str, str] | None = None,
    num_shards: int = 1,
    swap_weight_nibbles: bool = False,
) -> dict:
    """Write `model` quantized as a ModelOpt checkpoint; returns the quantization_config.

    quant_algo FP8 / FP8_PER_CHANNEL_PER_TOKEN / NVFP4 quantize every Linear not matched by
    `ignore`; MIXED_PRECISION quantizes only the modules in `layer_algos` ({name: algo}).
    swap_weight_nibbles=True writes NVFP4 bytes high-nibble-first and says so in the config.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ignore = list(ignore)
    input_amax = dict(input_amax or {})
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if quant_algo == MIXED_PRECISION:
            algo = (layer_algos or {}).get(name)
        else:
            algo = None if any(_pattern_matches(p, name) for p in ignore) else quant_algo
        if algo is None:
            continue
        layer = _layer_tensors(name, mod, algo, input_amax.get(name))
        if swap_weight_nibbles and layer[f"{name}.weight"].dtype == torch.uint8:
            layer[f"{name}.weight"] = Q.swap_nibbles(layer[f"{name}.weight"])
        tensors.update(layer)
        quantized[name] = algo
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in quantized:
            continue
        tensors[key] = t.detach().to(torch.bfloat16) if t.is_floating_point() else t.detach()
    qcfg: dict = {
        "quant_method": "modelopt",
        "quant_algo": quant_algo,
        "producer": {"name": "modelopt", "version": "dqfast-reference"},
        "ignore": ignore,
        "swap_weight_nibbles": swap_weight_nibbles,
    }
    if quant_algo == MIXED_PRECISION:
        qcfg["quantized_layers"] = {n: format_of_algo(a).layer_entry(a) for n, a in sorted(quantized.items())}
    elif (fmt := format_of_algo(quant_algo)).scale_per == "block":
        qcfg["group_size"] = fmt.block
    config = dict(getattr(model, "config", {}) or {})
    config["_class_name"] = type(model).__name__
    config["quantization_config"] = qcfg
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    names = sorted(tensors)
    meta = {"format": "pt"}
    if num_shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / "diffusion_pytorch_model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        per = (len(names) + num_shards - 1) // num_shards
        for i in range(num_shards):
            fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            chunk = names[i * per : (i + 1) * per]
            save_file({n: tensors[n].contiguous() for n in chunk}, str(out_dir / fname), metadata=meta)
            weight_map.update({n: fname for n in chunk})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    return qcfg


def save_base_checkpoint(model: nn.Module, out_dir: str | Path) -> None:
    """Write the model's own (high-precision) weights as a diffusers-style dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(getattr(model, "config", {}) or {})
    config["_class_name"] = type(model).__name__
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_dir / "diffusion_pytorch_model.safetensors"))
