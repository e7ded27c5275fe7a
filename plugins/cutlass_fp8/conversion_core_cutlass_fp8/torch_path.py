"""The torch path of the per-channel quantizer: runs on any device, defines the bytes."""

from __future__ import annotations

import torch

from conversion_core.fp8 import non_finite_error, quantize_into, scale_from_amax


def quantize_rows(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, name: str) -> None:
    """Write e4m3 bytes into ``out`` and one float32 scale per row into ``scale_out``."""
    x = src.float()
    amax = x.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf
        raise non_finite_error(name, src.shape)
    scale = scale_from_amax(amax)
    quantize_into(x, scale.unsqueeze(-1), out)
    scale_out.copy_(scale)
