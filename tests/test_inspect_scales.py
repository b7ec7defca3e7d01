"""``inspect`` reports a scale the engine's rule refuses (zero, subnormal, not finite) as a
problem. It caught the refusal as ``_core.PlanError``, which does not exist (the bindings raise
``dqfast.errors.PlanError``): evaluating that ``except`` raised AttributeError instead (found by
the mypy gate)."""

from __future__ import annotations

import struct
from pathlib import Path

from dqfast.inspect import inspect_checkpoint
from malformed.corpus import write_safetensors


def test_zero_scale_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    write_safetensors(
        d / "diffusion_pytorch_model.safetensors",
        {
            "blk.weight": ("F8_E4M3", [2, 16], bytes(32)),
            "blk.weight_scale": ("F32", [], struct.pack("<f", 0.0)),
            "blk.input_scale": ("F32", [], struct.pack("<f", 1.0)),
        },
    )
    r = inspect_checkpoint(d)
    assert any("blk.weight_scale" in p for p in r.problems), r.problems
