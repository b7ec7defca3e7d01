"""Data loss (issue 11 §1): no spelling of an output may let a build delete or replace an input.

Every case runs the real CLI with ``--overwrite`` and an output that is, contains or lies inside
an input — spelled relatively, absolutely, through ``..``, a trailing slash, a symlink, a hard
link — and asserts exit status 2, one typed error line naming the option and the path, and input
trees byte-for-byte unchanged (hashed before and after).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from dqfast.cli import main
from malformed.corpus import write_base, write_export

from hostile.util import tree_digest, trees_digest

SHARD = "diffusion_pytorch_model.safetensors"


def _cli(*args: str | os.PathLike[str]):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _fp8(base: str | Path, out: str | Path, *more: str) -> list[str | Path]:
    return [
        "build",
        "fp8",
        "--from-bf16",
        "--model-type",
        "none",
        "--base-transformer-dir",
        base,
        "--output-dir",
        out,
        "--overwrite",
        *more,
    ]


def _one_error_line(r, *needles: str) -> str:
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@dataclass
class Setup:
    """A CLI call and the trees it must leave alone."""

    args: list[str | os.PathLike[str]]
    protect: list[Path]
    needles: tuple[str, ...]


# Each case lays out its inputs under `tmp` (the current directory during the call) and
# returns the call; `needles` must appear in the error line (the option and the output spelling).
CASES: dict[str, Callable[[Path], Setup]] = {}


def case(fn: Callable[[Path], Setup]) -> Callable[[Path], Setup]:
    CASES[fn.__name__] = fn
    return fn


@case
def output_contains_the_base(tmp: Path) -> Setup:
    # The example: `--base-transformer-dir x/base --output-dir x --overwrite`.
    write_base(tmp / "x" / "base")
    return Setup(_fp8("x/base", "x"), [tmp / "x"], ("--output-dir x ", "contains input x/base"))


@case
def output_is_the_base_absolute_vs_relative(tmp: Path) -> Setup:
    write_base(tmp / "base")
    return Setup(_fp8("base", f"{tmp}/base"), [tmp / "base"], (f"--output-dir {tmp}/base", "is input base"))


@case
def output_is_the_base_relative_vs_absolute(tmp: Path) -> Setup:
    write_base(tmp / "base")
    return Setup(_fp8(tmp / "base", "base"), [tmp / "base"], ("--output-dir base ", "is input"))


@case
def output_is_the_base_through_dotdot(tmp: Path) -> Setup:
    write_base(tmp / "base")
    (tmp / "sub").mkdir()
    return Setup(_fp8("base", "sub/../base"), [tmp / "base"], ("--output-dir sub/../base", "is input base"))


@case
def output_is_the_base_through_a_missing_dir_and_dotdot(tmp: Path) -> Setup:
    # `new` does not exist: the kernel cannot resolve `new/..` yet, but after `mkdir -p` it would.
    write_base(tmp / "base")
    return Setup(_fp8("base", "new/../base"), [tmp / "base"], ("--output-dir new/../base", "is input base"))


@case
def output_is_the_base_with_trailing_slash(tmp: Path) -> Setup:
    write_base(tmp / "base")
    return Setup(_fp8("base", "base/"), [tmp / "base"], ("--output-dir base", "is input base"))


@case
def output_is_a_symlink_to_the_base(tmp: Path) -> Setup:
    write_base(tmp / "base")
    (tmp / "link").symlink_to(tmp / "base")
    return Setup(_fp8("base", "link"), [tmp / "base", tmp / "link"], ("--output-dir link", "is input base"))


@case
def output_is_the_base_through_a_symlinked_parent(tmp: Path) -> Setup:
    write_base(tmp / "base")
    (tmp / "up").symlink_to(tmp)
    return Setup(_fp8("base", "up/up/base"), [tmp / "base"], ("--output-dir up/up/base", "is input base"))


@case
def output_inside_the_base(tmp: Path) -> Setup:
    write_base(tmp / "base")
    return Setup(_fp8("base", "base/fp8"), [tmp / "base"], ("--output-dir base/fp8", "lies inside input base"))


@case
def output_holds_a_hard_link_to_a_base_shard(tmp: Path) -> Setup:
    write_base(tmp / "base")
    (tmp / "out").mkdir()
    os.link(tmp / "base" / SHARD, tmp / "out" / SHARD)
    return Setup(_fp8("base", "out"), [tmp / "base", tmp / "out"], ("--output-dir out", "holds a hard link to"))


@case
def base_shard_is_a_symlink_into_the_output(tmp: Path) -> Setup:
    # The base's only shard lives in the (old) output: replacing the output would destroy it.
    write_base(tmp / "base")
    (tmp / "out").mkdir()
    shutil.move(tmp / "base" / SHARD, tmp / "out" / SHARD)
    (tmp / "base" / SHARD).symlink_to(tmp / "out" / SHARD)
    return Setup(_fp8("base", "out"), [tmp / "base", tmp / "out"], ("--output-dir out", "contains input", SHARD))


def _calibrated(root: Path, out: str) -> list[str | os.PathLike[str]]:
    kw = write_export(root)
    return [
        "build",
        "fp8",
        "--modelopt-hf-dir",
        kw["modelopt_hf_dir"],
        "--modelopt-backbone-ckpt",
        kw["modelopt_backbone_ckpt"],
        "--base-transformer-dir",
        kw["base_transformer_dir"],
        "--model-type",
        "none",
        "--output-dir",
        out,
        "--overwrite",
    ]


@case
def output_is_the_dir_holding_the_amax_sidecar(tmp: Path) -> Setup:
    return Setup(_calibrated(tmp / "e", "e/ckpt"), [tmp / "e"], ("--output-dir e/ckpt", "contains input", "amax.safetensors"))


@case
def output_is_the_modelopt_export(tmp: Path) -> Setup:
    return Setup(_calibrated(tmp / "e", "e/hf"), [tmp / "e"], ("--output-dir e/hf ", "contains input", "e/hf/transformer"))


@case
def output_is_the_export_component_dir(tmp: Path) -> Setup:
    return Setup(_calibrated(tmp / "e", "e/hf/transformer/"), [tmp / "e"], ("--output-dir e/hf/transformer", "is input"))


@case
def nvfp4_output_contains_the_base(tmp: Path) -> Setup:
    write_base(tmp / "x" / "base")
    args: list[str | os.PathLike[str]] = ["build", "nvfp4", "--from-bf16", "--model-type", "none"]
    args += ["--base-transformer-dir", "x/base", "--output-dir", "x", "--overwrite"]
    return Setup(args, [tmp / "x"], ("--output-dir x ", "contains input x/base"))


@case
def mixed_policy_file_inside_the_output(tmp: Path) -> Setup:
    write_base(tmp / "base")
    (tmp / "o").mkdir()
    (tmp / "o" / "policy.json").write_text('{"fp8": ["proj"]}')
    args: list[str | os.PathLike[str]] = ["build", "mixed", "--base-transformer-dir", "base", "--model-type", "none"]
    args += ["--policy", "o/policy.json", "--output-dir", "o", "--overwrite"]
    return Setup(args, [tmp / "base", tmp / "o"], ("--output-dir o ", "contains input o/policy.json"))


def _components(root: str, out: str) -> list[str | os.PathLike[str]]:
    return ["build", "components", "fp8", "--root", root, "--output-dir", out, "--from-bf16", "--model-type", "none", "--overwrite"]


@case
def components_output_is_the_pipeline_root(tmp: Path) -> Setup:
    write_base(tmp / "pipe" / "transformer")
    write_base(tmp / "pipe" / "transformer_2")
    return Setup(_components("pipe", "./pipe"), [tmp / "pipe"], ("--output-dir pipe/transformer ", "lies inside input pipe "))


@case
def components_output_root_is_a_component(tmp: Path) -> Setup:
    # <out>/transformer would land inside the input pipe/transformer_2 — and the first
    # component must not be built before the second is refused.
    write_base(tmp / "pipe" / "transformer")
    write_base(tmp / "pipe" / "transformer_2")
    return Setup(_components("pipe", "pipe/transformer_2"), [tmp / "pipe"], ("--output-dir pipe/transformer_2/transformer", "lies inside"))


@case
def demo_workdir_with_user_files(tmp: Path) -> Setup:
    (tmp / "home").mkdir()
    (tmp / "home" / "thesis.tex").write_text("years of work")
    return Setup(["demo", "--workdir", "home"], [tmp / "home"], ("--workdir home", "refusing to delete it"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_overlapping_output_is_refused_and_inputs_are_untouched(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = CASES[name](tmp_path)
    before = trees_digest(*s.protect)
    listing = sorted(os.listdir(tmp_path))
    r = _cli(*s.args)
    _one_error_line(r, *s.needles)
    assert trees_digest(*s.protect) == before
    # Nothing created beside the inputs either (no staging directory, no output).
    assert sorted(os.listdir(tmp_path)) == listing


def test_ptq_out_must_not_overlap_the_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path / "m" / "transformer")
    before = tree_digest(tmp_path / "m")
    for out in ("m", "m/transformer/..", "m/transformer/ptq"):
        r = _cli("ptq", "--model-dir", "m/transformer", "--out", out, "--overwrite")
        _one_error_line(r, f"--out {out}", "input m/transformer")
        assert tree_digest(tmp_path / "m") == before


def test_batch_job_output_is_the_manifest_dir(tmp_path: Path) -> None:
    from dqfast.cli.batch import batch as batch_cmd

    base = write_base(tmp_path / "in" / "base")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    m = jobs / "jobs.toml"
    m.write_text(f"""
[[jobs]]
name = "here"
builder = "fp8"
output = "."
inputs = {{ base_transformer_dir = "{base}" }}
options = {{ from_bf16 = true, model_type = "none" }}

[[jobs]]
name = "over-input"
builder = "fp8"
output = "{base}/../base/"
inputs = {{ base_transformer_dir = "{base}" }}
options = {{ from_bf16 = true, model_type = "none" }}
""")
    before = trees_digest(jobs, base)
    r = CliRunner().invoke(batch_cmd, [str(m), "--overwrite"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert f"job 'here' output {jobs} contains input {m}: refusing" in r.stderr and "(the manifest)" in r.stderr
    assert "job 'over-input': input 'base_transformer_dir': job 'over-input' output" in r.stderr
    assert trees_digest(jobs, base) == before


def test_batch_run_job_checks_again_before_removing(tmp_path: Path) -> None:
    """A job handed straight to the runner (not via a manifest) still cannot remove its input."""
    from dqfast import batch as B

    base = write_base(tmp_path / "base")
    before = tree_digest(base)
    job = B.JobSpec(
        name="j",
        builder="fp8",
        output=str(tmp_path / "base" / ".." / "base"),
        inputs={"base_transformer_dir": str(base)},
        options={"from_bf16": True, "model_type": "none"},
        target=B.BUILDERS["fp8"].target,
    )
    res = B.run_job(job, overwrite_foreign=True)
    assert res.status == "failed" and res.error_type == "UnsafeOutputError", res
    assert tree_digest(base) == before


def test_disjoint_output_still_builds_and_replaces_an_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path / "base")
    (tmp_path / "sub").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale").write_text("old")
    before = tree_digest(tmp_path / "base")
    for out in ("out", f"{tmp_path}/sub/../fresh", "sub/new/"):
        r = _cli(*_fp8("base", out))
        assert r.exit_code == 0, r.output
    assert not (tmp_path / "out" / "stale").exists() and (tmp_path / "out" / SHARD).is_file()
    assert (tmp_path / "fresh" / SHARD).is_file() and (tmp_path / "sub" / "new" / SHARD).is_file()
    assert tree_digest(tmp_path / "base") == before


def test_api_raises_unsafe_output_error_with_path_and_input(tmp_path: Path) -> None:
    import dqfast
    from dqfast.errors import PlanError, UnsafeOutputError

    base = write_base(tmp_path / "x" / "base")
    with pytest.raises(UnsafeOutputError) as e:
        dqfast.build_fp8_transformer(tmp_path / "x", base_transformer_dir=base, from_bf16=True, model_type="none", overwrite=True)
    assert isinstance(e.value, PlanError)
    assert e.value.path == str(tmp_path / "x") and e.value.input == str(base)


def test_verify_report_may_not_overwrite_a_checkpoint_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path / "base")
    r = _cli(*_fp8("base", "q"))
    assert r.exit_code == 0, r.output
    before = trees_digest(tmp_path / "base", tmp_path / "q")
    for target in ("base/config.json", "q/../q", f"q/{SHARD}"):
        r = _cli("verify", "layers", "base", "q", "--json", target)
        _one_error_line(r, f"--json {target}")
        assert trees_digest(tmp_path / "base", tmp_path / "q") == before
    r = _cli("verify", "layers", "base", "q", "--json", "report.json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report.json").is_file()


@pytest.mark.parametrize("kind", ["fp8", "nvfp4", "mixed"])
def test_dry_run_refuses_what_the_build_would(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_base(tmp_path / "x" / "base")
    args = ["build", kind, "--base-transformer-dir", "x/base", "--output-dir", "x", "--model-type", "none", "--dry-run"]
    r = _cli(*args, *([] if kind == "mixed" else ["--from-bf16"]))
    _one_error_line(r, "--output-dir x ", "contains input x/base")
    r = _cli(*args[:5], "elsewhere", *args[6:], *(["--target", "none"] if kind == "mixed" else ["--from-bf16"]))
    assert r.exit_code == 0, r.output


def test_batch_summary_and_logs_stay_out_of_inputs(tmp_path: Path) -> None:
    from dqfast.cli.batch import batch as batch_cmd

    base = write_base(tmp_path / "base")
    m = tmp_path / "jobs.toml"
    m.write_text(f"""
[[jobs]]
name = "j"
builder = "fp8"
output = "out"
inputs = {{ base_transformer_dir = "{base}" }}
options = {{ from_bf16 = true, model_type = "none" }}
""")
    before = tree_digest(base)
    for flag, target in (("--summary", base / "summary.json"), ("--log-dir", base / "logs"), ("--summary", base / SHARD)):
        r = CliRunner().invoke(batch_cmd, [str(m), flag, str(target)], catch_exceptions=False)
        _one_error_line(r, f"{flag} {target}", "lies inside input")
        assert tree_digest(base) == before and not (tmp_path / "out").exists()
