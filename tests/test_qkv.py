"""Packed <-> split q/k/v on synthetic FLUX.2-like NVFP4 checkpoints (real NVFP4 data from the Rust
quantizer), checked byte for byte and against independently derived rounding bounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import assert_safetensors_readable
from dqfast import _core
from dqfast.errors import PlanError
from dqfast.qkv import FLUX2_BFL_RULES, PACKED_QKV_RE, convert_qkv_layout, detect_qkv_layout

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

N = 32  # per-shard output rows
K = 32  # in-features (2 NVFP4 blocks)


def _nvfp4(w: np.ndarray, amax: float | None = None) -> dict[str, torch.Tensor]:
    """Real NVFP4 tensors of a float32 [rows, k] weight (global amax defaults to max |w|)."""
    rows, k = w.shape
    a = float(np.abs(w).max()) if amax is None else amax
    packed, scales, gs = _core.nvfp4_quantize(w.astype(np.float32).tobytes(), "F32", rows, k, a)
    return {
        "weight": torch.frombuffer(bytearray(packed), dtype=torch.uint8).reshape(rows, k // 2),
        "weight_scale": torch.frombuffer(bytearray(scales), dtype=torch.uint8).reshape(rows, k // 16).view(torch.float8_e4m3fn),
        "weight_scale_2": torch.tensor(gs, dtype=torch.float32),
    }


def _deq(w: torch.Tensor, s: torch.Tensor, gs: float) -> np.ndarray:
    k = w.shape[1] * 2
    d = _core.nvfp4_dequantize(w.numpy().tobytes(), s.view(torch.uint8).numpy().tobytes(), k, gs)
    return np.frombuffer(d, dtype=np.float32).reshape(w.shape[0], k).astype(np.float64)


def _write(d: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    d.mkdir(parents=True)
    st.save_file(tensors, str(d / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def _load(d: Path) -> dict[str, torch.Tensor]:
    assert_safetensors_readable(d)
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(st.load_file(str(f)))
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture()
def packed_ckpt(tmp_path: Path) -> Path:
    """BFL-named FLUX.2-like checkpoint: NVFP4 img_attn.qkv, BF16 txt_attn.qkv with bias, NVFP4
    single_blocks.linear1 (q/k/v + MLP), norms and an embedder."""
    rng = np.random.default_rng(0)
    t: dict[str, torch.Tensor] = {}
    for i in range(2):
        nv = _nvfp4(rng.standard_normal((3 * N, K)).astype(np.float32))
        for s, v in nv.items():
            t[f"double_blocks.{i}.img_attn.qkv.{s}"] = v
        t[f"double_blocks.{i}.img_attn.qkv.input_scale"] = torch.tensor(0.25, dtype=torch.float32)
        t[f"double_blocks.{i}.txt_attn.qkv.weight"] = torch.randn(3 * N, K).to(torch.bfloat16)
        t[f"double_blocks.{i}.txt_attn.qkv.bias"] = torch.randn(3 * N).to(torch.bfloat16)
        t[f"double_blocks.{i}.img_attn.norm.query_norm.scale"] = torch.randn(16).to(torch.bfloat16)
        lin1 = _nvfp4(rng.standard_normal((3 * N + 2 * 64, K)).astype(np.float32))
        for s, v in lin1.items():
            t[f"single_blocks.{i}.linear1.{s}"] = v
        t[f"single_blocks.{i}.linear1.input_scale"] = torch.tensor(0.5, dtype=torch.float32)
    t["img_in.weight"] = torch.randn(K, 16).to(torch.bfloat16)
    cfg = {
        "_class_name": "Flux2Transformer2DModel",
        "quantization_config": {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "group_size": 16,
            "ignore": ["double_blocks.0.txt_attn.qkv", "double_blocks.1.txt_attn.qkv", "img_in"],
            "checkpoint_weight_scale_layout": "linear",
            "swap_weight_nibbles": False,
        },
    }
    return _write(tmp_path / "packed", t, cfg)


def test_layout_detection():
    packed = ["double_blocks.0.img_attn.qkv.weight", "img_in.weight"]
    assert detect_qkv_layout(packed) == "packed"
    assert detect_qkv_layout(["single_blocks.3.linear1.weight_scale"]) == "packed"
    assert detect_qkv_layout(["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"]) == "split"
    assert detect_qkv_layout(["transformer_blocks.0.attn.add_v_proj.weight"]) == "split"
    assert detect_qkv_layout(["x_embedder.weight", "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"]) == "none"
    # SGLang's regex is anchored: a prefixed or differently named module is not packed.
    assert not PACKED_QKV_RE.search("model.double_blocks.0.img_attn.qkv.weight")
    assert not PACKED_QKV_RE.search("double_blocks.0.img_attn.proj.weight")


def test_split_then_fuse_is_identity(packed_ckpt: Path, tmp_path: Path):
    split = tmp_path / "split"
    r = convert_qkv_layout(packed_ckpt, split, to="split")
    assert r.counts["split"] == 4  # img + txt of two double blocks; linear1 is never split
    src, got = _load(packed_ckpt), _load(split)
    # single_blocks.N.linear1 stays fused, so SGLang's rule still calls the output packed: that is
    # why the layout facts are written explicitly into its config.
    assert detect_qkv_layout(got) == "packed"
    assert detect_qkv_layout(n for n in got if ".linear1." not in n) == "split"
    for i in range(2):
        fused = f"double_blocks.{i}.img_attn.qkv"
        for j, s in enumerate("qkv"):
            sh = f"transformer_blocks.{i}.attn.to_{s}"
            rows = slice(j * N, (j + 1) * N)
            assert torch.equal(got[f"{sh}.weight"], src[f"{fused}.weight"][rows])
            assert _bytes(got[f"{sh}.weight_scale"]) == _bytes(src[f"{fused}.weight_scale"][rows])
            assert _bytes(got[f"{sh}.weight_scale_2"]) == _bytes(src[f"{fused}.weight_scale_2"])
            assert got[f"{sh}.input_scale"].item() == 0.25
            add = f"transformer_blocks.{i}.attn.add_{s}_proj"
            assert torch.equal(got[f"{add}.weight"], src[f"double_blocks.{i}.txt_attn.qkv.weight"][rows])
            assert torch.equal(got[f"{add}.bias"], src[f"double_blocks.{i}.txt_attn.qkv.bias"][rows])
        assert torch.equal(got[f"single_blocks.{i}.linear1.weight"], src[f"single_blocks.{i}.linear1.weight"])
    cfg = json.loads((split / "config.json").read_text())["quantization_config"]
    assert "transformer_blocks.0.attn.add_k_proj" in cfg["ignore"] and "double_blocks.0.txt_attn.qkv" not in cfg["ignore"]
    assert cfg["checkpoint_weight_scale_layout"] == "linear" and cfg["swap_weight_nibbles"] is False

    back = tmp_path / "back"
    r2 = convert_qkv_layout(split, back, to="fused")
    assert r2.counts["fused"] == 4 and r2.counts["reconciled"] == 0
    again = _load(back)
    assert set(again) == set(src)
    for name in src:
        assert again[name].dtype == src[name].dtype and tuple(again[name].shape) == tuple(src[name].shape), name
        assert _bytes(again[name]) == _bytes(src[name]), name
    assert (
        json.loads((back / "config.json").read_text())["quantization_config"]["ignore"]
        == json.loads((packed_ckpt / "config.json").read_text())["quantization_config"]["ignore"]
    )


def test_fuse_reconciles_different_global_scales_within_e4m3_bound(tmp_path: Path):
    """Shards quantized with their own amax (different weight_scale_2) fuse to gs_max; every
    dequantized value moves by at most one e4m3 rounding of its block multiplier:
    |dw| <= 2^-4 |w| (normal) or 6 * 2^-10 * gs_max (subnormal), plus float32 slack."""
    rng = np.random.default_rng(1)
    t: dict[str, torch.Tensor] = {}
    # Very different magnitudes, so k and v land far below gs_max, some blocks in the subnormal range.
    mags = {"q": 1.0, "k": 0.02, "v": 3e-4}
    orig = {}
    for s, mag in mags.items():
        w = (rng.standard_normal((N, K)) * mag).astype(np.float32)
        w[0, :16] *= 1e-3  # a tiny block
        nv = _nvfp4(w)
        m = f"transformer_blocks.0.attn.to_{s}"
        for suf, v in nv.items():
            t[f"{m}.{suf}"] = v
        t[f"{m}.input_scale"] = torch.tensor(0.125 if s != "v" else 0.25, dtype=torch.float32)
        orig[s] = (nv["weight"], nv["weight_scale"], float(nv["weight_scale_2"]))
    src = _write(tmp_path / "split", t, {"_class_name": "Flux2Transformer2DModel"})
    out = tmp_path / "fused"
    r = convert_qkv_layout(src, out, to="fused")
    assert r.counts["reconciled"] == 1
    got = _load(out)
    f = "double_blocks.0.img_attn.qkv"
    gmax = max(g for _, _, g in orig.values())
    assert got[f"{f}.weight_scale_2"].item() == np.float32(gmax)
    assert got[f"{f}.input_scale"].item() == 0.25 and r.warnings  # max of differing input scales, reported
    w_all = _deq(got[f"{f}.weight"], got[f"{f}.weight_scale"], float(np.float32(gmax)))
    worst = 0.0
    for j, s in enumerate("qkv"):
        w, sc, gs = orig[s]
        before = _deq(w, sc, gs)
        after = w_all[j * N : (j + 1) * N]
        bound = np.abs(before) * 2.0**-4 + 6 * gmax * 2.0**-10 + np.abs(before) * 2.0**-20
        assert np.all(np.abs(after - before) <= bound), s
        assert torch.equal(got[f"{f}.weight"][j * N : (j + 1) * N], w)  # codes untouched
        # Block multipliers: relative change <= 2^-4 where the rescaled scale is a normal e4m3 value.
        s_old = np.frombuffer(_core.e4m3_to_f32(_bytes(sc)), np.float32).astype(np.float64) * gs
        s_new = (
            np.frombuffer(_core.e4m3_to_f32(_bytes(got[f"{f}.weight_scale"][j * N : (j + 1) * N])), np.float32).astype(np.float64) * gmax
        )
        normal = s_new / gmax >= 2.0**-6
        rel = np.abs(s_new - s_old)[normal] / s_old[normal]
        assert np.all(rel <= 2.0**-4 * (1 + 2.0**-20))
        worst = max(worst, float(np.max(np.abs(s_new - s_old)[s_old > 0] / s_old[s_old > 0])))
    assert np.any(w_all[N:] != np.concatenate([_deq(*orig["k"]), _deq(*orig["v"])]))  # really re-rounded
    dec = [d for d in r.decisions if d.action == "fuse+reconcile"]
    assert dec and f"{worst:.3%}" in dec[0].reason


def test_swizzled_scales_split_only_at_tile_boundaries(tmp_path: Path):
    from dqfast.runtime.quant import swizzle_block_scales_128x4

    rng = np.random.default_rng(2)
    n, k = 128, 64
    nv = _nvfp4(rng.standard_normal((3 * n, k)).astype(np.float32))
    lin = nv["weight_scale"]
    t = {
        "double_blocks.0.img_attn.qkv.weight": nv["weight"],
        "double_blocks.0.img_attn.qkv.weight_scale": swizzle_block_scales_128x4(lin),
        "double_blocks.0.img_attn.qkv.weight_scale_2": nv["weight_scale_2"],
    }
    src = _write(tmp_path / "sw", t)  # no config: SGLang would call a packed checkpoint swizzled
    out = tmp_path / "out"
    r = convert_qkv_layout(src, out, to="split")
    got = _load(out)
    for j, s in enumerate("qkv"):
        want = swizzle_block_scales_128x4(lin[j * n : (j + 1) * n])
        assert _bytes(got[f"transformer_blocks.0.attn.to_{s}.weight_scale"]) == _bytes(want)
    md = st.safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt").metadata()
    assert "swizzled" in md.get("quantization_config", "") or any("swizzled" in w for w in r.warnings)
    # 32-row shards of swizzled scales cannot be sliced.
    small = _nvfp4(rng.standard_normal((3 * N, K)).astype(np.float32))
    t2 = {f"double_blocks.0.img_attn.qkv.{s}": v for s, v in small.items()}
    src2 = _write(tmp_path / "sw2", t2)
    with pytest.raises(PlanError, match="multiples of 128 rows"):
        convert_qkv_layout(src2, tmp_path / "o2", to="split")
    assert not (tmp_path / "o2").exists()
    convert_qkv_layout(src2, tmp_path / "o3", to="split", scale_layout="linear")


def test_fuse_refuses_incomplete_or_mixed_groups(tmp_path: Path):
    rng = np.random.default_rng(3)
    t = {}
    for s in "qk":
        for suf, v in _nvfp4(rng.standard_normal((N, K)).astype(np.float32)).items():
            t[f"transformer_blocks.0.attn.to_{s}.{suf}"] = v
    src = _write(tmp_path / "a", dict(t))
    with pytest.raises(PlanError, match="fusing needs q, k and v"):
        convert_qkv_layout(src, tmp_path / "o", to="fused")
    t["transformer_blocks.0.attn.to_v.weight"] = torch.randn(N, K).to(torch.bfloat16)
    src = _write(tmp_path / "b", t)
    with pytest.raises(PlanError, match="some shards are NVFP4"):
        convert_qkv_layout(src, tmp_path / "o", to="fused")
    assert not (tmp_path / "o").exists()
    assert FLUX2_BFL_RULES[0].shards_of("double_blocks.7.img_attn.qkv") == [
        "transformer_blocks.7.attn.to_q",
        "transformer_blocks.7.attn.to_k",
        "transformer_blocks.7.attn.to_v",
    ]
