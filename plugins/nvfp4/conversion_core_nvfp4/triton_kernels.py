"""The NVFP4 Triton kernel: one pass over the source given the set's amax, bit-identical to :mod:`.numerics`.

The global scale ``gs`` is a handful of torch ops on the amax (device-side, no sync). One program
then owns ``BLOCK_R`` rows by ``BLOCK_C`` columns (a whole number of 16-groups) of the ``(rows, K)``
view: it loads the even and the odd elements (any strides, int64 offsets, masked edges), takes
each group's amax, and writes the group's e4m3 scale and the packed bytes (even element in the low
nibble). Bit-identity with the torch path rests on: bf16 rounding done on the float32 bits
(round to nearest even, as torch's cast), IEEE division (``tl.math.div_rn``) everywhere torch
divides, the e4m3 cast of :func:`conversion_core.formats.fp8_triton._to_e4m3` (software rounding
under the interpreter), and e2m1 rounding by the same midpoint comparisons. NaN/Inf are detected
explicitly into an int32 device flag.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conversion_core.formats.fp8_triton import FLT_MAX, _to_e4m3

from . import numerics

BLOCK_R = 8
BLOCK_C = 128
NUM_WARPS = 4


@triton.jit
def _round_bf16(f):
    """float32 -> the nearest bf16 value (ties to even), as float32; ``f`` finite and >= 0."""
    bits = f.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e2m1(v):
    """e2m1 code of float32 ``v`` clamped to ±6: round to nearest even, bit 3 the sign of ``v < 0``."""
    a = tl.abs(v)
    code = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    code += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return code | ((v < 0.0).to(tl.int32) << 3)


@triton.jit
def _nvfp4_kernel(
    src_ptr,
    packed_ptr,
    scale_ptr,
    gs_ptr,
    flag_ptr,
    ROWS,
    N,
    K,
    stride_e,
    stride_n,
    stride_k,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_C // 2
    GROUPS: tl.constexpr = BLOCK_C // 16
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    pairs = pid_c.to(tl.int64) * HALF + tl.arange(0, HALF).to(tl.int64)
    e = rows // N
    n = rows % N
    base = e * stride_e + n * stride_n
    mask = (rows[:, None] < ROWS) & (pairs[None, :] * 2 < K)
    lo_ptr = src_ptr + base[:, None] + (pairs[None, :] * 2) * stride_k
    lo = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(lo_ptr + stride_k, mask=mask, other=0.0).to(tl.float32)
    bad = (lo != lo) | (hi != hi) | (tl.abs(lo) > FLT_MAX) | (tl.abs(hi) > FLT_MAX)
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        tl.store(flag_ptr, 1)
    m = tl.maximum(tl.abs(lo), tl.abs(hi))
    amax = tl.max(tl.reshape(m, (BLOCK_R, GROUPS, 8)), 2)
    gs = tl.load(gs_ptr)
    s1 = _round_bf16(tl.math.div_rn(_round_bf16(amax), 6.0))
    s2 = tl.minimum(gs * s1, 448.0)
    s8 = _to_e4m3(s2, SOFT_ROUND)
    s3 = s8.to(tl.float32)
    s3 = tl.where(s3 == 0.0, 0.125, s3)
    groups = pid_c.to(tl.int64) * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    gmask = (rows[:, None] < ROWS) & (groups[None, :] * 16 < K)
    tl.store(scale_ptr + rows[:, None] * (K // 16) + groups[None, :], s3.to(tl.float8e4nv), mask=gmask)
    step = tl.math.div_rn(s3, gs)
    step = tl.reshape(tl.broadcast_to(tl.reshape(step, (BLOCK_R, GROUPS, 1)), (BLOCK_R, GROUPS, 8)), (BLOCK_R, HALF))
    v_lo = tl.minimum(tl.maximum(tl.math.div_rn(lo, step), -6.0), 6.0)
    v_hi = tl.minimum(tl.maximum(tl.math.div_rn(hi, step), -6.0), 6.0)
    byte = (_e2m1(v_lo) | (_e2m1(v_hi) << 4)).to(tl.uint8)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + pairs[None, :], byte, mask=mask)


def launch_values(
    src: torch.Tensor, gs: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, flag: torch.Tensor
) -> None:
    """Enqueue the kernel for ``src`` (2-D or 3-D) given the float32 ``(1,)`` global scale on its device."""
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    if x.numel() == 0:
        return
    rows = e * n
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(k, BLOCK_C))
    _nvfp4_kernel[grid](
        x,
        packed,
        scales,
        gs,
        flag,
        rows,
        n,
        k,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
        SOFT_ROUND=src.device.type != "cuda",
        num_warps=NUM_WARPS,
    )


def launch(
    src: torch.Tensor,
    amax: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_out: torch.Tensor,
    flag: torch.Tensor,
    *,
    multiplier: bool,
) -> None:
    """The sync-free step: ``gs`` from ``amax`` by torch ops on the device, then the kernel."""
    amax = amax.reshape(1).to(src.device)
    flag.add_(torch.isfinite(amax).logical_not().to(flag.dtype).reshape(flag.shape))
    gs = numerics.global_scale(torch.nan_to_num(amax, nan=0.0, posinf=0.0))
    launch_values(src, gs, packed, scales, flag)
    value = torch.div(torch.ones_like(gs), gs) if multiplier else gs
    global_out.copy_(value.reshape(global_out.shape))


def quantize_with_amax(
    src: torch.Tensor, amax: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, name: str
) -> torch.Tensor:
    """Triton twin of :func:`.numerics.quantize_with_amax` (same arguments, same bytes); returns ``gs``."""
    if not bool(torch.isfinite(amax).all()):
        raise numerics.non_finite_error(name, src.shape)
    gs = numerics.global_scale(amax.reshape(1).to(src.device))
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch_values(src, gs, packed, scales, flag)
    if int(flag.item()):  # the one host sync of the call
        raise numerics.non_finite_error(name, src.shape)
    return gs
