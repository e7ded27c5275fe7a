"""Triton kernel for the per-channel quantizer: bit-identical to the torch path, near memory speed.

A program owns ``ROWS`` rows (flattened over experts, so a row never mixes experts). Short
power-of-two rows are read once: load, row amax, scale, e4m3 bytes. Other rows are walked in
``BLOCK_K`` chunks twice, an amax pass that leaves the row in L1/L2 (``evict_last``) and a
quantize pass that reads it back from there (``evict_first``), so HBM still sees each byte
once (measured on an H100: within a few percent of copy bandwidth up to K = 28672).
Any input strides, int64 offsets, masked tails.

Bit-identity with ``torch_path`` rests on IEEE division (``tl.math.div_rn``, or a reciprocal
with one exact FMA correction, equal to it by Markstein's theorem), a clamp to ±448 before the
cast, and the cast's round-to-nearest-even. NaN/Inf are detected explicitly (``tl.max`` may
drop NaN) into a device flag read once per call. On that error the buffers' contents are
unspecified (the torch path checks before writing; a one-pass kernel cannot).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

from conversion_core.contract import flags
from conversion_core.formats import group_table
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
    #: With ``fast_div``: the correction as two FMAs and no select (:func:`_div_short`).
    short_div: bool = False


#: Per-device changes to :func:`pick_config`'s launch shapes, by a substring of
#: ``torch.cuda.get_device_name``; first match wins. Each entry is a list of ``(k_max, changes)``:
#: the first whose ``k_max`` (None: any K) is >= K applies. Fill from ``benchmarks/gpu_grouped.py``'s
#: sweep on each card; a card not listed runs the H100 picks.
DEVICE_TUNING: dict[str, list[tuple[int | None, dict[str, Any]]]] = {
    # measured 2026-12-04 (benchmarks/results/h200_2026-12-04_fp8k/variant_probe.txt): short_div
    # +1-3 % everywhere (K = 2048: 0.90 -> 0.93, K = 7168: 0.96 -> 0.99 of copy); rows past
    # 16384 in 8-warp chunks, not 16 (K = 28672: 0.93 -> 0.96)
    "H200": [(16384, {"short_div": True}), (None, {"short_div": True, "num_warps": 8})],
}


@functools.lru_cache(maxsize=8)
def _device_name(index: int) -> str:
    return str(torch.cuda.get_device_name(index))


def config_for(k: int, device: torch.device) -> RowConfig:
    """:func:`pick_config` of ``k`` with ``device``'s :data:`DEVICE_TUNING` entry applied."""
    cfg = pick_config(k)
    if device.type != "cuda":
        return cfg
    name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    for key, tuning in DEVICE_TUNING.items():
        if key in name:
            for k_max, changes in tuning:
                if k_max is None or k <= k_max:
                    return replace(cfg, **changes)
            return cfg
    return cfg


def pick_config(k: int) -> RowConfig:
    """The launch shape for rows of length ``k`` (from the H100 sweep in benchmarks/bench_quant.py).

    Short power-of-two rows: a few whole rows per load, read once. Other short rows: 16 rows in
    chunks that divide K (no masked lanes), the second pass hitting L1/L2. Long rows: big chunks,
    the second pass hitting L2.
    """
    if k <= 2048 and k & (k - 1) == 0:
        return RowConfig(rows=max(1, 4096 // k), block_k=k, single=True, num_warps=4)
    if k <= 4096:
        chunk = 512 if k % 512 == 0 else 256
        return RowConfig(rows=4096 // chunk, block_k=chunk, single=False, num_warps=8)
    if k <= 16384:
        return RowConfig(rows=1, block_k=8192, single=False, num_warps=8)
    return RowConfig(rows=1, block_k=16384, single=False, num_warps=16)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


@triton.jit
def _div_short(x, scale, recip):
    """``x / scale`` rounded to nearest (IEEE) in three instructions; ``recip`` = ``div_rn(1, scale)``.

    The deepgemm_fp8 block kernel's twin (plugins keep their kernels to themselves): Markstein's
    correction with the residual taken as ``q0*scale - x`` and subtracted, the same real numbers
    as ``fp8_triton._div_exact``'s, so the same quotient for x != 0, and -0 stays -0 with no
    compare and select.
    """
    q0 = x * recip
    nrem = tl.fma(q0, scale, -x)
    return tl.fma(nrem, -recip, q0)


@triton.jit
def _quotient(x, scale, recip, FAST_DIV: tl.constexpr, SHORT_DIV: tl.constexpr):
    if FAST_DIV and SHORT_DIV:
        q = _div_short(x, scale, recip)
    else:
        q = _div_exact(x, scale, recip, FAST_DIV)
    return q


@triton.jit
def _quantize_row_block(
    src_ptr,
    out_ptr,
    scale_ptr,
    flag_ptr,
    rb,
    R,
    N,
    K,
    stride_e,
    stride_n,
    stride_k,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE: tl.constexpr,
    EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    SHORT_DIV: tl.constexpr,
):
    """Rows ``rb * ROWS ..`` of one tensor: amax, scale, e4m3 bytes (read once when SINGLE)."""
    rows = tl.arange(0, ROWS).to(tl.int64) + rb * ROWS  # R (rows, not elements) fits int32
    row_ok = rows < R
    e = rows // N
    src_row = src_ptr + (e * stride_e + (rows - e * N) * stride_n)[:, None]
    out_row = out_ptr + (rows * K)[:, None]
    if CONTIGUOUS_K:  # a grouped launch reads strides from its table: say what it cannot know
        stride_k = 1
    if SINGLE:
        cols = tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
        if EVEN:  # K == BLOCK_K and every row block full: no masks to compute
            x = tl.load(src_row + cols * stride_k, eviction_policy="evict_first").to(tl.float32)
        else:
            mask = row_ok[:, None] & (cols < K)
            x = tl.load(src_row + cols * stride_k, mask=mask, other=0.0, eviction_policy="evict_first")
            x = x.to(tl.float32)
        amax = _row_amax(x, INTERPRET)
        scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), Q_MAX)
        recip = tl.math.div_rn(1.0, scale)
        q = _to_e4m3(_quotient(x, scale[:, None], recip[:, None], FAST_DIV, SHORT_DIV), SOFT_ROUND)
        if EVEN:
            tl.store(out_row + cols, q, eviction_policy="evict_first")
        else:
            tl.store(out_row + cols, q, mask=mask, eviction_policy="evict_first")
    else:
        # pass 1: the row's amax; its lines stay in L2 for pass 2
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K).to(tl.int64))[None, :]
            if EVEN:
                x = tl.load(src_row + cols * stride_k, eviction_policy="evict_last")
            else:
                mask = row_ok[:, None] & (cols < K)
                x = tl.load(src_row + cols * stride_k, mask=mask, other=0.0, eviction_policy="evict_last")
            amax = _max_keep_nan(amax, _row_amax(x.to(tl.float32), INTERPRET))
        scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), Q_MAX)
        recip = tl.math.div_rn(1.0, scale)
        # pass 2: quantize, reading the row back from L2
        for k0 in range(0, K, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K).to(tl.int64))[None, :]
            if EVEN:
                x = tl.load(src_row + cols * stride_k, eviction_policy="evict_first").to(tl.float32)
                q = _to_e4m3(_quotient(x, scale[:, None], recip[:, None], FAST_DIV, SHORT_DIV), SOFT_ROUND)
                tl.store(out_row + cols, q, eviction_policy="evict_first")
            else:
                mask = row_ok[:, None] & (cols < K)
                x = tl.load(src_row + cols * stride_k, mask=mask, other=0.0, eviction_policy="evict_first")
                q = _to_e4m3(
                    _quotient(x.to(tl.float32), scale[:, None], recip[:, None], FAST_DIV, SHORT_DIV), SOFT_ROUND
                )
                tl.store(out_row + cols, q, mask=mask, eviction_policy="evict_first")
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    if tl.max(_non_finite(amax).to(tl.int32)) > 0:
        tl.store(flag_ptr, 1)


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
    EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr,
    SHORT_DIV: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_row_blocks = tl.cdiv(R, ROWS)
    for rb in range(pid, n_row_blocks, n_programs):
        _quantize_row_block(
            src_ptr, out_ptr, scale_ptr, flag_ptr, rb, R, N, K, stride_e, stride_n, stride_k,
            ROWS, BLOCK_K, SINGLE, EVEN, FAST_DIV, SOFT_ROUND, INTERPRET, False, SHORT_DIV,
        )  # fmt: skip


@triton.jit
def _quantize_rows_group_kernel(
    src_base,
    out_base,
    scale_base,
    table_ptr,
    flag_ptr,
    R,
    N,
    K,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE: tl.constexpr,
    EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    SHORT_DIV: tl.constexpr,
):
    """Grouped launch: program (row block, t) converts that row block of the group's tensor ``t``.

    Row ``t`` of the int64 table holds element offsets of that tensor's source, e4m3 and scale
    buffers from the bases, then its source strides (see ``conversion_core.formats.group_table``).
    """
    row = table_ptr + tl.program_id(1).to(tl.int64) * 6
    src_off = tl.load(row)
    out_off = tl.load(row + 1)
    scale_off = tl.load(row + 2)
    stride_e = tl.load(row + 3)
    stride_n = tl.load(row + 4)
    stride_k = tl.load(row + 5)
    if ALIGNED:  # every offset and stride a multiple of 16 elements: vectorised loads and stores
        src_off = tl.multiple_of(src_off, 16)
        out_off = tl.multiple_of(out_off, 16)
        stride_e = tl.multiple_of(stride_e, 16)
        stride_n = tl.multiple_of(stride_n, 16)
    _quantize_row_block(
        src_base + src_off, out_base + out_off, scale_base + scale_off, flag_ptr, tl.program_id(0),
        R, N, K, stride_e, stride_n, stride_k,
        ROWS, BLOCK_K, SINGLE, EVEN, FAST_DIV, SOFT_ROUND, INTERPRET, CONTIGUOUS_K, SHORT_DIV,
    )  # fmt: skip


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
    cfg = config or config_for(k, src.device)
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
        EVEN=_even(rows_total, k, cfg),
        FAST_DIV=cfg.fast_div,
        SOFT_ROUND=cfg.soft_round or src.device.type != "cuda",
        INTERPRET=src.device.type != "cuda",
        SHORT_DIV=cfg.short_div,
        num_warps=cfg.num_warps,
    )


def _even(rows_total: int, k: int, cfg: RowConfig) -> bool:
    return rows_total % cfg.rows == 0 and (k == cfg.block_k if cfg.single else k % cfg.block_k == 0)


def launch_row_group(calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
    """``launch_rows`` for many ``(src, out, scale_out)`` at once: one launch per run of same-shaped sources.

    The bytes are those of one ``launch_rows`` per call (the same row function and launch shape,
    :func:`config_for` K); only where each program finds its tensor differs.
    """
    if not calls:
        return
    device = calls[0][0].device
    on_gpu = device.type == "cuda"
    for group in group_table.groups(calls):
        e, n, k = group.shape
        cfg = config_for(k, device)
        rows_total = e * n
        src, out, scale_out = group.bases
        _quantize_rows_group_kernel[(-(-rows_total // cfg.rows), len(group.calls))](
            src,
            out,
            scale_out,
            group.table,
            flag,
            rows_total,
            n,
            k,
            ROWS=cfg.rows,
            BLOCK_K=cfg.block_k,
            SINGLE=cfg.single,
            EVEN=_even(rows_total, k, cfg),
            FAST_DIV=cfg.fast_div,
            SOFT_ROUND=cfg.soft_round or not on_gpu,
            INTERPRET=not on_gpu,
            CONTIGUOUS_K=group.contiguous_k,
            ALIGNED=group.aligned,
            SHORT_DIV=cfg.short_div,
            num_warps=cfg.num_warps,
        )


def quantize_rows(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, name: str) -> None:
    """Triton twin of ``torch_path.quantize_rows`` (same arguments, same bytes).

    The NaN/Inf flag is this thread's reused one (no allocation, no memset per call); reading it
    is the call's one sync.
    """
    if src.numel() == 0:
        from . import torch_path

        torch_path.quantize_rows(src, out, scale_out, name)
        return
    flag = flags.device_flag(src.device)
    try:
        launch_rows(src, out, scale_out, flag)
    except BaseException:
        flags.reset(flag)
        raise
    if flags.flagged(flag):
        raise non_finite_error(name, src.shape)
