"""Tiny random diffusers transformers quantized by real ModelOpt, for tests.

``build_fixture(root, model, algo)`` writes (once; reuses a complete earlier build):

    <root>/base/                      BF16 base, ``save_pretrained`` (config.json + safetensors)
    <root>/modelopt-<algo>/ckpt/backbone.pt
    <root>/modelopt-<algo>/hf/transformer/{config.json, diffusion_pytorch_model.safetensors}

Everything is seeded, so a rebuild gives the same weights and maxima.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Small but structurally complete: every Linear K is a multiple of 16 (NVFP4 groups)
# and the Wan model has more than the 3 leading blocks ModelOpt's Wan filter keeps
# in BF16, so that some blocks are really quantized.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "flux": {
        "class": "FluxTransformer2DModel",
        "preset": "flux",
        "config": {
            "patch_size": 1,
            "in_channels": 16,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "guidance_embeds": True,
            "axes_dims_rope": [4, 6, 6],
        },
    },
    "wan": {
        "class": "WanTransformer3DModel",
        "preset": "wan",
        "config": {
            "patch_size": [1, 2, 2],
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 32,
            "freq_dim": 32,
            "ffn_dim": 64,
            "num_layers": 4,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        },
    },
    # Six blocks: ModelOpt's Qwen-Image recipe (block_range) quantizes all but the first and last two.
    # No denoising-loop calibration inputs exist for it: random forward inputs (_qwen_image_loop).
    "qwen-image": {
        "class": "QwenImageTransformer2DModel",
        "preset": "qwen-image",
        "config": {
            "patch_size": 2,
            "in_channels": 32,
            "out_channels": 8,
            "num_layers": 6,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": [8, 4, 4],
        },
    },
}

SEED = 0
CALIB_BATCHES = 2


@dataclass(frozen=True)
class FixturePaths:
    root: Path
    model: str
    algo: str
    base_dir: Path  # BF16 transformer dir (config.json + safetensors)
    out_dir: Path  # <root>/modelopt-<algo>
    backbone: Path  # <out>/ckpt/backbone.pt
    hf_dir: Path  # <out>/hf/transformer


def _model_class(model: str) -> Any:
    import diffusers

    return getattr(diffusers, TINY_CONFIGS[model]["class"])


def _new_model(model: str) -> Any:
    import torch

    torch.manual_seed(SEED)
    # Every tensor BF16, as in the released checkpoints (Wan's fp32-kept modules included).
    return _model_class(model)(**TINY_CONFIGS[model]["config"]).to(torch.bfloat16).eval()


def load_base(base_dir: Path, model: str) -> Any:
    """The base transformer with the saved weights.

    Not ``from_pretrained``: for Wan (``_keep_in_fp32_modules``) that needs accelerate.
    """
    from safetensors.torch import load_file

    transformer = _new_model(model)
    transformer.load_state_dict(load_file(base_dir / "diffusion_pytorch_model.safetensors"), strict=True)
    return transformer


def build_base(root: Path, model: str) -> Path:
    """Create and save the seeded BF16 base transformer (idempotent)."""
    base_dir = root / "base"
    if (base_dir / "config.json").exists():
        return base_dir
    _new_model(model).save_pretrained(base_dir)
    return base_dir


def build_fixture(root: Path, model: str, algo: str) -> FixturePaths:
    """Build (or reuse) the base and the ModelOpt ``algo`` ("fp8"|"nvfp4") output under ``root``.

    ``root`` is per model: use e.g. ``tmp_path_factory.mktemp("flux")`` for "flux".
    """
    from dqfast import ptq

    if model not in TINY_CONFIGS:
        raise ValueError(f"unknown fixture model {model!r}; known: {sorted(TINY_CONFIGS)}")
    root = Path(root)
    base_dir = build_base(root, model)
    out_dir = root / f"modelopt-{algo}"
    paths = FixturePaths(
        root=root,
        model=model,
        algo=algo,
        base_dir=base_dir,
        out_dir=out_dir,
        backbone=out_dir / "ckpt" / "backbone.pt",
        hf_dir=out_dir / "hf" / "transformer",
    )
    done_marker = out_dir / ".complete"
    if done_marker.exists():
        return paths

    transformer = load_base(base_dir, model)
    preset = TINY_CONFIGS[model]["preset"]
    if model == "qwen-image":
        ptq.quantize(transformer, algo, filter=preset, seed=SEED, forward_loop=_qwen_image_loop)
    else:
        batches = ptq.random_calibration_batches(transformer, CALIB_BATCHES, seed=SEED)
        ptq.quantize(transformer, algo, batches, filter=preset, seed=SEED)
    ptq.save(transformer, out_dir, component="transformer")
    done_marker.write_text(json.dumps({"model": model, "algo": algo, "seed": SEED}))
    return paths


def _qwen_image_loop(model: Any) -> None:
    """Seeded random forward inputs for the tiny Qwen-Image (a 4x4 latent, 6 text tokens)."""
    import torch

    cfg = TINY_CONFIGS["qwen-image"]["config"]
    for i in range(CALIB_BATCHES):
        g = torch.Generator().manual_seed(SEED + i)
        model(
            hidden_states=torch.randn(1, 16, cfg["in_channels"], generator=g).to(torch.bfloat16),
            encoder_hidden_states=torch.randn(1, 6, cfg["joint_attention_dim"], generator=g).to(torch.bfloat16),
            encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.bool),
            timestep=torch.tensor([0.5], dtype=torch.bfloat16),
            img_shapes=[[(1, 4, 4)]],
            return_dict=False,
        )


def fixture_root(base: Path, model: str) -> Path:
    """The per-model root used by the tests' session fixtures (shared across test files)."""
    return Path(base) / "modelopt-fixtures" / model
