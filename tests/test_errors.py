"""Typed errors: hierarchy, attributes, and panics that surface as exceptions, not crashes."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

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


# --- Every exception in the one hierarchy, mapped once by the CLI ------------------------------

PKG = Path(dqfast.__file__).resolve().parent


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PKG.rglob("*.py"))]


def _name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def test_every_exception_class_is_defined_in_errors() -> None:
    # BackboneError (backbone.py), HubCacheError (hub.py), ManifestError (batch.py),
    # MissingExtraError (extras.py) and the runtime's CheckpointMismatch (runtime/loader.py) were
    # defined beside their users: one place lists what a caller may catch.
    outside = [
        f"{p.relative_to(PKG)}:{c.lineno} {c.name}"
        for p, tree in _modules()
        if p.name != "errors.py"
        for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef) and any(_name(b).endswith(("Error", "Exception", "Mismatch")) for b in c.bases)
    ]
    assert outside == []
    from dqfast import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.DqfastError), name
    # The old import paths still name the same classes.
    from dqfast.backbone import BackboneError
    from dqfast.batch import ManifestError
    from dqfast.extras import MissingExtraError
    from dqfast.hub import HubCacheError

    assert (BackboneError, ManifestError, MissingExtraError, HubCacheError) == (
        errors.BackboneError,
        errors.ManifestError,
        errors.MissingExtraError,
        errors.HubCacheError,
    )


#: Untyped raises that never reach a user as an error of theirs: the reference exporter (a test
#: oracle), synth's writer invariants (a bug if hit), a module ``__getattr__``, a mapping-style
#: lookup, an API type check, a JSON hook whose ValueError is turned into a PlanError by its
#: caller, and the runtime (its own helper's area: torch-level errors of a model the caller built).
_UNTYPED_OK = {
    "synth.py:RuntimeError",
    "verify/reference.py",
    "ptq/__init__.py:AttributeError",
    "weight_only.py:AttributeError",  # its module __getattr__ (build_<format>_transformer), as the protocol asks
    "ptq/flow.py:KeyError",
    "ptq/quantize.py:TypeError",
    "plan.py:TypeError",  # PlanBuilder.add given something not a typed op: a programming error, not user input
    "quant_config.py:ValueError",
    "targets/__init__.py:ValueError",  # get_target / fix: every caller re-raises as PlanError
}
_UNTYPED = {"ValueError", "RuntimeError", "KeyError", "TypeError", "FileNotFoundError", "NotImplementedError", "AttributeError", "OSError"}


def test_user_facing_raises_are_dqfast_errors() -> None:
    bad = []
    for p, tree in _modules():
        rel = p.relative_to(PKG).as_posix()
        if rel.startswith("runtime/") or rel in _UNTYPED_OK:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                exc = _name(node.exc.func)
                if exc in _UNTYPED and f"{rel}:{exc}" not in _UNTYPED_OK:
                    bad.append(f"{rel}:{node.lineno} raise {exc}")
    assert bad == []


def test_the_cli_maps_errors_to_exit_2_in_one_place() -> None:
    # `sys.exit(2)` after an `error:` line was written in cli.py, batch_cli.py (three times) and
    # ptq_cli.py, each with its own list of exception types (ptq's missed KeyError).
    exits = [
        f"{p.relative_to(PKG)}:{node.lineno}"
        for p, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and _name(node.func) == "exit"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == 2
    ]
    assert exits == []  # fail() takes the status; only cli._format.OneLineErrors decides it
    from dqfast.cli import main
    from dqfast.cli._format import OneLineErrors
    from dqfast.cli.batch import batch
    from dqfast.cli.ptq import ptq

    # The commands a process can start in (dqfast, and batch / ptq run on their own).
    assert all(isinstance(c, OneLineErrors) for c in (main, batch, ptq))


def test_ptq_family_without_a_ptq_preset_is_one_line(tmp_path: Path) -> None:
    # An LTX-2 transformer (a family without a recorded ModelOpt PTQ filter) made get_preset raise
    # KeyError, which ptq's own except list did not name: a traceback instead of `error:`, exit 2.
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("modelopt")
    from click.testing import CliRunner
    from dqfast.cli import main

    comp = tmp_path / "ltx2"
    tiny = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=16)
    audio = dict(
        audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16
    )
    diffusers.LTX2VideoTransformer3DModel(num_layers=1, **tiny, **audio).save_pretrained(comp)
    r = CliRunner().invoke(main, ["ptq", "--model-dir", str(comp), "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: --model-type (model_type=): no PTQ preset for model type 'ltx2'"), r.output
    assert r.output.count("\n") == 1
