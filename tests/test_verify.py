"""layer_errors and trajectory on the tiny FLUX.1 transformer.

Thresholds from measured values (seeds 0-2, 8 Euler steps, CPU, 2026-11-23):
FP8 latent cosine 0.99979-0.99981 (PSNR ~50.5 dB), NVFP4 W4A4 0.99728-0.99747 (~39.3 dB);
per-layer weight SNR medians 31.9 dB (FP8) and 19.9 dB (NVFP4). Thresholds keep ~4-5x margin
on (1 - cosine): FP8 >= 0.999, NVFP4 >= 0.99, and NVFP4 must be measurably worse than FP8.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from dqfast.runtime import load_quantized
from dqfast.verify import layer_errors, trajectory
from dqfast.verify.reference import calibrate_input_amax, export_reference_checkpoint, save_base_checkpoint
from safetensors.torch import load_file, save_file
from test_runtime_support import tiny_flux, tiny_flux_inputs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tiny_flux(0)
    inputs = tiny_flux_inputs()
    amax = calibrate_input_amax(base, [inputs])
    root = tmp_path_factory.mktemp("verify")
    save_base_checkpoint(base, root / "base")
    for algo in ("FP8", "NVFP4"):
        export_reference_checkpoint(base, root / algo, algo, input_amax=amax)
    return base, inputs, root


def test_layer_errors_rank_formats(dirs) -> None:
    _, _, root = dirs
    fp8 = layer_errors(root / "base", root / "FP8")
    fp4 = layer_errors(root / "base", root / "NVFP4")
    assert len(fp8) == len(fp4) == 48
    assert not any(r["outlier"] or r["nan"] for r in fp8 + fp4)
    assert statistics.median(r["snr_db"] for r in fp8) > 28
    assert statistics.median(r["snr_db"] for r in fp4) > 16
    assert statistics.median(r["snr_db"] for r in fp8) > statistics.median(r["snr_db"] for r in fp4) + 8
    assert all(r["cosine"] > 0.99 and r["max_abs_err"] >= r["mean_abs_err"] for r in fp8 + fp4)


def test_layer_errors_flags_nan_scales(dirs, tmp_path) -> None:
    _, _, root = dirs
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root / "NVFP4", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    name = "transformer_blocks.1.ff.net.2.weight_scale"
    raw = t[name].view(torch.uint8).clone()
    raw[0, 0] = 0x7F
    t[name] = raw.view(torch.float8_e4m3fn)
    save_file(t, str(f))
    rows = {r["module"]: r for r in layer_errors(root / "base", bad)}
    hit = rows["transformer_blocks.1.ff.net.2"]
    assert hit["nan"] and hit["outlier"] and hit["nan_scale_bytes"] == 1
    assert sum(r["nan"] for r in rows.values()) == 1


@pytest.mark.parametrize("algo, min_cos", [("FP8", 0.999), ("NVFP4", 0.99)])
def test_trajectory_thresholds(dirs, algo, min_cos, tmp_path) -> None:
    base, inputs, root = dirs
    quant = tiny_flux(7)
    load_quantized(quant, root / algo)
    res = trajectory(base, quant, inputs, steps=8, seed=0)
    assert len(res.steps) == 8
    assert res.min_cosine >= min_cos, res.min_cosine
    assert 0 < res.final_psnr_db < 200
    out = res.write_report(tmp_path / "r.json", tmp_path / "r.png")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["steps"][0]["step"] == 0 and "final_psnr_db" in data
    assert out["png"] is not None or "matplotlib" in out["png_note"]
    if algo == "NVFP4":
        assert res.min_cosine < 0.9995  # the check can tell NVFP4 from (near) lossless


def test_trajectory_identical_models_are_exact(dirs) -> None:
    base, inputs, _ = dirs
    res = trajectory(base, base, inputs, steps=3, seed=1)
    assert res.min_cosine > 1 - 1e-12 and res.final_psnr_db == float("inf")
