"""One-pass Triton kernels for int4 W4A16: bit-identical to :mod:`.torch_path`.

The default kernel (:func:`_int4_kernel`, launch choices :class:`Variant`) is laid out for the
instruction count, which is what held the first kernel (:func:`_int4_kernel_v1`, :class:`V1`) at
0.5-0.8 of a device copy on the H200: its SASS spent about 25 instructions per element (bf16
rounding in four integer ops, two IEEE divisions and a bf16 rounding per group *per thread*, with
16 threads sharing each group of 128, and six barriers per program for layout conversions of the
flag and scale stores). The budget at 0.9 of copy is about 20 issue slots per element at full
issue, less in practice. What this kernel changes, each exact for the reasons given in
:func:`_exactness_note`:

- layout: a program loads ``(WB, BLOCK_R, BLOCK_G, WT, 8)``: ``WT`` threads share a group (the
  thread axes are the last ones, the order Triton's coalescing picks), each holding ``WB`` words of
  it as register repeats; group statistics are in-thread reductions plus ``log2 WT`` shuffles, and
  the per-group work (scale, reciprocal, zero point) is repeated by ``WT`` threads, not 16;
- per element ``x * up * rcp`` with the group's reciprocal ``rcp = 1 / (s * up)`` from the
  approximate divide (``div.full.f32``, 2 ulp): proven not to change a byte (``nudge`` tests it);
- the bf16 rounding of that quotient in two integer ops (``bits + 0x8000``, mask): it is never a
  bf16 midpoint, so ties need no care (``split``: three float ops, Veltkamp's splitting, instead);
- asymmetric ``bf16(v + zp)`` (ties do occur there) by the binade's magic number
  ``(y + 1.5 * 2^16 * 2^E) - 1.5 * 2^16 * 2^E``: one integer op and three float ops;
- packing without masks: ``c + (1.5 * 2^23 + 8)`` has the bits ``0x4B400000 + q + 8``, so a word is
  ``sum_j bits_j << 4j`` minus a constant (modulo 2^32);
- the scale ``bf16(amax / 7.5)`` (``bf16(range / 15)``) as a product with ``RN(1 / 7.5)``, the
  zero point's ``min / s`` with the reciprocal; NaN, Inf and scales too large for bf16 give one
  per-group flag test ``not (s <= limit)``, reduced once per program (``flag_red``) or stored
  masked.

Both kernels keep these facts (the first kernel's notes, still true):

- bf16 rounding is done on the float32 bits (round-to-nearest-even, what torch's cast does; the
  interpreter's own cast truncates). It must keep NaN a NaN: NVIDIA's canonical NaN is
  ``0x7FFFFFFF`` and adding the rounding bias carries it into ``0x80000000`` = -0.0. That was
  the H200 asymmetric mismatch of 2026-12-03: a zero group has ``s = 0`` and ``min / s = 0/0``;
  on the GPU the NaN became -0.0, so ``zp = -8`` instead of torch's NaN -> 0, and every value of
  that group moved by 8 (numpy's NaN is ``0xFFC00000``, which survives the bias: the interpreter
  could not show it; ``test_bf16_rounding_keeps_nan`` feeds the GPU's NaN bits explicitly). The
  same carry turned an fp32/fp16 source NaN with a full payload into -0.0 or 0, unflagged. Every
  rounding whose input can be NaN while the bytes are kept uses :func:`_bf16`.
- bf16 is read and written as int16 bits (a shift widens it exactly): the interpreter's float
  casts mangle subnormals, which then differed there alone (the GPU's cvt is exact).
- no fused multiply-add: the launch passes ``enable_fp_fusion=False`` (and Triton emits
  ``mul.rn`` / ``add.rn``, which ptxas never contracts); the interpreter runs numpy (no
  contraction) and could not show it. No float operation here is ``.ftz``: subnormals are exact.
- round-half-even to an integer by the float32 magic number ``(v + 1.5*2^23) - 1.5*2^23``.
- NaN handled explicitly where hardware min/max would drop it (``maxnum`` returns the number).

Grouped launches (:func:`launch_group`, the conversions' ``launch_group``): a run of calls whose
sources sit at new addresses every step (an FSDP all-gather, a trainer's loop) costs one launch per
group of like sources, not one per tensor. The default kernel's body is the ``@triton.jit`` tile
function :func:`_int4_tile`, which :func:`_int4_kernel` calls with its arguments and
:func:`_int4_group_kernel` with a ``conversion_core.formats.group_table`` row (offsets from the
group's bases, strides): same view of the source, same constexprs, so the same bytes and flag as
one :func:`launch` per tensor. Moving the body into the tile function left :func:`_int4_kernel`'s PTX
unchanged (Triton 3.9, sm_90, debug line info aside; checked on CPU for both symmetries, groups 128
and 32, pairs or not, masked or not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from conversion_core.formats import group_table

from . import torch_path


@dataclasses.dataclass(frozen=True)
class Variant:
    """Launch choices of :func:`_int4_kernel` that never change the bytes (each proven under ``TRITON_INTERPRET=1``).

    ``wt``: threads sharing a group (a power of two, at most ``group / 8``; each holds
    ``group / 8 / wt`` words of it); ``rows`` x ``tile``: ``BLOCK_R`` and elements per program;
    ``warps``: ``num_warps``; ``split``: the quotient's bf16 rounding by Veltkamp's splitting (three
    float ops) instead of two integer ops; ``exact_rcp``: the group reciprocal by IEEE division
    (``div_rn``) instead of ``div.full``; ``magic``: the asymmetric ``bf16(v + zp)`` by the binade's
    magic number instead of the four-op bit rounding; ``flag_red``: the flag by one reduction per
    program instead of a masked store per group; ``i32``: 32-bit offsets when every offset fits;
    ``even``: no masks where the grid tiles N and G exactly; ``nudge``: test only, moves the
    reciprocal by that many ulps (the bytes must not change: the GPU's ``div.full`` is within 2).
    """

    wt: int = 2
    rows: int = 8
    tile: int = 8192
    warps: int = 4
    pairs: bool = True
    uniform: bool = True
    split: bool = False
    exact_rcp: bool = False
    magic: bool = True
    flag_red: bool = True
    i32: bool = True
    even: bool = True
    nudge: int = 0

    @property
    def name(self) -> str:
        ops = "".join(
            c
            for c, on in (
                ("p", self.pairs),
                ("u", self.uniform),
                ("s", self.split),
                ("x", self.exact_rcp),
                ("m", self.magic),
                ("f", self.flag_red and not self.uniform),
            )
            if on
        )
        tail = f"{'' if self.i32 else '-i64'}{'' if self.even else '-ne'}"
        return f"v2-{ops or '-'}{tail} wt{self.wt} r{self.rows} t{self.tile} w{self.warps}"


@dataclasses.dataclass(frozen=True)
class V1:
    """Launch choices of the first kernel :func:`_int4_kernel_v1` (kept as the benchmark's baseline).

    ``fast_div``: ``x * bf16-group reciprocal`` instead of a per-element IEEE division;
    ``nan_red``: NaN/Inf found by NaN-propagating group min/max instead of a per-element test;
    ``int_pack``: ``q + 8`` read from the bits of ``clamp(v) + (1.5*2^23 + 8)`` instead of
    round, add and a float -> int conversion; ``sync_free``: flags by masked stores and fast_div's
    tiny-scale case by exact power-of-two scaling, so no reduction crosses warps; ``lean_mask``: the
    load mask is ``(rows, groups, 1, 1)`` (the first kernel also masked on ``col >= 0``, per
    element); ``even``: no masks where the grid tiles N and G exactly; ``i32``: 32-bit offsets
    when every offset of the source and outputs fits (else 64-bit); ``evict``: ``eviction_policy``
    of the source load; ``rows`` x ``tile``: ``BLOCK_R`` and elements per program; ``warps``:
    ``num_warps``.
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
            f"v1-{ops or 'ieee'}{'-i32' if self.i32 else '-i64'}{'-ef' if self.evict else ''}"
            f" r{self.rows} t{self.tile} w{self.warps}"
        )


#: Default launch (see the module docstring; the H200 table of ``benchmarks/gpu_int4.py`` decides).
DEFAULT = Variant()
#: The asymmetric default: 4 threads per group (H200 2026-12-04, mlp.up: 0.72 of copy, 2 threads 0.64).
ASYM_DEFAULT = Variant(wt=4)
#: The first kernel's default of 2026-12-04 (H200: 0.71-0.82 of copy symmetric, 0.50-0.56 asymmetric).
V1_DEFAULT = V1()
#: The first kernel as first written (per-element IEEE division, per-element NaN test, int64 offsets).
REFERENCE = V1(
    fast_div=False, nan_red=False, int_pack=False, i32=False, sync_free=False, lean_mask=False, even=False, warps=8
)
VARIANTS: dict[str, Variant | V1] = {
    "default": DEFAULT,
    "wt1": Variant(wt=1),
    "wt4": Variant(wt=4),
    "wt16": Variant(wt=16),
    "split": Variant(split=True),
    "exact-rcp": Variant(exact_rcp=True),
    "bits2": Variant(magic=False),
    "no-pairs": Variant(pairs=False),
    "no-uniform": Variant(uniform=False),
    "flag-store": Variant(uniform=False, flag_red=False),
    "no-even": Variant(even=False),
    "t4096w2": Variant(tile=4096, warps=2),
    "t4096w1": Variant(tile=4096, warps=1),
    "t2048w1": Variant(tile=2048, warps=1),
    "t16384w8": Variant(tile=16384, warps=8),
    "r16t8192w4": Variant(rows=16),
    "t8192w2": Variant(warps=2),
    "v1": V1_DEFAULT,
    "v1-ref": REFERENCE,
}

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23; a jit function reads only constexpr globals
_PACK = tl.constexpr(12582920.0)  # 1.5 * 2^23 + 8: see int_pack
#: ``sum_j 0x4B400000 << 4j`` modulo 2^32 (the exponent bits of eight ``c + _PACK``), as int32.
_PACK_SUM = tl.constexpr(sum(0x4B400000 << (4 * j) for j in range(8)) % 2**32)
_R75 = tl.constexpr(0.13333334028720856)  # RN(1 / 7.5) in float32
_R15 = tl.constexpr(0.06666667014360428)  # RN(1 / 15) in float32
_MAGIC = tl.constexpr(98304.0)  # 1.5 * 2^16: times 2^E, the bf16 magic number of binade E
MAX_SCALE = tl.constexpr(torch_path.MAX_SCALE)
MAX_SCALE_ASYM = tl.constexpr(torch_path.MAX_SCALE_ASYM)
#: fast_div runs where every scale of the tile lies here: the reciprocal is then finite, normal
#: and correctly rounded (else the tile divides per element, as the torch path).
_FAST_LO = tl.constexpr(2.0**-120)
_FAST_HI = tl.constexpr(2.0**125)
_TINY = tl.constexpr(2.0**-64)
_UP = tl.constexpr(2.0**64)
_INF = tl.constexpr(float("inf"))


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


def _exactness_note() -> None:
    """Why :func:`_int4_kernel`'s shortcuts give the torch path's bytes (IEEE binary32, no ftz, no fma).

    Notation of :func:`_fast_div_note`: ``u = 2^-24``; for bf16 ``x`` and ``s`` and ``t = x / s`` with
    ``2^e <= |t| < 2^(e+1)``, ``e >= -126``, ``t`` lies at least ``2^(e-16)``, a relative ``2^-17``,
    from every bf16 midpoint (steps 1-2 there hold for any bf16 ``s``, 7.5 and 15 included).

    1. Any reciprocal will do whose relative error is below ``2^-20``: with ``rcp = (1/d)(1 + a)``,
       ``|a| <= 2^-22`` (``div.full.f32``: 2 ulp, ``d = s * up`` normal), ``p = RN(RN(x up) rcp)``
       is ``t (1 + a)(1 + b)``, ``|b| <= u``, so ``|p - t| < 2^-21.6 |t|``: ``p`` and ``t`` (and torch's
       ``RN(x / s)``, within ``u |t|``) lie strictly on one side of every midpoint and round to the
       same bf16. ``up = 2^64`` for ``s < 2^-64`` makes ``d`` and ``1/d`` normal (``2^-69 <= d <=
       MAX_SCALE``); ``x up`` is exact (a power of two, no overflow: ``|x| < 23 s``). Below
       ``2^-126`` both quotients round to bf16 values under ``2^-126``, which every later step maps
       to the same bytes (``q = 0``, or ``zp``). The zero point's ``bf16(min / s)`` is the same
       statement with ``x = min``; ``s = 0`` gives ``rcp = inf`` exactly (IEEE, and ``div.full``), so
       ``0 * inf = NaN`` and ``min * inf = -inf`` as torch's ``0 / 0`` and ``min / 0``.
    2. ``p`` is never a bf16 midpoint (1.), so its rounding needs no tie rule: ``(bits + 0x8000) &
       0xFFFF0000`` rounds the magnitude half-up, which is nearest; Veltkamp's ``g = p (2^16 + 1)``,
       ``p_hi = g + (p - g)`` is a rounding to nearest to 8 bits for binary32 (Boldo, "Pitfalls of a
       full floating-point proof", 2006), again without ties to break. For ``|p| < 2^-126`` both
       give a value below ``2^-125``: unused (1.).
    3. ``bf16(amax / 7.5) = bf16(RN(amax RN(1/7.5)))`` and the same for ``range / 15``: 1. with a
       constant reciprocal (``|a| <= u``) for normal quotients; a subnormal quotient ``t = A 2^-133 /
       7.5`` is ``(4A - 30m - 15) 2^-135 / 7.5`` from the midpoint ``(m + 1/2) 2^-133``, an odd
       numerator, so at least ``2^-138`` away, while the product's error is at most ``2^-149``. The
       scale is rounded by :func:`_bf16` anyway (NaN must stay NaN for the flag).
    4. ``bf16(y)`` for ``y = RN(v + zp)`` (ties happen: ``3 + 0.4921875``): with ``2^E`` the bits
       ``y & 0x7F800000`` and ``m = 1.5 * 2^16 * 2^E``, ``y + m`` lies in ``[2^(E+16), 2^(E+17))``
       whose spacing ``2^(E-7)`` is bf16's in binade ``E``; ``m / 2^(E-7) = 1.5 * 2^23`` is even, so
       the sum rounds ``y`` to nearest-even on the bf16 grid and ``(y + m) - m`` is exact (Sterbenz).
       Zero or subnormal ``y`` gives ``m = 0`` and ``y`` unrounded, below ``2^-126``: ``q = 0`` both.
    5. ``c + (1.5 * 2^23 + 8)`` for ``c`` in ``[-8, 7]`` is ``1.5 * 2^23 + 8 + round_half_even(c)``
       (spacing 1, ``1.5 * 2^23 + 8`` even), bits ``0x4B400000 + q + 8``; the eight shifted words
       sum, modulo 2^32, to the packed word plus ``_PACK_SUM`` (the nibbles never carry).
    6. The flag: torch refuses NaN/Inf sources, an infinite range and scales above the limit. A NaN
       or Inf element makes the NaN-propagating group statistic NaN or Inf, so the scale NaN or
       Inf; ``not (s <= limit)`` is true for each case and only for them.
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
def _bf16_nt(x):
    """bf16 rounding of a value that is never a bf16 midpoint (:func:`_exactness_note`, 2.): two integer ops."""
    return ((x.to(tl.uint32, bitcast=True) + 0x8000) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_split(x):
    """:func:`_bf16_nt` by Veltkamp's splitting (three float ops instead of two integer ops)."""
    big = x * 65537.0
    return big + (x - big)


@triton.jit
def _bf16_magic(y):
    """Round-to-nearest-even bf16 of a finite ``y`` by the magic number of its binade (:func:`_exactness_note`, 4.).

    Zero and subnormal ``y`` come back unrounded (callers only compare them with 0.5).
    """
    m = (y.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True) * _MAGIC
    return (y + m) - m


@triton.jit
def _gmax(x):
    """NaN-propagating max over each group of a ``(WB, R, G, WT, 8)`` tile: ``(R, G)``."""
    return tl.reduce(tl.reduce(tl.reduce(x, 4, _max_nan), 0, _max_nan), 2, _max_nan)


@triton.jit
def _gmin(x):
    return tl.reduce(tl.reduce(tl.reduce(x, 4, _min_nan), 0, _min_nan), 2, _min_nan)


@triton.jit
def _bcast(a):
    """``(R, G)`` -> ``(1, R, G, 1, 1)``, expanding in the reverse order of :func:`_gmax`'s reductions.

    The reduced layout is then broadcast as it is (``a[None, :, :, None, None]`` nests the slices
    the other way round, and Triton converted it through shared memory).
    """
    return tl.expand_dims(tl.expand_dims(tl.expand_dims(a, 2), 0), 4)


@triton.jit
def _codes(x, up, rcp, zp, ASYM: tl.constexpr, SPLIT: tl.constexpr, MAGIC: tl.constexpr, SCALED: tl.constexpr):
    """Each element's ``0x4B400000 + q + 8`` (the bits of ``clamp(v) + 1.5*2^23 + 8``), from its group's values.

    SCALED: some group of the tile has a scale below 2^-64, so ``x`` is scaled by ``up`` first and
    both clamps are needed; otherwise (every scale normal) ``|bf16(x / s)| <= 7.53125`` for the
    symmetric scale, and only the upper clamp can act (:func:`_exactness_note`, 1.).
    """
    if SCALED:
        p = (x * _bcast(up)) * _bcast(rcp)
    else:
        p = x * _bcast(rcp)
    if SPLIT:
        v = _bf16_split(p)
    else:
        v = _bf16_nt(p)
    if ASYM:
        if MAGIC:
            v = _bf16_magic(v + _bcast(zp))
        else:
            v = _bf16_finite(v + _bcast(zp))
    if ASYM or SCALED:
        c = tl.minimum(tl.maximum(v, -8.0), 7.0)
    else:
        c = tl.minimum(v, 7.0)
    return (c + _PACK).to(tl.uint32, bitcast=True)


@triton.jit
def _pack(xl, xh, up, rcp, zp, ASYM: tl.constexpr, SPLIT: tl.constexpr, MAGIC: tl.constexpr, SCALED: tl.constexpr):
    """int32 words of a ``(WB, R, G, WT, K)`` tile: ``xh`` None (K = 8 elements) or the odd elements (K = 4 pairs)."""
    bits = _codes(xl, up, rcp, zp, ASYM, SPLIT, MAGIC, SCALED)
    if xh is None:
        shift = (tl.arange(0, 8) * 4).to(tl.uint32)
        u = bits << shift[None, None, None, None, :]
    else:
        shift = (tl.arange(0, 4) * 8).to(tl.uint32)
        odd = _codes(xh, up, rcp, zp, ASYM, SPLIT, MAGIC, SCALED)
        u = (bits << shift[None, None, None, None, :]) + (odd << (shift + 4)[None, None, None, None, :])
    # the exponent bits 0x4B4 of every element add up to _PACK_SUM modulo 2^32; the nibbles never carry
    return tl.sum(u, 4).to(tl.int32, bitcast=True) - _PACK_SUM


@triton.jit
def _int4_tile(
    src_ptr,
    packed_ptr,
    scale_ptr,
    shape_ptr,
    zp_ptr,
    flag_ptr,
    pid_r,
    pid_g,
    e,
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
    WT: tl.constexpr,
    ASYM: tl.constexpr,
    SRC_BF16: tl.constexpr,
    PAIRS: tl.constexpr,
    I64: tl.constexpr,
    EVEN: tl.constexpr,
    UNIFORM: tl.constexpr,
    SPLIT: tl.constexpr,
    EXACT_RCP: tl.constexpr,
    MAGIC: tl.constexpr,
    FLAG_RED: tl.constexpr,
    NUDGE: tl.constexpr,
):
    """Tile ``(pid_r, pid_g)`` of expert ``e`` of one tensor: ``BLOCK_R`` rows x ``BLOCK_G`` groups (module docstring).

    The body of both :func:`_int4_kernel` (one tensor per launch) and :func:`_int4_group_kernel`
    (a table row per tensor), so the two launches write the same bytes by construction. ``pid_r``,
    ``pid_g`` and ``e`` come in as ``IDX`` (int64 with ``I64``, else int32), as do the strides.

    PAIRS: the bf16 source is read as int32 pairs (its strides in int32 units, ``stride_k`` unused):
    ``w << 16`` and ``w & 0xFFFF0000`` are the even and odd elements, one integer op each.
    """
    WORDS: tl.constexpr = GROUP // 8
    WB: tl.constexpr = WORDS // WT
    K: tl.constexpr = 4 if PAIRS else 8
    IDX: tl.constexpr = tl.int64 if I64 else tl.int32
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(IDX)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G).to(IDX)
    # word wb * WT + wt of a group: the WT threads of a group take adjacent 16-byte pieces (coalesced),
    # and each thread's WB words are register repeats (the leading axis gets no threads)
    word = tl.arange(0, WB).to(IDX)[:, None] * WT + tl.arange(0, WT).to(IDX)[None, :]
    r5 = r[None, :, None, None, None]
    g5 = g[None, None, :, None, None]
    col = g5 * (GROUP * K // 8) + word[:, None, None, :, None] * K + tl.arange(0, K).to(IDX)[None, None, None, None, :]
    if PAIRS:
        ptrs = src_ptr + e * stride_e + r5 * stride_n + col
    else:
        ptrs = src_ptr + e * stride_e + r5 * stride_n + col * stride_k
    if EVEN:  # the grid tiles N and G exactly: no masks at all
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(r5 < N) & (g5 < G), other=0)
    if PAIRS:
        w = x.to(tl.uint32, bitcast=True)
        x = (w << 16).to(tl.float32, bitcast=True)
        xh = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        xh = None
        if SRC_BF16:  # int16 bits widened by a shift: exact (the interpreter's cast breaks subnormals)
            x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            x = _bf16(x.to(tl.float32))
    if ASYM:
        lo = x if xh is None else _min_nan(x, xh)
        hi = x if xh is None else _max_nan(x, xh)
        mn = _min_nan(_gmin(lo), 0.0)  # NaN-propagating clamps too: a NaN must reach the scale
        mx = _max_nan(_gmax(hi), 0.0)
        s = _bf16(_bf16(mx - mn) * _R15)
        bad = tl.where(s <= MAX_SCALE_ASYM, 0, 1)  # NaN, Inf (an element or the range) or too large
    else:
        a = tl.abs(x) if xh is None else _max_nan(tl.abs(x), tl.abs(xh))
        mn = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
        s = _bf16(_gmax(a) * _R75)
        bad = tl.where(s <= MAX_SCALE, 0, 1)
        s = tl.where(s == 0.0, 0.0078125, s)
    up = tl.where(s < _TINY, _UP, 1.0)  # asymmetric s = 0 included: then d = 0 and rcp = inf
    d = s * up
    if EXACT_RCP:
        rcp = tl.math.div_rn(tl.full((BLOCK_R, BLOCK_G), 1.0, tl.float32), d)
    else:
        rcp = 1.0 / d  # div.full.f32 on NVIDIA GPUs: 2 ulp, exact for 1 / 0
    if NUDGE != 0:  # test only: an approximate reciprocal NUDGE ulps off (1 / 0 = inf stays exact)
        rcp = tl.where(rcp < _INF, (rcp.to(tl.int32, bitcast=True) + NUDGE).to(tl.float32, bitcast=True), rcp)
    if ASYM:
        zp = _bf16(-8.0 - _bf16((mn * up) * rcp))  # 0 * inf = NaN for a zero group: kept by _bf16
        zp = _rne(tl.where(zp != zp, 0.0, tl.minimum(tl.maximum(zp, -8.0), 7.0)))
        zero = s == 0.0
        s = tl.where(zero, 0.0078125, s)
        up = tl.where(zero, 1.0, up)
        rcp = tl.where(zero, 128.0, rcp)
    else:
        zp = mn
    if UNIFORM:  # one reduction per program: 2 = flag, 1 = a scale below 2^-64 (the scaled path)
        kind = tl.max(tl.max(tl.maximum(bad * 2, tl.where(s < _TINY, 1, 0)), 1), 0)
        if kind >= 2:
            tl.store(flag_ptr, 1)
        if kind >= 1:
            words = _pack(x, xh, up, rcp, zp, ASYM, SPLIT, MAGIC, True)
        else:
            words = _pack(x, xh, up, rcp, zp, ASYM, SPLIT, MAGIC, False)
    else:
        words = _pack(x, xh, up, rcp, zp, ASYM, SPLIT, MAGIC, True)
        if FLAG_RED:
            if tl.max(tl.max(bad, 1), 0) > 0:
                tl.store(flag_ptr, 1)
        else:
            tl.store(flag_ptr + tl.zeros_like(bad), tl.full(bad.shape, 1, tl.int32), mask=bad > 0)
    r4 = r[None, :, None, None]
    g4 = g[None, None, :, None]
    woff = (e * N + r4) * NW + g4 * WORDS + word[:, None, None, :]
    gmask = (r[:, None] < N) & (g[None, :] < G)
    s_bits = (s.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)  # s is bf16-valued
    soff = (e * N + r[:, None]) * G + g[None, :]
    if EVEN:
        tl.store(packed_ptr + woff, words)
        tl.store(scale_ptr + soff, s_bits)
    else:
        tl.store(packed_ptr + woff, words, mask=(r4 < N) & (g4 < G))
        tl.store(scale_ptr + soff, s_bits, mask=gmask)
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
    WT: tl.constexpr,
    ASYM: tl.constexpr,
    SRC_BF16: tl.constexpr,
    PAIRS: tl.constexpr,
    I64: tl.constexpr,
    EVEN: tl.constexpr,
    UNIFORM: tl.constexpr,
    SPLIT: tl.constexpr,
    EXACT_RCP: tl.constexpr,
    MAGIC: tl.constexpr,
    FLAG_RED: tl.constexpr,
    NUDGE: tl.constexpr,
):
    """One tensor: program ``(pid_r, pid_g, e)`` converts that tile of expert ``e`` (:func:`_int4_tile`)."""
    IDX: tl.constexpr = tl.int64 if I64 else tl.int32
    _int4_tile(
        src_ptr, packed_ptr, scale_ptr, shape_ptr, zp_ptr, flag_ptr,
        tl.program_id(0).to(IDX), tl.program_id(1).to(IDX), tl.program_id(2).to(IDX),
        N, G, NW, stride_e, stride_n, stride_k, E_OUT, NDIM, GROUP, BLOCK_R, BLOCK_G, WT, ASYM, SRC_BF16, PAIRS,
        I64, EVEN, UNIFORM, SPLIT, EXACT_RCP, MAGIC, FLAG_RED, NUDGE,
    )  # fmt: skip


#: ``group_table.ALIGN_ELEMENTS``: what a group's ``aligned`` promises of its offsets and strides.
_ALIGN = tl.constexpr(group_table.ALIGN_ELEMENTS)


@triton.jit
def _entry(ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A table entry as ``DTYPE``; ``ALIGNED`` restores the divisibility hint Triton infers for one
    tensor's own pointer and stride arguments (16-byte vector loads and stores), lost when they come
    from a table. (The hint is set on an op made here: on a helper's argument it would not survive inlining.)"""
    x = tl.load(ptr).to(DTYPE)
    if ALIGNED:
        x = tl.multiple_of(x, _ALIGN)
    return x


@triton.jit
def _int4_group_kernel(
    src_base,
    packed_base,
    scale_base,
    shape_base,
    zp_base,
    table_ptr,
    flag_ptr,
    N,
    G,
    NW,
    E_OUT,
    ROW_BLOCKS,
    GROUP_BLOCKS,
    NDIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WT: tl.constexpr,
    ASYM: tl.constexpr,
    SRC_BF16: tl.constexpr,
    PAIRS: tl.constexpr,
    I64: tl.constexpr,
    EVEN: tl.constexpr,
    UNIFORM: tl.constexpr,
    SPLIT: tl.constexpr,
    EXACT_RCP: tl.constexpr,
    MAGIC: tl.constexpr,
    FLAG_RED: tl.constexpr,
    NUDGE: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Grouped launch: program ``(pid, t)`` converts tile ``pid`` of the group's tensor ``t`` (:func:`_int4_tile`).

    ``pid`` walks row blocks fastest, then group blocks, then experts (the single kernel's grid
    order, flattened: a CUDA grid's first axis holds 2^31 - 1 programs). Row ``t`` of the table
    (``conversion_core.formats.group_table``): the element offsets of the source, packed, scale,
    shape (and zero point, asymmetric) from the bases, then the source's ``(E, N, K)`` strides; the
    source is the view the single launch reads (int32 pairs, int16 bf16 bits, or fp16/fp32), so the
    offsets and strides are in its units.
    """
    IDX: tl.constexpr = tl.int64 if I64 else tl.int32
    NB: tl.constexpr = 5 if ASYM else 4  # tensors per table row, then three strides
    row = table_ptr + tl.program_id(1).to(tl.int64) * (NB + 3)
    src_off = _entry(row, tl.int64, ALIGNED)
    packed_off = _entry(row + 1, tl.int64, ALIGNED)
    scale_off = _entry(row + 2, tl.int64, ALIGNED)
    shape_off = tl.load(row + 3)
    if ASYM:
        zp_off = _entry(row + 4, tl.int64, ALIGNED)
    else:
        zp_off = packed_off  # never read: the symmetric tile writes no zero point
    stride_e = _entry(row + NB, IDX, ALIGNED)
    stride_n = _entry(row + NB + 1, IDX, ALIGNED)
    if CONTIGUOUS_K:  # the single launch's stride 1 is a compile-time constant: keep it one
        stride_k = 1
    else:
        stride_k = tl.load(row + NB + 2).to(IDX)
    pid = tl.program_id(0).to(IDX)
    pid_r = pid % ROW_BLOCKS
    rest = pid // ROW_BLOCKS
    pid_g = rest % GROUP_BLOCKS
    e = rest // GROUP_BLOCKS
    _int4_tile(
        src_base + src_off, packed_base + packed_off, scale_base + scale_off, shape_base + shape_off,
        zp_base + zp_off, flag_ptr, pid_r, pid_g, e, N, G, NW, stride_e, stride_n, stride_k, E_OUT, NDIM, GROUP,
        BLOCK_R, BLOCK_G, WT, ASYM, SRC_BF16, PAIRS, I64, EVEN, UNIFORM, SPLIT, EXACT_RCP, MAGIC, FLAG_RED, NUDGE,
    )  # fmt: skip


@triton.jit
def _int4_kernel_v1(
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


def tile(group: int, variant: Variant | V1 = DEFAULT) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_G)``: powers of two, ``BLOCK_R`` a multiple of 8, about ``variant.tile`` elements."""
    return variant.rows, max(1, variant.tile // (variant.rows * group))


def _fits_int32(src: torch.Tensor, *outs: torch.Tensor | None) -> bool:
    """Every element offset of the source view and of the outputs is below 2^31 (the i32 variant)."""
    reach = sum((d - 1) * abs(st) for d, st in zip(src.shape, src.stride(), strict=True)) if src.numel() else 0
    return reach < 2**31 and all(o is None or o.numel() < 2**31 for o in outs)


def _pairs_view(x: torch.Tensor) -> bool:
    """A bf16 view that reads as int32 pairs (K contiguous, even strides and offset: 4-byte aligned)."""
    return (
        x.dtype == torch.bfloat16
        and x.stride(2) == 1
        and x.stride(0) % 2 == 0
        and x.stride(1) % 2 == 0
        and x.data_ptr() % 4 == 0
    )


def launch(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp: torch.Tensor | None,
    flag: torch.Tensor,
    group: int,
    variant: Variant | V1 | None = None,
) -> None:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf (or a bf16 overflow). No host sync."""
    v = variant or (DEFAULT if zp is None else ASYM_DEFAULT)
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    groups = k // group
    br, bg = tile(group, v)
    bg = min(bg, triton.next_power_of_2(max(groups, 1)))
    grid = (triton.cdiv(n, br), triton.cdiv(groups, bg), e)
    args = (
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
    )
    common = dict(
        NDIM=src.dim(),
        GROUP=group,
        BLOCK_R=br,
        BLOCK_G=bg,
        ASYM=zp is not None,
        SRC_BF16=src.dtype == torch.bfloat16,
        I64=not (v.i32 and _fits_int32(x, packed, scale, zp)),
        EVEN=v.even and n % br == 0 and groups % bg == 0,
        num_warps=v.warps,
        enable_fp_fusion=False,
    )
    if isinstance(v, V1):
        _int4_kernel_v1[grid](
            *args,
            FAST_DIV=v.fast_div,
            NAN_RED=v.nan_red,
            INT_PACK=v.int_pack,
            EVICT=v.evict,
            SYNC_FREE=v.sync_free,
            LEAN_MASK=v.lean_mask,
            **common,
        )
    else:
        pairs = v.pairs and _pairs_view(x)
        if pairs:
            x = x.view(torch.int32)
            args = (x, *args[1:9], x.stride(0), x.stride(1), 1, e)
        _int4_kernel[grid](
            *args,
            WT=min(v.wt, group // 8),
            PAIRS=pairs,
            UNIFORM=v.uniform,
            SPLIT=v.split,
            EXACT_RCP=v.exact_rcp,
            MAGIC=v.magic,
            FLAG_RED=v.flag_red,
            NUDGE=v.nudge,
            **common,
        )


def _source_view(src: torch.Tensor, v: Variant) -> tuple[torch.Tensor, str]:
    """The view of ``src`` (its own dims) that :func:`launch` hands the default kernel, and its layout:
    ``"pairs"`` (bf16 as int32 pairs), ``"bf16"`` (int16 bits) or ``"float"`` (fp16 / fp32)."""
    if src.dtype != torch.bfloat16:
        return src, "float"
    if v.pairs and _pairs_view(src if src.dim() == 3 else src.unsqueeze(0)):
        return src.view(torch.int32), "pairs"
    return src.view(torch.int16), "bf16"


def launch_group(
    calls: Sequence[tuple[Any, ...]],
    flag: torch.Tensor,
    group: int,
    variant: Variant | None = None,
) -> list[tuple[str, int]]:
    """:func:`launch` for many ``(src, packed, scale, shape_out[, zp])`` at once: one launch per run of like sources.

    All calls are of one conversion (all with a zero point or none). Each source is read through
    the view its own :func:`launch` reads (:func:`_source_view`); the views are grouped by
    ``conversion_core.formats.group_table`` (shape, dtype, K contiguous), so every program of a
    launch sees one geometry and runs :func:`_int4_tile` with the constexprs the single launch
    would pass (``I64`` where any member needs it: it only widens offsets). So the bytes, and the
    flag, are those of one :func:`launch` per call. Sources without elements are skipped (the
    single launch has no programs for them either). Only :class:`Variant` (the default kernel)
    is grouped. Returns ``(layout, tensors)`` per kernel launch, in launch order.
    """
    if not calls:
        return []
    asym = len(calls[0]) == 5
    v = variant or (ASYM_DEFAULT if asym else DEFAULT)
    if not isinstance(v, Variant):
        raise ValueError(f"int4 triton: launch_group runs the default kernel's Variant only, not {v!r}")
    viewed: list[tuple[Any, ...]] = []
    wide: set[int] = set()  # id() of the viewed calls whose offsets need int64
    for src, packed, scale, shape_out, *zp in calls:
        if (len(zp) == 1) != asym:
            raise ValueError("int4 triton: launch_group calls mix symmetric and asymmetric buffers")
        if not src.numel():
            continue
        view, _ = _source_view(src, v)
        call = (view, packed, scale.view(torch.int16), shape_out, *zp)
        if not (v.i32 and _fits_int32(src if src.dim() == 3 else src.unsqueeze(0), packed, scale, *zp)):
            wide.add(id(call))
        viewed.append(call)
    launched: list[tuple[str, int]] = []
    for g in group_table.groups(viewed) if viewed else ():
        base = g.bases[0]
        layout = "pairs" if base.dtype == torch.int32 else "bf16" if base.dtype == torch.int16 else "float"
        e, n, kk = g.shape
        k = kk * 2 if layout == "pairs" else kk
        groups = k // group
        br, bg = tile(group, v)
        bg = min(bg, triton.next_power_of_2(max(groups, 1)))
        row_blocks, group_blocks = triton.cdiv(n, br), triton.cdiv(groups, bg)
        bases = g.bases if asym else (*g.bases, g.bases[1])  # a symmetric zp_base: never read
        _int4_group_kernel[(row_blocks * group_blocks * e, len(g.calls))](
            *bases, g.table, flag, n, groups, k // 8, e, row_blocks, group_blocks,
            NDIM=base.dim(), GROUP=group, BLOCK_R=br, BLOCK_G=bg, WT=min(v.wt, group // 8), ASYM=asym,
            SRC_BF16=layout != "float", PAIRS=layout == "pairs", I64=any(id(c) in wide for c in g.calls),
            EVEN=v.even and n % br == 0 and groups % bg == 0, UNIFORM=v.uniform, SPLIT=v.split,
            EXACT_RCP=v.exact_rcp, MAGIC=v.magic, FLAG_RED=v.flag_red, NUDGE=v.nudge,
            CONTIGUOUS_K=g.contiguous_k, ALIGNED=g.aligned, num_warps=v.warps, enable_fp_fusion=False,
        )  # fmt: skip
        launched.append((layout, len(g.calls)))
    return launched


def quantize(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp: torch.Tensor | None,
    group: int,
    name: str,
    variant: Variant | V1 | None = None,
) -> None:
    """Triton twin of ``torch_path.quantize``: one launch, one host sync (the flag)."""
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch(src, packed, scale, shape_out, zp, flag, group, variant)
    if int(flag.item()):
        raise torch_path.non_finite_error(
            name, src.shape, "holds NaN or Inf, values beyond bf16, or a group too large for it"
        )
