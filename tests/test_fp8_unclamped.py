"""The FP8 chunked paths skip the clamp where ``scale = scale_from_amax(amax)`` bounds the quotient
(``conversion_core.formats.fp8.UNCLAMPED_BOUND``): the cast does the clamp's work there, and the
bytes equal the clamping references, also on rows whose ``amax / scale`` rounds above 448."""

from __future__ import annotations

import torch
from conversion_core_cutlass_fp8.torch_path import quantize_rows, reference_quantize_rows
from conversion_core_deepgemm_fp8.torch_path import quantize_blocks, reference_quantize_blocks

from conversion_core.formats.fp8 import E4M3, E4M3_MAX, UNCLAMPED_BOUND, scale_from_amax


def test_cast_saturates_like_the_clamp_above_448() -> None:
    top = torch.tensor(UNCLAMPED_BOUND, dtype=torch.float32)
    v = torch.linspace(E4M3_MAX, float(top), 1001)
    v = torch.cat([v, torch.nextafter(top, torch.tensor(1e9)).reshape(1)])  # a margin above the bound
    v = torch.cat([v, -v])
    assert torch.equal(v.to(E4M3).view(torch.uint8), v.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8))


def _overshooting_amaxes(n: int) -> torch.Tensor:
    """bf16 amaxes whose float32 ``amax / scale_from_amax(amax)`` rounds above 448."""
    a = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    a = a[torch.isfinite(a) & (a > 0)]
    over = a[a / scale_from_amax(a.clone()) > E4M3_MAX]
    assert over.numel() >= n, "no bf16 amax overshoots: pick another dtype for this test"
    return over[torch.linspace(0, over.numel() - 1, n).long()]


def test_bytes_equal_clamping_references() -> None:
    amax = _overshooting_amaxes(256)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(256, 384, generator=g) * 2 - 1) * amax.unsqueeze(1)
    x[:, 7] = amax  # the row maximum itself, both signs
    x[:, 8] = -amax
    x = x.to(torch.bfloat16)
    out, scale = torch.empty(256, 384, dtype=E4M3), torch.empty(256)
    ref, ref_scale = torch.empty(256, 384, dtype=E4M3), torch.empty(256)
    quantize_rows(x, out, scale, "t")
    reference_quantize_rows(x, ref, ref_scale, "t")
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)) and torch.equal(scale, ref_scale)
    blocks = x.reshape(2, 128, 384)[:, :, :].reshape(256, 384)
    bout, bscale = torch.empty(256, 384, dtype=E4M3), torch.empty(2, 3)
    bref, bref_scale = torch.empty(256, 384, dtype=E4M3), torch.empty(2, 3)
    quantize_blocks(blocks, bout, bscale, (128, 128), "t")
    reference_quantize_blocks(blocks, bref, bref_scale, (128, 128), "t")
    assert torch.equal(bout.view(torch.uint8), bref.view(torch.uint8)) and torch.equal(bscale, bref_scale)
