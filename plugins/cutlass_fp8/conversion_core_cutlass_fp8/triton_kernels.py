"""Triton kernel for the per-channel quantizer: bit-identical to the torch path, near memory speed.

A program owns ``ROWS`` rows (flattened over experts, so a row never mixes experts). Rows that
fit in registers (``K <= BLOCK_K``) are read once: load, row amax, scale, e4m3 bytes. Longer
rows are walked in ``BLOCK_K`` chunks twice, an amax pass that leaves the row in L2
(``evict_last``) and a quantize pass that reads it back from there (``evict_first``); a grid
capped at a few programs per SM keeps the rows in flight well under the L2 size, so HBM still
sees each byte once. Any input strides, int64 offsets, masked tails.

Bit-identity with ``torch_path`` rests on IEEE division (``tl.math.div_rn``, or a reciprocal
with one exact FMA correction, equal to it by Markstein's theorem), a clamp to ±448 before the
cast, and the cast's round-to-nearest-even. NaN/Inf are detected explicitly (``tl.max`` may
drop NaN) into a device flag read once per call. On that error the buffers' contents are
unspecified (the torch path checks before writing; a one-pass kernel cannot).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from conversion_core.fp8 import E4M3_MAX, MIN_AMAX, non_finite_error

# Globals a @triton.jit function reads must be constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
Q_MAX = tl.constexpr(E4M3_MAX)
AMAX_FLOOR = tl.constexpr(MIN_AMAX)


@dataclass(frozen=True)
class RowConfig:
    """Launch shape of the per-channel kernel (picked on an H100 by benchmarks/bench_quant.py)."""

    rows: int  # rows per program
    block_k: int  # columns per load (the whole row when single)
    single: bool  # row fits in one load: read once, no second pass
    num_warps: int
    programs_per_sm: int = 0  # >0: persistent grid of that many programs per SM
    fast_div: bool = True
    soft_round: bool = False  # on a GPU; always on under the interpreter


#: Longest row read in one load; longer rows take the chunked two-pass route.
SINGLE_PASS_MAX_K = 8192
#: Elements one program loads at a time.
TILE_ELEMS = 8192


def pick_config(k: int) -> RowConfig:
    """The launch shape for rows of length ``k``."""
    if k <= SINGLE_PASS_MAX_K:
        block_k = triton.next_power_of_2(k)
        return RowConfig(rows=max(1, TILE_ELEMS // block_k), block_k=block_k, single=True, num_warps=8)
    return RowConfig(rows=1, block_k=4096, single=False, num_warps=8, programs_per_sm=2)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


@triton.jit
def _div_exact(x, scale, recip, FAST_DIV: tl.constexpr):
    """``x / scale`` rounded to nearest (IEEE); ``recip`` must be ``div_rn(1, scale)``.

    FAST_DIV: q0 = x*recip is within 1 ulp of x/scale, the FMA residual x - q0*scale is exact,
    and q0 + residual*recip rounds to RN(x/scale) (Markstein). A zero q0 keeps its own sign
    (the correction step would turn -0 into +0, torch keeps -0).
    """
    if FAST_DIV:
        q0 = x * recip
        rem = tl.fma(-q0, scale, x)
        q = tl.fma(rem, recip, q0)
        q = tl.where(q0 == 0.0, q0, q)
    else:
        q = tl.math.div_rn(x, scale)
    return q


@triton.jit
def _to_e4m3(q, SOFT_ROUND: tl.constexpr):
    """e4m3 bytes of float32 ``q`` (already clamped to ±448), round-to-nearest-even.

    SOFT_ROUND rounds with float32/int32 arithmetic to a value e4m3 holds exactly, so the cast
    itself has nothing left to round. Triton's interpreter needs this: its fp8 cast rounds half
    up and loses the mantissa carry (31.8 becomes 16). On a GPU the hardware cast
    (cvt.rn.satfinite) is exact RNE by itself; tests/gpu compares both with the torch path.
    """
    if SOFT_ROUND:
        bits = q.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        a = mag.to(tl.float32, bitcast=True)
        tiny = (a + 16384.0) - 16384.0  # below 2**-6 e4m3 steps by 2**-9 = ulp(2**14) in float32
        normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576  # keep 3 of 23 mantissa bits, RNE
        rounded = tl.where(a < 0.015625, tiny.to(tl.int32, bitcast=True), normal)
        q = (rounded | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return q.to(tl.float8e4nv)


@triton.jit
def _quantize_rows_kernel(
    src_ptr,
    out_ptr,
    scale_ptr,
    flag_ptr,
    R,
    N,
    K,
    stride_e,
    stride_n,
    stride_k,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE: tl.constexpr,
    FAST_DIV: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_row_blocks = tl.cdiv(R, ROWS)
    for rb in range(pid, n_row_blocks, n_programs):
        rows = tl.arange(0, ROWS).to(tl.int64) + rb * ROWS  # R (rows, not elements) fits int32
        row_ok = rows < R
        e = rows // N
        src_row = e * stride_e + (rows - e * N) * stride_n
        out_row = rows * K
        if SINGLE:
            cols = tl.arange(0, BLOCK_K).to(tl.int64)
            mask = row_ok[:, None] & (cols[None, :] < K)
            x = tl.load(
                src_ptr + src_row[:, None] + cols[None, :] * stride_k,
                mask=mask,
                other=0.0,
                eviction_policy="evict_first",
            ).to(tl.float32)
            ax = tl.abs(x)
            bad = tl.max(tl.where(ax <= FLT_MAX, 0, 1), axis=1)  # NaN and Inf both fail `<= FLT_MAX`
            amax = tl.max(ax, axis=1)
            scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), Q_MAX)
            recip = tl.math.div_rn(1.0, scale)
            q = _div_exact(x, scale[:, None], recip[:, None], FAST_DIV)
            q = tl.minimum(tl.maximum(q, -Q_MAX), Q_MAX)
            tl.store(out_ptr + out_row[:, None] + cols[None, :], _to_e4m3(q, SOFT_ROUND), mask=mask)
        else:
            amax = tl.zeros([ROWS], dtype=tl.float32)
            bad = tl.zeros([ROWS], dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                mask = row_ok[:, None] & (cols[None, :] < K)
                x = tl.load(
                    src_ptr + src_row[:, None] + cols[None, :] * stride_k,
                    mask=mask,
                    other=0.0,
                    eviction_policy="evict_last",
                ).to(tl.float32)
                ax = tl.abs(x)
                bad = tl.maximum(bad, tl.max(tl.where(ax <= FLT_MAX, 0, 1), axis=1))
                amax = tl.maximum(amax, tl.max(ax, axis=1))
            scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), Q_MAX)
            recip = tl.math.div_rn(1.0, scale)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                mask = row_ok[:, None] & (cols[None, :] < K)
                x = tl.load(
                    src_ptr + src_row[:, None] + cols[None, :] * stride_k,
                    mask=mask,
                    other=0.0,
                    eviction_policy="evict_first",
                ).to(tl.float32)
                q = _div_exact(x, scale[:, None], recip[:, None], FAST_DIV)
                q = tl.minimum(tl.maximum(q, -Q_MAX), Q_MAX)
                tl.store(out_ptr + out_row[:, None] + cols[None, :], _to_e4m3(q, SOFT_ROUND), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        if tl.max(bad) > 0:
            tl.store(flag_ptr, 1)


def launch_rows(
    src: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    flag: torch.Tensor,
    config: RowConfig | None = None,
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf. No host sync (for grouped callers)."""
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    cfg = config or pick_config(k)
    rows_total = e * n
    row_blocks = -(-rows_total // cfg.rows)
    programs = row_blocks
    if cfg.programs_per_sm and src.device.type == "cuda":
        programs = min(row_blocks, cfg.programs_per_sm * _sm_count(src.device.index or 0))
    _quantize_rows_kernel[(programs,)](
        x,
        out,
        scale_out,
        flag,
        rows_total,
        n,
        k,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        ROWS=cfg.rows,
        BLOCK_K=cfg.block_k,
        SINGLE=cfg.single,
        FAST_DIV=cfg.fast_div,
        SOFT_ROUND=cfg.soft_round or src.device.type != "cuda",
        num_warps=cfg.num_warps,
    )


def quantize_rows(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, name: str) -> None:
    """Triton twin of ``torch_path.quantize_rows`` (same arguments, same bytes)."""
    if src.numel() == 0:
        from . import torch_path

        torch_path.quantize_rows(src, out, scale_out, name)
        return
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch_rows(src, out, scale_out, flag)
    if int(flag.item()):  # the one host sync of the call
        raise non_finite_error(name, src.shape)
