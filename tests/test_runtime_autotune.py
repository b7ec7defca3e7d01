"""FP8 back-end autotune: selection, on-disk cache per GPU, and its use by Fp8Linear (CPU only:
the GPU, the timer and the GEMMs are replaced by fakes)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from dqfast.runtime import autotune as AT
from dqfast.runtime import linear as L


class FakeTimer:
    """Returns a fixed time per candidate (looked up by the name the test gave the callable)."""

    def __init__(self, times: dict[str, float]) -> None:
        self.times = times
        self.calls: list[str] = []

    def __call__(self, fn) -> float:
        name = fn()
        self.calls.append(name)
        return self.times[name]


def _cands(*names: str) -> dict:
    return {n: (lambda n=n: n) for n in names}


def test_m_bucket_and_key() -> None:
    assert [AT.m_bucket(m) for m in (1, 16, 17, 1000, 1024, 1025, 4608)] == [16, 16, 32, 1024, 1024, 2048, 8192]
    assert AT.shape_key(1000, 3072, 9216, "pt", "static", torch.bfloat16) == "M1024_K3072_N9216_wpt_astatic_bfloat16"
    assert AT.device_slug("NVIDIA H200", (9, 0)) == "NVIDIA_H200-sm90"


def test_picks_fastest_and_persists(tmp_path) -> None:
    path = tmp_path / "fp8.json"
    timer = FakeTimer({"triton": 0.05, "scaled_mm": 0.08, "flashinfer": 0.04})
    t = AT.Autotuner(path, device_name="GPU X", timer=timer)
    assert t.choose("k1", _cands("triton", "scaled_mm", "flashinfer")) == "flashinfer"
    assert sorted(timer.calls) == ["flashinfer", "scaled_mm", "triton"] and t.measured == 1
    data = json.loads(path.read_text())
    assert data["device"] == "GPU X" and data["entries"]["k1"]["backend"] == "flashinfer"
    assert data["entries"]["k1"]["times_ms"]["scaled_mm"] == 0.08
    assert [p.name for p in tmp_path.iterdir()] == ["fp8.json"]  # no temporary file left behind

    # A new process (new Autotuner on the same file) reuses the choice without timing anything.
    timer2 = FakeTimer({})
    t2 = AT.Autotuner(path, timer=timer2)
    assert t2.choose("k1", _cands("triton", "scaled_mm", "flashinfer")) == "flashinfer"
    assert timer2.calls == [] and t2.measured == 0


def test_cached_choice_not_runnable_here_is_retuned(tmp_path) -> None:
    path = tmp_path / "fp8.json"
    AT.Autotuner(path, timer=FakeTimer({"flashinfer": 0.01, "triton": 0.02})).choose("k", _cands("flashinfer", "triton"))
    # Same GPU, but FlashInfer is not installed in this process: the cached winner is not a candidate.
    t = AT.Autotuner(path, timer=FakeTimer({"triton": 0.02, "scaled_mm": 0.03}))
    assert t.lookup("k", ("triton", "scaled_mm")) is None
    assert t.choose("k", _cands("triton", "scaled_mm")) == "triton" and t.measured == 1


def test_failing_candidate_is_skipped_and_recorded(tmp_path) -> None:
    def boom():
        raise NotImplementedError("per-tensor only")

    t = AT.Autotuner(tmp_path / "c.json", timer=lambda fn: (fn(), 0.5)[1])
    assert t.choose("k", {"flashinfer": boom, "triton": lambda: None}) == "triton"
    assert "NotImplementedError: per-tensor only" in t.entries["k"]["errors"]["flashinfer"]
    with pytest.raises(RuntimeError, match="no back end ran"):
        t.choose("k2", {"flashinfer": boom})


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 999, "entries": {}}), json.dumps([1, 2])])
def test_unreadable_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match="re-tuning"):
        t = AT.Autotuner(path, timer=FakeTimer({"triton": 1.0}))
    assert t.entries == {}
    assert t.choose("k", _cands("triton")) == "triton"
    assert json.loads(path.read_text())["version"] == AT.CACHE_VERSION  # rewritten in the current format


def test_unwritable_cache_dir_warns_but_still_chooses(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = AT.Autotuner(blocker / "sub" / "c.json", timer=FakeTimer({"triton": 1.0}))
        assert t.choose("k", _cands("triton")) == "triton"
    assert any("not written" in str(w.message) for w in caught)


def test_cache_dir_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DQFAST_AUTOTUNE_CACHE", str(tmp_path))
    assert AT.cache_dir() == tmp_path
    monkeypatch.delenv("DQFAST_AUTOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert AT.cache_dir() == tmp_path / "xdg" / "dqfast"


def _pretend_gpu(monkeypatch, cap=(9, 0), modules=("triton", "flashinfer")) -> None:
    monkeypatch.setattr(L, "_capability", lambda device: cap)
    monkeypatch.setattr(L, "_has_module", lambda name: name in modules)


def test_candidates_by_capability_and_scales(monkeypatch) -> None:
    _pretend_gpu(monkeypatch)
    dev = torch.device("cpu")
    fi = ("flashinfer", "flashinfer_cudnn", "flashinfer_cutlass")
    assert L.fp8_candidates(dev, static_per_tensor=True) == ("triton", "triton_fused", "scaled_mm", *fi)
    assert L.fp8_candidates(dev, static_per_tensor=False, static=True) == ("triton", "triton_fused", "scaled_mm")  # per-channel
    assert L.fp8_candidates(dev, static_per_tensor=False, static=False) == ("triton", "scaled_mm")  # per-token
    _pretend_gpu(monkeypatch, modules=("triton",))
    assert L.fp8_candidates(dev, static_per_tensor=True) == ("triton", "triton_fused", "scaled_mm")
    _pretend_gpu(monkeypatch, cap=(8, 0))
    assert L.fp8_candidates(dev, static_per_tensor=True) == ()


class _Recorder:
    """Stands in for Fp8Linear._run: records which back end ran, returns a recognisable output."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, mod, x2d, out_dtype, backend, share):
        self.ran.append(backend)
        return torch.full((x2d.shape[0], mod.out_features), float(len(backend)), dtype=out_dtype)


@pytest.fixture
def fake_gpu_module(monkeypatch, tmp_path):
    _pretend_gpu(monkeypatch)
    rec = _Recorder()
    monkeypatch.setattr(L.Fp8Linear, "_run", lambda self, *a: rec(self, *a))
    times = {
        "triton": 0.05,
        "triton_fused": 0.09,
        "scaled_mm": 0.08,
        "flashinfer": 0.03,
        "flashinfer_cudnn": 0.2,
        "flashinfer_cutlass": 0.1,
    }

    def timer(fn):
        fn()
        return times[rec.ran[-1]]

    tuner = AT.Autotuner(tmp_path / "fp8-gemm-FAKE-sm90.json", timer=timer)
    monkeypatch.setattr(AT, "tuner_for", lambda device: tuner)
    monkeypatch.delenv("DQFAST_FP8_GEMM_BACKEND", raising=False)
    mod = L.Fp8Linear(64, 32, static_input_scale=True)
    return mod, rec, tuner


def test_fp8linear_autotune_measures_once_per_bucket(fake_gpu_module) -> None:
    mod, rec, tuner = fake_gpu_module
    mod.backend_request = "autotune"
    x = torch.randn(100, 64).to(torch.bfloat16)
    y = mod(x)
    assert rec.ran[-1] == "flashinfer" and y[0, 0] == len("flashinfer")
    assert tuner.measured == 1 and tuner.entries["M128_K64_N32_wpt_astatic_bfloat16"]["backend"] == "flashinfer"
    n_runs = len(rec.ran)
    mod(torch.randn(120, 64).to(torch.bfloat16))  # same bucket (128): no timing, just the winner
    assert rec.ran[n_runs:] == ["flashinfer"] and tuner.measured == 1
    mod(torch.randn(2000, 64).to(torch.bfloat16))  # new bucket: measured
    assert tuner.measured == 2


def test_fp8linear_auto_reads_cache_but_never_measures(fake_gpu_module) -> None:
    mod, rec, tuner = fake_gpu_module
    x = torch.randn(100, 64).to(torch.bfloat16)
    mod(x)  # backend None -> auto: untuned shape runs the default, nothing timed
    assert rec.ran == ["triton"] and tuner.measured == 0
    tuner.entries["M128_K64_N32_wpt_astatic_bfloat16"] = {"backend": "scaled_mm"}  # tuned by another process
    mod.__dict__.pop("_tuned", None)
    mod(x)
    assert rec.ran[-1] == "scaled_mm" and tuner.measured == 0


def test_fp8linear_autotune_does_not_measure_during_graph_capture(fake_gpu_module, monkeypatch) -> None:
    mod, rec, tuner = fake_gpu_module
    mod.backend_request = "autotune"
    monkeypatch.setattr(L, "_capturing", lambda x: True)
    mod(torch.randn(100, 64).to(torch.bfloat16))
    assert rec.ran == ["triton"] and tuner.measured == 0
    monkeypatch.setattr(L, "_capturing", lambda x: False)
    mod(torch.randn(100, 64).to(torch.bfloat16))  # not memoized during capture: tuned now
    assert tuner.measured == 1


def test_env_backend_switch_between_calls_is_seen(fake_gpu_module, monkeypatch) -> None:
    mod, rec, _ = fake_gpu_module
    x = torch.randn(8, 64).to(torch.bfloat16)
    monkeypatch.setenv("DQFAST_FP8_GEMM_BACKEND", "scaled_mm")
    mod(x)
    monkeypatch.setenv("DQFAST_FP8_GEMM_BACKEND", "flashinfer_cudnn")
    mod(x)
    assert rec.ran == ["scaled_mm", "flashinfer_cudnn"]
