"""The NVFP4 Triton kernels: one pass over the source given the set's amax, bit-identical to :mod:`.numerics`.

The global scale ``gs`` is a handful of torch ops on the amax (device-side, no sync). Two kernels
compute the same bytes:

- ``words`` (the default where it applies: a bf16 source with K contiguous and 4-byte aligned
  rows, see :func:`conversion_core.formats.fp4_triton.bf16_words`): the source is read as int32
  words, two elements each, in a ``(BLOCK_R, GROUPS, 8)`` tile (a 16-group is 8 words) built
  from pointer arithmetic, so loads are 16-byte vectors and no tile is ever reshaped; the group
  amax is an integer max over the magnitude bits (exact, and NaN/Inf show as bits >= Inf's), the
  per-group step broadcasts with ``[:, :, None]``, and the byte of word ``i`` (its two codes) is
  stored at the same ``(r, g, i)``: contiguous bytes. A 1-D grid walks column blocks fastest;
  int32 offsets unless some offset reaches 2**31. ``variant="words_magic"`` takes the e2m1 code
  from :func:`conversion_core.formats.fp4_triton._e2m1_magic` (three adds instead of seven
  comparisons), the same codes. ``variant="words_fastdiv"`` (words_magic, and the per-element
  ``x / step`` as Markstein's correction ``q0 = x * r``, ``q0 + fma(-q0, step, x) * r`` with the
  group's ``r = RN(1 / step)``: three instructions instead of div.rn's ten, see
  :func:`conversion_core.formats.fp8_triton._div_exact`) takes it only when every nonzero |x|
  of the program's tile is >= 2**-64 and every step in [2**-60, 2**60], else div_rn. NOT proven
  exact: Markstein's theorem needs ``q0`` within 1 ulp of x/step, and ``RN(x * RN(1/step))`` can
  be up to ~1.5 ulp off; checked equal to IEEE division on all finite bf16 x (both signs) times
  3000 steps s3/gs (196M quotients, 0 differences) and under the interpreter (true FMA). Not the default.
- ``words_recip`` (the words layout, no division per element; tile 16 x 32 groups): per group
  ``r = RN(gs / s3)``, per element ``z = min(RN(|x| * r), 6)``, then the integer index of
  ``RN(z * 2**-126)``'s bits ``b``: ``(b + 2**21) >> 22`` (see :func:`_recip_index`: on that
  scale float32's bits are e2m1's, subnormals included); the sign from the word's bits. A
  program whose every ``b`` is more than TOL = 4 units (bits) from an edge (a grid midpoint,
  low 22 bits = 2**21) and whose every group has ``2**-16 <= r <= 2**60`` keeps these bytes;
  any other program recomputes its tile by words_magic's division (a uniform branch: the
  condition is a tile-wide min). Why that is the division's code, on any IEEE float32 unit:
  with ``step = RN(s3 / gs)`` (normal: ``r <= 2**60``) and ``q = |x| / step``, ``RN(|x| * r)``
  is ``q (1 + e)`` with ``|e| <= 3u + O(u**2)`` (u = 2**-24: the roundings of step, of r and of the
  product; if that product is subnormal it is below 2**-126 and both sides give index 0), and
  the torch path's ``RN(q)`` is ``q (1 + e')``, ``|e'| <= u``. The bit position ``P(z)`` of
  ``z * 2**-126`` moves by at most ``2**24 * dz / z`` per relative change at or above 1 and by
  ``2**23 * dz`` below 1 (plus 0.5 for the rounding to a subnormal there), so the two sides'
  positions differ by at most 4 (integers above 1, under 1 below): more than 4 units from every
  edge, both lie strictly between the same two edges, so both have the same index, ties
  included (an exact tie is 0 units from its edge, so it always divides). ``z`` is clamped at 6
  (a grid point) on both sides. The sign: ``r >= 2**-16`` bounds step by about 2**16, so every
  nonzero bf16 quotient is at least 2**-149 and rounds to nonzero: the torch path's ``v < 0``
  is ``x < 0 and x != -0``, read from the bits. Only IEEE-exact float ops are used (products
  and a min; subnormal products rounded, not flushed: FMUL without .FTZ in the sm_90 SASS) and
  the numpy interpreter computes the same. Checked on every finite bf16 magnitude times 7,500
  (s3, gs) pairs (every e4m3 s3 times 60 random bf16 gs, 225M quotients): 0 differences among
  unflagged ones (TOL = 0 would give 120). Static SASS (triton 3.9, sm_90): 17.7 instructions
  per element on the product path against 39 for words_magic (which spends ~12 per element on
  div.rn).
- ``generic`` (every other dtype and stride: fp32, fp16, transposed views): one program owns
  ``BLOCK_R`` rows by ``BLOCK_C`` columns of the ``(rows, K)`` view, loads the even and the odd
  elements (any strides, int64 offsets, masked edges).

Bit-identity with the torch path rests on: bf16 rounding done on the float32 bits (round to
nearest even, as torch's cast), IEEE division (``tl.math.div_rn``) everywhere torch divides
(``s / gs`` per group, then ``x / step`` per element in the division variants: no reciprocal, no product that an FMA
could contract: the only product, ``gs * s1``, feeds a min), the e4m3 cast of
:func:`conversion_core.formats.fp8_triton._to_e4m3` (software rounding under the interpreter),
and e2m1 rounding by the same midpoints. NaN/Inf are detected explicitly into an int32 device
flag (words_recip's products have their own argument, above).

:func:`tensor_amax` is the read-only amax pass (a persistent integer max, one atomic per
program, ``unroll`` blocks loaded per step) for the same bf16 sources; other sources take
torch's. :func:`launch` computes gs with a dozen tiny torch ops (microseconds each, most of a
small tensor's conversion); :func:`launch_fused` lets the words kernel derive gs from the amax
itself (:func:`_global_scale`, the same float32/bf16 steps) and write the global-scale output,
so a conversion is the amax pass plus one kernel. The conversion stays two passes over the
source: every byte depends on the tensor-wide (or fused set's) amax through gs, so no block can
be written before the whole source (all of q/k/v for a shared set) has been read once; a
single pass would need the source to stay on chip (tens of MB against hundreds). In bytes in +
out the ceiling is ``(in + out) / (2 in + out)`` = 0.56 of a copy.

:func:`launch_group` (``Conversion.launch_group``) is that conversion for a whole run of tensors,
each with its own amax: per group of same-shaped sources (``conversion_core.formats.group_table``)
one grouped amax pass (:func:`_amax_group_kernel`) and one grouped words or generic kernel, whose
programs read their tensor's offsets and strides from a device table and run the same tile bodies
(:func:`_words_tile`, :func:`_generic_tile`) as the one-tensor kernels, gs derived in the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from conversion_core.formats import group_table
from conversion_core.formats.fp4_triton import (
    INT32_LIMIT,
    NON_FINITE_BITS,
    _abs_bits_max,
    _bf16_hi,
    _bf16_lo,
    _e2m1_cmp,
    _e2m1_code,
    _flag_non_finite,
    _pack_nibbles,
    bf16_words,
    needs_int64,
)
from conversion_core.formats.fp8_triton import FLT_MAX, _div_exact, _to_e4m3

from . import numerics

#: The variants :func:`launch_values` accepts; "auto" is :data:`VARIANT` where the words layout applies, else generic.
VARIANTS = ("generic", "words", "words_magic", "words_fastdiv", "words_recip")
#: H200 2026-12-04 (benchmarks/results/h200_2026-12-04b/nvfp4.txt): words_magic 0.47-0.48 of copy on the big
#: shapes, 0.37 on (4096, 2048); words_recip reached 0.50 only at 8x256 w2 and fell to 0.16 on the small shape.
VARIANT = "words_magic"
#: generic kernel tile (rows, columns) and warps.
BLOCK_R = 8
BLOCK_C = 128
NUM_WARPS = 4
#: words kernel tile: rows x 16-groups per program (16 x 16 groups = 16 rows x 256 bf16 = 8 KiB in), and warps.
WORDS_BLOCK_R = 16
WORDS_GROUPS = 16
WORDS_NUM_WARPS = 4
#: words_recip's default tile: 16 rows x 32 groups (16 KiB in) over 4 warps, 4 groups per thread (the
#: per-program index math spread over 64 elements; 8 groups per thread spill registers on sm_90).
RECIP_BLOCK_R = 16
RECIP_GROUPS = 32
RECIP_NUM_WARPS = 4
#: amax pass: words per program per step, programs per multiprocessor (persistent grid), warps.
AMAX_BLOCK = 4096
AMAX_PROGRAMS_PER_SM = 8  # H200 2026-12-04: 0.89-0.92 of copy, 4 per SM 0.84-0.87
AMAX_NUM_WARPS = 8
#: amax pass: blocks loaded per step before they are folded in.
AMAX_UNROLL = 1
#: words_fastdiv takes Markstein's division only where every |x| is 0 or >= 2**-64 and step is in [2**-60, 2**60].
_FAST_MIN_BITS = tl.constexpr(0x1F800000)
_FAST_MIN_STEP = tl.constexpr(2.0**-60)
_FAST_MAX_STEP = tl.constexpr(2.0**60)
#: the smallest normal bf16 (``torch.finfo(torch.bfloat16).tiny``, 2**-126) as a float32 constant.
BF16_TINY_F32 = tl.constexpr(2.0**-126)


@triton.jit
def _round_bf16(f):
    """float32 -> the nearest bf16 value (ties to even), as float32; ``f`` finite and >= 0."""
    bits = f.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _group_scale(amax, gs, SOFT_ROUND: tl.constexpr):
    """e4m3 group scale (as float32) from the float32 group amax: step 2 of :mod:`.numerics`."""
    s1 = _round_bf16(tl.math.div_rn(_round_bf16(amax), 6.0))
    s2 = tl.minimum(gs * s1, 448.0)
    s3 = _to_e4m3(s2, SOFT_ROUND).to(tl.float32)
    return tl.where(s3 == 0.0, 0.125, s3)


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
    """generic: program ``(row block, column block)`` of one tensor given its gs (``gs_ptr``)."""
    _generic_tile(
        src_ptr, packed_ptr, scale_ptr, gs_ptr, flag_ptr, flag_ptr, tl.program_id(0), tl.program_id(1),
        ROWS, N, K, stride_e, stride_n, stride_k, BLOCK_R, BLOCK_C, SOFT_ROUND, 0,
    )  # fmt: skip


@triton.jit
def _generic_tile(
    src_ptr,
    packed_ptr,
    scale_ptr,
    gs_ptr,
    flag_ptr,
    global_ptr,
    pid_r,
    pid_c,
    ROWS,
    N,
    K,
    stride_e,
    stride_n,
    stride_k,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    FUSED_GS: tl.constexpr,
):
    """The generic kernel's tile ``(pid_r, pid_c)``: ``BLOCK_R`` rows by ``BLOCK_C`` columns of the
    ``(rows, K)`` view, any strides. FUSED_GS as in :func:`_words_tile`: ``gs_ptr`` then holds the
    float32 amax and tile ``(0, 0)`` writes ``global_ptr[0]`` (the grouped launch; one tensor's
    launch passes gs, computed by torch ops, and never reads ``global_ptr``)."""
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
    if FUSED_GS:
        gs = _global_scale(gs_ptr, flag_ptr, global_ptr, pid_r + pid_c, FUSED_GS == 2)
    else:
        gs = tl.load(gs_ptr)
    s3 = _group_scale(amax, gs, SOFT_ROUND)
    groups = pid_c.to(tl.int64) * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    gmask = (rows[:, None] < ROWS) & (groups[None, :] * 16 < K)
    tl.store(scale_ptr + rows[:, None] * (K // 16) + groups[None, :], s3.to(tl.float8e4nv), mask=gmask)
    step = tl.math.div_rn(s3, gs)
    step = tl.reshape(tl.broadcast_to(tl.reshape(step, (BLOCK_R, GROUPS, 1)), (BLOCK_R, GROUPS, 8)), (BLOCK_R, HALF))
    v_lo = tl.minimum(tl.maximum(tl.math.div_rn(lo, step), -6.0), 6.0)
    v_hi = tl.minimum(tl.maximum(tl.math.div_rn(hi, step), -6.0), 6.0)
    byte = (_e2m1_cmp(v_lo) | (_e2m1_cmp(v_hi) << 4)).to(tl.uint8)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + pairs[None, :], byte, mask=mask)


#: words_recip: float32 ``2**-126`` (the smallest normal): ``z * 2**-126`` lays e2m1's grid on float32's bits.
_TWO_M126 = tl.constexpr(2.0**-126)
#: The 22 low bits of a scaled value under its nibble index; an edge (grid midpoint) is at 2**21 of them.
_LOW22 = tl.constexpr(0x3FFFFF)
_HALF22 = tl.constexpr(0x200000)
#: A scaled value whose bits lie within this many units of an edge sends its program to the division path.
RECIP_TOL = 4
_RECIP_TOL = tl.constexpr(RECIP_TOL)
#: words_recip needs ``2**-16 <= r <= 2**60`` for every group's ``r = RN(gs / s3)`` (else the program divides).
_RECIP_MIN = tl.constexpr(2.0**-16)
_RECIP_MAX = tl.constexpr(2.0**60)


@triton.jit
def _recip_index(a, r):
    """``(index, distance)``: e2m1 magnitude index of ``min(RN(a * r), 6)`` for ``a = |x|``, and its distance code.

    On ``z * 2**-126`` for ``0 <= z <= 6`` the float32 bits ``b`` are e2m1 laid out in binary:
    below 1 (float32 subnormals) ``b = z * 2**23``, so 0, .5, 1 sit at multiples of 2**22; from 1
    up each binade keeps one mantissa bit at bit 22. So the index is ``(b + 2**21) >> 22`` (6
    gives 7; an exact edge would round up, but edges are never taken, see below), and the grid's
    midpoints (the rounding edges 0.25 ... 5) are exactly the ``b`` whose low 22 bits are 2**21.
    ``distance`` is ``(b + 2**21 + TOL) & (2**22 - 1)``: at most ``2 * TOL`` exactly when ``b``
    is within TOL units of an edge. Two products, one min, then integer ops only. The second
    product makes subnormals: Triton's fmul is ``mul.rn.f32`` (no .ftz: the sm_90 SASS has FMUL
    without .FTZ), so the GPU rounds them as IEEE does, and so does numpy under the interpreter.
    """
    z = tl.minimum(a * r, 6.0)
    u = (z * _TWO_M126).to(tl.int32, bitcast=True) + _HALF22
    return u >> 22, (u + _RECIP_TOL) & _LOW22


@triton.jit
def _recip_bytes(w, s3, gs, gmask):
    """words_recip's bytes of a ``(BLOCK_R, GROUPS, 8)`` word tile, and whether they are exact (else divide).

    Per group ``r = RN(gs / s3)``; per element the index of ``RN(|x| * r)`` by :func:`_recip_index`
    and the sign from the word's bits (set for ``x < 0`` with ``x != -0``: with step <= 2**16
    no nonzero bf16 quotient rounds to 0). Exact when no element's scaled bits are within TOL = 4
    units of an edge and every group has ``2**-16 <= r <= 2**60``: see the module docstring.
    The sign is integer work on the word: ``m + 0x7FFF7FFF`` (m the two magnitudes) has bit 15
    (31) set where the low (high) magnitude is nonzero, no carry crossing halves; ANDed with the
    word's sign bits and shifted, the byte's truncation keeps just bits 3 and 7.
    """
    r = tl.math.div_rn(gs, s3)
    good = ((r >= _RECIP_MIN) & (r <= _RECIP_MAX)) | (gmask == 0)
    m = w & 0x7FFF7FFF
    i_lo, d_lo = _recip_index((m << 16).to(tl.float32, bitcast=True), r[:, :, None])
    i_hi, d_hi = _recip_index((m & -65536).to(tl.float32, bitcast=True), r[:, :, None])
    near = tl.min(tl.min(tl.min(tl.minimum(d_lo, d_hi), 2), 1), 0)
    exact = (near > 2 * _RECIP_TOL) & (tl.min(tl.min(good.to(tl.int32), 1), 0) > 0)
    sign = ((m + 0x7FFF7FFF) & w & -2147450880).to(tl.uint32, bitcast=True)  # -2147450880: 0x80008000
    byte = (i_lo | (i_hi << 4)).to(tl.uint32, bitcast=True) | (sign >> 12) | (sign >> 24)
    return byte.to(tl.uint8), exact


@triton.jit
def _div_bytes(w, lo, hi, s3, gs, MAGIC: tl.constexpr, FAST_DIV: tl.constexpr):
    """The packed bytes by ``x / step`` (IEEE division, or words_fastdiv's correction where it applies)."""
    step = tl.math.div_rn(s3, gs)
    if FAST_DIV:
        # Markstein's correction with the group's RN(1/step), where every operand is far from
        # under/overflow: nonzero |x| >= 2**-64 (as magnitude bits minus 1, unsigned, zeros wrap to
        # the top) and step in [2**-60, 2**60]. Otherwise the whole program takes div_rn.
        small = tl.min(tl.minimum(((w << 16) & 0x7FFFFFFF) - 1, (w & 0x7FFF0000) - 1).to(tl.uint32), 2)
        ok = (small >= _FAST_MIN_BITS - 1) & (step >= _FAST_MIN_STEP) & (step <= _FAST_MAX_STEP)
        if tl.min(tl.min(ok.to(tl.int32), 1), 0) > 0:
            recip = tl.math.div_rn(1.0, step)[:, :, None]
            v_lo = _div_exact(lo, step[:, :, None], recip, True)
            v_hi = _div_exact(hi, step[:, :, None], recip, True)
        else:
            v_lo = tl.math.div_rn(lo, step[:, :, None])
            v_hi = tl.math.div_rn(hi, step[:, :, None])
    else:
        v_lo = tl.math.div_rn(lo, step[:, :, None])
        v_hi = tl.math.div_rn(hi, step[:, :, None])
    # The clamp to ±6 is the code's own min(|v|, 6) (same codes, two instructions fewer per element).
    byte = _pack_nibbles(_e2m1_code(v_lo, 6.0, MAGIC), _e2m1_code(v_hi, 6.0, MAGIC))
    return byte


@triton.jit
def _global_scale(amax_ptr, flag_ptr, global_ptr, pid, MULTIPLIER: tl.constexpr):
    """gs from the float32 amax, as :func:`.numerics.global_scale` computes it with torch's bf16 ops.

    ``a = max(bf16(A), bf16 tiny)``; ``bf16(bf16(1 / a) * 2688)`` (torch's bf16 reciprocal and
    product round their float32 results to bf16; the product of a bf16 and 2688 is exact in
    float32), Inf -> 1.0. A NaN/Inf amax raises the flag and counts as 0 (``launch``'s
    ``nan_to_num``). Integer bf16 rounding and IEEE division (no .ftz): the same float32 steps.
    Program 0 stores gs (or ``RN(1 / gs)``, the multiplier) in ``global_ptr[0]``.
    """
    amax = tl.load(amax_ptr)
    bad = amax.to(tl.int32, bitcast=True) & 0x7FFFFFFF >= NON_FINITE_BITS
    if bad:
        tl.store(flag_ptr, 1)
    amax = tl.where(bad, 0.0, amax)
    a = tl.maximum(_round_bf16(amax), BF16_TINY_F32)
    g = _round_bf16(_round_bf16(tl.math.div_rn(1.0, a)) * 2688.0)
    g = tl.where(g == float("inf"), 1.0, g)
    if pid == 0:
        if MULTIPLIER:
            tl.store(global_ptr, tl.math.div_rn(1.0, g))
        else:
            tl.store(global_ptr, g)
    return g


@triton.jit
def _nvfp4_words_kernel(
    w_ptr,
    packed_ptr,
    scale_ptr,
    gs_ptr,
    flag_ptr,
    count_ptr,
    global_ptr,
    ROWS,
    N,
    GK,
    stride_e,
    stride_n,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
    MAGIC: tl.constexpr,
    FAST_DIV: tl.constexpr,
    RECIP: tl.constexpr,
    COUNT: tl.constexpr,
    FUSED_GS: tl.constexpr,
    INT64: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    """``w_ptr``: the bf16 source as int32 words (strides in words); GK = K // 16 groups per row.

    RECIP: 1 words_recip, 2 its products without the division fallback (not exact: only for
    counting its instructions). COUNT: add 1 to ``count_ptr[0]`` per program that words_recip
    finished without dividing (tests and benchmarks see how often the fallback runs). FUSED_GS:
    ``gs_ptr`` holds the set's float32 amax, not gs: every program derives gs itself
    (:func:`_global_scale`), a NaN/Inf amax raises the flag, and program 0 writes
    ``global_ptr[0]`` (gs, or ``1 / gs`` for FUSED_GS == 2: ModelOpt's multiplier).
    """
    _words_tile(
        w_ptr, packed_ptr, scale_ptr, gs_ptr, flag_ptr, count_ptr, global_ptr, tl.program_id(0), ROWS, N, GK,
        stride_e, stride_n, BLOCK_R, GROUPS, MAGIC, FAST_DIV, RECIP, COUNT, FUSED_GS, INT64, SOFT_ROUND,
    )  # fmt: skip


@triton.jit
def _words_tile(
    w_ptr,
    packed_ptr,
    scale_ptr,
    gs_ptr,
    flag_ptr,
    count_ptr,
    global_ptr,
    pid,
    ROWS,
    N,
    GK,
    stride_e,
    stride_n,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
    MAGIC: tl.constexpr,
    FAST_DIV: tl.constexpr,
    RECIP: tl.constexpr,
    COUNT: tl.constexpr,
    FUSED_GS: tl.constexpr,
    INT64: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    """The words kernel's program ``pid`` of one tensor (shared by its one-tensor and grouped launches)."""
    col_blocks = tl.cdiv(GK, GROUPS)
    pid_r = pid // col_blocks
    pid_c = pid - pid_r * col_blocks
    if INT64:
        rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    else:
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = pid_c * GROUPS + tl.arange(0, GROUPS)
    e = rows // N
    base = e * stride_e + (rows - e * N) * stride_n
    col = groups[:, None] * 8 + tl.arange(0, 8)[None, :]  # word index in the row, (GROUPS, 8)
    gmask = (rows[:, None] < ROWS) & (groups[None, :] < GK)  # (BLOCK_R, GROUPS)
    mask = gmask[:, :, None]
    w = tl.load(w_ptr + base[:, None, None] + col[None, :, :], mask=mask, other=0, eviction_policy="evict_first")
    amax_bits = tl.max(_abs_bits_max(w), 2)  # (BLOCK_R, GROUPS)
    _flag_non_finite(flag_ptr, amax_bits)
    if FUSED_GS:
        gs = _global_scale(gs_ptr, flag_ptr, global_ptr, pid, FUSED_GS == 2)
    else:
        gs = tl.load(gs_ptr)
    s3 = _group_scale(amax_bits.to(tl.float32, bitcast=True), gs, SOFT_ROUND)
    tl.store(scale_ptr + rows[:, None] * GK + groups[None, :], s3.to(tl.float8e4nv), mask=gmask)
    lo = _bf16_lo(w)
    hi = _bf16_hi(w)
    if RECIP:
        byte, exact = _recip_bytes(w, s3, gs, gmask)
        if COUNT:
            tl.atomic_add(count_ptr, exact.to(tl.int32))
        if RECIP == 1:  # 2: no fallback, only for counting the fast path's instructions (not exact)
            if not exact:
                byte = _div_bytes(w, lo, hi, s3, gs, MAGIC, FAST_DIV)
    else:
        byte = _div_bytes(w, lo, hi, s3, gs, MAGIC, FAST_DIV)
    out = rows[:, None, None] * (GK * 8) + col[None, :, :]
    tl.store(packed_ptr + out, byte, mask=mask, eviction_policy="evict_first")


@triton.jit
def _amax_words_kernel(w_ptr, out_ptr, NWORDS, BLOCK: tl.constexpr, UNROLL: tl.constexpr, INT64: tl.constexpr):
    """Persistent max over the magnitude bits of a contiguous bf16 tensor's words; one atomic max per program.

    Each step loads UNROLL blocks of BLOCK words before folding them in (UNROLL x more bytes in
    flight per warp without more registers per load).
    """
    pid = tl.program_id(0)
    step = tl.num_programs(0) * (BLOCK * UNROLL)
    if INT64:
        start = pid.to(tl.int64) * (BLOCK * UNROLL)
    else:
        start = pid * (BLOCK * UNROLL)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, NWORDS, step):
        for u in tl.static_range(UNROLL):
            offs = tl.multiple_of(off, BLOCK) + u * BLOCK + tl.arange(0, BLOCK)
            w = tl.load(w_ptr + offs, mask=offs < NWORDS, other=0, eviction_policy="evict_first")
            acc = tl.maximum(acc, _abs_bits_max(w))
    tl.atomic_max(out_ptr, tl.max(acc, 0))


#: Columns of a grouped launch's table row: offsets of (src, packed, scales, global_out), then strides (E, N, K).
_TABLE_WIDTH = tl.constexpr(7)


@triton.jit
def _table_row(table_ptr, t, WORDS: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s row of a grouped launch's table (``conversion_core.formats.group_table``).

    Element offsets of its source, packed, scale and global-scale buffers from the group's bases,
    then its source strides. WORDS: the source offset and strides in int32 words (halved: the
    host checked they are even). ALIGNED: every offset and the E/N strides are multiples of 16
    elements, said to the compiler (vectorised loads and stores).
    """
    row = table_ptr + t.to(tl.int64) * _TABLE_WIDTH
    src_off = tl.load(row)
    packed_off = tl.load(row + 1)
    scale_off = tl.load(row + 2)
    global_off = tl.load(row + 3)
    stride_e = tl.load(row + 4)
    stride_n = tl.load(row + 5)
    stride_k = tl.load(row + 6)
    if WORDS:
        src_off = src_off // 2
        stride_e = stride_e // 2
        stride_n = stride_n // 2
    if ALIGNED:
        if WORDS:
            src_off = tl.multiple_of(src_off, 8)
            stride_e = tl.multiple_of(stride_e, 8)
            stride_n = tl.multiple_of(stride_n, 8)
        else:
            src_off = tl.multiple_of(src_off, 16)
            stride_e = tl.multiple_of(stride_e, 16)
            stride_n = tl.multiple_of(stride_n, 16)
        packed_off = tl.multiple_of(packed_off, 16)
        scale_off = tl.multiple_of(scale_off, 16)
    return src_off, packed_off, scale_off, global_off, stride_e, stride_n, stride_k


@triton.jit
def _amax_group_kernel(
    src_base,
    table_ptr,
    amax_ptr,
    ROWS,
    N,
    K,
    COL_BLOCKS,
    TILES,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WORDS: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Grouped amax pass: programs ``(p, t)`` take the max |x| of the group's tensor ``t``.

    The ``(E * N, K)`` view (K in words with WORDS) is cut into ``BLOCK_R x BLOCK_K`` tiles,
    program ``p`` folding tiles ``p, p + P, ...`` into an integer max of the magnitudes' float32
    bits (exact, NaN above Inf: see ``_abs_bits_max``; fp16 and fp32 widen or stay exactly), then
    one ``atomic_max`` into the zeroed int32 ``amax_ptr[t]``: the bits of :func:`tensor_amax`.
    Any strides (the table's): per-expert views of a stack, sliced and transposed sources.
    """
    t = tl.program_id(1)
    src_off, _, _, _, stride_e, stride_n, stride_k = _table_row(table_ptr, t, WORDS, ALIGNED)
    if CONTIGUOUS_K:
        stride_k = 1
    src = src_base + src_off
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    for tile in range(tl.program_id(0), TILES, tl.num_programs(0)):
        rb = tile // COL_BLOCKS
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile - rb * COL_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K)
        e = rows // N
        offs = (e * stride_e + (rows - e * N) * stride_n)[:, None] + cols[None, :] * stride_k
        mask = (rows[:, None] < ROWS) & (cols[None, :] < K)
        x = tl.load(src + offs, mask=mask, other=0, eviction_policy="evict_first")
        if WORDS:
            bits = _abs_bits_max(x)
        else:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
        acc = tl.maximum(acc, bits)
    tl.atomic_max(amax_ptr + t, tl.max(tl.max(acc, 1), 0))


@triton.jit
def _nvfp4_group_kernel(
    src_base,
    packed_base,
    scale_base,
    global_base,
    amax_ptr,
    table_ptr,
    flag_ptr,
    ROWS,
    N,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    FUSED_GS: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Grouped generic: program ``(row block, column block, t)`` is :func:`_generic_tile` of tensor ``t``,
    gs derived from its amax ``amax_ptr[t]`` (the grouped amax pass) and written by tile (0, 0)."""
    t = tl.program_id(2)
    src_off, packed_off, scale_off, global_off, stride_e, stride_n, stride_k = _table_row(table_ptr, t, False, ALIGNED)
    if CONTIGUOUS_K:  # the table's stride: say what the compiler cannot know
        stride_k = 1
    _generic_tile(
        src_base + src_off, packed_base + packed_off, scale_base + scale_off, amax_ptr + t, flag_ptr,
        global_base + global_off, tl.program_id(0), tl.program_id(1), ROWS, N, K, stride_e, stride_n, stride_k,
        BLOCK_R, BLOCK_C, SOFT_ROUND, FUSED_GS,
    )  # fmt: skip


@triton.jit
def _nvfp4_words_group_kernel(
    w_base,
    packed_base,
    scale_base,
    global_base,
    amax_ptr,
    table_ptr,
    flag_ptr,
    ROWS,
    N,
    GK,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
    MAGIC: tl.constexpr,
    FAST_DIV: tl.constexpr,
    RECIP: tl.constexpr,
    FUSED_GS: tl.constexpr,
    INT64: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Grouped words: program ``(pid, t)`` is :func:`_words_tile` ``pid`` of tensor ``t``, gs from ``amax_ptr[t]``.

    The source offsets and strides come from the table in int64, so only the packed and scale
    offsets inside one tensor take INT64's choice.
    """
    t = tl.program_id(1)
    src_off, packed_off, scale_off, global_off, stride_e, stride_n, _ = _table_row(table_ptr, t, True, ALIGNED)
    _words_tile(
        w_base + src_off, packed_base + packed_off, scale_base + scale_off, amax_ptr + t, flag_ptr, flag_ptr,
        global_base + global_off, tl.program_id(0), ROWS, N, GK, stride_e, stride_n,
        BLOCK_R, GROUPS, MAGIC, FAST_DIV, RECIP, False, FUSED_GS, INT64, SOFT_ROUND,
    )  # fmt: skip


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * AMAX_PROGRAMS_PER_SM
    return 4


def tensor_amax(
    src: torch.Tensor,
    *,
    block: int | None = None,
    programs: int | None = None,
    num_warps: int | None = None,
    unroll: int | None = None,
) -> torch.Tensor:
    """float32 ``(1,)`` max |x| of ``src``, equal to :func:`.numerics.tensor_amax` (NaN for a NaN, Inf for an Inf).

    A contiguous bf16 source takes one Triton pass: a persistent grid (``programs``, default
    :data:`AMAX_PROGRAMS_PER_SM` per multiprocessor) of integer maxes over the words' magnitude
    bits (bf16 widens to float32 exactly, so the float32 bits of the max are these bits shifted)
    and one ``atomic_max`` per program into a zeroed int32. Any other source (also one starting at
    an odd element of its storage, which has no int32 view) takes torch's.
    """
    if src.dtype != torch.bfloat16 or not src.is_contiguous() or src.numel() % 2 or src.numel() == 0:
        return numerics.tensor_amax(src)
    if src.storage_offset() % 2:  # one element into its storage: no int32 view (torch refuses it)
        return numerics.tensor_amax(src)
    words = src.view(-1).view(torch.int32)
    out = torch.zeros(1, dtype=torch.int32, device=src.device)
    blk = block or AMAX_BLOCK
    unr = unroll or AMAX_UNROLL
    grid = (max(1, min(programs or _programs(src.device), triton.cdiv(words.numel(), blk * unr))),)
    _amax_words_kernel[grid](
        words,
        out,
        words.numel(),
        BLOCK=blk,
        UNROLL=unr,
        INT64=words.numel() + grid[0] * blk * unr >= 1 << 31,
        num_warps=num_warps or AMAX_NUM_WARPS,
    )
    return out.view(torch.float32)


def launch_values(
    src: torch.Tensor,
    gs: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    flag: torch.Tensor,
    *,
    variant: str = "auto",
    block_r: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    fast_count: torch.Tensor | None = None,
    global_out: torch.Tensor | None = None,
    multiplier: bool = False,
) -> str:
    """Enqueue the kernel for ``src`` (2-D or 3-D) given the float32 ``(1,)`` global scale on its device.

    ``variant``: "auto" (:data:`VARIANT` where the words layout applies, else "generic"), or one of
    :data:`VARIANTS` ("words*" on a source without the words layout raises ValueError). ``block_r``
    / ``block_c`` (columns, a multiple of 16; for words ``block_c // 16`` groups) and ``num_warps``
    override the tile (benchmarks sweep them). ``fast_count`` (int32 ``(1,)``, words_recip only)
    gets 1 added per program that took the product path (the rest divided). ``global_out`` (words
    variants only): ``gs`` is then the float32 amax instead, the kernel derives gs and writes gs
    (or ``1 / gs`` with ``multiplier``) there, see :func:`launch_fused`. Returns the variant run.
    """
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    if x.numel() == 0:
        return "none"
    rows = e * n
    soft = src.device.type != "cuda"
    words = bf16_words(x) if variant != "generic" else None
    if variant == "auto":
        variant = VARIANT if words is not None else "generic"
    if variant not in VARIANTS:
        raise ValueError(f"nvfp4 triton: unknown variant {variant!r} (one of {VARIANTS})")
    if variant == "generic":
        if global_out is not None:
            raise ValueError("nvfp4 triton: global_out (gs derived in the kernel) needs a words variant")
        br, bc = block_r or BLOCK_R, block_c or BLOCK_C
        grid = (triton.cdiv(rows, br), triton.cdiv(k, bc))
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
            BLOCK_R=br,
            BLOCK_C=bc,
            SOFT_ROUND=soft,
            num_warps=num_warps or NUM_WARPS,
        )
        return variant
    if words is None:
        raise ValueError(
            f"nvfp4 triton: variant {variant!r} needs a bf16 source with K contiguous and 4-byte aligned rows; "
            f"got {src.dtype} of shape {tuple(src.shape)}, strides {tuple(src.stride())}"
        )
    gk = k // 16
    meta = _words_meta(variant, gk, block_r, block_c, num_warps)
    # Rows that merge (a contiguous stack) need no expert split: one "expert" of all rows.
    n_arg, se = (rows, 0) if e == 1 or words.stride(0) == n * words.stride(1) else (n, words.stride(0))
    _nvfp4_words_kernel[(_words_programs(rows, gk, meta),)](
        words,
        packed,
        scales,
        gs,
        flag,
        flag if fast_count is None else fast_count,
        flag if global_out is None else global_out,
        rows,
        n_arg,
        gk,
        se,
        words.stride(1),
        COUNT=fast_count is not None and variant == "words_recip",
        FUSED_GS=0 if global_out is None else 1 + bool(multiplier),
        INT64=needs_int64(words, packed.numel()),
        SOFT_ROUND=soft,
        **meta,
    )
    return variant


def _words_meta(
    variant: str, gk: int, block_r: int | None = None, block_c: int | None = None, num_warps: int | None = None
) -> dict[str, Any]:
    """The words kernel's tile and variant constexprs (and warps) for rows of ``gk`` 16-groups.

    One place for both the one-tensor and the grouped launch, so a group compiles the same
    specialisation as each of its tensors alone.
    """
    recip = variant == "words_recip"
    groups = (block_c // 16) if block_c else (RECIP_GROUPS if recip else WORDS_GROUPS)
    return {
        "BLOCK_R": block_r or (RECIP_BLOCK_R if recip else WORDS_BLOCK_R),
        "GROUPS": min(groups, triton.next_power_of_2(gk)),
        "MAGIC": variant != "words",
        "FAST_DIV": variant == "words_fastdiv",
        "RECIP": int(recip),
        "num_warps": num_warps or (RECIP_NUM_WARPS if recip else WORDS_NUM_WARPS),
    }


def _words_programs(rows: int, gk: int, meta: dict[str, Any]) -> int:
    """Programs of one tensor's words launch: row blocks times column blocks (column blocks fastest)."""
    return int(triton.cdiv(rows, meta["BLOCK_R"]) * triton.cdiv(gk, meta["GROUPS"]))


def launch(
    src: torch.Tensor,
    amax: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_out: torch.Tensor,
    flag: torch.Tensor,
    *,
    multiplier: bool,
    variant: str = "auto",
) -> None:
    """The sync-free step: ``gs`` from ``amax`` by torch ops on the device, then the kernel."""
    amax = amax.reshape(1).to(src.device)
    flag.add_(torch.isfinite(amax).logical_not().to(flag.dtype).reshape(flag.shape))
    gs = numerics.global_scale(torch.nan_to_num(amax, nan=0.0, posinf=0.0))
    launch_values(src, gs, packed, scales, flag, variant=variant)
    value = torch.div(torch.ones_like(gs), gs) if multiplier else gs
    global_out.copy_(value.reshape(global_out.shape))


def launch_fused(
    src: torch.Tensor,
    amax: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_out: torch.Tensor,
    flag: torch.Tensor,
    *,
    multiplier: bool,
    variant: str = "auto",
) -> None:
    """:func:`launch` as one kernel: the words kernel derives gs from the amax itself and writes ``global_out``.

    Same bytes, flag and ``global_out`` as :func:`launch`, without its dozen tiny torch launches
    for gs (a few microseconds each: most of a small tensor's conversion time). Sources without
    the words layout, an empty source or a non-float32 ``global_out`` take :func:`launch`.
    """
    x = src if src.dim() == 3 else src.unsqueeze(0)
    words_ok = variant != "generic" and bf16_words(x) is not None and x.numel() > 0
    if not words_ok or global_out.dtype != torch.float32 or global_out.numel() != 1 or not global_out.is_contiguous():
        launch(src, amax, packed, scales, global_out, flag, multiplier=multiplier, variant=variant)
        return
    a = amax.reshape(1).to(device=src.device, dtype=torch.float32)
    v = VARIANT if variant == "auto" else variant
    launch_values(src, a, packed, scales, flag, variant=v, global_out=global_out, multiplier=multiplier)


#: Grouped amax pass: words (bf16) or elements per tile, and the widest tile row.
AMAX_GROUP_TILE = 4096
AMAX_GROUP_TILE_K = 1024


def launch_group(
    calls: Sequence[tuple[Any, ...]],
    flag: torch.Tensor,
    *,
    multiplier: bool,
    variant: str = "auto",
) -> None:
    """``launch`` of each ``(src, packed, scales, global_out)`` of ``calls``, each with its own tensor amax,
    in two launches per group of same-shaped sources (:func:`conversion_core.formats.group_table.groups`).

    A grouped amax pass (:func:`_amax_group_kernel`) writes every member's max |x| into one zeroed
    int32 buffer; the grouped quantizer then derives each member's gs from its amax in the kernel
    and writes its ``global_out`` (gs, or ``1 / gs`` with ``multiplier``), as :func:`launch_fused`
    does for one tensor. So a run of N tensors costs two launches per group instead of 2N, and the
    bytes and global outputs are those of one :func:`launch_fused` per call (the same tile bodies
    and constexprs), the flag raised for the same sources. A group whose every bf16 source can be
    read as words (K contiguous, even offsets and strides: every group whose table is ``aligned``,
    else checked per call) runs the words kernel with ``variant`` ("auto": :data:`VARIANT`); any
    other group the generic one.

    The members of a fused set (q/k/v, gate/up) never come here: the plan launches them with the
    set's amax through ``shared_amax.launch`` (:func:`launch_fused`), one by one.
    """
    if variant != "auto" and variant not in VARIANTS:
        raise ValueError(f"nvfp4 triton: unknown variant {variant!r} (one of {VARIANTS})")
    if not calls:
        return
    device = calls[0][0].device
    soft = device.type != "cuda"
    words_variant = VARIANT if variant == "auto" else variant
    fused_gs = 1 + bool(multiplier)
    amax_bits = torch.zeros(len(calls), dtype=torch.int32, device=device)
    start = 0
    for group in group_table.groups(calls):
        count = len(group.calls)
        amax = amax_bits[start : start + count]
        start += count
        e, n, k = group.shape
        rows = e * n
        src, packed, scales, global_out = group.bases
        words = _group_words(group) if words_variant != "generic" else None
        _launch_amax_group(group, words if words is not None else src, amax, k // 2 if words is not None else k)
        amax_f32 = amax.view(torch.float32)
        if words is None:
            _nvfp4_group_kernel[(triton.cdiv(rows, BLOCK_R), triton.cdiv(k, BLOCK_C), count)](
                src, packed, scales, global_out, amax_f32, group.table, flag, rows, n, k,
                BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, SOFT_ROUND=soft, FUSED_GS=fused_gs,
                CONTIGUOUS_K=group.contiguous_k, ALIGNED=group.aligned, num_warps=NUM_WARPS,
            )  # fmt: skip
            continue
        gk = k // 16
        meta = _words_meta(words_variant, gk)
        _nvfp4_words_group_kernel[(_words_programs(rows, gk, meta), count)](
            words, packed, scales, global_out, amax_f32, group.table, flag, rows, n, gk,
            FUSED_GS=fused_gs, INT64=rows * (k // 2) >= INT32_LIMIT, SOFT_ROUND=soft,
            ALIGNED=group.aligned, **meta,
        )  # fmt: skip


def _group_words(group: group_table.Group) -> torch.Tensor | None:
    """The int32 words view of the group's base source when every member has the words layout, else None.

    An ``aligned`` table says so for the whole group at once (offsets and E/N strides multiples of
    16 elements, bases 16-byte aligned); otherwise each member's address and strides are checked
    (the per-call cost only an unaligned group pays).
    """
    src = group.bases[0]
    if src.dtype != torch.bfloat16 or not group.contiguous_k or group.shape[2] % 2:
        return None
    if not group.aligned and not all(
        c[0].data_ptr() % 4 == 0 and all(s % 2 == 0 for s in c[0].stride()[:-1]) for c in group.calls
    ):
        return None
    return bf16_words(src if src.dim() == 3 else src.unsqueeze(0))


def _launch_amax_group(group: group_table.Group, src: torch.Tensor, amax: torch.Tensor, k: int) -> None:
    """The grouped amax pass over ``src`` (the base source, or its words view with ``k`` words per row).

    Programs per tensor: the persistent grid of :func:`tensor_amax` (:func:`_programs`) shared
    among the group's tensors, at least one each, never more than a tensor has tiles.
    """
    e, n, _ = group.shape
    count = len(group.calls)
    block_k = min(triton.next_power_of_2(k), AMAX_GROUP_TILE_K)
    block_r = max(1, AMAX_GROUP_TILE // block_k)
    col_blocks = triton.cdiv(k, block_k)
    tiles = triton.cdiv(e * n, block_r) * col_blocks
    per_tensor = max(1, min(tiles, triton.cdiv(_programs(src.device), count)))
    _amax_group_kernel[(per_tensor, count)](
        src, group.table, amax, e * n, n, k, col_blocks, tiles,
        BLOCK_R=block_r, BLOCK_K=block_k, WORDS=src.dtype == torch.int32, CONTIGUOUS_K=group.contiguous_k,
        ALIGNED=group.aligned, num_warps=AMAX_NUM_WARPS,
    )  # fmt: skip


def quantize_with_amax(
    src: torch.Tensor,
    amax: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    name: str,
    *,
    variant: str = "auto",
) -> torch.Tensor:
    """Triton twin of :func:`.numerics.quantize_with_amax` (same arguments, same bytes); returns ``gs``."""
    if not bool(torch.isfinite(amax).all()):
        raise numerics.non_finite_error(name, src.shape)
    gs = numerics.global_scale(amax.reshape(1).to(src.device))
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch_values(src, gs, packed, scales, flag, variant=variant)
    if int(flag.item()):  # the one host sync of the call
        raise numerics.non_finite_error(name, src.shape)
    return gs
