"""One CLI convention (docs/cli.md): -h everywhere, --json to stdout, --output-dir, honest help."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from dqfast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    for name, cmd in group.commands.items():
        out += _commands(cmd, (*path, name)) if isinstance(cmd, click.Group) else [(*path, name)]
    return out


def test_dash_h_and_help_on_every_command():
    cmds = _commands(main)
    assert ("build", "fp8") in cmds and ("verify", "layers") in cmds and len(cmds) > 10
    for path in cmds:
        for flag in ("-h", "--help"):
            r = CliRunner().invoke(main, [*path, flag])
            assert r.exit_code == 0 and "Usage:" in r.output, (path, flag, r.output)
            assert "%%" not in r.output, path  # click does not %-format help text


def test_presets_name_no_internal_paths():
    r = CliRunner().invoke(main, ["presets"])
    assert r.exit_code == 0
    assert "/work/" not in r.output and "shared/" not in r.output
    for doc in re.findall(r"\bdocs/[\w/.-]+\.md", r.output):
        assert (ROOT / doc).is_file(), doc


def test_ptq_output_dir_with_out_as_alias(tmp_path):
    from dqfast.cli.ptq import ptq

    for flag in ("--output-dir", "--out"):
        ctx = ptq.make_context("ptq", ["--model-dir", str(tmp_path), flag, "o"])
        assert ctx.params["out_dir"] == Path("o")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("torch")
    from dqfast.fp8 import build_fp8_transformer
    from dqfast.synth import make_transformer

    root = tmp_path_factory.mktemp("clijson")
    syn = make_transformer(root / "syn", "flux1", blocks=1, single_blocks=1, heads=2, head_dim=32)
    build_fp8_transformer(root / "fp8", base_transformer_dir=syn.base, from_bf16=True)
    return syn.base, root / "fp8"


def test_verify_json_dash_prints_to_stdout_and_creates_no_file(built, tmp_path, monkeypatch):
    base, quant = built
    monkeypatch.chdir(tmp_path)
    for args in (["--json", "-"], ["--json"]):
        r = CliRunner().invoke(main, ["verify", "layers", str(base), str(quant), *args])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["layer_summary"]["layers"] > 0
    assert not (tmp_path / "-").exists()
    r = CliRunner().invoke(main, ["verify", "layers", str(base), str(quant), "--json", "report.json"])
    assert r.exit_code == 0 and "layers:" in r.output
    assert json.loads((tmp_path / "report.json").read_text())["layer_summary"]["layers"] > 0


def test_verify_quiet_prints_nothing_and_verbose_prints_layers(built):
    base, quant = built
    r = CliRunner().invoke(main, ["verify", "layers", str(base), str(quant), "-q"])
    assert r.exit_code == 0 and r.output == ""
    r = CliRunner().invoke(main, ["verify", "layers", str(base), str(quant), "--verbose"])
    assert r.exit_code == 0 and "layers:" in r.output and " cosine " in r.output and "SNR" in r.output
    assert r.output.count("\n") > 2  # the summary plus one line per layer


def test_verify_shows_live_progress_unless_quiet(built):
    """verify reports its progress on stderr as builds do (plain lines off a terminal, the last one
    at 100%), and the API callback counts every layer once, in order, up to the total."""
    from dqfast.verify.layers import layer_errors

    base, quant = built
    r = CliRunner().invoke(main, ["verify", "layers", str(base), str(quant)])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dqfast: ")]
    assert lines and "(100%)" in lines[-1]
    calls: list[tuple[int, int, str]] = []
    rows = layer_errors(base, quant, lambda d, t, what: calls.append((d, t, what)))
    assert [c[0] for c in calls] == list(range(1, len(rows) + 1)) and {c[1] for c in calls} == {len(rows)}
    assert [c[2] for c in calls] == [r["module"] for r in rows]
