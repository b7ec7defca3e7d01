"""FP8 builds from real ModelOpt exports of tiny diffusers transformers (CPU), checked against
independent torch computations and SGLang's builder semantics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dqfast
import numpy as np
import pytest
from ckpt_helpers import load_dir as _load_dir
from dqfast.errors import CheckpointError, OutputExistsError, PlanError
from dqfast.presets import get_preset
from dqfast.targets import TARGETS

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

E4M3_MAX = 448.0


def _backbone_amax(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["model_state_dict"]
    return {k: v.float() for k, v in sd.items() if k.endswith("_amax")}


@pytest.fixture(scope="module")
def flux_fp8(modelopt_fixture):
    return modelopt_fixture("flux", "fp8")


@pytest.fixture(scope="module")
def flux_build(flux_fp8, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "flux-fp8"
    report = dqfast.build_fp8_transformer(
        out,
        modelopt_hf_dir=flux_fp8.out_dir / "hf",
        modelopt_backbone_ckpt=flux_fp8.out_dir / "ckpt",
        base_transformer_dir=flux_fp8.base_dir,
    )
    return out, report


def test_quantized_modules_keep_export_bytes_and_get_backbone_scales(flux_fp8, flux_build):
    out, report = flux_build
    got = _load_dir(out)
    export = _load_dir(flux_fp8.hf_dir)
    amax = _backbone_amax(flux_fp8.backbone)
    fp8 = [d.module for d in report.decisions if d.action == "fp8"]
    assert len(fp8) == report.counts["quantized"] > 10
    for m in fp8:
        w = got[f"{m}.weight"]
        assert w.dtype == torch.float8_e4m3fn
        assert torch.equal(w.view(torch.uint8), export[f"{m}.weight"].view(torch.uint8))
        # SGLang's builder: float32 [1] = amax / 448 from backbone.pt
        for scale, q in (("weight_scale", "weight_quantizer"), ("input_scale", "input_quantizer")):
            s = got[f"{m}.{scale}"]
            assert s.dtype == torch.float32 and tuple(s.shape) == (1,)
            ref = amax[f"{m}.{q}._amax"].reshape(1) / E4M3_MAX
            assert torch.equal(s, ref), (m, scale)
        # The export's own 0-dim weight_scale agrees (same calibration).
        assert export[f"{m}.weight_scale"].item() == got[f"{m}.weight_scale"].item()


def test_fallbacks_come_from_base_without_scales(flux_fp8, flux_build):
    out, report = flux_build
    got = _load_dir(out)
    base = _load_dir(flux_fp8.base_dir)
    preset = get_preset("flux1")
    fallbacks = [d.module for d in report.decisions if d.action == "bf16-fallback"]
    # Every module of the base that the preset names is a fallback, and nothing else is.
    expected = sorted(
        {
            n.rsplit(".", 1)[0]
            for n in base
            if n.endswith(".weight") and any(re.search(p, n[: -len(".weight")]) for p in preset.fp8_fallback)
        }
    )
    assert sorted(fallbacks) == expected and expected
    for m in fallbacks:
        assert got[f"{m}.weight"].dtype == torch.bfloat16
        assert torch.equal(got[f"{m}.weight"], base[f"{m}.weight"])
        assert f"{m}.weight_scale" not in got and f"{m}.input_scale" not in got
    assert not [n for n in got if "_quantizer" in n or n.endswith("_amax")]


def test_output_config_and_metadata(flux_fp8, flux_build):
    out, report = flux_build
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8" and qc["quant_type"] == "FP8"
    assert qc["producer"]["name"] == "modelopt"
    export_cfg = json.loads((flux_fp8.hf_dir / "config.json").read_text())
    # Every export entry is kept; `proj_out` as `p*roj_out` (a bare `proj_out` would make vLLM's
    # substring rule exclude the quantized single_transformer_blocks.*.proj_out too).
    assert set(export_cfg["quantization_config"]["ignore"]) - {"proj_out"} <= set(qc["ignore"])
    assert "proj_out" not in qc["ignore"] and "p*roj_out" in qc["ignore"]
    for d in report.decisions:
        if d.action == "bf16-fallback":
            assert d.module in qc["ignore"]
    assert qc["ignore"] == sorted(qc["ignore"])
    assert cfg["_class_name"] == "FluxTransformer2DModel"
    from safetensors import safe_open

    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["format"] == "pt"
    assert json.loads(md["quantization_config"]) == qc == json.loads(md["_quantization_metadata"])
    assert json.loads(md["config"])["quantization_config"] == qc


def test_output_dequantizes_close_to_base(flux_fp8, flux_build):
    out, _ = flux_build
    got = _load_dir(out)
    base = _load_dir(flux_fp8.base_dir)
    n = 0
    for name, w in got.items():
        if w.dtype != torch.float8_e4m3fn:
            continue
        m = name[: -len(".weight")]
        scale = got[f"{m}.weight_scale"]
        deq = w.float() * scale
        ref = base[name].float()
        # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals (+ BF16 double rounding),
        # absolute error <= half the subnormal step for tiny values.
        tol = ref.abs() * (2**-4 + 2**-8) + scale * 2**-10
        assert torch.all((deq - ref).abs() <= tol), name
        n += 1
    assert n > 10


def test_requantize_with_modelopt_rounding_reproduces_export_bytes(flux_fp8, tmp_path):
    """dqfast's 'modelopt' rounding is ModelOpt's export, byte for byte; 'exact' rounds once."""
    kw = dict(
        modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=flux_fp8.base_dir, requantize=True
    )
    dqfast.build_fp8_transformer(tmp_path / "mo", rounding="modelopt", **kw)
    dqfast.build_fp8_transformer(tmp_path / "ex", rounding="exact", **kw)
    export = _load_dir(flux_fp8.hf_dir)
    mo, ex = _load_dir(tmp_path / "mo"), _load_dir(tmp_path / "ex")
    base = _load_dir(flux_fp8.base_dir)
    diff = total = 0
    for name, w in export.items():
        if w.dtype != torch.float8_e4m3fn or name not in mo or mo[name].dtype != torch.float8_e4m3fn:
            continue
        assert torch.equal(mo[name].view(torch.uint8), w.view(torch.uint8)), name
        scale = ex[name[: -len(".weight")] + ".weight_scale"]
        ref = (base[name].float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(ex[name].view(torch.uint8), ref.view(torch.uint8)), name
        diff += int((ex[name].view(torch.uint8) != w.view(torch.uint8)).sum())
        total += w.numel()
    assert total > 0 and 0 < diff < total * 0.1


def test_sharded_output_with_index(flux_fp8, tmp_path):
    out = tmp_path / "sharded"
    r = dqfast.build_fp8_transformer(
        out,
        modelopt_hf_dir=flux_fp8.hf_dir,
        modelopt_backbone_ckpt=flux_fp8.backbone,
        base_transformer_dir=flux_fp8.base_dir,
        max_shard_size=20_000,
    )
    assert len(r.shards) > 3
    idx = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(idx["weight_map"].values())) == files
    assert files[0] == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
    got = _load_dir(out)
    assert set(idx["weight_map"]) == set(got)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    single = tmp_path / "single"
    dqfast.build_fp8_transformer(
        single, modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=flux_fp8.base_dir
    )
    one = _load_dir(single)
    assert set(one) == set(got) and all(torch.equal(one[k].view(torch.uint8), got[k].view(torch.uint8)) for k in one)


def test_scales_from_export_when_no_backbone(flux_fp8, flux_build, tmp_path):
    out = tmp_path / "noback"
    dqfast.build_fp8_transformer(out, modelopt_hf_dir=flux_fp8.hf_dir, base_transformer_dir=flux_fp8.base_dir)
    a, b = _load_dir(out), _load_dir(flux_build[0])
    assert set(a) == set(b)
    for k in a:
        if k.endswith("weight_scale") or a[k].dtype == torch.float8_e4m3fn:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def test_dry_run_writes_nothing_and_explains(flux_fp8, tmp_path):
    out = tmp_path / "dry"
    r = dqfast.build_fp8_transformer(
        out, modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=flux_fp8.base_dir, dry_run=True
    )
    assert not out.exists() and r.dry_run
    actions = {d.action for d in r.decisions}
    assert {"fp8", "bf16-fallback", "keep"} <= actions
    assert all(d.reason for d in r.decisions)


def test_wan_preset_build(modelopt_fixture, tmp_path):
    fx = modelopt_fixture("wan", "fp8")
    out = tmp_path / "wan"
    r = dqfast.build_fp8_transformer(
        out, modelopt_hf_dir=fx.hf_dir, modelopt_backbone_ckpt=fx.backbone, base_transformer_dir=fx.base_dir, model_type="auto"
    )
    got = _load_dir(out)
    base = _load_dir(fx.base_dir)
    # ModelOpt's Wan filter leaves blocks 0-2 unquantized; block 3 is FP8.
    assert got["blocks.3.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(got["blocks.0.attn1.to_q.weight"], base["blocks.0.attn1.to_q.weight"])
    assert got["proj_out.weight"].dtype == torch.bfloat16
    assert r.counts["quantized"] > 0


# ---------------------------------------------------------------- bad input


def _amax_sidecar(fx, path: Path, mutate=None) -> Path:
    amax = {k: v.to(torch.bfloat16).contiguous() for k, v in _backbone_amax(fx.backbone).items()}
    if mutate:
        mutate(amax)
    st.save_file(amax, str(path))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda a: a.pop("transformer_blocks.0.attn.to_q.weight_quantizer._amax"),
            "no calibrated weight amax for 'transformer_blocks.0.attn.to_q'",
        ),
        (
            lambda a: a.__setitem__(
                "transformer_blocks.0.attn.to_k.input_quantizer._amax", torch.tensor(float("nan"), dtype=torch.bfloat16)
            ),
            "input amax of 'transformer_blocks.0.attn.to_k' is nan",
        ),
        (
            lambda a: a.__setitem__("transformer_blocks.0.attn.to_k.input_quantizer._amax", torch.tensor(0.0, dtype=torch.bfloat16)),
            "is 0.0",
        ),
        (
            lambda a: a.__setitem__(
                "transformer_blocks.0.attn.to_k.input_quantizer._amax", torch.tensor(float("inf"), dtype=torch.bfloat16)
            ),
            "is inf",
        ),
        (
            lambda a: a.__setitem__("transformer_blocks.0.attn.to_k.weight_quantizer._amax", torch.ones(32, 1, dtype=torch.bfloat16)),
            "shape [32, 1]",
        ),
        (
            lambda a: a.__setitem__("transformer_blocks.0.attn.to_v.weight_quantizer._amax", torch.tensor(9.0, dtype=torch.bfloat16)),
            "different calibrations",
        ),
    ],
)
def test_bad_amax_is_refused_and_nothing_written(flux_fp8, tmp_path, mutate, message):
    side = _amax_sidecar(flux_fp8, tmp_path / "amax.safetensors", mutate)
    out = tmp_path / "out"
    with pytest.raises(PlanError) as e:
        dqfast.build_fp8_transformer(
            out, modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=side, base_transformer_dir=flux_fp8.base_dir
        )
    assert message in str(e.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["amax.safetensors"]


def test_existing_output_needs_overwrite(flux_fp8, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    kw = dict(modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=flux_fp8.base_dir)
    with pytest.raises(OutputExistsError):
        dqfast.build_fp8_transformer(out, **kw)
    assert (out / "keep.txt").read_text() == "mine"
    dqfast.build_fp8_transformer(out, overwrite=True, **kw)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_export_is_refused(flux_fp8, tmp_path):
    hf = _copy_tree(flux_fp8.hf_dir, tmp_path / "hf")
    f = hf / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as e:
        dqfast.build_fp8_transformer(
            tmp_path / "out", modelopt_hf_dir=hf, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=flux_fp8.base_dir
        )
    assert str(f) in str(e.value) and e.value.path == str(f)
    assert not (tmp_path / "out").exists()


def test_base_shape_mismatch_is_refused(flux_fp8, tmp_path):
    base = _copy_tree(flux_fp8.base_dir, tmp_path / "base")
    f = next(base.glob("*.safetensors"))
    sd = st.load_file(str(f))
    sd["transformer_blocks.0.norm1.linear.weight"] = sd["transformer_blocks.0.norm1.linear.weight"][:-1].contiguous()
    st.save_file(sd, str(f))
    with pytest.raises(PlanError, match=r"transformer_blocks\.0\.norm1\.linear\.weight': base shape"):
        dqfast.build_fp8_transformer(
            tmp_path / "out", modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=base
        )
    assert not (tmp_path / "out").exists()


def test_fallback_without_base_is_refused(flux_fp8, tmp_path):
    with pytest.raises(PlanError, match="no base transformer"):
        dqfast.build_fp8_transformer(tmp_path / "out", modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone)


def test_non_fp8_export_is_refused(modelopt_fixture, tmp_path):
    fx = modelopt_fixture("flux", "nvfp4")
    with pytest.raises(PlanError, match="quant_algo is NVFP4"):
        dqfast.build_fp8_transformer(
            tmp_path / "o", modelopt_hf_dir=fx.hf_dir, modelopt_backbone_ckpt=fx.backbone, base_transformer_dir=fx.base_dir
        )


# ---------------------------------------------------------------- calibration-free


def test_from_bf16_per_channel(flux_fp8, tmp_path):
    out = tmp_path / "pc"
    r = dqfast.build_fp8_transformer(out, base_transformer_dir=flux_fp8.base_dir, from_bf16=True, target="vllm-omni")
    got = _load_dir(out)
    base = _load_dir(flux_fp8.base_dir)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    q = [d.module for d in r.decisions if d.action == "fp8"]
    assert q
    for m in q:
        w = base[f"{m}.weight"].float()
        s = got[f"{m}.weight_scale"]
        assert tuple(s.shape) == (w.shape[0],)
        assert torch.equal(s, w.abs().amax(dim=1) / E4M3_MAX)
        ref = (w / s.unsqueeze(1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(got[f"{m}.weight"].view(torch.uint8), ref.view(torch.uint8))
        assert f"{m}.input_scale" not in got
    # ModelOpt's flux-dev filter and the preset's fallbacks stay BF16 and are ignored.
    for name in ("x_embedder", "proj_out", "transformer_blocks.0.norm1.linear"):
        assert got[f"{name}.weight"].dtype == torch.bfloat16
        assert all(t.ignored(cfg["ignore"], name) for t in TARGETS.values())


def test_from_bf16_per_tensor_needs_activation_amax(flux_fp8, tmp_path):
    with pytest.raises(PlanError, match="activation_amax"):
        dqfast.build_fp8_transformer(tmp_path / "o", base_transformer_dir=flux_fp8.base_dir, from_bf16=True, weight_granularity="tensor")
    out = tmp_path / "pt"
    dqfast.build_fp8_transformer(
        out, base_transformer_dir=flux_fp8.base_dir, from_bf16=True, weight_granularity="tensor", activation_amax=12.0
    )
    got = _load_dir(out)
    s = got["transformer_blocks.0.attn.to_q.input_scale"]
    assert tuple(s.shape) == (1,) and s.item() == np.float32(12.0) / np.float32(448.0)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_algo"] == "FP8"


def test_per_channel_export_gets_per_row_scales(flux_fp8, tmp_path):
    """FP8_PER_CHANNEL_PER_TOKEN: weight amax [N, 1] -> float32 weight_scale [N], no input_scale."""
    hf = tmp_path / "hf"
    import shutil

    shutil.copytree(flux_fp8.hf_dir, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"]["quant_algo"] = "FP8_PER_CHANNEL_PER_TOKEN"
    (hf / "config.json").write_text(json.dumps(cfg))
    f = hf / "diffusion_pytorch_model.safetensors"
    sd = {k: v for k, v in st.load_file(str(f)).items() if not k.endswith(".input_scale")}
    st.save_file(sd, str(f), metadata={"format": "pt"})
    base = _load_dir(flux_fp8.base_dir)
    amax = {}
    for k, _v in _backbone_amax(flux_fp8.backbone).items():
        if k.endswith(".weight_quantizer._amax"):
            w = base[k.replace(".weight_quantizer._amax", ".weight")].float()
            amax[k] = w.abs().amax(dim=1, keepdim=True).to(torch.bfloat16)
    side = tmp_path / "amax.safetensors"
    st.save_file(amax, str(side))
    kw = dict(modelopt_hf_dir=hf, modelopt_backbone_ckpt=side, base_transformer_dir=flux_fp8.base_dir)
    with pytest.raises(PlanError, match="different calibrations"):
        dqfast.build_fp8_transformer(tmp_path / "stale", **kw)  # export bytes are per-tensor
    out = tmp_path / "pc"
    r = dqfast.build_fp8_transformer(out, requantize=True, target="vllm-omni", **kw)
    assert r.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN"
    got = _load_dir(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    for m in [d.module for d in r.decisions if d.action == "fp8"]:
        w = base[f"{m}.weight"].float()
        s = got[f"{m}.weight_scale"]
        ref_s = amax[f"{m}.weight_quantizer._amax"].float().reshape(-1) / E4M3_MAX
        assert tuple(s.shape) == (w.shape[0],) and torch.equal(s, ref_s)
        ref = (w / s.unsqueeze(1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(got[f"{m}.weight"].view(torch.uint8), ref.view(torch.uint8))
        assert f"{m}.input_scale" not in got


def test_maxbound_divides_backbone_amax(flux_fp8, tmp_path):
    """SGLang's `--maxbound`: 448 is the default (same output); another bound changes the scales,
    which the export's e4m3 bytes then contradict (refused) unless they are re-quantized."""
    from click.testing import CliRunner
    from dqfast.cli import main

    kw = dict(modelopt_hf_dir=flux_fp8.hf_dir, modelopt_backbone_ckpt=flux_fp8.backbone, base_transformer_dir=flux_fp8.base_dir)
    dqfast.build_fp8_transformer(tmp_path / "a", **kw)
    dqfast.build_fp8_transformer(tmp_path / "b", maxbound=448, **kw)
    a, b = _load_dir(tmp_path / "a"), _load_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    with pytest.raises(PlanError, match="amax/224 .* different calibrations"):
        dqfast.build_fp8_transformer(tmp_path / "c", maxbound=224.0, **kw)
    assert not (tmp_path / "c").exists()
    dqfast.build_fp8_transformer(tmp_path / "d", maxbound=224.0, requantize=True, **kw)
    d = _load_dir(tmp_path / "d")
    m = "single_transformer_blocks.0.attn.to_q"
    assert torch.equal(d[f"{m}.weight_scale"], a[f"{m}.weight_scale"] * 2)
    assert torch.equal(d[f"{m}.input_scale"], a[f"{m}.input_scale"] * 2)
    with pytest.raises(PlanError, match="--maxbound"):
        dqfast.build_fp8_transformer(tmp_path / "e", from_bf16=True, base_transformer_dir=flux_fp8.base_dir, maxbound=224.0)
    args = ["build", "fp8", "--output-dir", str(tmp_path / "f"), "--modelopt-hf-dir", str(flux_fp8.hf_dir)]
    args += ["--modelopt-backbone-ckpt", str(flux_fp8.backbone), "--base-transformer-dir", str(flux_fp8.base_dir)]
    assert CliRunner().invoke(main, [*args, "--maxbound", "0"]).exit_code == 2
    r = CliRunner().invoke(main, [*args, "--maxbound", "448", "-q"])
    assert r.exit_code == 0, r.output


def test_ignore_is_sglangs_set_with_rmsnorms_and_collision_free_aliases(flux_fp8, flux_build):
    """`ignore` of an export build is SGLang 0.5.23's set: ModelOpt's entries, every kept weight
    without a calibrated scale — the RMSNorms `attn.norm_q`/`norm_k` included (before: Linears only) —
    and every fallback under SGLang's name; plus the diffusers names of the FeedForward fallbacks,
    none of which matches a quantized module under either engine's rule."""
    from dqfast.targets import TARGETS

    out, report = flux_build
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    export_ignore = json.loads((flux_fp8.hf_dir / "config.json").read_text())["quantization_config"]["ignore"]
    for i in (0, 1):
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            assert f"transformer_blocks.{i}.attn.{n}" in ignore
        assert {f"transformer_blocks.{i}.ff.proj_in", f"transformer_blocks.{i}.ff.net.0.proj"} <= set(ignore)
    # Calibrated, then disabled, and excluded by ModelOpt's own wildcard for both engines: not listed
    # again (SGLang's tool does not list them either).
    assert "time_text_embed.timestep_embedder.linear_1" not in ignore
    assert all(TARGETS[e].ignored(export_ignore, "time_text_embed.timestep_embedder.linear_1") for e in TARGETS)
    quantized = {d.module for d in report.decisions if d.action == "fp8"}
    for t in TARGETS.values():
        assert not {m: t.ignored(ignore, m) for m in quantized if t.ignored(ignore, m)}, t.name
