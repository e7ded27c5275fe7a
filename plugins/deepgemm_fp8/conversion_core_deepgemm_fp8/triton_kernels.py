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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from conversion_core.fp8 import E4M3_MAX, MIN_AMAX, non_finite_error

# Globals a @triton.jit function reads must be constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
Q_MAX = tl.constexpr(E4M3_MAX)
AMAX_FLOOR = tl.constexpr(MIN_AMAX)

#: Warps per 128x128 tile program (picked on an H100 by benchmarks/bench_quant.py).
BLOCK_NUM_WARPS = 16
#: Division flavour: False = ``div_rn`` per element, True = reciprocal + exact FMA correction.
BLOCK_FAST_DIV = True
#: Round to the e4m3 grid in software on a GPU too (always under the interpreter).
GPU_SOFT_ROUND = False


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
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), Q_MAX)
    recip = tl.math.div_rn(1.0, scale)
    q = _to_e4m3(_div_exact(x, scale, recip, FAST_DIV), SOFT_ROUND)
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
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf. No host sync (for grouped callers)."""
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
        num_warps=num_warps or BLOCK_NUM_WARPS,
    )


def quantize_blocks(
    src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, block: Sequence[int], name: str
) -> None:
    """Triton twin of ``torch_path.quantize_blocks`` (same arguments, same bytes)."""
    if src.numel() == 0:
        from . import torch_path

        torch_path.quantize_blocks(src, out, scale_out, (int(block[0]), int(block[1])), name)
        return
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch_blocks(src, out, scale_out, flag, block)
    if int(flag.item()):  # the one host sync of the call
        raise non_finite_error(name, src.shape)
