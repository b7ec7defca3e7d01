"""Random calibration inputs for small diffusers transformers (tests, smoke runs)."""

from __future__ import annotations

from typing import Any


def _model_kind(transformer: Any) -> str:
    name = type(transformer).__name__
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "WanTransformer3DModel":
        return "wan"
    raise NotImplementedError(f"no random calibration inputs for {name}")


def random_calibration_batches(
    transformer: Any, n: int, seed: int = 0, batch_size: int = 1
) -> list[dict[str, Any]]:
    """``n`` valid forward-kwargs dicts for a FluxTransformer2DModel or WanTransformer3DModel.

    Shapes are kept small (16-32 image tokens, 8 text tokens) so that calibrating a
    tiny model takes well under a second on CPU.
    """
    import torch

    kind = _model_kind(transformer)
    cfg = transformer.config
    dtype = next(transformer.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> "torch.Tensor":
        return torch.randn(*shape, generator=gen).to(dtype)

    batches: list[dict[str, Any]] = []
    text_len = 8
    for _ in range(n):
        if kind == "flux":
            grid_h = grid_w = 4
            seq = grid_h * grid_w
            img_ids = torch.zeros(grid_h, grid_w, 3)
            img_ids[..., 1] = torch.arange(grid_h)[:, None]
            img_ids[..., 2] = torch.arange(grid_w)[None, :]
            batch = {
                "hidden_states": randn(batch_size, seq, cfg.in_channels),
                "encoder_hidden_states": randn(batch_size, text_len, cfg.joint_attention_dim),
                "pooled_projections": randn(batch_size, cfg.pooled_projection_dim),
                # The FLUX pipeline passes t / 1000; the model scales it back by 1000.
                "timestep": torch.rand(batch_size, generator=gen).to(dtype),
                "img_ids": img_ids.reshape(seq, 3),
                "txt_ids": torch.zeros(text_len, 3),
                "return_dict": False,
            }
            if cfg.guidance_embeds:
                batch["guidance"] = torch.full((batch_size,), 3.5).to(dtype)
        else:
            pt, ph, pw = cfg.patch_size
            frames, height, width = 2 * pt, 4 * ph, 4 * pw
            batch = {
                "hidden_states": randn(batch_size, cfg.in_channels, frames, height, width),
                "encoder_hidden_states": randn(batch_size, text_len, cfg.text_dim),
                "timestep": torch.randint(0, 1000, (batch_size,), generator=gen),
                "return_dict": False,
            }
            if cfg.image_dim is not None:
                batch["encoder_hidden_states_image"] = randn(batch_size, 4, cfg.image_dim)
        batches.append(batch)
    return batches
