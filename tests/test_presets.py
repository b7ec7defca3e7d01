"""Preset rules for every model family: name variants, canonicalization, fallbacks before ignore."""

from __future__ import annotations

import json
from pathlib import Path

import dqfast
import pytest
from dqfast.presets import PRESETS, detect_preset, get_preset, ignore_pattern_matches

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")


def test_every_preset_compiles_and_is_documented():
    for p in PRESETS.values():
        assert p.source, p.name
        p.fp8_fallback_match("x")  # compiles all regexes
        p.nvfp4_fallback_match("x")
        p.ptq_disabled_match("x")


@pytest.mark.parametrize(
    "preset, module, fallback",
    [
        ("flux1", "transformer_blocks.3.norm1.linear", True),
        ("flux1", "transformer_blocks.3.ff.net.0.proj", True),
        ("flux1", "transformer_blocks.3.attn.to_q", False),
        ("flux1", "single_transformer_blocks.0.proj_mlp", False),  # SGLang@27b84fc dropped it for FP8
        ("flux2", "double_stream_modulation_img.linear", True),
        ("flux2", "time_guidance_embed.guidance_embedder.linear_2", True),
        ("flux2", "transformer_blocks.0.attn.to_q", False),
        ("hunyuan-video", "context_embedder.token_refiner.refiner_blocks.0.attn.to_q", True),
        ("hunyuan-video", "transformer_blocks.1.norm1_context.linear", True),
        ("hunyuan-video", "single_transformer_blocks.2.proj_mlp", False),
        ("qwen-image", "transformer_blocks.7.img_mod.1", True),  # canonicalized to .img_mod
        ("qwen-image", "transformer_blocks.7.txt_mod.1", True),
        ("qwen-image", "transformer_blocks.7.img_mlp.net.2", True),
        ("qwen-image", "transformer_blocks.7.img_mlp.net.0.proj", False),
        ("wan", "condition_embedder.time_embedder.linear_1", True),
        ("wan", "blocks.5.attn1.to_q", False),
        ("none", "transformer_blocks.3.norm1.linear", False),
    ],
)
def test_fp8_fallbacks(preset, module, fallback):
    assert (get_preset(preset).fp8_fallback_match(module) is not None) is fallback


def test_hunyuan_runtime_names_are_the_preferred_variant():
    p = get_preset("hunyuan-video")
    assert p.name_variants("transformer_blocks.4.attn.to_k")[-1] == "double_blocks.4.img_attn_qkv"
    assert p.name_variants("single_transformer_blocks.2.proj_mlp")[-1] == "single_blocks.2.linear1"
    assert p.name_variants("proj_out")[-1] == "final_layer.linear"
    # The FeedForward rename happens before the runtime map, as in SGLang's builder.
    v = get_preset("flux1").name_variants("model.diffusion_model.transformer_blocks.0.ff.net.2")
    assert v[:2] == ["model.diffusion_model.transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff.net.2"]
    assert "transformer_blocks.0.ff.proj_out" in v


def test_detection_and_ignore_semantics():
    assert detect_preset({"_class_name": "QwenImageTransformer2DModel"}).name == "qwen-image"
    assert detect_preset({"_class_name": "Unknown"}).name == "none"
    assert ignore_pattern_matches("norm_out*", "norm_out")
    assert ignore_pattern_matches("norm_out*", "norm_out.linear")
    assert ignore_pattern_matches("transformer_blocks.*.norm1.linear*", "transformer_blocks.12.norm1.linear")
    assert not ignore_pattern_matches("proj_out", "single_transformer_blocks.0.proj_out")


def test_qwen_fallback_beats_modelopt_fp8_export(tmp_path: Path):
    """A Qwen-Image export whose `.img_mod.1` ModelOpt quantized (and did not ignore): the preset's
    canonicalized fallback must write the BF16 base weight, never the FP8 one."""
    g = torch.Generator().manual_seed(0)
    base_sd, export_sd, amax = {}, {}, {}
    for m in ("transformer_blocks.0.img_mod.1", "transformer_blocks.0.attn.to_q"):
        w = (torch.randn(32, 64, generator=g) * 0.02).to(torch.bfloat16)
        base_sd[f"{m}.weight"] = w
        a = w.float().abs().max()
        export_sd[f"{m}.weight"] = (w / (a / 448)).to(torch.float8_e4m3fn)
        export_sd[f"{m}.weight_scale"] = (a / 448).reshape(())
        export_sd[f"{m}.input_scale"] = torch.tensor(0.01)
        amax[f"{m}.weight_quantizer._amax"] = a.to(torch.bfloat16)
        amax[f"{m}.input_quantizer._amax"] = torch.tensor(4.48, dtype=torch.bfloat16)
    cfg = {"_class_name": "QwenImageTransformer2DModel"}
    (tmp_path / "base").mkdir()
    (tmp_path / "hf" / "transformer").mkdir(parents=True)
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    st.save_file(base_sd, str(tmp_path / "base" / "diffusion_pytorch_model.safetensors"))
    qcfg = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": [], "producer": {"name": "modelopt", "version": "0.47.0"}}
    (tmp_path / "hf" / "transformer" / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg}))
    st.save_file(export_sd, str(tmp_path / "hf" / "transformer" / "diffusion_pytorch_model.safetensors"))
    st.save_file(amax, str(tmp_path / "amax.safetensors"))
    out = tmp_path / "out"
    r = dqfast.build_fp8_transformer(
        out,
        modelopt_hf_dir=tmp_path / "hf",
        modelopt_backbone_ckpt=tmp_path / "amax.safetensors",
        base_transformer_dir=tmp_path / "base",
        model_type="auto",
    )
    got = st.load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert got["transformer_blocks.0.img_mod.1.weight"].dtype == torch.bfloat16
    assert torch.equal(got["transformer_blocks.0.img_mod.1.weight"], base_sd["transformer_blocks.0.img_mod.1.weight"])
    assert "transformer_blocks.0.img_mod.1.weight_scale" not in got
    assert got["transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "transformer_blocks.0.img_mod.1" in ignore and "transformer_blocks.0.img_mod" in ignore
    assert {d.action for d in r.decisions} == {"fp8", "bf16-fallback"}


def test_config_resolution_forms(tmp_path: Path):
    """Flat config, legacy hf_quant_config.json, safetensors metadata, and tensor-family inference."""
    from dqfast.quant_config import resolve_quant_config

    w = torch.zeros(8, 16, dtype=torch.uint8)
    s = torch.zeros(8, 2, dtype=torch.float8_e4m3fn)
    tensors = {
        "a.weight": w,
        "a.weight_scale": s,
        "a.weight_scale_2": torch.tensor(1.0),
        "b.weight": torch.zeros(4, 4, dtype=torch.bfloat16),
        "c.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
    }
    d = tmp_path / "inferred"
    d.mkdir()
    st.save_file(tensors, str(d / "m.safetensors"))
    qc = resolve_quant_config(d)
    assert qc.quant_algo == "MIXED_PRECISION" and qc.group_size == 16
    assert qc.algo_for("a") == "NVFP4" and qc.algo_for("c") == "FP8" and qc.algo_for("b") is None

    d2 = tmp_path / "meta"
    d2.mkdir()
    meta = {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["b"], "group_size": 16}
    st.save_file(tensors, str(d2 / "m.safetensors"), metadata={"_quantization_metadata": json.dumps(meta)})
    qc = resolve_quant_config(d2)
    assert qc.quant_algo == "NVFP4" and qc.is_ignored("b") and "metadata" in qc.source

    d3 = tmp_path / "legacy"
    d3.mkdir()
    (d3 / "hf_quant_config.json").write_text(
        json.dumps(
            {
                "producer": {"name": "modelopt"},
                "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["proj_out"]},
            }
        )
    )
    qc = resolve_quant_config(d3)
    assert qc.quant_algo == "FP8" and qc.is_ignored("proj_out") and not qc.is_ignored("x")

    d4 = tmp_path / "flat"
    d4.mkdir()
    (d4 / "config.json").write_text(
        json.dumps(
            {
                "quantization_config": {
                    "quant_method": "modelopt",
                    "quant_algo": "MIXED_PRECISION",
                    "quantized_layers": {"blocks.0.ffn": {"quant_algo": "NVFP4", "group_size": 16}},
                }
            }
        )
    )
    qc = resolve_quant_config(d4)
    assert qc.algo_for("blocks.0.ffn") == "NVFP4" and qc.algo_for("blocks.1.ffn") is None
    (d4 / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert resolve_quant_config(d4) is None
