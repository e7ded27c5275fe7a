"""One-pass Triton kernel for int4 W4A16: bit-identical to :mod:`.torch_path`.

One program owns ``BLOCK_R`` rows x ``BLOCK_G`` groups of one expert (the expert is a program
axis, so a tile never crosses experts). It loads the tile once as ``(rows, groups, words, 8)``
straight from pointer arithmetic (any source strides, masked edges): the 8 nibbles of one output
word are the last axis, so packing is shifts and a sum over that axis, with no reshape. It takes
each group's statistic, writes the scales, the packed words and (asymmetric) the zero points
packed along rows (``BLOCK_R`` is a multiple of 8, so a word's eight rows are always in one
program). Program ``(0, 0, 0)`` also writes ``weight_shape``: one launch, no host sync.

Bit-identity with the torch path rests on these facts (each variant below keeps all of them):

- bf16 rounding is done on the float32 bits (round-to-nearest-even, what torch's cast does; the
  interpreter's own cast truncates). It must keep NaN a NaN: NVIDIA's canonical NaN is
  ``0x7FFFFFFF`` and adding the rounding bias carries it into ``0x80000000`` = -0.0. That was
  the H200 asymmetric mismatch of 2026-12-03: a zero group has ``s = 0`` and ``min / s = 0/0``;
  on the GPU the NaN became -0.0, so ``zp = -8`` instead of torch's NaN -> 0, and every value of
  that group moved by 8 (numpy's NaN is ``0xFFC00000``, which survives the bias: the interpreter
  could not show it; ``test_bf16_rounding_keeps_nan`` feeds the GPU's NaN bits explicitly). The
  same carry turned an fp32/fp16 source NaN with a full payload into -0.0 or 0, unflagged.
- bf16 is read and written as int16 bits (a shift widens it exactly): the interpreter's float
  casts mangle subnormals, which then differed there alone (the GPU's cvt is exact).
- IEEE division where the torch path divides (``tl.math.div_rn``: PTX ``div.rn.f32``, no ftz;
  Triton's ``/`` is approximate on NVIDIA GPUs). ``fast_div`` replaces the per-element division
  by a multiplication with the group's correctly rounded reciprocal; :func:`_fast_div_note`
  proves the bf16 result (all the torch path keeps) cannot change.
- no fused multiply-add: the launch passes ``enable_fp_fusion=False``. The kernel has no
  ``a * b + c`` in float (``x * r`` is rounded to bf16 by integer ops before anything is added),
  so this is a guard, not a fix; the interpreter runs numpy (no contraction) and could not show it.
- round-half-even by the float32 magic number ``(v + 1.5*2^23) - 1.5*2^23`` (exact for
  ``|v| < 2^22``); ``int_pack`` fuses it with the ``+ 8`` offset and the float -> int conversion.
- NaN handled explicitly where hardware min/max would drop it (``maxnum`` returns the number).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import torch_path


@dataclasses.dataclass(frozen=True)
class Variant:
    """Launch choices that never change the bytes (each is proven under ``TRITON_INTERPRET=1``).

    ``fast_div``: ``x * bf16-group reciprocal`` instead of a per-element IEEE division;
    ``nan_red``: NaN/Inf found by NaN-propagating group min/max instead of a per-element test;
    ``int_pack``: ``q + 8`` read from the bits of ``clamp(v) + (1.5*2^23 + 8)`` instead of
    round, add and a float -> int conversion; ``sync_free``: flags by masked stores and fast_div's
    tiny-scale case by exact power-of-two scaling, so no reduction crosses warps; ``lean_mask``: the
    load mask is ``(rows, groups, 1, 1)`` (the first kernel also masked on ``col >= 0``, per
    element); ``even``: no masks where the grid tiles N and G exactly; ``i32``: 32-bit offsets
    when every offset of the source and outputs fits (else 64-bit); ``evict``: ``eviction_policy`` of the source load;
    ``rows`` x ``tile``: ``BLOCK_R`` and elements per program; ``warps``: ``num_warps``.
    """

    fast_div: bool = True
    nan_red: bool = True
    int_pack: bool = True
    i32: bool = True
    evict: str = ""
    sync_free: bool = True
    lean_mask: bool = True
    even: bool = True
    rows: int = 8
    tile: int = 2048
    warps: int = 2

    @property
    def name(self) -> str:
        flags = (
            ("d", self.fast_div),
            ("n", self.nan_red),
            ("p", self.int_pack),
            ("s", self.sync_free),
            ("m", self.lean_mask),
            ("e", self.even),
        )
        ops = "".join(c for c, on in flags if on)
        return (
            f"{ops or 'ieee'}{'-i32' if self.i32 else '-i64'}{'-ef' if self.evict else ''}"
            f" r{self.rows} t{self.tile} w{self.warps}"
        )


#: The first kernel (per-element IEEE division, per-element NaN test, int64 offsets), NaN fixed.
REFERENCE = Variant(
    fast_div=False, nan_red=False, int_pack=False, i32=False, sync_free=False, lean_mask=False, even=False, warps=8
)
#: Default launch: the best worst case of the H200 table of 2026-12-04 (``benchmarks/gpu_int4.py``,
#: launch mode, mlp.up/down and experts.down; ratio to copy 0.71-0.79 symmetric, 0.50-0.56
#: asymmetric), small tiles also fitting G = 6 (experts.down at group 128) without masked halves.
DEFAULT = Variant()
VARIANTS = {
    "ref": REFERENCE,
    "default": DEFAULT,
    "r16t8192w4": Variant(rows=16, tile=8192, warps=4),
    "dnp": Variant(sync_free=False, lean_mask=False, even=False),
    "d-only": Variant(nan_red=False, int_pack=False, i32=False, sync_free=False, lean_mask=False, even=False),
    "dnps": Variant(lean_mask=False, even=False),
    "no-even": Variant(even=False),
    "i64": Variant(i32=False),
    "ef": Variant(evict="evict_first"),
    "r8t4096w4": Variant(rows=8, tile=4096, warps=4),
    "r8t1024w1": Variant(rows=8, tile=1024, warps=1),
    "r8t2048w1": Variant(rows=8, tile=2048, warps=1),
    "r16t2048w2": Variant(rows=16, tile=2048, warps=2),
    "r16t4096w4": Variant(rows=16, tile=4096, warps=4),
    "r16t8192w8": Variant(rows=16, tile=8192, warps=8),
    "r16t8192w2": Variant(rows=16, tile=8192, warps=2),
    "r8t4096w2": Variant(rows=8, tile=4096, warps=2),
    "r32t8192w4": Variant(rows=32, tile=8192, warps=4),
    "r8t8192w4": Variant(rows=8, tile=8192, warps=4),
    "r32t16384w8": Variant(rows=32, tile=16384, warps=8),
}

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23; a jit function reads only constexpr globals
_PACK = tl.constexpr(12582920.0)  # 1.5 * 2^23 + 8: see int_pack
MAX_SCALE = tl.constexpr(torch_path.MAX_SCALE)
MAX_SCALE_ASYM = tl.constexpr(torch_path.MAX_SCALE_ASYM)
#: fast_div runs where every scale of the tile lies here: the reciprocal is then finite, normal
#: and correctly rounded (else the tile divides per element, as the torch path).
_FAST_LO = tl.constexpr(2.0**-120)
_FAST_HI = tl.constexpr(2.0**125)
_TINY = tl.constexpr(2.0**-64)
_UP = tl.constexpr(2.0**64)


def _fast_div_note() -> None:
    """Why ``bf16(x * RN(1/s)) == bf16(RN(x / s))`` for bf16 ``x`` and ``s`` (the kernel's fast_div).

    Write ``x = X 2^a``, ``s = S 2^b`` with integers ``X, S < 2^8`` (every bf16, subnormals too)
    and let ``t = x / s`` with ``2^e <= |t| < 2^(e+1)``, ``e >= -126``. The bf16 rounding
    boundaries there are the midpoints ``M = m 2^(e-8)``, ``m`` odd, ``2^8 < m < 2^9``.

    1. ``t`` is never a midpoint: ``x = M s`` gives ``X``'s odd part ``= m * (S's odd part) >= m
       > 2^8``, but ``X < 2^8``.
    2. ``|t - M| >= 2^(e-16)``: ``x - M s`` is a nonzero multiple of ``2^min(a, e-8+b)``, divided
       by ``s < 2^(b+8)``; if the minimum is ``a``, ``2^(a-b) >= 2^e S / X`` bounds it the same way.
    3. ``r = RN(1/s)`` (``div_rn``, r normal: ``2^-120 <= s <= 2^125``) and ``p = RN(x r)`` give
       ``|p - t| <= (2u + u^2)|t| < 2^(e-21.9)`` with ``u = 2^-24``; ``RN(x / s)`` is within
       ``u|t|``. Both lie strictly on ``t``'s side of every midpoint, so both round to the same
       bf16 (and double rounding float32 -> bf16 cannot tie: 1.).
    4. ``|t| < 2^-126``: both bf16 results have magnitude ``<= 2^-126``; the torch path only ever
       uses ``v`` through ``round(clamp(bf16(v [+ zp])))``, which is then ``zp`` (or 0) for both.

    So the quantized bytes are equal; ``v`` itself may differ only in case 4, where it is unused.
    """


@triton.jit
def _bf16(x):
    """float32 rounded to bf16 (nearest-even) on its bits; NaN stays NaN (see the module docstring)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def _bf16_finite(x):
    """:func:`_bf16` for values that are finite whenever the bytes are kept (a NaN input is flagged)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _rne(v):
    return (v + _RNE) - _RNE


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _any(b):
    return tl.max(tl.max(b.to(tl.int32), 1), 0) > 0


@triton.jit
def _flag_if(flag_ptr, cond, SYNC_FREE: tl.constexpr):
    """Set the flag where ``cond`` (a per-group tile) holds.

    SYNC_FREE: a masked store of 1 from every flagged lane (all write the same word), no reduction;
    else a reduction over the whole tile (through shared memory and a barrier) and one store.
    """
    if SYNC_FREE:
        tl.store(flag_ptr + tl.zeros(cond.shape, tl.int32), tl.full(cond.shape, 1, tl.int32), mask=cond)
    elif _any(cond):
        tl.store(flag_ptr, 1)


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
    SRC_BF16: tl.constexpr,
    FAST_DIV: tl.constexpr,
    NAN_RED: tl.constexpr,
    INT_PACK: tl.constexpr,
    I64: tl.constexpr,
    EVICT: tl.constexpr,
    SYNC_FREE: tl.constexpr,
    LEAN_MASK: tl.constexpr,
    EVEN: tl.constexpr,
):
    WORDS: tl.constexpr = GROUP // 8
    IDX: tl.constexpr = tl.int64 if I64 else tl.int32
    pid_r = tl.program_id(0).to(IDX)
    pid_g = tl.program_id(1).to(IDX)
    e = tl.program_id(2).to(IDX)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(IDX)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G).to(IDX)
    w = tl.arange(0, WORDS).to(IDX)
    j = tl.arange(0, 8).to(IDX)
    r4 = r[:, None, None, None]
    g4 = g[None, :, None, None]
    col = g4 * GROUP + w[None, None, :, None] * 8 + j[None, None, None, :]
    ptrs = src_ptr + e * stride_e + r4 * stride_n + col * stride_k
    if EVEN:  # the grid tiles N and G exactly: no masks at all
        x = tl.load(ptrs, eviction_policy=EVICT)
    elif LEAN_MASK:  # (rows, groups, 1, 1): constant along a word, so the 8 loads stay one vector
        x = tl.load(ptrs, mask=(r4 < N) & (g4 < G), other=0, eviction_policy=EVICT)
    else:
        x = tl.load(ptrs, mask=(r4 < N) & (g4 < G) & (col >= 0), other=0, eviction_policy=EVICT)
    if SRC_BF16:  # read as int16 bits and widened by a shift: exact (the interpreter's cast breaks subnormals)
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = _bf16(x.to(tl.float32))
    if not NAN_RED:
        bad = ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
        if tl.max(tl.max(tl.max(tl.max(bad, 3), 2), 1), 0) > 0:
            tl.store(flag_ptr, 1)
    gmask = (r[:, None] < N) & (g[None, :] < G)
    if ASYM:
        if NAN_RED:  # NaN-propagating: a NaN or Inf element shows in its group's min or max
            mn = tl.reduce(tl.reduce(x, 3, _min_nan), 2, _min_nan)
            mx = tl.reduce(tl.reduce(x, 3, _max_nan), 2, _max_nan)
            _flag_if(flag_ptr, (mn != mn) | (mx != mx) | (mn == -float("inf")) | (mx == float("inf")), SYNC_FREE)
        else:
            mn = tl.min(tl.min(x, 3), 2)
            mx = tl.max(tl.max(x, 3), 2)
        mn = tl.minimum(mn, 0.0)
        mx = tl.maximum(mx, 0.0)
        s = _bf16(tl.math.div_rn(_bf16(mx - mn), 15.0))
        zp = _bf16(-8.0 - _bf16(tl.math.div_rn(mn, s)))  # 0/0 = NaN for a zero group: kept by _bf16
        zp = tl.where(zp != zp, 0.0, tl.minimum(tl.maximum(zp, -8.0), 7.0))
        zp = _rne(zp)
        _flag_if(flag_ptr, tl.abs(s) == float("inf"), SYNC_FREE)
    else:
        if NAN_RED:
            amax = tl.reduce(tl.reduce(tl.abs(x), 3, _max_nan), 2, _max_nan)
            _flag_if(flag_ptr, (amax != amax) | (amax == float("inf")), SYNC_FREE)
        else:
            amax = tl.max(tl.max(tl.abs(x), 3), 2)
        s = _bf16(tl.math.div_rn(amax, 7.5))
        zp = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.float32)
    limit = MAX_SCALE_ASYM if ASYM else MAX_SCALE
    _flag_if(flag_ptr, s > limit, SYNC_FREE)  # a dequantized value would overflow bf16
    s = tl.where(s == 0.0, 0.0078125, s)
    if FAST_DIV and SYNC_FREE:
        # per group, no tile-wide branch: a scale below 2^-64 and its group (|x| < 16 s) are scaled by
        # 2^64 first (exact: bf16 values stay bf16 values, the quotient is unchanged), so the
        # reciprocal is finite and normal for every scale that is not flagged (s <= MAX_SCALE < 2^125)
        up = tl.where(s < _TINY, _UP, 1.0)
        rcp = tl.math.div_rn(tl.full((BLOCK_R, BLOCK_G), 1.0, tl.float32), s * up)
        v = _bf16_finite((x * up[:, :, None, None]) * rcp[:, :, None, None])
    elif FAST_DIV:
        lo = tl.min(tl.min(s, 1), 0)
        hi = tl.max(tl.max(s, 1), 0)
        if (lo >= _FAST_LO) & (hi <= _FAST_HI):  # uniform per program: see _fast_div_note
            rcp = tl.math.div_rn(tl.full((BLOCK_R, BLOCK_G), 1.0, tl.float32), s)
            v = _bf16_finite(x * rcp[:, :, None, None])
        else:
            v = _bf16_finite(tl.math.div_rn(x, s[:, :, None, None]))
    else:
        v = _bf16_finite(tl.math.div_rn(x, s[:, :, None, None]))
    if ASYM:
        v = _bf16_finite(v + zp[:, :, None, None])
    c = tl.minimum(tl.maximum(v, -8.0), 7.0)
    if INT_PACK:
        # c + (1.5*2^23 + 8) lies in [2^23, 2^24), where float32's spacing is 1: the add rounds to an
        # integer half-to-even, and 1.5*2^23 + 8 is even, so it is 1.5*2^23 + 8 + round(c); its low
        # mantissa bits are 8 + round(c) in [0, 15]. (|c| < 2^-12 rounds the same either way.)
        nib = (c + _PACK).to(tl.uint32, bitcast=True) & 0xF
    else:
        nib = (_rne(c) + 8.0).to(tl.uint32)
    u = nib << (j[None, None, None, :] * 4).to(tl.uint32)
    words = tl.sum(u, 3).to(tl.int32, bitcast=True)  # nibbles never overlap: the sum is their OR
    r3 = r[:, None, None]
    woff = (e * N + r3) * NW + g[None, :, None] * WORDS + w[None, None, :]
    if EVEN:
        tl.store(packed_ptr + woff, words)
    else:
        tl.store(packed_ptr + woff, words, mask=(r3 < N) & (g[None, :, None] < G))
    s_bits = (s.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)  # s is bf16-valued
    tl.store(scale_ptr + (e * N + r[:, None]) * G + g[None, :], s_bits, mask=gmask)
    if ASYM:
        zu = tl.where(gmask, zp + 8.0, 0.0).to(tl.uint32)
        zu = tl.reshape(zu, (BLOCK_R // 8, 8, BLOCK_G))
        shifts = (tl.arange(0, 8) * 4).to(tl.uint32)
        zw = tl.sum(zu << shifts[None, :, None], 1).to(tl.int32, bitcast=True)
        zr = pid_r * (BLOCK_R // 8) + tl.arange(0, BLOCK_R // 8).to(IDX)
        NZ = (N + 7) // 8
        tl.store(zp_ptr + (e * NZ + zr[:, None]) * G + g[None, :], zw, mask=(zr[:, None] < NZ) & (g[None, :] < G))
    if (pid_r == 0) & (pid_g == 0) & (e == 0):
        i = tl.arange(0, 4)
        dims = tl.where(i == NDIM - 1, G * GROUP, tl.where(i == NDIM - 2, N, E_OUT)).to(tl.int64)
        tl.store(shape_ptr + i, dims, mask=i < NDIM)


def tile(group: int, variant: Variant = DEFAULT) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_G)``: powers of two, ``BLOCK_R`` a multiple of 8, about ``variant.tile`` elements."""
    return variant.rows, max(1, variant.tile // (variant.rows * group))


def _fits_int32(src: torch.Tensor, *outs: torch.Tensor | None) -> bool:
    """Every element offset of the source view and of the outputs is below 2^31 (the i32 variant)."""
    reach = sum((d - 1) * abs(st) for d, st in zip(src.shape, src.stride(), strict=True)) if src.numel() else 0
    return reach < 2**31 and all(o is None or o.numel() < 2**31 for o in outs)


def launch(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp: torch.Tensor | None,
    flag: torch.Tensor,
    group: int,
    variant: Variant | None = None,
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf (or a bf16 overflow). No host sync."""
    v = variant or DEFAULT
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    groups = k // group
    br, bg = tile(group, v)
    bg = min(bg, triton.next_power_of_2(max(groups, 1)))
    grid = (triton.cdiv(n, br), triton.cdiv(groups, bg), e)
    _int4_kernel[grid](
        x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
        packed,
        scale.view(torch.int16),
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
        SRC_BF16=src.dtype == torch.bfloat16,
        FAST_DIV=v.fast_div,
        NAN_RED=v.nan_red,
        INT_PACK=v.int_pack,
        I64=not (v.i32 and _fits_int32(x, packed, scale, zp)),
        EVICT=v.evict,
        SYNC_FREE=v.sync_free,
        LEAN_MASK=v.lean_mask,
        EVEN=v.even and n % br == 0 and groups % bg == 0,
        num_warps=v.warps,
        enable_fp_fusion=False,
    )


def quantize(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp: torch.Tensor | None,
    group: int,
    name: str,
    variant: Variant | None = None,
) -> None:
    """Triton twin of ``torch_path.quantize``: one launch, one host sync (the flag)."""
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch(src, packed, scale, shape_out, zp, flag, group, variant)
    if int(flag.item()):
        raise torch_path.non_finite_error(
            name, src.shape, "holds NaN or Inf, values beyond bf16, or a group too large for it"
        )
