"""The command line: thin over the API, one clear line and a non-zero exit on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from dqfast.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _build_fp8(fx, out, *extra: str, hf_dir=None):
    """`dqfast build fp8` from the fixture's ModelOpt export (`hf_dir`: its default, the
    transformer folder) into `out`."""
    return _run(
        "build",
        "fp8",
        "--modelopt-hf-dir",
        str(fx.hf_dir if hf_dir is None else hf_dir),
        "--modelopt-backbone-ckpt",
        str(fx.backbone),
        "--base-transformer-dir",
        str(fx.base_dir),
        "--output-dir",
        str(out),
        *extra,
    )


@pytest.fixture(scope="module")
def flux_fp8(modelopt_fixture):
    return modelopt_fixture("flux", "fp8")


def test_build_fp8_cli_matches_api(flux_fp8, tmp_path):
    out = tmp_path / "cli"
    r = _build_fp8(flux_fp8, out, "--model-type", "flux1", "--json", hf_dir=flux_fp8.out_dir / "hf")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)  # warnings and target lines go to stderr
    assert rep["counts"]["quantized"] > 0 and rep["output_dir"] == str(out)
    import dqfast

    api = dqfast.build_fp8_transformer(
        tmp_path / "api",
        modelopt_hf_dir=flux_fp8.out_dir / "hf",
        modelopt_backbone_ckpt=flux_fp8.backbone,
        base_transformer_dir=flux_fp8.base_dir,
        model_type="flux1",
    )
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tmp_path / "api" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert rep["counts"] == api.counts


def test_dry_run_prints_plan_and_writes_nothing(flux_fp8, tmp_path):
    out = tmp_path / "dry"
    r = _build_fp8(flux_fp8, out, "--dry-run")
    assert r.exit_code == 0
    assert "bf16-fallback" in r.output and "transformer_blocks.0.norm1.linear" in r.output
    assert not out.exists()


def test_errors_are_one_line_and_exit_2(flux_fp8, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    r = _build_fp8(flux_fp8, out)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already exists" in lines[0]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    r = _run("inspect", str(bad))
    assert r.exit_code == 2 and "bad.safetensors" in r.output and "past the end" in r.output


def test_inspect_reports_quantization(flux_fp8, tmp_path):
    r = _run("inspect", str(flux_fp8.hf_dir), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["quant_algo"] == "FP8" and d["modules"]["fp8"] > 0 and d["problems"] == []


def test_core_conversion_runs_without_torch(flux_fp8, tmp_path):
    """Importing dqfast and building from BF16 or from an amax sidecar must not need torch."""
    import torch
    from safetensors.torch import save_file

    sd = torch.load(flux_fp8.backbone, map_location="cpu", weights_only=False)["model_state_dict"]
    side = tmp_path / "amax.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if k.endswith("_amax")}, str(side))
    code = f"""
import sys
sys.modules['torch'] = None  # any 'import torch' now fails
import dqfast
dqfast.build_fp8_transformer({str(tmp_path / "a")!r}, base_transformer_dir={str(flux_fp8.base_dir)!r}, from_bf16=True)
dqfast.build_fp8_transformer({str(tmp_path / "b")!r}, modelopt_hf_dir={str(flux_fp8.hf_dir)!r},
    modelopt_backbone_ckpt={str(side)!r}, base_transformer_dir={str(flux_fp8.base_dir)!r})
dqfast.build_fp8_transformer({str(tmp_path / "c")!r}, modelopt_hf_dir={str(flux_fp8.hf_dir)!r},
    modelopt_backbone_ckpt={str(flux_fp8.backbone)!r}, base_transformer_dir={str(flux_fp8.base_dir)!r})
print('ok')
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    assert (tmp_path / "b" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tmp_path / "c" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_build_releases_the_gil(flux_fp8, tmp_path):
    """While Rust converts, other Python threads keep running."""
    import threading

    from dqfast import _core

    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    data = bytes(64 << 20)  # 32M BF16 zeros: long enough to observe
    t = threading.Thread(target=spin)
    t.start()
    before = ticks
    _core.quantize_e4m3(data, "BF16", [1.0], 1024)
    during = ticks - before
    stop.set()
    t.join()
    assert during > 1000


def test_verify_commands(flux_fp8, tmp_path):
    import dqfast

    out = tmp_path / "q"
    dqfast.build_fp8_transformer(
        out, modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=flux_fp8.base_dir
    )
    r = _run("verify", "layers", str(flux_fp8.base_dir), str(out), "--json", str(tmp_path / "l.json"))
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "l.json").read_text())
    assert rep["layer_summary"]["layers"] > 10 and rep["layer_summary"]["min_cosine"] > 0.999
    r = _run("verify", "trajectory", str(flux_fp8.base_dir), str(out), "--steps", "3", "--json", str(tmp_path / "t.json"))
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "t.json").read_text())["trajectory"]
    assert t["num_steps"] == 3 and t["final_cosine"] > 0.999 and "final PSNR" in r.output
