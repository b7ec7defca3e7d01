"""Package structure: every module imports on its own, no import cycles among dqfast modules,
one registry per concept (models, builders) that every consumer reads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import dqfast
import pytest

PKG = Path(dqfast.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str], module_level: bool = True) -> set[str]:
    """dqfast modules ``name`` imports: with ``module_level``, top-level statements only (also
    inside top-level ``if``/``try``), else every import, lazy ones in functions too. Importing
    ``a.b.c`` runs ``a.b`` first, so it counts as an edge to ``a.b`` (but not to the module's own
    parent packages, which are imported before it anyway); ``from a import b`` where ``a.b`` is a
    module is an edge to ``a.b`` only. ``if TYPE_CHECKING:`` imports never run: skipped."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    # A package's lazy re-export hook (module ``__getattr__``) runs only when that name is asked
    # for: importing a sibling submodule does not run it.
    tree.body = [st for st in tree.body if not (isinstance(st, ast.FunctionDef) and st.name == "__getattr__")]

    def add(st: ast.stmt) -> None:
        if isinstance(st, ast.Import):
            found.update(a.name for a in st.names)
        elif isinstance(st, ast.ImportFrom):
            mod = ".".join(base[: len(base) - st.level + 1] + ([st.module] if st.module else [])) if st.level else (st.module or "")
            subs = [f"{mod}.{a.name}" for a in st.names]
            mods = [m for m in subs if m in known]
            found.update(mods if len(mods) == len(subs) else [mod, *mods])

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            add(st)
            if isinstance(st, (ast.If, ast.Try)):
                visit(st.body)
                visit(st.orelse)
                for h in getattr(st, "handlers", []):
                    visit(h.body)
                visit(getattr(st, "finalbody", []))

    if module_level:
        visit(tree.body)
    else:
        for node in ast.walk(tree):
            if isinstance(node, ast.stmt):
                add(node)
    deps: set[str] = set()
    for mod in found:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[:i])
            if cand not in known or cand == name:
                continue
            if i < len(parts) and name.startswith(cand + "."):
                continue  # a parent package of both: imported before `name` anyway
            deps.add(cand)
    return deps


def _graph(module_level: bool = True) -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | {"dqfast._core"}  # the extension: a leaf
    return {n: _imports(n, p, known, module_level) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles_among_dqfast_modules() -> None:
    graph = _graph()
    assert "dqfast.cli.batch" in graph["dqfast.cli"] and "dqfast._core" in graph["dqfast.fp8"]  # the walk sees imports
    assert _cycles(graph) == []


def test_no_import_cycles_even_through_lazy_imports() -> None:
    """Imports inside functions count too: a cycle hidden in a function (cli <-> batch_cli,
    ptq.flow <-> verify.checkpoint) still ties two modules together."""
    graph = _graph(module_level=False)
    assert "dqfast.verify.checkpoint" in graph["dqfast.ptq.flow"]  # a lazy import, seen
    assert _cycles(graph) == []


def test_cycle_detector_finds_a_cycle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]


def test_builders_do_not_import_the_package_root() -> None:
    """fp8/nvfp4/mixed/qkv take the version from dqfast._core, not from dqfast (which imports them)."""
    graph = _graph()
    for m in ("dqfast.fp8", "dqfast.nvfp4", "dqfast.mixed", "dqfast.qkv"):
        assert "dqfast" not in graph[m], m


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Each module on its own, in a new interpreter (so import order cannot hide a cycle or a
    missing import); only a missing third-party extra (e.g. triton without a GPU build) may skip."""
    code = r"""
import importlib, json, sys
res = {}
for m in sys.argv[1:]:
    import subprocess
    p = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True)
    res[m] = p.stderr.strip().splitlines()[-1] if p.returncode else ""
print(json.dumps(res))
"""
    mods = sorted(_modules())
    out = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    failed = {m: e for m, e in res.items() if e and not (e.startswith("ModuleNotFoundError") and "'dqfast" not in e)}
    assert failed == {}


def test_cli_registers_every_subcommand() -> None:
    from dqfast.cli import main

    assert {"build", "inspect", "verify", "presets", "demo", "ptq", "batch"} <= set(main.commands)


def test_missing_optional_extra_is_one_line_error() -> None:
    p = subprocess.run(
        [sys.executable, "-c", "import test_architecture as t; t._run_with_extra()"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error:") and "dqfast[ptq]" in p.stderr, p.stderr


def _run_with_extra() -> None:
    import click
    from dqfast.cli import main

    @click.command("needs-extra")
    def needs_extra() -> None:
        raise ModuleNotFoundError("No module named 'modelopt'", name="modelopt")

    main.add_command(needs_extra)
    sys.argv = ["dqfast", "needs-extra"]
    main()


# ---- registries ------------------------------------------------------------------------------


def test_ptq_presets_are_a_view_of_the_model_registry() -> None:
    from dqfast import models
    from dqfast.ptq import presets as ptq_presets

    assert set(ptq_presets.PRESETS) == {n for n, m in models.PRESETS.items() if m.ptq}
    assert "ltx2" not in ptq_presets.PRESETS  # no filter recorded: dqfast.ptq refuses it, as before
    for name, p in ptq_presets.PRESETS.items():
        m = models.PRESETS[name]
        assert (p.modelopt_model_types, p.nvfp4_recipe, p.block_range, p.disable) == (
            m.modelopt_model_types,
            m.nvfp4_recipe,
            m.block_range,
            m.ptq_disabled,
        )
    assert ptq_presets.get_preset("flux").recipe("nvfp4") == models.NVFP4_FP8_MHA_RECIPE
    assert ptq_presets.get_preset("qwen").block_range == models.BlockRange("transformer_blocks", 2, 2)


def test_compat_presets_module_is_the_registry() -> None:
    from dqfast import models, presets

    assert presets.PRESETS is models.PRESETS and presets.get_preset is models.get_preset


def test_calibration_family_from_the_registry() -> None:
    from dqfast.ptq.calibration import model_family

    def obj(cls: str) -> object:
        return type(cls, (), {})()

    assert model_family(obj("FluxTransformer2DModel")) == "flux"
    assert model_family(obj("WanTransformer3DModel")) == "wan"
    from dqfast.errors import PlanError

    with pytest.raises(PlanError, match="QwenImageTransformer2DModel"):
        model_family(obj("QwenImageTransformer2DModel"))


def test_builder_registry_is_shared() -> None:
    from dqfast import batch, builders, components
    from dqfast.cli.build import build_components_cmd

    assert batch.BUILDERS is builders.BUILDERS is components.BUILDERS
    assert {"fp8", "nvfp4", "mixed", "mxfp8"} <= set(builders.BUILDERS)
    kind = next(p for p in build_components_cmd.params if p.name == "kind")
    assert set(kind.type.choices) == set(builders.BUILDERS)  # type: ignore[attr-defined]
    with pytest.raises(dqfast.PlanError, match="unknown build kind 'int8'"):
        builders.get_builder("int8")


def test_each_weight_only_format_gets_builder_command_and_ops_from_its_entry() -> None:
    """A weight-only block format is its Rust kernel file and one dqfast.formats entry: the builder,
    its registry entry and `dqfast build <name>` command, and the plan ops are shared (no line per
    format). Batch validates a manifest against the bound builder's own keywords, so the bound
    function must not take **kwargs or a `weight_format`."""
    import inspect

    from click.testing import CliRunner
    from dqfast import batch, builders, formats, plan
    from dqfast.cli import main

    wo = [f for f in formats.FORMATS.values() if f.weight_only]
    assert wo, "MXFP8 at least"
    for f in wo:
        b = builders.BUILDERS[f.name]
        fn = b.load()
        assert fn.__name__ == f"build_{f.name}_transformer"
        params = inspect.signature(fn).parameters
        assert "weight_format" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())
        assert batch._signature_keywords(b) >= {"base_transformer_dir", "fallback", "target"}
        assert {f.weight_op, f.block_scale_op} <= set(plan.OPS)
        r = CliRunner().invoke(main, ["build", f.name, "--help"])
        assert r.exit_code == 0 and f"{f.label} weight-only" in r.output, r.output
    import dqfast.weight_only as weight_only

    with pytest.raises(AttributeError, match="build_nvfp4_transformer"):
        weight_only.build_nvfp4_transformer  # noqa: B018 - NVFP4 is no weight-only block format
    with pytest.raises(dqfast.PlanError, match="weight_format 'nvfp4' is no weight-only block format .known: mxfp8"):
        dqfast.build_weight_only_transformer("unused", weight_format="nvfp4", base_transformer_dir="unused")


_TOY_BUILDER = """
import json


def build(output_dir, **kw):
    with open(output_dir, "w") as f:
        json.dump(kw, f, default=str)
"""

_TOY_CLI = """
import sys
from dqfast.builders import Option, register_builder

register_builder(
    "toy",
    "toybuilder:build",
    ["base_transformer_dir"],
    help="A toy builder.",
    options=[
        Option(("--base-transformer-dir",), "Its base.", required=True),
        Option(("--gain",), "A positive factor.", kind="amax", default=1.0, show_default=True),
        Option(("--mode",), kind=("a", "b"), default="a"),
    ],
)
from dqfast.cli import main

sys.argv[0] = "dqfast"
main()
"""


def test_a_registered_builder_gets_its_build_command(tmp_path: Path) -> None:
    """Adding a builder is one registry entry: `dqfast build <name>` appears with its own options
    and every shared one, and passes them to the build function as keywords (no CLI edit)."""
    (tmp_path / "toybuilder.py").write_text(_TOY_BUILDER)
    base, out = tmp_path / "base", tmp_path / "out.json"
    base.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _TOY_CLI, *args], capture_output=True, text=True, cwd=tmp_path)

    r = cli("build", "toy", "--help")
    assert r.returncode == 0 and "A toy builder." in r.stdout, r.stderr
    for flag in ("--gain", "--mode", "--base-transformer-dir", "--output-dir", "--target", "--max-shard-size", "--revision"):
        assert flag in r.stdout, flag
    r = cli("build", "toy", "--base-transformer-dir", str(base), "--output-dir", str(out), "--gain", "2", "--threads", "3", "-q")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    kw = json.loads(out.read_text())
    assert (kw["base_transformer_dir"], kw["gain"], kw["mode"], kw["threads"]) == (str(base), 2.0, "a", 3)
    assert (kw["model_type"], kw["fallback"], kw["target"], kw["io"], kw["fsync"]) == ("auto", [], "any", "auto", True)
    r = cli("build", "toy", "--base-transformer-dir", str(base), "--output-dir", str(out), "--gain", "-1")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--gain" in r.stderr, r.stderr


def test_format_constants_come_from_core() -> None:
    """Each format number is written once (dqfast-core) and exported; Python modules use those."""
    from dqfast import _core, fp8, mixed, nvfp4

    assert (_core.E4M3_MAX, _core.NVFP4_BOUND, _core.NVFP4_GROUP, _core.E4M3_MAX_BYTE) == (448.0, 6 * 448.0, 16, 0x7E)
    assert fp8.E4M3_MAX is _core.E4M3_MAX and mixed.E4M3_MAX is _core.E4M3_MAX
    assert nvfp4.NVFP4_BOUND is _core.NVFP4_BOUND and nvfp4.GROUP is _core.NVFP4_GROUP
    assert _core.fp8_scale_from_amax(448.0) == 1.0
