"""One-pass Triton kernel for MXFP8 and MXFP4: bit-identical to the torch path.

One program owns ``BLOCK_R`` rows x ``BLOCK_C`` columns (``BLOCK_C`` a multiple of 32, so whole
groups) of the ``(E*N, K)`` row view: it loads the tile once (any strides, int64 offsets, masked
edges), takes each group's amax, computes the E8M0 byte from the amax's bits, multiplies by the
exact power of two ``2**(127 - byte)``, clamps to ``limit``, rounds and stores values and scale
bytes. Rows never mix experts (a row is one expert's row), groups never cross rows.

Bit-identity: every step but the rounding is exact (integer ops, multiplication by a power of
two, min/max), so GPU and CPU agree without division tricks; e4m3 rounding is the shared
``_to_e4m3`` (hardware RNE cast on GPUs, software RNE under the interpreter), e2m1 rounding is
seven comparisons whose edges put every tie on the even code (compressed-tensors'
``cast_to_fp4`` buckets). NaN/Inf set a device flag; the host reads it once per call (on that
error the buffers' contents are unspecified; the torch path checks before writing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conversion_core.formats.e8m0 import MX_GROUP
from conversion_core.formats.fp8_triton import FLT_MAX, _to_e4m3

from .numerics import MXFP8, MxFormat, check_k, non_finite_error

#: Tile shape and warps (rows, columns, warps); columns are a multiple of 32. Tuned by benchmarks/gpu_mx.py.
BLOCK_R = 16
BLOCK_C = 256
NUM_WARPS = 4


@triton.jit
def _e2m1_code(v):
    """Nibble code of float32 ``v`` (|v| <= 6): RNE by seven bucket edges, sign bit ``v < 0``."""
    a = tl.abs(v)
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return idx | ((v < 0.0).to(tl.int32) << 3)


@triton.jit
def _mx_kernel(
    src_ptr,
    q_ptr,
    s_ptr,
    flag_ptr,
    ROWS,
    N,
    K,
    stride_e,
    stride_n,
    stride_k,
    OFFSET: tl.constexpr,
    QMAX: tl.constexpr,
    SATURATE: tl.constexpr,
    FP4: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    G: tl.constexpr = BLOCK_C // 32
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    e = rows // N
    n = rows % N
    mask = (rows[:, None] < ROWS) & (cols[None, :] < K)
    x = tl.load(
        src_ptr + (e * stride_e + n * stride_n)[:, None] + cols[None, :] * stride_k,
        mask=mask,
        other=0.0,
        eviction_policy="evict_first",
    ).to(tl.float32)
    bad = tl.max(tl.max(((x != x) | (tl.abs(x) > FLT_MAX)).to(tl.int32), 1), 0)
    if bad > 0:
        tl.store(flag_ptr, 1)
    g = tl.reshape(x, (BLOCK_R, G, 32))
    amax = tl.max(tl.abs(g), 2)  # (BLOCK_R, G)
    field = (amax.to(tl.int32, bitcast=True) + (1 << 21)) >> 23
    code = tl.minimum(tl.maximum(field - OFFSET, 0), 254)
    rfield = 254 - code
    recip = tl.where(rfield > 0, rfield << 23, 1 << 22).to(tl.float32, bitcast=True)
    limit = tl.minimum(recip * SATURATE, QMAX)
    v = g * recip[:, :, None]
    v = tl.minimum(tl.maximum(v, -limit[:, :, None]), limit[:, :, None])
    v = tl.reshape(v, (BLOCK_R, BLOCK_C))
    if FP4:
        c = _e2m1_code(v)
        lo, hi = tl.split(tl.reshape(c, (BLOCK_R, BLOCK_C // 2, 2)))
        byte = (lo | (hi << 4)).to(tl.uint8)
        pcols = pid_c.to(tl.int64) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2).to(tl.int64)
        pmask = (rows[:, None] < ROWS) & (pcols[None, :] < K // 2)
        tl.store(q_ptr + rows[:, None] * (K // 2) + pcols[None, :], byte, mask=pmask, eviction_policy="evict_first")
    else:
        q = _to_e4m3(v, SOFT_ROUND)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask, eviction_policy="evict_first")
    gcols = pid_c.to(tl.int64) * G + tl.arange(0, G).to(tl.int64)
    smask = (rows[:, None] < ROWS) & (gcols[None, :] < K // 32)
    tl.store(s_ptr + rows[:, None] * (K // 32) + gcols[None, :], code.to(tl.uint8), mask=smask)


def launch(
    src: torch.Tensor,
    q_out: torch.Tensor,
    s_out: torch.Tensor,
    flag: torch.Tensor,
    fmt: MxFormat,
    block_r: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf. No host sync (whole-model plan, CUDA graphs)."""
    check_k(fmt.name, tuple(src.shape))
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    br, bc = block_r or BLOCK_R, block_c or BLOCK_C
    bc = min(bc, max(MX_GROUP, triton.next_power_of_2(k)))
    grid = (triton.cdiv(e * n, br), triton.cdiv(k, bc))
    _mx_kernel[grid](
        x,
        q_out,
        s_out,
        flag,
        e * n,
        n,
        k,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        OFFSET=fmt.offset,
        QMAX=fmt.qmax,
        SATURATE=fmt.saturate,
        FP4=fmt is not MXFP8,
        SOFT_ROUND=src.device.type != "cuda",
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=num_warps or NUM_WARPS,
    )


def quantize(src: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor, fmt: MxFormat) -> None:
    """Triton twin of ``torch_path.quantize`` (same arguments, same bytes)."""
    if src.numel() == 0:
        check_k(fmt.name, tuple(src.shape))
        return
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch(src, q_out, s_out, flag, fmt)
    if int(flag.item()):  # the one host sync of the call
        raise non_finite_error(fmt.name, src.shape)
