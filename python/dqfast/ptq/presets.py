"""ModelOpt-config view of the model registry (``dqfast.models``).

Every ModelOpt fact about a family — the post-calibration filter regexes (the ``filter_func_*``
functions of ModelOpt's diffusion example, ``examples/diffusers/quantization``, applied with
``mtq.disable_quantizer`` *after* calibration), the recipe per format (FLUX models get the
FP8-MHA NVFP4 recipe), the pre-calibration ``block_range`` (Qwen-Image: only
``transformer_blocks`` quantized, minus the first/last two, sized from the real model) and the
example's ``--model`` names — is a field of the family's ``ModelPreset`` in ``dqfast/models/``.
This module only presents them under the names ``dqfast.ptq`` uses.

A quantizer whose name (e.g. ``transformer_blocks.0.attn.to_q.weight_quantizer``) matches a
``ptq_disabled`` regex with ``re.match`` is disabled: its Linear stays in the base precision
and lands in the export's ``ignore`` list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from dqfast import models as model_presets
from dqfast.errors import PlanError
from dqfast.models import FP8_RECIPE, MODELOPT_SOURCE, NVFP4_FP8_MHA_RECIPE, NVFP4_RECIPE, BlockRange

__all__ = [
    "MODELOPT_SOURCE",
    "FP8_RECIPE",
    "NVFP4_RECIPE",
    "NVFP4_FP8_MHA_RECIPE",
    "BlockRange",
    "PtqPreset",
    "PRESETS",
    "get_preset",
    "compile_filter",
]


@dataclass(frozen=True)
class PtqPreset:
    """ModelOpt-side settings for one ``dqfast.models`` family (see :func:`from_model`)."""

    name: str  # the dqfast.models name
    modelopt_model_types: tuple[str, ...] = ()
    fp8_recipe: str = FP8_RECIPE
    nvfp4_recipe: str = NVFP4_RECIPE
    block_range: BlockRange | None = None
    note: str = ""

    @classmethod
    def from_model(cls, p: model_presets.ModelPreset) -> PtqPreset:
        return cls(p.name, p.modelopt_model_types, p.fp8_recipe, p.nvfp4_recipe, p.block_range, p.ptq_note)

    @property
    def model(self) -> model_presets.ModelPreset:
        return model_presets.get_preset(self.name)

    @property
    def disable(self) -> tuple[str, ...]:
        """The post-calibration filter regexes (from ``dqfast.models``)."""
        return self.model.ptq_disabled

    def recipe(self, algo: str) -> str:
        if algo == "fp8":
            return self.fp8_recipe
        if algo == "nvfp4":
            return self.nvfp4_recipe
        raise PlanError(f"--algo (algo=): unknown algo {algo!r}: expected 'fp8' or 'nvfp4'")

    def disable_patterns(self) -> list[str]:
        return list(self.disable)


PRESETS: dict[str, PtqPreset] = {name: PtqPreset.from_model(p) for name, p in model_presets.PRESETS.items() if p.ptq}


def get_preset(name: str) -> PtqPreset:
    """The PTQ preset of a ``dqfast.models`` name or alias (``flux`` -> ``flux1``)."""
    canonical = model_presets.get_preset(name).name
    try:
        return PRESETS[canonical]
    except KeyError:
        raise PlanError(f"--model-type (model_type=): no PTQ preset for model type {canonical!r}; known: {sorted(PRESETS)}") from None


def compile_filter(patterns: list[str]) -> Callable[[str], bool]:
    """A ModelOpt filter function (quantizer name -> disable?) for the given regexes."""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.match(name) for c in compiled)
