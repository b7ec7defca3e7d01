"""Every python block of docs/api.md runs as written (in order, one namespace, an empty directory)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")  # one block shows torch tensors

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_api_doc_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 10
    ns: dict = {"__name__": "api_doc"}
    for i, code in enumerate(blocks):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), ns)
        # A `print(...)  # expected` comment states the output: check it.
        for want in re.findall(r"^print\(.*\)\s+#\s*(.+)$", code, flags=re.M):
            shown = want.split(";")[0].strip()
            assert shown in buf.getvalue(), f"block {i + 1}: printed {buf.getvalue()!r}, doc says {shown!r}"


def test_every_top_level_builder_and_error_is_documented():
    import dqfast

    text = DOC.read_text()
    for name in (
        "build_fp8_transformer",
        "build_nvfp4_transformer",
        "build_mixed_transformer",
        "build_weight_only_transformer",
        "build_components",
        "run_batch",
    ):
        assert name in dqfast.__all__ and f"dqfast.{name}" in text
    for err in ("DqfastError", "CheckpointError", "PlanError", "OutputExistsError", "DqfastIOError", "InternalError", "ManifestError"):
        assert err in dqfast.__all__ and err in text
