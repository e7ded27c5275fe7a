"""E8M0 scales (OCP MX spec): one unsigned biased exponent byte per group, value ``2**(byte - 127)``.

Shared by the MX formats (MXFP8: e4m3 elements, MXFP4: e2m1 elements; 32 elements per scale).
Byte 255 is NaN in the spec and never written here.

Exponent choice, as compressed-tensors 0.19 computes it (``quantization/utils/mxfp_utils.py``:
``generate_mx_scales`` -> ``round_to_power_2``, then ``helpers.calculate_qparams`` steps 3-4 and
``compressors/mx_utils.compress_mx_scale``):

- ``round_to_power_2(amax)`` adds ``1 << (mantissa_bits - 2)`` to the bits of the (non-negative)
  group amax and keeps sign and exponent: the amax's power of two, one higher when its
  significand is ``>= 1.75`` (the top two mantissa bits set). The dtype of the amax does not
  matter: bf16, fp16 and fp32 all give the same power for the same value, since the bf16/fp16
  mantissa is a prefix of the fp32 one and the threshold is on the top two bits;
- ``127 + floor(log2(that)) - offset`` with ``offset = floor(log2(element max))`` (8 for e4m3's
  448, 2 for e2m1's 6), rounded and clamped to ``0..255`` by ``round_to_quantized_type_dtype``;
  an amax of 0 (or one rounding to 0) gives ``-inf`` and so byte 0.

In integers: ``byte = clamp(((bits(amax) + 2**21) >> 23) - offset, 0, 254)`` for float32 bits —
the exponent field after the round-up is exactly ``127 + floor(log2(round_to_power_2(amax)))``,
and a field of 0 (amax 0 or subnormal rounding down) clamps to byte 0 like ``-inf`` does.
Where we differ, deliberately: compressed-tensors' round-up of an amax ``>= 1.75 * 2**127``
overflows the float to Inf and writes an Inf scale (weights all zero); the integer field 255
here keeps the scale finite (byte 247 for e4m3, 253 for e2m1). The clamp at 254 never binds for a
finite amax; it keeps 255 (NaN) unwritable.

With that exponent ``|x| / scale < 1.75 * 2**offset`` for every element of the group: below 448
for e4m3 (no clipping), below 7 for e2m1 (values in ``(6, 7)`` saturate to 6 — the MX recipe's
known clip, which compressed-tensors' clamp to ±6 does too).
"""

from __future__ import annotations

import torch

#: Bias of the E8M0 exponent.
E8M0_BIAS = 127
#: The largest byte written (255 is NaN).
E8M0_MAX_CODE = 254
#: ``floor(log2(element max))`` per element format: what the scale's exponent subtracts.
MXFP8_E4M3_OFFSET = 8
MXFP4_E2M1_OFFSET = 2
#: MX block size (elements per scale along the last dim).
MX_GROUP = 32


def mx_scale_codes(amax: torch.Tensor, offset: int) -> torch.Tensor:
    """uint8 E8M0 bytes for float32 group amax values (finite, >= 0), compressed-tensors' exponent choice."""
    if amax.dtype != torch.float32:
        raise TypeError(f"mx_scale_codes expects a float32 amax, got {amax.dtype}")
    field = (amax.contiguous().view(torch.int32) + (1 << 21)) >> 23
    return (field - offset).clamp_(0, E8M0_MAX_CODE).to(torch.uint8)


def e8m0_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(code - 127)`` of uint8 E8M0 bytes (exact: byte 0 is the float32 subnormal 2**-127)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"e8m0_values expects uint8, got {codes.dtype}")
    field = codes.to(torch.int32)
    bits = torch.where(field > 0, field << 23, torch.full_like(field, 1 << 22))
    return bits.view(torch.float32)


def e8m0_reciprocal(codes: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(127 - code)``, the exact multiplier that divides by the scale (every byte 0..254).

    ``x * 2**-k`` is bit-identical to IEEE ``x / 2**k``: both are the exact product rounded once
    to float32 (only a subnormal result rounds at all, identically). So the kernels multiply, with
    no division and no approximate-division trap on GPUs.
    """
    field = 254 - codes.to(torch.int32)
    bits = torch.where(field > 0, field << 23, torch.full_like(field, 1 << 22))
    return bits.view(torch.float32)
