"""The straightforward FP8 converter dqfast is measured against (see docs/anchors.md).

Shard by shard: ``safetensors.torch.load_file``, per-tensor weight-only amax, ``(w.float() / s)
.clamp(-448, 448).to(float8_e4m3fn)``, ``save_file``. Every 2-D float ``*.weight`` is quantized
(no presets), with ``weight_scale = amax / 448`` and a static ``input_scale = activation_amax / 448``,
both float32 ``[1]``. No fsync. This is what dqfast's ``from_bf16`` per-tensor build with
``model_type="none"`` computes, so the two outputs must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def convert_shard(tensors: dict[str, torch.Tensor], activation_amax: float) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and w.dim() == 2 and w.dtype in FLOATS:
            module = name[: -len(".weight")]
            scale = (w.abs().max().float() / E4M3_MAX).reshape(1)
            out[name] = (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            out[f"{module}.weight_scale"] = scale
            out[f"{module}.input_scale"] = torch.tensor([activation_amax / E4M3_MAX], dtype=torch.float32)
        else:
            out[name] = w
    return out


def convert(src: Path, dst: Path, activation_amax: float) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in sorted(src.glob("*.safetensors")):
        out = convert_shard(load_file(str(shard)), activation_amax)
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        for k, v in out.items():
            weight_map[k] = shard.name
            total += v.numel() * v.element_size()
        del out
    finish_output(src, dst, total, weight_map, {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": []})


def finish_output(src: Path, dst: Path, total: int, weight_map: dict[str, str], quant_cfg: dict) -> None:
    """Index json and config.json with the quantization config, as the Python tools write them."""
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quant_cfg
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def cli(convert_fn, doc: str | None) -> None:
    """``SRC DST [--activation-amax A]``, replacing DST."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--activation-amax", type=float, default=16.0)
    a = ap.parse_args()
    if a.dst.exists():
        shutil.rmtree(a.dst)
    convert_fn(a.src, a.dst, a.activation_amax)


if __name__ == "__main__":
    cli(convert, __doc__)
