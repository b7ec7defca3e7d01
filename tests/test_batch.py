"""``dqfast batch``: manifest validation, parallel local runs, idempotent re-runs, resumption
after kills, the JSON summary, the CLI, and the Ray executor on a local Ray instance."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import dqfast
import numpy as np
import pytest
from ckpt_helpers import assert_safetensors_readable
from click.testing import CliRunner
from dqfast import batch as B
from dqfast.cli.batch import batch as batch_cmd
from malformed.corpus import base_tensors, weight, write_base, write_export, write_safetensors

# ---- fixtures -------------------------------------------------------------------------------


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _dir_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".dqfast-tmp-" in p.name)


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Two BF16 bases and one calibrated export, small."""
    a = write_base(tmp_path / "in" / "a")
    b = write_base(tmp_path / "in" / "b", base_tensors(weight(seed=7, rows=48)))
    calib = write_export(tmp_path / "in" / "calib")
    return {
        "a": a,
        "b": b,
        "calib_hf": calib["modelopt_hf_dir"],
        "calib_amax": calib["modelopt_backbone_ckpt"],
        "calib_base": calib["base_transformer_dir"],
    }


def _manifest(tmp_path: Path, inputs: dict[str, Path], extra_jobs: str = "") -> Path:
    m = tmp_path / "jobs.toml"
    m.write_text(f"""
[batch]
cores = 2

[defaults]
builder = "fp8"
threads = 1
options = {{ model_type = "none", fsync = false }}

[[jobs]]
name = "a-channel"
output = "out/a-channel"
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
options = {{ from_bf16 = true }}

[[jobs]]
name = "b-tensor"
output = "out/b-tensor"
inputs = {{ base_transformer_dir = "{inputs["b"]}" }}
options = {{ from_bf16 = true, weight_granularity = "tensor", activation_amax = 3.5 }}

[[jobs]]
name = "calibrated"
output = "out/calibrated"
[jobs.inputs]
modelopt_hf_dir = "{inputs["calib_hf"]}"
modelopt_backbone_ckpt = "{inputs["calib_amax"]}"
base_transformer_dir = "{inputs["calib_base"]}"
{extra_jobs}
""")
    return m


def _by_name(summary: B.BatchSummary) -> dict[str, B.JobResult]:
    return {j.name: j for j in summary.jobs}


# ---- validation -------------------------------------------------------------------------------


def test_manifest_errors_are_all_reported_before_anything_runs(tmp_path: Path, inputs: dict[str, Path]) -> None:
    m = tmp_path / "bad.toml"
    m.write_text(f"""
colour = "blue"
[defaults]
builder = "fp8"
options = {{ model_type = "none" }}
[[jobs]]
name = "one"
output = "out/x"
inputs = {{ base_transformer_dir = "{inputs["a"]}", vae_dir = "/nope" }}
options = {{ from_bf16 = true, overwrite = true, bogus = 1 }}
surprise = 1
[[jobs]]
name = "two"
output = "out/x"
inputs = {{ base_transformer_dir = "does/not/exist" }}
threads = 0
[[jobs]]
name = "three"
builder = "int3"
output = "out/x/inner"
[[jobs]]
name = "four"
output = "{inputs["a"]}/sub"
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
options = {{ modelopt_hf_dir = "{inputs["a"]}" }}
""")
    with pytest.raises(B.ManifestError) as e:
        B.load_manifest(m)
    text = "\n".join(e.value.problems)
    for needle in [
        "unknown top-level key 'colour'",
        "job 'one': unknown key 'surprise'",
        "job 'one': unknown input 'vae_dir'",
        "job 'one': option 'overwrite' is set by the batch runner",
        "job 'one': unknown option 'bogus'",
        "job 'two': input 'base_transformer_dir' = " + str(tmp_path / "does/not/exist") + " does not exist",
        "job 'two': threads must be an integer >= 1",
        "job 'three': unknown builder 'int3'",
        "jobs 'one' and 'two' both write",
        "are nested",
        "job 'four': input 'base_transformer_dir'",
        "job 'four': 'modelopt_hf_dir' is an input",
    ]:
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert not (tmp_path / "out").exists()
    # The CLI reports the same and exits 2 without running anything.
    r = CliRunner().invoke(batch_cmd, [str(m)])
    assert r.exit_code == 2 and "unknown top-level key 'colour'" in r.output


def test_yaml_manifest_and_defaults_merge(tmp_path: Path, inputs: dict[str, Path]) -> None:
    pytest.importorskip("yaml")
    m = tmp_path / "jobs.yaml"
    m.write_text(f"""
defaults:
  builder: fp8
  options: {{model_type: none, from_bf16: true}}
  inputs: {{base_transformer_dir: {inputs["a"]}}}
jobs:
  - output: out/one
  - output: out/two
    options: {{weight_granularity: tensor, activation_amax: 2.0}}
""")
    jobs = B.load_manifest(m).jobs
    assert [j.name for j in jobs] == ["one", "two"]
    assert jobs[0].options == {"model_type": "none", "from_bf16": True}
    assert jobs[1].options == {"model_type": "none", "from_bf16": True, "weight_granularity": "tensor", "activation_amax": 2.0}
    assert jobs[1].inputs == {"base_transformer_dir": str(inputs["a"])}
    assert jobs[1].output == str(tmp_path / "out" / "two")


def test_default_names_are_unique_path_suffixes(tmp_path: Path, inputs: dict[str, Path]) -> None:
    # Two pipelines' `transformer` outputs used to be rejected as two jobs named 'transformer'.
    m = tmp_path / "jobs.toml"
    m.write_text(f"""
[defaults]
builder = "fp8"
options = {{ model_type = "none", from_bf16 = true }}
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
[[jobs]]
output = "out/wan/transformer"
[[jobs]]
output = "out/flux/transformer"
[[jobs]]
output = "out/flux/transformer_2"
[[jobs]]
name = "vae"
output = "out/x/vae"
[[jobs]]
output = "out/y/vae"
""")
    jobs = B.load_manifest(m).jobs
    assert [j.name for j in jobs] == ["wan/transformer", "flux/transformer", "transformer_2", "vae", "y/vae"]
    # Each job still gets its own log file.
    assert len({B._safe(j.name) for j in jobs}) == len(jobs)


def test_check_plans_every_job_without_writing(tmp_path: Path, inputs: dict[str, Path]) -> None:
    m = _manifest(
        tmp_path,
        inputs,
        extra_jobs=f"""
[[jobs]]
name = "no-input-scale"
output = "out/nis"
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
options = {{ from_bf16 = true, weight_granularity = "tensor" }}
""",
    )
    r = CliRunner().invoke(batch_cmd, [str(m), "--check"])
    assert r.exit_code == 2, r.output
    assert "job 'no-input-scale': PlanError" in r.output and "4 job(s), 1 with errors" in r.output
    assert not (tmp_path / "out").exists()


def test_batch_progress_plain_lines_bytes_and_eta() -> None:
    import io

    from dqfast.progress import BatchProgress

    out = io.StringIO()
    bp = BatchProgress(3, rich=False, stream=out, every=0.0)
    bp.event("start", "a", None)
    bp.event("progress", "a", (0, 0))
    assert "0/3 jobs" in out.getvalue() and "ETA ?" in out.getvalue()
    bp.event("progress", "a", (500_000_000, 1_000_000_000))
    # One size known (1 GB): the two jobs not measured yet count at that mean.
    assert bp.totals() == (500_000_000, 3_000_000_000)
    last = out.getvalue().splitlines()[-1]
    assert "0.50 GB / 3.00 GB (17%)" in last and "GB/s" in last and "ETA ?" not in last
    bp.event("end", "a", B.JobResult(name="a", status="done", output="o", bytes=1_000_000_000))
    assert "1/3 jobs" in out.getvalue().splitlines()[-1]
    bp.print("[green]   done[/green] a")
    assert out.getvalue().splitlines()[-1] == "   done a"
    bp.close()


def test_cli_quiet_and_verbose(tmp_path: Path, inputs: dict[str, Path]) -> None:
    m = tmp_path / "q.toml"
    m.write_text(f"""
[defaults]
builder = "fp8"
options = {{ model_type = "none", from_bf16 = true, fsync = false }}
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
[[jobs]]
output = "out/p1/transformer"
[[jobs]]
output = "out/p2/transformer"
""")
    r = CliRunner().invoke(batch_cmd, [str(m), "-q"])
    assert r.exit_code == 0 and r.output == "", r.output
    assert (tmp_path / "out/p1/transformer/config.json").is_file() and (tmp_path / "out/p2/transformer/config.json").is_file()
    r = CliRunner().invoke(batch_cmd, [str(m), "--verbose"])
    assert r.exit_code == 0, r.output
    assert "skipped p1/transformer" in r.output and "log " + str(tmp_path) in r.output and "2 job(s)" in r.output


def test_cli_registers_in_a_group() -> None:
    @click.group()
    def main() -> None:
        pass

    main.add_command(batch_cmd)
    r = CliRunner().invoke(main, ["batch", "--help"])
    assert r.exit_code == 0 and "MANIFEST" in r.output


# ---- local runs -----------------------------------------------------------------------------


def test_local_batch_builds_skips_and_resumes(tmp_path: Path, inputs: dict[str, Path]) -> None:
    bad = write_base(tmp_path / "in" / "bad")
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b'\x05\0\0\0\0\0\0\0{"a":')
    m = _manifest(
        tmp_path,
        inputs,
        extra_jobs=f"""
[[jobs]]
name = "broken"
output = "out/broken"
inputs = {{ base_transformer_dir = "{bad}" }}
options = {{ from_bf16 = true }}
""",
    )
    man = B.load_manifest(m)
    events: list[tuple[str, str]] = []
    progress: dict[str, list[tuple[int, int]]] = {}

    def on_event(k: str, j: Any, data: Any) -> None:
        if k == "progress":
            progress.setdefault(j.name, []).append(data)
        else:
            events.append((k, j.name))

    s1 = B.run_batch(man, on_event=on_event)
    r1 = _by_name(s1)
    assert {n: r.status for n, r in r1.items()} == {"a-channel": "done", "b-tensor": "done", "calibrated": "done", "broken": "failed"}
    assert r1["broken"].error_type == "CheckpointError" and "not valid JSON" in r1["broken"].error
    assert not (tmp_path / "out" / "broken").exists()
    assert not B.record_path(tmp_path / "out" / "broken").exists()  # a failure leaves no record
    assert sorted(events) == sorted([(k, n) for n in r1 for k in ("start", "end")])
    # Byte progress comes back from the worker processes while they write (not a 0/? spinner):
    # the last report of a built job is complete, and bytes only grow.
    for n in ("a-channel", "b-tensor", "calibrated"):
        done, total = progress[n][-1]
        assert total > 0 and done == total, (n, progress[n])
        assert [d for d, _ in progress[n]] == sorted(d for d, _ in progress[n])
    assert "broken" not in progress

    # Outputs are what the API builds directly, byte for byte.
    direct = tmp_path / "direct"
    dqfast.build_fp8_transformer(
        direct, base_transformer_dir=inputs["b"], from_bf16=True, model_type="none", weight_granularity="tensor", activation_amax=3.5
    )
    assert _dir_files(direct) == _dir_files(tmp_path / "out" / "b-tensor")

    # Summary file: per job status, seconds, bytes, peak RSS, checksum (recomputed here).
    summary = json.loads((tmp_path / "jobs.summary.json").read_text())
    assert summary["counts"] == {"done": 3, "failed": 1} and summary["ok"] is False
    for j in summary["jobs"]:
        assert set(j) >= {"name", "status", "seconds", "bytes", "peak_rss_bytes", "output_checksum"}
        if j["status"] != "done":
            continue
        out = Path(j["output"])
        assert_safetensors_readable(out)
        lines = "".join(f"{rel}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n" for rel, data in sorted(_dir_files(out).items()))
        assert j["output_checksum"] == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
        assert j["bytes"] > 0 and j["peak_rss_bytes"] > 10 << 20 and j["seconds"] > 0
        rec = json.loads(B.record_path(out).read_text())
        assert rec["state"] == "done" and rec["output"]["checksum"] == j["output_checksum"]
        assert Path(j["log"]).read_text().count("done:") == 1

    # Re-run: nothing rebuilt, records untouched.
    mtimes = {n: B.record_path(r.output).stat().st_mtime_ns for n, r in r1.items() if r.status == "done"}
    s2 = _by_name(B.run_batch(man))
    assert {n: r.status for n, r in s2.items()} == {
        "a-channel": "skipped",
        "b-tensor": "skipped",
        "calibrated": "skipped",
        "broken": "failed",
    }
    assert {n: s2[n].output_checksum for n in mtimes} == {n: r1[n].output_checksum for n in mtimes}
    assert mtimes == {n: B.record_path(r1[n].output).stat().st_mtime_ns for n in mtimes}

    # An input changes (same size: caught by mtime + header hash): only its job is rebuilt.
    f = inputs["a"] / "diffusion_pytorch_model.safetensors"
    w = weight(seed=3)
    write_safetensors(f, base_tensors(w))
    # A tampered output (file deleted) is rebuilt too.
    (tmp_path / "out" / "calibrated" / "config.json").unlink()
    s3 = _by_name(B.run_batch(man))
    assert s3["a-channel"].status == "done" and s3["a-channel"].output_checksum != r1["a-channel"].output_checksum
    assert s3["calibrated"].status == "done" and s3["calibrated"].output_checksum == r1["calibrated"].output_checksum
    assert s3["b-tensor"].status == "skipped"
    assert _leftovers(tmp_path / "out") == []


def test_changed_options_rebuild_and_content_identity(tmp_path: Path, inputs: dict[str, Path]) -> None:
    m = tmp_path / "one.toml"

    def write(granularity: str, identity: str) -> B.Manifest:
        m.write_text(f"""
[[jobs]]
builder = "fp8"
output = "out/a"
identity = "{identity}"
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
options = {{ from_bf16 = true, model_type = "none", weight_granularity = "{granularity}", activation_amax = 1.0, target = "vllm-omni" }}
""")
        return B.load_manifest(m)

    assert B.run_batch(write("channel", "stat")).jobs[0].status == "done"
    assert B.run_batch(write("channel", "stat")).jobs[0].status == "skipped"
    assert B.run_batch(write("tensor", "stat")).jobs[0].status == "done"
    assert B.run_batch(write("tensor", "content")).jobs[0].status == "done"  # new identity mode: new fingerprint
    # content identity ignores a touched mtime; stat identity does not.
    f = inputs["a"] / "diffusion_pytorch_model.safetensors"
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert B.run_batch(write("tensor", "content")).jobs[0].status == "skipped"
    rec = json.loads(B.record_path(tmp_path / "out" / "a").read_text())
    ident = rec["identity"]["inputs"]["base_transformer_dir"]["files"]["diffusion_pytorch_model.safetensors"]
    assert ident["sha256"] == _sha256(f)


def test_interrupted_jobs_are_redone_or_adopted(tmp_path: Path, inputs: dict[str, Path]) -> None:
    m = _manifest(tmp_path, inputs)
    man = B.load_manifest(m)
    out = tmp_path / "out"
    out.mkdir()
    jobs = {j.name: j for j in man.jobs}
    fp_a, _, _ = B.fingerprint(jobs["a-channel"])
    fp_b, _, _ = B.fingerprint(jobs["b-tensor"])
    # a-channel: killed mid-write — a "running" record and a staging dir of a dead process.
    B._write_json_atomic(B.record_path(out / "a-channel"), {"format": B.RECORD_FORMAT, "state": "running", "fingerprint": fp_a})
    stale = out / ".a-channel.dqfast-tmp-999999999-1"
    stale.mkdir()
    (stale / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    # b-tensor: killed after the atomic rename, before the final record: adopted as is.
    dqfast.build_fp8_transformer(
        out / "b-tensor",
        base_transformer_dir=inputs["b"],
        from_bf16=True,
        model_type="none",
        weight_granularity="tensor",
        activation_amax=3.5,
    )
    B._write_json_atomic(B.record_path(out / "b-tensor"), {"format": B.RECORD_FORMAT, "state": "running", "fingerprint": fp_b})
    # calibrated: an output nobody recorded is not ours to replace...
    (out / "calibrated").mkdir()
    (out / "calibrated" / "precious.txt").write_text("user data")
    s = _by_name(B.run_batch(man))
    assert s["a-channel"].status == "done" and not stale.exists()
    assert s["b-tensor"].status == "adopted"
    assert json.loads(B.record_path(out / "b-tensor").read_text())["state"] == "done"
    assert s["calibrated"].status == "failed" and s["calibrated"].error_type == "OutputExistsError"
    assert (out / "calibrated" / "precious.txt").exists()
    # ...unless asked.
    s = _by_name(B.run_batch(man, overwrite=True))
    assert s["calibrated"].status == "done" and not (out / "calibrated" / "precious.txt").exists()
    assert [s[n].status for n in ("a-channel", "b-tensor")] == ["skipped", "skipped"]
    assert _leftovers(out) == []


def test_memory_limit_serializes_jobs(tmp_path: Path, inputs: dict[str, Path]) -> None:
    man = B.load_manifest(_manifest(tmp_path, inputs))
    assert all(B.estimate_memory(j) >= B.BASE_RSS for j in man.jobs)
    big = man.jobs[0].inputs["base_transformer_dir"]
    assert B.estimate_memory(man.jobs[0]) == B.BASE_RSS + B.ENGINE_BUFFERS + B.READ_BUFFERS + 3 * 32 * 64 * 2, big
    s = B.run_batch(man, memory_limit=1, cores=2, max_parallel=3)  # every job alone
    spans = sorted((j.started, j.finished) for j in s.jobs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_sigkill_of_the_whole_batch_then_resume(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0x3A00, 0x3D00, size=(4096, 4096), dtype=np.uint16)
    big = write_base(tmp_path / "big", {f"blocks.{i}.proj.weight": ("BF16", [4096, 4096], bits.tobytes()) for i in range(4)})
    m = tmp_path / "big.toml"
    m.write_text(f"""
[[jobs]]
builder = "fp8"
output = "out/big"
inputs = {{ base_transformer_dir = "{big}" }}
options = {{ from_bf16 = true, model_type = "none", target = "none" }}
""")
    cmd = [sys.executable, "-c", "from dqfast.cli.batch import batch; batch()", str(m), "--json"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    killed = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            staged = list(out.glob(".big.dqfast-tmp-*/*.safetensors")) if out.exists() else []
            if any(f.stat().st_size > 0 for f in staged):
                os.killpg(proc.pid, signal.SIGKILL)  # the batch and its job process
                killed = True
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed, "the job finished before it could be killed"
    time.sleep(0.2)  # let the killed worker be reaped (its /proc entry gone)
    assert not (out / "big").exists()
    assert json.loads(B.record_path(out / "big").read_text())["state"] == "running"
    r = CliRunner().invoke(batch_cmd, [str(m), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{") :])
    assert summary["jobs"][0]["status"] == "done"
    assert _leftovers(out) == []
    assert len(dqfast.open_checkpoint(out / "big").tensors) == 8


def test_nvfp4_jobs_share_the_manifest(tmp_path: Path, inputs: dict[str, Path]) -> None:
    m = tmp_path / "mixed.toml"
    m.write_text(f"""
[defaults]
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
options = {{ from_bf16 = true, model_type = "none" }}
[[jobs]]
builder = "fp8"
output = "out/fp8"
[[jobs]]
builder = "nvfp4"
output = "out/nvfp4"
""")
    s = _by_name(B.run_batch(B.load_manifest(m)))
    assert {n: r.status for n, r in s.items()} == {"fp8": "done", "nvfp4": "done"}, s
    direct = tmp_path / "direct"
    from dqfast.nvfp4 import build_nvfp4_transformer

    build_nvfp4_transformer(direct, base_transformer_dir=inputs["a"], from_bf16=True, model_type="none")
    assert _dir_files(direct) == _dir_files(tmp_path / "out" / "nvfp4")


def test_mixed_builder_in_a_manifest(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """``mixed`` comes from the one builder registry (dqfast.builders): a manifest can name it,
    its options are checked against its signature, and the output is what the API writes."""
    m = tmp_path / "mixed.toml"
    m.write_text(f"""
[[jobs]]
builder = "mixed"
output = "out/mixed"
inputs = {{ base_transformer_dir = "{inputs["a"]}" }}
options = {{ model_type = "none", policy = {{ nvfp4 = ["."] }}, target = "none" }}
""")
    s = B.run_batch(B.load_manifest(m))
    assert s.jobs[0].status == "done", s.jobs[0].error
    direct = tmp_path / "direct"
    from dqfast.mixed import build_mixed_transformer

    build_mixed_transformer(direct, inputs["a"], {"nvfp4": ["."]}, model_type="none", target="none")
    assert _dir_files(direct) == _dir_files(tmp_path / "out" / "mixed")
    m.write_text(m.read_text().replace("policy", "polcy"))
    with pytest.raises(B.ManifestError, match="unknown option 'polcy' for builder 'mixed'"):
        B.load_manifest(m)


# ---- builder registry ----------------------------------------------------------------------


def concat_builder(output_dir: Any, *, src: str, repeat: int = 1, threads: int = 0, overwrite: bool = False) -> Any:
    """A toy builder (module-level so that worker processes can import it)."""
    out = Path(output_dir)
    out.mkdir(parents=True)
    (out / "data.bin").write_bytes(Path(src).read_bytes() * repeat)
    return None


def test_custom_builder_plugs_in(tmp_path: Path) -> None:
    B.register_builder("concat", f"{__name__}:concat_builder", ["src"])
    try:
        (tmp_path / "x.bin").write_bytes(b"abc")
        m = tmp_path / "c.toml"
        m.write_text('[[jobs]]\nbuilder = "concat"\noutput = "o"\ninputs = { src = "x.bin" }\noptions = { repeat = 3 }\n')
        s = B.run_batch(B.load_manifest(m))
        assert s.jobs[0].status == "done", s.jobs[0].error
        assert (tmp_path / "o" / "data.bin").read_bytes() == b"abcabcabc"
        m.write_text('[[jobs]]\nbuilder = "concat"\noutput = "o"\ninputs = { src = "x.bin" }\noptions = { times = 3 }\n')
        with pytest.raises(B.ManifestError, match="unknown option 'times'"):
            B.load_manifest(m)
    finally:
        B.BUILDERS.pop("concat", None)


# ---- Ray -----------------------------------------------------------------------------------


def test_ray_executor_on_a_local_cluster(tmp_path: Path, inputs: dict[str, Path]) -> None:
    ray = pytest.importorskip("ray")
    man = B.load_manifest(_manifest(tmp_path, inputs))
    env = dict(os.environ)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        s1 = _by_name(B.run_batch(man, executor="ray"))
        assert {n: r.status for n, r in s1.items()} == {"a-channel": "done", "b-tensor": "done", "calibrated": "done"}
        s2 = _by_name(B.run_batch(man, executor="ray"))
        assert {r.status for r in s2.values()} == {"skipped"}
        assert {n: r.output_checksum for n, r in s2.items()} == {n: r.output_checksum for n, r in s1.items()}
    finally:
        ray.shutdown()
        os.environ.clear()  # ray.init exports RAY_* variables; later tests' children must not see them
        os.environ.update(env)
    # The same outputs as the local executor would have made: a local re-run skips them all.
    assert {j.status for j in B.run_batch(man).jobs} == {"skipped"}


def test_ray_missing_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_ray(name: str, *a: Any, **k: Any) -> Any:
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(dqfast.DqfastError, match="pip install"):
        B._import_ray()
