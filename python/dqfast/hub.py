"""Inputs named by Hugging Face hub id, resolved from the local hub cache (never downloaded).

``black-forest-labs/FLUX.1-dev`` (when no local path of that name exists) or
``hf://black-forest-labs/FLUX.1-dev[@revision][/subfolder]`` becomes the cached snapshot
directory, through ``huggingface_hub.snapshot_download(..., local_files_only=True)``: the cache
layout (``models--org--name/snapshots/<commit>/`` symlinks into ``blobs/``, ``refs/<branch>``) and
its location (``HF_HUB_CACHE`` / ``HF_HOME``) are the hub's. A repo or revision that is not cached
is a :class:`HubCacheError` saying how to fetch it. :func:`resolve_input` is the one resolver every
builder input goes through (``quant_config.find_component_dir``).

Diffusers variants (``diffusion_pytorch_model.fp16.safetensors``, sharded
``diffusion_pytorch_model.fp16-00001-of-00002.safetensors`` with
``diffusion_pytorch_model.safetensors.index.fp16.json``): without a variant the main weights are read
(as diffusers does); ``--variant fp16`` (:func:`input_variant` in Python) reads the variant's instead.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import click

from dqfast.errors import CheckpointError, HubCacheError, PlanError
from dqfast.extras import require_extra

__all__ = ["HUB_PREFIX", "HubCacheError", "hub_spec", "parse_hub_spec", "resolve_input", "InputPath", "input_variant", "variant_path"]

HUB_PREFIX = "hf://"
# org/name as the hub allows them (letters, digits, '-', '_', '.'), exactly one slash.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None] | None:
    """``(repo_id, revision, subfolder)`` of ``hf://org/name[@rev][/sub]`` or of a bare
    ``org/name`` that is not an existing local path; ``None`` for a local path."""
    # pathlib turns "hf://x" into "hf:/x": builders that wrap inputs in Path() still pass hub ids.
    if spec.startswith(HUB_PREFIX) or spec.startswith("hf:/"):
        rest = spec[len("hf:/") :].strip("/")
        parts = rest.split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise PlanError(f"'{spec}': a hub input is hf://<org>/<name>[@revision][/subfolder]")
        name, _, rev = parts[1].partition("@")
        repo = f"{parts[0]}/{name}"
        if not _REPO_ID.match(repo):
            raise PlanError(f"'{spec}': '{repo}' is not a hub repo id")
        return repo, rev or None, "/".join(parts[2:]) or None
    if _REPO_ID.match(spec) and not Path(spec).exists():
        return spec, None, None
    return None


def hub_spec(repo_id: str, revision: str | None = None, subfolder: str | None = None) -> str:
    """The ``hf://`` spelling of a hub input."""
    return f"{HUB_PREFIX}{repo_id}{'@' + revision if revision else ''}{'/' + subfolder.strip('/') if subfolder else ''}"


def _cache_dir() -> str | None:
    # Read at call time (huggingface_hub reads its constants at import).
    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)


def resolve_input(path: str | os.PathLike[str], *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """A local directory or file for ``path``: local paths as they are (``subfolder`` appended),
    hub ids from the local hub cache."""
    s = os.fspath(path)
    parsed = parse_hub_spec(s)
    if parsed is None:
        if revision:
            raise PlanError(f"--revision applies to hub ids, and '{s}' is a local path")
        return Path(s) / subfolder if subfolder else Path(s)
    repo, rev, sub = parsed
    rev = revision or rev
    sub = "/".join(x.strip("/") for x in (sub, subfolder) if x) or None
    require_extra("hub")
    from huggingface_hub import snapshot_download

    cache = _cache_dir()
    shown = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
    try:
        root = Path(snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, a bad repo id or revision (names vary by version)
        hint = f"huggingface-cli download {repo}" + (f" --revision {rev}" if rev else "") + (f" --include '{sub}/*'" if sub else "")
        raise HubCacheError(
            f"{repo} (revision {rev or 'main'}) is not in {shown}; dqfast reads the cache and never downloads: fetch it first ({hint})"
        ) from e
    p = root / sub if sub else root
    if not p.exists():
        raise HubCacheError(f"{repo} (revision {rev or 'main'}): the cached snapshot {root} has no '{sub}'")
    return p


_VARIANT: ContextVar[str | None] = ContextVar("dqfast_input_variant", default=None)
# `<name>.<variant>.safetensors` or a shard `<name>.<variant>-00001-of-00002.safetensors`.
_VARIANT_FILE = re.compile(r"^[^.]+\.([\w-]+?)(?:-\d+-of-\d+)?\.safetensors$")


@contextlib.contextmanager
def input_variant(variant: str | None) -> Iterator[None]:
    """Inside the block, checkpoint directories are read through their diffusers ``variant``
    weights (``fp16``, ``bf16``, ...); ``None`` reads the main weights."""
    if variant is not None and not re.fullmatch(r"[\w-]+", variant):
        raise PlanError(f"--variant '{variant}' is not a variant name (letters, digits, '_', '-')")
    token = _VARIANT.set(variant)
    try:
        yield
    finally:
        _VARIANT.reset(token)


def variant_path(path: Path, variant: str | None = None) -> Path:
    """What to open for a checkpoint directory under the current (or given) variant: the directory
    itself, or the variant's index json or single file in it. A directory without any variant
    files (a ModelOpt export) is read as it is."""
    v = variant if variant is not None else _VARIANT.get()
    if v is None or not path.is_dir():
        return path
    index = sorted(path.glob(f"*.safetensors.index.{v}.json")) + sorted(path.glob(f"*.{v}.safetensors.index.json"))
    files = sorted(p for p in path.glob("*.safetensors") if (m := _VARIANT_FILE.match(p.name)) and m.group(1) == v)
    if len(index) > 1:
        raise CheckpointError(f"{path}: several '{v}' index files: {[p.name for p in index]}")
    if index:
        return index[0]
    if len(files) == 1:
        return files[0]
    if files:
        raise CheckpointError(f"{path}: {len(files)} '{v}' variant files but no '{v}' index json")
    found = sorted({m.group(1) for p in path.glob("*.safetensors") if (m := _VARIANT_FILE.match(p.name))})
    if not found:
        return path
    raise CheckpointError(f"{path}: no '{v}' variant (--variant); variants here: {', '.join(found)}")


class InputPath(click.ParamType):
    """A CLI input: an existing local path, or a hub id (``org/name``, ``hf://...``) resolved with
    the command's ``--revision`` / ``--subfolder``."""

    name = "PATH|HUB_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Path):
            return value
        s = str(value)
        try:
            hub = parse_hub_spec(s)
        except PlanError as e:
            self.fail(str(e), param, ctx)
        if hub is None:
            if not Path(s).exists():
                self.fail(f"'{s}' does not exist (and is not a hub id: org/name or hf://org/name)", param, ctx)
            return Path(s)
        opts = (ctx.meta.get("dqfast.hub") if ctx else None) or {}
        repo, rev, sub = hub
        return hub_spec(repo, opts.get("revision") or rev, "/".join(x for x in (sub, opts.get("subfolder")) if x) or None)


def hub_options(f: Any) -> Any:
    """``--revision`` and ``--subfolder`` for commands with hub inputs (eager, so the inputs see
    them) and ``--variant`` (the diffusers weights variant read from every input)."""

    def keep(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        ctx.meta.setdefault("dqfast.hub", {})[param.name] = value
        return value

    def variant(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            cm = input_variant(value)
            try:
                cm.__enter__()
            except PlanError as e:
                raise click.BadParameter(str(e), ctx, param) from None
            ctx.call_on_close(lambda: cm.__exit__(None, None, None))
        return value

    for name, text in (
        ("--subfolder", "folder inside the repo (e.g. transformer)"),
        ("--revision", "branch, tag or commit (default main)"),
    ):
        f = click.option(name, default=None, is_eager=True, expose_value=False, callback=keep, help=f"Hub inputs: {text}.")(f)
    return click.option(
        "--variant",
        default=None,
        expose_value=False,
        callback=variant,
        help="Read the inputs' diffusers variant weights (*.fp16.safetensors, ...) instead of the main ones.",
    )(f)
