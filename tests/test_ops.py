"""dqfast.ops: the builders' kernels on numpy arrays and torch CPU tensors, in place and bit-exact."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from dqfast import ops
from dqfast.errors import PlanError
from dqfast.fp8 import build_fp8_transformer
from dqfast.nvfp4 import build_nvfp4_transformer, fused_groups
from dqfast.reader import open_checkpoint, read_tensor
from dqfast.synth import make_transformer

torch = pytest.importorskip("torch")


def _e4m3_ref(x: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """torch's reference: divide in float32, clamp to ±448, cast."""
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


@pytest.mark.parametrize("tdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_e4m3_every_granularity_matches_torch_and_round_trips(tdtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(200, 96, generator=g) * 3).to(tdtype)
    w[7] = 0  # an all-zero row: scale 1, as the builders write
    q, s = ops.quantize_e4m3(w)
    assert s.shape == (1,) and s[0] == np.float32(w.float().abs().max().item()) / np.float32(448)
    assert np.array_equal(q, _e4m3_ref(w, torch.from_numpy(s)))
    q, s = ops.quantize_e4m3(w, granularity="channel")
    assert s.shape == (200,) and s[7] == 1.0
    assert np.array_equal(q, _e4m3_ref(w, torch.from_numpy(s)[:, None]))
    q, s = ops.quantize_e4m3(w, granularity="block", block_size=(64, 40))
    assert s.shape == (4, 3)  # ragged last blocks: 200 = 3 * 64 + 8 rows, 96 = 2 * 40 + 16 columns
    full = torch.from_numpy(s).repeat_interleave(64, 0)[:200].repeat_interleave(40, 1)[:, :96]
    assert np.array_equal(q, _e4m3_ref(w, full))
    assert np.array_equal(ops.amax(w, granularity="block", block_size=(64, 40)) / np.float32(448), s)
    back = ops.dequantize_e4m3(q, s, block_size=(64, 40))
    want = torch.from_numpy(q).view(torch.float8_e4m3fn).float() * full
    assert back.dtype == np.float32 and np.array_equal(back, want.numpy())
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 away from the subnormal range.
    big = np.abs(w.float().numpy()) > 1e-2
    assert np.all(np.abs(back - w.float().numpy())[big] <= np.abs(w.float().numpy())[big] * 2**-4)


def test_numpy_inputs_and_modelopt_rounding():
    rng = np.random.default_rng(1)
    x32 = rng.standard_normal((64, 48), dtype=np.float32)
    x16 = x32.astype(np.float16)
    for x in (x32, x16):
        q, s = ops.quantize_e4m3(x, granularity="channel")
        assert np.array_equal(q, _e4m3_ref(torch.from_numpy(x), torch.from_numpy(s)[:, None]))
    # BF16 as bit patterns (what dqfast.read_tensor(raw=True) and dqfast.stream hand out).
    tb = torch.from_numpy(x32).to(torch.bfloat16)
    bits = tb.view(torch.int16).numpy().view(np.uint16)
    q1, s1 = ops.quantize_e4m3(bits, dtype="BF16", rounding="modelopt")
    q2, s2 = ops.quantize_e4m3(tb, rounding="modelopt")
    # ModelOpt: a 0-dim float32 scale keeps the quotient in bfloat16 (rounded twice).
    ref = (tb / torch.from_numpy(s1).reshape(())).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert not np.array_equal(q1, ops.quantize_e4m3(tb)[0])
    assert np.array_equal(q1, q2) and np.array_equal(q1, ref)
    with pytest.raises(PlanError, match="dtype='BF16'"):
        ops.quantize_e4m3(bits)


def test_nvfp4_round_trip_and_given_global_amax():
    from nvfp4_reference import quantize as quantize_reference

    g = torch.Generator().manual_seed(2)
    w = (torch.randn(48, 64, generator=g) * 2).to(torch.bfloat16)
    nv = ops.quantize_nvfp4(w)
    ref_w, ref_s, ref_g = quantize_reference(w)
    assert nv.weight.shape == (48, 32) and nv.weight_scale.shape == (48, 4)
    assert np.array_equal(nv.weight, ref_w.numpy())
    assert np.array_equal(nv.weight_scale, ref_s.view(torch.uint8).numpy())
    assert nv.weight_scale_2 == np.float32(ref_g.item())
    back = ops.dequantize_nvfp4(nv.weight, nv.weight_scale, nv.weight_scale_2)
    assert back.shape == (48, 64)
    # FP4 of a block is within half of the largest step (2) times the block's scale.
    blocks = np.abs(back - w.float().numpy()).reshape(48, 4, 16).max(-1)
    from dqfast import _core

    step = np.frombuffer(_core.e4m3_to_f32(nv.weight_scale.tobytes()), np.float32).reshape(48, 4) * nv.weight_scale_2
    assert np.all(blocks <= step + 1e-6)
    shared = ops.quantize_nvfp4(w, global_amax=100.0)
    assert shared.weight_scale_2 == np.float32(100.0) / np.float32(2688)
    assert np.array_equal(ops.swap_nibbles(ops.swap_nibbles(nv.weight)), nv.weight)
    assert np.array_equal(ops.swap_nibbles(np.array([0x12, 0xAB], np.uint8)), [0x21, 0xBA])


def test_outputs_are_written_in_place_into_numpy_and_torch():
    w = torch.randn(32, 64).to(torch.bfloat16)
    buf = np.empty((32, 64), np.uint8)
    q, _ = ops.quantize_e4m3(w, out=buf)
    assert q is buf
    t8 = torch.empty(32, 64, dtype=torch.float8_e4m3fn)
    q2, s = ops.quantize_e4m3(w, out=t8)
    assert q2 is t8 and np.array_equal(t8.view(torch.uint8).numpy(), buf)
    deq = torch.empty(32, 64)
    assert ops.dequantize_e4m3(t8, s, out=deq) is deq
    assert np.array_equal(deq.numpy(), ops.dequantize_e4m3(buf, s))
    # Read-only inputs (a view over bytes) are read as they are.
    ro = np.frombuffer(w.float().numpy().tobytes(), np.float32).reshape(32, 64)
    assert not ro.flags.writeable
    assert np.array_equal(ops.quantize_e4m3(ro)[0], ops.quantize_e4m3(w.float())[0])


def test_bad_arguments_are_typed_errors():
    w = np.ones((4, 32), np.float32)
    with pytest.raises(PlanError, match="overlaps an input"):
        ops.swap_nibbles(w.view(np.uint8), out=w.view(np.uint8))
    with pytest.raises(PlanError, match="expected shape"):
        ops.quantize_e4m3(w, out=np.empty(3, np.uint8))
    with pytest.raises(PlanError, match="writable"):
        ops.quantize_e4m3(w, out=np.frombuffer(bytes(128), np.uint8))
    with pytest.raises(PlanError, match="NaN"):
        ops.quantize_e4m3(np.array([[1.0, np.nan]], np.float32), granularity="channel")
    with pytest.raises(PlanError, match="inf"):
        ops.quantize_nvfp4(np.full((1, 16), np.inf, np.float32))
    with pytest.raises(PlanError, match="multiple of 16"):
        ops.quantize_nvfp4(np.ones((2, 20), np.float32))
    with pytest.raises(PlanError, match="not bfloat16"):
        ops.amax(np.ones(3, np.float64))
    with pytest.raises(PlanError, match="must be finite and > 0"):
        ops.quantize_e4m3(w, scale=0.0)
    with pytest.raises(PlanError, match="need shape"):
        ops.quantize_e4m3(w, scale=[1.0, 2.0], granularity="channel")
    with pytest.raises(PlanError, match="granularity"):
        ops.amax(w, granularity="row")  # type: ignore[arg-type]


_NO_COPY = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from dqfast import ops
    kind = sys.argv[1]
    n = 64 << 20  # 64 Mi elements: 256 MiB of float32, 128 MiB of bf16
    if kind == "torch":
        import torch
        x = torch.ones(n // 1024, 1024, dtype=torch.bfloat16)
    else:
        x = np.ones((n // 1024, 1024), np.float32)
    out = np.full((n // 1024, 1024), 1, np.uint8)  # written: resident before the calls
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = peak()
    ops.quantize_e4m3(x, scale=1.0, out=out)
    first = bool((out[::97] == 0x38).all())  # 1.0 / 1.0 (a sample: a full compare would allocate)
    ops.quantize_e4m3(x, granularity="channel", out=out)
    ops.amax(x, granularity="block")
    input_bytes = x.nbytes if kind != "torch" else x.numel() * 2
    print(json.dumps({"growth": peak() - before, "input": input_bytes, "ok": first and bool((out[::97] == 0x7E).all())}))
    """
)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_inputs_are_not_copied(kind):
    """Peak RSS grows by far less than the input size: the kernels read the caller's memory."""
    r = subprocess.run([sys.executable, "-c", _NO_COPY, kind], capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(r.stdout)
    assert res["ok"]  # per channel: 1.0 / (1 / 448) is 448, byte 0x7E
    assert res["growth"] < res["input"] // 8, res


def test_ops_match_the_builders_byte_for_byte(tmp_path):
    """A tiny FLUX.1 checkpoint built by the builders; the same weights through dqfast.ops."""
    syn = make_transformer(tmp_path / "syn", "flux1", blocks=1, single_blocks=1, heads=2, head_dim=32, seed=3)
    base = open_checkpoint(syn.base)
    fp8_ch, fp8_t, nv = tmp_path / "fp8c", tmp_path / "fp8t", tmp_path / "nv"
    # target none: the per-channel default and FLUX.1 NVFP4 (refused under the default any).
    build_fp8_transformer(fp8_ch, base_transformer_dir=syn.base, from_bf16=True, model_type="flux1", target="none")
    build_fp8_transformer(
        fp8_t, base_transformer_dir=syn.base, from_bf16=True, model_type="flux1", weight_granularity="tensor", activation_amax=4.0
    )
    build_nvfp4_transformer(nv, base_transformer_dir=syn.base, from_bf16=True, model_type="flux1", target="none")

    def weight(name: str) -> np.ndarray:
        return read_tensor(syn.base, name, raw=True)

    checked = 0
    for out, gran in ((fp8_ch, "channel"), (fp8_t, "tensor")):
        built = open_checkpoint(out)
        for name, meta in built.tensors.items():
            if meta.dtype != "F8_E4M3":
                continue
            q, s = ops.quantize_e4m3(weight(name), dtype=base.tensors[name].dtype, granularity=gran)
            assert q.tobytes() == read_tensor(out, name, raw=True).tobytes(), name
            scale_name = name.removesuffix("weight") + "weight_scale"
            assert s.tobytes() == read_tensor(out, scale_name).tobytes(), scale_name
            checked += 1
    built = open_checkpoint(nv)
    mods = [n.removesuffix(".weight_scale_2") for n in built.tensors if n.endswith(".weight_scale_2")]
    group_of = {m: g for g in fused_groups(mods).values() for m in g}
    for m in mods:
        members = group_of.get(m, [m])
        ga = max(float(ops.amax(weight(f"{x}.weight"), dtype="BF16")[0]) for x in members)
        r = ops.quantize_nvfp4(weight(f"{m}.weight"), dtype="BF16", global_amax=ga)
        assert r.weight.tobytes() == read_tensor(nv, f"{m}.weight", raw=True).tobytes(), m
        assert r.weight_scale.tobytes() == read_tensor(nv, f"{m}.weight_scale", raw=True).tobytes(), m
        assert r.weight_scale_2.tobytes() == read_tensor(nv, f"{m}.weight_scale_2").astype(np.float32).tobytes(), m
        checked += 1
    assert checked > 20 and any(len(g) > 1 for g in group_of.values()) is True


def test_kernels_release_the_gil():
    """Another Python thread keeps running while a kernel works: the longest pause it sees is a
    fraction of the kernel's duration (holding the GIL would stall it for all of it)."""
    import threading
    import time

    x = np.ones((8192, 4096), np.float32)  # 128 MiB
    out = np.empty(x.shape, np.uint8)
    t0 = time.perf_counter()
    ops.quantize_e4m3(x, granularity="channel", out=out)
    duration = time.perf_counter() - t0
    done = threading.Event()
    t = threading.Thread(target=lambda: (ops.quantize_e4m3(x, granularity="channel", out=out), done.set()))
    last = time.perf_counter()
    longest = 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    t.join()
    assert longest < duration / 2, (longest, duration)
