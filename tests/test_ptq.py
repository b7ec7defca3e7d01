"""End-to-end ModelOpt PTQ on CPU: tiny FLUX / Wan transformers, FP8 and NVFP4."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from dqfast.backbone import read_amax
from dqfast.errors import PlanError
from dqfast.ptq.presets import PRESETS, get_preset

CASES = [("flux", "fp8"), ("flux", "nvfp4"), ("wan", "fp8"), ("wan", "nvfp4")]


def test_import_needs_no_torch():
    code = "import sys, dqfast.ptq, dqfast.backbone; print(sorted({'torch','modelopt','diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ptq_filters_come_from_model_presets():
    from dqfast import presets as model_presets

    # One source of truth: the PTQ presets hold no regexes of their own.
    for name, p in PRESETS.items():
        assert p.disable == model_presets.PRESETS[name].ptq_disabled
    assert get_preset("flux").name == "flux1" and get_preset("wan2.2").name == "wan"
    # ModelOpt's filter_func_flux_dev / filter_func_wan_video, as written in its example.
    assert get_preset("flux1").disable == (
        r"(proj_out.*|.*(time_text_embed|context_embedder|x_embedder|norm_out|time_guidance_embed|stream_modulation).*)",
    )
    assert get_preset("wan").disable == (r".*(patch_embedding|condition_embedder|proj_out|blocks\.(0|1|2|37|38|39)\.).*",)
    assert get_preset("flux2").recipe("nvfp4").endswith("nvfp4_fp8_mha")
    assert get_preset("wan").recipe("nvfp4").endswith("/nvfp4")


def test_qwen_block_range_rules_from_block_count():
    rules = get_preset("qwen-image").block_range.quant_cfg_rules(6)

    # Last rule wins in ModelOpt's quant_cfg: evaluate the rules in order for a few names.
    def enabled(q: str) -> bool:
        state = None
        for r in rules:
            if fnmatch.fnmatchcase(q, r["quantizer_name"]):
                state = r["enable"]
        return bool(state)

    assert not enabled("img_in.weight_quantizer")
    assert not enabled("transformer_blocks.1.attn.to_q.weight_quantizer")
    assert not enabled("transformer_blocks.4.img_mlp.net.2.input_quantizer")
    assert enabled("transformer_blocks.2.attn.to_q.weight_quantizer")
    assert enabled("transformer_blocks.3.txt_mod.1.weight_quantizer")
    with pytest.raises(PlanError, match="needs at least"):
        get_preset("qwen-image").block_range.quant_cfg_rules(5)
    # The post-calibration filter (60-block literal) still disables everything outside the blocks.
    pats = [re.compile(p) for p in get_preset("qwen-image").disable_patterns()]
    assert any(p.match("img_in.weight_quantizer") for p in pats)
    assert any(p.match("transformer_blocks.59.attn.to_q.weight_quantizer") for p in pats)
    assert not any(p.match("transformer_blocks.30.attn.to_q.weight_quantizer") for p in pats)
    assert {"flux1", "flux2", "wan", "qwen-image", "hunyuan-video", "none"} <= set(PRESETS)


torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")
pytest.importorskip("diffusers")

from modelopt_fixtures import TINY_CONFIGS, build_fixture, fixture_root, load_base  # noqa: E402
from safetensors import safe_open  # noqa: E402


@pytest.fixture(scope="session")
def modelopt_outputs(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return {(m, a): build_fixture(fixture_root(base, m), m, a) for m, a in CASES}


def _tensors(hf_dir):
    out = {}
    with safe_open(str(hf_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _ignored(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


# Fused groups whose NVFP4 export shares one global scale (ModelOpt's QKV fusion).
_QKV_GROUPS = [re.compile(r"(.*\.attn\.)to_[qkv]$"), re.compile(r"(.*\.attn\.)add_[qkv]_proj$")]


def _qkv_group(module: str) -> str | None:
    for i, pat in enumerate(_QKV_GROUPS):
        m = pat.match(module)
        if m:
            return f"{m.group(1)}#{i}"
    return None


@pytest.mark.parametrize("model,algo", CASES)
def test_export_config_and_amax_coverage(modelopt_outputs, model, algo):
    paths = modelopt_outputs[(model, algo)]
    qc = json.loads((paths.hf_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt"
    assert qc["producer"]["name"] == "modelopt"
    assert qc["quant_algo"] == {"fp8": "FP8", "nvfp4": "NVFP4"}[algo]
    weights_cfg = qc["config_groups"]["group_0"]["weights"]
    assert weights_cfg["num_bits"] == (8 if algo == "fp8" else 4)
    if algo == "nvfp4":
        assert weights_cfg["group_size"] == 16

    base = load_base(paths.base_dir, model)
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    # Independent expectation: a Linear is left in BF16 iff the preset's regexes hit its weight quantizer.
    preset = get_preset(TINY_CONFIGS[model]["preset"])
    pats = [re.compile(p) for p in preset.disable_patterns()]
    expect_bf16 = {n for n in linears if any(p.match(f"{n}.weight_quantizer") for p in pats)}
    assert expect_bf16 and expect_bf16 != set(linears)

    tensors = _tensors(paths.hf_dir)
    amax = read_amax(paths.backbone)
    quantized = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    assert quantized == set(linears) - expect_bf16
    for name in expect_bf16:
        assert _ignored(name, qc["ignore"]), name
        assert tensors[f"{name}.weight"].dtype == torch.bfloat16
        assert torch.equal(tensors[f"{name}.weight"], linears[name].weight.detach())
    for name in quantized:
        assert not _ignored(name, qc["ignore"]), name

    group_max: dict[str, tuple[float, float]] = {}
    for name in quantized:
        g = _qkv_group(name)
        if g:
            w, i = group_max.get(g, (0.0, 0.0))
            group_max[g] = (max(w, float(amax[name].weight)), max(i, float(amax[name].input)))

    for name in quantized:
        pair = amax[name]  # every quantized module has both maxima in backbone.pt
        assert pair.weight is not None and pair.input is not None, name
        assert pair.weight.shape == () and pair.input.shape == ()
        if algo == "fp8":
            assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
            ws = tensors[f"{name}.weight_scale"].float().numpy()
            xs = tensors[f"{name}.input_scale"].float().numpy()
            np.testing.assert_allclose(ws, np.float32(pair.weight) / np.float32(448), rtol=1e-6)
            np.testing.assert_allclose(xs, np.float32(pair.input) / np.float32(448), rtol=1e-6)
        else:
            n_out, k_in = linears[name].weight.shape
            assert tensors[f"{name}.weight"].dtype == torch.uint8
            assert tuple(tensors[f"{name}.weight"].shape) == (n_out, k_in // 2)
            assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
            assert tuple(tensors[f"{name}.weight_scale"].shape) == (n_out, k_in // 16)
            g = _qkv_group(name)
            # Wan's export skips QKV fusion (its dummy forward fails), FLUX's fuses.
            w_amax, x_amax = group_max[g] if (g and model == "flux") else (float(pair.weight), float(pair.input))
            ws2 = float(tensors[f"{name}.weight_scale_2"])
            xs = float(tensors[f"{name}.input_scale"])
            np.testing.assert_allclose(ws2, np.float32(w_amax) / np.float32(2688), rtol=1e-6)
            np.testing.assert_allclose(xs, np.float32(x_amax) / np.float32(2688), rtol=1e-6)
    # No quantizer state leaks into the export.
    assert not [k for k in tensors if "_quantizer" in k]
