"""Errors in other processes (issue 11 §5): every dqfast exception pickles with its attributes,
so a ProcessPoolExecutor or Ray parent receives the typed error, not a PicklingError."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle
from pathlib import Path

import dqfast
import dqfast.errors as E
import pytest
from dqfast import _core
from dqfast.backbone import BackboneError
from dqfast.batch import ManifestError
from malformed.corpus import write_base


def _all_classes() -> list[type[E.DqfastError]]:
    classes = [getattr(E, n) for n in E.__all__] + [ManifestError, BackboneError]
    try:
        from dqfast.runtime.loader import CheckpointMismatch
    except ImportError:  # the runtime needs torch
        pass
    else:
        classes.append(CheckpointMismatch)
    return classes


def test_every_class_is_a_dqfast_error_importable_by_its_module_name() -> None:
    import importlib

    for cls in _all_classes():
        assert issubclass(cls, E.DqfastError)
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    # Still the ValueErrors they were, for callers that caught them as such.
    assert issubclass(BackboneError, ValueError)
    # The top-level package and dqfast.errors export the same objects as the extension raises.
    assert dqfast.PlanError is E.PlanError and dqfast.UnsafeOutputError is E.UnsafeOutputError


@pytest.mark.parametrize("cls", _all_classes(), ids=lambda c: c.__name__)
def test_round_trip_keeps_type_message_path_and_tensor(cls: type[E.DqfastError]) -> None:
    if cls is ManifestError:
        e = ManifestError(["a: bad", "b: worse"])
    else:
        e = cls("f.safetensors: tensor 'w': broken")
    e.path, e.tensor = "/x/f.safetensors", "w"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e) and back.args == e.args
    assert (back.path, back.tensor) == ("/x/f.safetensors", "w")
    if cls is ManifestError:
        assert back.problems == ["a: bad", "b: worse"]


def test_errors_raised_by_rust_round_trip(tmp_path: Path) -> None:
    with pytest.raises(E.DqfastIOError) as io:
        dqfast.open_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(E.CheckpointError) as ck:
        dqfast.open_checkpoint(bad)
    base = write_base(tmp_path / "x" / "base")
    with pytest.raises(E.UnsafeOutputError) as un:
        _core.check_output_paths(tmp_path / "x", [base])
    with pytest.raises(E.InternalError) as internal:
        _core._panic_for_tests()
    for e in (io.value, ck.value, un.value, internal.value):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
        assert back.__dict__ == e.__dict__
    assert io.value.path == str(tmp_path / "missing.safetensors")
    assert un.value.path == str(tmp_path / "x") and un.value.input == str(base)


def test_output_exists_error_has_path(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base")
    (tmp_path / "out").mkdir()
    with pytest.raises(E.OutputExistsError, match="--overwrite") as e:
        dqfast.build_fp8_transformer(tmp_path / "out", base_transformer_dir=base, from_bf16=True, model_type="none")
    assert e.value.path == str(tmp_path / "out")


def test_process_pool_parent_receives_the_typed_error(tmp_path: Path) -> None:
    base = write_base(tmp_path / "x" / "base")
    # spawn: the child shares nothing with the parent; the error can only come back pickled.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        missing = pool.submit(dqfast.open_checkpoint, str(tmp_path / "nope"))
        unsafe = pool.submit(
            dqfast.build_fp8_transformer,
            str(tmp_path / "x"),
            base_transformer_dir=str(base),
            from_bf16=True,
            model_type="none",
            overwrite=True,
        )
        with pytest.raises(E.DqfastIOError) as e1:
            missing.result(timeout=120)
        with pytest.raises(E.UnsafeOutputError) as e2:
            unsafe.result(timeout=120)
    assert e1.value.path == str(tmp_path / "nope")
    assert e2.value.path == str(tmp_path / "x") and e2.value.input == str(base)
    assert (base / "diffusion_pytorch_model.safetensors").is_file()


def test_missing_inputs_carry_their_path(tmp_path: Path) -> None:
    from dqfast.components import find_components

    missing = tmp_path / "nope"
    with pytest.raises(E.PlanError) as e:
        dqfast.build_fp8_transformer(tmp_path / "out", base_transformer_dir=missing, from_bf16=True, model_type="none")
    assert e.value.path == str(missing)
    with pytest.raises(E.PlanError) as e:
        find_components(missing)
    assert e.value.path == str(missing)
    from dqfast.amax import load_amax

    with pytest.raises(E.CheckpointError) as e:  # a BackboneError
        load_amax(missing / "backbone.pt")
    assert e.value.path == str(missing / "backbone.pt")
    with pytest.raises(E.CheckpointError) as e:
        load_amax(missing / "amax.safetensors")
    assert e.value.path == str(missing / "amax.safetensors")
