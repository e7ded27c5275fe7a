"""The two MX formats as data, and the per-group steps every path (torch, Triton, sharded) shares.

An MX weight ``(..., K)`` is cut into groups of 32 consecutive elements along K (the input
dim), one E8M0 scale byte per group, the group never crossing a row (so never an expert).
Per group, everything exact (powers of two) except the element rounding:

1. ``amax`` = max |x| over the group, float32 (exact: the source widened);
2. ``byte = clamp(((bits(amax) + 2**21) >> 23) - offset, 0, 254)``
   (:func:`conversion_core.formats.e8m0.mx_scale_codes`; compressed-tensors'
   ``generate_mx_scales`` / ``round_to_power_2`` exponent choice), ``scale = 2**(byte - 127)``;
3. ``v = x * 2**(127 - byte)`` (bit-identical to ``x / scale``), clamped to ``±limit`` with
   ``limit = min(element max, SATURATE / scale)``;
4. ``q`` = ``v`` rounded to nearest-even in the element format: e4m3 (MXFP8, stored as
   ``float8_e4m3fn``) or e2m1 (MXFP4, two codes per byte, even element in the low nibble).

``SATURATE`` is the largest float32 the element format's significand can hold times a power of
two (e4m3: ``1.875 * 2**127``; e2m1: ``1.5 * 2**127``): it keeps ``q * scale`` finite. It only
binds for the top scale an amax ``>= 1.75 * 2**127`` gets (byte 247 for e4m3, limit 240; byte
253 for e2m1, limit 3), where compressed-tensors' round-up overflows to an Inf scale and writes
zeros; below that ``|v| < 1.75 * 2**offset`` and the limit is the element max (448, 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import conversion_core as cc
from conversion_core.formats.e8m0 import (
    MX_GROUP,
    MXFP4_E2M1_OFFSET,
    MXFP8_E4M3_OFFSET,
    e8m0_reciprocal,
    mx_scale_codes,
)
from conversion_core.formats.fp4 import E2M1_MAX, E2m1Scratch, quantize_e2m1_into
from conversion_core.formats.fp8 import E4M3_MAX


@dataclass(frozen=True)
class MxFormat:
    """What differs between MXFP8 and MXFP4; everything else is shared."""

    name: str
    #: ``floor(log2(element max))``: subtracted from the amax's (rounded) exponent.
    offset: int
    #: The element format's largest magnitude.
    qmax: float
    #: ``limit = min(qmax, SATURATE / scale)`` keeps ``q * scale`` finite.
    saturate: float
    #: Elements per byte of the main output (1: e4m3; 2: packed e2m1).
    per_byte: int

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(..., K // 32)``; a K that is not a multiple of 32 is refused (see :func:`check_k`)."""
        check_k(self.name, shape)
        return (*shape[:-1], shape[-1] // MX_GROUP)

    def values_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The main output: ``(..., K)`` e4m3, or ``(..., K // 2)`` bytes of two e2m1 codes."""
        if shape and shape[-1] % self.per_byte:
            raise cc.ConversionInputError(
                f"conversion {self.name!r}: source (or shard) of shape {tuple(shape)} has an odd K; "
                f"{self.per_byte} elements share one byte"
            )
        return (*shape[:-1], shape[-1] // self.per_byte) if shape else tuple(shape)


MXFP8 = MxFormat("mxfp8", MXFP8_E4M3_OFFSET, E4M3_MAX, 15.0 * 2.0**124, 1)
MXFP4 = MxFormat("mxfp4", MXFP4_E2M1_OFFSET, E2M1_MAX, 3.0 * 2.0**126, 2)


def check_k(name: str, shape: tuple[int, ...]) -> None:
    """K (the last dim) must be a whole number of 32-element groups.

    compressed-tensors defines no partial group: llm-compressor's ``flatten_for_calibration``
    (``value.unflatten(-1, (-1, group_size))``) raises for such a weight, its scale tensor is
    ``(N, K/32)``, and vLLM's MX kernels need K % 32 == 0. So such a source is refused, never
    padded into bytes no reader expects; leave the module unquantized instead.
    """
    if not shape or shape[-1] % MX_GROUP:
        raise cc.ConversionInputError(
            f"conversion {name!r}: source of shape {tuple(shape)} has K={shape[-1] if shape else None} input "
            f"columns, not a multiple of the MX group size {MX_GROUP} (compressed-tensors cannot store a partial "
            "group); leave this module unquantized (ignore list) or pad K"
        )


def non_finite_error(name: str, shape: torch.Size | tuple[int, ...]) -> cc.ConversionInputError:
    return cc.ConversionInputError(
        f"conversion {name!r}: source tensor of shape {tuple(shape)} holds NaN or Inf; refusing to write its "
        "bytes (fix the weights, e.g. check the training step for divergence)"
    )


def group_scales(amax: torch.Tensor, fmt: MxFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(byte, 2**(127 - byte), limit)`` per group from a float32 group amax (finite, any shape)."""
    codes = mx_scale_codes(amax, fmt.offset)
    recip = e8m0_reciprocal(codes)
    limit = torch.clamp(recip * fmt.saturate, max=fmt.qmax)  # exact: a power of two times a constant
    return codes, recip, limit


def write_values(v: torch.Tensor, out: torch.Tensor, fmt: MxFormat) -> None:
    """Round float32 ``v`` (scaled and clamped, ``(..., K)``) into the main output ``(..., K / per_byte)``."""
    if fmt.per_byte == 1:
        out.copy_(v)  # round-to-nearest-even cast; |v| <= 448, so no NaN from the eager cast
    else:
        quantize_e2m1_into(v, out)


def quantize_groups(
    x: torch.Tensor, amax: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor | None, fmt: MxFormat
) -> None:
    """Steps 2-4 for float32 ``x`` viewed ``(..., G, 32)`` and its ``(..., G)`` amax; writes ``q_out``, ``s_out``.

    ``q_out`` is viewed like ``x`` with the last dim divided by ``per_byte``; ``s_out`` like ``amax``
    (None: the scales are written elsewhere, as the sharded path does for cut groups).
    """
    codes, recip, limit = group_scales(amax, fmt)
    v = x.mul(recip.unsqueeze(-1))
    lim = limit.unsqueeze(-1)
    v = torch.maximum(torch.minimum(v, lim), -lim)
    write_values(v, q_out, fmt)
    if s_out is not None:
        s_out.copy_(codes)


def quantize_groups_into(
    x: torch.Tensor,
    amax: torch.Tensor,
    q_out: torch.Tensor,
    s_out: torch.Tensor,
    fmt: MxFormat,
    e2m1: E2m1Scratch | None,
) -> None:
    """:func:`quantize_groups` for one CPU chunk, in place in the float32 scratch ``x`` (clobbered).

    The same steps and bytes with no full-size temporary: ``x *= 2**(127 - byte)``; the clamp to
    ``±limit`` is a broadcast ``minimum``/``maximum`` (several passes) only where a group has the
    saturating top scale; when every limit is the element max it changes no value and is skipped
    (e4m3), or left to the e2m1 rounding's own clamp to ±6; e2m1 rounds through ``e2m1``
    (:class:`~conversion_core.formats.fp4.E2m1Scratch`, no ``where``).
    """
    codes, recip, limit = group_scales(amax, fmt)
    v = x.mul_(recip.unsqueeze(-1))
    if bool((limit == fmt.qmax).all()):
        if fmt.per_byte == 2 and e2m1 is None:
            v.clamp_(-fmt.qmax, fmt.qmax)
        # else nothing to clamp: |v| < 1.75 * 2**offset (the exponent choice, e8m0.py), which is
        # below 448 for e4m3, and e2m1's rounding clamps to ±6 itself
    else:
        lim = limit.unsqueeze(-1)
        torch.maximum(torch.minimum(v, lim, out=v), -lim, out=v)
    if fmt.per_byte == 1 or e2m1 is None:
        write_values(v, q_out, fmt)
    else:
        e2m1.pack_into(v, q_out)
    s_out.copy_(codes)
