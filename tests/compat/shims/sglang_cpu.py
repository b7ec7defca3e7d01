"""SGLang Diffusion 0.5.23 on a CPU-only machine, for building a DiT through its own transformer loader.

SGLang's loader runs on CPU as it is (its CPU platform picks gloo and the torch SDPA attention
backend); the runtime state it expects is set up here, and one GPU-only step is skipped:

- Its distributed groups for one process: a gloo WORLD group (shared with the vLLM shim: whichever
  engine comes first creates it), then SGLang's own ``init_distributed_environment`` and
  ``initialize_model_parallel`` (TP, SP, CFG, DP all 1). Its DiTs ask the TP size at construction.
- ``process_model_weights_after_loading`` (``runtime/utils/quantization_utils.py``, called by
  ``runtime/loader/fsdp_load.py`` after the state dict is loaded) is replaced by a no-op: it rewrites
  the *loaded* weights for the GEMM kernels (FP8: requantize to one max scale with the CUDA kernel
  ``sgl_per_tensor_quant_fp8``; NVFP4: swizzled scales), which has no CPU implementation. Config
  parsing, module construction, parameter creation and the state-dict load all run before it.
"""

from __future__ import annotations

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    import sglang.multimodal_gen.runtime.loader.fsdp_load as fsdp_load
    from sglang.multimodal_gen.runtime.distributed import parallel_state as ps

    from shims import world_group

    init = world_group()
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method=init, backend="gloo")
    ps.initialize_model_parallel(sequence_parallel_degree=1, backend="gloo")
    fsdp_load.process_model_weights_after_loading = lambda model, *a, **k: 0
    _installed = True
