"""An independent reference of int4 W4A16 pack-quantized, written from the format's definition.

Element by element in Python floats: bf16 rounding on the float32 bit pattern (``struct``), the
group statistics as Python ``min``/``max``, round-half-even as Python's ``round``, and the words
built nibble by nibble. Slow on purpose: small shapes only. It shares no code with the plugin.
"""

from __future__ import annotations

import math
import struct

import torch


def bf16(v: float) -> float:
    """Round a float to the nearest bf16 (ties to even), through float32 first (what a bf16 op does)."""
    if math.isnan(v) or math.isinf(v):
        return v
    try:
        (bits,) = struct.unpack("<I", struct.pack("<f", v))
    except OverflowError:
        return math.copysign(math.inf, v)
    lower = bits & 0xFFFF
    bits &= 0xFFFF0000
    if lower > 0x8000 or (lower == 0x8000 and bits & 0x10000):
        bits += 0x10000
    (out,) = struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))
    return out


def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def div(a: float, b: float) -> float:
    """A bf16 division: float32 quotient, then bf16."""
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return bf16(f32(a / b))


def to_word(nibbles: list[int]) -> int:
    w = 0
    for j, n in enumerate(nibbles):
        w |= (n & 0xF) << (4 * j)
    return w - (1 << 32) if w >= 1 << 31 else w


def reference(src: torch.Tensor, group: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale`` (as bf16), ``weight_shape`` and (asymmetric) ``weight_zero_point``."""
    x3 = src.reshape(-1, *src.shape[-2:]).float()
    e, n, k = x3.shape
    packed = torch.zeros(e, n, k // 8, dtype=torch.int32)
    scales = torch.zeros(e, n, k // group, dtype=torch.float32)
    zps = [[[0] * (k // group) for _ in range(n)] for _ in range(e)]
    for ei in range(e):
        for r in range(n):
            row = [bf16(float(v)) for v in x3[ei, r].tolist()]
            q_row = []
            for gi in range(k // group):
                vals = row[gi * group : (gi + 1) * group]
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                if symmetric:
                    s = div(max(-lo, hi), 7.5)
                    zp = 0
                else:
                    s = div(bf16(hi - lo), 15.0)
                    z = bf16(-8.0 - div(lo, s))
                    zp = 0 if math.isnan(z) else int(round(min(max(z, -8.0), 7.0)))
                if s == 0:
                    s = 2.0**-7
                for v in vals:
                    t = div(v, s)
                    if not symmetric:
                        t = bf16(t + zp)
                    q_row.append(int(round(min(max(t, -8.0), 7.0))))
                scales[ei, r, gi] = s
                zps[ei][r][gi] = zp
            for w in range(k // 8):
                packed[ei, r, w] = to_word([q + 8 for q in q_row[8 * w : 8 * w + 8]])
    lead = tuple(src.shape[:-2])
    out = {
        "weight_packed": packed.reshape(*lead, n, k // 8),
        "weight_scale": scales.to(torch.bfloat16).reshape(*lead, n, k // group),
        "weight_shape": torch.tensor(tuple(src.shape), dtype=torch.int64),
    }
    if not symmetric:
        nw = -(-n // 8)
        zw = torch.zeros(e, nw, k // group, dtype=torch.int32)
        for ei in range(e):
            for wi in range(nw):
                for gi in range(k // group):
                    nib = [zps[ei][r][gi] + 8 for r in range(8 * wi, min(8 * wi + 8, n))]
                    zw[ei, wi, gi] = to_word(nib)
        out["weight_zero_point"] = zw.reshape(*lead, nw, k // group)
    return out
