"""``dqfast build``: one command per builder of the registry (:data:`dqfast.builders.BUILDERS`),
generated here, plus ``build components``.

A builder's command is its registry entry's own options (:class:`dqfast.builders.Option`), then
the options every builder shares (:data:`BUILD_OPTIONS`, declared once below), then the hub
options. The values reach the build function as keywords of the same name; the few SGLang flag
names whose meaning is not a keyword of the builder are translated in :data:`_CLI_FLAGS`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dqfast.builders import BUILDERS, Builder, Option
from dqfast.cli._format import fail, print_report, print_warnings, run, track
from dqfast.cli._types import COUNT, POSITIVE_FLOAT, SizeParam
from dqfast.hub import InputPath, hub_options
from dqfast.plan import IO_MODES, BuildReport
from dqfast.targets import DEFAULT_TARGET, TARGET_NAMES

__all__ = ["build", "build_components_cmd", "BUILD_OPTIONS"]


@click.group()
def build() -> None:
    """Build a quantized transformer directory."""


#: The options every builder shares, in the order `--help` lists them.
BUILD_OPTIONS = [
    click.option("--output-dir", required=True, type=click.Path(path_type=Path), help="Transformer directory to write."),
    click.option(
        "--model-type",
        default="auto",
        show_default=True,
        help="Preset: auto, flux1, flux2, hunyuan-video, qwen-image, wan, ltx2, none.",
    ),
    click.option(
        "--force-model-type",
        is_flag=True,
        help="Use --model-type even when config.json's _class_name belongs to another preset.",
    ),
    click.option(
        "--fallback",
        "fallbacks",
        multiple=True,
        metavar="PATTERN",
        help="Extra modules to keep in BF16 (repeatable): a regex for fp8 and mxfp8 (SGLang's FP8 builder), "
        "a glob for nvfp4 (SGLang's NVFP4 builder).",
    ),
    click.option(
        "--max-shard-size",
        type=SizeParam(minimum=1),
        default=None,
        help="Re-shard the output into files of at most this size (5GB, 500MiB, bytes), named "
        "diffusion_pytorch_model-0000i-of-0000n. Default: keep the source's shards (same file names, "
        "each tensor in its source tensor's file, scales beside their weight, the index named like the source's).",
    ),
    click.option("--threads", type=COUNT, default=0, show_default=True, help="Worker threads (0 = all cores; capped at the cores)."),
    click.option("--strict", is_flag=True, help="Fail (instead of warning) when the build quantizes no module."),
    click.option(
        "--target",
        type=click.Choice(TARGET_NAMES),
        default=DEFAULT_TARGET,
        show_default=True,
        help="Serving engine the output must load in, by the rules of `dqfast check` (any = both SGLang and "
        "vLLM-Omni; none = no engine check, e.g. for dqfast's own runtime or other loaders). Options left unset "
        "take the value the target loads (each printed as 'target NAME: ...'); an explicit choice or a layer it cannot "
        "load fails the build before anything is written.",
    ),
    click.option(
        "--fit-target",
        is_flag=True,
        help="Keep in BF16 (and list in ignore) the layers the --target engine cannot load quantized, and override "
        "explicit options it cannot load; the report's warnings name each one.",
    ),
    click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
    click.option("--dry-run", is_flag=True, help="Print the plan (which modules become what, and why); write nothing."),
    click.option("--no-fsync", is_flag=True, help="Skip fsync before the output is moved into place."),
    click.option(
        "--io",
        "io_mode",
        type=click.Choice(IO_MODES),
        default="auto",
        show_default=True,
        help="auto: O_DIRECT reads of uncached inputs and O_DIRECT writes (page cache where unsupported); "
        "direct: O_DIRECT wherever possible; buffered: mmap + page cache only.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing on success (no progress, no report)."),
    click.option("-v", "--verbose", is_flag=True, help="Also print the per-module plan table after the build."),
]

#: Shared options passed to every builder under their own name.
_SHARED_KEYWORDS = ("max_shard_size", "threads", "overwrite", "dry_run", "force_model_type", "strict", "target", "fit_target")


def _build_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for o in reversed(BUILD_OPTIONS):
        f = o(f)
    wrapped: Callable[..., Any] = hub_options(f)
    return wrapped


def _shared_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """The builder keywords of :data:`BUILD_OPTIONS`; live progress on stderr (a rich bar on a
    terminal, plain lines otherwise) unless -q, --json or --dry-run."""
    from dqfast.progress import make_progress

    progress = track(make_progress(quiet=kw["quiet"] or kw["as_json"] or kw["dry_run"]))
    return dict(progress=progress, fsync=not kw["no_fsync"], io=kw["io_mode"], **{k: kw[k] for k in _SHARED_KEYWORDS})


def _print_build(report: BuildReport, kw: dict[str, Any]) -> None:
    """The report of a build command: nothing with -q (unless --json), the plan table too with -v."""
    if kw["quiet"] and not kw["as_json"]:
        return
    print_report(report, kw["as_json"], show_decisions=kw["dry_run"] or kw["verbose"])


def _parse_components(spec: str | None) -> list[str] | None:
    return None if spec in (None, "", "auto") else [c.strip() for c in str(spec).split(",") if c.strip()]


def _print_components(rep: Any, as_json: bool, show_decisions: bool, quiet: bool = False) -> None:
    if quiet and not as_json:
        return
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
        for r in rep.components.values():
            print_warnings(r)
        return
    for c, r in rep.components.items():
        click.echo(f"== {c} -> {r.output_dir or '(dry run)'}")
        print_report(r, False, show_decisions)


# --- a builder's command, from its registry entry --------------------------------------------

_KINDS: dict[str, dict[str, Any]] = {
    "input": dict(type=InputPath()),
    "file": dict(type=click.Path(exists=True, path_type=Path)),
    "flag": dict(is_flag=True),
    "amax": dict(type=POSITIVE_FLOAT),
    "text": {},
}


def _click_option(o: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    kind: dict[str, Any] = dict(type=click.Choice(list(o.kind))) if isinstance(o.kind, tuple) else dict(_KINDS[o.kind])
    if "/" in o.flags[0]:
        kind.pop("is_flag")  # --x/--no-x: click's on/off pair
    given = dict(required=o.required, show_default=o.show_default, multiple=o.multiple, metavar=o.metavar, help=o.help)
    extra: dict[str, Any] = {k: v for k, v in given.items() if v}
    if o.default is not None:
        extra["default"] = o.default
    return click.option(*o.flags, o.name, **kind, **extra)


def _nvfp4_flags(args: dict[str, Any]) -> None:
    args["reconcile_fused_scales"] = not args.pop("no_reconcile_fused")
    preset = args.pop("pattern_preset")
    if preset:
        args["model_type"] = {"flux1-nvfp4": "flux1"}.get(preset, preset)
    elif click.get_current_context().get_parameter_source("model_type") == click.core.ParameterSource.DEFAULT:
        args["model_type"] = None  # SGLang's default: no preset (the builder: auto for --from-bf16)


def _mixed_flags(args: dict[str, Any]) -> None:
    spec = args["policy"]
    args["policy"] = _load_policy(spec) if spec else None
    # A policy file is an input too: the output must not overwrite it.
    args["guard_inputs"] = [spec] if spec and os.path.lexists(spec) else []


#: Per builder, its flags whose value is not the builder keyword of the same name (SGLang's tools'
#: flag names, a file the CLI reads), rewritten into keywords before the progress display starts.
#: --keep-bf16-pattern (SGLang's name), on any builder that has it, adds --fallback patterns.
_CLI_FLAGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "nvfp4": _nvfp4_flags,
    "mixed": _mixed_flags,
}


def _run_builder(name: str, b: Builder, kw: dict[str, Any]) -> None:
    args = {o.name: kw[o.name] for o in b.options}
    args.update(model_type=kw["model_type"], fallback=list(kw["fallbacks"]) + list(args.pop("keep_bf16", ())))
    if name in _CLI_FLAGS:
        _CLI_FLAGS[name](args)
    components = args.pop("components", None)  # --components: the main input is a pipeline root
    args.update(_shared_kwargs(kw))
    if components is not None:
        from dqfast.components import build_components

        root = args.pop(b.main_input)
        rep = run(lambda: build_components(name, root, kw["output_dir"], _parse_components(components), **args))
        _print_components(rep, kw["as_json"], kw["dry_run"] or kw["verbose"], kw["quiet"])
        return
    report = run(lambda: b.load()(kw["output_dir"], **args))
    _print_build(report, kw)


def _builder_command(name: str, b: Builder) -> click.Command:
    def callback(**kw: Any) -> None:
        _run_builder(name, b, kw)

    f = _build_options(callback)
    for o in reversed(b.options):
        f = _click_option(o)(f)
    return click.command(name, help=b.help)(f)


for _name, _builder in BUILDERS.items():
    build.add_command(_builder_command(_name, _builder))


def _load_policy(spec: str) -> list[tuple[str, str]]:
    """``--policy``: a JSON file when something is at that path (read as a regular file), else
    inline JSON; validated here so the error names the file and the expected shape."""
    from dqfast.errors import PlanError
    from dqfast.mixed import parse_policy
    from dqfast.quant_config import load_json, parse_json

    if os.path.lexists(spec):
        data: Any = run(lambda: load_json(spec))
        source = f"--policy {spec}"
    else:
        try:
            data = parse_json(spec, "--policy")
        except PlanError as e:
            fail(f"--policy is neither a file nor JSON ({e})")
        source = "--policy"
    return run(lambda: parse_policy(data, source=source))


# --- build components ---------------------------------------------------------------------------


@build.command("components")
@click.argument("kind", type=click.Choice(list(BUILDERS)))
@click.option(
    "--root",
    required=True,
    type=InputPath(),
    help="Pipeline root holding transformer/, transformer_2/, ... (BF16 base, or a ModelOpt export).",
)
@click.option("--components", "components", default="auto", show_default=True, help="Comma list or 'auto'.")
@click.option(
    "--base-transformer-dir",
    type=InputPath(),
    default=None,
    help="BF16 pipeline root for fallbacks when --root is a ModelOpt export.",
)
@click.option("--modelopt-backbone-ckpt", default=None, help="backbone.pt per component; '{component}' is substituted.")
@click.option("--from-bf16", is_flag=True, help="fp8/nvfp4: quantize the base weights (no export).")
@click.option("--activation-amax", type=POSITIVE_FLOAT, default=None, help="fp8/nvfp4 --from-bf16 activation amax.")
@click.option(
    "--weight-granularity",
    type=click.Choice(["channel", "tensor"]),
    default=None,
    help="fp8 --from-bf16: as for `build fp8` (default: from --target).",
)
@click.option(
    "--transformers-only",
    is_flag=True,
    help="Write only the transformers, not the rest of a model_index.json pipeline (VAE, text encoders, scheduler, ...).",
)
@_build_options
def build_components_cmd(**kw: Any) -> None:
    """Build every transformer component of a pipeline, each into <output-dir>/<component>."""
    from dqfast.components import build_components

    kind = kw["kind"]
    b = BUILDERS[kind]
    args: dict[str, Any] = dict(**_shared_kwargs(kw), fallback=list(kw["fallbacks"]), transformers_only=kw["transformers_only"])
    if click.get_current_context().get_parameter_source("model_type") != click.core.ParameterSource.DEFAULT:
        args["model_type"] = kw["model_type"]  # else the builder's default (nvfp4: no preset, as SGLang's tool)
    # This command's options that the builder has too (as `build <kind>` options); --root is its main input.
    own = {o.name for o in b.options} - {b.main_input}
    args.update({k: kw[k] for k in ("from_bf16", "activation_amax", "weight_granularity") if k in own})
    args.update({k: str(kw[k]) for k in ("base_transformer_dir", "modelopt_backbone_ckpt") if k in own and kw[k]})
    rep = run(lambda: build_components(kind, kw["root"], kw["output_dir"], _parse_components(kw["components"]), **args))
    _print_components(rep, kw["as_json"], kw["dry_run"] or kw["verbose"], kw["quiet"])
