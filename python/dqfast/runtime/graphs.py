"""Run a loaded model under CUDA graphs: one capture per input signature, then replays.

Eager `Fp8Linear` / `Nvfp4Linear` calls cost host time (Python, Triton and cuBLAS launches); at
M = 1024 a layer's GPU work is shorter than that, so an eager model is launch-bound. A CUDA
graph replays the captured kernels with no host work per layer:

    from dqfast.runtime import CudaGraphRunner, load_quantized
    load_quantized(model, ckpt)
    run = CudaGraphRunner(model)            # or CudaGraphRunner(model.forward)
    with torch.inference_mode():
        out = run(hidden_states=x, ...)     # first call per input shape: warm-up + capture
        out = run(hidden_states=x2, ...)    # same shapes: copy inputs in, replay

Rules (those of `torch.cuda.graphs`): tensor arguments must be CUDA tensors; shapes, dtypes and
non-tensor arguments select the captured graph (a new combination captures a new one); the
returned tensors are the graph's static outputs, overwritten by the next replay of that graph
(pass `clone_outputs=True` to get copies). Warm-up calls run eagerly first, so autotuning
(`backend="autotune"`), Triton compilation and every module's cached scales are settled
before capture; nothing may sync with the host inside the captured region.

`torch.compile(model, mode="reduce-overhead")` is the other way: it compiles (Fp8Linear takes its
traceable path, so activation quantization fuses into the producing kernels) and then uses CUDA
graphs itself; it costs a compilation per shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .linear import _ACT_CACHE


class CudaGraphRunner:
    """Callable wrapper that captures `fn` (a module or function) once per input signature."""

    def __init__(self, fn: Callable[..., Any], warmup: int = 2, clone_outputs: bool = False) -> None:
        if warmup < 1:
            raise ValueError(f"CudaGraphRunner: warmup={warmup} must be >= 1 (the eager calls settle caches before capture)")
        self.fn = fn
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self.graphs: dict[tuple, tuple] = {}
        self.pool: Any = None  # the first graph's memory pool, shared by later captures

    @staticmethod
    def _signature(leaves: list, spec) -> tuple:
        sig: list[tuple] = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                if not leaf.is_cuda:
                    raise ValueError(f"CudaGraphRunner: input #{i} is a {leaf.device} tensor; graphs replay CUDA tensors only")
                sig.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
            else:
                sig.append(("V", leaf))
        return (str(spec), tuple(sig))

    def _capture(self, leaves: list, spec):
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        _ACT_CACHE.clear()  # nothing eager may be reused inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*args, **kwargs)
        _ACT_CACHE.clear()  # and nothing from the capture outside it
        if self.pool is None:
            self.pool = graph.pool()  # later captures (other shapes) share the memory pool
        return graph, static, out

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._signature(leaves, spec)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(leaves, spec)
        graph, static, out = entry
        for dst, src in zip(static, leaves):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        if self.clone_outputs:
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return out
