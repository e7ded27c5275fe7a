"""One-pass Triton kernels for MXFP8 and MXFP4: bit-identical to the torch path.

Two kernels compute the same bytes:

- ``words`` (the default where it applies: a bf16 source with K contiguous and 4-byte aligned
  rows, :func:`conversion_core.formats.fp4_triton.bf16_words`): the source is read as int32
  words, two elements each, in a ``(BLOCK_R, GROUPS, 16)`` tile (a 32-group is 16 words) built
  from pointer arithmetic (16-byte vector loads, no reshape or split anywhere); the group amax is
  an integer max over the magnitude bits (exact; NaN/Inf show as bits >= Inf's); the per-group
  multiplier broadcasts with ``[:, :, None]``; MXFP4 stores the byte of word ``i`` (its two
  codes) at the same ``(r, g, i)``, MXFP8 the two e4m3 bytes of word ``i`` as one little-endian
  int16 there: contiguous stores either way. A 1-D grid walks column blocks fastest; int32
  offsets unless some offset reaches 2**31. ``variant="words_magic"`` (MXFP4) takes the e2m1
  code from :func:`conversion_core.formats.fp4_triton._e2m1_index_magic`, ``"words_int"``
  from :func:`conversion_core.formats.fp4_triton._e2m1_index_int` (integer RNE): the same codes.
  MXFP8's e4m3 byte is :func:`_e4m3_byte` (integer RNE on the float32 bits plus one exact
  magic add for the subnormal range): no fp8 cast, so the interpreter runs the very code the
  GPU runs. ``variant="words_cvt"`` (MXFP8 only; MXFP4 runs words_magic) instead converts each
  word's two values with one ``cvt.rn.satfinite.e4m3x2.f32`` (inline asm) straight into the
  int16: fewest instructions, proven by the GPU byte check only (the interpreter, which has no
  inline asm, runs :func:`_e4m3_byte` for it).

  Why not ``.to(tl.float8e4nv)`` then a bitcast and the int16 pack (what "words" did before):
  the H200 wrote other bytes than the CPU path on every shape. The PTX Triton 3.6 emits is
  right, but ptxas (12.8, the one Triton 3.6 ships) fuses the pack into
  ``F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C`` whose merge operand should be ``cvt_result >> 8``
  and reads an unwritten register instead (the stack pointer ``R1``, or a never-written one),
  so byte 2 of every 4-byte store (the even element of every second word) is garbage.
  ``benchmarks/sass_check.py`` compiles the kernels to SASS on CPU and looks for such reads.
- ``generic`` (fp32, fp16, transposed or odd-strided sources): one program owns ``BLOCK_R`` rows
  x ``BLOCK_C`` columns (``BLOCK_C`` a multiple of 32, so whole groups) of the ``(E*N, K)`` row
  view and loads the tile once (any strides, int64 offsets, masked edges).

Both take each group's amax, compute the E8M0 byte from the amax's bits, multiply by the exact
power of two ``2**(127 - byte)``, clamp to ``limit``, round and store values and scale bytes.
Rows never mix experts (a row is one expert's row), groups never cross rows.

Bit-identity: every step but the rounding is exact (integer ops, multiplication by a power of
two, min/max; the one product feeds a min/max, never an add, so no FMA contraction), so GPU and
CPU agree without division tricks; e4m3 rounding is :func:`_e4m3_byte`'s integer RNE (words), the
hardware cast (words_cvt on GPUs) or the shared ``_to_e4m3`` (generic: hardware RNE cast on GPUs,
software RNE under the interpreter); e2m1 rounding is seven comparisons, the magic adds or the
integer RNE, all putting every tie on the even code (compressed-tensors' ``cast_to_fp4`` buckets).
NaN/Inf set a device flag; the host reads it once per call (on that error the buffers' contents
are unspecified; the torch path checks before writing).

Grouped launches (:func:`launch_group`, the conversions' ``launch_group``): a run of calls whose
sources sit at new addresses every step (an FSDP all-gather, a trainer's loop) costs one launch
per group of like tensors, not one per tensor. Each kernel's body is a ``@triton.jit`` tile
function (:func:`_mx_tile`, :func:`_mx_words_tile`) that the single kernels call with their
arguments and the group kernels with a ``conversion_core.formats.group_table`` row (offsets from
the group's bases, strides): same constexprs, same variant choice (:func:`_pick_variant`), so
the same bytes as one launch per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from conversion_core.formats import group_table
from conversion_core.formats.e8m0 import MX_GROUP
from conversion_core.formats.fp4_triton import (
    _abs_bits_max,
    _bf16_hi,
    _bf16_lo,
    _e2m1_cmp,
    _e2m1_code,
    _e2m1_index_int,
    _flag_non_finite,
    _pack_nibbles,
    bf16_words,
    needs_int64,
)
from conversion_core.formats.fp8_triton import FLT_MAX, _to_e4m3

from .numerics import MXFP8, MxFormat, check_k, non_finite_error

#: The variants :func:`launch` accepts; "auto" is :data:`VARIANT` where the words layout applies, else generic.
VARIANTS = ("generic", "words", "words_magic", "words_int", "words_cvt")
#: The variants that differ per format (the others repeat one of these: same constexprs, same kernel).
FORMAT_VARIANTS = {
    "mxfp8": ("generic", "words", "words_cvt"),
    "mxfp4": ("generic", "words", "words_magic", "words_int"),
}
#: The "auto" variant per format where the words layout applies.
VARIANT = "words_magic"
#: H200 2026-12-04 (benchmarks/results/h200_2026-12-04b/mx.txt): words_cvt 0.78-0.82 of copy, generic
#: 0.76-0.84, words 0.59-0.61; words_cvt == CPU bytes on every checked and timed shape.
MXFP8_VARIANT = "words_cvt"
#: Tile shape and warps (rows, columns, warps); columns are a multiple of 32. Tuned by benchmarks/gpu_mx.py.
BLOCK_R = 16
BLOCK_C = 256
NUM_WARPS = 4
#: words kernel: rows, columns (a multiple of 32: ``WORDS_BLOCK_C // 32`` groups) and warps per program.
WORDS_BLOCK_R = 16
WORDS_BLOCK_C = 512
WORDS_NUM_WARPS = 4


@triton.jit
def _mx_scale(amax_bits, OFFSET: tl.constexpr, QMAX: tl.constexpr, SATURATE: tl.constexpr):
    """(E8M0 byte, ``2**(127 - byte)``, limit) from the float32 bits of the group amax."""
    field = (amax_bits + (1 << 21)) >> 23
    code = tl.minimum(tl.maximum(field - OFFSET, 0), 254)
    rfield = 254 - code
    recip = tl.where(rfield > 0, rfield << 23, 1 << 22).to(tl.float32, bitcast=True)
    limit = tl.minimum(recip * SATURATE, QMAX)
    return code, recip, limit


#: ``bits(2**-6)``: the smallest normal e4m3 magnitude; below it e4m3 steps by ``2**-9``.
_E4M3_MIN_NORMAL_BITS = tl.constexpr(0x3C800000)
#: ``bits(2**14)``: ``bits(a + 2**14) - bits(2**14)`` is ``a / 2**-9`` rounded to nearest even, for ``0 <= a < 2**14``.
_MAGIC_E4M3_SUB_BITS = tl.constexpr(0x46800000)
#: Added to the magnitude bits before the shift by 20: the RNE half (``2**19 - 1``, the tie bit added apart)
#: and the exponent rebias ``(127 - 7) << 3`` moved before the shift (a multiple of ``2**20``).
_E4M3_NORMAL_ADD = tl.constexpr(0x7FFFF - (960 << 20))


@triton.jit
def _e4m3_byte(v, limit):
    """e4m3fn byte (int32, 0..255) of float32 ``v`` clamped to ``±limit`` and rounded to nearest even.

    ``limit`` (scalar or broadcastable) is an e4m3 value ``<= 448``, so RNE of the clamped value
    is RNE of ``a = min(|v|, limit)``. Every step is exact on any hardware: for ``a >= 2**-6``
    the byte is the float32 bits rounded to 3 mantissa bits (integer RNE: the carry runs into the
    exponent) and rebiased; below, one float32 add of ``2**14`` (ulp ``2**-9``, e4m3's subnormal
    step) rounds with IEEE RNE and the bits count the steps (0..8; 8 is ``2**-6``'s byte).
    That add never sees a product (``a`` is a min of an abs), so no FMA contraction; a
    flush-to-zero of a float32-subnormal ``a`` would still give 0, its true byte. Sign: bit 31
    of ``v`` (so ``-0.0`` and a negative value rounding to zero give 0x80, as torch's cast does).
    NaN gives an unspecified byte: callers flag NaN/Inf.
    """
    bits = v.to(tl.int32, bitcast=True)
    return _e4m3_mag(tl.minimum(tl.abs(v), limit)) | ((bits >> 24) & 0x80)


@triton.jit
def _e4m3_mag(a):
    """The e4m3 magnitude byte (0..0x7E) of float32 ``0 <= a <= 448``, RNE: see :func:`_e4m3_byte`."""
    mag = a.to(tl.int32, bitcast=True)
    tiny = (a + 16384.0).to(tl.int32, bitcast=True) - _MAGIC_E4M3_SUB_BITS
    normal = (mag + _E4M3_NORMAL_ADD + ((mag >> 20) & 1)) >> 20
    return tl.where(mag < _E4M3_MIN_NORMAL_BITS, tiny, normal)


@triton.jit
def _e4m3x2_cvt(hi, lo):
    """int16 ``e4m3(lo) | e4m3(hi) << 8`` by one hardware RNE cast (``hi``, ``lo`` already clamped, float32).

    GPU only (inline asm). The result is the store's own value: no byte extraction or repacking
    follows the cast, the pattern ptxas 12.8 miscompiled (see the module docstring).
    """
    return tl.inline_asm_elementwise(
        "cvt.rn.satfinite.e4m3x2.f32 $0, $1, $2;",
        "=h,r,r",
        [hi.to(tl.int32, bitcast=True), lo.to(tl.int32, bitcast=True)],
        dtype=tl.int16,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _mx_tile(
    src_ptr,
    q_ptr,
    s_ptr,
    flag_ptr,
    pid_r,
    pid_c,
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
    CONTIGUOUS_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Generic tile ``(pid_r, pid_c)`` of one tensor's ``(E*N, K)`` row view: load once, scales, values.

    The body of both :func:`_mx_kernel` (one tensor per launch) and :func:`_mx_group_kernel`
    (a table row per tensor), so the two launches write the same bytes by construction.
    """
    G: tl.constexpr = BLOCK_C // 32
    if CONTIGUOUS_K:  # a grouped launch reads strides from its table: say what it cannot know
        stride_k = 1
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
    code, recip, limit = _mx_scale(amax.to(tl.int32, bitcast=True), OFFSET, QMAX, SATURATE)
    v = g * recip[:, :, None]
    v = tl.minimum(tl.maximum(v, -limit[:, :, None]), limit[:, :, None])
    v = tl.reshape(v, (BLOCK_R, BLOCK_C))
    if FP4:
        c = _e2m1_cmp(v)
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
    """One tensor: program ``(pid_r, pid_c)`` converts generic tile ``(pid_r, pid_c)``."""
    _mx_tile(
        src_ptr, q_ptr, s_ptr, flag_ptr, tl.program_id(0), tl.program_id(1), ROWS, N, K, stride_e, stride_n,
        stride_k, OFFSET, QMAX, SATURATE, FP4, SOFT_ROUND, False, BLOCK_R, BLOCK_C,
    )  # fmt: skip


@triton.jit
def _mx_words_tile(
    w_ptr,
    q_ptr,
    s_ptr,
    flag_ptr,
    pid,
    ROWS,
    N,
    GK,
    stride_e,
    stride_n,
    OFFSET: tl.constexpr,
    QMAX: tl.constexpr,
    SATURATE: tl.constexpr,
    FP4: tl.constexpr,
    MAGIC: tl.constexpr,
    E2M1_INT: tl.constexpr,
    CVT: tl.constexpr,
    INT64: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """Words tile ``pid`` (column blocks fastest) of one tensor; the body of both words kernels.

    ``w_ptr``: the bf16 source as int32 words (strides in words); GK = K // 32 groups per row.
    ``q_ptr``: MXFP4 bytes, or MXFP8 values viewed as int16 (two e4m3 bytes per word, K // 2 per row).
    CVT (MXFP8, not SOFT_ROUND): the hardware cast of :func:`_e4m3x2_cvt`, else :func:`_e4m3_byte`.
    """
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
    col = groups[:, None] * 16 + tl.arange(0, 16)[None, :]  # word index in the row, (GROUPS, 16)
    gmask = (rows[:, None] < ROWS) & (groups[None, :] < GK)
    mask = gmask[:, :, None]
    w = tl.load(w_ptr + base[:, None, None] + col[None, :, :], mask=mask, other=0, eviction_policy="evict_first")
    amax_bits = tl.max(_abs_bits_max(w), 2)  # (BLOCK_R, GROUPS)
    _flag_non_finite(flag_ptr, amax_bits)
    code, recip, limit = _mx_scale(amax_bits, OFFSET, QMAX, SATURATE)
    recip = recip[:, :, None]
    limit = limit[:, :, None]
    v_lo = _bf16_lo(w) * recip
    v_hi = _bf16_hi(w) * recip
    out = rows[:, None, None] * (GK * 16) + col[None, :, :]
    if FP4 and E2M1_INT:
        # Sign bit v < 0 per element (-0.0 gets code 0, unlike e4m3), the index from min(|v|, limit).
        c_lo = _e2m1_index_int(tl.minimum(tl.abs(v_lo), limit)) | ((v_lo < 0.0).to(tl.int32) << 3)
        c_hi = _e2m1_index_int(tl.minimum(tl.abs(v_hi), limit)) | ((v_hi < 0.0).to(tl.int32) << 3)
        tl.store(q_ptr + out, _pack_nibbles(c_lo, c_hi), mask=mask, eviction_policy="evict_first")
    elif FP4:
        # The clamp to ±limit is the code's own min(|v|, limit): the same codes.
        byte = _pack_nibbles(_e2m1_code(v_lo, limit, MAGIC), _e2m1_code(v_hi, limit, MAGIC))
        tl.store(q_ptr + out, byte, mask=mask, eviction_policy="evict_first")
    elif CVT and not SOFT_ROUND:
        v_lo = tl.minimum(tl.maximum(v_lo, -limit), limit)
        v_hi = tl.minimum(tl.maximum(v_hi, -limit), limit)
        tl.store(q_ptr + out, _e4m3x2_cvt(v_hi, v_lo), mask=mask, eviction_policy="evict_first")
    else:
        # Magnitudes from |x| (the amax's bits, already there), signs straight from the word: the
        # sign of x * 2**k is x's (bit 15 -> bit 7 of the pair, bit 31 -> bit 15), -0.0 included.
        a_lo = tl.minimum(((w << 16) & 0x7FFFFFFF).to(tl.float32, bitcast=True) * recip, limit)
        a_hi = tl.minimum((w & 0x7FFF0000).to(tl.float32, bitcast=True) * recip, limit)
        pair = _e4m3_mag(a_lo) | (_e4m3_mag(a_hi) << 8) | ((w >> 8) & 0x80) | ((w >> 16) & 0x8000)
        tl.store(q_ptr + out, pair.to(tl.int16), mask=mask, eviction_policy="evict_first")
    tl.store(s_ptr + rows[:, None] * GK + groups[None, :], code.to(tl.uint8), mask=gmask)


@triton.jit
def _mx_words_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    flag_ptr,
    ROWS,
    N,
    GK,
    stride_e,
    stride_n,
    OFFSET: tl.constexpr,
    QMAX: tl.constexpr,
    SATURATE: tl.constexpr,
    FP4: tl.constexpr,
    MAGIC: tl.constexpr,
    E2M1_INT: tl.constexpr,
    CVT: tl.constexpr,
    INT64: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """One tensor, one words tile per program (see :func:`_mx_words_tile`)."""
    _mx_words_tile(
        w_ptr, q_ptr, s_ptr, flag_ptr, tl.program_id(0), ROWS, N, GK, stride_e, stride_n,
        OFFSET, QMAX, SATURATE, FP4, MAGIC, E2M1_INT, CVT, INT64, SOFT_ROUND, BLOCK_R, GROUPS,
    )  # fmt: skip


#: ``group_table.ALIGN_ELEMENTS``: what a group's ``aligned`` promises of its offsets and strides.
_ALIGN = tl.constexpr(group_table.ALIGN_ELEMENTS)


@triton.jit
def _table_row(table_ptr, t, ALIGNED: tl.constexpr):
    """Tensor ``t`` of a grouped launch: element offsets of its source, values and scales from the
    group's bases, then its source strides (``conversion_core.formats.group_table``'s rows).

    ``ALIGNED`` restores the divisibility hints Triton infers for one tensor's own pointer and
    stride arguments (16-byte vector loads and stores), lost when they come from a table."""
    row = table_ptr + t.to(tl.int64) * 6
    src_off = tl.load(row)
    q_off = tl.load(row + 1)
    s_off = tl.load(row + 2)
    stride_e = tl.load(row + 3)
    stride_n = tl.load(row + 4)
    stride_k = tl.load(row + 5)
    if ALIGNED:
        src_off = tl.multiple_of(src_off, _ALIGN)
        q_off = tl.multiple_of(q_off, _ALIGN)
        s_off = tl.multiple_of(s_off, _ALIGN)
        stride_e = tl.multiple_of(stride_e, _ALIGN)
        stride_n = tl.multiple_of(stride_n, _ALIGN)
    return src_off, q_off, s_off, stride_e, stride_n, stride_k


@triton.jit
def _mx_group_kernel(
    src_base,
    q_base,
    s_base,
    table_ptr,
    flag_ptr,
    ROWS,
    N,
    K,
    OFFSET: tl.constexpr,
    QMAX: tl.constexpr,
    SATURATE: tl.constexpr,
    FP4: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    CONTIGUOUS_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grouped generic launch: program ``(pid_r, pid_c, t)`` converts that tile of the group's tensor ``t``."""
    src_off, q_off, s_off, stride_e, stride_n, stride_k = _table_row(table_ptr, tl.program_id(2), ALIGNED)
    _mx_tile(
        src_base + src_off, q_base + q_off, s_base + s_off, flag_ptr, tl.program_id(0), tl.program_id(1),
        ROWS, N, K, stride_e, stride_n, stride_k, OFFSET, QMAX, SATURATE, FP4, SOFT_ROUND, CONTIGUOUS_K,
        BLOCK_R, BLOCK_C,
    )  # fmt: skip


@triton.jit
def _mx_words_group_kernel(
    w_base,
    q_base,
    s_base,
    table_ptr,
    flag_ptr,
    ROWS,
    N,
    GK,
    OFFSET: tl.constexpr,
    QMAX: tl.constexpr,
    SATURATE: tl.constexpr,
    FP4: tl.constexpr,
    MAGIC: tl.constexpr,
    E2M1_INT: tl.constexpr,
    CVT: tl.constexpr,
    INT64: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """Grouped words launch: program ``(pid, t)`` converts words tile ``pid`` of the group's tensor ``t``.

    The table's offsets and strides are in words (the group was built from the int32 views) and
    the values' offsets in the values view's elements (int16 for MXFP8, bytes for MXFP4)."""
    w_off, q_off, s_off, stride_e, stride_n, _ = _table_row(table_ptr, tl.program_id(1), ALIGNED)
    _mx_words_tile(
        w_base + w_off, q_base + q_off, s_base + s_off, flag_ptr, tl.program_id(0), ROWS, N, GK, stride_e,
        stride_n, OFFSET, QMAX, SATURATE, FP4, MAGIC, E2M1_INT, CVT, INT64, SOFT_ROUND, BLOCK_R, GROUPS,
    )  # fmt: skip


def _pick_variant(src: torch.Tensor, fmt: MxFormat, variant: str) -> tuple[str, torch.Tensor | None]:
    """The variant that runs on ``src`` and, for a words variant, the int32 words view of its 3-D view.

    One rule for :func:`launch` and :func:`launch_group`, so a grouped tensor runs the kernel its
    own launch would."""
    words = bf16_words(src if src.dim() == 3 else src.unsqueeze(0)) if variant != "generic" else None
    if variant == "auto":
        variant = "generic" if words is None else MXFP8_VARIANT if fmt is MXFP8 else VARIANT
    if variant not in VARIANTS:
        raise ValueError(f"{fmt.name} triton: unknown variant {variant!r} (one of {VARIANTS})")
    if variant != "generic" and words is None:
        raise ValueError(
            f"{fmt.name} triton: variant {variant!r} needs a bf16 source with K contiguous and 4-byte aligned "
            f"rows; got {src.dtype} of shape {tuple(src.shape)}, strides {tuple(src.stride())}"
        )
    return variant, words


def _generic_meta(
    fmt: MxFormat, k: int, soft: bool, block_r: int | None, block_c: int | None, num_warps: int | None
) -> dict[str, Any]:
    """The generic kernels' constexprs and warps for rows of ``k`` (single and grouped alike)."""
    bc = min(block_c or BLOCK_C, max(MX_GROUP, triton.next_power_of_2(k)))
    return dict(
        OFFSET=fmt.offset,
        QMAX=fmt.qmax,
        SATURATE=fmt.saturate,
        FP4=fmt is not MXFP8,
        SOFT_ROUND=soft,
        BLOCK_R=block_r or BLOCK_R,
        BLOCK_C=bc,
        num_warps=num_warps or NUM_WARPS,
    )


def _words_meta(
    fmt: MxFormat,
    variant: str,
    gk: int,
    int64: bool,
    soft: bool,
    block_r: int | None,
    block_c: int | None,
    num_warps: int | None,
) -> dict[str, Any]:
    """The words kernels' constexprs and warps for ``gk`` groups per row (single and grouped alike)."""
    fp4 = fmt is not MXFP8
    return dict(
        OFFSET=fmt.offset,
        QMAX=fmt.qmax,
        SATURATE=fmt.saturate,
        FP4=fp4,
        MAGIC=fp4 and variant in ("words_magic", "words_cvt"),
        E2M1_INT=fp4 and variant == "words_int",
        CVT=not fp4 and variant == "words_cvt",
        INT64=int64,
        SOFT_ROUND=soft,
        BLOCK_R=block_r or WORDS_BLOCK_R,
        GROUPS=min((block_c or WORDS_BLOCK_C) // MX_GROUP, triton.next_power_of_2(gk)),
        num_warps=num_warps or WORDS_NUM_WARPS,
    )


def _words_programs(rows: int, gk: int, meta: dict[str, Any]) -> int:
    """Programs of a words launch: row blocks times column blocks (one flat grid dimension)."""
    return int(triton.cdiv(rows, meta["BLOCK_R"]) * triton.cdiv(gk, meta["GROUPS"]))


def _group_needs_int64(group: group_table.Group, out_elements: int) -> bool:
    """:func:`needs_int64` for every words view of ``group`` at once, on a meta tensor with the
    widest stride of each dim: it bounds every member's span, for one check per group instead of
    one per tensor (INT64 only widens the offsets: where it is not needed it changes no byte)."""
    widest = tuple(map(max, zip(*(call[0].stride() for call in group.calls), strict=True)))
    return needs_int64(torch.empty_strided(group.shape, widest, dtype=torch.int32, device="meta"), out_elements)


def launch(
    src: torch.Tensor,
    q_out: torch.Tensor,
    s_out: torch.Tensor,
    flag: torch.Tensor,
    fmt: MxFormat,
    block_r: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    *,
    variant: str = "auto",
) -> str:
    """Enqueue the kernel; sets ``flag[0]`` on NaN/Inf. No host sync (whole-model plan, CUDA graphs).

    ``variant``: "auto" (:data:`MXFP8_VARIANT` / :data:`VARIANT` where the words layout applies,
    else "generic") or one of :data:`VARIANTS` ("words*" on a source without that layout raises
    ValueError; "words_magic" and "words_int" only change MXFP4; "words_cvt" is MXFP8's hardware
    cast and MXFP4's words_magic). ``block_r``, ``block_c`` (columns, a multiple of 32) and ``num_warps``
    override the variant's tile. Returns the variant run.
    """
    check_k(fmt.name, tuple(src.shape))
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    if x.numel() == 0:
        return "none"
    variant, words = _pick_variant(src, fmt, variant)
    soft = src.device.type != "cuda"
    if words is None:
        meta = _generic_meta(fmt, k, soft, block_r, block_c, num_warps)
        grid = (triton.cdiv(e * n, meta["BLOCK_R"]), triton.cdiv(k, meta["BLOCK_C"]))
        _mx_kernel[grid](x, q_out, s_out, flag, e * n, n, k, x.stride(0), x.stride(1), x.stride(2), **meta)
        return variant
    rows, gk = e * n, k // MX_GROUP
    int64 = needs_int64(words, rows * k // 2)
    meta = _words_meta(fmt, variant, gk, int64, soft, block_r, block_c, num_warps)
    n_arg, se = (rows, 0) if e == 1 or words.stride(0) == n * words.stride(1) else (n, words.stride(0))
    q = q_out if fmt is not MXFP8 else q_out.view(torch.int16)
    _mx_words_kernel[(_words_programs(rows, gk, meta),)](
        words, q, s_out, flag, rows, n_arg, gk, se, words.stride(1), **meta
    )
    return variant


def launch_group(
    calls: Sequence[tuple[Any, ...]],
    flag: torch.Tensor,
    fmt: MxFormat,
    block_r: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    *,
    variant: str = "auto",
) -> list[tuple[str, int]]:
    """:func:`launch` for many ``(src, q_out, s_out)`` at once: one launch per run of like sources.

    Each call runs the variant its own :func:`launch` would (the same choice, constexprs and tile
    body), so the bytes are those of one launch per call; only where each program finds its
    tensor differs (a row of a ``conversion_core.formats.group_table`` table). Words calls are
    grouped by their int32 views, so their table offsets and strides are in words; the others
    by their sources. A K that is not a multiple of 32 is refused before anything is queued.
    Returns ``(variant, tensors)`` per kernel launch, in launch order.
    """
    words_calls: list[tuple[Any, ...]] = []
    generic_calls: list[tuple[Any, ...]] = []
    chosen = "generic"
    for src, q_out, s_out in calls:
        check_k(fmt.name, src.shape)
        picked, words = _pick_variant(src, fmt, variant)
        if words is None:
            generic_calls.append((src, q_out, s_out))
        else:
            chosen = picked  # every words call of one launch_group picks the same variant
            words_calls.append((words, q_out if fmt is not MXFP8 else q_out.view(torch.int16), s_out))
    if not words_calls and not generic_calls:
        return []
    soft = (words_calls or generic_calls)[0][0].device.type != "cuda"
    launched: list[tuple[str, int]] = []
    for group in group_table.groups(generic_calls) if generic_calls else ():
        e, n, k = group.shape
        meta = _generic_meta(fmt, k, soft, block_r, block_c, num_warps)
        grid = (triton.cdiv(e * n, meta["BLOCK_R"]), triton.cdiv(k, meta["BLOCK_C"]), len(group.calls))
        _mx_group_kernel[grid](
            *group.bases, group.table, flag, e * n, n, k, CONTIGUOUS_K=group.contiguous_k, ALIGNED=group.aligned,
            **meta,
        )  # fmt: skip
        launched.append(("generic", len(group.calls)))
    for group in group_table.groups(words_calls) if words_calls else ():
        e, n, kw = group.shape  # kw = K // 2 words per row
        rows, gk = e * n, kw * 2 // MX_GROUP
        int64 = _group_needs_int64(group, rows * kw)
        meta = _words_meta(fmt, chosen, gk, int64, soft, block_r, block_c, num_warps)
        _mx_words_group_kernel[(_words_programs(rows, gk, meta), len(group.calls))](
            *group.bases, group.table, flag, rows, n, gk, ALIGNED=group.aligned, **meta
        )
        launched.append((chosen, len(group.calls)))
    return launched


def quantize(
    src: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor, fmt: MxFormat, *, variant: str = "auto"
) -> None:
    """Triton twin of ``torch_path.quantize`` (same arguments, same bytes)."""
    if src.numel() == 0:
        check_k(fmt.name, tuple(src.shape))
        return
    flag = torch.zeros(1, dtype=torch.int32, device=src.device)
    launch(src, q_out, s_out, flag, fmt, variant=variant)
    if int(flag.item()):  # the one host sync of the call
        raise non_finite_error(fmt.name, src.shape)
