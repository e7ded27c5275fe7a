"""conversion-core plugin: plain casts to bf16/fp32 (``hf_raw``) and the no-quantization rule."""

from __future__ import annotations

from typing import Any

import torch

import conversion_core as cc
from conversion_core.contract import all_finite


def _cast(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    """Cast ``src`` into ``out``; refuse a NaN/Inf written, copied from ``src`` or made by the cast
    (a finite fp32 beyond bf16's range becomes Inf): the output is checked, one extra pass."""
    out.copy_(src)
    if not all_finite(out):
        what = "holds NaN or Inf" if not all_finite(src) else f"holds finite values beyond {out.dtype}'s range"
        raise cc.ConversionInputError(
            f"cast to {out.dtype}: source of shape {tuple(src.shape)} {what}; refusing to write Inf/NaN"
        )


def unquantized_checkpoint(qc: dict[str, Any]) -> cc.TargetFormat:
    """A bf16 checkpoint carries no quantization_config."""
    return cc.TargetFormat(quantization_config=lambda kept: None)


BF16_CAST = cc.Conversion(
    name="bf16_cast", fn=_cast, requires_scale=False, dst_dtype=torch.bfloat16, target_format=unquantized_checkpoint
)
FP32_CAST = cc.Conversion(name="fp32_cast", fn=_cast, requires_scale=False, dst_dtype=torch.float32)


def is_unquantized(qc: dict[str, Any]) -> bool:
    """The model has no quantization_config (the resolver passes ``{}``)."""
    return not qc


@cc.hookimpl
def register_conversion() -> list[cc.Conversion]:
    return [BF16_CAST, FP32_CAST]


@cc.hookimpl
def default_rule() -> cc.Rule:
    return cc.Rule(conversion="bf16_cast", predicate=is_unquantized, priority=0, name="no-quantization")
