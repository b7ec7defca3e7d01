"""The straightforward NVFP4 converter dqfast's ``from_bf16`` NVFP4 build is measured against.

Shard by shard with torch + safetensors: ``load_file``, then for every 2-D float ``*.weight`` whose
in-features are a multiple of 16, the plain-torch ModelOpt quantizer of
``tests/nvfp4_reference.py`` (float32 math on the whole tensor, E2M1 by threshold counting),
``save_file``. The q/k/v projections that loaders fuse (``to_q/k/v``, ``add_q/k/v_proj``,
``q/k/v_proj``) share one global scale, the max over the group, as dqfast's builder does; a group
member stored in another shard is read from that shard for its amax. No fsync. Outputs
``weight`` (U8 ``[N, K/2]``), ``weight_scale`` (e4m3 ``[N, K/16]``), ``weight_scale_2`` and
``input_scale`` (float32 0-dim, ``input_scale = activation_amax / 2688``): the same tensors as
``build_nvfp4_transformer(from_bf16=True, model_type="none")``, which must be byte-identical.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nvfp4_reference import BLOCK, E2M1_MAX, E4M3_MAX, quantize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_fp8_convert import cli, finish_output  # noqa: E402

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_FUSED = (re.compile(r"^(.*)\.to_([qkv])$"), re.compile(r"^(.*)\.add_([qkv])_proj$"), re.compile(r"^(.*)\.([qkv])_proj$"))


def _group_key(module: str) -> str | None:
    for i, rx in enumerate(_FUSED):
        m = rx.match(module)
        if m:
            return f"{i}:{m.group(1)}"
    return None


def _quantizable(name: str, shape: list[int], dtype: str) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and shape[1] % BLOCK == 0 and dtype in ("BF16", "F16", "F32")


def convert(src: Path, dst: Path, activation_amax: float) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(src.glob("*.safetensors"))
    # Which shard holds each quantizable weight, and the fused groups among them.
    where: dict[str, Path] = {}
    groups: dict[str, list[str]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                if _quantizable(name, sl.get_shape(), sl.get_dtype()):
                    where[name] = shard
                    key = _group_key(name[: -len(".weight")])
                    if key is not None:
                        groups.setdefault(key, []).append(name)
    group_of = {n: members for members in groups.values() if len(members) > 1 for n in members}
    amax_cache: dict[str, torch.Tensor] = {}

    def amax_of(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        if name not in amax_cache:
            if name in loaded:
                w = loaded[name]
            else:  # a fused partner stored in another shard
                with safe_open(str(where[name]), framework="pt") as f:
                    w = f.get_tensor(name)
            amax_cache[name] = w.float().abs().amax()
        return amax_cache[name]

    input_scale = torch.tensor(activation_amax, dtype=torch.float32) / (E2M1_MAX * E4M3_MAX)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        tensors = load_file(str(shard))
        out: dict[str, torch.Tensor] = {}
        for name, w in tensors.items():
            if name in where and w.dtype in FLOATS:
                module = name[: -len(".weight")]
                members = group_of.get(name, [name])
                amax = torch.stack([amax_of(m, tensors) for m in members]).amax()
                packed, scales, weight_scale_2 = quantize(w, amax)
                out[name] = packed
                out[f"{module}.weight_scale"] = scales
                out[f"{module}.weight_scale_2"] = weight_scale_2.reshape(())
                out[f"{module}.input_scale"] = input_scale.clone()
            else:
                out[name] = w
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        for k, v in out.items():
            weight_map[k] = shard.name
            total += v.numel() * v.element_size()
        del out, tensors
    finish_output(src, dst, total, weight_map, {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": BLOCK, "ignore": []})


if __name__ == "__main__":
    cli(convert, __doc__)
