"""Measured GEMM back-end choice per (GPU, layer shape), cached on disk per GPU.

`Fp8Linear(backend="autotune")` (or `DQFAST_FP8_GEMM_BACKEND=autotune`) times every back end
that can run the layer (`torch._scaled_mm` behind eager or Triton activation quantization,
FlashInfer's cuBLASLt / cuDNN / CUTLASS GEMMs) the first time it sees a shape, keeps the
fastest, and writes the choice to a JSON file named after the GPU. `backend="auto"` reads that
file too: a shape tuned once (in any process on the same kind of GPU) runs its measured winner,
an untuned one the heuristic default. Nothing is measured during CUDA-graph capture.

Cache location: `$DQFAST_AUTOTUNE_CACHE` (a directory), else `$XDG_CACHE_HOME/dqfast`, else
`~/.cache/dqfast`; one file per GPU model and compute capability, e.g.
`fp8-gemm-NVIDIA_H200-sm90.json`. Delete the file to re-tune.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

CACHE_VERSION = 1


def m_bucket(m: int) -> int:
    """Rows are tuned per power-of-two bucket (a diffusion model sees a handful of M values)."""
    b = 16
    while b < m:
        b *= 2
    return b


def shape_key(m: int, k: int, n: int, weight_mode: str, act_mode: str, dtype: torch.dtype) -> str:
    return f"M{m_bucket(m)}_K{k}_N{n}_w{weight_mode}_a{act_mode}_{str(dtype).removeprefix('torch.')}"


def device_slug(name: str, capability: tuple[int, int]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + f"-sm{capability[0]}{capability[1]}"


def cache_dir() -> Path:
    env = os.environ.get("DQFAST_AUTOTUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dqfast"


def cuda_event_timer(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median ms per call of `reps` back-to-back calls (host launch cost included, as in eager use)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


class Autotuner:
    """One GPU's table of shape key -> fastest back end, backed by one JSON file."""

    def __init__(self, path: Path, device_name: str = "", timer: Callable[[Callable[[], object]], float] | None = None) -> None:
        self.path = Path(path)
        self.device_name = device_name
        self.timer = timer or cuda_event_timer
        self.entries: dict[str, dict] = {}
        self.measured = 0  # how many shapes this process timed (tests read it)
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            warnings.warn(f"dqfast autotune cache {self.path} unreadable ({exc}); re-tuning", stacklevel=2)
            return
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            warnings.warn(f"dqfast autotune cache {self.path} has another format; re-tuning", stacklevel=2)
            return
        self.entries = {k: v for k, v in data["entries"].items() if isinstance(v, dict) and isinstance(v.get("backend"), str)}

    def _save(self) -> None:
        # Written whole to a temporary file, then renamed: a reader never sees half a file.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": CACHE_VERSION, "device": self.device_name, "torch": torch.__version__, "entries": self.entries}
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def lookup(self, key: str, allowed: tuple[str, ...] | None = None) -> str | None:
        entry = self.entries.get(key)
        if entry is None or (allowed is not None and entry["backend"] not in allowed):
            return None
        return entry["backend"]

    def tune(self, key: str, candidates: dict[str, Callable[[], object]]) -> str:
        """Time each candidate (one raising is skipped and its error kept), store and return the fastest."""
        times: dict[str, float] = {}
        errors: dict[str, str] = {}
        for name, fn in candidates.items():
            try:
                times[name] = float(self.timer(fn))
            except Exception as exc:  # a back end that cannot run this layer is simply not chosen
                errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if not times:
            raise RuntimeError(f"autotune {key}: no back end ran: {errors}")
        best = min(times, key=times.__getitem__)
        self.entries[key] = {"backend": best, "times_ms": times, **({"errors": errors} if errors else {})}
        self.measured += 1
        try:
            self._save()
        except OSError as exc:  # a read-only cache dir must not stop inference
            warnings.warn(f"dqfast autotune cache {self.path} not written ({exc})", stacklevel=2)
        return best

    def choose(self, key: str, candidates: dict[str, Callable[[], object]]) -> str:
        return self.lookup(key, tuple(candidates)) or self.tune(key, candidates)


_TUNERS: dict[tuple, Autotuner] = {}


def tuner_for(device: torch.device) -> Autotuner:
    """The process-wide Autotuner of a CUDA device (one per cache file)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(idx)
    cap = torch.cuda.get_device_capability(idx)
    path = cache_dir() / f"fp8-gemm-{device_slug(name, cap)}.json"
    tuner = _TUNERS.get((str(path), idx))
    if tuner is None:
        tuner = _TUNERS[(str(path), idx)] = Autotuner(path, device_name=name)
    return tuner
