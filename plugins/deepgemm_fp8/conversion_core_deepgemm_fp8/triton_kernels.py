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

#: Warps per 128x128 tile program (picked on an H100 by benchmarks/bench_quant.py).
BLOCK_NUM_WARPS = 16
#: Division flavour: False = ``div_rn`` per element, True = reciprocal + exact FMA correction.
BLOCK_FAST_DIV = True
#: Round to the e4m3 grid in software on a GPU too (always under the interpreter).
GPU_SOFT_ROUND = False


@dataclass(frozen=True)
class BlockConfig:
    """Launch shape of the tile kernel; every choice leaves the bytes unchanged.

    What can hold a one-pass tile kernel below copy speed on a wider memory system (H200): too
    few bytes in flight per SM (a 16-warp program holds one 32 KB tile and cannot issue the next
    load until its stores are done; more, smaller programs or a persistent loop whose next tile
    Triton prefetches while this one is computed keep more loads in flight), the division
    (``fast_div``: reciprocal + one FMA correction instead of ``div_rn``), and cache policy on
    streams that are read or written once (``evict_first``).
    """

    num_warps: int = BLOCK_NUM_WARPS
    fast_div: bool = BLOCK_FAST_DIV
    soft_round: bool = GPU_SOFT_ROUND  # on a GPU; always on under the interpreter
    #: >0: a persistent grid of that many programs per SM, each looping over tiles.
    programs_per_sm: int = 0
    #: Software-pipelining depth of the persistent loop (loads of later tiles in flight).
    num_stages: int = 1
    #: ``evict_first`` on the source loads and the e4m3 stores (read / written once).
    evict_first: bool = True
    #: With ``fast_div``: the correction as two FMAs and no select (:func:`_div_short`), 3
    #: instructions per element instead of 5; the sign of a zero quotient comes out right by itself.
    short_div: bool = False
    #: UE8M0 only: ``x * (1 / scale)`` instead of a division (exact: the scale is a power of two
    #: whose reciprocal is a normal float32), and the 240 clamp of the scale 2^120 only in that
    #: (never taken for real weights) branch, so one instruction per element instead of 5 to 7.
    pow2_mul: bool = False
    #: One int64 base per tile and int32 offsets inside it (the host checks they fit; else int64).
    tile_base: bool = False


#: The default launch shape (the H100 sweep's pick).
DEFAULT_CONFIG = BlockConfig()
#: Per-device launch shapes, by a substring of ``torch.cuda.get_device_name``; first match wins.
#: Fill from ``benchmarks/gpu_grouped.py``'s sweep (its "best" column) on each card; a card not
#: listed runs :data:`DEFAULT_CONFIG`.
DEVICE_CONFIGS: dict[str, BlockConfig] = {
    "H100": DEFAULT_CONFIG,
    # measured 2026-12-04 (benchmarks/results/h200_2026-12-04_fp8k/variant_probe.txt): 4 warps
    # (128 elements, 16 loads of 16 bytes in flight per thread) beat 8 and 16 on every shape, one
    # tile per program ties a persistent grid; pow2_mul lifts UE8M0 from 0.76 to the fp32-scale
    # kernel's ratio (0.90-0.96 of copy for both formats against 0.84-0.87 for the H100 pick)
    # 2026-12-04 run 2 (h200_2026-12-04c/quant.txt): evict_first=False lifts both formats from 0.90-0.94
    # to 0.99-1.02 of copy on every shape >= 64 MB, bytes == the default variant's
    "H200": BlockConfig(num_warps=4, short_div=True, pow2_mul=True, tile_base=True, evict_first=False),
}


@functools.lru_cache(maxsize=8)
def _device_name(index: int) -> str:
    return str(torch.cuda.get_device_name(index))


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def config_for(device: torch.device) -> BlockConfig:
    """The launch shape for ``device``: its :data:`DEVICE_CONFIGS` entry, else the default."""
    if device.type != "cuda":
        return DEFAULT_CONFIG
    name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    for key, config in DEVICE_CONFIGS.items():
        if key in name:
            return config
    return DEFAULT_CONFIG


#: The UE8M0 amax floor (``ue8m0.MIN_AMAX``: the float32 nearest 1e-4, so no conversion rounds it).
UE8M0_AMAX_FLOOR = tl.constexpr(9.999999747378752e-05)
#: ``ue8m0.SATURATE`` = 15 * 2^124: with a power-of-two scale, ``|q| <= SATURATE / scale`` keeps ``q * scale`` finite.
UE8M0_SATURATE = tl.constexpr(15.0 * 2.0**124)
#: Scales below this give ``SATURATE / scale >= 960``: the limit is 448 there without dividing into Inf.
UE8M0_SATURATE_FROM = tl.constexpr(2.0**118)
#: ``ue8m0.SATURATING_SCALE``: the smallest power-of-two scale whose limit ``SATURATE / scale`` is below 448.
UE8M0_SATURATING_SCALE = tl.constexpr(2.0**120)
#: In-tile int32 offsets (``tile_base``) must stay below this.
INT32_LIMIT = 2**31


@triton.jit
def _div_short(x, scale, recip):
    """``x / scale`` rounded to nearest (IEEE) in three instructions; ``recip`` = ``div_rn(1, scale)``.

    Markstein's correction as in ``fp8_triton._div_exact`` (q0 = x*recip within an ulp, an exact
    FMA residual, one rounding FMA), with the residual taken the other way round,
    ``q0*scale - x``, and subtracted: the same real numbers, so the same rounded quotient for
    every x != 0, while for x = -0 the residual is +0 and ``-0 - (+0)*recip`` stays -0 (the
    usual ``q0 + (x - q0*scale)*recip`` gives +0, which is why ``_div_exact`` spends a compare
    and a select on zeros). A quotient that underflows keeps the sign of x, and e4m3 rounds it
    to that signed zero as it does the IEEE quotient.
    """
    q0 = x * recip
    nrem = tl.fma(q0, scale, -x)
    return tl.fma(nrem, -recip, q0)


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
def _quantize_tile(
    src_ptr,
    out_ptr,
    scale_ptr,
    flag_ptr,
    tile,
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
    EVICT_FIRST: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    SHORT_DIV: tl.constexpr,
    POW2_MUL: tl.constexpr,
    TILE_BASE: tl.constexpr,
):
    """One (expert, block-row, block-column) tile ``tile``: load once, amax, scale, e4m3 bytes."""
    bk = tile % KB
    rest = tile // KB
    bn = rest % NB
    e = (rest // NB).to(tl.int64)
    if TILE_BASE:  # int64 only per tile; the host checked that in-tile offsets fit int32
        r = tl.arange(0, BLOCK_N)
        c = tl.arange(0, BLOCK_K)
        row0 = bn.to(tl.int64) * BLOCK_N
        col0 = bk.to(tl.int64) * BLOCK_K
        rows = bn * BLOCK_N + r
        cols = bk * BLOCK_K + c
        if CONTIGUOUS_K:
            src = (src_ptr + (e * stride_e + row0 * stride_n + col0)) + (r[:, None] * stride_n + c[None, :])
        else:
            src = (src_ptr + (e * stride_e + row0 * stride_n + col0 * stride_k)) + (
                r[:, None] * stride_n + c[None, :] * stride_k
            )
        out = (out_ptr + ((e * N + row0) * K + col0)) + (r[:, None] * K + c[None, :])
    else:
        rows = bn.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        cols = bk.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        if CONTIGUOUS_K:  # a grouped launch reads strides from its table: say what it cannot know
            src = src_ptr + (e * stride_e + rows[:, None] * stride_n + cols[None, :])
        else:
            src = src_ptr + (e * stride_e + rows[:, None] * stride_n + cols[None, :] * stride_k)
        out = out_ptr + ((e * N + rows[:, None]) * K + cols[None, :])
    if EVEN:  # every tile full: no masks to compute
        if EVICT_FIRST:
            x = tl.load(src, eviction_policy="evict_first").to(tl.float32)
        else:
            x = tl.load(src).to(tl.float32)
    else:
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        if EVICT_FIRST:
            x = tl.load(src, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(_row_amax(x, INTERPRET), 0, _max_keep_nan)
    if UE8M0:  # a power of two: the division below (and the reciprocal) is then exact
        scale = _ceil_pow2(tl.math.div_rn(tl.maximum(amax, UE8M0_AMAX_FLOOR), Q_MAX))
    else:
        scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), Q_MAX)
    recip = tl.math.div_rn(1.0, scale)
    if UE8M0 and POW2_MUL:
        # x * 2^-k and x / 2^k are the rounding of one real number: the same float32, subnormal
        # results included, as long as 2^-k is a normal float32 (for a finite source the scale
        # lies in [2^-22, 2^120]; only an Inf amax, which is refused, gives more)
        q = x * recip
        if scale >= UE8M0_SATURATING_SCALE:  # ue8m0.SATURATE / scale < 448 only here (amax > 2.9e38)
            limit = tl.minimum(tl.math.div_rn(UE8M0_SATURATE, scale), Q_MAX)
            q = tl.minimum(tl.maximum(q, -limit), limit)
    else:
        if FAST_DIV and SHORT_DIV:
            q = _div_short(x, scale, recip)
        else:
            q = _div_exact(x, scale, recip, FAST_DIV)
        if UE8M0:  # 448, or 240 for the scale 2^120, where 256 * scale would be Inf (ue8m0.SATURATE)
            # below 2^118 the quotient is >= 960 anyway; the floor on the divisor keeps it from overflowing
            limit = tl.minimum(tl.math.div_rn(UE8M0_SATURATE, tl.maximum(scale, UE8M0_SATURATE_FROM)), Q_MAX)
            q = tl.minimum(tl.maximum(q, -limit), limit)
    q = _to_e4m3(q, SOFT_ROUND)
    if EVEN:
        if EVICT_FIRST:
            tl.store(out, q, eviction_policy="evict_first")
        else:
            tl.store(out, q)
    else:
        if EVICT_FIRST:
            tl.store(out, q, mask=mask, eviction_policy="evict_first")
        else:
            tl.store(out, q, mask=mask)
    tl.store(scale_ptr + tile, scale)  # scale_out is contiguous (E, NB, KB): its flat index is the tile's
    if _non_finite(amax):
        tl.store(flag_ptr, 1)


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
    TILES,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr,
    UE8M0: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    PERSISTENT: tl.constexpr,
    STAGES: tl.constexpr,
    SHORT_DIV: tl.constexpr,
    POW2_MUL: tl.constexpr,
    TILE_BASE: tl.constexpr,
):
    """One tile per program, or (PERSISTENT) a grid of a few programs per SM looping over tiles."""
    pid = tl.program_id(0)
    if PERSISTENT:
        for tile in tl.range(pid, TILES, tl.num_programs(0), num_stages=STAGES):
            _quantize_tile(
                src_ptr, out_ptr, scale_ptr, flag_ptr, tile, N, K, NB, KB, stride_e, stride_n, stride_k,
                BLOCK_N, BLOCK_K, EVEN, FAST_DIV, SOFT_ROUND, INTERPRET, UE8M0, EVICT_FIRST, False,
                SHORT_DIV, POW2_MUL, TILE_BASE,
            )  # fmt: skip
    else:
        _quantize_tile(
            src_ptr, out_ptr, scale_ptr, flag_ptr, pid, N, K, NB, KB, stride_e, stride_n, stride_k,
            BLOCK_N, BLOCK_K, EVEN, FAST_DIV, SOFT_ROUND, INTERPRET, UE8M0, EVICT_FIRST, False,
            SHORT_DIV, POW2_MUL, TILE_BASE,
        )  # fmt: skip


@triton.jit
def _quantize_tile_group_kernel(
    src_base,
    out_base,
    scale_base,
    table_ptr,
    flag_ptr,
    N,
    K,
    NB,
    KB,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr,
    UE8M0: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    SHORT_DIV: tl.constexpr,
    POW2_MUL: tl.constexpr,
):
    """Grouped launch: program (tile, t) converts tile ``tile`` of the group's tensor ``t``.

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
    _quantize_tile(
        src_base + src_off, out_base + out_off, scale_base + scale_off, flag_ptr, tl.program_id(0),
        N, K, NB, KB, stride_e, stride_n, stride_k,
        BLOCK_N, BLOCK_K, EVEN, FAST_DIV, SOFT_ROUND, INTERPRET, UE8M0, EVICT_FIRST, CONTIGUOUS_K,
        SHORT_DIV, POW2_MUL, False,
    )  # fmt: skip


def _legacy_config(
    config: BlockConfig | None, num_warps: int | None, fast_div: bool | None, soft_round: bool | None
) -> BlockConfig | None:
    changes: dict[str, Any] = {}
    if num_warps is not None:
        changes["num_warps"] = num_warps
    if fast_div is not None:
        changes["fast_div"] = fast_div
    if soft_round is not None:
        changes["soft_round"] = soft_round
    if not changes:
        return config
    return replace(config or DEFAULT_CONFIG, **changes)


def _check_block(block: Sequence[int]) -> tuple[int, int]:
    br, bc = int(block[0]), int(block[1])
    if br & (br - 1) or bc & (bc - 1):
        raise ValueError(f"Triton block quantizer needs power-of-two blocks, got {tuple(block)}")
    return br, bc


def _tile_offsets_fit(x: torch.Tensor, out: torch.Tensor, br: int, bc: int) -> bool:
    """Whether every offset inside one tile, of the source and of the e4m3 output, fits int32."""
    k = x.shape[2]
    src_span = (br - 1) * abs(x.stride(1)) + (bc - 1) * abs(x.stride(2))
    return max(src_span, (br - 1) * k + bc - 1) < INT32_LIMIT


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
    config: BlockConfig | None = None,
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf. No host sync (for grouped callers).

    ``ue8m0``: power-of-two scales (``fp8_128x128_ue8m0``) instead of ``max(amax, 1e-12) / 448``.
    ``config``: the launch shape (default: :func:`config_for` the device); ``num_warps``,
    ``fast_div`` and ``soft_round`` override single fields of it.
    """
    br, bc = _check_block(block)
    cfg = _legacy_config(config, num_warps, fast_div, soft_round) or config_for(src.device)
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    nb, kb = -(-n // br), -(-k // bc)
    tiles = e * nb * kb
    on_gpu = src.device.type == "cuda"
    programs = tiles
    if cfg.programs_per_sm > 0:  # under the interpreter one "SM": each program loops over many tiles
        sms = _sm_count(src.device.index or 0) if on_gpu else 1
        programs = min(tiles, cfg.programs_per_sm * sms)
    _quantize_tile_kernel[(programs,)](
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
        tiles,
        BLOCK_N=br,
        BLOCK_K=bc,
        EVEN=n % br == 0 and k % bc == 0,
        FAST_DIV=cfg.fast_div,
        SOFT_ROUND=cfg.soft_round or not on_gpu,
        INTERPRET=not on_gpu,
        UE8M0=bool(ue8m0),
        EVICT_FIRST=cfg.evict_first,
        PERSISTENT=cfg.programs_per_sm > 0,
        STAGES=cfg.num_stages,
        SHORT_DIV=cfg.short_div,
        POW2_MUL=cfg.pow2_mul,
        TILE_BASE=cfg.tile_base and _tile_offsets_fit(x, out, br, bc),
        num_warps=cfg.num_warps,
    )


def launch_block_group(
    calls: Sequence[tuple[Any, ...]],
    flag: torch.Tensor,
    block: Sequence[int],
    ue8m0: bool = False,
    config: BlockConfig | None = None,
) -> None:
    """``launch_blocks`` for many ``(src, out, scale_out)`` at once: one launch per run of same-shaped sources.

    The bytes are those of one ``launch_blocks`` per call (the same tile function, the same
    constexprs); only where each program finds its tensor differs.
    """
    br, bc = _check_block(block)
    if not calls:
        return
    device = calls[0][0].device
    cfg = config or config_for(device)
    on_gpu = device.type == "cuda"
    for group in group_table.groups(calls):
        e, n, k = group.shape
        nb, kb = -(-n // br), -(-k // bc)
        src, out, scale_out = group.bases
        _quantize_tile_group_kernel[(e * nb * kb, len(group.calls))](
            src,
            out,
            scale_out,
            group.table,
            flag,
            n,
            k,
            nb,
            kb,
            BLOCK_N=br,
            BLOCK_K=bc,
            EVEN=n % br == 0 and k % bc == 0,
            FAST_DIV=cfg.fast_div,
            SOFT_ROUND=cfg.soft_round or not on_gpu,
            INTERPRET=not on_gpu,
            UE8M0=bool(ue8m0),
            EVICT_FIRST=cfg.evict_first,
            CONTIGUOUS_K=group.contiguous_k,
            ALIGNED=group.aligned,
            SHORT_DIV=cfg.short_div,
            POW2_MUL=cfg.pow2_mul,
            num_warps=cfg.num_warps,
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

    ``ue8m0`` stands for the torch path's ``scale_fn=ue8m0.scale_from_amax``. The NaN/Inf flag is
    this thread's reused one (no allocation, no memset per call); reading it is the call's one sync.
    """
    if src.numel() == 0:
        from . import torch_path

        kwargs = {}
        if ue8m0:
            from .ue8m0 import scale_from_amax

            kwargs["scale_fn"] = scale_from_amax
        torch_path.quantize_blocks(src, out, scale_out, (int(block[0]), int(block[1])), name, **kwargs)
        return
    flag = flags.device_flag(src.device)
    try:
        launch_blocks(src, out, scale_out, flag, block, ue8m0=ue8m0)
    except BaseException:
        flags.reset(flag)
        raise
    if flags.flagged(flag):
        raise non_finite_error(name, src.shape)
