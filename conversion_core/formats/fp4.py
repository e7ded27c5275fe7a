"""FP4 E2M1 values: rounding, nibble codes and two-per-byte packing, shared by every FP4 plugin.

E2M1 (OCP MX spec, 4 bits: sign, 2 exponent bits with bias 1, 1 mantissa bit, no Inf/NaN) holds
``0, 0.5, 1, 1.5, 2, 3, 4, 6`` and their negatives. A nibble code is ``sign << 3 | magnitude
index`` (index 0..7 in that order), so ``-0`` is code 8 and ``-6`` code 15.

Stable API (MXFP4 and NVFP4 plugins use it; keep the signatures):

- ``e2m1_codes(v)``: float32 -> uint8 codes 0..15, round-to-nearest-even after a saturating clamp
  to ±6; the sign bit is ``v < 0``: a negative value that rounds to zero gives ``-0`` (code 8), an
  exact ``-0.0`` gives code 0 — as compressed-tensors' ``cast_to_fp4`` (``sign(x) * round(|x|)``,
  ``sign(-0.0) == 0``) and its Triton ``_round_to_fp4`` (``where(x < 0, -32, 32)``) both do.
- ``pack_e2m1(codes)``: ``(..., K)`` codes -> ``(..., K/2)`` uint8, element ``2i`` in the low
  nibble and ``2i+1`` in the high nibble (compressed-tensors' ``pack_fp4_to_uint8`` order, which
  vLLM and transformers unpack); ``unpack_e2m1`` is its inverse.
- ``e2m1_values(codes)``: codes -> float32 values (``-0`` for code 8).
- ``quantize_e2m1_into(v, out)``: ``out = pack_e2m1(e2m1_codes(v))`` into a preallocated buffer.
- ``E2m1Scratch(numel).pack_into(v, out)``: the same bytes for one cache-sized chunk with no
  allocation and no comparison/``where`` (slow on CPU: each a scalar loop or a bool temporary);
  the CPU torch paths use it. ``v`` is clobbered.

Why round-to-nearest-even: it is what compressed-tensors' CPU ``cast_to_fp4`` (and its Triton
``_round_to_fp4``) computes — its bucket edges put every tie on the even code (0.25 -> 0,
0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4) — and what the MX spec and the
hardware cast (``cvt.rn.satfinite.e2m1x2``) do. The rounding itself is
:func:`conversion_core.formats.minifloat.minifloat_codes` with ``(2, 1)``, tested against a
grid search.

NaN has no E2M1 code: callers refuse NaN/Inf sources before rounding (the result for NaN is
unspecified here).
"""

from __future__ import annotations

import sys

import torch

from .minifloat import minifloat_codes

#: The largest E2M1 magnitude.
E2M1_MAX = 6.0
#: Code -> value for the 16 nibble codes (index 8 is -0.0).
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """uint8 nibble codes (0..15) of float32 ``v`` rounded to nearest-even, saturating at ±6."""
    if v.dtype != torch.float32:
        raise TypeError(f"e2m1_codes expects float32, got {v.dtype}")
    # ``+ 0.0`` turns -0.0 into +0.0 (IEEE) and changes nothing else: the sign bit becomes ``v < 0``.
    return minifloat_codes(v.clamp(-E2M1_MAX, E2M1_MAX).add_(0.0), 2, 1).to(torch.uint8)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: element ``2i`` low nibble, ``2i+1`` high nibble."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_e2m1 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dim, got shape {tuple(codes.shape)}")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: ``(..., K/2)`` uint8 -> ``(..., K)`` uint8 codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_e2m1 expects uint8, got {packed.dtype}")
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 value of each uint8 nibble code (0..15)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    return grid[codes.long()]


def quantize_e2m1_into(v: torch.Tensor, out: torch.Tensor) -> None:
    """``out = pack_e2m1(e2m1_codes(v))``: ``v`` float32 ``(..., K)``, ``out`` uint8 ``(..., K/2)``."""
    out.copy_(pack_e2m1(e2m1_codes(v)))


class E2m1Scratch:
    """Buffers for :meth:`pack_into` on float32 chunks of up to ``numel`` elements (one per worker, reused).

    The rounding, for ``a = |v|`` (``v`` clamped to ±6, -0.0 made +0.0), in five float32/int32 ops:
    the grid spacing is ``Q = 0.5`` below 2, 1 in ``[2, 4)``, 2 in ``[4, 6]``, i.e. ``Q = 2**(max(E,
    0) - 1)`` for ``a``'s binade ``2**E``; ``M = Q * 2**23`` (its bits: ``a``'s exponent field, at
    least 127, plus 22) is a float32 whose spacing is ``Q`` on ``[M, 2M)``, so ``a + M`` is ``a``
    rounded to nearest-even on that grid (one IEEE addition; a round-up to the next binade lands on
    its first grid value, as it should). The low byte of its bits is ``r / Q`` (0..4, 2..4 or 2..3),
    and the magnitude code is ``r / Q + 2 * (E' - 127)`` with ``E' = max(E, 0) + 127``; mod 256 that
    is ``low byte + byte(bits(M) >> 22) - 42``. The sign code (8) comes from bit 31 of ``v``.
    Checked against :func:`e2m1_codes` on every bf16 bit pattern and on float32 ties.
    """

    def __init__(self, numel: int, device: torch.device | str = "cpu") -> None:
        if torch.device(device).type == "cpu":  # this thread's kept buffers: no page faults per call
            from .cpu_chunks import thread_scratch

            def empty(key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
                return thread_scratch(f"e2m1.{key}", n, dtype)
        else:

            def empty(key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
                return torch.empty(n, dtype=dtype, device=device)

        self.a = empty("a", numel, torch.float32)
        self.bits = empty("bits", numel, torch.int32)
        self.codes = empty("codes", numel, torch.uint8)
        self.tmp = empty("tmp", numel, torch.uint8)
        self.pairs = empty("pairs", numel // 2, torch.int16)

    def codes_into(self, v: torch.Tensor) -> torch.Tensor:
        """uint8 codes of contiguous float32 ``v`` (at most ``numel``; exactly :func:`e2m1_codes`); clobbers ``v``."""
        n, shape = v.numel(), v.shape
        a, bits = self.a[:n].view(shape), self.bits[:n].view(shape)
        codes, tmp = self.codes[:n].view(shape), self.tmp[:n].view(shape)
        v.clamp_(-E2M1_MAX, E2M1_MAX).add_(0.0)  # -0.0 + 0.0 = +0.0: the sign bit becomes v < 0
        torch.abs(v, out=a)
        torch.bitwise_and(a.view(torch.int32), 0x7F800000, out=bits).clamp_(min=127 << 23).add_(22 << 23)
        a.add_(bits.view(torch.float32))  # a + M: rounded onto the grid of spacing Q
        codes.copy_(a.view(torch.int32))  # low byte: r / Q
        tmp.copy_(bits.bitwise_right_shift_(22))  # byte(bits(M) >> 22) = 42 + 2 * max(E, 0)
        codes.add_(tmp).sub_(42)
        tmp.copy_(torch.bitwise_right_shift(v.view(torch.int32), 28, out=bits))  # low nibble 0xF8.. if negative
        return codes.bitwise_or_(tmp.bitwise_and_(8))

    def pack_into(self, v: torch.Tensor, out: torch.Tensor) -> None:
        """``out = pack_e2m1(e2m1_codes(v))``: ``v`` float32 ``(..., K)`` (clobbered), ``out`` uint8 ``(..., K/2)``."""
        codes = self.codes_into(v)
        pack_codes_into(codes, out, self.pairs[: codes.numel() // 2].view(out.shape))


def pack_codes_into(codes: torch.Tensor, out: torch.Tensor, pairs: torch.Tensor) -> None:
    """``out = pack_e2m1(codes)`` through int16 ``pairs`` (``out``'s shape): ``w | w >> 4``, low byte.

    ``codes`` contiguous; a little-endian int16 holds element ``2i`` in its low byte, ``2i + 1`` in
    its high byte, and both are below 16, so the low byte of ``w | w >> 4`` is the packed byte.
    """
    if sys.byteorder != "little":
        out.copy_(pack_e2m1(codes))
        return
    w = codes.view(torch.int16)
    out.copy_(torch.bitwise_right_shift(w, 4, out=pairs).bitwise_or_(w))
