"""The ``dqfast`` command line: a thin layer over the Python API.

Errors print one line (``error: <file>: tensor '<name>': <problem>``) and exit with status 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dqfast.batch_cli import batch
from dqfast.builders import BUILDERS
from dqfast.cli_format import OneLineGroup
from dqfast.cli_format import fail as _fail
from dqfast.cli_format import human as _human
from dqfast.cli_types import AT_LEAST_ONE, COUNT, POSITIVE_FLOAT, SizeParam
from dqfast.errors import DqfastError
from dqfast.hub import InputPath, hub_options
from dqfast.plan import IO_MODES, BuildReport
from dqfast.ptq_cli import ptq
from dqfast.targets import DEFAULT_TARGET, TARGET_NAMES

#: Live progress displays started by `_common_build_kwargs`, ended by `_run` whatever happens.
_PROGRESS: list[Any] = []


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(fn: Callable[[], Any]) -> Any:
    # SIGTERM takes the Ctrl-C path: the engine is cancelled, its staging directory removed and
    # the previous output left as it was; exit status 130 either way.
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return fn()  # dqfast's errors: one line, exit 2, in OneLineGroup.main
    except KeyboardInterrupt:
        for p in _PROGRESS:
            p.close()
        click.echo("interrupted: nothing was written at the output path", err=True)
        sys.exit(130)
    finally:
        for p in _PROGRESS:
            p.close()
        _PROGRESS.clear()
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def print_report(report: BuildReport, as_json: bool, show_decisions: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        _print_warnings(report)
        return
    from rich.console import Console
    from rich.table import Table

    # Full names matter more than a tidy table: never truncate, even when not on a terminal.
    console = Console(width=max(Console().width, 140))
    if show_decisions:
        t = Table(title="plan: what happens to each module")
        for col in ("module", "action", "why"):
            t.add_column(col, overflow="fold")
        for d in report.decisions:
            t.add_row(d.module, d.action, d.reason)
        console.print(t)
    s = Table(title=f"dqfast {report.quant_algo} build" + (" (dry run: nothing written)" if report.dry_run else ""))
    s.add_column("what")
    s.add_column("value", justify="right")
    for k, v in report.counts.items():
        s.add_row(k.replace("_", " "), str(v))
    if not report.dry_run:
        s.add_row("output", str(report.output_dir))
        s.add_row("shards", str(len(report.shards)))
        s.add_row("read", _human(report.bytes_read))
        s.add_row("read with O_DIRECT", _human(report.bytes_read_direct))
        s.add_row("writes", "O_DIRECT" if report.direct_writes else "page cache")
        s.add_row("written", _human(report.bytes_written))
        s.add_row("seconds", f"{report.seconds:.2f}")
        s.add_row("throughput", f"{report.throughput_gbps:.2f} GB/s of input")
        s.add_row("peak RSS", _human(report.peak_rss_bytes))
        s.add_row("threads", str(report.threads))
    console.print(s)
    _print_warnings(report)


def _print_warnings(report: BuildReport) -> None:
    # stderr, also with --json: a warning must reach the user whatever stdout is piped into.
    for f in report.target_forced:
        click.echo(f"target {report.target}: {f}", err=True)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)


def _print_build(report: BuildReport, kw: dict[str, Any]) -> None:
    """The report of a build command: nothing with -q (unless --json), the plan table too with -v."""
    if kw["quiet"] and not kw["as_json"]:
        return
    print_report(report, kw["as_json"], show_decisions=kw["dry_run"] or kw["verbose"])


@click.group(cls=OneLineGroup, context_settings=dict(help_option_names=["-h", "--help"]))  # inherited by every subcommand
@click.version_option(package_name="dqfast")
def main() -> None:
    """Convert diffusion-transformer checkpoints to FP8 / NVFP4 for SGLang Diffusion and vLLM-Omni."""


@main.group()
def build() -> None:
    """Build a quantized transformer directory."""


def _common_build_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
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
    for o in reversed(opts):
        f = o(f)
    return hub_options(f)


def _common_build_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """The options every builder shares, from `_common_build_options`; live progress on stderr
    (a rich bar on a terminal, plain lines otherwise) unless -q, --json or --dry-run."""
    from dqfast.progress import make_progress

    progress = make_progress(quiet=kw["quiet"] or kw["as_json"] or kw["dry_run"])
    if progress is not None:
        _PROGRESS.append(progress)
    return dict(
        progress=progress,
        max_shard_size=kw["max_shard_size"],
        threads=kw["threads"],
        overwrite=kw["overwrite"],
        dry_run=kw["dry_run"],
        fsync=not kw["no_fsync"],
        io=kw["io_mode"],
        force_model_type=kw["force_model_type"],
        strict=kw["strict"],
        target=kw["target"],
        fit_target=kw["fit_target"],
    )


@build.command("fp8")
@click.option("--modelopt-hf-dir", type=InputPath(), help="ModelOpt HF export (root or transformer/).")
@click.option(
    "--modelopt-backbone-ckpt",
    type=click.Path(exists=True, path_type=Path),
    help="ModelOpt backbone.pt (or its folder), or an amax .safetensors sidecar. A pickle: trusted files only "
    "(dqfast never executes it, but still reads it).",
)
@click.option("--base-transformer-dir", type=InputPath(), help="BF16 base transformer (fallback weights).")
@click.option("--from-bf16", is_flag=True, help="Calibration-free: scales from the base weights themselves.")
@click.option(
    "--weight-granularity",
    type=click.Choice(["channel", "tensor"]),
    default=None,
    help="--from-bf16: per output channel (FP8_PER_CHANNEL_PER_TOKEN) or per tensor (FP8, needs --activation-amax). "
    "Default: from --target (tensor, with activation amax 448, where SGLang is a target; else channel).",
)
@click.option("--activation-amax", type=POSITIVE_FLOAT, default=None, help="--from-bf16: static activation amax -> input_scale = amax/448.")
@click.option(
    "--rounding",
    type=click.Choice(["exact", "modelopt"]),
    default="exact",
    show_default=True,
    help="When dqfast quantizes: divide in float32 (exact) or in the weight's dtype as ModelOpt's export does.",
)
@click.option("--requantize", is_flag=True, help="Re-quantize FP8 weights from the base instead of copying the export's bytes.")
@click.option("--repair-nan", is_flag=True, help="Replace NaN e4m3 bytes (0x7F/0xFF) in the export's weights by 448 instead of refusing.")
@click.option(
    "--keep-bf16-pattern",
    "keep_bf16",
    multiple=True,
    metavar="REGEX",
    help="SGLang's name for --fallback (regexes, re.search on every name variant).",
)
@click.option(
    "--maxbound",
    type=POSITIVE_FLOAT,
    default=448.0,
    show_default=True,
    help="SGLang's flag: scales from backbone.pt are amax / maxbound (the export's bytes must agree unless --requantize).",
)
@_common_build_options
def build_fp8(**kw: Any) -> None:
    """FP8 transformer (SGLang build_modelopt_fp8_transformer semantics)."""
    from dqfast.fp8 import build_fp8_transformer

    report = _run(
        lambda: build_fp8_transformer(
            kw["output_dir"],
            modelopt_hf_dir=kw["modelopt_hf_dir"],
            modelopt_backbone_ckpt=kw["modelopt_backbone_ckpt"],
            base_transformer_dir=kw["base_transformer_dir"],
            model_type=kw["model_type"],
            fallback=kw["fallbacks"] + kw["keep_bf16"],
            from_bf16=kw["from_bf16"],
            weight_granularity=kw["weight_granularity"],
            activation_amax=kw["activation_amax"],
            rounding=kw["rounding"],
            requantize=kw["requantize"],
            repair_nan=kw["repair_nan"],
            maxbound=kw["maxbound"],
            **_common_build_kwargs(kw),
        )
    )
    _print_build(report, kw)


@build.command("nvfp4")
@click.option("--modelopt-hf-dir", type=InputPath(), help="ModelOpt NVFP4 HF export (root or transformer/).")
@click.option("--base-transformer-dir", type=InputPath(), help="BF16 base transformer (fallback weights).")
@click.option(
    "--pattern-preset",
    default=None,
    help="SGLang's name for the BF16 fallback preset (none, flux1-nvfp4; or a --model-type name). Without it and "
    "--model-type, no preset is applied, as SGLang's tool does (--from-bf16: auto).",
)
@click.option("--keep-bf16-pattern", "keep_bf16", multiple=True, metavar="GLOB", help="SGLang's name for --fallback (globs).")
@click.option(
    "--swap-weight-nibbles/--no-swap-weight-nibbles",
    default=False,
    show_default=True,
    help="Rewrite every packed byte (b>>4)|(b<<4) in place; the output then says swap_weight_nibbles: false.",
)
@click.option(
    "--repair-nan",
    "--repair-nan-scales",
    "repair_nan",
    is_flag=True,
    help="Clamp NaN block-scale bytes (0x7F/0xFF) to 448 instead of refusing.",
)
@click.option("--no-reconcile-fused", is_flag=True, help="Leave q/k/v shards with different global scales as they are (warn only).")
@click.option("--from-bf16", is_flag=True, help="No export: quantize the base weights in Rust (weights-only amax).")
@click.option(
    "--activation-amax", type=POSITIVE_FLOAT, default=None, help="--from-bf16: activation amax -> input_scale = amax/2688 (default 2688)."
)
@_common_build_options
def build_nvfp4(**kw: Any) -> None:
    """Mixed BF16+NVFP4 transformer (SGLang build_modelopt_nvfp4_transformer semantics). --fallback takes globs."""
    from dqfast.nvfp4 import build_nvfp4_transformer

    model_type = kw["model_type"]
    if kw["pattern_preset"]:
        model_type = {"flux1-nvfp4": "flux1"}.get(kw["pattern_preset"], kw["pattern_preset"])
    elif click.get_current_context().get_parameter_source("model_type") == click.core.ParameterSource.DEFAULT:
        model_type = None  # SGLang's default: no preset (the builder: auto for --from-bf16)
    report = _run(
        lambda: build_nvfp4_transformer(
            kw["output_dir"],
            modelopt_hf_dir=kw["modelopt_hf_dir"],
            base_transformer_dir=kw["base_transformer_dir"],
            model_type=model_type,
            fallback=list(kw["fallbacks"]) + list(kw["keep_bf16"]),
            swap_weight_nibbles=kw["swap_weight_nibbles"],
            repair_nan=kw["repair_nan"],
            reconcile_fused_scales=not kw["no_reconcile_fused"],
            from_bf16=kw["from_bf16"],
            activation_amax=kw["activation_amax"],
            **_common_build_kwargs(kw),
        )
    )
    _print_build(report, kw)


@build.command("mxfp8")
@click.option("--base-transformer-dir", required=True, type=InputPath(), help="BF16 base transformer.")
@_common_build_options
def build_mxfp8(**kw: Any) -> None:
    """MXFP8 weight-only transformer for vLLM-Omni (quant_method mxfp8) from the BF16 base, calibration-free."""
    from dqfast.mxfp8 import build_mxfp8_transformer

    report = _run(
        lambda: build_mxfp8_transformer(
            kw["output_dir"],
            base_transformer_dir=kw["base_transformer_dir"],
            model_type=kw["model_type"],
            fallback=kw["fallbacks"],
            **_common_build_kwargs(kw),
        )
    )
    _print_build(report, kw)


# --- build mixed / build components (dqfast.mixed, dqfast.components) ---------------------------


def _parse_components(spec: str | None) -> list[str] | None:
    return None if spec in (None, "", "auto") else [c.strip() for c in spec.split(",") if c.strip()]


def _print_components(rep: Any, as_json: bool, show_decisions: bool, quiet: bool = False) -> None:
    if quiet and not as_json:
        return
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
        for r in rep.components.values():
            _print_warnings(r)
        return
    for c, r in rep.components.items():
        click.echo(f"== {c} -> {r.output_dir or '(dry run)'}")
        print_report(r, False, show_decisions)


@build.command("mixed")
@click.option(
    "--base-transformer-dir",
    required=True,
    type=InputPath(),
    help="BF16 base transformer (or pipeline root with --components).",
)
@click.option(
    "--policy",
    default=None,
    metavar="JSON|FILE",
    help='Per-layer policy {"fp8": [regex], "nvfp4": [regex], "bf16": [regex]} (key order = priority, '
    "first match wins, unmatched stay BF16); default: preset's unquantized set BF16, MLPs NVFP4, rest FP8.",
)
@click.option("--fp8-activation-amax", type=POSITIVE_FLOAT, default=None, help="FP8 input_scale = amax/448 (default 448).")
@click.option("--nvfp4-activation-amax", type=POSITIVE_FLOAT, default=None, help="NVFP4 input_scale = amax/2688 (default 2688).")
@click.option("--rounding", type=click.Choice(["exact", "modelopt"]), default="exact", show_default=True)
@click.option(
    "--components",
    "components",
    default=None,
    help="Build these components of a pipeline root (comma list, or 'auto' for every transformer*/) into <output-dir>/<component>.",
)
@_common_build_options
def build_mixed(**kw: Any) -> None:
    """ModelOpt MIXED_PRECISION transformer (FP8 + NVFP4 + BF16 per layer) from the BF16 base, weights-only."""
    from dqfast.mixed import build_mixed_transformer

    policy = _load_policy(kw["policy"]) if kw["policy"] else None
    # A policy file is an input too: the output must not overwrite it.
    policy_files = [kw["policy"]] if kw["policy"] and os.path.lexists(kw["policy"]) else []
    args = dict(
        policy=policy,
        fallback=list(kw["fallbacks"]),
        model_type=kw["model_type"],
        fp8_activation_amax=kw["fp8_activation_amax"],
        nvfp4_activation_amax=kw["nvfp4_activation_amax"],
        rounding=kw["rounding"],
        guard_inputs=policy_files,
        **_common_build_kwargs(kw),
    )
    if kw["components"] is not None:
        from dqfast.components import build_components

        rep = _run(
            lambda: build_components("mixed", kw["base_transformer_dir"], kw["output_dir"], _parse_components(kw["components"]), **args)
        )
        _print_components(rep, kw["as_json"], kw["dry_run"] or kw["verbose"], kw["quiet"])
        return
    report = _run(lambda: build_mixed_transformer(kw["output_dir"], kw["base_transformer_dir"], **args))
    _print_build(report, kw)


def _load_policy(spec: str) -> list[tuple[str, str]]:
    """``--policy``: a JSON file when something is at that path (read as a regular file), else
    inline JSON; validated here so the error names the file and the expected shape."""
    import os

    from dqfast.errors import PlanError
    from dqfast.mixed import parse_policy
    from dqfast.quant_config import load_json, parse_json

    if os.path.lexists(spec):
        data: Any = _run(lambda: load_json(spec))
        source = f"--policy {spec}"
    else:
        try:
            data = parse_json(spec, "--policy")
        except PlanError as e:
            _fail(f"--policy is neither a file nor JSON ({e})")
        source = "--policy"
    return _run(lambda: parse_policy(data, source=source))


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
@_common_build_options
def build_components_cmd(**kw: Any) -> None:
    """Build every transformer component of a pipeline, each into <output-dir>/<component>."""
    from dqfast.components import build_components

    kind = kw["kind"]
    args: dict[str, Any] = dict(**_common_build_kwargs(kw))
    if click.get_current_context().get_parameter_source("model_type") != click.core.ParameterSource.DEFAULT:
        args["model_type"] = kw["model_type"]  # else the builder's default (nvfp4: no preset, as SGLang's tool)
    if kind not in ("mixed", "mxfp8"):  # the calibration-free-only builders take neither
        args.update(fallback=list(kw["fallbacks"]), from_bf16=kw["from_bf16"], activation_amax=kw["activation_amax"])
        if kw["base_transformer_dir"]:
            args["base_transformer_dir"] = str(kw["base_transformer_dir"])
        if kind == "fp8":
            args["weight_granularity"] = kw["weight_granularity"]
            if kw["modelopt_backbone_ckpt"]:
                args["modelopt_backbone_ckpt"] = kw["modelopt_backbone_ckpt"]
    else:
        args["fallback"] = list(kw["fallbacks"])
    args["transformers_only"] = kw["transformers_only"]
    rep = _run(lambda: build_components(kind, kw["root"], kw["output_dir"], _parse_components(kw["components"]), **args))
    _print_components(rep, kw["as_json"], kw["dry_run"] or kw["verbose"], kw["quiet"])


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--base",
    "base",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Reference BF16 transformer: also judge the NVFP4 nibble order against it.",
)
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(path: Path, base: Path | None, as_json: bool) -> None:
    """Dtypes, shapes, quantization summary and problems of a checkpoint."""
    from dqfast.inspect import inspect_checkpoint

    r = _run(lambda: inspect_checkpoint(path))
    order = None
    if base is not None and r.modules.get("nvfp4"):
        from dqfast.nvfp4 import nibble_order_report

        order = _run(lambda: nibble_order_report(r.path, base))
        if order["order"] == "high_first":
            r.problems.append("packed NVFP4 bytes are nibble-swapped relative to the reference: " + order["advice"])
    if as_json:
        d = r.to_dict()
        if order is not None:
            d["nibble_order"] = order
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(f"{r.path}: {r.tensors} tensors in {r.files} file(s), {_human(r.total_bytes)}")
        click.echo(f"class: {r.class_name}   quant_algo: {r.quant_algo} ({r.quant_config_source})")
        click.echo("dtypes: " + ", ".join(f"{k}={v}" for k, v in sorted(r.dtypes.items())))
        click.echo("modules: " + ", ".join(f"{k}={v}" for k, v in sorted(r.modules.items())))
        if r.ignore:
            click.echo(f"ignore: {len(r.ignore)} pattern(s): " + ", ".join(r.ignore[:8]) + (" ..." if len(r.ignore) > 8 else ""))
        if order is not None:
            click.echo(
                f"nibble order: {order['order']} (relative error vs reference: low-first "
                f"{order.get('low_first_rel_err', float('nan')):.3f}, high-first {order.get('high_first_rel_err', float('nan')):.3f})"
            )
        click.echo(f"problems: {len(r.problems)}")
        for p in r.problems:
            click.echo(f"  - {p}")
        _echo_target_verdicts(path)
    if r.problems:
        sys.exit(1)


# docs/cli.md: `--json` alone (or `--json -`) prints JSON to stdout instead of the table, as on every
# command; verify also takes `--json PATH` to write the report to a file.
_JSON_OUT: dict[str, Any] = dict(
    type=click.Path(path_type=Path, allow_dash=True),
    default=None,
    is_flag=False,
    flag_value="-",
    help="Print the full report as JSON (--json or --json -), or write it to PATH (--json PATH).",
)


def _json_to_stdout(path: Path | None) -> bool:
    return path is not None and str(path) == "-"


def _echo_target_verdicts(path: Path) -> None:
    """One line per serving engine: what `dqfast check` concludes (docs/compat.md)."""
    from dqfast.check import check_checkpoint

    try:
        reports = check_checkpoint(path, "any")
    except DqfastError as e:
        click.echo(f"targets: not checked: {e}")
        return
    for rep in reports:
        click.echo(f"target {rep.summary()}")


@main.command("check")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--target", default="any", show_default=True, type=click.Choice(["sglang", "vllm-omni", "any"]), help="Serving engine (any = both)."
)
@click.option("--all-layers", is_flag=True, help="List every layer, not only those an engine does not load as written.")
@click.option("--json", "as_json", is_flag=True)
def check_cmd(path: Path, target: str, all_layers: bool, as_json: bool) -> None:
    """What SGLang Diffusion / vLLM-Omni will do with each layer of a checkpoint (reads headers only).

    Exit status 1 when an engine of the target does not load it."""
    from dqfast.check import check_checkpoint

    reports = _run(lambda: check_checkpoint(path, target))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for rep in reports:
            click.echo(f"{rep.summary()}  [{rep.engine_version}, family {rep.family}]")
            for v in rep.layers:
                if all_layers or v.outcome in ("error", "dequantized"):
                    click.echo(f"  {v.module}: {v.stored} -> {v.outcome}: {v.detail}")
    if any(r.status == "fails" for r in reports):
        sys.exit(1)


@main.group()
def verify() -> None:
    """How far a quantized checkpoint is from its BF16 base."""
    from dqfast.extras import require_extra

    _run(lambda: require_extra("verify"))


def _quiet_verbose(f: Callable[..., Any]) -> Callable[..., Any]:
    """-q/-v of the verify commands (the report itself is unchanged; exit status too)."""
    f = click.option("-v", "--verbose", is_flag=True, help="Also print every layer's cosine and SNR.")(f)
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing unless a check fails.")(f)


@verify.command("layers")
@click.argument("base_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("quant_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "json_path", **_JSON_OUT)
@_quiet_verbose
def verify_layers(base_dir: Path, quant_dir: Path, json_path: Path | None, quiet: bool = False, verbose: bool = False) -> None:
    """Per-layer error of the dequantized weights (max/mean abs, cosine, SNR), outliers and NaNs."""
    from dqfast.verify.checkpoint import verify_checkpoint

    to_stdout = _json_to_stdout(json_path)
    step = _verify_progress(quiet or to_stdout)
    r = _run(
        lambda: verify_checkpoint(base_dir, quant_dir, trajectory_check=False, json_path=None if to_stdout else json_path, progress=step)
    )
    _print_verify(r, as_json=to_stdout, quiet=quiet, verbose=verbose)


def _verify_progress(quiet: bool) -> Callable[[int, int, str], None] | None:
    """Live progress of the verify commands (layers, then denoising steps) on stderr, as for builds;
    none with -q or JSON on stdout. Closed by `_run`."""
    from dqfast.progress import make_progress

    p = make_progress(quiet=quiet, unit="items")
    if p is None:
        return None
    _PROGRESS.append(p)
    return lambda done, total, what: p(done, total, done, total, what)


@verify.command("trajectory")
@click.argument("base_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("quant_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--steps", type=AT_LEAST_ONE, default=8, show_default=True)
@click.option("--seed", type=COUNT, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", **_JSON_OUT)
@click.option("--png", "png_path", type=click.Path(path_type=Path), default=None, help="Per-step plot (needs matplotlib).")
@_quiet_verbose
def verify_trajectory(
    base_dir: Path,
    quant_dir: Path,
    steps: int,
    seed: int,
    device: str,
    json_path: Path | None,
    png_path: Path | None,
    quiet: bool = False,
    verbose: bool = False,
) -> None:
    """Run BF16 and quantized transformers through the same seeded denoising loop and compare."""
    from dqfast.verify.checkpoint import verify_checkpoint

    to_stdout = _json_to_stdout(json_path)
    out = None if to_stdout else json_path
    step = _verify_progress(quiet or to_stdout)
    r = _run(
        lambda: verify_checkpoint(
            base_dir, quant_dir, steps=steps, seed=seed, device=device, json_path=out, png_path=png_path, progress=step
        )
    )
    _print_verify(r, as_json=to_stdout, quiet=quiet, verbose=verbose)


def _print_verify(r: dict[str, Any], as_json: bool = False, quiet: bool = False, verbose: bool = False) -> None:
    s = r["layer_summary"]
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
        if s.get("nan_layers"):
            sys.exit(1)
        return
    if quiet:
        if s.get("nan_layers"):
            click.echo(f"NaN layers: {', '.join(s['nan_layers'])}", err=True)
            sys.exit(1)
        return
    if verbose:
        for row in s.get("rows", []):
            click.echo(f"  {row['module']}: cosine {row['cosine']:.6f}  SNR {row['snr_db']:.1f} dB")
    click.echo(
        f"layers: {s['layers']}  min cosine {s.get('min_cosine', float('nan')):.6f} ({s.get('worst_layer')})  "
        f"median SNR {s.get('median_snr_db') or float('nan'):.1f} dB  min SNR {s.get('min_snr_db') or float('nan'):.1f} dB"
    )
    if s.get("outliers"):
        click.echo(f"outliers: {', '.join(s['outliers'])}")
    if s.get("nan_layers"):
        click.echo(f"NaN layers: {', '.join(s['nan_layers'])}")
    t = r.get("trajectory")
    if t:
        click.echo(
            f"trajectory: {t['num_steps']} steps, min cosine {t['min_cosine']:.6f}, final cosine "
            f"{t['final_cosine']:.6f}, final PSNR {t['final_psnr_db']:.2f} dB"
        )
    if s.get("nan_layers"):
        sys.exit(1)


@main.command("presets")
def presets_cmd() -> None:
    """List the model presets and where their lists come from."""
    from dqfast.models import PRESETS

    for p in PRESETS.values():
        click.echo(
            f"{p.name}: classes={list(p.class_names)} fp8_fallback={len(p.fp8_fallback)} "
            f"nvfp4_fallback={len(p.nvfp4_fallback)} ptq_disabled={len(p.ptq_disabled)}"
        )
        if p.source:
            click.echo(f"    source: {p.source}")


@main.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
def demo_cmd(workdir: Path) -> None:
    """Generate a small synthetic FLUX.1-shaped ModelOpt FP8 export and convert it."""
    from dqfast.demo import run_demo

    _run(lambda: run_demo(workdir, show=print_report))


# Every subcommand is registered here, unconditionally: their modules import only click and
# dqfast, so a broken one fails loudly instead of vanishing from --help; optional extras (torch,
# modelopt, ray) are imported when a command runs, and a missing one is a one-line error (main).
main.add_command(ptq)
main.add_command(batch)


def _help_everywhere(cmd: click.Command) -> None:
    # On each command too, not only the root's context: click caches a command's help option from
    # the first context it sees, which is not the root's when a command is run on its own.
    cmd.context_settings.setdefault("help_option_names", ["-h", "--help"])
    for sub in getattr(cmd, "commands", {}).values():
        _help_everywhere(sub)


_help_everywhere(main)

if __name__ == "__main__":
    main()
