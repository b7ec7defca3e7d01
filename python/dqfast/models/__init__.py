"""The model registry: every fact about a model family, one module per family.

``PRESETS`` maps a family name to its :class:`ModelPreset` (FP8 fallback regexes, NVFP4 fallback
globs, the PTQ filter and ModelOpt recipe, canonical/runtime names, fused-QKV rules, the mixed
default policy, components). To add a family: write ``dqfast/models/<family>.py`` defining
``PRESET`` and list it in ``_FAMILIES`` below (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from dqfast.errors import PlanError
from dqfast.models import flux1, flux2, hunyuan_video, ltx2, qwen_image, wan
from dqfast.models.base import (
    FP8_RECIPE,
    MLP_PATTERNS,
    MODELOPT_SOURCE,
    NVFP4_FP8_MHA_RECIPE,
    NVFP4_RECIPE,
    BlockRange,
    ModelPreset,
    QkvRule,
    fused_groups,
    glob_to_regex,
    ignore_pattern_matches,
    pattern_list,
)

__all__ = [
    "PRESETS",
    "ModelPreset",
    "BlockRange",
    "QkvRule",
    "MLP_PATTERNS",
    "FP8_RECIPE",
    "NVFP4_RECIPE",
    "NVFP4_FP8_MHA_RECIPE",
    "MODELOPT_SOURCE",
    "get_preset",
    "detect_preset",
    "resolve_preset",
    "family_of_class",
    "fused_groups",
    "glob_to_regex",
    "pattern_list",
    "ignore_pattern_matches",
]

_FAMILIES = (
    flux1.PRESET,
    flux2.PRESET,
    hunyuan_video.PRESET,
    qwen_image.PRESET,
    wan.PRESET,
    ltx2.PRESET,
    ModelPreset(
        name="none",
        ptq_note="no filter: every layer the recipe covers stays quantized",
        source="no fallbacks: only ModelOpt's own ignore list is honoured",
    ),
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in _FAMILIES}

#: Aliases accepted on the command line.
_ALIASES = {"hunyuanvideo": "hunyuan-video", "qwen": "qwen-image", "wan2.2": "wan", "flux": "flux1"}


def get_preset(name: str) -> ModelPreset:
    key = _ALIASES.get(name, name)
    try:
        return PRESETS[key]
    except KeyError:
        raise PlanError(f"unknown model type '{name}' (known: {', '.join(sorted(PRESETS))}, auto)") from None


def _class_name(config: dict[str, Any] | None) -> str:
    cls = (config or {}).get("_class_name", "")
    if not isinstance(cls, str):
        raise PlanError(f"config.json field '_class_name' must be a string, not {type(cls).__name__}")
    return cls


def family_of_class(class_name: str) -> ModelPreset:
    """The preset whose class names include ``class_name``, else ``none``."""
    for p in PRESETS.values():
        if class_name in p.class_names:
            return p
    return PRESETS["none"]


def detect_preset(config: dict[str, Any] | None) -> ModelPreset:
    """The preset whose class names include the config's ``_class_name``, else ``none``."""
    return family_of_class(_class_name(config))


def resolve_preset(model_type: str, config: dict[str, Any] | None, force: bool = False) -> ModelPreset:
    """The preset for ``model_type`` (``auto``: from config.json's ``_class_name``).

    A named preset whose ``class_names`` do not include the checkpoint's ``_class_name`` would
    choose the wrong modules to keep in BF16 without a word: refused unless ``force``."""
    if not isinstance(model_type, str):
        raise PlanError(f"model_type (--model-type) must be a string, not {type(model_type).__name__}")
    if model_type == "auto":
        return detect_preset(config)
    preset = get_preset(model_type)
    cls = _class_name(config)
    if preset.class_names and cls and cls not in preset.class_names and not force:
        raise PlanError(
            f"--model-type {model_type} is for {', '.join(preset.class_names)}, but config.json says _class_name "
            f"'{cls}' (preset {detect_preset(config).name}); use --model-type auto, or --force-model-type "
            "(force_model_type=True) if you mean it"
        )
    return preset
