"""Per-model PTQ filters, as data.

Each preset lists the regexes of ModelOpt's diffusion example
(`examples/diffusers/quantization/utils.py`, the `filter_func_*` functions that
`quantize.py` passes to `mtq.disable_quantizer` after calibration). A quantizer
whose module-relative name (e.g. ``transformer_blocks.0.attn.to_q.weight_quantizer``)
matches any pattern with ``re.match`` (anchored at the start, as in ModelOpt) is
disabled, so its Linear stays in the base precision and lands in the export's
``ignore`` list.

Kept as data, not code, so that the presets are versioned and can be diffed
against newer ModelOpt releases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The ModelOpt release (and example tree) these patterns were read from.
MODELOPT_SOURCE = "NVIDIA/Model-Optimizer examples/diffusers/quantization (0.47 era)"


@dataclass(frozen=True)
class EdgeBlocks:
    """Keep the first/last blocks of a block list unquantized, sized from the model.

    ModelOpt's newer Qwen-Image recipe computes the excluded indices from the
    actual block count; resolving them at quantize time keeps tiny test models
    meaningful too.
    """

    module_list: str
    first_n: int
    last_n: int


@dataclass(frozen=True)
class PtqPreset:
    name: str
    # Regexes matched with re.match against quantizer names.
    disable: tuple[str, ...]
    # ModelOpt's diffusion example uses its FP8-MHA NVFP4 recipe for FLUX models only.
    nvfp4_recipe: str = "configs/ptq/presets/diffusers/nvfp4"
    fp8_recipe: str = "configs/ptq/presets/diffusers/fp8"
    edge_blocks: EdgeBlocks | None = None
    note: str = ""

    def disable_patterns(self, block_counts: dict[str, int] | None = None) -> list[str]:
        """All disable regexes, with edge blocks resolved against the model's block counts."""
        patterns = list(self.disable)
        if self.edge_blocks is not None:
            eb = self.edge_blocks
            count = (block_counts or {}).get(eb.module_list)
            if count is None:
                raise ValueError(f"preset {self.name!r} needs the length of {eb.module_list!r}")
            keep = sorted(set(range(min(eb.first_n, count))) | set(range(max(count - eb.last_n, 0), count)))
            if keep:
                idx = "|".join(str(i) for i in keep)
                patterns.append(rf"{re.escape(eb.module_list)}\.({idx})\.")
        return patterns


PRESETS: dict[str, PtqPreset] = {
    # filter_func_default: applied by ModelOpt to every model type without its own filter.
    "default": PtqPreset(
        name="default",
        disable=(
            r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding"
            r"|pos_embed|time_text_embed|context_embedder|norm_out|x_embedder).*",
        ),
    ),
    # filter_func_flux_dev (flux-dev and flux2-dev; flux-schnell falls back to default).
    "flux": PtqPreset(
        name="flux",
        disable=(
            r"(proj_out.*|.*(time_text_embed|context_embedder|x_embedder|norm_out"
            r"|time_guidance_embed|stream_modulation).*)",
        ),
        nvfp4_recipe="configs/ptq/presets/diffusers/nvfp4_fp8_mha",
    ),
    # filter_func_wan_video: literal block indices of the 40-block Wan2.2-A14B transformer
    # (ModelOpt applies the same indices to the 30-block 5B model).
    "wan": PtqPreset(
        name="wan",
        disable=(r".*(patch_embedding|condition_embedder|proj_out|blocks\.(0|1|2|37|38|39)\.).*",),
    ),
    # filter_func_qwen_image / MODEL_DEFAULTS[qwen-image]["block_range"]: only
    # transformer_blocks are quantized, minus the first 2 and last 2 blocks.
    "qwen-image": PtqPreset(
        name="qwen-image",
        disable=(r"(?!transformer_blocks\.)",),
        edge_blocks=EdgeBlocks("transformer_blocks", 2, 2),
    ),
    # ModelOpt's example has no HunyuanVideo model type; it would use filter_func_default.
    "hunyuan-video": PtqPreset(
        name="hunyuan-video",
        disable=(
            r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding"
            r"|pos_embed|time_text_embed|context_embedder|norm_out|x_embedder).*",
        ),
        note="no HunyuanVideo filter in ModelOpt's example: its default filter",
    ),
}


def get_preset(name: str) -> PtqPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown PTQ preset {name!r}; known: {sorted(PRESETS)}") from None


def compile_filter(patterns: list[str]):
    """A ModelOpt filter function (name -> bool) for the given regexes."""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.match(name) for c in compiled)
