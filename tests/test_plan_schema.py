"""The Python planner against the engine's plan schema (``_core.plan_schema()``, derived by
``schemars`` from the Rust types serde reads). Fails when either side drifts: an op the engine does
not know, a field renamed or added on one side, a required field made optional, a type changed.

- every typed op of :mod:`dqfast.plan` (``OPS``) matches its schema op: same name, same fields,
  required exactly where it has no default, and its annotations the schema's types (recursively
  through ``SrcRef``, the tagged ``ScaleSpec`` / ``NvAmax`` unions and string enums);
- every op the builders emit on synthetic checkpoints (fp8 from an export and from BF16, nvfp4,
  mixed, mxfp8, fused-QKV rewrites) validates against the schema, and so does the plan itself.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from dqfast import _core
from dqfast import plan as plan_mod
from dqfast.errors import PlanError
from dqfast.fp8 import build_fp8_transformer
from dqfast.mixed import build_mixed_transformer
from dqfast.nvfp4 import build_nvfp4_transformer
from dqfast.plan import OPS, PlanBuilder
from dqfast.synth import make_transformer
from dqfast.weight_only import build_mxfp8_transformer

SCHEMA: dict[str, Any] = json.loads(_core.plan_schema())
DEFS: dict[str, Any] = SCHEMA["$defs"]
# Op name -> its schema branch (properties include "op"; OutTensor adds "name").
BRANCHES: dict[str, dict[str, Any]] = {b["properties"]["op"]["const"]: b for b in DEFS["OutTensor"]["oneOf"]}


def _deref(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = DEFS[node["$ref"].rsplit("/", 1)[1]]
    return node


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1, f"{tp}: one type or None"
        return rest[0], True
    return tp, False


def _consts(node: dict[str, Any]) -> set[str] | None:
    """The values of a string enum (schemars writes them as a oneOf of consts)."""
    node = _deref(node)
    if "oneOf" in node and all("const" in b and b.get("type") == "string" for b in node["oneOf"]):
        return {b["const"] for b in node["oneOf"]}
    if "enum" in node:
        return set(node["enum"])
    return None


def assert_type_matches(tp: Any, node: dict[str, Any], where: str) -> None:
    """The Python annotation ``tp`` describes the same values as the schema ``node``."""
    consts = _consts(node)
    if consts is not None:
        assert typing.get_origin(tp) is typing.Literal, f"{where}: {tp} should be Literal{sorted(consts)}"
        assert set(typing.get_args(tp)) == consts, f"{where}: {typing.get_args(tp)} != {sorted(consts)}"
        return
    node = _deref(node)
    if "oneOf" in node:  # an internally tagged union of TypedDicts (tag `kind`)
        members = typing.get_args(tp) or (tp,)
        by_tag = {typing.get_args(typing.get_type_hints(m)["kind"])[0]: m for m in members}
        want = {b["properties"]["kind"]["const"]: b for b in node["oneOf"]}
        assert set(by_tag) == set(want), f"{where}: variants {sorted(by_tag)} != {sorted(want)}"
        for tag, branch in want.items():
            assert_typed_dict(by_tag[tag], branch, f"{where}[{tag}]")
        return
    kind = node.get("type")
    if kind == "object":
        assert_typed_dict(tp, node, where)
    elif kind == "array":
        assert typing.get_origin(tp) is list, f"{where}: {tp} should be a list"
        assert_type_matches(typing.get_args(tp)[0], node["items"], f"{where}[]")
    else:
        py = {"integer": int, "number": float, "boolean": bool, "string": str}[kind]
        assert tp is py, f"{where}: {tp} should be {py.__name__} (schema {kind})"


def assert_typed_dict(td: Any, node: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(td)
    props = node["properties"]
    assert set(hints) == set(props), f"{where}: fields {sorted(hints)} != schema {sorted(props)}"
    assert set(td.__required_keys__) == set(node.get("required", [])), f"{where}: required keys differ"
    for k, sub in props.items():
        if k != "kind":
            assert_type_matches(hints[k], sub, f"{where}.{k}")


def test_every_engine_op_has_a_typed_op_and_back() -> None:
    assert set(OPS) == set(BRANCHES)


@pytest.mark.parametrize("op", sorted(BRANCHES))
def test_typed_op_matches_the_schema(op: str) -> None:
    cls, branch = OPS[op], BRANCHES[op]
    props = {k: v for k, v in branch["properties"].items() if k != "op"}
    required = set(branch["required"]) - {"op"}
    got = {f.name: f for f in fields(cls)}
    assert set(got) == set(props), f"{op}: fields {sorted(got)} != schema {sorted(props)}"
    hints = typing.get_type_hints(cls)
    for name, f in got.items():
        tp, optional = _strip_none(hints[name])
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        assert has_default == (name not in required), f"{op}.{name}: required in the schema = no default in Python"
        assert optional == has_default, f"{op}.{name}: an optional field defaults to None (the engine's default)"
        assert_type_matches(tp, props[name], f"{op}.{name}")


def _validate_tensor(t: dict[str, Any]) -> None:
    branch = BRANCHES[t["op"]]  # KeyError: an op the engine does not know
    extra = set(t) - set(branch["properties"]) - {"name"}
    assert not extra, f"'{t['name']}' ({t['op']}): fields the engine does not know: {sorted(extra)}"
    jsonschema.validate(t, {**DEFS["OutTensor"], "$defs": DEFS})


def _validate_plan(plan_json: str) -> list[str]:
    p = json.loads(plan_json)
    for t in p["tensors"]:
        _validate_tensor(t)
    jsonschema.validate({**p, "tensors": []}, SCHEMA)
    return [t["op"] for t in p["tensors"]]


def test_the_checker_catches_drift() -> None:
    """A field the engine does not know, a wrong type, a missing field: each is caught (and the
    engine itself refuses the unknown field)."""
    ok = {"name": "w", "op": "fp8", "src": {"source": 0, "tensor": "w"}, "scale": {"kind": "values", "values": [1.0]}}
    _validate_tensor(ok)
    with pytest.raises(AssertionError, match="fields the engine does not know"):
        _validate_tensor({**ok, "saturaton": "clamp"})
    with pytest.raises(jsonschema.ValidationError):
        _validate_tensor({**ok, "scale": {"kind": "values", "values": "1.0"}})
    with pytest.raises(jsonschema.ValidationError):
        _validate_tensor({k: v for k, v in ok.items() if k != "scale"})
    with pytest.raises(KeyError):
        _validate_tensor({**ok, "op": "fp9"})
    bad = PlanBuilder("/nonexistent/out")
    bad.sources = ["/nonexistent/in"]
    bad.tensors = [{**ok, "saturaton": "clamp"}]
    with pytest.raises(PlanError, match="unknown field `saturaton`"):
        _core.validate_plan(bad.to_json())


def test_add_takes_only_typed_ops() -> None:
    p = PlanBuilder("/nonexistent/out")
    with pytest.raises(TypeError, match="dqfast.plan.OPS"):
        p.add("w", "copy")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Every op the builders emit, each plan validated against the schema on its way to the engine."""
    root = tmp_path_factory.mktemp("schema")
    flux = make_transformer(root / "flux", "flux1", blocks=1, single_blocks=1, heads=2, head_dim=64, seed=5, modelopt_fp8_export=True)
    ops: list[str] = []
    real_execute, real_validate = _core.execute_plan, _core.validate_plan

    def execute(plan_json: str, *a: Any) -> str:
        ops.extend(_validate_plan(plan_json))
        return real_execute(plan_json, *a)

    def validate(plan_json: str) -> None:
        ops.extend(_validate_plan(plan_json))
        real_validate(plan_json)

    mp = pytest.MonkeyPatch()
    mp.setattr(plan_mod._core, "execute_plan", execute)
    mp.setattr(plan_mod._core, "validate_plan", validate)
    try:
        out = root / "out"
        kw: dict[str, Any] = {"fsync": False, "overwrite": True, "target": "none"}  # every op, whatever an engine loads
        build_fp8_transformer(
            out, modelopt_hf_dir=flux.export_root, modelopt_backbone_ckpt=flux.backbone, base_transformer_dir=flux.base, **kw
        )
        build_fp8_transformer(out, modelopt_hf_dir=flux.export_root, base_transformer_dir=flux.base, repair_nan=True, requantize=True, **kw)
        build_fp8_transformer(out, base_transformer_dir=flux.base, from_bf16=True, **kw)
        build_fp8_transformer(out, base_transformer_dir=flux.base, from_bf16=True, weight_granularity="tensor", activation_amax=448.0, **kw)
        build_nvfp4_transformer(out, base_transformer_dir=flux.base, from_bf16=True, **kw)
        build_mixed_transformer(out, flux.base, fp8_activation_amax=10.0, **kw)
        build_mxfp8_transformer(out, base_transformer_dir=flux.base, **kw)
        build_fp8_transformer(root / "dry", base_transformer_dir=flux.base, from_bf16=True, dry_run=True)
    finally:
        mp.undo()
    return ops


def test_builders_emit_only_schema_valid_ops(emitted: list[str]) -> None:
    # The builders above reach these ops; each tensor of each plan was validated on the way.
    assert {"copy", "fp8", "f32", "scale_of", "scale_from_amax", "nvfp4_weight", "nvfp4_block_scales"} <= set(emitted)
    assert {"nvfp4_global_scale", "block_values", "block_scales"} <= set(emitted)


def test_nvfp4_export_and_fused_qkv_ops(modelopt_fixture: Any, tmp_path: Path) -> None:
    """The NVFP4 export path (nibble swap) against the schema too."""
    f4 = modelopt_fixture("flux", "nvfp4")
    seen: list[str] = []
    real = _core.execute_plan

    def execute(plan_json: str, *a: Any) -> str:
        seen.extend(_validate_plan(plan_json))
        return real(plan_json, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_mod._core, "execute_plan", execute)
        build_nvfp4_transformer(
            tmp_path / "o",
            modelopt_hf_dir=f4.hf_dir,
            base_transformer_dir=f4.base_dir,
            model_type="flux1",
            swap_weight_nibbles=True,
            fsync=False,
            target="none",  # sglang keeps the bytes (and writes the flag): no swap_nibbles op
        )
    assert "swap_nibbles" in seen and "copy" in seen
