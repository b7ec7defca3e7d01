"""Build every transformer component of a pipeline (e.g. Wan2.2 A14B: ``transformer`` and
``transformer_2``) with one call: each goes to ``<out>/<component>`` with its own report.

Path arguments may contain ``{component}`` (e.g. a per-component ``backbone.pt``); directory
arguments that are pipeline roots are resolved per component by the builders themselves. A failure
removes the component outputs this call created, so a pipeline is built whole or not at all.

A root with ``model_index.json`` is a whole diffusers pipeline: after the transformers are built,
its other entries (``model_index.json``, VAE, text encoders, tokenizers, scheduler) are
hard-linked (copied across file systems) into the output, so the output is a pipeline a serving
engine can load; ``transformers_only=True`` opts out.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqfast import _core
from dqfast import builders as _builders
from dqfast.errors import OutputExistsError, PlanError
from dqfast.plan import BuildReport

__all__ = ["BUILDERS", "find_components", "build_components", "ComponentsReport"]


# The builder registry's names (fp8, nvfp4, mixed, and any registered later).
BUILDERS = _builders.BUILDERS


def find_components(root: str | os.PathLike[str]) -> list[str]:
    """Transformer components of a pipeline root: ``transformer``, ``transformer_2``, ... that
    hold a config.json, in name order (``transformer`` first)."""
    from dqfast.hub import resolve_input

    r = resolve_input(root)
    if not r.is_dir():
        raise PlanError(f"{r}: not a directory", path=str(r))
    found = [p.name for p in r.iterdir() if p.is_dir() and p.name.startswith("transformer") and (p / "config.json").is_file()]
    if not found:
        raise PlanError(f"{r}: no transformer*/config.json component directories", path=str(r))
    return sorted(found, key=lambda n: (n != "transformer", n))


@dataclass
class ComponentsReport:
    output_dir: str
    kind: str
    components: dict[str, BuildReport] = field(default_factory=dict)
    #: Untouched pipeline entries linked/copied into the output (``model_index.json``, ``vae``, ...).
    copied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": self.output_dir,
            "kind": self.kind,
            "components": {c: r.to_dict() for c, r in self.components.items()},
            "copied": list(self.copied),
        }


def pipeline_extras(root: str | os.PathLike[str]) -> list[Path]:
    """The top-level entries of a diffusers pipeline root (one with ``model_index.json``) other
    than its transformer components; ``[]`` for a root that is not a pipeline. Hidden entries
    (caches, staging directories) are skipped. A transformer left out of ``components`` is not
    copied: the output then holds only the transformers asked for."""
    from dqfast.hub import resolve_input

    r = resolve_input(root)
    if not (r / "model_index.json").is_file():
        return []
    transformers = set(find_components(r))
    return sorted(p for p in r.iterdir() if p.name not in transformers and not p.name.startswith("."))


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link costs no space and no time; across file systems (EXDEV) or where links are not
    # allowed, copy. The writer never edits files in place, so sharing inodes with the input is safe.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _place_extras(extras: Sequence[Path], out_root: Path, created: list[Path]) -> list[str]:
    """Stage every extra entry in a hidden directory inside ``out_root``, then rename each into
    place (recorded in ``created`` so a failure removes it). A failure while staging leaves
    nothing at the output paths."""
    out_root.mkdir(parents=True, exist_ok=True)
    stage = out_root / f".dqfast-pipeline-tmp-{os.getpid()}-{time.time_ns()}"
    stage.mkdir()
    try:
        for e in extras:
            if e.is_dir():
                shutil.copytree(e, stage / e.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(e), str(stage / e.name))
        for e in extras:
            dst = out_root / e.name
            if os.path.lexists(dst):  # only reached with overwrite (checked before the builds)
                shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
            os.replace(stage / e.name, dst)
            created.append(dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [e.name for e in extras]


def build_components(
    kind: str,
    root: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    components: Sequence[str] | None = None,
    *,
    transformers_only: bool = False,
    **builder_kwargs: Any,
) -> ComponentsReport:
    """Run the ``kind`` builder (fp8 | nvfp4 | mixed) for each component of the pipeline at ``root``.

    ``root`` feeds the builder's main input (``base_transformer_dir`` for mixed and for
    ``from_bf16`` builds, else ``modelopt_hf_dir``) unless that is given in ``builder_kwargs``;
    every string/path argument has ``{component}`` substituted. ``components=None`` means all of
    :func:`find_components`. When ``root`` holds ``model_index.json`` (and not
    ``transformers_only``), the pipeline's other top-level entries go to ``output_dir`` too.
    """
    spec = _builders.get_builder(kind)
    builder = spec.load()
    comps = list(components) if components else find_components(root)
    if len(set(comps)) != len(comps):
        raise PlanError(f"components listed twice: {comps}")
    out_root = Path(output_dir)
    overwrite = bool(builder_kwargs.get("overwrite", False))
    dry_run = bool(builder_kwargs.get("dry_run", False))
    main_arg = spec.main_input_for(builder_kwargs)
    builder_kwargs.setdefault(main_arg, str(root))
    per_component = {
        c: {k: (str(v).replace("{component}", c) if isinstance(v, (str, os.PathLike)) else v) for k, v in builder_kwargs.items()}
        for c in comps
    }
    # Every component output against every component's inputs (and the root), before the first
    # build: a later component must not find its input already replaced by an earlier output.
    inputs = [str(root)] + [str(kw[k]) for kw in per_component.values() for k in spec.inputs if kw.get(k) is not None]
    inputs += [str(p) for kw in per_component.values() for p in kw.get("guard_inputs", ())]
    extras = [] if transformers_only else pipeline_extras(root)
    for c in comps + [e.name for e in extras]:
        _core.check_output_paths(out_root / c, inputs, "--output-dir")
        if (out_root / c).exists() and not overwrite and not dry_run:
            raise OutputExistsError(
                f"{out_root / c}: output already exists (pass --overwrite / overwrite=True to replace it)", path=str(out_root / c)
            )
    report = ComponentsReport(output_dir=str(out_root), kind=kind)
    created: list[Path] = []
    # The directories above the components that this call creates (the writer makes parents):
    # removed again on failure, so a failed build leaves no empty output tree behind.
    new_parents = [d for d in (out_root, *out_root.parents) if not os.path.lexists(d)]
    try:
        for c in comps:
            kw = dict(per_component[c])
            target = out_root / c
            existed = target.exists()
            r = builder(target, component=c, **kw)
            if not existed and not dry_run:
                created.append(target)
            report.components[c] = r
        if extras and not dry_run:
            report.copied = _place_extras(extras, out_root, created)
    except BaseException:
        for p in created:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for d in new_parents:  # deepest first; rmdir only removes what is still empty
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    return report
