"""Exact float32 -> small float format rounding with vectorised integer ops (CPU or any device).

``minifloat_codes(x, exponent_bits, mantissa_bits)`` returns the bit patterns (int32, sign at bit
``exponent_bits + mantissa_bits``) of ``x`` rounded to nearest-even on the grid of a format with
that many exponent and mantissa bits, IEEE-style bias ``2**(exponent_bits-1) - 1`` and
subnormals. e4m3fn is ``(4, 3)``, e5m2 ``(5, 2)``, e2m1 (FP4) ``(2, 1)``.

Domain: ``x`` finite and already clamped to the format's largest finite value (the FP8
quantizers clamp to ±448 and refuse NaN/Inf before rounding). Nothing saturates here.

Method (Giesen's float->half rounding), with ``a`` the float32 bits of ``|x|``, ``s = 23 - m``:

- normal results (``|x| >= 2**(1 - bias)``): ``(a + 2**(s-1) - 1 + ((a >> s) & 1) - ((127 - bias)
  << 23)) >> s``. Adding ``2**(s-1) - 1`` plus the kept lsb carries into bit ``s`` exactly when
  the dropped bits exceed half, or equal half with an odd lsb: round-to-nearest-even; a carry out
  of the mantissa bumps the exponent, which is the correct next grid value.
- subnormal results: the float32 sum ``|x| + 2**(24 - bias - m)`` (a float32 whose spacing is the
  format's subnormal spacing ``2**(1 - bias - m)``) is IEEE round-to-nearest-even onto that
  spacing; its bits minus the magic's bits are the subnormal code (the top one, rounding up to
  ``2**(1 - bias)``, is the first normal code, as it should be).
- the sign bit is copied from bit 31, so -0 and tiny negatives that round to zero keep it.

Speed: on CPU this is ~10 eager ops, slower than torch's own ``.to(float8_e4m3fn)`` (see
``benchmarks/bench_cpu_rounding.py``), so the FP8 quantizers keep the cast; this is the exact
reference for formats torch cannot cast to (e2m1) and the definition they can be tested against.
"""

from __future__ import annotations

import torch


def minifloat_codes(x: torch.Tensor, exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """int32 codes of float32 ``x`` rounded to nearest-even on the ``(exponent_bits, mantissa_bits)`` grid."""
    if x.dtype != torch.float32:
        raise TypeError(f"minifloat_codes expects float32, got {x.dtype}")
    if not (1 <= exponent_bits <= 8 and 0 <= mantissa_bits <= 22):
        raise ValueError(f"unsupported format e{exponent_bits}m{mantissa_bits}")
    bias = (1 << (exponent_bits - 1)) - 1
    shift = 23 - mantissa_bits
    a = torch.bitwise_and(x.contiguous().view(torch.int32), 0x7FFFFFFF)
    normal = torch.bitwise_right_shift(a, shift).bitwise_and_(1).add_(a)
    normal.add_((1 << (shift - 1)) - 1 - ((127 - bias) << 23)).bitwise_right_shift_(shift)
    magic = 2.0 ** (24 - bias - mantissa_bits)
    magic_bits = int(torch.tensor(magic, dtype=torch.float32).view(torch.int32).item())
    sub = torch.add(a.view(torch.float32), magic).view(torch.int32).sub_(magic_bits)
    codes = torch.where(a < ((128 - bias) << 23), sub, normal)
    sign = torch.bitwise_right_shift(x.contiguous().view(torch.int32), 31 - exponent_bits - mantissa_bits)
    return codes.bitwise_or_(sign.bitwise_and_(1 << (exponent_bits + mantissa_bits)))
