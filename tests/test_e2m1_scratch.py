"""``E2m1Scratch`` (the CPU paths' e2m1 rounding without comparisons) equals ``e2m1_codes``.

The float32 inputs that decide a rounding are the grid points, the ties between them and their
neighbouring floats; every bf16 bit pattern (all binades, both signs, subnormals, zeros) covers the
exponent handling; random float32 bit patterns the rest. ``e2m1_codes`` is itself tested against
a nearest-even definition in ``test_fp4_e8m0.py``.
"""

from __future__ import annotations

import torch

from conversion_core.formats.fp4 import E2m1Scratch, e2m1_codes, pack_e2m1

POINTS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0]


def _neighbourhoods(ulps: int = 4) -> torch.Tensor:
    """Every point and tie with its ``ulps`` float32 neighbours on each side, both signs."""
    bits = torch.tensor(POINTS, dtype=torch.float32).view(torch.int32)
    near = (bits.unsqueeze(1) + torch.arange(-ulps, ulps + 1, dtype=torch.int32)).clamp(min=0).reshape(-1)
    x = near.view(torch.float32)
    return torch.cat([x, -x])


def _all_bf16() -> torch.Tensor:
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return x[torch.isfinite(x)]


def _random_bits(n: int = 1 << 18) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return x[torch.isfinite(x)]


def _even(x: torch.Tensor) -> torch.Tensor:
    return x[: x.numel() // 2 * 2].contiguous()


def test_codes_equal_e2m1_codes() -> None:
    scratch = E2m1Scratch(1 << 18)
    for x in (_neighbourhoods(), _all_bf16(), _all_bf16() * 3.0, _random_bits(), _random_bits() * 1e-38):
        x = _even(x)
        for start in range(0, x.numel(), 1 << 18):
            chunk = x[start : start + (1 << 18)]
            want = e2m1_codes(chunk.clone())
            got = scratch.codes_into(chunk.clone())
            assert torch.equal(got, want), chunk[got != want][:8].tolist()


def test_pack_into_equals_pack_e2m1() -> None:
    x = _even(_all_bf16())[: 40 * 1024].reshape(40, 32, 32)
    out = torch.full((40, 32, 16), 0xA5, dtype=torch.uint8)
    E2m1Scratch(x.numel()).pack_into(x.clone(), out)
    assert torch.equal(out, pack_e2m1(e2m1_codes(x)))
