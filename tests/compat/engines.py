"""The engines' own code, called as oracles (never copied): SGLang 0.5.23 and vLLM-Omni 0.30.0.

``vllm_omni_verdict`` parses a checkpoint's config with vLLM-Omni's ``TransformerConfig.from_dict``
(-> ``quantization/factory.py``), builds vLLM-Omni's FLUX.1 DiT on CPU with that quant config, runs
its ModelOpt checkpoint adapter (``diffusion/model_loader/checkpoint_adapters/modelopt.py``) and
feeds every adapted tensor to the model's own ``load_weights``, one at a time, so that each failing
tensor is reported (not only the first).

``sglang_verdict`` parses the config the way SGLang's ``get_quant_config`` does
(``normalize_flat_modelopt_quant_config`` -> ``_load_quant_cls`` -> ``from_config``) and asks the
resulting config, per checkpoint module, whether SGLang's runtime excludes it
(``is_layer_excluded`` / ``_is_packed_layer_excluded``). SGLang's DiT module tree is not built here
(it needs SGLang's own distributed runtime); the consequence of an exclusion mismatch is then the
rule stated in docs/compat.md: a quantized tensor for an excluded (BF16) layer, or a BF16 weight for
a quantized layer, does not load.
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


def sglang_quant_config(cfg: dict, packed_modules_mapping: dict | None = None):
    """SGLang's ``get_quant_config`` path for a flat config.json ``quantization_config``."""
    from sglang.multimodal_gen.runtime.utils import quantization_utils as qu

    hf = qu.normalize_flat_modelopt_quant_config(dict(cfg["quantization_config"]))
    cls = qu._load_quant_cls(hf)
    hf["packed_modules_mapping"] = packed_modules_mapping or {}
    return cls.from_config(hf)


# SGLang's FLUX.1 DiT fuses q/k/v (configs/models/dits/flux.py): exclusion of a fused layer needs all
# shards to agree, which ``_is_packed_layer_excluded`` checks.
SGLANG_FLUX_PACKED = {"to_qkv": ["to_q", "to_k", "to_v"], "to_added_qkv": ["add_q_proj", "add_k_proj", "add_v_proj"]}
# The prefix SGLang's DiT gives a Linear's quant method, where it differs from the checkpoint's module
# name: its Qwen-Image (runtime/models/dits/qwen_image.py) builds `img_mod = Sequential(SiLU, Linear)`
# with prefix `...img_mod` (the weights stay `img_mod.1.*`).
SGLANG_PREFIX = {"QwenImageTransformer2DModel": ((r"\.(img_mod|txt_mod)\.1$", r".\1"),)}


def _sglang_prefix(class_name: str, module: str) -> str:
    import re

    for pat, repl in SGLANG_PREFIX.get(class_name, ()):
        module = re.sub(pat, repl, module)
    return module


def sglang_verdict(ckpt: Path) -> Verdict:
    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    v = Verdict("sglang", "loads")
    try:
        qc = sglang_quant_config(cfg, SGLANG_FLUX_PACKED)
    except Exception as e:
        v.status, v.errors = "fails", {"<config>": _first_line(e)}
        return v
    dtypes = checkpoint_dtypes(ckpt)
    quantized = _quantized_modules(dtypes)
    from dqfast.reader import open_checkpoint

    info = open_checkpoint(ckpt)
    # Linear layers: 2-D weights (norm weights are 1-D and never quantized).
    linear = {module_of(n) for n, t in info.tensors.items() if n.endswith(".weight") and len(t.shape) == 2}
    for m in sorted(linear):
        try:
            excluded = qc.is_layer_excluded(_sglang_prefix(cfg.get("_class_name", ""), m))
        except Exception as e:
            v.errors[m] = _first_line(e)
            continue
        if m in quantized and excluded:
            v.errors[m] = "quantized tensor for a layer the runtime excludes (BF16 parameter)"
        elif m not in quantized and not excluded:
            v.errors[m] = "BF16 weight for a layer the runtime quantizes (no scales)"
        elif m in quantized:
            v.quantized.add(m)
    v.status = "fails" if v.errors else "loads"
    return v
