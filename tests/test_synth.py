"""Synthetic checkpoints: real diffusers names/shapes, valid sharded safetensors, a ModelOpt-like
FP8 export that dqfast converts, and output that dequantizes close to the BF16 base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dqfast
import numpy as np
import pytest
from dqfast.synth import family_config, make_transformer, tensor_specs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
st_torch = pytest.importorskip("safetensors.torch")

TINY = {
    "flux1": dict(
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=8,
        joint_attention_dim=32,
        pooled_projection_dim=24,
    ),
    "wan": dict(
        num_layers=3, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=48
    ),
}


def _diffusers_state(family: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    cls = diffusers.FluxTransformer2DModel if family == "flux1" else diffusers.WanTransformer3DModel
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    model = cls(**kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "family,extra",
    [("flux1", {}), ("flux1", {"guidance_embeds": False}), ("wan", {}), ("wan", {"cross_attn_norm": False})],
)
def test_names_and_shapes_match_diffusers(family: str, extra: dict) -> None:
    cfg = family_config(family, **TINY[family], **extra)
    ours = {s.name: s.shape for s in tensor_specs(family, cfg)}
    real = _diffusers_state(family, cfg)
    assert list(ours) == list(real)  # same names, same state-dict order
    assert ours == real


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(st_torch.load_file(str(f)))
    return out


def _export_kwargs(family: str) -> dict:
    t = dict(TINY[family])
    kw = {"blocks": t.pop("num_layers")}
    if family == "flux1":
        kw["single_blocks"] = t.pop("num_single_layers")
    kw["heads"] = t.pop("num_attention_heads")
    kw["head_dim"] = t.pop("attention_head_dim")
    kw["config_overrides"] = t
    return kw


@pytest.mark.parametrize("family", ["flux1", "wan"])
def test_sharded_base_is_valid_and_deterministic(tmp_path: Path, family: str) -> None:
    a = make_transformer(tmp_path / "a", family, seed=3, max_shard_bytes=30_000, **_export_kwargs(family))
    b = make_transformer(tmp_path / "b", family, seed=3, max_shard_bytes=30_000, modelopt_fp8_export=True, **_export_kwargs(family))
    c = make_transformer(tmp_path / "c", family, seed=4, max_shard_bytes=30_000, **_export_kwargs(family))
    index = json.loads((a.base / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(a.base.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    sd = _load_dir(a.base)
    cfg = json.loads((a.base / "config.json").read_text())
    assert cfg["_class_name"] in ("FluxTransformer2DModel", "WanTransformer3DModel")
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in sd.values()) == a.base_bytes
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    w = sd["proj_out.weight"].float()
    assert 0.01 < float(w.std()) < 0.03 and abs(float(w.mean())) < 0.01
    # A diffusers model built from the written config.json takes the state dict strictly.
    cls = diffusers.FluxTransformer2DModel if family == "flux1" else diffusers.WanTransformer3DModel
    model = cls.from_config({k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()})
    model.load_state_dict(sd, strict=True)
    digest = lambda d: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.glob("*.safetensors")))).hexdigest()
    assert digest(a.base) == digest(b.base)  # the export does not perturb the base stream
    assert digest(a.base) != digest(c.base)


@pytest.mark.parametrize("family", ["flux1", "wan"])
@pytest.mark.parametrize("amax_from", ["backbone", "sidecar"])
def test_export_converts_and_dequantizes_close_to_base(tmp_path: Path, family: str, amax_from: str) -> None:
    p = make_transformer(
        tmp_path / "src",
        family,
        seed=1,
        max_shard_bytes=40_000,
        modelopt_fp8_export=True,
        export_filter="no-block-filter",
        **_export_kwargs(family),
    )
    assert p.backbone is not None and p.amax is not None and p.export is not None
    base = _load_dir(p.base)
    export = _load_dir(p.export)
    qcfg = json.loads((p.export / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "modelopt" and qcfg["quant_algo"] == "FP8"
    assert qcfg["producer"] == {"name": "modelopt", "version": "0.47.0"}
    assert sorted(qcfg["ignore"]) == p.ignored_modules and p.quantized_modules
    # Export bytes are ModelOpt's: BF16 weight / 0-dim float32 scale stays BF16, then e4m3.
    for m in p.quantized_modules:
        ws = export[f"{m}.weight_scale"]
        assert ws.dtype == torch.float32 and ws.dim() == 0
        w = base[f"{m}.weight"]
        assert float(ws) == float(np.float32(w.float().abs().max().item()) / np.float32(448))
        expect = (w / ws).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(export[f"{m}.weight"].view(torch.uint8), expect.view(torch.uint8)), m

    ckpt = p.backbone if amax_from == "backbone" else p.amax
    out = tmp_path / "out"
    report = dqfast.build_fp8_transformer(
        out, modelopt_hf_dir=p.export_root, modelopt_backbone_ckpt=ckpt, base_transformer_dir=p.base.parent, fsync=False
    )
    # Modules the preset sends back to BF16 (SGLang's FLUX.1 list) come from the base instead.
    preset = dqfast.get_preset(family)
    fp8_modules = [m for m in p.quantized_modules if preset.fp8_fallback_match(m) is None]
    assert report.counts["quantized"] == len(fp8_modules)
    assert report.counts["bf16_fallback"] >= len(p.quantized_modules) - len(fp8_modules)
    got = _load_dir(out)
    n_fp8 = 0
    for name, t in base.items():
        module = name.rsplit(".", 1)[0]
        o = got[name]
        if name.endswith(".weight") and module in fp8_modules:
            assert o.dtype == torch.float8_e4m3fn
            deq = o.float() * got[f"{module}.weight_scale"].float()
            rel = float((deq - t.float()).norm() / t.float().norm())
            assert rel < 0.05, (name, rel)
            n_fp8 += 1
        else:
            assert o.dtype == torch.bfloat16 and torch.equal(o, t), name
    assert n_fp8 == len(fp8_modules) > 0


def test_modelopt_filter_leaves_wan_edge_blocks_unquantized(tmp_path: Path) -> None:
    kw = _export_kwargs("wan")
    kw["blocks"] = 4
    p = make_transformer(tmp_path / "w", "wan", modelopt_fp8_export=True, **kw)
    # ModelOpt's wan2.2 filter disables blocks 0-2 (and 37-39): only block 3 is quantized here.
    assert p.quantized_modules and all(m.startswith("blocks.3.") for m in p.quantized_modules)
