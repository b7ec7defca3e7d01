"""Calibration inputs for ModelOpt PTQ of diffusers transformers.

Two kinds:

- :func:`calibrate_denoising` — what ModelOpt's diffusion example does, minus the text
  encoder: for each batch of prompts, start from seeded noise and run the transformer(s)
  through a flow-matching denoising loop (``FlowMatchEulerDiscreteScheduler``), so that
  the quantizers see the activations of every noise level. Conditioning comes from
  ``CalibConfig.encode_prompts`` when given; otherwise from **pseudo-embeddings**: each
  prompt string seeds (through SHA-256) a random normal tensor of the text encoder's
  output shape. Pseudo-embeddings are deterministic and differ per prompt, but they are
  not what a real text encoder produces, so activation maxima of text-conditioned layers
  are only approximately those of real use. Reports say which one was used.
- :func:`random_calibration_batches` — single random forward batches (tests, smoke runs).

Supported transformer classes: ``FluxTransformer2DModel`` and ``WanTransformer3DModel``
(Wan2.1/2.2, including the two-expert Wan2.2 A14B through ``boundary_ratio``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqfast.errors import PlanError
from dqfast.models import family_of_class

# A small built-in prompt set (written for dqfast; used when no prompts file is given).
BUILTIN_PROMPTS: tuple[str, ...] = (
    "A red fox sitting in fresh snow at sunrise, soft golden light",
    "A busy night market in Taipei with neon signs and steam rising from food stalls",
    "Close-up portrait of an elderly fisherman with a weathered face, studio lighting",
    "An isometric illustration of a tiny island with a lighthouse and palm trees",
    "A bowl of ramen with a soft-boiled egg, chopsticks resting on the rim, top view",
    "A futuristic train crossing a glass bridge above a canyon, cinematic wide shot",
    "Watercolor painting of a quiet village street after rain, reflections on cobblestones",
    "A golden retriever puppy chasing soap bubbles in a sunny backyard",
    "Macro photo of dew drops on a spider web, shallow depth of field",
    "A medieval castle on a cliff during a thunderstorm, lightning in the sky",
    "Minimalist poster of a mountain range in pastel colors with the text 'ALPS'",
    "A chef tossing vegetables in a flaming wok in a restaurant kitchen",
    "An astronaut floating inside a space station, Earth visible through the window",
    "A cozy reading nook with a cat asleep on a pile of books, warm lamp light",
    "Aerial view of rice terraces in the morning mist",
    "A vintage red sports car parked in front of a diner, 1960s style photograph",
    "Low-poly 3D render of a fox in a forest clearing",
    "A jazz band playing on a small stage in a smoky club, moody lighting",
    "A hummingbird hovering next to a bright pink flower, high shutter speed",
    "Snow-covered pine forest under the northern lights",
    "A child flying a kite on a windy beach, waves in the background",
    "Steampunk airship docked at a brass tower above the clouds",
    "A glass of iced coffee on a wooden table next to a laptop, natural window light",
    "Ink sketch of a heron standing in shallow water",
    "A crowded subway platform during rush hour, motion blur of a passing train",
    "An ancient library with towering shelves and floating candles",
    "A surfer riding a large wave at sunset, spray backlit by the sun",
    "A robot watering plants in a rooftop garden in a dense city",
    "A plate of colorful macarons arranged in a spiral, pastel background",
    "A desert caravan of camels walking along sand dunes at dusk",
    "An underwater coral reef with a sea turtle and schools of small fish",
    "A lone cabin by a frozen lake, smoke rising from the chimney, blue hour",
)

# Wan pipelines run classifier-free guidance with a negative prompt; this stands in for it.
DEFAULT_NEGATIVE_PROMPT = "blurry, low quality, static, overexposed, distorted, deformed"


def load_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines skipped, surrounding whitespace stripped."""
    from dqfast._files import read_regular

    try:
        lines = read_regular(path, "prompts file", PlanError, limit=64 << 20).decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: prompts file is not UTF-8 ({e.reason} at byte {e.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise PlanError(f"{path}: no prompts (one per line expected)", path=str(path))
    return prompts


EncodeFn = Callable[[list[str], Any], dict[str, Any]]


@dataclass
class CalibConfig:
    """Calibration settings (ModelOpt's example defaults: calib_size 128, batch 2, 30 steps).

    ``height``/``width``/``num_frames`` are in pixels/frames as for the pipeline; ``None``
    uses ModelOpt's per-model inference size (FLUX 1024x1024; Wan 720x1280x81, 5B
    512x768x81). ``encode_prompts(prompts, transformer) -> {forward kwarg: tensor}``
    supplies real text-encoder outputs; ``None`` uses hash-seeded pseudo-embeddings.
    """

    prompts: list[str] | None = None
    prompts_file: str | Path | None = None
    calib_size: int = 128
    batch_size: int = 2
    n_steps: int = 30
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    text_len: int = 512
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    shift: float | None = None
    boundary_ratio: float | None = None
    encode_prompts: EncodeFn | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("calib_size", "batch_size", "n_steps"):
            if int(getattr(self, name)) < 1:
                raise PlanError(f"--{name.replace('_', '-')} ({name}=) must be >= 1, got {getattr(self, name)}")

    def prompt_list(self) -> list[str]:
        if self.prompts is not None:
            prompts = list(self.prompts)
        elif self.prompts_file is not None:
            prompts = load_prompts(self.prompts_file)
        else:
            prompts = list(BUILTIN_PROMPTS)
        return prompts[: self.calib_size]

    def batches(self) -> list[list[str]]:
        """Prompt batches as the example makes them: ceil(calib_size / batch_size), at most
        as many as the prompt list has."""
        prompts = self.prompt_list()
        return [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]

    def prompt_source(self) -> str:
        if self.prompts is not None:
            return "prompts given in the call"
        if self.prompts_file is not None:
            return str(self.prompts_file)
        return f"built-in ({len(BUILTIN_PROMPTS)} prompts)"

    def conditioning_kind(self) -> str:
        return "encode_prompts callable" if self.encode_prompts is not None else "pseudo-embeddings"

    def describe(self) -> dict[str, Any]:
        return {
            "prompts": self.prompt_source(),
            "prompts_used": len(self.prompt_list()),
            "calib_size": self.calib_size,
            "batch_size": self.batch_size,
            "batches": len(self.batches()),
            "n_steps": self.n_steps,
            "seed": self.seed,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "text_len": self.text_len,
            "conditioning": self.conditioning_kind(),
            "conditioning_note": (
                "no text encoder: each prompt's embeddings are standard-normal noise seeded by "
                "SHA-256 of the prompt text (deterministic, not real text-encoder outputs)"
                if self.encode_prompts is None
                else "embeddings from the supplied encode_prompts"
            ),
        }


def model_family(transformer: Any) -> str:
    name = type(transformer).__name__
    family = family_of_class(name).calibration  # the model registry says which inputs fit
    if family is not None:
        return family
    raise PlanError(
        f"no calibration inputs for {name}: the denoising-loop calibration supports "
        "FluxTransformer2DModel and WanTransformer3DModel (pass forward_loop= for others)"
    )


# Kept for callers of the earlier name.
_model_kind = model_family


def timestep_scale(family: str) -> float:
    """Scheduler timestep (0..1000) -> the model's timestep input (FLUX takes t/1000)."""
    return 1e-3 if family == "flux" else 1.0


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


def pseudo_embedding(text: str, shape: tuple[int, ...], tag: str = "") -> Any:
    """Standard-normal float32 tensor seeded by SHA-256 of ``tag + text``."""
    import torch

    gen = torch.Generator().manual_seed(_seed_of(tag + "\x00" + text))
    return torch.randn(*shape, generator=gen)


def _param(transformer: Any) -> Any:
    return next(p for p in transformer.parameters() if p.is_floating_point())


def _pseudo_conditioning(transformer: Any, prompts: list[str], text_len: int) -> dict[str, Any]:
    import torch

    family = model_family(transformer)
    cfg = transformer.config
    if family == "flux":
        return {
            "encoder_hidden_states": torch.stack([pseudo_embedding(p, (text_len, cfg.joint_attention_dim), "t5") for p in prompts]),
            "pooled_projections": torch.stack([pseudo_embedding(p, (cfg.pooled_projection_dim,), "clip") for p in prompts]),
        }
    return {"encoder_hidden_states": torch.stack([pseudo_embedding(p, (text_len, cfg.text_dim), "umt5") for p in prompts])}


def _latent_geometry(transformer: Any, calib: CalibConfig) -> dict[str, int]:
    cfg = transformer.config
    family = model_family(transformer)
    if family == "flux":
        height, width = calib.height or 1024, calib.width or 1024
        # VAE /8, then 2x2 patch packing: one token per 16x16 pixels.
        return {"h": max(height // 16, 1), "w": max(width // 16, 1)}
    five_b = cfg.in_channels == 48  # Wan2.2 TI2V-5B: 48-channel VAE, 16x spatial
    height = calib.height or (512 if five_b else 720)
    width = calib.width or (768 if five_b else 1280)
    frames = calib.num_frames or 81
    spatial = 16 if five_b else 8
    pt, ph, pw = cfg.patch_size
    h = max(height // spatial // ph, 1) * ph
    w = max(width // spatial // pw, 1) * pw
    f = max(((frames - 1) // 4 + 1) // pt, 1) * pt
    return {"f": f, "h": h, "w": w}


def make_scheduler(family: str, calib: CalibConfig, seq_len: int) -> tuple[Any, dict[str, Any]]:
    """A FlowMatchEulerDiscreteScheduler with timesteps set; returns it and set_timesteps kwargs."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = calib.n_steps
    if family == "flux" and calib.shift is None:
        # FLUX.1's scheduler: resolution-dependent shift mu, as its pipeline computes it.
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        m = (1.15 - 0.5) / (4096 - 256)
        mu = seq_len * m + (0.5 - m * 256)
        kwargs = {"sigmas": np.linspace(1.0, 1.0 / n, n), "mu": mu}
    else:
        shift = calib.shift if calib.shift is not None else (3.0 if family == "flux" else 5.0)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        kwargs = {}
    return sched, kwargs


def _select_expert(models: dict[str, Any], boundary_ratio: float | None) -> Callable[[float], tuple[str, Any]]:
    names = list(models)
    if len(names) == 1:
        return lambda t: (names[0], models[names[0]])
    if len(names) == 2 and boundary_ratio is not None:
        # Wan2.2 A14B: the first expert denoises t >= boundary, the second the rest.
        boundary = boundary_ratio * 1000.0
        return lambda t: (names[0], models[names[0]]) if t >= boundary else (names[1], models[names[1]])
    raise PlanError(f"{len(names)} transformers but no boundary_ratio to choose between them: {names}")


def calibrate_denoising(
    models: dict[str, Any],
    calib: CalibConfig,
    label: str = "calibration",
) -> dict[str, int]:
    """Run ``models`` (one transformer, or Wan2.2's two experts in pipeline order) through
    the denoising loop for every prompt batch. Returns forward-call counts per model."""
    import torch

    first = next(iter(models.values()))
    family = model_family(first)
    cfg = first.config
    geo = _latent_geometry(first, calib)
    select = _select_expert(models, calib.boundary_ratio)
    batches = calib.batches()
    calls = {name: 0 for name in models}
    gen = torch.Generator().manual_seed(calib.seed)
    cfg_scale = calib.guidance_scale if calib.guidance_scale is not None else (3.5 if family == "flux" else 4.0)
    cfg_scale_2 = calib.guidance_scale_2 if calib.guidance_scale_2 is not None else (cfg_scale if family == "flux" else 3.0)

    def conditioning(m: Any, prompts: list[str]) -> dict[str, Any]:
        if calib.encode_prompts is not None:
            return dict(calib.encode_prompts(prompts, m))
        return _pseudo_conditioning(m, prompts, calib.text_len)

    progress_ctx = _progress(calib.progress, label, len(batches) * calib.n_steps)
    with torch.no_grad(), progress_ctx as advance:
        for prompts in batches:
            bsz = len(prompts)
            if family == "flux":
                seq = geo["h"] * geo["w"]
                latents = torch.randn(bsz, seq, cfg.in_channels, generator=gen)
                img_ids = torch.zeros(geo["h"], geo["w"], 3)
                img_ids[..., 1] = torch.arange(geo["h"])[:, None]
                img_ids[..., 2] = torch.arange(geo["w"])[None, :]
                static = {"img_ids": img_ids.reshape(seq, 3)}
            else:
                seq = geo["f"] * geo["h"] * geo["w"]
                latents = torch.randn(bsz, cfg.in_channels, geo["f"], geo["h"], geo["w"], generator=gen)
                static = {}
            cond_cache: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}
            sched, set_kwargs = make_scheduler(family, calib, seq)
            if set_kwargs:  # FLUX: explicit sigmas + mu, as its pipeline passes them
                sched.set_timesteps(**set_kwargs)
            else:
                sched.set_timesteps(calib.n_steps)
            for t in sched.timesteps:
                name, model = select(float(t))
                p = _param(model)
                if name not in cond_cache:
                    cond = {k: v.to(p.device, p.dtype) for k, v in conditioning(model, prompts).items()}
                    uncond = None
                    if family == "wan":
                        neg = conditioning(model, [calib.negative_prompt] * bsz)
                        uncond = {k: v.to(p.device, p.dtype) for k, v in neg.items()}
                    cond_cache[name] = (cond, uncond)
                cond, uncond = cond_cache[name]
                ts = (t.float() * timestep_scale(family)).expand(bsz).to(p.device, p.dtype)
                kwargs: dict[str, Any] = {
                    "hidden_states": latents.to(p.device, p.dtype),
                    "timestep": ts,
                    "return_dict": False,
                    **{k: v.to(p.device) for k, v in static.items()},
                }
                if family == "flux":
                    kwargs["txt_ids"] = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=p.device)
                    if cfg.guidance_embeds:
                        kwargs["guidance"] = torch.full((bsz,), cfg_scale, device=p.device, dtype=p.dtype)
                    velocity = model(**kwargs, **cond)[0].float()
                    calls[name] += 1
                else:
                    v_cond = model(**kwargs, **cond)[0].float()
                    v_uncond = model(**kwargs, **uncond)[0].float()  # type: ignore[arg-type]
                    calls[name] += 2
                    scale = cfg_scale if name == next(iter(models)) else cfg_scale_2
                    velocity = v_uncond + scale * (v_cond - v_uncond)
                latents = sched.step(velocity.to(latents.device), t, latents, return_dict=False)[0].float()
                advance()
    return calls


class _progress:
    """A rich progress bar over denoising steps; a no-op when disabled or rich is missing."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled = enabled
        self.label = label
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return lambda: None
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


def trajectory_inputs(transformer: Any, calib: CalibConfig, prompt: str | None = None) -> dict[str, Any]:
    """Forward kwargs for ``dqfast.verify.trajectory``: one prompt's conditioning and a
    latent template of the calibration geometry (batch 1)."""
    import torch

    family = model_family(transformer)
    cfg = transformer.config
    geo = _latent_geometry(transformer, calib)
    p = _param(transformer)
    prompt = prompt if prompt is not None else calib.prompt_list()[0]
    if calib.encode_prompts is not None:
        cond = dict(calib.encode_prompts([prompt], transformer))
    else:
        cond = _pseudo_conditioning(transformer, [prompt], calib.text_len)
    inputs = {k: v.to(p.device, p.dtype) for k, v in cond.items()}
    if family == "flux":
        seq = geo["h"] * geo["w"]
        img_ids = torch.zeros(geo["h"], geo["w"], 3)
        img_ids[..., 1] = torch.arange(geo["h"])[:, None]
        img_ids[..., 2] = torch.arange(geo["w"])[None, :]
        inputs.update(
            hidden_states=torch.zeros(1, seq, cfg.in_channels),
            img_ids=img_ids.reshape(seq, 3),
            txt_ids=torch.zeros(inputs["encoder_hidden_states"].shape[1], 3),
        )
        if cfg.guidance_embeds:
            g = calib.guidance_scale if calib.guidance_scale is not None else 3.5
            inputs["guidance"] = torch.full((1,), g, dtype=p.dtype)
    else:
        inputs["hidden_states"] = torch.zeros(1, cfg.in_channels, geo["f"], geo["h"], geo["w"])
    return inputs


def random_calibration_batches(transformer: Any, n: int, seed: int = 0, batch_size: int = 1) -> list[dict[str, Any]]:
    """``n`` valid forward-kwargs dicts for a FluxTransformer2DModel or WanTransformer3DModel.

    Shapes are kept small (16-32 image tokens, 8 text tokens) so that calibrating a
    tiny model takes well under a second on CPU.
    """
    import torch

    kind = model_family(transformer)
    cfg = transformer.config
    dtype = next(transformer.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
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


def expected_forward_calls(calib: CalibConfig, family: str) -> int:
    """Transformer forward calls a calibration makes (Wan runs cond + uncond per step)."""
    per_step = 2 if family == "wan" else 1
    return len(calib.batches()) * calib.n_steps * per_step


__all__ = [
    "BUILTIN_PROMPTS",
    "CalibConfig",
    "calibrate_denoising",
    "expected_forward_calls",
    "load_prompts",
    "make_scheduler",
    "model_family",
    "pseudo_embedding",
    "random_calibration_batches",
    "timestep_scale",
    "trajectory_inputs",
]
