"""Triton kernels for the 128x128 block quantizer: one pass over the source, bit-identical to the torch path.

One program owns one (expert, block-row, block-column) tile: it loads the tile once (any input
strides, int64 offsets, masked edges), takes the float32 amax, writes the tile's scale and its
e4m3 bytes. A tile never crosses an expert because the expert index is part of the program id.

Bit-identity with ``torch_path`` rests on three choices (see ANCHORS.md): IEEE division
(``tl.math.div_rn``, or a reciprocal with one exact FMA correction, which Markstein's theorem
proves equal to it), a clamp to ±448 before the cast, and the cast's round-to-nearest-even.
NaN/Inf are detected explicitly (``tl.max`` may drop NaN) into a device flag that the host
reads once per call. On that error the buffers' contents are unspecified (the torch path
checks before writing; a one-pass kernel cannot).

The constexpr ``UE8M0`` switches the scale step to the power-of-two scales of
``fp8_128x128_ue8m0`` (see :mod:`.ue8m0`): the amax floor is 1e-4 and the float32 quotient
``amax / 448`` is rounded up to a power of two by integer arithmetic on its bits. With
``UE8M0`` off the kernel compiles to exactly what it was before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from conversion_core.formats.fp8 import non_finite_error
from conversion_core.formats.fp8_triton import (
    AMAX_FLOOR,
    Q_MAX,
    _div_exact,
    _max_keep_nan,
    _non_finite,
    _row_amax,
    _to_e4m3,
)

#: Warps per 128x128 tile program (picked on an H100 by benchmarks/bench_quant.py).
BLOCK_NUM_WARPS = 16
#: Division flavour: False = ``div_rn`` per element, True = reciprocal + exact FMA correction.
BLOCK_FAST_DIV = True
#: Round to the e4m3 grid in software on a GPU too (always under the interpreter).
GPU_SOFT_ROUND = False

#: The UE8M0 amax floor (``ue8m0.MIN_AMAX``: the float32 nearest 1e-4, so no conversion rounds it).
UE8M0_AMAX_FLOOR = tl.constexpr(9.999999747378752e-05)
#: ``ue8m0.SATURATE`` = 15 * 2^124: with a power-of-two scale, ``|q| <= SATURATE / scale`` keeps ``q * scale`` finite.
UE8M0_SATURATE = tl.constexpr(15.0 * 2.0**124)
#: Scales below this give ``SATURATE / scale >= 960``: the limit is 448 there without dividing into Inf.
UE8M0_SATURATE_FROM = tl.constexpr(2.0**118)


@triton.jit
def _ceil_pow2(s):
    """The smallest power of two >= positive float32 ``s``, from its bits (``ue8m0.ceil_pow2``).

    Biased exponent, plus one when any mantissa bit is set, clamped to 1..254 (2^-126..2^127).
    """
    bits = s.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    exponent = tl.minimum(tl.maximum(exponent, 1), 254)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_tile_kernel(
    src_ptr,
    out_ptr,
    scale_ptr,
    flag_ptr,
    N,
    K,
    NB,
    KB,
    stride_e,
    stride_n,
    stride_k,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr,
    UE8M0: tl.constexpr,
):
    pid = tl.program_id(0)
    bk = pid % KB
    rest = pid // KB
    bn = rest % NB
    e = (rest // NB).to(tl.int64)
    rows = bn.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = bk.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    src = src_ptr + (e * stride_e + rows[:, None] * stride_n + cols[None, :] * stride_k)
    out = out_ptr + ((e * N + rows[:, None]) * K + cols[None, :])
    if EVEN:  # every tile full: no masks to compute
        x = tl.load(src, eviction_policy="evict_first").to(tl.float32)
    else:
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        x = tl.load(src, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    amax = tl.reduce(_row_amax(x, INTERPRET), 0, _max_keep_nan)
    if UE8M0:  # a power of two: the division below (and the reciprocal) is then exact
        scale = _ceil_pow2(tl.math.div_rn(tl.maximum(amax, UE8M0_AMAX_FLOOR), Q_MAX))
    else:
        scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), Q_MAX)
    recip = tl.math.div_rn(1.0, scale)
    q = _div_exact(x, scale, recip, FAST_DIV)
    if UE8M0:  # 448, or 240 for the scale 2^120, where 256 * scale would be Inf (ue8m0.SATURATE)
        # below 2^118 the quotient is >= 960 anyway; the floor on the divisor keeps it from overflowing
        limit = tl.minimum(tl.math.div_rn(UE8M0_SATURATE, tl.maximum(scale, UE8M0_SATURATE_FROM)), Q_MAX)
        q = tl.minimum(tl.maximum(q, -limit), limit)
    q = _to_e4m3(q, SOFT_ROUND)
    if EVEN:
        tl.store(out, q, eviction_policy="evict_first")
    else:
        tl.store(out, q, mask=mask, eviction_policy="evict_first")
    tl.store(scale_ptr + pid, scale)  # scale_out is contiguous (E, NB, KB): its flat index is pid
    if _non_finite(amax):
        tl.store(flag_ptr, 1)


def launch_blocks(
    src: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    flag: torch.Tensor,
    block: Sequence[int],
    num_warps: int | None = None,
    fast_div: bool | None = None,
    soft_round: bool | None = None,
    ue8m0: bool = False,
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf. No host sync (for grouped callers).

    ``ue8m0``: power-of-two scales (``fp8_128x128_ue8m0``) instead of ``max(amax, 1e-12) / 448``.
    """
    br, bc = int(block[0]), int(block[1])
    if br & (br - 1) or bc & (bc - 1):
        raise ValueError(f"Triton block quantizer needs power-of-two blocks, got {tuple(block)}")
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    nb, kb = -(-n // br), -(-k // bc)
    grid = (e * nb * kb,)
    _quantize_tile_kernel[grid](
        x,
        out,
        scale_out,
        flag,
        n,
        k,
        nb,
        kb,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_N=br,
        BLOCK_K=bc,
        EVEN=n % br == 0 and k % bc == 0,
        FAST_DIV=BLOCK_FAST_DIV if fast_div is None else fast_div,
        SOFT_ROUND=(GPU_SOFT_ROUND if soft_round is None else soft_round) or src.device.type != "cuda",
        INTERPRET=src.device.type != "cuda",
        UE8M0=bool(ue8m0),
        num_warps=num_warps or BLOCK_NUM_WARPS,
    )


def quantize_blocks(
    src: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    block: Sequence[int],
    name: str,
    ue8m0: bool = False,
) -> None:
    """Triton twin of ``torch_path.quantize_blocks`` (same arguments, same bytes).

    ``ue8m0`` stands for the torch path's ``scale_fn=ue8m0.scale_from_amax``.
    """
    if src.numel() == 0:
        from . import torch_path

        kwargs = {}
        if ue8m0:
            from .ue8m0 import scale_from_amax

            kwargs["scale_fn"] = scale_from_amax
        torch_path.quantize_blocks(src, out, scale_out, (int(block[0]), int(block[1])), name, **kwargs)
        return
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch_blocks(src, out, scale_out, flag, block, ue8m0=ue8m0)
    if int(flag.item()):  # the one host sync of the call
        raise non_finite_error(name, src.shape)
