"""MIXED_PRECISION builds on the tiny real FLUX.1 base: config, bytes, fused-group rule, and a load
+ forward pass through dqfast.runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import load_dir as _load
from dqfast import _core
from dqfast.errors import PlanError
from dqfast.mixed import build_mixed_transformer
from dqfast.nvfp4 import fused_groups
from dqfast.targets import TARGETS

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The seeded tiny FLUX.1 BF16 base that ``modelopt_fixture("flux", ...)`` starts from (built
    alone: a mixed build needs no ModelOpt export)."""
    pytest.importorskip("diffusers")
    from modelopt_fixtures import build_base

    return build_base(tmp_path_factory.mktemp("flux-base"), "flux")


@pytest.fixture(scope="module")
def mixed(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "transformer"
    r = build_mixed_transformer(out, base_dir, fp8_activation_amax=20.0, nvfp4_activation_amax=40.0, target="none")
    return out, r


def test_default_policy_config(mixed, base_dir):
    out, r = mixed
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == "MIXED_PRECISION"
    ql = cfg["quantized_layers"]
    # Heavy MLPs NVFP4, attention/modulation FP8, ModelOpt's unquantized set BF16.
    assert ql["transformer_blocks.0.ff.net.0.proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert ql["single_transformer_blocks.1.proj_mlp"]["quant_algo"] == "NVFP4"
    assert ql["transformer_blocks.1.attn.to_q"] == {"quant_algo": "FP8"}
    assert ql["transformer_blocks.0.norm1.linear"] == {"quant_algo": "FP8"}
    for m in ("proj_out", "x_embedder", "context_embedder", "norm_out.linear"):
        assert m not in ql and all(t.ignored(cfg["ignore"], m) for t in TARGETS.values())
    assert r.counts["fp8"] > 0 and r.counts["nvfp4"] > 0 and r.counts["bf16"] > 0
    # Every fused q/k/v group has one algorithm.
    for members in fused_groups(ql).values():
        assert len({ql[m]["quant_algo"] for m in members}) == 1
    from dqfast.quant_config import resolve_quant_config

    qc = resolve_quant_config(out)
    assert qc.quant_algo == "MIXED_PRECISION" and qc.algo_for("transformer_blocks.0.ff.net.2") == "NVFP4"
    assert qc.algo_for("proj_out") is None


def test_bytes_match_independent_quantization(mixed, base_dir):
    out, _ = mixed
    got, base = _load(out), _load(base_dir)
    # FP8 per tensor: scale = max|w| / 448, q = e4m3(clamp(w / scale)).
    m = "transformer_blocks.1.attn.to_out.0"
    w = base[f"{m}.weight"].float()
    scale = np.float32(w.abs().max().item()) / np.float32(448.0)
    assert got[f"{m}.weight_scale"].item() == scale and tuple(got[f"{m}.weight_scale"].shape) == (1,)
    want = (w / torch.tensor(scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(got[f"{m}.weight"].view(torch.uint8), want.view(torch.uint8))
    assert got[f"{m}.input_scale"].item() == np.float32(20.0) / np.float32(448.0)
    # NVFP4: ModelOpt's recipe with the global amax taken over the fused group (none here).
    m = "transformer_blocks.0.ff.net.2"
    wb = base[f"{m}.weight"]
    n, k = wb.shape
    amax = float(wb.float().abs().max())
    packed, scales, gs = _core.nvfp4_quantize(wb.view(torch.uint16).numpy().tobytes(), "BF16", n, k, amax)
    assert got[f"{m}.weight"].numpy().tobytes() == packed
    assert got[f"{m}.weight_scale"].view(torch.uint8).numpy().tobytes() == scales
    assert got[f"{m}.weight_scale_2"].item() == gs
    assert got[f"{m}.input_scale"].item() == np.float32(40.0) / np.float32(2688.0)
    # BF16 layers copied untouched.
    assert torch.equal(got["proj_out.weight"], base["proj_out.weight"])


def test_nvfp4_fused_group_shares_global_scale(base_dir, tmp_path):
    out = tmp_path / "o"
    build_mixed_transformer(out, base_dir, {"nvfp4": [r"\.attn\.(to_[qkv]|add_[qkv]_proj)$"]}, target="none")
    got, base = _load(out), _load(base_dir)
    p = "transformer_blocks.0.attn"
    amax = max(float(base[f"{p}.to_{s}.weight"].float().abs().max()) for s in "qkv")
    gs = {got[f"{p}.to_{s}.weight_scale_2"].item() for s in "qkv"}
    assert gs == {np.float32(amax) / np.float32(2688.0)}
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(v["quant_algo"] for v in cfg["quantized_layers"].values()) == {"NVFP4"}
    assert "transformer_blocks.0.ff.net.2" in cfg["ignore"]  # no rule matched: BF16


def test_policy_that_splits_a_fused_group_is_refused(base_dir, tmp_path):
    with pytest.raises(PlanError, match=r"fused group '.*to_qkv' would mix algorithms"):
        build_mixed_transformer(tmp_path / "o", base_dir, {"nvfp4": [r"\.to_q$"], "fp8": [r"\.to_[kv]$"]}, target="none")
    assert not (tmp_path / "o").exists()
    with pytest.raises(PlanError, match="not one of"):
        build_mixed_transformer(tmp_path / "o", base_dir, {"int4": [r"."]}, target="none")


def test_mixed_checkpoint_loads_and_runs(mixed, base_dir):
    from dqfast.runtime import Fp8Linear, Nvfp4Linear, load_quantized
    from modelopt_fixtures import TINY_CONFIGS, load_base
    from test_runtime_support import cosine, run_model, tiny_flux_inputs

    out, r = mixed
    ref = load_base(base_dir, "flux").float()
    import diffusers

    torch.manual_seed(1234)  # different init: every value must come from the checkpoint
    model = diffusers.FluxTransformer2DModel(**TINY_CONFIGS["flux"]["config"]).float().eval()
    rep = load_quantized(model, out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_layers"]
    assert sorted(rep.fp8_layers) == sorted(m for m, v in cfg.items() if v["quant_algo"] == "FP8")
    assert sorted(rep.nvfp4_layers) == sorted(m for m, v in cfg.items() if v["quant_algo"] == "NVFP4")
    mods = dict(model.named_modules())
    assert isinstance(mods["transformer_blocks.0.attn.to_k"], Fp8Linear)
    assert isinstance(mods["transformer_blocks.0.ff_context.net.2"], Nvfp4Linear)
    inputs = tiny_flux_inputs()
    inputs["guidance"] = torch.full((1,), 3.5)
    a, b = run_model(model, inputs), run_model(ref, inputs)
    assert torch.isfinite(a).all()
    c = cosine(a, b)
    assert c > 0.995, c
