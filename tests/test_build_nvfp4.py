"""NVFP4 builds from real ModelOpt NVFP4 exports (CPU) and from BF16 weights alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import load_dir as _load_dir
from dqfast import _core
from dqfast.errors import PlanError
from dqfast.nvfp4 import build_nvfp4_transformer, fused_groups, nibble_order_report

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dim() == 0 else t.view(torch.uint8)


def _deq(w: torch.Tensor, s: torch.Tensor, gs: float) -> np.ndarray:
    k = w.shape[1] * 2
    d = _core.nvfp4_dequantize(w.numpy().tobytes(), _u8(s).numpy().tobytes(), k, gs)
    return np.frombuffer(d, dtype=np.float32).reshape(w.shape[0], k)


@pytest.fixture(scope="module")
def flux_nv(modelopt_fixture):
    return modelopt_fixture("flux", "nvfp4")


@pytest.fixture(scope="module")
def flux_nv_build(flux_nv, tmp_path_factory):
    out = tmp_path_factory.mktemp("nv") / "flux-nvfp4"
    r = build_nvfp4_transformer(
        out, modelopt_hf_dir=flux_nv.hf_dir, base_transformer_dir=flux_nv.base_dir, model_type="flux1", target="sglang"
    )
    return out, r


def test_export_build_keeps_nvfp4_bytes_and_restores_fallbacks(flux_nv, flux_nv_build):
    out, r = flux_nv_build
    got, export, base = _load_dir(out), _load_dir(flux_nv.hf_dir), _load_dir(flux_nv.base_dir)
    nv = [d.module for d in r.decisions if d.action == "nvfp4"]
    fb = [d.module for d in r.decisions if d.action == "bf16-fallback"]
    assert nv and fb
    for m in nv:
        for s in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            assert torch.equal(_u8(got[f"{m}.{s}"]), _u8(export[f"{m}.{s}"])), (m, s)
        assert got[f"{m}.weight"].dtype == torch.uint8 and got[f"{m}.weight_scale"].dtype == torch.float8_e4m3fn
        n, k2 = got[f"{m}.weight"].shape
        assert tuple(got[f"{m}.weight_scale"].shape) == (n, k2 * 2 // 16)
    for m in fb:
        assert torch.equal(got[f"{m}.weight"], base[f"{m}.weight"])
        assert not any(f"{m}.{s}" in got for s in ("weight_scale", "weight_scale_2", "input_scale"))
    assert "single_transformer_blocks.0.proj_mlp" in fb
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_algo"] == "NVFP4" and cfg["quant_type"] == "NVFP4" and cfg["group_size"] == 16
    assert cfg["swap_weight_nibbles"] is False and cfg["quant_method"] == "modelopt"
    assert "single_transformer_blocks.*.proj_mlp*" in cfg["ignore"]
    from dqfast.presets import ignore_pattern_matches

    for m in fb:
        assert any(ignore_pattern_matches(p, m) for p in cfg["ignore"]), m


def test_from_bf16_is_bit_identical_to_modelopt_export(flux_nv, tmp_path):
    """Weights-only NVFP4 in Rust == ModelOpt's NVFP4QTensor export (q/k/v share global scales)."""
    out = tmp_path / "fb"
    r = build_nvfp4_transformer(out, base_transformer_dir=flux_nv.base_dir, from_bf16=True, target="none")
    got, export = _load_dir(out), _load_dir(flux_nv.hf_dir)
    compared = 0
    for m in [d.module for d in r.decisions if d.action == "nvfp4"]:
        if f"{m}.weight" in export and export[f"{m}.weight"].dtype == torch.uint8:
            for s in ("weight", "weight_scale", "weight_scale_2"):
                assert torch.equal(_u8(got[f"{m}.{s}"]), _u8(export[f"{m}.{s}"])), (m, s)
            compared += 1
    assert compared >= 20
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "activation amax 2688" in cfg["calibration"]
    assert got["transformer_blocks.0.attn.to_q.input_scale"].item() == 1.0


def test_swap_rewrites_bytes_and_inspect_detects_order(flux_nv, flux_nv_build, tmp_path):
    out = tmp_path / "sw"
    build_nvfp4_transformer(
        out, modelopt_hf_dir=flux_nv.hf_dir, base_transformer_dir=flux_nv.base_dir, swap_weight_nibbles=True, target="none"
    )
    a, b = _load_dir(out), _load_dir(flux_nv_build[0])
    w = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(a[w], (b[w] >> 4) | (b[w] << 4))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["swap_weight_nibbles"] is False
    assert nibble_order_report(flux_nv_build[0], flux_nv.base_dir)["order"] == "low_first"
    rep = nibble_order_report(out, flux_nv.base_dir)
    assert rep["order"] == "high_first" and rep["high_first_rel_err"] < 0.2 < rep["low_first_rel_err"]


def _corrupt_scale(src: Path, dst: Path, name: str, positions: list[int]) -> Path:
    shutil.copytree(src, dst)
    f = dst / "diffusion_pytorch_model.safetensors"
    sd = st.load_file(str(f))
    raw = _u8(sd[name]).clone().reshape(-1)
    for p, b in zip(positions, [0x7F, 0xFF] * len(positions)):
        raw[p] = b
    sd[name] = raw.reshape(sd[name].shape).view(torch.float8_e4m3fn)
    st.save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def test_nan_scales_refused_or_repaired(flux_nv, tmp_path):
    name = "transformer_blocks.0.attn.to_out.0.weight_scale"
    hf = _corrupt_scale(flux_nv.hf_dir, tmp_path / "hf", name, [0, 5])
    with pytest.raises(PlanError, match=r"to_out\.0\.weight_scale': 2 NaN byte"):
        build_nvfp4_transformer(tmp_path / "o1", modelopt_hf_dir=hf, base_transformer_dir=flux_nv.base_dir, target="none")
    assert not (tmp_path / "o1").exists()
    r = build_nvfp4_transformer(
        tmp_path / "o2", modelopt_hf_dir=hf, base_transformer_dir=flux_nv.base_dir, repair_nan_scales=True, target="none"
    )
    assert r.counts["nan_scale_bytes_repaired"] == 2
    got, orig = _u8(_load_dir(tmp_path / "o2")[name]).reshape(-1), _u8(_load_dir(flux_nv.hf_dir)[name]).reshape(-1)
    assert got[0] == 0x7E and got[5] == 0x7E
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[[0, 5]] = False
    assert torch.equal(got[mask], orig[mask])


def test_fused_shards_with_different_global_scales_are_reconciled_exactly(flux_nv, tmp_path):
    """Give to_k a global scale 3x smaller (block scales re-expressed so the weight is unchanged);
    the build must unify q/k/v to the max and keep every dequantized value within the e4m3
    rounding bound (relative 2^-4 of the block multiplier, or half a subnormal step)."""
    hf = tmp_path / "hf"
    shutil.copytree(flux_nv.hf_dir, hf)
    f = hf / "diffusion_pytorch_model.safetensors"
    sd = st.load_file(str(f))
    m = "transformer_blocks.0.attn.to_k"
    gs = sd[f"{m}.weight_scale_2"].item()
    new_gs = np.float32(gs) / np.float32(3.0)
    old_s = sd[f"{m}.weight_scale"].float()
    sd[f"{m}.weight_scale"] = (old_s * 3.0).clamp(max=448).to(torch.float8_e4m3fn)
    sd[f"{m}.weight_scale_2"] = torch.tensor(float(new_gs), dtype=torch.float32)
    sd[f"{m}.input_scale"] = sd[f"{m}.input_scale"] * 0.5
    st.save_file(sd, str(f), metadata={"format": "pt"})
    before = _deq(sd[f"{m}.weight"], sd[f"{m}.weight_scale"], float(new_gs))
    out = tmp_path / "out"
    r = build_nvfp4_transformer(out, modelopt_hf_dir=hf, base_transformer_dir=flux_nv.base_dir, target="none")
    assert r.counts["fused_groups_reconciled"] == 1
    got = _load_dir(out)
    gq = got["transformer_blocks.0.attn.to_q.weight_scale_2"].item()
    assert got[f"{m}.weight_scale_2"].item() == gq == gs
    assert got[f"{m}.input_scale"].item() == got["transformer_blocks.0.attn.to_q.input_scale"].item()
    after = _deq(got[f"{m}.weight"], got[f"{m}.weight_scale"], gq)
    s_old = np.frombuffer(_core.e4m3_to_f32(_u8(sd[f"{m}.weight_scale"]).numpy().tobytes()), np.float32)
    mult_old = np.repeat(s_old.reshape(before.shape[0], -1), 16, axis=1).astype(np.float64) * new_gs
    bound = np.abs(before) * 2.0**-4 + 6 * gq * 2.0**-10
    assert np.all(np.abs(after - before) <= bound + 1e-12)
    assert np.any(after != before) or np.all(mult_old > 0)
    rec = [d for d in r.decisions if d.action == "reconcile"]
    assert rec and "max relative change" in rec[0].reason


def test_fused_group_detection():
    g = fused_groups(
        [
            "a.attn.to_q",
            "a.attn.to_k",
            "a.attn.to_v",
            "a.attn.add_q_proj",
            "a.attn.add_k_proj",
            "a.attn.add_v_proj",
            "a.attn.to_out.0",
            "b.q_proj",
            "b.k_proj",
        ]
    )
    assert g == {
        "a.attn.to_qkv": ["a.attn.to_k", "a.attn.to_q", "a.attn.to_v"],
        "a.attn.add_qkv": ["a.attn.add_k_proj", "a.attn.add_q_proj", "a.attn.add_v_proj"],
        "b.qkv_proj": ["b.k_proj", "b.q_proj"],
    }


def test_fp8_export_is_refused(modelopt_fixture, tmp_path):
    fx = modelopt_fixture("flux", "fp8")
    with pytest.raises(PlanError, match="quant_algo is FP8"):
        build_nvfp4_transformer(tmp_path / "o", modelopt_hf_dir=fx.hf_dir, base_transformer_dir=fx.base_dir)


def test_no_preset_by_default_as_sglangs_tool(flux_nv, tmp_path):
    """Without a preset (`model_type` / `--pattern-preset` unset) an export build restores no module
    from the base, as SGLang's `build_modelopt_nvfp4_transformer` (before: FLUX.1's preset);
    `--pattern-preset flux1-nvfp4` applies it. Neither engine's FLUX.1 loads the whole export
    (SGLang's, at tp_size 1, builds the FeedForwards and modulation Linears unquantized: the compat
    suite builds it), so `--target sglang` refuses it and the no-preset build opts out (`none`);
    with the preset it targets SGLang."""
    from click.testing import CliRunner
    from dqfast.cli import main
    from dqfast.errors import TargetError

    out = tmp_path / "none"
    with pytest.raises(TargetError, match=r"sglang.*cannot load 'single_transformer_blocks\.0\.norm\.linear'.*flux\.py"):
        build_nvfp4_transformer(
            tmp_path / "refused", modelopt_hf_dir=flux_nv.hf_dir, base_transformer_dir=flux_nv.base_dir, target="sglang"
        )
    r = build_nvfp4_transformer(out, modelopt_hf_dir=flux_nv.hf_dir, base_transformer_dir=flux_nv.base_dir, target="none")
    assert r.counts["bf16_fallback"] == 0 and r.counts["nvfp4"] > 0
    got, export = _load_dir(out), _load_dir(flux_nv.hf_dir)
    assert {n for n in export if "_quantizer." not in n} == set(got)
    args = [
        "build",
        "nvfp4",
        "--modelopt-hf-dir",
        str(flux_nv.hf_dir),
        "--base-transformer-dir",
        str(flux_nv.base_dir),
    ]
    res = CliRunner().invoke(main, [*args, "--output-dir", str(tmp_path / "cli"), "--target", "none", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["counts"]["bf16_fallback"] == 0
    res = CliRunner().invoke(main, [*args, "--output-dir", str(tmp_path / "cli-sgl"), "--target", "sglang", "--json"])
    assert res.exit_code == 2 and "single_transformer_blocks.0.norm.linear" in res.output, res.output
    res = CliRunner().invoke(
        main, [*args, "--output-dir", str(tmp_path / "preset"), "--target", "sglang", "--pattern-preset", "flux1-nvfp4", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["counts"]["bf16_fallback"] > 0


def test_qwen_image_nvfp4_export(modelopt_fixture, tmp_path):
    """A real ModelOpt NVFP4 export of a tiny Qwen-Image: no preset (SGLang 0.5.23 has no Qwen-Image
    NVFP4 one), every tensor kept, `ignore` = ModelOpt's, for SGLang. vLLM-Omni's Qwen-Image builds
    the blocks' img_mod/txt_mod unquantized (the compat suite runs it): the default `any` refuses the
    export as written, and `--fit-target` writes those layers in BF16 so both engines load it."""
    from dqfast.check import check_checkpoint
    from dqfast.errors import TargetError

    q4 = modelopt_fixture("qwen-image", "nvfp4")
    out = tmp_path / "q"
    with pytest.raises(TargetError, match=r"vllm-omni.*cannot load 'transformer_blocks\.2\.img_mod\.1'.*qwen_image_transformer\.py"):
        build_nvfp4_transformer(out, modelopt_hf_dir=q4.hf_dir, base_transformer_dir=q4.base_dir)
    r = build_nvfp4_transformer(out, modelopt_hf_dir=q4.hf_dir, base_transformer_dir=q4.base_dir, target="sglang")
    assert r.counts["bf16_fallback"] == 0 and r.counts["nvfp4"] > 0
    got, export = _load_dir(out), _load_dir(q4.hf_dir)
    assert {n for n in export if "_quantizer." not in n} == set(got)
    assert all(torch.equal(got[n].view(torch.uint8), export[n].view(torch.uint8)) for n in got if got[n].dtype == torch.uint8)
    cfg = lambda d: json.loads((d / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert cfg(out)["ignore"] == cfg(q4.hf_dir)["ignore"]
    fit = tmp_path / "fit"
    r = build_nvfp4_transformer(fit, modelopt_hf_dir=q4.hf_dir, base_transformer_dir=q4.base_dir, fit_target=True)
    assert [c.status for c in check_checkpoint(fit, "any")] == ["loads", "loads"]
    kept = {w.split("kept ")[1].split(" ")[0] for w in r.warnings if "kept " in w}
    assert kept == {f"transformer_blocks.{i}.{m}.1" for i in (2, 3) for m in ("img_mod", "txt_mod")}
    # SGLang asks its quant config about `...img_mod` (the Linear inside the Sequential): both names
    # are listed, or SGLang would quantize the BF16 layer (the compat suite checks it on SGLang's config).
    ignore = cfg(fit)["ignore"]
    assert {"transformer_blocks.2.img_mod.1", "transformer_blocks.2.img_mod"} <= set(ignore)
