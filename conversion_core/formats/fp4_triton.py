"""Triton building blocks shared by the FP4 (e2m1) kernels of the NVFP4 and MX plugins.

Imported only by plugins' Triton kernel modules (never by ``import conversion_core``), so the
core does not need triton. The numerics are those of :mod:`conversion_core.formats.fp4`:
round to nearest even onto ``0, .5, 1, 1.5, 2, 3, 4, 6``, sign bit ``v < 0`` (so ``-0.0`` gives
code 0 and a negative value that rounds to zero gives code 8), even element in the low nibble.

The "words" helpers serve the fast path of both kernels: a bf16 source whose rows are contiguous
is read as int32 words, two elements per word (element ``2i`` in the low half, little-endian),
so a tile is built straight from pointer arithmetic and every load is a vector load; the packed
byte of word ``i`` is the nibble pair of its two elements, stored at the same tile coordinates.
No reshape, split or broadcast of a tile is needed (each of those is a layout conversion through
shared memory on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: ``bits(2**22)``: ``bits(a + 2**22) - bits(2**22)`` is ``a / 0.5`` rounded to nearest even, for 0 <= a < 2**22.
_MAGIC_HALF_BITS = tl.constexpr(0x4A800000)
#: float32 bit patterns at or above this (absolute value) are Inf or NaN.
NON_FINITE_BITS = tl.constexpr(0x7F800000)
#: Tensors whose every offset stays below this may use int32 address math.
INT32_LIMIT = 1 << 31


@triton.jit
def _e2m1_cmp(v):
    """Nibble code of float32 ``v`` (|v| <= 6): RNE by seven bucket edges, sign bit ``v < 0``.

    The edges are the midpoints of the grid; a midpoint goes to the even code (0.25 -> 0,
    0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
    """
    a = tl.abs(v)
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return idx | ((v < 0.0).to(tl.int32) << 3)


@triton.jit
def _e2m1_index_cmp(a):
    """Magnitude index (0..7) of float32 ``a`` (``0 <= a``, any size: above 5 is 7) by the seven bucket edges."""
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    return idx + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)


@triton.jit
def _e2m1_index_magic(a):
    """The index of :func:`_e2m1_index_cmp` for ``0 <= a <= 6``, by one rounding add instead of seven comparisons.

    The e2m1 grid steps by 0.5 below 2, by 1 in [2, 4) and by 2 in [4, 6]: adding ``c = 2**22,
    2**23, 2**24`` (whose float32 ulp is that step) rounds ``a`` onto the grid with the hardware's
    IEEE round-to-nearest-even (ties to the even multiple of the step, which is the even code),
    and ``bits(a + c) - bits(c)`` counts the steps: the index itself in [0, 2), the index minus 2
    in [2, 4), minus 4 in [4, 6]; that offset is ``(bits(c) - bits(2**22)) >> 22`` (0, 2, 4). A
    value rounding up to the next regime's first point (1.75 -> 2, 3.5 -> 4) gets that point's
    index from either side. ``a + c`` adds a min or an abs (never a product), so no FMA
    contraction can change it; the interpreter's numpy float32 add rounds the same way.
    """
    c = tl.where(a < 2.0, 4194304.0, tl.where(a < 4.0, 8388608.0, 16777216.0))
    cb = c.to(tl.int32, bitcast=True)
    return (a + c).to(tl.int32, bitcast=True) - cb + ((cb - _MAGIC_HALF_BITS) >> 22)


@triton.jit
def _e2m1_code(v, limit, MAGIC: tl.constexpr):
    """Nibble code of float32 ``v`` clamped to ``±limit`` (``0 <= limit <= 6``; scalar or broadcastable).

    ``min(|v|, limit)`` is ``|clamp(v, -limit, limit)|`` and the clamp keeps the sign, so no
    separate clamp is spent. MAGIC picks :func:`_e2m1_index_magic`, else the comparisons; both
    give the same index for every float32. NaN gives an unspecified code: callers flag NaN/Inf.
    """
    a = tl.minimum(tl.abs(v), limit)
    if MAGIC:
        idx = _e2m1_index_magic(a)
    else:
        idx = _e2m1_index_cmp(a)
    return idx | ((v < 0.0).to(tl.int32) << 3)


@triton.jit
def _bf16_lo(w):
    """float32 value of the low bf16 of int32 word ``w`` (the even element)."""
    return (w << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_hi(w):
    """float32 value of the high bf16 of int32 word ``w`` (the odd element)."""
    return (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _abs_bits_max(w):
    """int32 ``max(bits|lo|, bits|hi|)`` of a word of two bf16: ordered like the float magnitudes.

    Non-negative float32 bit patterns sort as their values, and NaN sorts above Inf, so a group's
    integer max is its exact amax and ``>= NON_FINITE_BITS`` exactly when the group holds NaN/Inf
    (a float max on the GPU would drop the NaN).
    """
    return tl.maximum((w << 16) & 0x7FFFFFFF, w & 0x7FFF0000)


@triton.jit
def _flag_non_finite(flag_ptr, amax_bits):
    """Set ``flag[0]`` where any group amax is NaN/Inf: a masked store, no tile-wide reduction."""
    bad = amax_bits >= NON_FINITE_BITS
    tl.store(flag_ptr + tl.zeros_like(amax_bits), tl.full(amax_bits.shape, 1, tl.int32), mask=bad)


@triton.jit
def _pack_nibbles(lo_code, hi_code):
    """The packed byte: the even element's code in the low nibble."""
    return (lo_code | (hi_code << 4)).to(tl.uint8)


def bf16_words(x: torch.Tensor) -> torch.Tensor | None:
    """int32 view (two elements per word) of a 3-D bf16 ``(E, N, K)`` source, or None when its layout has none.

    Needs K even, K contiguous (``stride(-1) == 1``) and every other stride and the storage
    offset even (4-byte aligned rows); the view keeps the tensor's other strides, halved.
    """
    if x.dtype != torch.bfloat16 or x.dim() != 3 or x.shape[-1] % 2 or x.numel() == 0:
        return None
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        return None
    try:
        return x.view(torch.int32)
    except RuntimeError:
        return None


def needs_int64(words: torch.Tensor, out_elements: int) -> bool:
    """Whether some source offset (in words) or output offset reaches 2**31 (then the kernels use int64)."""
    span = 1 + sum((n - 1) * s for n, s in zip(words.shape, words.stride(), strict=True))
    return max(span, out_elements) >= INT32_LIMIT


#: ``bits(1.0)``: e2m1's smallest normal magnitude; below it e2m1 steps by 0.5.
_E2M1_MIN_NORMAL_BITS = tl.constexpr(0x3F800000)
#: Added to the magnitude bits before the shift by 22: the RNE half (``2**21 - 1``, the tie bit added
#: apart) and the exponent rebias ``(127 - 1) << 1`` moved before the shift (a multiple of ``2**22``).
_E2M1_NORMAL_ADD = tl.constexpr(0x1FFFFF - (252 << 22))


@triton.jit
def _e2m1_index_int(a):
    """The index of :func:`_e2m1_index_cmp` for float32 ``0 <= a <= 6`` by integer rounding of its bits.

    For ``a >= 1`` the index is ``a``'s bits rounded to one mantissa bit (integer RNE: the carry
    runs into the exponent, 1.75 -> 2, 3.5 -> 4) and rebiased; below 1 one add of ``2**22`` (ulp
    0.5, e2m1's subnormal step) rounds with IEEE RNE (0.25 -> 0, 0.75 -> 1) and its bits count the
    steps. Fewer instructions than the magic-constant select and exact on any hardware: integer
    ops and one add that sees a min (never a product, so no FMA contraction).
    """
    mag = a.to(tl.int32, bitcast=True)
    tiny = (a + 4194304.0).to(tl.int32, bitcast=True) - _MAGIC_HALF_BITS
    normal = (mag + _E2M1_NORMAL_ADD + ((mag >> 22) & 1)) >> 22
    return tl.where(mag < _E2M1_MIN_NORMAL_BITS, tiny, normal)
