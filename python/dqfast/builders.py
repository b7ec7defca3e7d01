"""The builder registry: one table of build functions, used by the CLI (``dqfast build
components``), ``dqfast.components``, ``dqfast.batch`` and ``dqfast.ptq``.

A builder is a ``"module:function"`` taking the output directory first and keywords after (as
:func:`dqfast.build_fp8_transformer` does), imported on use so that a builder whose optional
dependency is missing fails only where it is used. ``inputs`` are its keywords that are input
paths (checked to exist, fingerprinted by ``batch``, guarded against every output);
``main_input`` is the keyword a pipeline root feeds (``dqfast.components``).
To add a builder: one :class:`Builder` line in :data:`BUILDERS` (or :func:`register_builder`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dqfast.errors import PlanError

__all__ = ["Builder", "BUILDERS", "register_builder", "get_builder"]


@dataclass(frozen=True)
class Builder:
    """A build function that can be named (CLI, batch manifests, components, PTQ)."""

    target: str
    inputs: tuple[str, ...]
    #: The input a pipeline root (``dqfast build components --root``) feeds.
    main_input: str = "modelopt_hf_dir"

    def load(self) -> Callable[..., Any]:
        mod, _, fn = self.target.partition(":")
        f: Callable[..., Any] = getattr(importlib.import_module(mod), fn)
        return f

    def main_input_for(self, kwargs: Mapping[str, Any]) -> str:
        """``main_input``, except for a calibration-free build (``from_bf16``), which reads the base."""
        return "base_transformer_dir" if kwargs.get("from_bf16") else self.main_input


BUILDERS: dict[str, Builder] = {
    "fp8": Builder("dqfast.fp8:build_fp8_transformer", ("modelopt_hf_dir", "modelopt_backbone_ckpt", "base_transformer_dir")),
    "nvfp4": Builder("dqfast.nvfp4:build_nvfp4_transformer", ("modelopt_hf_dir", "base_transformer_dir")),
    "mixed": Builder("dqfast.mixed:build_mixed_transformer", ("base_transformer_dir",), main_input="base_transformer_dir"),
    "mxfp8": Builder("dqfast.mxfp8:build_mxfp8_transformer", ("base_transformer_dir",), main_input="base_transformer_dir"),
}


def register_builder(name: str, target: str, inputs: Iterable[str], main_input: str | None = None) -> None:
    """Add (or replace) a builder under ``name``."""
    ins = tuple(inputs)
    BUILDERS[name] = Builder(target, ins, main_input or (ins[0] if ins else "modelopt_hf_dir"))


def get_builder(name: str) -> Builder:
    try:
        return BUILDERS[name]
    except KeyError:
        raise PlanError(f"unknown build kind '{name}' (known: {', '.join(BUILDERS)})") from None
