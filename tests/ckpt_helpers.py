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


#: Tiny configs of the diffusers classes of the families ``dqfast.synth`` does not make (every
#: Linear's in-features a multiple of 32, so every output kind can quantize every layer).
TINY_DIFFUSERS = {
    "qwen-image": (
        "QwenImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=32,
            out_channels=8,
            num_layers=6,  # ModelOpt's recipe leaves blocks 0, 1 (and with block_range the last two) unquantized
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(8, 4, 4),
        ),
    ),
    "flux2": (
        "Flux2Transformer2DModel",
        dict(
            patch_size=1,
            in_channels=32,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
        ),
    ),
    "hunyuan-video": (
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=32,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            text_embed_dim=32,
            pooled_projection_dim=32,
            rope_axes_dim=(4, 6, 6),
        ),
    ),
    "ltx2": (
        "LTX2VideoTransformer3DModel",
        dict(
            in_channels=32,
            out_channels=32,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            audio_in_channels=32,
            audio_out_channels=32,
            audio_num_attention_heads=2,
            audio_attention_head_dim=16,
            audio_cross_attention_dim=32,
            num_layers=1,
            caption_channels=32,
        ),
    ),
}


def tiny_diffusers_base(d: str | Path, family: str) -> Path:
    """A BF16 transformer directory (config.json + safetensors) of the family's diffusers class
    with tiny random weights, built on CPU by diffusers itself (its real module names)."""
    import diffusers
    import torch

    cls, cfg = TINY_DIFFUSERS[family]
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**cfg).to(torch.bfloat16)
    d = Path(d)
    model.save_pretrained(str(d), safe_serialization=True)
    return d


def reshard_two(src: Path, dst: Path) -> Path:
    """A copy of a one-file export split into 2 shards with an index (as `save_pretrained` writes)."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    with safe_open(str(src / "diffusion_pytorch_model.safetensors"), framework="pt") as h:
        md = dict(h.metadata() or {})
        names = list(h.keys())
        tensors = {n: h.get_tensor(n) for n in names}
    half = len(names) // 2
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    wm = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fn = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(dst / fn), metadata=md)
        wm.update({n: fn for n in part})
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2)
    )
    del torch
    return dst
