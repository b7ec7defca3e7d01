"""vLLM / vLLM-Omni on a CPU-only machine, for building a DiT module tree and loading weights.

- ``select_linear_kernel`` (vllm ``model_executor/layers/quantization/modelopt.py``) picks the GEMM
  kernel at ``create_weights`` time and raises when no CUDA kernel exists. The kernel is used only in
  ``process_weights_after_loading`` and ``apply`` (never called here); parameter names, dtypes and
  shapes are created before the choice. Replaced by a placeholder with no pre-quantized input key.
- vLLM-Omni's platform has no CPU diffusion attention backend; the attention module is built with
  vLLM-Omni's own torch SDPA backend. Attention holds no weights.
- A vLLM config (device ``cpu``) and vLLM-Omni's diffusion process groups for one gloo process,
  which its DiTs and vLLM's parallel linear layers query for their parallel sizes.
"""

from __future__ import annotations

_installed = False
_config_ctx = None  # kept alive: the context resets the config when collected


class _NoKernel:
    def input_quant_key(self) -> None:
        return None


def install() -> None:
    global _installed, _config_ctx
    if _installed:
        return
    import vllm.model_executor.layers.quantization.modelopt as vllm_modelopt
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm_omni.diffusion.distributed import parallel_state as omni_ps
    from vllm_omni.platforms import current_omni_platform

    vllm_modelopt.select_linear_kernel = lambda *a, **k: _NoKernel()
    type(current_omni_platform).get_diffusion_attn_backend_cls = classmethod(
        lambda cls, *a, **k: "vllm_omni.diffusion.attention.backends.sdpa.SDPABackend"
    )
    # Entered for the whole test session: vLLM reads it at layer construction.
    _config_ctx = set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")))
    _config_ctx.__enter__()
    # vLLM-Omni's own diffusion groups (they also bind vLLM's tensor-parallel group), as its worker does.
    # The WORLD group first (gloo, CPU; shared with the SGLang shim): vLLM-Omni then skips its GPU
    # device selection.
    from shims import world_group

    init = world_group()
    omni_ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method=init, backend="gloo")
    omni_ps.initialize_model_parallel(backend="gloo")
    _installed = True
