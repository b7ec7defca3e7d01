"""Unit checks behind the hostile-input corpus: decoders, the error hierarchy, size parsing,
preset checks and the pieces a CLI subprocess cannot reach."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from dqfast.errors import CheckpointError, DqfastError, PlanError


def _finishes(fn, seconds: float = 20.0):
    """fn() in a daemon thread: a call that blocks (a FIFO opened for reading) fails the test
    instead of hanging the suite."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked"
    return box


@pytest.mark.parametrize("dtype", ["F8_E5M2", "F8_E4M3", "F8_E8M0"])
def test_fp8_decoders_match_torch_on_every_code(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from dqfast.reader import to_float32

    tdtype = {"F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu"}[dtype]
    if not hasattr(torch, tdtype):
        pytest.skip(f"torch has no {tdtype}")
    codes = np.arange(256, dtype=np.uint8)
    ours = to_float32(dtype, codes)
    ref = torch.from_numpy(codes.copy()).view(getattr(torch, tdtype)).float().numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[ok], ref[ok])
    # 0-dim (an amax scalar) keeps its shape.
    assert to_float32(dtype, codes[:1].reshape(())).shape == ()


def test_backbone_error_is_a_checkpoint_error_and_a_value_error(tmp_path: Path) -> None:
    from dqfast.backbone import BackboneError, read_amax

    assert issubclass(BackboneError, CheckpointError) and issubclass(BackboneError, ValueError)
    p = tmp_path / "backbone.pt"
    p.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: no data.pkl
    with pytest.raises(CheckpointError) as e:
        read_amax(p)
    assert e.value.path == str(p)


@pytest.mark.parametrize(
    "text,n",
    [("5GB", 5 * 10**9), ("4GiB", 4 << 30), ("1.5KB", 1500), ("1000000", 10**6), (" 5 gb ", 5 * 10**9), ("0.5MiB", 1 << 19), (7, 7)],
)
def test_parse_size_accepts(text, n) -> None:
    from dqfast.plan import parse_size

    assert parse_size(text) == n


def test_parse_size_refusal_is_a_plan_error_not_value_error() -> None:
    from dqfast.plan import parse_size

    with pytest.raises(PlanError, match=r"max_shard_size '5X': not a size \(examples: 5GB"):
        parse_size("5X", "max_shard_size")
    assert not issubclass(PlanError, ValueError)


def test_resolve_preset_rules() -> None:
    from dqfast.presets import resolve_preset

    flux = {"_class_name": "FluxTransformer2DModel"}
    assert resolve_preset("auto", flux).name == "flux1"
    assert resolve_preset("flux1", flux).name == "flux1"
    assert resolve_preset("none", flux).name == "none"  # 'none' claims no class
    assert resolve_preset("wan", {}).name == "wan"  # nothing to check against
    assert resolve_preset("wan", flux, force=True).name == "wan"
    with pytest.raises(PlanError, match="--model-type wan is for WanTransformer3DModel"):
        resolve_preset("wan", flux)


def test_pattern_list() -> None:
    from dqfast.presets import pattern_list

    assert pattern_list("^x$") == ["^x$"]
    assert pattern_list(("a", "b")) == ["a", "b"]
    assert pattern_list(None) == []
    for bad in (5, b"x", {"a": 1}, [1]):
        with pytest.raises(PlanError):
            pattern_list(bad)


def test_parse_policy_shapes() -> None:
    from dqfast.mixed import parse_policy

    assert parse_policy({"fp8": "a", "bf16": ["b", "c"]}) == [("fp8", "a"), ("bf16", "b"), ("bf16", "c")]
    assert parse_policy([["nvfp4", "x"], ("fp8", ".")]) == [("nvfp4", "x"), ("fp8", ".")]
    for bad, match in (
        (["fp8"], "not an \\[algo, regex\\] pair"),
        ([["fp8", 1]], "fp8 pattern 1 is not a string"),
        ({"fp8": [None]}, "fp8 pattern None"),
        ({1: ["x"]}, "policy algorithm 1"),
        (3.5, "a policy cannot be float"),
        ("fp8", "a policy cannot be str"),
    ):
        with pytest.raises(PlanError, match=match):
            parse_policy(bad, source="P")


def test_prompts_file_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    from dqfast.ptq.calibration import load_prompts

    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    box = _finishes(lambda: load_prompts(fifo))
    assert isinstance(box.get("error"), DqfastError) and "FIFO" in str(box["error"])


def test_open_regular_refuses_fifo_without_blocking(tmp_path: Path) -> None:
    from dqfast.quant_config import load_json

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    box = _finishes(lambda: load_json(fifo))
    assert isinstance(box.get("error"), PlanError) and box["error"].path == str(fifo)


def test_components_failure_removes_the_parents_it_created(tmp_path: Path) -> None:
    from dqfast.components import build_components
    from malformed.corpus import base_tensors, weight, write_base

    w = weight()
    w[3, 3] = np.inf
    write_base(tmp_path / "pipe" / "transformer", base_tensors(w))
    (tmp_path / "existing").mkdir()
    out = tmp_path / "existing" / "a" / "b"
    with pytest.raises(DqfastError):
        build_components("fp8", tmp_path / "pipe", out, from_bf16=True, model_type="none")
    assert list((tmp_path / "existing").iterdir()) == []


def test_manifest_error_is_one_line_and_names_the_file(tmp_path: Path) -> None:
    from dqfast.batch import ManifestError, load_manifest

    m = tmp_path / "m.toml"
    m.write_text('colour = 1\n[[jobs]]\nbuilder = "fp8"\n')
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{m}: invalid manifest: ")
    assert e.value.path == str(m) and len(e.value.problems) >= 2


def test_bare_group_still_shows_help() -> None:
    from click.testing import CliRunner
    from dqfast.cli import main

    r = CliRunner().invoke(main, ["build"])
    assert "Usage:" in r.output and "error:" not in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


def test_new_errors_pickle_with_their_fields(tmp_path: Path) -> None:
    import pickle

    from dqfast.backbone import BackboneError
    from dqfast.batch import ManifestError

    m = pickle.loads(pickle.dumps(ManifestError(["a", "b"], tmp_path / "m.toml")))
    assert m.problems == ["a", "b"] and m.path == str(tmp_path / "m.toml") and str(m).endswith("invalid manifest: a; b")
    b = pickle.loads(pickle.dumps(BackboneError("x: bad", "x", "t")))
    assert (str(b), b.path, b.tensor) == ("x: bad", "x", "t")
