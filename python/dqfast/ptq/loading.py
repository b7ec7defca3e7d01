"""Loading a diffusers transformer from its directory (PTQ and ``dqfast.verify`` both need it;
kept out of ``flow`` so that ``verify`` does not import the PTQ flow, which imports ``verify``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqfast.errors import CheckpointError, DqfastError
from dqfast.quant_config import load_json
from dqfast.reader import open_checkpoint

__all__ = ["load_transformer"]


def load_transformer(component_dir: str | Path, dtype: Any = None) -> Any:
    """A diffusers transformer from its directory, in ``dtype`` (default BF16).

    ``from_pretrained`` first; models with ``_keep_in_fp32_modules`` (Wan) need accelerate
    there, so without it the model is built from its config and loaded with a strict
    ``load_state_dict`` (every tensor in ``dtype``; needs the full model in float32 while
    it is built).
    """
    import diffusers
    import torch

    component_dir = Path(component_dir)
    dtype = dtype or torch.bfloat16
    config = load_json(component_dir / "config.json")  # regular file, strict JSON, typed errors
    cls_name = config.get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None:
        raise CheckpointError(
            f"{component_dir / 'config.json'}: unknown diffusers class {cls_name!r}", path=str(component_dir / "config.json")
        )
    # The Rust reader's shard/index rule decides which files the checkpoint is (and refuses what
    # it finds ambiguous: several files without an index, a shard no index entry names), for both
    # paths below — diffusers' own rule would load a directory every other dqfast command refuses.
    files = open_checkpoint(component_dir).files
    try:
        import accelerate  # noqa: F401
    except ImportError:
        accelerate = None
    try:
        if accelerate is not None:
            return cls.from_pretrained(component_dir, torch_dtype=dtype).eval()
        model = cls.from_config(cls.load_config(component_dir))
        model.load_state_dict(_read_state_dict(files), strict=True)
    except DqfastError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        # diffusers / torch refusing files that do not fit the class (missing or unexpected
        # tensors, wrong shapes, an unreadable config): bad input, so a typed one-line error.
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{component_dir}: cannot load it as {cls_name}: {msg[:400]}", path=str(component_dir)) from None
    return model.to(dtype).eval()


def _read_state_dict(files: list[Path]) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in files:  # the Rust reader's shard/index rule (dqfast.reader.open_checkpoint)
        state.update(load_file(str(f)))
    return state
