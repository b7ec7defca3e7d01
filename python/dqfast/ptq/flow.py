"""One PTQ flow: ModelOpt quantization -> ModelOpt artefacts -> dqfast build -> verification.

``run_ptq`` follows ModelOpt's diffusion example (``examples/diffusers/quantization/quantize.py``
at the release recorded in docs/ptq.md) for everything ModelOpt writes:

1. every backbone is quantized in turn (``mtq.quantize`` with the denoising-loop
   calibration, which runs *all* transformers of the pipeline, then the model filter and
   the conv/MHA fix-up) and saved with ``mto.save`` to ``<out>/ckpt/<component>.pt``;
2. only after all of them are calibrated, each is exported with ``export_hf_checkpoint``
   to ``<out>/hf/<component>/`` (the export converts weights in place, so exporting the
   first Wan2.2 expert before calibrating the second would feed the second quantized
   weights it never sees in the example);
3. ``build``: ``dqfast build fp8|nvfp4`` of each export into ``<out>/dqfast/<component>/``;
4. ``verify`` (implies ``build``): per-layer weight error and a denoising trajectory of the
   BF16 transformer against the dqfast build loaded by the dqfast runtime;
5. ``<out>/report.json``: what ran, with which versions, calibration settings (including
   whether conditioning came from pseudo-embeddings), timings and verification numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dqfast import _core
from dqfast import models as model_presets
from dqfast.builders import get_builder
from dqfast.errors import CheckpointError, OutputExistsError, PlanError, TargetError
from dqfast.quant_config import load_json
from dqfast.targets import DEFAULT_TARGET, TargetName, targets_of

from .calibration import CalibConfig, calibrate_denoising, model_family
from .loading import load_transformer
from .presets import MODELOPT_SOURCE, get_preset
from .quantize import Algo, build_quant_config, export_hf, quantize, save_backbone

# ModelOpt's example value for Wan2.2 A14B (``from_pretrained_extra_args``), used when a
# two-expert pipeline directory does not record its own ``boundary_ratio``.
WAN22_BOUNDARY_RATIO = 0.875


@dataclass
class ComponentResult:
    name: str
    class_name: str
    backbone: str
    hf_dir: str
    base_dir: str | None = None
    dqfast_dir: str | None = None
    forward_calls: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    build: dict[str, Any] | None = None
    layers: dict[str, Any] | None = None
    trajectory: dict[str, Any] | None = None


@dataclass
class PtqResult:
    out_dir: str
    algo: str
    model_type: str
    components: list[ComponentResult]
    report_path: str
    report: dict[str, Any]

    def component(self, name: str) -> ComponentResult:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


def _is_module(obj: Any) -> bool:
    try:
        import torch

        return isinstance(obj, torch.nn.Module)
    except ImportError:  # pragma: no cover
        return False


def _resolve_inputs(model_or_dir: Any, components: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, Path], dict[str, Any]]:
    """(name -> module, name -> source dir, pipeline config) in pipeline order."""
    if _is_module(model_or_dir):
        name = components[0] if components else "transformer"
        return {name: model_or_dir}, {}, {}
    if isinstance(model_or_dir, dict) or hasattr(model_or_dir, "components"):
        # A diffusers pipeline object or a plain {name: module} mapping.
        comps = model_or_dir if isinstance(model_or_dir, dict) else model_or_dir.components
        names = (
            list(components)
            if components
            else sorted((k for k, v in comps.items() if k.startswith("transformer") and _is_module(v)), key=_pipeline_order)
        )
        missing = [n for n in names if n not in comps]
        if missing or not names:
            raise PlanError(f"--components (components=): transformer components {missing or names} not found in {sorted(comps)}")
        cfg = dict(getattr(model_or_dir, "config", {}) or {}) if not isinstance(model_or_dir, dict) else {}
        return {n: comps[n] for n in names}, {}, cfg
    root = Path(model_or_dir)
    if (root / "model_index.json").exists():
        index = load_json(root / "model_index.json")
        names = (
            list(components)
            if components
            else sorted((k for k in index if k.startswith("transformer") and (root / k / "config.json").exists()), key=_pipeline_order)
        )
        if not names:
            raise CheckpointError(f"{root}: model_index.json lists no transformer component with a config.json", path=str(root))
        for n in names:
            if not (root / n / "config.json").exists():
                raise CheckpointError(f"{root / n / 'config.json'}: component {n!r} not found", path=str(root / n / "config.json"))
        return {n: None for n in names}, {n: root / n for n in names}, index
    if (root / "config.json").exists():
        name = components[0] if components else "transformer"
        return {name: None}, {name: root}, {}
    raise CheckpointError(f"{root}: neither a pipeline (model_index.json) nor a component (config.json) directory", path=str(root))


def _pipeline_order(name: str) -> tuple[int, str]:
    # transformer, transformer_2, transformer_3 ...
    suffix = name[len("transformer") :].lstrip("_")
    return (int(suffix) if suffix.isdigit() else (1 if not suffix else 99), name)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("dqfast", "nvidia-modelopt", "diffusers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _check_outputs(out: Path, names: list[str], build: bool, overwrite: bool) -> None:
    targets = [out / "ckpt" / f"{n}.pt" for n in names] + [out / "hf" / n for n in names]
    if build:
        targets += [out / "dqfast" / n for n in names]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: output already exists (pass --overwrite to replace it)", path=str(existing[0]))
    for t in existing:
        if t.is_dir():
            shutil.rmtree(t)
        else:
            t.unlink()


def run_ptq(
    model_or_dir: Any,
    out_dir: str | Path,
    algo: Algo = "fp8",
    model_type: str = "auto",
    calib: CalibConfig | Sequence[str] | str | Path | None = None,
    calib_size: int | None = None,
    n_steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    quantize_mha: bool = False,
    build: bool = False,
    verify: bool = False,
    components: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    device: str | None = None,
    verify_steps: int | None = None,
    progress: bool = True,
    target: TargetName = DEFAULT_TARGET,
    fit_target: bool = False,
) -> PtqResult:
    """Quantize, save, export and optionally build and verify.

    ``model_or_dir``: a transformer ``nn.Module``, a ``{name: module}`` mapping or diffusers
    pipeline object, a component directory (``config.json`` + safetensors), or a pipeline
    directory (``model_index.json``; every ``transformer*`` component, or ``components``).
    ``calib``: a :class:`CalibConfig`, a list of prompts, or a prompts file (one per line);
    ``None`` uses the built-in prompt set. ``calib_size``/``n_steps``/``batch_size``/``seed``
    override the config's values. ``verify`` implies ``build``. ``target`` / ``fit_target``: the
    serving-engine check of the build step, as for the builders (default ``any``); an NVFP4 build
    that a target's model class cannot load is refused before calibration, not after.
    """
    import torch

    t_all = time.perf_counter()
    out = Path(out_dir)
    build = build or verify
    if isinstance(calib, CalibConfig):
        cc = calib
    elif isinstance(calib, (str, Path)):
        cc = CalibConfig(prompts_file=calib)
    elif calib is not None:
        cc = CalibConfig(prompts=list(calib))
    else:
        cc = CalibConfig()
    for name, value in (("calib_size", calib_size), ("n_steps", n_steps), ("batch_size", batch_size)):
        if value is not None:
            setattr(cc, name, int(value))
    cc.seed = seed
    cc.progress = progress
    cc.__post_init__()

    models, sources, pipe_cfg = _resolve_inputs(model_or_dir, components)
    names = list(models)
    # Before anything is removed or written: the output may not be, contain or lie inside the
    # model directory (or the prompts file) — the writer's rule, however the paths are spelled.
    inputs = [str(p) for p in sources.values()] + ([str(model_or_dir)] if isinstance(model_or_dir, (str, os.PathLike)) else [])
    inputs += [str(cc.prompts_file)] if cc.prompts_file else []
    _core.check_output_paths(out, inputs, "--out")
    _check_outputs(out, names, build, overwrite)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for n in names:
        if models[n] is None:
            models[n] = load_transformer(sources[n])
        models[n].to(dev).eval()

    first = models[names[0]]
    preset_model = model_presets.resolve_preset(model_type, {"_class_name": type(first).__name__})
    preset = get_preset(preset_model.name)
    if build:
        _check_target_early(algo, preset_model.name, target, fit_target)
    family = model_family(first)
    if len(names) > 1 and cc.boundary_ratio is None:
        cc.boundary_ratio = float(pipe_cfg.get("boundary_ratio") or WAN22_BOUNDARY_RATIO)

    results = {
        n: ComponentResult(name=n, class_name=type(models[n]).__name__, backbone=str(out / "ckpt" / f"{n}.pt"), hf_dir=str(out / "hf" / n))
        for n in names
    }

    # BF16 base weights (the builder's fallback layers, the verifier's reference): the source
    # directory, or a save before quantization.
    if build:
        for n in names:
            if n in sources:
                results[n].base_dir = str(sources[n])
            else:
                base_dir = out / "base" / n
                if base_dir.exists():
                    shutil.rmtree(base_dir)
                models[n].save_pretrained(base_dir)
                results[n].base_dir = str(base_dir)

    # 1. Quantize every backbone; calibration runs the whole pipeline each time.
    for n in names:
        t0 = time.perf_counter()
        calls: dict[str, int] = {}

        # Loop values bound as defaults: the closure runs inside quantize(), before the next n.
        def forward_loop(model: Any, _n: str = n, _models: dict[str, Any] = models, _calls: dict[str, int] = calls) -> None:
            current = {k: (model if k == _n else m) for k, m in _models.items()}
            _calls.update(calibrate_denoising(current, cc, label=f"calibrating {_n}"))

        quantize(models[n], algo, filter=preset.name, quantize_mha=quantize_mha, seed=seed, forward_loop=forward_loop)
        results[n].forward_calls = calls.get(n, 0)
        save_backbone(models[n], results[n].backbone)
        results[n].seconds["quantize"] = time.perf_counter() - t0

    # 2. HF export, after all calibration (the export rewrites the modules' weights).
    for n in names:
        t0 = time.perf_counter()
        export_hf(models[n], results[n].hf_dir)
        results[n].seconds["export"] = time.perf_counter() - t0
    del models

    # 3. dqfast build.
    if build:
        for n in names:
            t0 = time.perf_counter()
            dq_dir = out / "dqfast" / n
            comp_base = results[n].base_dir
            base = Path(comp_base) if comp_base else None
            report = _build(
                algo, dq_dir, Path(results[n].hf_dir), Path(results[n].backbone), base, preset.name, n, target=target, fit_target=fit_target
            )
            results[n].dqfast_dir = str(dq_dir)
            results[n].build = {"quant_algo": report.quant_algo, "counts": dict(report.counts), "warnings": list(report.warnings)}
            results[n].seconds["build"] = time.perf_counter() - t0

    # 4. Verification.
    if verify:
        for n in names:
            t0 = time.perf_counter()
            r = results[n]
            assert r.base_dir is not None and r.dqfast_dir is not None
            r.layers, r.trajectory = _verify(
                Path(r.base_dir), Path(r.dqfast_dir), cc, family, verify_steps or min(cc.n_steps, 8), seed, dev
            )
            r.seconds["verify"] = time.perf_counter() - t0

    quant_config = build_quant_config(algo, preset, quantize_mha=quantize_mha, block_counts=None) if preset.block_range is None else None
    report_dict: dict[str, Any] = {
        "tool": "dqfast ptq",
        "versions": _versions(),
        "modelopt_example": MODELOPT_SOURCE,
        "input": str(model_or_dir) if not _is_module(model_or_dir) else type(model_or_dir).__name__,
        "out_dir": str(out),
        "algo": algo,
        "model_type": preset.name,
        "ptq_disabled": list(preset.disable),
        "recipe": preset.recipe(algo),
        "quant_cfg": quant_config,
        "quantize_mha": quantize_mha,
        "device": str(dev),
        "calibration": {**cc.describe(), "boundary_ratio": cc.boundary_ratio, "scheduler": "FlowMatchEulerDiscreteScheduler"},
        "components": [asdict(results[n]) for n in names],
        "seconds": time.perf_counter() - t_all,
    }
    report_path = out / "report.json"
    out.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report_dict, indent=2, default=str) + "\n")
    return PtqResult(
        out_dir=str(out),
        algo=algo,
        model_type=preset.name,
        components=[results[n] for n in names],
        report_path=str(report_path),
        report=report_dict,
    )


def _check_target_early(algo: str, family: str, target: TargetName, fit_target: bool) -> None:
    """Before calibration (hours on a real model): an NVFP4 export that an engine of ``target``
    cannot load because its model class quantizes only some layers of the family
    (``Target.nvfp4_export_fails``: vLLM-Omni's FLUX.1 and Qwen-Image; SGLang loads both exports
    with the family's preset). The full check runs in the build step, on the export."""
    for t in targets_of(target):
        if algo == "nvfp4" and not fit_target and family in t.nvfp4_export_fails:
            raise TargetError(
                f"--build --algo nvfp4: --target {target} includes {t.engine_version}, whose {family} model class quantizes "
                f"only some layers ({t.quantized_source(family)}): ModelOpt's NVFP4 export would not load there; "
                "pass --fit-target to keep those layers in BF16, or --target sglang or --target none"
            )


def _build(
    algo: str,
    dq_dir: Path,
    hf_dir: Path,
    backbone: Path,
    base_dir: Path | None,
    model_type: str,
    component: str,
    target: TargetName = DEFAULT_TARGET,
    fit_target: bool = False,
) -> Any:
    # The builder registry names the inputs each builder takes (nvfp4 has no backbone).
    builder = get_builder(algo)
    given = {"modelopt_hf_dir": hf_dir, "modelopt_backbone_ckpt": backbone, "base_transformer_dir": base_dir}
    inputs = {k: v for k, v in given.items() if k in builder.inputs}
    return builder.load()(
        dq_dir, **inputs, model_type=model_type, overwrite=True, component=component, target=target, fit_target=fit_target
    )


def _verify(
    base_dir: Path, dq_dir: Path, cc: CalibConfig, family: str, steps: int, seed: int, dev: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    from dqfast.verify.checkpoint import verify_checkpoint

    r = verify_checkpoint(base_dir, dq_dir, steps=steps, seed=seed, device=dev, calib=cc)
    return r["layer_summary"], r["trajectory"]
