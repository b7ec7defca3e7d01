"""Batch conversion jobs: a manifest of builds, run in parallel, resumable, idempotent.

A manifest (TOML, or YAML when PyYAML is installed) lists jobs; each names a builder from
:data:`BUILDERS` (looked up by name, so new builders plug in), its input paths, its output and its
options, with shared ``[defaults]``. Everything is validated before anything runs.

Resumability rests on two facts:

* the Rust writer stages every output in ``.<name>.dqfast-tmp-<pid>-<nanos>`` beside it and
  renames it into place only once complete (stale staging directories of dead processes are
  removed by the next build of that output), so an output path holds a complete build or nothing;
* a *job record* — a sidecar ``.<name>.dqfast-job.json`` beside the output, written atomically
  (temporary file, fsync, rename) — says which inputs and options produced it. It is written as
  ``running`` before the build starts (after any stale output was removed) and as ``done`` only
  after the builder returned, i.e. after the rename, with the checksum of the committed files.

So a record can never claim ``done`` for an incomplete output, and on re-run a job is skipped only
when its ``done`` record matches the current inputs, options and the files on disk. A ``running``
record next to an existing output means the process died between the rename and the final record:
the output was committed by that run (no output existed when it started), so it is adopted.

Executors: ``local`` (default; one subprocess per job, scheduled within core and memory limits)
and ``ray`` (one Ray task per job with ``num_cpus``/``memory`` resources; outputs on shared
storage). Both run :func:`run_job`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dqfast import _core
from dqfast._files import check_regular, open_regular, read_regular
from dqfast.builders import BUILDERS, Builder, register_builder
from dqfast.errors import DqfastError, ManifestError, OutputExistsError, PlanError
from dqfast.plan import ProgressFn

__all__ = [
    "Builder",
    "BUILDERS",
    "register_builder",
    "ManifestError",
    "JobSpec",
    "JobResult",
    "BatchSummary",
    "load_manifest",
    "parse_manifest",
    "run_job",
    "run_batch",
    "check_plans",
    "job_state",
    "input_identity",
    "output_checksum",
    "record_path",
]

RECORD_FORMAT = "dqfast-job/1"
RECORD_SUFFIX = ".dqfast-job.json"
STAGING_TAG = ".dqfast-tmp-"
# Python + numpy + the extension, before any tensor is touched.
BASE_RSS = 256 << 20
# The engine keeps about three 16 MiB batches in flight and a 16 MiB direct-write staging buffer.
ENGINE_BUFFERS = 80 << 20
# Budget of the engine's direct-read buffers (dqfast-core `Plan::read_buffer_bytes` default).
READ_BUFFERS = 512 << 20
# Small non-safetensors inputs (config.json, index json) are hashed whole even in stat mode.
SMALL_FILE = 1 << 20

IdentityMode = Literal["stat", "content"]


# ---- builders -------------------------------------------------------------------------------


#: Keywords the runner owns: never accepted from a manifest.
RUNNER_KEYWORDS = frozenset({"output_dir", "overwrite", "dry_run", "threads"})

# Builders come from the one registry (dqfast.builders): every builder the CLI and
# ``dqfast.components`` know (fp8, nvfp4, mixed, mxfp8) can be named in a manifest; a manifest's
# ``inputs`` are the builder's path keywords, every other keyword of the function is an option.


# ---- manifest -------------------------------------------------------------------------------

TOP_KEYS = {"batch", "defaults", "jobs"}
BATCH_KEYS = {"max_parallel", "cores", "memory_limit", "log_dir", "summary", "identity"}
JOB_KEYS = {"name", "builder", "inputs", "options", "output", "threads", "memory", "identity"}
DEFAULT_KEYS = JOB_KEYS - {"name", "output"}


@dataclass
class JobSpec:
    name: str
    builder: str
    output: str
    inputs: dict[str, str]
    options: dict[str, Any]
    threads: int = 1
    #: Bytes reserved for the job; 0 = estimate from the inputs' largest tensor.
    memory: int = 0
    identity: IdentityMode = "stat"
    log: str = ""
    #: The builder's ``module:function`` (carried so worker processes need no registry).
    target: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BatchSettings:
    max_parallel: int = 0
    cores: int = 0
    memory_limit: int = 0
    log_dir: str = ""
    summary: str = ""


@dataclass
class Manifest:
    path: Path
    settings: BatchSettings
    jobs: list[JobSpec]


#: A manifest is a few KB; a larger file is refused before it is read.
MAX_MANIFEST_BYTES = 16 << 20


def _yaml_loader() -> Any:
    """PyYAML's safe loader without aliases: ``*ref`` lets a 1 KB file expand to billions of
    nodes (or refer to itself); a manifest never needs one."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"alias '*{ev.anchor}' (YAML anchors/aliases are not allowed in a manifest)", ev.start_mark
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_manifest(path: str | os.PathLike[str], *, check_paths: bool = True) -> Manifest:
    """Read and validate a manifest file (``.toml``, or ``.yaml``/``.yml`` with PyYAML)."""
    p = Path(path)
    try:
        text = read_regular(p, "manifest", DqfastError, limit=MAX_MANIFEST_BYTES)
    except DqfastError as e:
        raise ManifestError([str(e).removeprefix(f"{p}: ")], p) from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ManifestError(["YAML manifests need PyYAML (pip install pyyaml), or use TOML"], p) from None
        try:
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            raise ManifestError([f"not valid YAML: {' '.join(str(e).split())}"], p) from None
        except RecursionError:
            raise ManifestError(["YAML nested too deeply"], p) from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ManifestError(["TOML manifests on Python 3.10 need tomli (pip install tomli)"], p) from None
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ManifestError([f"not valid TOML: {e}"], p) from None
        except RecursionError:
            raise ManifestError(["TOML nested too deeply"], p) from None
    return parse_manifest(data, base_dir=p.resolve().parent, path=p, check_paths=check_paths)


def parse_size(v: Any, what: str, problems: list[str]) -> int:
    from dqfast.errors import PlanError
    from dqfast.plan import parse_size as _ps

    if v in (None, "auto", 0) and not isinstance(v, bool):
        return 0
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        problems.append(f"{what}: must be a size (e.g. 8GB, 512MiB, or bytes), not {_type_name(v)}")
        return 0
    try:
        return _ps(v)
    except PlanError:
        problems.append(f"{what}: '{v}' is not a size (e.g. 8GB, 512MiB, or bytes)")
        return 0


def _type_name(v: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing", int: "an integer"}.get(
        type(v), type(v).__name__
    )


def _str_setting(raw: dict[str, Any], key: str, what: str, problems: list[str]) -> str | None:
    v = raw.get(key)
    if v is None or isinstance(v, str):
        return v
    problems.append(f"{what} {key} must be a string, not {_type_name(v)} {v!r}"[:200])
    return None


def _signature_keywords(builder: Builder) -> set[str] | str:
    try:
        fn = builder.load()
    except (ImportError, AttributeError) as e:
        return f"builder {builder.target} cannot be imported: {e}"
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return _AnyKeyword()
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"output_dir"}


def _option_hints(builder: Builder) -> dict[str, Any]:
    """The builder's parameter annotations (empty when they cannot be resolved: then the builder
    alone checks its options)."""
    import typing

    try:
        return typing.get_type_hints(builder.load())
    except Exception:  # noqa: BLE001 - an unresolvable annotation only loses the early check
        return {}


def _accepts(hint: Any, v: Any) -> bool:
    """Whether a manifest value (TOML/YAML: bool, int, float, str, list, table) fits an annotation;
    unknown annotations accept anything (the builder has the last word)."""
    import collections.abc as cabc
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, v) for a in args)
    if origin is typing.Literal:
        return any(v == a and type(v) is type(a) for a in args)
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is str or hint is os.PathLike or origin is os.PathLike:
        return isinstance(v, str)
    if origin in (cabc.Mapping, dict):
        return isinstance(v, dict)
    if origin in (cabc.Iterable, cabc.Sequence, list, tuple):
        if not isinstance(v, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(v) == len(args) and all(_accepts(a, x) for a, x in zip(args, v))
        return not args or all(_accepts(args[0], x) for x in v)
    return True


def _describe(hint: Any) -> str:
    import collections.abc as cabc
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin in (cabc.Iterable, cabc.Sequence, list, tuple):
        return "a list"
    if origin in (cabc.Mapping, dict):
        return "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint).replace("typing.", ""))


class _AnyKeyword(set):  # type: ignore[type-arg]
    """The keywords of a builder taking ``**kwargs``: any name."""

    def __contains__(self, item: object) -> bool:
        return True


def _int_setting(raw: dict[str, Any], key: str, problems: list[str]) -> int:
    v = raw.get(key, 0)
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        problems.append(f"[batch] {key} must be a non-negative integer, not {v!r}")
        return 0
    return v


def parse_manifest(data: Any, *, base_dir: Path, path: Path | None = None, check_paths: bool = True) -> Manifest:
    """Validate a parsed manifest; every problem is collected, then one :class:`ManifestError`."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ManifestError([f"top level must be a table/mapping, not {_type_name(data)}"], path)
    for k in sorted(set(data) - TOP_KEYS, key=str):
        problems.append(f"unknown top-level key '{k}' (known: {', '.join(sorted(TOP_KEYS))})")
    raw_batch = data.get("batch") or {}
    defaults = data.get("defaults") or {}
    jobs_raw = data.get("jobs")
    if not isinstance(raw_batch, dict):
        problems.append(f"[batch] must be a table, not {_type_name(raw_batch)}")
        raw_batch = {}
    if not isinstance(defaults, dict):
        problems.append(f"[defaults] must be a table, not {_type_name(defaults)}")
        defaults = {}
    for k in sorted(set(raw_batch) - BATCH_KEYS, key=str):
        problems.append(f"[batch]: unknown key '{k}' (known: {', '.join(sorted(BATCH_KEYS))})")
    for k in sorted(set(defaults) - DEFAULT_KEYS, key=str):
        problems.append(f"[defaults]: unknown key '{k}' (known: {', '.join(sorted(DEFAULT_KEYS))})")
    if jobs_raw is not None and not isinstance(jobs_raw, list):
        problems.append(f"'jobs' must be a list of tables, not {_type_name(jobs_raw)}")
        jobs_raw = []
    elif not jobs_raw:
        problems.append("no jobs: add [[jobs]] entries")
        jobs_raw = []

    def resolve(p: Any) -> str:
        q = Path(os.path.expanduser(str(p)))
        return str(q if q.is_absolute() else (base_dir / q))

    settings = BatchSettings(
        max_parallel=_int_setting(raw_batch, "max_parallel", problems),
        cores=_int_setting(raw_batch, "cores", problems),
        memory_limit=parse_size(raw_batch.get("memory_limit"), "[batch] memory_limit", problems),
        log_dir=resolve(d) if (d := _str_setting(raw_batch, "log_dir", "[batch]", problems)) else "",
        summary=resolve(sm) if (sm := _str_setting(raw_batch, "summary", "[batch]", problems)) else "",
    )
    default_identity = raw_batch.get("identity", "stat")
    if default_identity not in ("stat", "content"):
        problems.append(f"[batch] identity must be 'stat' or 'content', not {default_identity!r}"[:200])
        default_identity = "stat"

    jobs: list[JobSpec] = []
    unnamed: dict[int, str] = {}  # job index -> resolved output, for jobs without a 'name'
    keywords_cache: dict[str, set[str] | str] = {}
    hints: dict[str, dict[str, Any]] = {}
    for i, j in enumerate(jobs_raw):
        label = f"jobs[{i}]"
        if not isinstance(j, dict):
            problems.append(f"{label}: must be a table, not {_type_name(j)}")
            continue
        if isinstance(j.get("name"), str):
            label = f"job '{j['name']}'"
        elif j.get("name") is not None:
            problems.append(f"{label}: name must be a string, not {_type_name(j['name'])}")
        for k in sorted(set(j) - JOB_KEYS, key=str):
            problems.append(f"{label}: unknown key '{k}' (known: {', '.join(sorted(JOB_KEYS))})")
        merged: dict[str, Any] = {**defaults, **j}
        for table in ("inputs", "options"):
            dflt, own = defaults.get(table) or {}, j.get(table) or {}
            if not isinstance(dflt, dict) or not isinstance(own, dict):
                problems.append(f"{label}: '{table}' must be a table, not {_type_name(own if isinstance(dflt, dict) else dflt)}")
                dflt, own = {}, {}
            merged[table] = {**dflt, **own}
        builder_name = merged.get("builder")
        output = merged.get("output")
        if output is not None and (not isinstance(output, str) or "\0" in output):
            problems.append(f"{label}: 'output' must be a path string, not {_type_name(output)}")
            output = ""
        elif not output:
            problems.append(f"{label}: missing 'output'")
            output = ""
        name = j.get("name") if isinstance(j.get("name"), str) and j.get("name") else (Path(output).name if output else f"job{i}")
        if not (isinstance(j.get("name"), str) and j.get("name")) and output:
            unnamed[len(jobs)] = resolve(output)
        if not isinstance(builder_name, str):
            problems.append(f"{label}: 'builder' must be a builder name string, not {_type_name(builder_name)}")
            builder = None
        elif builder_name not in BUILDERS:
            problems.append(f"{label}: unknown builder '{builder_name}' (known: {', '.join(sorted(BUILDERS))})")
            builder = None
        else:
            builder = BUILDERS[builder_name]
        inputs: dict[str, str] = {}
        options: dict[str, Any] = dict(merged["options"])
        if builder is not None:
            assert isinstance(builder_name, str)  # a builder was found under this name
            if builder_name not in keywords_cache:
                keywords_cache[builder_name] = _signature_keywords(builder)
            kws = keywords_cache[builder_name]
            if isinstance(kws, str):
                problems.append(f"{label}: {kws}")
                kws = set(builder.inputs) | set(options)
            for k, v in merged["inputs"].items():
                if not isinstance(k, str) or k not in builder.inputs or k not in kws:
                    problems.append(f"{label}: unknown input '{k}' for builder '{builder_name}' (inputs: {', '.join(builder.inputs)})")
                elif v is None or v == "":
                    continue
                elif not isinstance(v, str) or "\0" in v:
                    problems.append(f"{label}: input '{k}' must be a path string, not {_type_name(v)}")
                else:
                    inputs[k] = resolve(v)
                    if check_paths and not os.path.exists(inputs[k]):
                        problems.append(f"{label}: input '{k}' = {inputs[k]} does not exist")
            for k in options:
                if not isinstance(k, str):
                    problems.append(f"{label}: option name {k!r} is not a string")
                elif k in RUNNER_KEYWORDS:
                    problems.append(f"{label}: option '{k}' is set by the batch runner, not the manifest")
                elif k in builder.inputs:
                    problems.append(f"{label}: '{k}' is an input; put it under [inputs]")
                elif k not in kws:
                    problems.append(f"{label}: unknown option '{k}' for builder '{builder_name}'")
                elif k in hints.setdefault(builder_name, _option_hints(builder)) and not _accepts(hints[builder_name][k], options[k]):
                    problems.append(
                        f"{label}: option '{k}' must be {_describe(hints[builder_name][k])}, not {_type_name(options[k])} {options[k]!r}"[
                            :300
                        ]
                    )
            if not inputs:
                problems.append(f"{label}: no inputs given")
        threads = merged.get("threads", 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            problems.append(f"{label}: threads must be an integer >= 1, not {threads!r}")
            threads = 1
        identity = merged.get("identity", default_identity)
        if identity not in ("stat", "content"):
            problems.append(f"{label}: identity must be 'stat' or 'content', not {identity!r}"[:200])
            identity = "stat"
        memory = parse_size(merged.get("memory"), f"{label}: memory", problems)
        jobs.append(
            JobSpec(
                name=str(name),
                builder=str(builder_name),
                output=resolve(output) if output else "",
                inputs=inputs,
                options=options,
                threads=threads,
                memory=memory,
                identity=identity,
                target=builder.target if builder else "",
            )
        )

    for idx, nm in _default_names(unnamed, {jb.name for k, jb in enumerate(jobs) if k not in unnamed}).items():
        jobs[idx].name = nm
    _check_cross_job(jobs, problems, path, [x for x in (settings.log_dir, settings.summary) if x])
    if problems:
        raise ManifestError(problems, path)
    return Manifest(path=path or base_dir / "manifest", settings=settings, jobs=jobs)


def _default_names(outputs: dict[int, str], taken: set[str]) -> dict[int, str]:
    """Default job names: the shortest suffix of each output path that no other unnamed job's
    output ends with and no explicit name uses (``a/transformer`` and ``b/transformer`` become
    ``a/transformer`` and ``b/transformer``; a lone ``x/transformer`` stays ``transformer``)."""
    parts = {i: Path(o).parts for i, o in outputs.items()}
    names: dict[int, str] = {}
    for i, ps in parts.items():
        others = [q for k, q in parts.items() if k != i and q != ps]
        for n in range(1, len(ps) + 1):
            cand = ps[-n:]
            if "/".join(cand) not in taken and all(q[-n:] != cand for q in others):
                break
        names[i] = "/".join(cand).lstrip("/") or "/"
    return names


def _real(p: str) -> Path:
    # Resolve symlinks of the existing part so that two spellings of one directory compare equal
    # (wording only: whether two paths overlap is decided by the writer's rule).
    return Path(os.path.realpath(p))


def _check_cross_job(jobs: list[JobSpec], problems: list[str], manifest: Path | None = None, written: Iterable[str] = ()) -> None:
    """Every job output against every other output, every job's inputs, the manifest itself and
    what the batch writes besides (``written``: log dir, summary) — with the writer's rule
    (dqfast-core ``InputSet``), so ``$PWD/x``, ``x``, ``sub/../x``, a symlink or a hard link to
    ``x`` all count as ``x``. Inputs are resolved once; each output is one call."""
    names: dict[str, int] = {}
    for j in jobs:
        if j.name in names:
            problems.append(f"two jobs are named '{j.name}'")
        names[j.name] = 1
    outputs = [(j.output, j.name) for j in jobs if j.output]
    # Outputs against outputs: every output overlaps itself (index i), so only others count.
    out_guard = _core.GuardedInputs([o for o, _ in outputs])
    for i, (out, name) in enumerate(outputs):
        for k, _ in out_guard.overlaps(out, "output"):
            if k >= i:
                continue
            other_out, other = outputs[k]
            if _real(out) == _real(other_out):
                problems.append(f"jobs '{other}' and '{name}' both write {out}")
            else:
                problems.append(f"outputs of '{other}' and '{name}' are nested ({other_out} / {out})")
    # Outputs against inputs; the problem names the job and the keyword that reads the input.
    readers = [(v, j.name, k) for j in jobs for k, v in j.inputs.items()]
    guard = _core.GuardedInputs([v for v, _, _ in readers] + ([str(manifest)] if manifest else []))
    for out, owner in outputs + [(w, "") for w in written]:
        for k, e in guard.overlaps(out, f"job '{owner}' output" if owner else "batch output"):
            if k == len(readers):
                problems.append(f"{e} (the manifest)")
                continue
            v, name, key = readers[k]
            chained = "" if owner == name else " (chained jobs are not supported: run them as two batches)"
            problems.append(f"job '{name}': input '{key}': {e}{chained}")


# ---- identities, records, checksums ---------------------------------------------------------


def record_path(output: str | os.PathLike[str]) -> Path:
    o = Path(output)
    return o.parent / f".{o.name}{RECORD_SUFFIX}"


def _hash_file(p: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit
    with open_regular(p, "input file") as f:
        while left is None or left > 0:
            chunk = f.read(16 << 20 if left is None else min(16 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _safetensors_header(p: Path) -> tuple[bytes, int]:
    """The header bytes (8-byte length + JSON, capped) and the largest tensor it claims (0 when
    the header is unreadable: the build itself reports that with a typed error)."""
    with open_regular(p, "input file") as f:
        head = f.read(8)
        if len(head) < 8:
            return head, 0
        n = int.from_bytes(head, "little")
        body = f.read(min(n, 100 << 20))
    largest = 0
    try:
        for k, v in json.loads(body).items():
            if k != "__metadata__" and isinstance(v, dict):
                b, e = v.get("data_offsets", (0, 0))
                largest = max(largest, int(e) - int(b))
    except (ValueError, TypeError, AttributeError):
        largest = 0
    return head + body, largest


def _input_files(path: Path) -> list[Path]:
    """The files of an input (itself, or every file under it); each must be a regular file
    (a FIFO would block the hashing forever)."""
    if not path.is_dir():
        return [check_regular(path, "input")]
    out: list[Path] = []
    for root, dirs, files in os.walk(path):
        # Staging directories and job records of outputs that live under an input root.
        dirs[:] = sorted(d for d in dirs if STAGING_TAG not in d)
        out.extend(check_regular(Path(root) / f, "input file") for f in sorted(files) if not f.endswith(RECORD_SUFFIX))
    return out


def input_identity(path: str | os.PathLike[str], mode: IdentityMode = "stat") -> tuple[dict[str, Any], int]:
    """Identity of an input (file or directory tree) and the largest tensor it holds.

    ``stat``: per file size + mtime, plus the sha256 of safetensors headers and of small files;
    ``content``: sha256 of every byte.
    """
    root = Path(path)
    files: dict[str, Any] = {}
    largest = 0
    for f in _input_files(root):
        st = f.stat()
        rel = "." if f == root else str(f.relative_to(root))
        ident: dict[str, Any] = {"size": st.st_size}
        if f.suffix == ".safetensors":
            head, big = _safetensors_header(f)
            largest = max(largest, big)
            if mode == "stat":
                ident["header_sha256"] = hashlib.sha256(head).hexdigest()
        if mode == "content":
            ident["sha256"] = _hash_file(f)
        else:
            ident["mtime_ns"] = st.st_mtime_ns
            if f.suffix != ".safetensors" and st.st_size <= SMALL_FILE:
                ident["sha256"] = _hash_file(f)
        files[rel] = ident
    return {"path": str(root), "files": files}, largest


def output_checksum(output: str | os.PathLike[str]) -> tuple[str, dict[str, dict[str, Any]]]:
    """``sha256:<hex>`` over (relative path, size, sha256) of every file, and the per-file list."""
    root = Path(output)
    files: dict[str, dict[str, Any]] = {}
    for f in _input_files(root):
        files[str(f.relative_to(root))] = {"size": f.stat().st_size, "sha256": _hash_file(f)}
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['size']}\0{files[rel]['sha256']}\n".encode())
    return "sha256:" + h.hexdigest(), files


def _canonical(v: Any) -> Any:
    """Options as they will be compared across runs (tuples and paths as JSON would write them)."""
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def fingerprint(job: JobSpec) -> tuple[str, dict[str, Any], int]:
    """sha256 of everything that determines the output, the identity document and the largest
    input tensor."""
    from dqfast._core import __version__

    idents = {}
    largest = 0
    for k in sorted(job.inputs):
        idents[k], big = input_identity(job.inputs[k], job.identity)
        largest = max(largest, big)
    doc = {
        "builder": job.builder,
        "builder_target": job.target,
        "dqfast_version": __version__,
        "identity_mode": job.identity,
        "inputs": idents,
        "options": _canonical(job.options),
    }
    fp = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return fp, doc, largest


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Temporary file + fsync + rename + directory fsync: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_record(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        rec = json.loads(record_path(output).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT else None


def _files_match(output: Path, recorded: dict[str, Any], verify: bool) -> bool:
    """The output holds exactly the recorded files with the recorded sizes (and hashes)."""
    try:
        present = {str(f.relative_to(output)): f for f in _input_files(output)}
    except OSError:
        return False
    if set(present) != set(recorded):
        return False
    for rel, f in present.items():
        try:
            if f.stat().st_size != recorded[rel]["size"]:
                return False
        except OSError:
            return False
        if verify and _hash_file(f) != recorded[rel]["sha256"]:
            return False
    return True


State = Literal["done", "adopt", "build", "foreign"]


def job_state(job: JobSpec, fp: str, *, verify: bool = False) -> State:
    """What a run must do for this job:

    ``done``: a done record matches inputs, options and the files on disk — skip;
    ``adopt``: a running record with this fingerprint next to an existing output — the previous
    run died after the atomic rename, before its final record;
    ``build``: nothing usable (any stale output of ours is replaced);
    ``foreign``: the output exists but no record of ours says how it was made.
    """
    out = Path(job.output)
    rec = read_record(out)
    exists = out.exists()
    if rec is None:
        return "foreign" if exists else "build"
    if rec.get("fingerprint") != fp or not exists:
        return "build"
    if rec.get("state") == "done":
        return "done" if _files_match(out, rec.get("output", {}).get("files", {}), verify) else "build"
    if rec.get("state") == "running":
        return "adopt"
    return "build"


def _clean_stale_staging(output: Path) -> list[str]:
    """Remove staging directories of this output left by dead processes (the Rust writer does
    the same on its next build; doing it here makes a skipped job clean up too). One
    implementation, the writer's, so the naming rule lives in one place."""
    return _core.clean_stale_staging(str(output))


def _remove_stale_output(output: Path) -> None:
    """Move an outdated output of ours aside, then delete it: the output path never holds a
    half-deleted directory. The aside name is a staging name, so a crash here is cleaned up later."""
    aside = Path(_core.staging_path(str(output)) + "-old")
    os.rename(output, aside)
    shutil.rmtree(aside, ignore_errors=True)


# ---- running one job ------------------------------------------------------------------------


@dataclass
class JobResult:
    name: str
    status: Literal["done", "skipped", "adopted", "failed"]
    seconds: float = 0.0
    bytes: int = 0
    peak_rss_bytes: int = 0
    output: str = ""
    output_checksum: str = ""
    error: str = ""
    error_type: str = ""
    log: str = ""
    host: str = ""
    #: Wall-clock start and end (seconds since the epoch).
    started: float = 0.0
    finished: float = 0.0
    #: What the build said beside its output: the choices its target forced ("target any: ...")
    #: and its warnings ("warning: ..."), one line each, as the single-build CLI prints them.
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM, so a reused worker process (Ray) reports this job's peak.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class _Log:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        if not self.path:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


def run_job(job: JobSpec, *, overwrite_foreign: bool = False, verify: bool = False, progress: ProgressFn | None = None) -> JobResult:
    """Run one job to completion (or skip it); never raises for job failures — they are returned.
    ``progress`` is passed to the builder (see :data:`dqfast.plan.ProgressFn`)."""
    t0 = time.monotonic()
    log = _Log(job.log)
    wrote_running = False
    res = JobResult(name=job.name, status="failed", output=job.output, log=job.log, host=socket.gethostname(), started=time.time())
    out = Path(job.output)
    try:
        # Before anything at the output is cleaned or removed (the manifest was checked as a
        # whole when loaded; the file system may have changed since).
        _core.check_output_paths(out, list(job.inputs.values()), f"job '{job.name}' output")
        _reset_peak_rss()
        fp, doc, _ = fingerprint(job)
        _clean_stale_staging(out)
        state = job_state(job, fp, verify=verify)
        log(f"job {job.name}: {job.builder} -> {out} (state: {state}, fingerprint {fp[:16]})")
        rec = read_record(out)
        if state == "done":
            assert rec is not None
            res.status = "skipped"
            res.output_checksum = rec["output"]["checksum"]
            res.bytes = rec.get("bytes_written", 0)
            log("up to date: skipped")
            res.seconds = time.monotonic() - t0
            res.finished = time.time()
            return res
        base_record = {
            "format": RECORD_FORMAT,
            "job": job.name,
            "fingerprint": fp,
            "identity": doc,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        bytes_written = 0
        if state == "adopt":
            log("output committed by an interrupted run: adopting it")
            res.status = "adopted"
        else:
            if state == "foreign" and not overwrite_foreign:
                raise OutputExistsError(f"{out}: output exists but has no dqfast job record; remove it or pass --overwrite", path=str(out))
            if out.exists():
                log("removing outdated output")
                _remove_stale_output(out)
            _write_json_atomic(record_path(out), {**base_record, "state": "running", "started": time.time()})
            wrote_running = True
            fn = Builder(job.target or BUILDERS[job.builder].target, ()).load()
            log(f"building with threads={job.threads} options={json.dumps(_canonical(job.options))}")
            # A plug-in builder without a `progress` keyword simply reports nothing while it runs.
            takes = progress is not None and "progress" in _signature_keywords(Builder(job.target or BUILDERS[job.builder].target, ()))
            extra: dict[str, Any] = {"progress": progress} if takes else {}
            report = fn(out, **job.inputs, **job.options, threads=job.threads, overwrite=False, **extra)
            bytes_written = int(getattr(report, "bytes_written", 0))
            res.notes = [f"target {getattr(report, 'target', None)}: {f}" for f in getattr(report, "target_forced", [])]
            res.notes += [f"warning: {w}" for w in getattr(report, "warnings", [])]
            for note in res.notes:
                log(note)
            res.status = "done"
        checksum, files = output_checksum(out)
        res.seconds = time.monotonic() - t0
        res.peak_rss_bytes = _core.peak_rss_bytes()  # VmHWM, the engine's reader (0 where unknown)
        res.bytes = bytes_written or sum(f["size"] for f in files.values())
        res.output_checksum = checksum
        _write_json_atomic(
            record_path(out),
            {
                **base_record,
                "state": "done",
                "finished": time.time(),
                "seconds": res.seconds,
                "bytes_written": res.bytes,
                "peak_rss_bytes": res.peak_rss_bytes,
                "output": {"checksum": checksum, "files": files},
            },
        )
        log(f"{res.status}: {res.bytes} bytes in {res.seconds:.2f}s, peak RSS {res.peak_rss_bytes}, {checksum}")
    except Exception as e:  # noqa: BLE001 - a job failure is a result, not a crash of the batch
        res.status = "failed"
        res.error = str(e)
        res.error_type = type(e).__name__
        log(f"FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        # A running record without an output says nothing useful; with an output it still
        # proves where that output came from (adopted next time), so it stays.
        if wrote_running and not out.exists():
            try:
                record_path(out).unlink()
            except OSError:
                pass
    res.seconds = time.monotonic() - t0
    res.finished = time.time()
    if not res.peak_rss_bytes:
        res.peak_rss_bytes = _core.peak_rss_bytes()
    return res


def check_plans(manifest: Manifest) -> dict[str, str]:
    """Plan every job without writing anything (the builders' ``dry_run``): job name -> error, for
    the jobs whose inputs or options the builder refuses. Reads headers and calibration files."""
    errors: dict[str, str] = {}
    for job in manifest.jobs:
        fn = Builder(job.target, ()).load()
        params = inspect.signature(fn).parameters
        # build_components takes **builder_kwargs and passes dry_run on to each builder.
        if "dry_run" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        try:
            fn(job.output, **job.inputs, **job.options, dry_run=True, overwrite=True)
        except Exception as e:  # noqa: BLE001 - reported per job
            errors[job.name] = f"{type(e).__name__}: {e}"
    return errors


# ---- scheduling -----------------------------------------------------------------------------


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 8 << 30


def estimate_memory(job: JobSpec) -> int:
    """Peak RSS a job needs: the process, the engine's batch and direct-read buffers, and the pages
    of the largest source tensor where it is read through the map (the engine releases each
    tensor's pages once written; an NVFP4 global scale shared by fused q/k/v reads up to three
    at once)."""
    if job.memory:
        return job.memory
    largest = 0
    for v in job.inputs.values():
        try:
            _, big = input_identity(v, "stat")
        except OSError:
            big = 0
        largest = max(largest, big)
    return BASE_RSS + ENGINE_BUFFERS + READ_BUFFERS + 3 * largest


@dataclass
class BatchSummary:
    manifest: str
    executor: str
    seconds: float
    jobs: list[JobResult] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for j in self.jobs:
            c[j.status] = c.get(j.status, 0) + 1
        return c

    @property
    def ok(self) -> bool:
        return all(j.status != "failed" for j in self.jobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "executor": self.executor,
            "seconds": self.seconds,
            "counts": self.counts,
            "ok": self.ok,
            "jobs": [j.to_dict() for j in self.jobs],
        }


#: ``on_event(kind, job, result)``; kind is "start" or "end" (result set on "end").
#: ``(kind, job, data)``: ``("start", job, None)``, ``("progress", job, (bytes_done, bytes_total))``
#: (local executor, while the builder writes) and ``("end", job, JobResult)``.
EventFn = Callable[[str, JobSpec, Any], None]


def _prepare(manifest: Manifest, cores: int, log_dir: Path) -> list[JobSpec]:
    jobs = []
    for j in manifest.jobs:
        j = dataclasses.replace(j, threads=min(j.threads, cores))
        j.log = str(log_dir / f"{_safe(j.name)}.log")
        jobs.append(j)
    return jobs


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def batch_paths(
    manifest: Manifest, log_dir: str | os.PathLike[str] | None = None, summary_path: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """(log dir, summary file) of a run — arguments over ``[batch]`` settings over defaults beside
    the manifest —, refused (``UnsafeOutputError``) if either would land in or on a job's input."""
    s = manifest.settings
    logs = Path(log_dir or s.log_dir or manifest.path.parent / f"{manifest.path.stem}.logs")
    out = Path(summary_path or s.summary or manifest.path.parent / f"{manifest.path.stem}.summary.json")
    guard = _core.GuardedInputs([v for j in manifest.jobs for v in j.inputs.values()])
    guard.check(logs, "--log-dir")
    guard.check(out, "--summary")
    return logs, out


def run_batch(
    manifest: Manifest,
    *,
    executor: Literal["local", "ray"] = "local",
    address: str | None = None,
    max_parallel: int = 0,
    cores: int = 0,
    memory_limit: int = 0,
    log_dir: str | os.PathLike[str] | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    verify: bool = False,
    on_event: EventFn | None = None,
) -> BatchSummary:
    """Run every job of ``manifest``; write and return the summary. Arguments override the
    manifest's ``[batch]`` settings."""
    s = manifest.settings
    cores = cores or s.cores or os.cpu_count() or 1
    max_parallel = max_parallel or s.max_parallel or len(manifest.jobs)
    memory_limit = memory_limit or s.memory_limit or int(_mem_available() * 0.8)
    logs, out = batch_paths(manifest, log_dir, summary_path)
    jobs = _prepare(manifest, cores, logs)
    t0 = time.monotonic()
    emit = on_event or (lambda *_: None)
    if executor == "local":
        results = _run_local(jobs, cores, max_parallel, memory_limit, overwrite, verify, emit)
    elif executor == "ray":
        results = _run_ray(jobs, address, overwrite, verify, emit)
    else:
        raise PlanError(f"--executor (executor=): unknown executor '{executor}' (local or ray)")
    summary = BatchSummary(manifest=str(manifest.path), executor=executor, seconds=time.monotonic() - t0, jobs=results)
    _write_json_atomic(out, summary.to_dict())
    return summary


def _run_local(
    jobs: list[JobSpec],
    cores: int,
    max_parallel: int,
    memory_limit: int,
    overwrite: bool,
    verify: bool,
    emit: EventFn,
) -> list[JobResult]:
    """One subprocess per job (a crash or kill of one job cannot take the batch down), started in
    manifest order whenever its threads and estimated memory fit beside the running ones."""
    pending = list(range(len(jobs)))
    need = {i: estimate_memory(jobs[i]) for i in pending}
    running: dict[int, tuple[subprocess.Popen[bytes], Path, float]] = {}
    results: dict[int, JobResult] = {}
    last_progress: dict[int, tuple[int, int]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="dqfast-batch-"))
    # Workers import what this process can (a builder registered from a module on sys.path).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        while pending or running:
            used_cores = sum(jobs[i].threads for i in running)
            used_mem = sum(need[i] for i in running)
            for i in list(pending):
                if len(running) >= max_parallel:
                    break
                fits = used_cores + jobs[i].threads <= cores and used_mem + need[i] <= memory_limit
                if running and not fits:
                    continue  # a later, smaller job may fit now
                pending.remove(i)
                spec = workdir / f"{i}.json"
                result = workdir / f"{i}.result.json"
                spec.write_text(json.dumps({"job": jobs[i].to_dict(), "overwrite": overwrite, "verify": verify}))
                Path(jobs[i].log).parent.mkdir(parents=True, exist_ok=True)
                with open(jobs[i].log, "ab") as logf:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "dqfast.batch", str(spec), str(result), str(workdir / f"{i}.progress")],
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=env,
                    )
                running[i] = (proc, result, time.monotonic())
                used_cores += jobs[i].threads
                used_mem += need[i]
                emit("start", jobs[i], None)
            time.sleep(0.05)
            for i, (proc, result, started) in list(running.items()):
                if (p := _read_progress(workdir / f"{i}.progress")) is not None and p != last_progress.get(i):
                    last_progress[i] = p
                    emit("progress", jobs[i], p)
                if proc.poll() is None:
                    continue
                del running[i]
                try:
                    res = JobResult(**json.loads(result.read_text()))
                except (OSError, ValueError, TypeError):
                    res = JobResult(
                        name=jobs[i].name,
                        status="failed",
                        output=jobs[i].output,
                        log=jobs[i].log,
                        seconds=time.monotonic() - started,
                        host=socket.gethostname(),
                        error=f"job process exited with status {proc.returncode} (see {jobs[i].log})",
                        error_type="WorkerDied",
                    )
                results[i] = res
                emit("end", jobs[i], res)
    except BaseException:
        # Interrupted: stop the children; their staging directories are cleaned by the next run.
        for proc, _, _ in running.values():
            proc.kill()
        for proc, _, _ in running.values():
            proc.wait()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [results[i] for i in range(len(jobs))]


def _ray_task(job: dict[str, Any], overwrite: bool, verify: bool) -> dict[str, Any]:
    return run_job(JobSpec(**job), overwrite_foreign=overwrite, verify=verify).to_dict()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        from dqfast.extras import missing_extra

        raise missing_extra("ray", "ray") from None  # needed on this machine and on every node
    return ray


def _run_ray(jobs: list[JobSpec], address: str | None, overwrite: bool, verify: bool, emit: EventFn) -> list[JobResult]:
    """One Ray task per job, asking for ``num_cpus=threads`` and ``memory=<estimate>`` so Ray's
    scheduler packs jobs onto nodes; paths must be on storage every node sees."""
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
        started_here = True
    try:
        remote = ray.remote(_ray_task)
        futures = {}
        for i, j in enumerate(jobs):
            ref = remote.options(num_cpus=j.threads, memory=estimate_memory(j), max_retries=0, name=f"dqfast:{j.name}").remote(
                j.to_dict(), overwrite, verify
            )
            futures[ref] = i
            emit("start", j, None)
        results: dict[int, JobResult] = {}
        left = list(futures)
        while left:
            done, left = ray.wait(left, num_returns=1)
            i = futures[done[0]]
            try:
                res = JobResult(**ray.get(done[0]))
            except Exception as e:  # noqa: BLE001 - worker died, node lost, ...
                res = JobResult(
                    name=jobs[i].name,
                    status="failed",
                    output=jobs[i].output,
                    log=jobs[i].log,
                    error=f"ray task failed: {e}",
                    error_type=type(e).__name__,
                )
            results[i] = res
            emit("end", jobs[i], res)
        return [results[i] for i in range(len(jobs))]
    finally:
        if started_here:
            ray.shutdown()


class _FileProgress:
    """A builder ``progress`` callback of a worker process: the latest ``bytes_done bytes_total``
    replaces a small file the batch process polls (no pipe to fill or deadlock; a killed worker
    leaves at worst a stale figure). At most every ``every`` seconds, and always the last one."""

    def __init__(self, path: Path, every: float = 0.2) -> None:
        self.path, self.every, self._last = path, every, 0.0

    def __call__(self, bytes_done: int, bytes_total: int, tensors_done: int, tensors_total: int, current: str) -> None:
        now = time.monotonic()
        if bytes_done < bytes_total and now - self._last < self.every:
            return
        self._last = now
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{bytes_done} {bytes_total}")
        os.replace(tmp, self.path)


def _read_progress(path: Path) -> tuple[int, int] | None:
    try:
        done, total = path.read_text().split()
        return int(done), int(total)
    except (OSError, ValueError):
        return None


def _worker_main(argv: list[str]) -> int:
    """``python -m dqfast.batch SPEC RESULT [PROGRESS]``: the local executor's per-job process."""
    spec_path, result_path, *progress_path = argv
    spec = json.loads(Path(spec_path).read_text())
    progress = _FileProgress(Path(progress_path[0])) if progress_path else None
    res = run_job(JobSpec(**spec["job"]), overwrite_foreign=spec["overwrite"], verify=spec["verify"], progress=progress)
    _write_json_atomic(Path(result_path), res.to_dict())
    return 0 if res.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
