"""The one-flow PTQ bridge on CPU: real ModelOpt calibration through a denoising loop, the
ModelOpt artefacts, dqfast build, dqfast runtime load (emulation) and the trajectory check.

Thresholds (measured on this machine, CPU, torch 2.13, modelopt 0.47.0, diffusers 0.42.1):
weight cosine min over layers FP8 0.9996 / NVFP4 0.9946, which is what the formats' SNR
predicts (FP8 e4m3 with a per-tensor scale ~31 dB -> 1 - 1/(2*10^3.1) = 0.9996; NVFP4
~19.5 dB -> 0.9944). Trajectory final cosine 0.99999+ (FP8) / 0.99997 (NVFP4) and final PSNR
65-67 dB (FP8) / 58 dB (NVFP4). The asserted bounds sit about 10 dB (PSNR, layer SNR) or
one decade in 1-cosine below those values: loose enough for seed and BLAS differences,
tight enough that a wrong scale (a factor of 2 costs FP8 far more than 10 dB of layer SNR),
swapped NVFP4 nibbles or an unquantized trajectory pair would fail.
"""

from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from dqfast.backbone import read_amax  # noqa: E402
from dqfast.cli.ptq import ptq  # noqa: E402
from dqfast.ptq import CalibConfig, run_ptq  # noqa: E402
from dqfast.ptq.calibration import pseudo_embedding  # noqa: E402
from dqfast.ptq.presets import get_preset  # noqa: E402
from modelopt_fixtures import TINY_CONFIGS, _new_model  # noqa: E402

# Small enough for CPU: FLUX 4x4 tokens, Wan 2x4x4 latent patches, 8 text tokens.
GEOMETRY = {"height": 64, "width": 64, "num_frames": 5, "text_len": 8}
PROMPTS = ["a red bicycle leaning on a wall", "a bowl of oranges on a table"]
N_STEPS = 3

# (layer min cosine, layer min SNR dB, trajectory final cosine, trajectory final PSNR dB)
BOUNDS = {"fp8": (0.999, 21.0, 0.9999, 50.0), "nvfp4": (0.99, 9.0, 0.999, 45.0)}


def _calib() -> CalibConfig:
    return CalibConfig(prompts=PROMPTS, calib_size=2, batch_size=2, n_steps=N_STEPS, progress=False, **GEOMETRY)


def _new_wan(seed: int):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(**TINY_CONFIGS["wan"]["config"]).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def flux_runs(tmp_path_factory):
    out = {}
    for algo in ("fp8", "nvfp4"):
        root = tmp_path_factory.mktemp(f"flux-{algo}")
        # NVFP4 FLUX.1 does not load in vLLM-Omni (part of the default `any`): built for SGLang.
        target = "sglang" if algo == "nvfp4" else "any"
        out[algo] = run_ptq(_new_model("flux"), root / "out", algo=algo, calib=_calib(), verify=True, progress=False, target=target)
    return out


def test_nvfp4_build_a_target_cannot_load_is_refused_before_calibration(tmp_path):
    """Under the default `any`, vLLM-Omni's FLUX.1 cannot load ModelOpt's NVFP4 export: `ptq --build`
    refuses before calibrating (not hours later in the build step), and writes nothing."""
    from dqfast.errors import TargetError

    with pytest.raises(TargetError, match=r"--target any includes vllm-omni.*pass --fit-target"):
        run_ptq(_new_model("flux"), tmp_path / "out", algo="nvfp4", calib=_calib(), build=True, progress=False)
    assert not (tmp_path / "out" / "ckpt").exists() and not (tmp_path / "out" / "hf").exists()


@pytest.fixture(scope="module")
def wan_pipeline(tmp_path_factory):
    """A Wan2.2-style pipeline directory: two experts with different weights."""
    root = tmp_path_factory.mktemp("wan-pipe")
    pipe = root / "pipe"
    _new_wan(1).save_pretrained(pipe / "transformer")
    _new_wan(2).save_pretrained(pipe / "transformer_2")
    (pipe / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "WanPipeline",
                "boundary_ratio": 0.875,
                "transformer": ["diffusers", "WanTransformer3DModel"],
                "transformer_2": ["diffusers", "WanTransformer3DModel"],
            }
        )
    )
    result = run_ptq(pipe, root / "out", algo="fp8", calib=_calib(), verify=True, progress=False)
    return pipe, result


def _quantized_modules(hf_dir) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(hf_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k[: -len(".weight_scale")] for k in f.keys() if k.endswith(".weight_scale")}


def _check_verification(comp, algo: str) -> None:
    cos_min, snr_min, traj_cos, traj_psnr = BOUNDS[algo]
    layers, traj = comp.layers, comp.trajectory
    assert layers["layers"] > 0 and not layers["nan_layers"]
    assert layers["min_cosine"] > cos_min, layers["min_cosine"]
    assert layers["min_snr_db"] > snr_min, layers["min_snr_db"]
    assert traj["final_cosine"] > traj_cos, traj["final_cosine"]
    assert traj["final_psnr_db"] > traj_psnr, traj["final_psnr_db"]
    # The pair really differs: the runtime ran quantized layers, not the BF16 weights.
    assert traj["final_psnr_db"] < 200 and (traj["fp8_layers"] + traj["nvfp4_layers"]) == layers["layers"]
    assert len(traj["steps"]) == N_STEPS


@pytest.mark.parametrize("algo", ["fp8", "nvfp4"])
def test_flux_flow(flux_runs, algo):
    r = flux_runs[algo]
    c = r.component("transformer")
    out = r.out_dir
    assert c.backbone == f"{out}/ckpt/transformer.pt" and c.hf_dir == f"{out}/hf/transformer"
    assert c.dqfast_dir == f"{out}/dqfast/transformer"
    # The denoising loop: one forward per step per batch (FLUX is guidance-distilled, no CFG).
    assert c.forward_calls == 1 * N_STEPS
    hf = json.loads(open(f"{c.hf_dir}/config.json").read())["quantization_config"]
    assert hf["quant_algo"] == algo.upper()
    # ModelOpt's flux-dev filter decides what the export quantizes.
    pats = [re.compile(p) for p in get_preset("flux1").disable]
    linears = [n for n, m in _new_model("flux").named_modules() if isinstance(m, torch.nn.Linear)]
    expected = {n for n in linears if not any(p.match(f"{n}.weight_quantizer") for p in pats)}
    from pathlib import Path

    assert _quantized_modules(Path(c.hf_dir)) == expected
    amax = read_amax(c.backbone)
    assert all(amax[n].weight is not None and amax[n].input is not None for n in expected)
    _check_verification(c, algo)
    report = json.loads(open(r.report_path).read())
    assert report["calibration"]["conditioning"] == "pseudo-embeddings"
    assert report["versions"]["nvidia-modelopt"] and report["versions"]["diffusers"]


def test_wan_pipeline_two_experts(wan_pipeline):
    from pathlib import Path

    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, r = wan_pipeline
    assert [c.name for c in r.components] == ["transformer", "transformer_2"]
    # Independent count: expert 1 takes timesteps >= 875, expert 2 the rest; CFG doubles calls.
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    sched.set_timesteps(N_STEPS)
    high = sum(1 for t in sched.timesteps if float(t) >= 875.0)
    assert 0 < high < N_STEPS
    assert r.component("transformer").forward_calls == 2 * high
    assert r.component("transformer_2").forward_calls == 2 * (N_STEPS - high)
    pats = [re.compile(p) for p in get_preset("wan").disable]
    linears = [n for n, m in _new_wan(1).named_modules() if isinstance(m, torch.nn.Linear)]
    expected = {n for n in linears if not any(p.match(f"{n}.weight_quantizer") for p in pats)}
    assert expected  # block 3 of 4 is quantized
    amax = {}
    for c in r.components:
        assert Path(c.backbone).name == f"{c.name}.pt"
        assert _quantized_modules(Path(c.hf_dir)) == expected
        assert c.base_dir == str(pipe / c.name)
        amax[c.name] = read_amax(c.backbone)
        _check_verification(c, "fp8")
    # Each expert was calibrated on its own weights and noise levels: activation maxima differ.
    # (Weight maxima can coincide: uniform init puts both at about 1/sqrt(fan_in).)
    assert any(float(amax["transformer"][n].input) != float(amax["transformer_2"][n].input) for n in expected)


def test_pseudo_embeddings_are_deterministic_per_prompt():
    a = pseudo_embedding("a cat", (4, 8), "t5")
    assert torch.equal(a, pseudo_embedding("a cat", (4, 8), "t5"))
    assert not torch.equal(a, pseudo_embedding("a dog", (4, 8), "t5"))
    assert not torch.equal(a, pseudo_embedding("a cat", (4, 8), "clip"))


def test_cli_smoke(tmp_path):
    comp = tmp_path / "flux"
    _new_model("flux").save_pretrained(comp)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse at night\n\n  a field of tulips  \n")
    out = tmp_path / "out"
    args = [
        "--model-dir",
        str(comp),
        "--out",
        str(out),
        "--algo",
        "fp8",
        "--model-type",
        "flux",
        "--prompts-file",
        str(prompts),
        "--calib-size",
        "2",
        "--batch-size",
        "2",
        "--n-steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--text-len",
        "8",
        "--build",
        "--no-progress",
    ]
    res = CliRunner().invoke(ptq, args)
    assert res.exit_code == 0, res.output
    assert (out / "ckpt" / "transformer.pt").is_file()
    assert (out / "hf" / "transformer" / "config.json").is_file()
    assert (out / "dqfast" / "transformer" / "config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["prompts_used"] == 2 and report["model_type"] == "flux1"
    # A second run refuses to overwrite without --overwrite.
    res = CliRunner().invoke(ptq, args)
    assert res.exit_code == 2 and "already exists" in res.output
    # -q: the same run prints nothing on success.
    res = CliRunner().invoke(ptq, [*args, "--overwrite", "-q"])
    assert res.exit_code == 0 and res.output == "", res.output
