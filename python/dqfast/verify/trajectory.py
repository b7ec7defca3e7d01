"""Compare a base and a quantized transformer over a flow-matching denoising trajectory.

Both models start from the same seeded noise and run through their own
FlowMatchEulerDiscreteScheduler; after every step the latents are compared (cosine, MAE,
RMSE). The final PSNR is computed on the final latents (no VAE decode), with the base's
peak-to-peak range as the signal peak.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class TrajectoryResult:
    steps: list[dict] = field(default_factory=list)
    final_psnr_db: float = float("nan")
    final_cosine: float = float("nan")
    min_cosine: float = float("nan")
    seed: int = 0
    num_steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def write_report(self, json_path: str | Path, png_path: str | Path | None = None) -> dict:
        """Write the numbers as JSON and, if matplotlib is installed, a per-step plot.

        Returns {"json": path, "png": path or None, "png_note": why no PNG}.
        """
        out: dict[str, Any] = {"json": str(json_path), "png": None, "png_note": ""}
        Path(json_path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if png_path is None:
            out["png_note"] = "no png_path given"
            return out
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            out["png_note"] = "matplotlib is not installed: PNG skipped"
            print(out["png_note"])
            return out
        idx = [s["step"] for s in self.steps]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax1.plot(idx, [s["cosine"] for s in self.steps], marker="o")
        ax1.set_xlabel("step")
        ax1.set_ylabel("latent cosine")
        ax2.plot(idx, [s["mae"] for s in self.steps], marker="o", label="MAE")
        ax2.plot(idx, [s["rmse"] for s in self.steps], marker="s", label="RMSE")
        ax2.set_xlabel("step")
        ax2.legend()
        fig.suptitle(f"final PSNR {self.final_psnr_db:.2f} dB")
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        out["png"] = str(png_path)
        return out


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a = a.double().flatten()
    b = b.double().flatten()
    d = a - b
    denom = float(a.norm() * b.norm())
    return {
        "cosine": float((a @ b) / denom) if denom > 0 else float("nan"),
        "mae": float(d.abs().mean()),
        "rmse": float(d.pow(2).mean().sqrt()),
    }


def _call(model: nn.Module, latents: torch.Tensor, t: torch.Tensor, inputs: dict, scale: float):
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), latents.dtype)
    ts = (t.float() * scale).expand(latents.shape[0]).to(latents.device, dtype)
    out = model(hidden_states=latents.to(dtype), timestep=ts, return_dict=False, **inputs)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


@torch.no_grad()
def trajectory(
    base_model: nn.Module,
    quant_model: nn.Module,
    inputs: dict,
    steps: int = 8,
    seed: int = 0,
    shift: float = 1.0,
    timestep_scale: float = 1e-3,
    progress: Callable[[int, int, str], Any] | None = None,
) -> TrajectoryResult:
    """Run both models through `steps` Euler flow-matching steps from the same noise.

    `inputs` holds the model's forward kwargs; `hidden_states` gives the latent shape (its
    values are replaced by seeded noise), the rest (encoder_hidden_states, ids, guidance...)
    is passed unchanged (a `timestep` entry is ignored). `timestep_scale` maps scheduler timesteps (0..1000) to the model's
    convention (FLUX: 1/1000; Wan: 1).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    rest = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    template = inputs["hidden_states"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(template.shape, generator=gen, dtype=torch.float32).to(template.device)
    scheds: list[Any] = [FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift) for _ in range(2)]
    for s in scheds:
        s.set_timesteps(steps, device=template.device)
    lat_b = noise.clone()
    lat_q = noise.clone()
    result = TrajectoryResult(seed=seed, num_steps=steps)
    for i, t in enumerate(scheds[0].timesteps):
        v_b = _call(base_model, lat_b, t, rest, timestep_scale)
        v_q = _call(quant_model, lat_q, t, rest, timestep_scale)
        lat_b = scheds[0].step(v_b, t, lat_b, return_dict=False)[0].float()
        lat_q = scheds[1].step(v_q, t, lat_q, return_dict=False)[0].float()
        row = {"step": i, "timestep": float(t)}
        row.update(_compare(lat_b, lat_q))
        result.steps.append(row)
        if progress is not None:
            progress(i + 1, steps, f"step {i + 1}/{steps}")
    final = _compare(lat_b, lat_q)
    peak = float(lat_b.max() - lat_b.min())
    result.final_cosine = final["cosine"]
    result.min_cosine = min(s["cosine"] for s in result.steps)
    result.final_psnr_db = 20 * math.log10(peak / final["rmse"]) if final["rmse"] > 0 else float("inf")
    return result
