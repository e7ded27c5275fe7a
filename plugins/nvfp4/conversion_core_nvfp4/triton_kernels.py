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
- ``generic`` (every other dtype and stride: fp32, fp16, transposed views): one program owns
  ``BLOCK_R`` rows by ``BLOCK_C`` columns of the ``(rows, K)`` view, loads the even and the odd
  elements (any strides, int64 offsets, masked edges).

Bit-identity with the torch path rests on: bf16 rounding done on the float32 bits (round to
nearest even, as torch's cast), IEEE division (``tl.math.div_rn``) everywhere torch divides
(``s / gs`` per group, then ``x / step`` per element: no reciprocal, no product that an FMA
could contract: the only product, ``gs * s1``, feeds a min), the e4m3 cast of
:func:`conversion_core.formats.fp8_triton._to_e4m3` (software rounding under the interpreter),
and e2m1 rounding by the same midpoints. NaN/Inf are detected explicitly into an int32 device
flag. :func:`tensor_amax` is the read-only amax pass (a persistent integer max, one atomic per
program) for the same bf16 sources; other sources take torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conversion_core.formats.fp4_triton import (
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
VARIANTS = ("generic", "words", "words_magic", "words_fastdiv")
VARIANT = "words_magic"
#: generic kernel tile (rows, columns) and warps.
BLOCK_R = 8
BLOCK_C = 128
NUM_WARPS = 4
#: words kernel tile: rows x 16-groups per program (16 x 16 groups = 16 rows x 256 bf16 = 8 KiB in), and warps.
WORDS_BLOCK_R = 16
WORDS_GROUPS = 16
WORDS_NUM_WARPS = 4
#: amax pass: words per program per step, programs per multiprocessor (persistent grid), warps.
AMAX_BLOCK = 4096
AMAX_PROGRAMS_PER_SM = 4
AMAX_NUM_WARPS = 8
#: words_fastdiv takes Markstein's division only where every |x| is 0 or >= 2**-64 and step is in [2**-60, 2**60].
_FAST_MIN_BITS = tl.constexpr(0x1F800000)
_FAST_MIN_STEP = tl.constexpr(2.0**-60)
_FAST_MAX_STEP = tl.constexpr(2.0**60)


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
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
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


@triton.jit
def _nvfp4_words_kernel(
    w_ptr,
    packed_ptr,
    scale_ptr,
    gs_ptr,
    flag_ptr,
    ROWS,
    N,
    GK,
    stride_e,
    stride_n,
    BLOCK_R: tl.constexpr,
    GROUPS: tl.constexpr,
    MAGIC: tl.constexpr,
    FAST_DIV: tl.constexpr,
    INT64: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    """``w_ptr``: the bf16 source as int32 words (strides in words); GK = K // 16 groups per row."""
    pid = tl.program_id(0)
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
    gs = tl.load(gs_ptr)
    s3 = _group_scale(amax_bits.to(tl.float32, bitcast=True), gs, SOFT_ROUND)
    tl.store(scale_ptr + rows[:, None] * GK + groups[None, :], s3.to(tl.float8e4nv), mask=gmask)
    step = tl.math.div_rn(s3, gs)
    lo = _bf16_lo(w)
    hi = _bf16_hi(w)
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
    out = rows[:, None, None] * (GK * 8) + col[None, :, :]
    tl.store(packed_ptr + out, byte, mask=mask, eviction_policy="evict_first")


@triton.jit
def _amax_words_kernel(w_ptr, out_ptr, NWORDS, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """Persistent max over the magnitude bits of a contiguous bf16 tensor's words; one atomic max per program."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    if INT64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, NWORDS, step):
        offs = tl.multiple_of(off, BLOCK) + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + offs, mask=offs < NWORDS, other=0, eviction_policy="evict_first")
        acc = tl.maximum(acc, _abs_bits_max(w))
    tl.atomic_max(out_ptr, tl.max(acc, 0))


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * AMAX_PROGRAMS_PER_SM
    return 4


def tensor_amax(
    src: torch.Tensor, *, block: int | None = None, programs: int | None = None, num_warps: int | None = None
) -> torch.Tensor:
    """float32 ``(1,)`` max |x| of ``src``, equal to :func:`.numerics.tensor_amax` (NaN for a NaN, Inf for an Inf).

    A contiguous bf16 source takes one Triton pass: a persistent grid (``programs``, default
    :data:`AMAX_PROGRAMS_PER_SM` per multiprocessor) of integer maxes over the words' magnitude
    bits (bf16 widens to float32 exactly, so the float32 bits of the max are these bits shifted)
    and one ``atomic_max`` per program into a zeroed int32. Any other source takes torch's.
    """
    if src.dtype != torch.bfloat16 or not src.is_contiguous() or src.numel() % 2 or src.numel() == 0:
        return numerics.tensor_amax(src)
    words = src.view(-1).view(torch.int32)
    out = torch.zeros(1, dtype=torch.int32, device=src.device)
    blk = block or AMAX_BLOCK
    grid = (max(1, min(programs or _programs(src.device), triton.cdiv(words.numel(), blk))),)
    _amax_words_kernel[grid](
        words,
        out,
        words.numel(),
        BLOCK=blk,
        INT64=words.numel() + grid[0] * blk >= 1 << 31,
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
) -> str:
    """Enqueue the kernel for ``src`` (2-D or 3-D) given the float32 ``(1,)`` global scale on its device.

    ``variant``: "auto" (:data:`VARIANT` where the words layout applies, else "generic"), or one of
    :data:`VARIANTS` ("words*" on a source without the words layout raises ValueError). ``block_r``
    / ``block_c`` (columns, a multiple of 16; for words ``block_c // 16`` groups) and ``num_warps``
    override the tile (benchmarks sweep them). Returns the variant run.
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
    br = block_r or WORDS_BLOCK_R
    gk = k // 16
    groups = min((block_c // 16) if block_c else WORDS_GROUPS, triton.next_power_of_2(gk))
    # Rows that merge (a contiguous stack) need no expert split: one "expert" of all rows.
    n_arg, se = (rows, 0) if e == 1 or words.stride(0) == n * words.stride(1) else (n, words.stride(0))
    _nvfp4_words_kernel[(triton.cdiv(rows, br) * triton.cdiv(gk, groups),)](
        words,
        packed,
        scales,
        gs,
        flag,
        rows,
        n_arg,
        gk,
        se,
        words.stride(1),
        BLOCK_R=br,
        GROUPS=groups,
        MAGIC=variant != "words",
        FAST_DIV=variant == "words_fastdiv",
        INT64=needs_int64(words, packed.numel()),
        SOFT_ROUND=soft,
        num_warps=num_warps or WORDS_NUM_WARPS,
    )
    return variant


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
