"""The format registry (``dqfast.formats``): one entry per weight format, and the places that used
to make their own format decisions (``quant_config``, ``inspect``, ``check``, ``verify``, the
runtime loader) answering from it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from dqfast import _core, formats
from dqfast.builders import BUILDERS
from dqfast.check import _check_one, _engine_algo
from dqfast.formats import BF16, FP8, FP8_CHANNEL, MXFP8, NVFP4, classify
from dqfast.inspect import inspect_checkpoint
from dqfast.plan import OPS
from dqfast.quant_config import KNOWN_ALGOS, QuantConfig
from dqfast.reader import TensorMeta
from dqfast.targets import TARGETS
from malformed.corpus import write_safetensors


def _t(dtype: str, shape: list[int]) -> TensorMeta:
    n = 1
    for d in shape:
        n *= d
    return TensorMeta("x", dtype, tuple(shape), n, "f.safetensors")


def test_numbers_come_from_the_engine() -> None:
    assert NVFP4.block == _core.NVFP4_GROUP
    assert MXFP8.block == _core.BLOCK_FORMATS["mxfp8"]["block"]
    assert NVFP4.config_weights["group_size"] == _core.NVFP4_GROUP
    assert NVFP4.layer_entry() == {"quant_algo": "NVFP4", "group_size": _core.NVFP4_GROUP}
    assert FP8.layer_entry() == {"quant_algo": "FP8"}


def test_builders_and_ops_exist() -> None:
    # Every op a format names is an engine op: a typed op of dqfast.plan, which
    # tests/test_plan_schema.py checks against the Rust schema (_core.plan_schema()).
    for f in formats.FORMATS.values():
        assert set(f.ops) <= set(OPS), (f.name, set(f.ops) - set(OPS))
        assert f.builder is None or f.builder in BUILDERS, f.name


def test_config_reader_knows_the_registrys_algos() -> None:
    assert KNOWN_ALGOS == {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_NVFP4", "MIXED_PRECISION"}
    assert KNOWN_ALGOS == formats.algo_names("modelopt")
    assert formats.format_for_method("MXFP8") is MXFP8
    assert formats.format_for_method("modelopt") is None
    assert formats.format_of_algo("w4a16_nvfp4") is NVFP4
    with pytest.raises(formats.PlanError, match="MIXED_PRECISION"):
        formats.format_of_algo("MIXED_PRECISION")


@pytest.mark.parametrize(
    ("parts", "want"),
    [
        ({"weight": ("BF16", [4, 32])}, BF16),
        ({"weight": ("F8_E4M3", [4, 32]), "weight_scale": ("F32", [])}, FP8),
        ({"weight": ("F8_E4M3", [4, 32]), "weight_scale": ("F32", [1])}, FP8),
        ({"weight": ("F8_E4M3", [4, 32])}, FP8),  # scale missing: FP8, and inspect says so
        ({"weight": ("F8_E4M3", [4, 32]), "weight_scale": ("F32", [4])}, FP8_CHANNEL),
        ({"weight": ("F8_E4M3", [4, 32]), "weight_scale": ("U8", [4, 1])}, MXFP8),
        ({"weight": ("U8", [4, 16]), "weight_scale": ("F8_E4M3", [4, 2])}, NVFP4),
        ({"weight": ("F8_E5M2", [4, 32])}, None),
        ({"weight": ("I8", [4, 32])}, None),
        ({"bias": ("BF16", [4])}, None),
    ],
)
def test_classify(parts: dict[str, tuple[str, list[int]]], want: formats.WeightFormat | None) -> None:
    assert classify({k: _t(*v) for k, v in parts.items()}) is want


def test_check_uses_the_one_mixed_precision_matcher() -> None:
    # check.py had its own matcher: the first listed prefix, not the nearest listed ancestor the
    # builders and the runtime use; with both 'blocks.0' and 'blocks.0.ff' listed it said FP8.
    t = TARGETS["vllm-omni"]
    layers = {"blocks.0": {"quant_algo": "FP8"}, "blocks.0.ff": {"quant_algo": "NVFP4", "group_size": 16}}
    qc = QuantConfig("MIXED_PRECISION", quantized_layers=layers)
    assert qc.algo_for("blocks.0.ff.net.2") == "NVFP4"
    assert _engine_algo(t, "unknown", qc, "blocks.0.ff.net.2") == ("NVFP4", "")


def test_check_tells_mxfp8_from_per_channel_fp8() -> None:
    # An MXFP8 layer (e4m3 weight, U8 E8M0 block scales) under an FP8 config was taken for
    # per-channel FP8 and said to load; its scales are exponents, not float32 channel scales.
    t = TARGETS["vllm-omni"]
    qc = QuantConfig("FP8_PER_CHANNEL_PER_TOKEN")
    tensors = {"blk.weight": _t("F8_E4M3", [4, 32]), "blk.weight_scale": _t("U8", [4, 1])}
    rep = _check_one(t, Path("."), "unknown", qc, tensors)
    (v,) = rep.layers
    assert (v.stored, v.outcome) == ("MXFP8", "error"), v
    tensors["blk.weight_scale"] = _t("F32", [4])
    (v,) = _check_one(t, Path("."), "unknown", qc, tensors).layers
    assert (v.stored, v.outcome) == ("FP8 per-channel", "quantized"), v


def _nvfp4_dir(tmp_path: Path, algo: str) -> Path:
    d = tmp_path / algo
    d.mkdir()
    cfg = {"_class_name": "X", "quantization_config": {"quant_method": "modelopt", "quant_algo": algo, "group_size": 16}}
    (d / "config.json").write_text(json.dumps(cfg))
    write_safetensors(
        d / "diffusion_pytorch_model.safetensors",
        {
            "blk.weight": ("U8", [2, 16], bytes(32)),
            "blk.weight_scale": ("F8_E4M3", [2, 2], bytes([0x38]) * 4),
            "blk.weight_scale_2": ("F32", [], struct.pack("<f", 1.0)),
        },
    )
    return d


def test_inspect_reports_a_missing_nvfp4_input_scale(tmp_path: Path) -> None:
    # quant_algo NVFP4 quantizes activations with a static input_scale (the runtime loader refuses
    # a layer without one); inspect only checked FP8's. W4A16_NVFP4 needs none.
    r = inspect_checkpoint(_nvfp4_dir(tmp_path, "NVFP4"))
    assert r.problems == ["blk: NVFP4 weight without input_scale (quant_algo NVFP4 is static)"]
    assert r.modules == {"nvfp4": 1}
    assert inspect_checkpoint(_nvfp4_dir(tmp_path, "W4A16_NVFP4")).problems == []


def test_inspect_checks_block_scale_shapes_from_the_registry(tmp_path: Path) -> None:
    # One rule for every block format: weight_scale [N, K/block], K counted in elements (NVFP4
    # packs two per byte). NVFP4 used to be checked on columns only, so a scale with the wrong
    # number of rows passed.
    d = _nvfp4_dir(tmp_path, "W4A16_NVFP4")
    write_safetensors(
        d / "diffusion_pytorch_model.safetensors",
        {
            "blk.weight": ("U8", [2, 16], bytes(32)),
            "blk.weight_scale": ("F8_E4M3", [1, 2], bytes([0x38]) * 2),
            "blk.weight_scale_2": ("F32", [], struct.pack("<f", 1.0)),
        },
    )
    assert inspect_checkpoint(d).problems == [
        "blk: NVFP4 weight [2, 16] (K = 32 elements) needs K % 16 == 0 and weight_scale [2, 2], has [1, 2]"
    ]
    assert NVFP4.block_scale_shape((2, 16)) == [2, 2]
    assert MXFP8.block_scale_shape((2, 64)) == [2, 2]
    assert MXFP8.block_scale_shape((2, 48)) is None
    assert FP8.block_scale_shape((2, 64)) is None


def test_op_outputs_come_from_the_registry() -> None:
    # check.plan_tensors (--target, before writing) asks the registry what a format's op writes;
    # it had the dtypes and k // 2, k // 16, k // 32 written out per op.
    assert formats.op_output("fp8", (4, 64)) == ("F8_E4M3", (4, 64))
    assert formats.op_output("nvfp4_weight", (4, 64)) == ("U8", (4, 32))
    assert formats.op_output("nvfp4_block_scales", (4, 64)) == ("F8_E4M3", (4, 64 // _core.NVFP4_GROUP))
    assert formats.op_output("block_values", (4, 64), "mxfp8") == ("F8_E4M3", (4, 64))
    assert formats.op_output("block_scales", (4, 64), "mxfp8") == ("U8", (4, 64 // _core.BLOCK_FORMATS["mxfp8"]["block"]))
    # The block ops are shared by every block format: without their `format` they name no output.
    assert formats.op_output("block_values", (4, 64)) is None
    assert formats.op_output("block_values", (4, 64), "mxfp9") is None
    assert formats.op_output("copy", (4, 64)) is None
    assert formats.op_output("nvfp4_weight", ()) is None
    for f in formats.FORMATS.values():
        assert {f.weight_op, f.block_scale_op} - {None} <= set(f.ops), f.name


def test_verify_names_a_format_it_does_not_dequantize(tmp_path: Path) -> None:
    # verify dispatched on the weight's torch dtype alone: an MXFP8 layer (e4m3 weight, U8 E8M0
    # scales) in a ModelOpt FP8 checkpoint was taken for FP8 and its exponent bytes for scales.
    pytest.importorskip("torch")
    from dqfast.errors import CheckpointError
    from dqfast.verify.layers import layer_errors

    base, quant = tmp_path / "base", tmp_path / "quant"
    base.mkdir()
    quant.mkdir()
    write_safetensors(base / "diffusion_pytorch_model.safetensors", {"blk.weight": ("BF16", [4, 32], bytes(256))})
    cfg = {"_class_name": "X", "quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}}
    (quant / "config.json").write_text(json.dumps(cfg))
    write_safetensors(
        quant / "diffusion_pytorch_model.safetensors",
        {"blk.weight": ("F8_E4M3", [4, 32], bytes([0x38]) * 128), "blk.weight_scale": ("U8", [4, 1], bytes([127]) * 4)},
    )
    with pytest.raises(CheckpointError, match="blk: MXFP8 weights under quant_algo FP8_PER_CHANNEL_PER_TOKEN are not verified"):
        layer_errors(base, quant)


def test_every_engine_block_format_has_one_weight_only_entry() -> None:
    # A block format is its Rust entry (_core.BLOCK_FORMATS) plus one weight_only_format() entry:
    # the numbers are Rust's, the entry adds only the engine's config.
    wo = {n: f for n, f in formats.FORMATS.items() if f.weight_only}
    assert set(wo) == set(_core.BLOCK_FORMATS)
    for name, core in _core.BLOCK_FORMATS.items():
        f = wo[name]
        assert (f.block, f.elements_per_byte, f.weight_dtype, f.scale_dtype) == (
            core["block"],
            core["elements_per_byte"],
            core["values_dtype"],
            core["scales_dtype"],
        )
        assert f.algos == (core["label"],) and f.builder == name and f.quant_method != "modelopt"
    # classify() tells block formats apart by (weight dtype, scale dtype): no two may share them.
    keys = [(f.weight_dtype, f.scale_dtype) for f in formats.FORMATS.values() if f.scale_per == "block"]
    assert len(keys) == len(set(keys))
    with pytest.raises(formats.PlanError, match="no block format 'mxfp9' in the engine .known: mxfp8"):
        formats.weight_only_format("mxfp9", quant_method="mxfp9", method_config={})
