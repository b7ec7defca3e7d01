"""The engines' own code, called as oracles (never copied): SGLang 0.5.23 and vLLM-Omni 0.30.0.

``vllm_omni_verdict`` parses a checkpoint's config with vLLM-Omni's ``TransformerConfig.from_dict``
(-> ``quantization/factory.py``), builds vLLM-Omni's FLUX.1 DiT on CPU with that quant config, runs
its ModelOpt checkpoint adapter (``diffusion/model_loader/checkpoint_adapters/modelopt.py``) and
feeds every adapted tensor to the model's own ``load_weights``, one at a time, so that each failing
tensor is reported (not only the first).

``sglang_verdict`` runs SGLang's own transformer loader (``TransformerLoader.load_customized``:
config and quant-config resolution, the DiT built on the meta device, the state-dict load with its
name mapping) on CPU with its default server args (tp_size 1), then matches every checkpoint Linear
against the parameter SGLang's name mapping puts it in (dtype, shape, scales, loaded bytes).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path

QUANT_DTYPES = ("F8_E4M3", "U8")
SUFFIXES = (".weight_scale_2", ".weight_scale", ".input_scale", ".weight", ".bias")


def module_of(tensor: str) -> str:
    for s in SUFFIXES:
        if tensor.endswith(s):
            return tensor[: -len(s)]
    return tensor


@dataclass
class Verdict:
    engine: str
    #: "loads" | "loads-bf16" (some quantized layers of the checkpoint become BF16) | "fails"
    status: str
    quantized: set[str] = field(default_factory=set)  # checkpoint modules the engine runs quantized
    bf16: set[str] = field(default_factory=set)  # quantized in the checkpoint, BF16 in the engine
    errors: dict[str, str] = field(default_factory=dict)  # module (or "<config>") -> reason

    def summary(self) -> str:
        if self.status == "fails":
            first = sorted(self.errors.items())[0]
            return f"does not load: {len(self.errors)} module(s), e.g. {first[0]}: {first[1]}"
        if self.status == "loads-bf16":
            return f"loads; {len(self.bf16)} quantized module(s) of the checkpoint run in BF16"
        return "loads"


def checkpoint_tensors(d: Path) -> dict:
    """All tensors of a transformer dir (torch, via safetensors), in file order."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def checkpoint_dtypes(d: Path) -> dict[str, str]:
    from dqfast.reader import open_checkpoint

    info = open_checkpoint(d)
    return {n: t.dtype for n, t in info.tensors.items()}


def _quantized_modules(dtypes: dict[str, str]) -> set[str]:
    return {module_of(n) for n, dt in dtypes.items() if n.endswith(".weight") and dt in QUANT_DTYPES}


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]


# ---------------------------------------------------------------- vLLM-Omni


def vllm_omni_quant_config(cfg: dict):
    from vllm_omni.diffusion.data import TransformerConfig

    return TransformerConfig.from_dict(cfg).quant_config


# diffusers `_class_name` -> vLLM-Omni's DiT class and the pipeline class its registry prepares the
# quant config with.
VO_MODELS = {
    "FluxTransformer2DModel": (
        "vllm_omni.diffusion.models.flux.flux_transformer.FluxTransformer2DModel",
        "vllm_omni.diffusion.models.flux.pipeline_flux.FluxPipeline",
    ),
    "WanTransformer3DModel": (
        "vllm_omni.diffusion.models.wan2_2.wan2_2_transformer.WanTransformer3DModel",
        "vllm_omni.diffusion.models.wan2_2.pipeline_wan2_2.Wan22Pipeline",
    ),
    "QwenImageTransformer2DModel": (
        "vllm_omni.diffusion.models.qwen_image.qwen_image_transformer.QwenImageTransformer2DModel",
        "vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image.QwenImagePipeline",
    ),
}


def _obj(qualname: str):
    import importlib

    mod, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def vllm_omni_model(cfg: dict, quant_config):
    """vLLM-Omni's DiT for the config's class, on CPU in BF16, with the given quant config."""
    import inspect

    import torch
    from shims import vllm_cpu

    vllm_cpu.install()
    from vllm.model_executor.model_loader.utils import configure_quant_config

    model_path, pipeline_path = VO_MODELS[cfg["_class_name"]]
    model_cls = _obj(model_path)
    # As vLLM-Omni's registry does before building a pipeline (_prepare_diffusion_quant_config).
    if quant_config is not None:
        configure_quant_config(quant_config, _obj(pipeline_path))
    sig = inspect.signature(model_cls.__init__).parameters
    params = set(sig) - {"self", "od_config", "quant_config"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in params}
    if "od_config" in sig and sig["od_config"].default is inspect.Parameter.empty:
        # Qwen-Image reads only its parallel sizes from it: vLLM-Omni's defaults (one process).
        from vllm_omni.diffusion.data import OmniDiffusionConfig

        kwargs["od_config"] = OmniDiffusionConfig()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return model_cls(**kwargs, quant_config=quant_config)
    finally:
        torch.set_default_dtype(prev)


def vllm_omni_verdict(ckpt: Path) -> Verdict:
    import torch
    from vllm_omni.diffusion.model_loader.checkpoint_adapters import get_checkpoint_adapter

    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    v = Verdict("vllm-omni", "loads")
    try:
        qc = vllm_omni_quant_config(cfg)
    except Exception as e:  # the engine's own refusal
        v.status, v.errors = "fails", {"<config>": _first_line(e)}
        return v
    model = vllm_omni_model(cfg, qc)
    params = dict(model.named_parameters())
    # vLLM-Omni's loader engages the adapter for the `transformer` subfolder; names carry no prefix
    # here because the model is the transformer itself.
    source = types.SimpleNamespace(subfolder="transformer", prefix="")
    adapter = get_checkpoint_adapter(model, source, qc, True)
    tensors = checkpoint_tensors(ckpt)
    dtypes = checkpoint_dtypes(ckpt)
    try:
        adapted = list(adapter.adapt(iter(tensors.items()))) if adapter is not None else list(tensors.items())
    except Exception as e:
        v.status, v.errors = "fails", {"<adapter>": _first_line(e)}
        return v
    low = (torch.float8_e4m3fn, torch.uint8)
    landed: dict[str, torch.dtype] = {}  # checkpoint module -> dtype of the parameter its weight went into
    for name, t in adapted:
        try:
            loaded = model.load_weights([(name, t)])
        except Exception as e:
            v.errors.setdefault(module_of(name), _first_line(e))
            continue
        if name.endswith(".weight"):
            # The model's own loader says where the tensor went (its name mapping, fused layers).
            # The model's own loader says where the tensor went (its renames); a fused shard is
            # reported only once all shards are in, so fall back to the adapter's packed mapping.
            into = [n for n in (loaded or ()) if n in params and n != name] or [n for n in (loaded or ()) if n in params]
            if not into and adapter is not None:
                into = [n for n in (adapter._resolve_target_and_output_names(name)[0],) if n in params]
            if into:
                landed[module_of(name)] = params[into[0]].dtype
    for m in _quantized_modules(dtypes):
        if m in v.errors:
            continue
        (v.quantized if landed.get(m) in low else v.bf16).add(m)
    v.status = "fails" if v.errors else ("loads-bf16" if v.bf16 else "loads")
    return v


# ---------------------------------------------------------------- SGLang


# diffusers `_class_name` -> the SGLang pipeline config whose `dit_config` its loader updates with
# the checkpoint's config.json (configs/pipeline_configs/; Wan2.2 A14B for the Wan fixture).
SGL_PIPELINE_CONFIGS = {
    "FluxTransformer2DModel": "sglang.multimodal_gen.configs.pipeline_configs.flux.FluxPipelineConfig",
    "WanTransformer3DModel": "sglang.multimodal_gen.configs.pipeline_configs.wan.Wan2_2_T2V_A14B_Config",
    "QwenImageTransformer2DModel": "sglang.multimodal_gen.configs.pipeline_configs.qwen_image.QwenImagePipelineConfig",
}
_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8_e4m3fn", "U8": "uint8", "I64": "int64"}
SCALES = ("weight_scale", "weight_scale_2", "input_scale")


@dataclass
class SglangLoad:
    """What SGLang's own transformer loader built and loaded for one checkpoint."""

    meta: dict  # parameter/buffer name -> (dtype, shape) of the module tree as SGLang built it
    targets: dict  # checkpoint tensor -> (parameter name after SGLang's name mapping, shard index or None)
    model: object | None  # the loaded model (None: the load raised)
    error: str | None  # the loader's exception, if any
    stage: str  # "config" (raised before the module tree was built) | "load" | "done"


def sglang_load(ckpt: Path) -> SglangLoad:
    """SGLang 0.5.23's ``TransformerLoader.load_customized`` on a transformer dir, on CPU (shims in
    ``shims/sglang_cpu.py``): its config resolution (``resolve_transformer_quant_load_spec``:
    ``get_quant_config``, NVFP4 layout inference from the safetensors, the model class's packed
    mapping), its DiT built on the meta device, and ``load_model_from_full_model_state_dict``
    (name mapping, weight loaders, dtype casts, FP8 dequantization into BF16 parameters)."""
    import importlib

    from shims import sglang_cpu

    sglang_cpu.install()
    import sglang.multimodal_gen.runtime.loader.fsdp_load as fsdp_load
    from sglang.multimodal_gen.runtime.loader.component_loaders.transformer_loader import TransformerLoader
    from sglang.multimodal_gen.runtime.loader.utils import get_param_names_mapping
    from sglang.multimodal_gen.runtime.server_args import ServerArgs, set_global_server_args

    cfg = json.loads((ckpt / "config.json").read_text())
    mod, _, name = SGL_PIPELINE_CONFIGS[cfg["_class_name"]].rpartition(".")
    pipeline_config = getattr(importlib.import_module(mod), name)()
    # SGLang's defaults (tp/sp 1, no offload, no --quantization): as `sglang generate --model-path`.
    server_args = ServerArgs(model_path=str(ckpt.parent), pipeline_config=pipeline_config)
    set_global_server_args(server_args)
    built: dict = {}
    initialize_model = fsdp_load.initialize_model

    def observe(*a, **k):  # the loader's own construction, observed (not replaced)
        model = initialize_model(*a, **k)
        built["meta"] = {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}
        built["mapping"] = dict(model.param_names_mapping)
        return model

    fsdp_load.initialize_model = observe
    try:
        model, error = TransformerLoader().load_customized(str(ckpt), server_args, "transformer"), None
    except Exception as e:
        model, error = None, _first_line(e)
    finally:
        fsdp_load.initialize_model = initialize_model
    if "meta" not in built:
        return SglangLoad({}, {}, None, error, "config")
    # SGLang's own name mapping: which parameter each checkpoint tensor lands in, and whether it is
    # one shard of a fused parameter (merge index). A name whose mapping leaves the model's names
    # keeps its own, as the loader's hf_to_custom_state_dict does.
    from dqfast.reader import open_checkpoint

    fn = get_param_names_mapping(built["mapping"], valid_target_names=set(built["meta"]))
    targets = {}
    for n in open_checkpoint(ckpt).tensors:
        tgt, merge, _ = fn(n)
        if tgt != n and n in built["meta"] and tgt not in built["meta"]:
            tgt, merge = n, None
        targets[n] = (tgt, merge)
    return SglangLoad(built["meta"], targets, model, error, "load" if error else "done")


def sglang_verdict(ckpt: Path) -> Verdict:
    """Each checkpoint Linear against the parameter SGLang's loader put it in: quantized (same
    low-precision dtype and shape, scales present, bytes loaded unchanged), BF16 (an FP8 weight in a
    BF16 parameter: the loader dequantizes it with its weight_scale), or a load error (a uint8
    weight in a BF16 parameter, a BF16 weight cast into a quantized parameter whose scales the
    checkpoint lacks, no parameter, or the loader's own exception)."""
    import torch

    ckpt = Path(ckpt)
    v = Verdict("sglang", "loads")
    load = sglang_load(ckpt)
    if load.stage == "config":
        v.status, v.errors = "fails", {"<config>": load.error or ""}
        return v
    from dqfast.reader import open_checkpoint

    info = open_checkpoint(ckpt).tensors
    low = (torch.float8_e4m3fn, torch.uint8)
    loaded = dict(load.model.named_parameters()) if load.model is not None else {}
    tensors = checkpoint_tensors(ckpt) if load.model is not None else {}
    for w in sorted(n for n, t in info.items() if n.endswith(".weight") and len(t.shape) == 2):
        m, ck = module_of(w), info[w]
        tgt, shard = load.targets.get(w, (None, None))
        if tgt is None or tgt not in load.meta:
            v.errors[m] = f"no parameter for {w} in SGLang's module tree (skipped by the loader)"
            continue
        pdt, pshape = load.meta[tgt]
        quant = ck.dtype in QUANT_DTYPES
        if not quant and pdt not in low:
            continue  # BF16 in both
        if not quant:
            # An FP8 parameter of the same shape takes the cast silently (its missing scales become 1).
            v.errors[m] = f"{ck.dtype} weight {tuple(ck.shape)} for a {pdt} parameter {tgt} {pshape} without scales in the checkpoint"
            continue
        if pdt not in low:
            if ck.dtype == "F8_E4M3" and f"{m}.weight_scale" in info:
                v.bf16.add(m)  # fsdp_load._maybe_dequantize_fp8
            else:
                v.errors[m] = f"{ck.dtype} weight {tuple(ck.shape)} for a {pdt} parameter {tgt} {pshape}"
            continue
        # A shard of a fused parameter (q/k/v) fills some of its rows.
        shape_ok = tuple(ck.shape)[1:] == pshape[1:] if shard is not None else tuple(ck.shape) == pshape
        if str(pdt) != f"torch.{_TORCH_DTYPES[ck.dtype]}" or not shape_ok:
            v.errors[m] = f"{ck.dtype} weight {tuple(ck.shape)} for a {pdt} parameter {tgt} {pshape}"
            continue
        head = tgt[: -len(".weight")]
        missing = [s for s in SCALES if f"{head}.{s}" in load.meta and f"{m}.{s}" not in info]
        if missing:
            v.errors[m] = f"quantized parameter {tgt} without {', '.join(missing)} in the checkpoint (initialised to 1)"
            continue
        if loaded and shard is None and not torch.equal(loaded[tgt].data.view(torch.uint8), tensors[w].view(torch.uint8)):
            v.errors[m] = f"{tgt} holds other bytes than the checkpoint after loading"
            continue
        v.quantized.add(m)
    if load.error and not v.errors:
        v.errors["<load>"] = load.error
    v.status = "fails" if v.errors else ("loads-bf16" if v.bf16 else "loads")
    return v
