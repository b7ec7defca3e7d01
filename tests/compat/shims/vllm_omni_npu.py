"""vLLM-Omni's MXFP8 method as it is chosen on an Ascend NPU, on this CPU machine.

``DiffusionMXFP8Config.get_quant_method`` (``vllm_omni/quantization/mxfp8_config.py``) asks the
platform: on an NPU a serialized checkpoint gets ``NPUMxfp8LinearMethod``; on XPU and everywhere
else (CUDA, CPU) it raises NotImplementedError. ``as_npu`` makes that one question answer "NPU" for
the duration of a ``with`` block, so that the module tree and its parameters are the ones an NPU
would build; nothing is loaded onto an NPU (``create_weights`` and the weight loaders are plain
torch; ``process_weights_after_loading``, which calls NPU kernels, is never called).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator


@contextlib.contextmanager
def as_npu() -> Iterator[None]:
    import vllm_omni.quantization.mxfp8_config as mxfp8_config

    saved = mxfp8_config.current_omni_platform
    mxfp8_config.current_omni_platform = types.SimpleNamespace(is_npu=lambda: True, is_xpu=lambda: False)
    try:
        yield
    finally:
        mxfp8_config.current_omni_platform = saved
