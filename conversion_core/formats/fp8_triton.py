"""Triton building blocks shared by every FP8 plugin's kernels, so all of them round alike.

Imported only by plugins' Triton kernel modules (never by ``import conversion_core``), so the
core does not need triton. The numerics are those of :mod:`conversion_core.formats.fp8`: a NaN-keeping
float32 amax, IEEE division, a clamp to ±448 and round-to-nearest-even into e4m3.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fp8 import E4M3_MAX, MIN_AMAX

# Globals a @triton.jit function reads must be constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
Q_MAX = tl.constexpr(E4M3_MAX)
AMAX_FLOOR = tl.constexpr(MIN_AMAX)


@triton.jit
def _max_keep_nan(a, b):
    """max that keeps NaN (the hardware max drops it), so a NaN anywhere makes the amax NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_amax(x, INTERPRET: tl.constexpr):
    """Per-row max |x| of a 2D tile, NaN when the row holds a NaN (the hardware max drops it)."""
    if INTERPRET:  # the interpreter calls a custom combine once per element, in Python: far too slow
        amax = tl.max(tl.abs(x), 1)
        amax = tl.where(tl.max((x != x).to(tl.int32), 1) > 0, float("nan"), amax)
    else:
        amax = tl.reduce(tl.abs(x), 1, _max_keep_nan)
    return amax


@triton.jit
def _non_finite(amax):
    """A NaN-keeping amax is NaN or Inf exactly when one of its elements was."""
    return (amax != amax) | (amax > FLT_MAX)


@triton.jit
def _div_exact(x, scale, recip, FAST_DIV: tl.constexpr):
    """``x / scale`` rounded to nearest (IEEE); ``recip`` must be ``div_rn(1, scale)``.

    FAST_DIV: q0 = x*recip is within 1 ulp of x/scale, the FMA residual x - q0*scale is exact,
    and q0 + residual*recip rounds to RN(x/scale) (Markstein's theorem): three instructions
    instead of a division. A zero q0 is kept as it is, with its sign (torch keeps -0; the
    correction step would give +0).
    """
    if FAST_DIV:
        q0 = x * recip
        rem = tl.fma(-q0, scale, x)
        q = tl.where(q0 == 0.0, q0, tl.fma(rem, recip, q0))
    else:
        q = tl.math.div_rn(x, scale)
    return q


@triton.jit
def _to_e4m3(q, SOFT_ROUND: tl.constexpr):
    """e4m3 of float32 ``q``: clamp to ±448, then round to nearest even.

    On a GPU the cast is cvt.rn.satfinite: RNE that saturates at ±448 itself, so no clamp is
    spent (tests/gpu checks the bytes, the 448 boundary included, against the torch path).
    SOFT_ROUND clamps and rounds with float32/int32 arithmetic to a value e4m3 holds exactly,
    so the cast has nothing left to round. Triton's interpreter needs this: its fp8 cast
    rounds half up, loses the mantissa carry (31.8 becomes 16) and does not saturate.
    """
    if SOFT_ROUND:
        q = tl.minimum(tl.maximum(q, -Q_MAX), Q_MAX)
        bits = q.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        a = mag.to(tl.float32, bitcast=True)
        tiny = (a + 16384.0) - 16384.0  # below 2**-6 e4m3 steps by 2**-9 = ulp(2**14) in float32
        normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576  # keep 3 of 23 mantissa bits, RNE
        rounded = tl.where(a < 0.015625, tiny.to(tl.int32, bitcast=True), normal)
        q = (rounded | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return q.to(tl.float8e4nv)
