"""The engine's promises under hostile inputs (issue 11 §2, §3, §5; issue 14 progress):
every output readable by the safetensors library (zero-dimension tensors included), scales that
underflow refused, NaN e4m3 bytes detected and refused unless repaired, broken indexes and FIFOs
refused (never hung on), thread counts capped, dry runs validated by the engine, builds stopped
by SIGINT/SIGTERM within a second, and progress reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dqfast
import numpy as np
import pytest
from ckpt_helpers import assert_safetensors_readable
from click.testing import CliRunner
from dqfast import _core
from dqfast.cli import main as cli
from dqfast.errors import CheckpointError, PlanError
from dqfast.inspect import inspect_checkpoint
from dqfast.mixed import build_mixed_transformer
from dqfast.nvfp4 import build_nvfp4_transformer
from dqfast.plan import PlanBuilder
from malformed.corpus import WEIGHT, base_tensors, bf16_bytes, from_bf16_kwargs, weight, write_base, write_export, write_safetensors

DQFAST = [sys.executable, "-m", "dqfast.cli"]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _staging(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".dqfast-tmp-" in p.name)


# ---- zero-dimension tensors: every op's output re-readable by safetensors ------------------------

ZERO_BUILDS = {
    "fp8-channel": lambda out, base: dqfast.build_fp8_transformer(out, **from_bf16_kwargs(base)),
    "fp8-tensor": lambda out, base: dqfast.build_fp8_transformer(
        out, weight_granularity="tensor", activation_amax=2.0, **from_bf16_kwargs(base)
    ),
    "nvfp4": lambda out, base: build_nvfp4_transformer(out, **from_bf16_kwargs(base)),
    "mixed": lambda out, base: build_mixed_transformer(out, base, model_type="none", target="none"),
}


@pytest.mark.parametrize("kind", sorted(ZERO_BUILDS))
def test_zero_row_weights_give_files_safetensors_and_inspect_read(tmp_path, kind):
    # Before the fix: a per-row scale of a [0, 64] weight was written as one value under a [0]
    # header, and safetensors refused the file.
    base = write_base(tmp_path / "base", base_tensors(weight(rows=0)))
    out = tmp_path / "out"
    r = ZERO_BUILDS[kind](out, base)
    assert r.counts.get("quantized", 0) + r.counts.get("fp8", 0) + r.counts.get("nvfp4", 0) >= 1, r.counts
    assert_safetensors_readable(out)
    rep = inspect_checkpoint(out)
    assert rep.tensors >= 3


# ---- scales that underflow ---------------------------------------------------------------------


def test_the_scale_rule_is_the_engines():
    assert _core.fp8_scale_from_amax(448.0) == 1.0
    for bad in (1e-43, 1e-40, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PlanError, match="subnormal|finite and > 0"):
            _core.fp8_scale_from_amax(bad)
    with pytest.raises(PlanError, match=r"x at index 1: .*subnormal"):
        _core.check_scales([1.0, 1e-40], "x")
    assert _core.scales_from_amax([2688.0], 2688.0) == [1.0]


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_activation_amax_whose_scale_underflows_is_refused(tmp_path, dry_run):
    base = write_base(tmp_path / "base")
    out = tmp_path / "out"
    # 1e-40 is a finite, positive amax (the Python planners accept it); amax/448 is subnormal.
    with pytest.raises(PlanError, match=r"input_scale.*subnormal"):
        dqfast.build_fp8_transformer(out, weight_granularity="tensor", activation_amax=1e-40, dry_run=dry_run, **from_bf16_kwargs(base))
    with pytest.raises(PlanError, match=r"input_scale.*subnormal"):
        build_mixed_transformer(out, base, model_type="none", fp8_activation_amax=1e-40, dry_run=dry_run, target="none")
    with pytest.raises(PlanError, match=r"input_scale.*subnormal"):
        build_nvfp4_transformer(out, activation_amax=1e-36, dry_run=dry_run, **from_bf16_kwargs(base))
    assert not out.exists() and _staging(tmp_path) == []


def test_a_calibrated_amax_whose_scale_underflows_is_refused(tmp_path):
    kw = write_export(tmp_path / "in", input_amax=1e-42)
    with pytest.raises(PlanError, match=r"input amax of 'blocks\.0\.proj'.*subnormal"):
        dqfast.build_fp8_transformer(tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_a_weight_too_small_to_scale_is_refused_naming_it(tmp_path):
    w = np.full((4, 64), 1e-39, np.float32)  # BF16 keeps it (subnormal): amax/448 underflows
    base = write_base(tmp_path / "base", base_tensors(w))
    with pytest.raises(CheckpointError, match=rf"'{WEIGHT}'.*subnormal") as e:
        dqfast.build_fp8_transformer(tmp_path / "out", **from_bf16_kwargs(base))
    assert e.value.tensor == WEIGHT
    assert not (tmp_path / "out").exists()


# ---- NaN e4m3 bytes in an export's FP8 weights ---------------------------------------------------


def _nan_export(root: Path) -> dict:
    kw = write_export(root)
    f = root / "hf" / "transformer" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # WEIGHT is the first tensor
    raw[start + 3], raw[start + 70] = 0x7F, 0xFF
    f.write_bytes(bytes(raw))
    return kw


def test_nan_e4m3_weight_bytes_are_reported_refused_and_repaired(tmp_path):
    kw = _nan_export(tmp_path / "in")
    export = kw["modelopt_hf_dir"] / "transformer"
    before = _tree(tmp_path / "in")
    assert f"{WEIGHT.rsplit('.', 1)[0]}: 2 NaN byte(s) (0x7F/0xFF) in weight" in "\n".join(inspect_checkpoint(export).problems)
    assert _core.count_nan_e4m3(str(export)) == {WEIGHT: 2}
    with pytest.raises(CheckpointError, match=r"2 NaN byte.*--repair-nan") as e:
        dqfast.build_fp8_transformer(tmp_path / "out", **kw)
    assert e.value.tensor == WEIGHT and not (tmp_path / "out").exists()
    assert dqfast.build_fp8_transformer(tmp_path / "api", repair_nan=True, **kw).counts["nan_bytes_repaired"] == 2
    r = CliRunner().invoke(
        cli,
        ["build", "fp8", "--output-dir", str(tmp_path / "cli"), "--model-type", "none", "-q"]
        + ["--modelopt-hf-dir", str(kw["modelopt_hf_dir"]), "--modelopt-backbone-ckpt", str(kw["modelopt_backbone_ckpt"])]
        + ["--base-transformer-dir", str(kw["base_transformer_dir"])],
    )
    assert r.exit_code == 2 and "NaN byte" in r.output
    r = CliRunner().invoke(
        cli,
        ["build", "fp8", "--output-dir", str(tmp_path / "cli"), "--model-type", "none", "-q", "--repair-nan"]
        + ["--modelopt-hf-dir", str(kw["modelopt_hf_dir"]), "--modelopt-backbone-ckpt", str(kw["modelopt_backbone_ckpt"])]
        + ["--base-transformer-dir", str(kw["base_transformer_dir"])],
    )
    assert r.exit_code == 0, r.output
    assert_safetensors_readable(tmp_path / "cli")
    assert _core.count_nan_e4m3(str(tmp_path / "cli")) == {}
    assert inspect_checkpoint(tmp_path / "cli").problems == []
    assert _tree(tmp_path / "in") == before


# ---- indexes that leave tensors out --------------------------------------------------------------


def _sharded_base(d: Path, weight_map: dict) -> Path:
    t = base_tensors()
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"_class_name": "TinyTransformer"}))
    write_safetensors(d / "a.safetensors", {WEIGHT: t[WEIGHT]})
    write_safetensors(d / "b.safetensors", {k: v for k, v in t.items() if k != WEIGHT})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize(
    "weight_map, message",
    [({}, "empty 'weight_map'"), ({WEIGHT: "a.safetensors"}, "shard file 'b.safetensors' is in the directory but no weight_map entry")],
)
def test_an_index_that_leaves_tensors_out_is_refused(tmp_path, weight_map, message):
    base = _sharded_base(tmp_path / "base", weight_map)
    with pytest.raises(CheckpointError, match=message) as e:
        dqfast.build_fp8_transformer(tmp_path / "out", **from_bf16_kwargs(base))
    assert e.value.path.endswith("diffusion_pytorch_model.safetensors.index.json")
    assert not (tmp_path / "out").exists()


# ---- FIFOs: refused at once, never waited on ------------------------------------------------------


@pytest.mark.parametrize("where", ["lone-shard", "listed-shard", "index", "file"])
def test_a_fifo_input_is_refused_at_once(tmp_path, where):
    base = tmp_path / "base"
    if where == "lone-shard":
        base.mkdir()
        (base / "config.json").write_text(json.dumps({"_class_name": "TinyTransformer"}))
        os.mkfifo(base / "diffusion_pytorch_model.safetensors")
    elif where == "listed-shard":
        t = base_tensors()
        _sharded_base(base, {k: ("a.safetensors" if k == WEIGHT else "b.safetensors") for k in t})
        (base / "b.safetensors").unlink()
        os.mkfifo(base / "b.safetensors")
    elif where == "index":
        write_base(base)
        os.mkfifo(base / "diffusion_pytorch_model.safetensors.index.json")
    args = ["build", "fp8", "--from-bf16", "--model-type", "none", "--base-transformer-dir", str(base), "--output-dir", str(tmp_path / "o")]
    if where == "file":
        os.mkfifo(tmp_path / "pipe.safetensors")
        args = ["inspect", str(tmp_path / "pipe.safetensors")]
    t = time.monotonic()
    r = subprocess.run(DQFAST + args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "not a regular file (a FIFO)" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t < 30
    assert not (tmp_path / "o").exists()


# ---- threads ----------------------------------------------------------------------------------


def test_absurd_thread_counts_are_capped_at_the_cores(tmp_path):
    base = write_base(tmp_path / "base")
    t = time.monotonic()
    r = dqfast.build_fp8_transformer(tmp_path / "out", threads=100_000, **from_bf16_kwargs(base))
    assert r.threads == _core.effective_threads(0) == _core.effective_threads(100_000)
    assert time.monotonic() - t < 30


# ---- dry run and batch --check run the engine's validation ----------------------------------------


def test_batch_check_refuses_what_the_engine_refuses(tmp_path):
    base = write_base(tmp_path / "base")
    m = tmp_path / "jobs.toml"
    m.write_text(
        textwrap.dedent(f"""
        [[jobs]]
        name = "tiny-amax"
        builder = "fp8"
        output = "out/x"
        inputs = {{ base_transformer_dir = "{base}" }}
        options = {{ model_type = "none", from_bf16 = true, weight_granularity = "tensor", activation_amax = 1e-40 }}
        """)
    )
    from dqfast.cli.batch import batch as batch_cmd

    r = CliRunner().invoke(batch_cmd, [str(m), "--check"])
    assert r.exit_code == 2, r.output
    assert "job 'tiny-amax': PlanError" in r.output and "subnormal" in r.output
    assert not (tmp_path / "out").exists()


def test_dry_run_over_an_existing_output_validates_and_warns(tmp_path):
    base = write_base(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    r = dqfast.build_fp8_transformer(out, dry_run=True, **from_bf16_kwargs(base))
    assert r.dry_run and any("--overwrite" in w for w in r.warnings)
    assert list(out.iterdir()) == []


# ---- cancellation -------------------------------------------------------------------------------

# Runs the real CLI with every plan slowed down by the engine's test-only knob (sleep per tensor).
_SLOW_CLI = """
import sys
from dqfast import plan
_to_json = plan.PlanBuilder.to_json
def slow(self):
    import json
    p = json.loads(_to_json(self))
    p["_test_delay_ms"] = 60
    return json.dumps(p)
plan.PlanBuilder.to_json = slow
from dqfast.cli import main
sys.argv = ["dqfast"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_build_within_a_second_and_keeps_the_old_output(tmp_path, sig):
    # 60 tensors x 60 ms: ~4 s uninterrupted.
    tensors = {f"blocks.{i}.proj.weight": ("BF16", [8, 64], b"\x3c" * 1024) for i in range(60)}
    base = write_base(tmp_path / "base", tensors)
    out = tmp_path / "out"
    out.mkdir()
    (out / "diffusion_pytorch_model.safetensors").write_bytes(b"the previous output")
    before = _tree(out)
    args = ["build", "fp8", "--from-bf16", "--model-type", "none", "--base-transformer-dir", str(base), "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args, "--overwrite"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _staging(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert _staging(tmp_path), "the engine never started writing"
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    took = time.monotonic() - sent
    err = proc.stderr.read()
    assert rc == 130, err
    assert took < 2.0, took
    assert "interrupted" in err and "Traceback" not in err
    assert _staging(tmp_path) == []
    assert _tree(out) == before


# ---- progress -----------------------------------------------------------------------------------


def test_progress_callback_is_monotone_and_ends_at_the_total(tmp_path, monkeypatch):
    tensors = {f"blocks.{i}.proj.weight": ("BF16", [32, 64], bf16_bytes(weight(seed=i))) for i in range(8)}
    base = write_base(tmp_path / "base", tensors)
    calls: list[tuple] = []
    for builder in (dqfast.build_fp8_transformer, build_nvfp4_transformer):
        calls.clear()
        out = tmp_path / builder.__name__
        r = builder(out, max_shard_size=20_000, progress=lambda *a: calls.append(a), **from_bf16_kwargs(base))
        assert calls, "progress never called"
        done = [c[0] for c in calls]
        assert done == sorted(done)
        total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        assert {c[1] for c in calls} == {total}
        last = calls[-1]
        assert last[0] == last[1] == total and last[2] == last[3] == len(r.tensors) and last[4]

    # An exception from the callback cancels the build: nothing is written. (Slowed down with the
    # engine's test knob so that the build is still running at the first call.)
    def boom(*a):
        raise RuntimeError("stop")

    to_json = PlanBuilder.to_json
    monkeypatch.setattr(PlanBuilder, "to_json", lambda self: json.dumps({**json.loads(to_json(self)), "_test_delay_ms": 50}))
    with pytest.raises(RuntimeError, match="stop"):
        dqfast.build_fp8_transformer(tmp_path / "boom", progress=boom, **from_bf16_kwargs(base))
    assert not (tmp_path / "boom").exists() and _staging(tmp_path) == []


def test_cli_quiet_prints_nothing_and_plain_progress_lines_otherwise(tmp_path):
    base = write_base(tmp_path / "base")
    args = ["build", "fp8", "--from-bf16", "--model-type", "none", "--base-transformer-dir", str(base)]
    r = subprocess.run(DQFAST + args + ["--output-dir", str(tmp_path / "q"), "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert_safetensors_readable(tmp_path / "q")
    r = subprocess.run(DQFAST + args + ["--output-dir", str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("dqfast: ")]
    assert lines and "(100%)" in lines[-1] and "tensors" in lines[-1], r.stderr
    # The default target (any) makes --from-bf16 per-tensor, and says so on stderr (not with -q above).
    assert "dqfast FP8 build" in r.stdout and "target any: weight scales per-tensor" in r.stderr
    r = subprocess.run(DQFAST + args + ["--output-dir", str(tmp_path / "v"), "-v"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "plan: what happens to each module" in r.stdout
