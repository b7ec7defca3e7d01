"""load_quantized on a tiny random FLUX.1 transformer quantized to ModelOpt-format dirs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from dqfast.runtime import CheckpointMismatch, Fp8Linear, Nvfp4Linear, load_quantized
from dqfast.runtime.loader import _pattern_matches
from dqfast.verify.reference import calibrate_input_amax, export_reference_checkpoint
from safetensors.torch import load_file, save_file
from test_runtime_support import FLUX1_FALLBACK, cosine, run_model, tiny_flux, tiny_flux_inputs


@pytest.fixture(scope="module")
def base_and_amax():
    model = tiny_flux(0)
    inputs = tiny_flux_inputs()
    return model, calibrate_input_amax(model, [inputs]), inputs


def _export(tmp_path, base_and_amax, algo, **kw):
    model, amax, _ = base_and_amax
    export_reference_checkpoint(model, tmp_path, algo, input_amax=amax, **kw)
    return tmp_path


def test_ignore_patterns() -> None:
    assert _pattern_matches("proj_out", "proj_out")
    assert not _pattern_matches("proj_out", "single_transformer_blocks.0.proj_out")
    assert _pattern_matches("transformer_blocks.*.ff.net.2", "transformer_blocks.3.ff.net.2")
    assert _pattern_matches("context_embedder*", "context_embedder")
    assert _pattern_matches("time_text_embed*", "time_text_embed.text_embedder.linear_1")


def test_fp8_checkpoint_loads_and_matches_base(tmp_path, base_and_amax) -> None:
    base, _, inputs = base_and_amax
    _export(tmp_path, base_and_amax, "FP8", ignore=FLUX1_FALLBACK + ["proj_out"])
    model = tiny_flux(seed=123)  # different init: every value must come from the checkpoint
    report = load_quantized(model, tmp_path)
    mods = dict(model.named_modules())
    assert isinstance(mods["transformer_blocks.0.attn.to_q"], Fp8Linear)
    assert isinstance(mods["transformer_blocks.0.ff.net.2"], torch.nn.Linear)
    assert isinstance(mods["proj_out"], torch.nn.Linear) and not isinstance(mods["proj_out"], Fp8Linear)
    assert "transformer_blocks.1.norm1.linear" in report.high_precision_layers
    tensors = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(
        mods["transformer_blocks.1.attn.to_k"].weight.view(torch.uint8), tensors["transformer_blocks.1.attn.to_k.weight"].view(torch.uint8)
    )
    assert report.tensors_loaded == len(tensors)
    c = cosine(run_model(model, inputs), run_model(base, inputs))
    assert c > 0.995, c


def test_nvfp4_sharded_with_swapped_nibbles(tmp_path, base_and_amax) -> None:
    base, _, inputs = base_and_amax
    _export(tmp_path, base_and_amax, "NVFP4", num_shards=3, swap_weight_nibbles=True, ignore=["proj_out"])
    plain = tmp_path / "plain"
    export_reference_checkpoint(base, plain, "NVFP4", input_amax=base_and_amax[1], ignore=["proj_out"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    model = tiny_flux(seed=5)
    report = load_quantized(model, tmp_path)
    assert report.nibbles_swapped and len(report.nvfp4_layers) > 30
    q = dict(model.named_modules())["transformer_blocks.0.attn.to_v"]
    assert isinstance(q, Nvfp4Linear)
    expect = load_file(str(plain / "diffusion_pytorch_model.safetensors"))["transformer_blocks.0.attn.to_v.weight"]
    assert torch.equal(q.weight, expect)  # bytes back in runtime order
    c = cosine(run_model(model, inputs), run_model(base, inputs))
    assert c > 0.95, c


def test_mixed_precision(tmp_path, base_and_amax) -> None:
    layers = {
        "transformer_blocks.0.attn.to_q": "FP8",
        "transformer_blocks.0.attn.to_k": "NVFP4",
        "single_transformer_blocks.1.proj_out": "NVFP4",
    }
    _export(tmp_path, base_and_amax, "MIXED_PRECISION", layer_algos=layers)
    model = tiny_flux(seed=9)
    report = load_quantized(model, tmp_path)
    assert report.fp8_layers == ["transformer_blocks.0.attn.to_q"]
    assert sorted(report.nvfp4_layers) == sorted(k for k, v in layers.items() if v == "NVFP4")


def test_nan_block_scale_is_clamped_with_warning(tmp_path, base_and_amax) -> None:
    _export(tmp_path, base_and_amax, "NVFP4")
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    name = "transformer_blocks.0.attn.to_q.weight_scale"
    raw = t[name].view(torch.uint8).clone()
    raw[0, 0] = 0x7F
    raw[1, 1] = 0xFF
    t[name] = raw.view(torch.float8_e4m3fn)
    save_file(t, str(f))
    model = tiny_flux(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_quantized(model, tmp_path)
    assert report.nan_scales_clamped == {name: 2}
    assert any(name in str(w.message) for w in caught)
    ws = dict(model.named_modules())["transformer_blocks.0.attn.to_q"].weight_scale
    assert ws.view(torch.uint8)[0, 0] == 0x7E and not torch.isnan(ws.float()).any()


def _corrupt(path, fn) -> None:
    f = path / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing_input_scale", r"missing tensor transformer_blocks\.0\.attn\.to_q\.input_scale"),
        ("wrong_dtype", r"transformer_blocks\.0\.attn\.to_q\.weight in diffusion_pytorch_model\.safetensors: dtype"),
        ("wrong_shape", r"transformer_blocks\.0\.attn\.to_q\.weight_scale in diffusion_pytorch_model\.safetensors: shape"),
        ("unexpected", r"unexpected tensor extra\.thing in diffusion_pytorch_model\.safetensors"),
        ("missing_norm", r"missing tensor norm_out\.linear\.bias"),
    ],
)
def test_mismatches_are_refused(tmp_path, base_and_amax, case, pattern) -> None:
    _export(tmp_path, base_and_amax, "FP8")
    mutate = {
        "missing_input_scale": lambda t: t.pop("transformer_blocks.0.attn.to_q.input_scale"),
        "wrong_dtype": lambda t: t.__setitem__("transformer_blocks.0.attn.to_q.weight", t["transformer_blocks.0.attn.to_q.weight"].float()),
        "wrong_shape": lambda t: t.__setitem__("transformer_blocks.0.attn.to_q.weight_scale", torch.ones(3)),
        "unexpected": lambda t: t.__setitem__("extra.thing", torch.zeros(2)),
        "missing_norm": lambda t: t.pop("norm_out.linear.bias"),
    }[case]
    _corrupt(tmp_path, mutate)
    with pytest.raises(CheckpointMismatch, match=pattern):
        load_quantized(tiny_flux(seed=2), tmp_path)


def test_non_modelopt_config_is_refused(tmp_path, base_and_amax) -> None:
    _export(tmp_path, base_and_amax, "FP8")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match="not a ModelOpt"):
        load_quantized(tiny_flux(), tmp_path)
