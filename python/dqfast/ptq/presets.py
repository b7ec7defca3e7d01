"""ModelOpt-config data per model family, on top of ``dqfast.presets``.

The filter regexes (the ``filter_func_*`` functions of ModelOpt's diffusion example,
``examples/diffusers/quantization``, applied with ``mtq.disable_quantizer`` *after*
calibration) live in one place only: ``dqfast.presets.PRESETS[...].ptq_disabled``. This
module adds what only matters when dqfast drives ModelOpt itself:

- which recipe the example picks per format (FLUX models get the FP8-MHA NVFP4 recipe);
- the example's pre-calibration ``block_range`` recipe (Qwen-Image: only
  ``transformer_blocks`` quantized, minus the first/last two, sized from the real model);
- the example's ``--model`` names, for the record.

A quantizer whose name (e.g. ``transformer_blocks.0.attn.to_q.weight_quantizer``) matches a
``ptq_disabled`` regex with ``re.match`` is disabled: its Linear stays in the base precision
and lands in the export's ``ignore`` list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dqfast import presets as model_presets

# The example tree these facts were read from (see docs/notes/sources.md §5).
MODELOPT_SOURCE = "NVIDIA/Model-Optimizer@6b4ad85 examples/diffusers/quantization"

FP8_RECIPE = "configs/ptq/presets/diffusers/fp8"
NVFP4_RECIPE = "configs/ptq/presets/diffusers/nvfp4"
NVFP4_FP8_MHA_RECIPE = "configs/ptq/presets/diffusers/nvfp4_fp8_mha"


@dataclass(frozen=True)
class BlockRange:
    """The example's ``block_range`` recipe (``build_block_range_quant_cfg``): applied to the
    quant config *before* calibration, so excluded quantizers are never calibrated."""

    block_module: str = "transformer_blocks"
    exclude_first_n: int = 2
    exclude_last_n: int = 2

    def quant_cfg_rules(self, num_blocks: int) -> list[dict[str, Any]]:
        """quant_cfg entries: everything off, the block list on, the edge blocks off again."""
        # The example refuses models with fewer than two quantized middle blocks.
        need = self.exclude_first_n + self.exclude_last_n + 2
        if num_blocks < need:
            raise ValueError(f"block_range on '{self.block_module}' needs at least {need} blocks, the model has {num_blocks}")
        excluded = sorted(set(range(self.exclude_first_n)) | set(range(num_blocks - self.exclude_last_n, num_blocks)))
        m = self.block_module
        rules: list[dict[str, Any]] = [
            {"quantizer_name": "*weight_quantizer", "enable": False},
            {"quantizer_name": "*input_quantizer", "enable": False},
            {"quantizer_name": f"*{m}.*weight_quantizer", "enable": True},
            {"quantizer_name": f"*{m}.*input_quantizer", "enable": True},
        ]
        for i in excluded:
            rules.append({"quantizer_name": f"*{m}.{i}.*weight_quantizer", "enable": False})
            rules.append({"quantizer_name": f"*{m}.{i}.*input_quantizer", "enable": False})
        return rules


@dataclass(frozen=True)
class PtqPreset:
    """ModelOpt-side settings for one ``dqfast.presets`` model family."""

    name: str  # the dqfast.presets name
    modelopt_model_types: tuple[str, ...] = ()
    fp8_recipe: str = FP8_RECIPE
    nvfp4_recipe: str = NVFP4_RECIPE
    block_range: BlockRange | None = None
    note: str = ""

    @property
    def model(self) -> model_presets.ModelPreset:
        return model_presets.get_preset(self.name)

    @property
    def disable(self) -> tuple[str, ...]:
        """The post-calibration filter regexes (from ``dqfast.presets``)."""
        return self.model.ptq_disabled

    def recipe(self, algo: str) -> str:
        if algo == "fp8":
            return self.fp8_recipe
        if algo == "nvfp4":
            return self.nvfp4_recipe
        raise ValueError(f"unknown algo {algo!r}: expected 'fp8' or 'nvfp4'")

    def disable_patterns(self) -> list[str]:
        return list(self.disable)


PRESETS: dict[str, PtqPreset] = {
    p.name: p
    for p in [
        # The example picks nvfp4_fp8_mha for every model type starting with "flux".
        PtqPreset(
            "flux1",
            ("flux-dev", "flux-schnell"),
            nvfp4_recipe=NVFP4_FP8_MHA_RECIPE,
            note="flux-schnell uses filter_func_default upstream; dqfast applies the flux-dev filter to both",
        ),
        PtqPreset("flux2", ("flux2-dev",), nvfp4_recipe=NVFP4_FP8_MHA_RECIPE),
        PtqPreset(
            "wan",
            ("wan2.2-t2v-14b", "wan2.2-t2v-5b"),
            note="the filter names literal blocks 0-2 and 37-39 of the 40-block A14B (the 5B too)",
        ),
        PtqPreset("qwen-image", ("qwen-image",), block_range=BlockRange("transformer_blocks", 2, 2)),
        PtqPreset("hunyuan-video", (), note="no HunyuanVideo model type upstream: filter_func_default"),
        PtqPreset("none", (), note="no filter: every layer the recipe covers stays quantized"),
    ]
}


def get_preset(name: str) -> PtqPreset:
    """The PTQ preset of a ``dqfast.presets`` name or alias (``flux`` -> ``flux1``)."""
    canonical = model_presets.get_preset(name).name
    try:
        return PRESETS[canonical]
    except KeyError:
        raise KeyError(f"no PTQ preset for model type {canonical!r}; known: {sorted(PRESETS)}") from None


def compile_filter(patterns: list[str]) -> Callable[[str], bool]:
    """A ModelOpt filter function (quantizer name -> disable?) for the given regexes."""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.match(name) for c in compiled)
