"""Multi-transformer pipelines (Wan2.2 A14B-style transformer + transformer_2) in one call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ckpt_helpers import load_dir as _load
from dqfast.components import build_components, find_components
from dqfast.errors import PlanError
from dqfast.mixed import build_mixed_transformer

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """Two tiny components: the seeded FLUX base, and a copy with every weight doubled (so a
    component built from the wrong directory is detectable)."""
    pytest.importorskip("diffusers")
    from modelopt_fixtures import build_base

    base = build_base(tmp_path_factory.mktemp("flux-base"), "flux")
    root = tmp_path_factory.mktemp("pipe")
    shutil.copytree(base, root / "transformer")
    shutil.copytree(base, root / "transformer_2")
    f = root / "transformer_2" / "diffusion_pytorch_model.safetensors"
    sd = {k: v * 2 if k.endswith(".weight") else v for k, v in st.load_file(str(f)).items()}
    st.save_file(sd, str(f), metadata={"format": "pt"})
    (root / "vae").mkdir()
    (root / "model_index.json").write_text("{}")
    return root


def test_find_components(pipeline):
    assert find_components(pipeline) == ["transformer", "transformer_2"]


def test_each_component_built_from_its_own_directory(pipeline, tmp_path):
    out = tmp_path / "out"
    rep = build_components("mixed", pipeline, out, fp8_activation_amax=10.0, target="none")
    assert list(rep.components) == ["transformer", "transformer_2"]
    for c in rep.components:
        assert (out / c / "config.json").is_file()
        assert rep.components[c].output_dir == str(out / c)
        assert rep.components[c].counts["quantized_layers"] > 0
        # Same bytes as a single-component build of that directory.
        alone = tmp_path / f"alone-{c}"
        build_mixed_transformer(alone, pipeline / c, fp8_activation_amax=10.0, target="none")
        a, b = _load(out / c), _load(alone)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(
                a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k],
            ), (c, k)
    t1, t2 = _load(out / "transformer"), _load(out / "transformer_2")
    w = "transformer_blocks.0.attn.to_q.weight_scale"
    assert t2[w].item() == pytest.approx(2 * t1[w].item(), rel=1e-6)
    d = rep.to_dict()
    assert set(d["components"]) == {"transformer", "transformer_2"}
    json.dumps(d)


def test_fp8_from_bf16_with_component_subset(pipeline, tmp_path):
    out = tmp_path / "fp8"
    rep = build_components("fp8", pipeline, out, ["transformer_2"], from_bf16=True)
    assert list(rep.components) == ["transformer_2"]
    assert (out / "transformer_2" / "config.json").is_file() and not (out / "transformer").exists()


def test_failure_removes_what_this_call_created(pipeline, tmp_path):
    root = tmp_path / "pipe"
    shutil.copytree(pipeline, root)
    cfg = json.loads((root / "transformer_2" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (root / "transformer_2" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(PlanError, match="already quantized"):
        build_components("mixed", root, out, target="none")
    assert not (out / "transformer").exists()
    assert not out.exists()  # nor the pipeline's VAE / model_index.json, nor a staging directory
    with pytest.raises(PlanError, match="unknown build kind"):
        build_components("int4", root, out)


def test_cli_build_mixed_components_and_components_command(pipeline, tmp_path):
    from click.testing import CliRunner
    from dqfast.cli import main

    out = tmp_path / "cli"
    res = CliRunner().invoke(
        main,
        [
            "build",
            "mixed",
            "--base-transformer-dir",
            str(pipeline),
            "--output-dir",
            str(out),
            "--components",
            "auto",
            "--policy",
            '{"nvfp4": ["\\\\.ff\\\\."], "fp8": ["attn"]}',
            "--json",
            "--target",
            "none",
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)  # warnings go to stderr
    assert set(rep["components"]) == {"transformer", "transformer_2"}
    ql = json.loads((out / "transformer_2" / "config.json").read_text())["quantization_config"]["quantized_layers"]
    assert ql["transformer_blocks.0.ff.net.2"]["quant_algo"] == "NVFP4" and ql["transformer_blocks.0.attn.to_q"]["quant_algo"] == "FP8"
    assert "transformer_blocks.0.norm1.linear" not in ql
    out2 = tmp_path / "cli2"
    res = CliRunner().invoke(
        main,
        [
            "build",
            "components",
            "fp8",
            "--root",
            str(pipeline),
            "--output-dir",
            str(out2),
            "--from-bf16",
            "--components",
            "transformer",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out2 / "transformer" / "config.json").is_file() and not (out2 / "transformer_2").exists()


def test_cli_build_components_mxfp8(pipeline, tmp_path):
    """Every builder of the registry is a `build components` kind; mxfp8 (calibration-free only)
    gets no from-BF16/activation options, and each component equals its standalone build."""
    from click.testing import CliRunner
    from dqfast.cli import main
    from dqfast.weight_only import build_mxfp8_transformer

    out = tmp_path / "mx"
    res = CliRunner().invoke(
        main,
        [
            "build",
            "components",
            "mxfp8",
            "--root",
            str(pipeline),
            "--output-dir",
            str(out),
            "--json",
            "--target",
            "vllm-omni",
            "--fit-target",
        ],
    )
    assert res.exit_code == 0, res.output
    for c in ("transformer", "transformer_2"):
        alone = tmp_path / f"alone-{c}"
        build_mxfp8_transformer(alone, base_transformer_dir=pipeline / c, target="vllm-omni", fit_target=True)
        assert _load(out / c).keys() == _load(alone).keys()
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(_load(out / c).values(), _load(alone).values()))


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def full_pipeline(pipeline, tmp_path) -> Path:
    """The tiny pipeline with the untouched components a serving engine needs."""
    root = tmp_path / "full"
    shutil.copytree(pipeline, root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}))
    (root / "vae" / "config.json").write_text('{"z_dim": 16}')
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae-weights" * 100)
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "model.safetensors").write_bytes(b"te" * 50)
    (root / "tokenizer" / "sub").mkdir(parents=True)
    (root / "tokenizer" / "sub" / "spiece.model").write_bytes(b"tok")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return root


def test_pipeline_root_gets_untouched_components(full_pipeline, tmp_path):
    out = tmp_path / "out"
    rep = build_components("mixed", full_pipeline, out, fp8_activation_amax=10.0, target="none")
    assert rep.copied == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "vae"]
    assert rep.to_dict()["copied"] == rep.copied
    for name in rep.copied:
        src, dst = full_pipeline / name, out / name
        if src.is_file():
            assert dst.read_bytes() == src.read_bytes()
        else:
            assert _tree(dst) == _tree(src) and _tree(src)
    # The transformers are built as before (same bytes as a transformers-only build), and nothing
    # else (no staging directory) is left in the output.
    only = tmp_path / "only"
    rep2 = build_components("mixed", full_pipeline, only, fp8_activation_amax=10.0, transformers_only=True, target="none")
    assert rep2.copied == [] and sorted(p.name for p in only.iterdir()) == ["transformer", "transformer_2"]
    for c in ("transformer", "transformer_2"):
        assert _tree(out / c) == _tree(only / c)
    assert sorted(p.name for p in out.iterdir()) == sorted(["transformer", "transformer_2", *rep.copied])
    # An existing output is refused for the copied entries too, unless overwrite.
    shutil.rmtree(only / "transformer")
    shutil.rmtree(only / "transformer_2")
    (only / "vae").mkdir()
    with pytest.raises(Exception, match="already exists"):
        build_components("mixed", full_pipeline, only, fp8_activation_amax=10.0, target="none")
    assert not (only / "transformer").exists()


def test_pipeline_copy_failure_leaves_nothing(full_pipeline, tmp_path, monkeypatch):
    import dqfast.components as C

    calls = []

    def boom(src, dst):
        calls.append(src)
        if "tokenizer" in src:
            raise OSError("disk full")
        shutil.copy2(src, dst)

    monkeypatch.setattr(C, "_link_or_copy", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        build_components("mixed", full_pipeline, out, fp8_activation_amax=10.0, target="none")
    assert calls and not out.exists()


def test_cli_components_transformers_only(full_pipeline, tmp_path):
    from click.testing import CliRunner
    from dqfast.cli import main

    base = ["build", "components", "fp8", "--root", str(full_pipeline), "--from-bf16", "-q", "--output-dir"]
    res = CliRunner().invoke(main, [*base, str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "model_index.json").read_bytes() == (full_pipeline / "model_index.json").read_bytes()
    res = CliRunner().invoke(main, [*base, str(tmp_path / "b"), "--transformers-only"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["transformer", "transformer_2"]
