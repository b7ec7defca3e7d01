"""Compatibility name for :mod:`dqfast.models` (the model registry): ``dqfast.presets`` keeps
working for existing callers; new code imports ``dqfast.models``."""

from dqfast.models import (
    PRESETS,
    ModelPreset,
    detect_preset,
    get_preset,
    glob_to_regex,
    ignore_pattern_matches,
    pattern_list,
    resolve_preset,
)

__all__ = [
    "ModelPreset",
    "PRESETS",
    "get_preset",
    "detect_preset",
    "resolve_preset",
    "glob_to_regex",
    "pattern_list",
    "ignore_pattern_matches",
]
