"""One-pass Triton kernel for int4 W4A16: bit-identical to :mod:`.torch_path`.

One program owns ``BLOCK_R`` rows x ``BLOCK_G`` groups of one expert (the expert is a program
axis, so a tile never crosses experts). It loads the tile once as ``(rows, groups, words, 8)``
(any source strides, int64 offsets, masked edges), takes each group's statistic, writes the
scales, the packed words and (asymmetric) the zero points packed along rows (``BLOCK_R`` is a
multiple of 8, so a word's eight rows are always in one program). Program ``(0, 0, 0)`` also
writes ``weight_shape``, so the whole conversion is one launch with no host sync (``launch``).

Bit-identity with the torch path rests on: every bf16 rounding done on the float32 bits
(round-to-nearest-even, what torch's cast does; the interpreter's own cast truncates), IEEE
division (``tl.math.div_rn``; Triton's ``/`` is approximate on NVIDIA GPUs), round-half-even
by the float32 magic-number trick ``(v + 1.5*2^23) - 1.5*2^23`` (exact for ``|v| < 2^22``),
and NaN handled explicitly where hardware min/max would drop it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_path

#: Elements per program tile (picked without a GPU; ``benchmarks/gpu_int4.py`` measures it).
TILE_ELEMENTS = 8192
ROWS = 16
NUM_WARPS = 8
_RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23; a jit function reads only constexpr globals
MAX_SCALE = tl.constexpr(torch_path.MAX_SCALE)
MAX_SCALE_ASYM = tl.constexpr(torch_path.MAX_SCALE_ASYM)


@triton.jit
def _bf16(x):
    """float32 rounded to bf16 (nearest-even) on its bits: the interpreter's cast truncates instead."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rne(v):
    return (v + _RNE) - _RNE


@triton.jit
def _int4_kernel(
    src_ptr,
    packed_ptr,
    scale_ptr,
    shape_ptr,
    zp_ptr,
    flag_ptr,
    N,
    G,
    NW,
    stride_e,
    stride_n,
    stride_k,
    E_OUT,
    NDIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ASYM: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    WORDS: tl.constexpr = GROUP // 8
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    g = pid_g.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    w = tl.arange(0, WORDS).to(tl.int64)
    j = tl.arange(0, 8).to(tl.int64)
    r4 = r[:, None, None, None]
    g4 = g[None, :, None, None]
    col = g4 * GROUP + w[None, None, :, None] * 8 + j[None, None, None, :]
    mask = (r4 < N) & (g4 < G) & (col >= 0)
    x = tl.load(src_ptr + e * stride_e + r4 * stride_n + col * stride_k, mask=mask, other=0.0)
    x = _bf16(x.to(tl.float32))
    bad = ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
    if tl.max(tl.max(tl.max(tl.max(bad, 3), 2), 1), 0) > 0:
        tl.store(flag_ptr, 1)
    gmask = (r[:, None] < N) & (g[None, :] < G)
    if ASYM:
        mn = tl.min(tl.min(x, 3), 2)
        mx = tl.max(tl.max(x, 3), 2)
        mn = tl.minimum(mn, 0.0)
        mx = tl.maximum(mx, 0.0)
        s = _bf16(tl.math.div_rn(_bf16(mx - mn), 15.0))
        zp = _bf16(-8.0 - _bf16(tl.math.div_rn(mn, s)))
        zp = tl.where(zp != zp, 0.0, tl.minimum(tl.maximum(zp, -8.0), 7.0))
        zp = _rne(zp)
        if tl.max(tl.max((tl.abs(s) == float("inf")).to(tl.int32), 1), 0) > 0:
            tl.store(flag_ptr, 1)
    else:
        amax = tl.max(tl.max(tl.abs(x), 3), 2)
        s = _bf16(tl.math.div_rn(amax, 7.5))
        zp = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.float32)
    limit = MAX_SCALE_ASYM if ASYM else MAX_SCALE
    if tl.max(tl.max((s > limit).to(tl.int32), 1), 0) > 0:  # a dequantized value would overflow bf16
        tl.store(flag_ptr, 1)
    s = tl.where(s == 0.0, 0.0078125, s)
    v = _bf16(tl.math.div_rn(x, s[:, :, None, None]))
    if ASYM:
        v = _bf16(v + zp[:, :, None, None])
    q = _rne(tl.minimum(tl.maximum(v, -8.0), 7.0))
    u = (q + 8.0).to(tl.uint32) << (j[None, None, None, :] * 4).to(tl.uint32)
    words = tl.sum(u, 3).to(tl.int32, bitcast=True)  # nibbles never overlap: the sum is their OR
    r3 = r[:, None, None]
    woff = (e * N + r3) * NW + g[None, :, None] * WORDS + w[None, None, :]
    tl.store(packed_ptr + woff, words, mask=(r3 < N) & (g[None, :, None] < G))
    tl.store(scale_ptr + (e * N + r[:, None]) * G + g[None, :], s.to(tl.bfloat16), mask=gmask)
    if ASYM:
        zu = tl.where(gmask, zp + 8.0, 0.0).to(tl.uint32)
        zu = tl.reshape(zu, (BLOCK_R // 8, 8, BLOCK_G))
        shifts = (tl.arange(0, 8) * 4).to(tl.uint32)
        zw = tl.sum(zu << shifts[None, :, None], 1).to(tl.int32, bitcast=True)
        zr = pid_r.to(tl.int64) * (BLOCK_R // 8) + tl.arange(0, BLOCK_R // 8).to(tl.int64)
        NZ = (N + 7) // 8
        tl.store(zp_ptr + (e * NZ + zr[:, None]) * G + g[None, :], zw, mask=(zr[:, None] < NZ) & (g[None, :] < G))
    if (pid_r == 0) & (pid_g == 0) & (e == 0):
        i = tl.arange(0, 4)
        dims = tl.where(i == NDIM - 1, G * GROUP, tl.where(i == NDIM - 2, N, E_OUT)).to(tl.int64)
        tl.store(shape_ptr + i, dims, mask=i < NDIM)


def tile(group: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_G)``: powers of two, ``BLOCK_R`` a multiple of 8, about TILE_ELEMENTS."""
    return ROWS, max(1, TILE_ELEMENTS // (ROWS * group))


def launch(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp: torch.Tensor | None,
    flag: torch.Tensor,
    group: int,
    block_r: int | None = None,
    block_g: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf (or a bf16 overflow). No host sync."""
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    groups = k // group
    br, bg = tile(group)
    br, bg = block_r or br, block_g or min(bg, triton.next_power_of_2(max(groups, 1)))
    grid = (triton.cdiv(n, br), triton.cdiv(groups, bg), e)
    _int4_kernel[grid](
        x,
        packed,
        scale,
        shape_out,
        zp if zp is not None else packed,
        flag,
        n,
        groups,
        k // 8,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        e,
        NDIM=src.dim(),
        GROUP=group,
        BLOCK_R=br,
        BLOCK_G=bg,
        ASYM=zp is not None,
        num_warps=num_warps or NUM_WARPS,
    )


def quantize(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp: torch.Tensor | None,
    group: int,
    name: str,
) -> None:
    """Triton twin of ``torch_path.quantize``: one launch, one host sync (the flag)."""
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch(src, packed, scale, shape_out, zp, flag, group)
    if int(flag.item()):
        raise torch_path.non_finite_error(
            name, src.shape, "holds NaN or Inf, values beyond bf16, or a group too large for it"
        )
