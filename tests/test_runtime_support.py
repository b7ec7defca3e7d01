"""Shared builders for the runtime/verify tests: a tiny random FLUX.1 transformer and inputs."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

FLUX1_FALLBACK = [  # SGLang's flux1 BF16 fallback preset (docs/formats.md)
    "transformer_blocks.*.norm1.linear",
    "transformer_blocks.*.norm1_context.linear",
    "transformer_blocks.*.ff.net.0.proj",
    "transformer_blocks.*.ff.net.2",
    "transformer_blocks.*.ff_context.net.0.proj",
    "transformer_blocks.*.ff_context.net.2",
    "single_transformer_blocks.*.norm.linear",
    "single_transformer_blocks.*.proj_mlp",
]


def tiny_flux(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    return model.eval()


def tiny_flux_inputs(seed: int = 1, batch: int = 1, img_tokens: int = 64, txt_tokens: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = int(img_tokens**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, img_tokens, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, txt_tokens, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(txt_tokens, 3),
    }


def run_model(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_tiny_flux_output_is_nontrivial() -> None:
    out = run_model(tiny_flux(), tiny_flux_inputs())
    assert out.shape == (1, 64, 16)
    assert out.abs().mean() > 1e-3 and torch.isfinite(out).all()
