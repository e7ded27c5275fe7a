"""The torch path of the 128x128 block quantizer: runs on any device, defines the bytes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conversion_core.fp8 import non_finite_error, quantize_into, scale_from_amax


def quantize_blocks(
    src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, block: tuple[int, int], name: str
) -> None:
    """Write e4m3 bytes into ``out`` and per-block float32 scales into ``scale_out``."""
    x = src.reshape(-1, *src.shape[-2:]).float()  # (E, N, K); a copy for non-float32 sources
    e, n, k = x.shape
    br, bc = block
    nb, kb = -(-n // br), -(-k // bc)
    padded = F.pad(x.abs(), (0, kb * bc - k, 0, nb * br - n))  # zeros never raise a block's amax
    amax = padded.view(e, nb, br, kb, bc).amax(dim=(2, 4))
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf
        raise non_finite_error(name, src.shape)
    scale = scale_from_amax(amax)
    full = scale.repeat_interleave(br, dim=1).repeat_interleave(bc, dim=2)[:, :n, :k]
    quantize_into(x, full, out.view(e, n, k))
    scale_out.view(e, nb, kb).copy_(scale)
