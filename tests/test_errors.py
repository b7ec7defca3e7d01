"""Typed errors: hierarchy, attributes, and panics that surface as exceptions, not crashes."""

from __future__ import annotations

import json
import struct

import dqfast
import pytest
from dqfast import _core


def test_hierarchy() -> None:
    for cls in (dqfast.CheckpointError, dqfast.PlanError, dqfast.OutputExistsError, dqfast.DqfastIOError, dqfast.InternalError):
        assert issubclass(cls, dqfast.DqfastError) and issubclass(cls, Exception)


def test_panic_becomes_internal_error_and_interpreter_survives() -> None:
    with pytest.raises(dqfast.InternalError, match="deliberate test panic"):
        _core._panic_for_tests()
    # The interpreter and the extension still work afterwards.
    assert _core.fp8_scale_from_amax(448.0) == 1.0


def _write(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_errors_carry_path_and_tensor(tmp_path) -> None:
    f = tmp_path / "x.safetensors"
    _write(f, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(dqfast.CheckpointError) as e:
        dqfast.open_checkpoint(f)
    assert e.value.path == str(f) and e.value.tensor == "w"
    assert str(f) in str(e.value) and "'w'" in str(e.value) and "needs 16 bytes" in str(e.value)
    with pytest.raises(dqfast.DqfastIOError) as e:
        dqfast.open_checkpoint(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(e.value)


def test_bad_plan_is_a_plan_error(tmp_path) -> None:
    with pytest.raises(dqfast.PlanError, match="invalid plan"):
        _core.execute_plan(json.dumps({"sources": [], "output_dir": str(tmp_path / "o"), "tensors": [], "bogus": 1}))
    assert not (tmp_path / "o").exists()
