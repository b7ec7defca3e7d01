"""Build plans: the list of output tensors and how each is made, executed by the Rust engine.

The planners (``dqfast.fp8``, ``dqfast.nvfp4``) decide per module what to write; a
:class:`PlanBuilder` records it; :func:`execute` hands the plan to Rust, which streams it to disk
with the GIL released and moves the finished directory into place atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypedDict

from dqfast import _core
from dqfast.errors import PlanError
from dqfast.formats import format_for_method

__all__ = [
    "PlanBuilder",
    "PlanOp",
    "OPS",
    "SrcRef",
    "EngineRounding",
    "MaxOfAmax",
    "ModuleDecision",
    "BuildReport",
    "ProgressFn",
    "check_quantized",
    "execute",
    "finish",
    "validate",
    "parse_size",
]

#: ``progress(bytes_done, bytes_total, tensors_done, tensors_total, current_tensor)``: called by
#: :func:`execute` about every 0.1 s while the engine runs and once at the end (bytes are output
#: bytes, headers included: the last call has ``bytes_done == bytes_total``). An exception it
#: raises cancels the build (nothing is written).
ProgressFn = Callable[[int, int, int, int, str], Any]

Rounding = Literal["exact", "modelopt"]
# How the engine moves bytes (dqfast-core `IoMode`): "auto" reads source tensors that are not in
# the page cache with O_DIRECT and writes O_DIRECT; "direct" always; "buffered" = mmap + page cache.
IoMode = Literal["auto", "direct", "buffered"]
IO_MODES: tuple[str, ...] = ("auto", "direct", "buffered")

WEIGHT_SUFFIXES = (".weight_scale_2", ".weight_scale", ".input_scale", ".weight", ".bias")


def split_module(tensor: str) -> tuple[str, str]:
    """``a.b.weight_scale`` -> (``a.b``, ``weight_scale``); names without a known suffix are
    their own module with an empty suffix."""
    for s in WEIGHT_SUFFIXES:
        if tensor.endswith(s):
            return tensor[: -len(s)], s[1:]
    return tensor, ""


# ---- typed plan ops ----------------------------------------------------------------------
# One class per op of the Rust engine (dqfast-core `plan::ops`, the `registry!` there): same name,
# same fields, `None` = the engine's default. tests/test_plan_schema.py checks them (and every op
# the builders emit) against `_core.plan_schema()`, the JSON Schema derived from the Rust types, so
# neither side can drift.


class SrcRef(TypedDict):
    """A source tensor: ``source`` is the plan's source index (``PlanBuilder.source``)."""

    source: int
    tensor: str


class AmaxScale(TypedDict):
    """FP8 scales from calibrated maxima (one, or one per output row): amax / 448."""

    kind: Literal["amax"]
    amax: list[float]


class ValuesScale(TypedDict):
    """FP8 scales given directly."""

    kind: Literal["values"]
    values: list[float]


class WeightAmaxScale(TypedDict):
    """FP8 scales from the weight's own max |w|, per tensor or per output row."""

    kind: Literal["weight_amax"]
    per_row: bool


ScaleSpec = AmaxScale | ValuesScale | WeightAmaxScale


class GivenAmax(TypedDict):
    kind: Literal["given"]
    amax: float


class WeightAmax(TypedDict):
    kind: Literal["weight"]


class MaxOfAmax(TypedDict):
    """The max |w| over several tensors (fused q/k/v share one NVFP4 global scale)."""

    kind: Literal["max_of"]
    srcs: list[SrcRef]


NvAmax = GivenAmax | WeightAmax | MaxOfAmax
Saturation = Literal["clamp", "none"]
# The engine's rounding names (the API's "modelopt" is "source_dtype" here: dqfast.fp8._rounding).
EngineRounding = Literal["exact", "source_dtype"]


@dataclass(frozen=True)
class PlanOp:
    """Base of the typed ops: ``OP`` is the engine's op name; :meth:`fields` the JSON fields."""

    OP: ClassVar[str] = ""

    def fields(self) -> dict[str, Any]:
        """The op's JSON fields, ``None`` (the engine's default) left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class _FromSrc(PlanOp):
    """An op of one source tensor and nothing else."""

    src: SrcRef


@dataclass(frozen=True)
class Copy(_FromSrc):
    OP: ClassVar[str] = "copy"


@dataclass(frozen=True)
class Fp8(PlanOp):
    OP: ClassVar[str] = "fp8"
    src: SrcRef
    scale: ScaleSpec
    rounding: EngineRounding | None = None
    saturation: Saturation | None = None


@dataclass(frozen=True)
class ScaleOf(PlanOp):
    OP: ClassVar[str] = "scale_of"
    of: str
    shape: list[int]


@dataclass(frozen=True)
class ScaleFromAmax(PlanOp):
    OP: ClassVar[str] = "scale_from_amax"
    amax: list[float]
    bound: float
    shape: list[int]


@dataclass(frozen=True)
class F32(PlanOp):
    OP: ClassVar[str] = "f32"
    values: list[float]
    shape: list[int]


@dataclass(frozen=True)
class SwapNibbles(_FromSrc):
    OP: ClassVar[str] = "swap_nibbles"


@dataclass(frozen=True)
class RepairNanE4m3(_FromSrc):
    OP: ClassVar[str] = "repair_nan_e4m3"


@dataclass(frozen=True)
class SliceRows(PlanOp):
    OP: ClassVar[str] = "slice_rows"
    src: SrcRef
    start: int
    stop: int


@dataclass(frozen=True)
class ConcatRows(PlanOp):
    OP: ClassVar[str] = "concat_rows"
    srcs: list[SrcRef]


@dataclass(frozen=True)
class RescaleE4m3(PlanOp):
    OP: ClassVar[str] = "rescale_e4m3"
    src: SrcRef
    factor: float
    start: int | None = None
    stop: int | None = None
    repair_nan: bool | None = None


@dataclass(frozen=True)
class _Nvfp4(PlanOp):
    """One of the three NVFP4 outputs of a float weight, sharing one global amax."""

    src: SrcRef
    amax: NvAmax


@dataclass(frozen=True)
class Nvfp4Weight(_Nvfp4):
    OP: ClassVar[str] = "nvfp4_weight"


@dataclass(frozen=True)
class Nvfp4BlockScales(_Nvfp4):
    OP: ClassVar[str] = "nvfp4_block_scales"


@dataclass(frozen=True)
class Nvfp4GlobalScale(_Nvfp4):
    OP: ClassVar[str] = "nvfp4_global_scale"
    shape: list[int]


@dataclass(frozen=True)
class BlockValues(_FromSrc):
    """The values of a float ``[N, K]`` weight in a weight-only block format (``format``: a
    ``_core.BLOCK_FORMATS`` name, e.g. ``mxfp8``)."""

    OP: ClassVar[str] = "block_values"
    format: str


@dataclass(frozen=True)
class BlockScales(_FromSrc):
    """Its scales, one per block along K (``format`` as for :class:`BlockValues`)."""

    OP: ClassVar[str] = "block_scales"
    format: str


#: Every typed op by its engine name.
OPS: dict[str, type[PlanOp]] = {
    c.OP: c
    for c in (
        Copy,
        Fp8,
        ScaleOf,
        ScaleFromAmax,
        F32,
        SwapNibbles,
        RepairNanE4m3,
        SliceRows,
        ConcatRows,
        RescaleE4m3,
        Nvfp4Weight,
        Nvfp4BlockScales,
        Nvfp4GlobalScale,
        BlockValues,
        BlockScales,
    )
}


SIZE_UNITS = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
SIZE_EXAMPLES = "examples: 5GB, 500MiB, 1000000"


def parse_size(s: str | int, what: str = "size") -> int:
    """``5GB`` / ``500MB`` / ``4GiB`` / plain bytes -> a non-negative byte count; anything else
    (``5X``, ``-1``, ``inf``, ``nan``, a float, a bool) is a PlanError naming ``what``."""
    if isinstance(s, int) and not isinstance(s, bool):
        if s < 0:
            raise PlanError(f"{what} {s}: a size cannot be negative")
        return s
    if not isinstance(s, str):
        raise PlanError(f"{what} {s!r}: not a size ({SIZE_EXAMPLES})")
    t = s.strip().upper().replace(" ", "")
    number, mult = t, 1
    for u, m in SIZE_UNITS.items():
        if t.endswith(u):
            number, mult = t[: -len(u)], m
            break
    # Digits and one optional decimal point only: float() would also take inf, nan, 1e3, -5, _.
    if not number or not all(c.isdigit() and c.isascii() for c in number.replace(".", "", 1)):
        raise PlanError(f"{what} '{s}': not a size ({SIZE_EXAMPLES})")
    if "." in number:
        whole, frac = number.split(".")
        return int(whole or "0") * mult + int(frac.ljust(30, "0")[:30] or "0") * mult // 10**30
    return int(number) * mult


@dataclass
class ModuleDecision:
    """What happened to one module and why (shown by ``--dry-run`` and in reports)."""

    module: str
    action: str
    reason: str


@dataclass
class BuildReport:
    output_dir: str | None
    quant_algo: str
    decisions: list[ModuleDecision] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    tensors: list[dict[str, Any]] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    threads: int = 0
    bytes_read_direct: int = 0
    direct_writes: bool = False
    # Seconds per pipeline stage (read, read_stalled, wait_for_read, wait_for_write, write).
    timings: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    #: the serving-engine target the output was checked against (``--target``), None: not checked
    target: str | None = None
    #: choices the target made for options the caller left unset, one line each with the engine rule
    target_forced: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def throughput_gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def check_quantized(report: BuildReport, quantized: int, strict: bool) -> None:
    """A build that quantizes no module writes a copy of its input under a quantized config:
    a warning in the report (the CLI prints it on stderr), an error with ``strict``."""
    if quantized:
        return
    msg = "no module was quantized: the output is a copy of the input (check --model-type, --fallback and the input)"
    if strict:
        raise PlanError(f"{msg}; refused by --strict (strict=True)")
    report.warnings.append(msg)


class PlanBuilder:
    """Accumulates a plan in the JSON form the Rust engine reads (``dqfast-core::plan::Plan``)."""

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        max_shard_bytes: int | None = None,
        threads: int = 0,
        fsync: bool = True,
        io: IoMode = "auto",
        file_prefix: str = "diffusion_pytorch_model",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.threads = threads
        self.fsync = fsync
        if io not in IO_MODES:
            raise PlanError(f"io must be one of {', '.join(IO_MODES)}, not {io!r}")
        self.io = io
        self.file_prefix = file_prefix
        self.sources: list[str] = []
        self.tensors: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []
        self.shard_metadata: dict[str, str] = {}
        # Inputs read while planning that are not sources (export root, backbone.pt, policy
        # file): the engine refuses an output that is, contains or lies inside any of them.
        self.guard_inputs: list[str] = []
        # The output config (set by write_config) and the serving-engine target checked in finish().
        self.src_config: dict[str, Any] | None = None
        self.quant_config: dict[str, Any] | None = None
        self.target: str | None = None
        self.fit_target = False
        # An index json even for one shard: SGLang's builder tools always write one (issue #13).
        self.always_index = True

    def write_config(self, src_cfg: dict[str, Any], quant_cfg: dict[str, Any]) -> None:
        """config.json (the source's, with ``quantization_config``) and the shard metadata; a
        second call replaces the first (the target pass rewrites ``ignore``)."""
        self.src_config, self.quant_config = src_cfg, quant_cfg
        out_cfg = dict(src_cfg)
        out_cfg["quantization_config"] = quant_cfg
        self.files = [f for f in self.files if f["name"] != "config.json"]
        # allow_nan=False: the output config is strict JSON, whatever slipped through.
        self.text_file("config.json", json.dumps(out_cfg, indent=2, sort_keys=True, allow_nan=False) + "\n")
        qjson = json.dumps(quant_cfg, sort_keys=True, allow_nan=False)
        self.shard_metadata = {
            "format": "pt",
            "_class_name": str(src_cfg.get("_class_name", "")),
            "config": json.dumps(out_cfg, sort_keys=True, allow_nan=False),
            "quantization_config": qjson,
            "_quantization_metadata": qjson,
            "dqfast_version": _core.__version__,
        }

    def guard(self, *paths: str | os.PathLike[str] | None) -> None:
        """Protect these inputs too (``None`` entries are skipped)."""
        for p in paths:
            if p is not None and str(p) not in self.guard_inputs:
                self.guard_inputs.append(str(p))

    def source(self, path: str | os.PathLike[str]) -> int:
        p = str(path)
        if p not in self.sources:
            self.sources.append(p)
        return self.sources.index(p)

    def add(self, name: str, op: PlanOp) -> None:
        """Output tensor ``name`` made by ``op`` (a typed op: :data:`OPS`)."""
        if not isinstance(op, PlanOp):
            raise TypeError(f"'{name}': a plan op must be one of dqfast.plan.OPS, not {op!r}")
        self.tensors.append({"name": name, "op": op.OP, **op.fields()})

    @staticmethod
    def ref(source: int, tensor: str) -> SrcRef:
        return {"source": source, "tensor": tensor}

    def copy(self, name: str, source: int, tensor: str | None = None) -> None:
        """``name`` copied from tensor ``tensor`` (default: the same name) of source ``source``."""
        self.add(name, Copy(self.ref(source, tensor or name)))

    def text_file(self, name: str, text: str) -> None:
        self.files.append({"name": name, "text": text})

    def copy_file(self, name: str, path: str | os.PathLike[str]) -> None:
        self.files.append({"name": name, "copy_from": str(path)})

    def to_json(self) -> str:
        return json.dumps(
            {
                "sources": self.sources,
                "output_dir": str(self.output_dir),
                "overwrite": self.overwrite,
                "max_shard_bytes": self.max_shard_bytes,
                "file_prefix": self.file_prefix,
                "shard_metadata": self.shard_metadata,
                "files": self.files,
                "tensors": self.tensors,
                "threads": self.threads,
                "fsync": self.fsync,
                "io": self.io,
                "guard_inputs": self.guard_inputs,
                "always_index": self.always_index,
            }
        )


def new_plan(
    output_dir: str | os.PathLike[str],
    *,
    overwrite: bool,
    dry_run: bool = False,
    max_shard_size: str | int | None = None,
    threads: int = 0,
    fsync: bool = True,
    io: IoMode = "auto",
) -> PlanBuilder:
    """A plan for ``output_dir``, refused up front (before any reading) when the output exists
    and overwriting was not asked for. Every builder starts here.

    ``max_shard_size`` ``None`` (the default) keeps the sharding of the plan's first source, the
    checkpoint being converted: same file names, each tensor in the file its source tensor was in,
    scales beside their weight, the index named like the source's (SGLang's builders do the same).
    A size re-shards greedily into ``diffusion_pytorch_model-0000i-of-0000n.safetensors``."""
    out = Path(output_dir)
    if out.exists() and not overwrite and not dry_run:
        from dqfast.errors import OutputExistsError

        raise OutputExistsError(f"{out}: output already exists (pass --overwrite / overwrite=True to replace it)", path=str(out))
    return PlanBuilder(
        out,
        overwrite=overwrite,
        max_shard_bytes=None if max_shard_size is None else parse_size(max_shard_size, "max_shard_size (--max-shard-size)"),
        threads=threads,
        fsync=fsync,
        io=io,
    )


def copy_sidecar_files(plan: PlanBuilder, src_dir: Path) -> None:
    """Carry over a component directory's non-tensor files (README, generation config, ...)
    except config.json, which every builder writes itself."""
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".index.json")):
            plan.copy_file(f.name, f)


def validate(plan: PlanBuilder) -> None:
    """Every check the engine makes before writing (sources, tensors, shapes, dtypes, scales,
    output rules, extra files), in Rust, without writing: a dry run can never say OK for a plan
    the engine would reject. Data checks (NaN in weights, NaN e4m3 bytes) need the whole data and
    are made while building."""
    _core.validate_plan(plan.to_json())


def finish(plan: PlanBuilder, report: BuildReport, *, dry_run: bool, progress: ProgressFn | None = None) -> BuildReport:
    """The end of every builder: execute the plan, or for a dry run validate it in Rust and
    return the report without writing. A dry run over an existing output without overwrite is
    still a useful preview: the plan is validated as if replacing it, and a warning says so."""
    report.dry_run = dry_run
    method = None if plan.quant_config is None else plan.quant_config.get("quant_method")
    if method == "modelopt" or (isinstance(method, str) and format_for_method(method) is not None):
        # ModelOpt and weight-only (MXFP8) configs: the targets' rules are about them.
        # Late import: dqfast.check reads checkpoints (reader) and presets, which import plan.
        from dqfast.check import apply_target

        # An unsafe output path first: it is the more basic error (the engine checks it again).
        _core.check_output_paths(str(plan.output_dir), [*plan.sources, *plan.guard_inputs], "--output-dir")
        apply_target(plan, report)
    if not dry_run:
        return execute(plan, report, progress=progress)
    exists = plan.output_dir.exists() and not plan.overwrite
    if exists:
        report.warnings.append(f"{plan.output_dir}: output exists; the build needs overwrite (--overwrite) to replace it")
    saved, plan.overwrite = plan.overwrite, plan.overwrite or exists
    try:
        validate(plan)
    finally:
        plan.overwrite = saved
    report.output_dir = None
    return report


def execute(plan: PlanBuilder, report: BuildReport, progress: ProgressFn | None = None) -> BuildReport:
    """Run the plan in Rust and fill ``report`` with what was written. Ctrl-C (KeyboardInterrupt)
    stops the engine within a batch: the staging directory is removed, any previous output is
    left as it was, and the KeyboardInterrupt propagates."""
    out = json.loads(_core.execute_plan(plan.to_json(), progress))
    report.output_dir = out["output_dir"]
    report.shards = out["shards"]
    report.tensors = out["tensors"]
    report.bytes_read = out["bytes_read"]
    report.bytes_written = out["bytes_written"]
    report.seconds = out["seconds"]
    report.peak_rss_bytes = out["peak_rss_bytes"]
    report.threads = out["threads"]
    report.bytes_read_direct = out["bytes_read_direct"]
    report.direct_writes = out["direct_writes"]
    report.timings = out["timings"]
    return report
