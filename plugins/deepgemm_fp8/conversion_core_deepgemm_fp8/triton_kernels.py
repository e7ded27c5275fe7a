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
