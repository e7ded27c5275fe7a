"""The torch path of int4 W4A16 (compressed-tensors ``pack-quantized``): it defines the bytes.

Every step mirrors compressed-tensors 0.19 / llm-compressor 0.14 as ``model_free_ptq`` runs them
on a bf16 weight (read from their source, names below), so the bytes equal theirs:

- statistics: llm-compressor ``observers/helpers.py`` ``flatten_for_calibration`` splits the last
  dim into groups of ``group_size`` (``unflatten``: a K that is not a multiple is refused there, and
  so here), ``observers/min_max.py`` ``_get_min_max`` takes min and max per group in the weight's
  dtype (``memoryless_minmax``, the weight observer ``initialize_observer`` always picks);
- scales: compressed-tensors ``quantization/utils/helpers.py`` ``calculate_qparams``, every
  operation in bf16 (torch computes a bf16 op in float32 and rounds to bf16, round-to-nearest-even):
  ``min = min(min, 0)``, ``max = max(max, 0)``; symmetric ``s = bf16(max(|min|, max) / 7.5)``
  (``bit_range / 2`` with ``bit_range = 7 - (-8) = 15``), zero point 0; asymmetric
  ``s = bf16(bf16(max - min) / 15)``, ``zp = clamp(bf16(-8 - bf16(min / s)), -8, 7)`` computed with
  the scale *before* the zero fix below (a zero group gives ``0 / 0 = NaN``, which
  ``round_to_quantized_type_dtype`` casts to int8 0; here NaN is mapped to 0 explicitly), then
  ``zp = round_half_even(zp)`` as int8; ``s == 0`` becomes ``finfo(bfloat16).eps = 2^-7``
  (``_get_dtype_eps``);
- values: ``quantization/lifecycle/forward_helpers.py`` ``_quantize`` (the CPU path of
  ``quantize``, called by ``PackedQuantizationCompressor.compress``): ``v = bf16(x / s)``
  (asymmetric: ``v = bf16(v + zp)``), ``q = round_half_even(clamp(v, -8, 7))``
  (``round_to_quantized_type_args``: clamp, then ``torch.round``);
- packing: ``compressors/pack_quantized/helpers.py`` ``pack_to_int32``: ``q + 8`` (unsigned),
  eight per int32 word along K, element ``8w + j`` in bits ``4j..4j+3`` (lowest nibble first);
  the zero point is packed the same way along the *rows* (``packed_dim=0``): ``(ceil(N/8), K/g)``,
  missing rows of the last word are zero nibbles; 3D stacks are packed expert by expert.

Sources in fp16 or fp32 are first rounded to bf16 (round-to-nearest-even): the bytes are those
llm-compressor writes for the bf16 checkpoint of the same weights, and the scale is bf16.

``reference_quantize`` is that definition, vectorised over float32 copies of the whole tensor.
On CPU, ``quantize`` writes the same bytes in chunks of whole rows on a few threads
(:mod:`conversion_core.formats.cpu_chunks`), with no full-size temporary and every op on 1-4 byte
elements (the reference's int64 packing of full-size copies took most of its time):

1. per group, the statistic as an integer reduction over the bf16 bits into a small ``(rows, G)``
   buffer: ``max`` of the sign-masked bits (symmetric; they order like ``|x|``), ``min``/``max``
   of the ordered key ``b ^ ((b >> 15) & 0x7FFF)`` (asymmetric; it orders like ``x``); NaN and
   Inf land at the ends, so one check over the small buffers refuses them before any write;
2. scales and zero points with the reference's own functions, on the small buffers;
3. every chunk again: ``bf16(x / s)`` is torch's bf16 division (float32 quotient, rounded to
   nearest even: the reference's ``_bf16(x / s)``), ``bf16(v + zp)`` its bf16 addition; then
   widened to float32, clamped to ``[-8, 7]`` and ``+ (1.5 * 2**23 + 8)``: a float32 in
   ``[2**23, 2**24)`` has spacing 1, so that one addition is round-half-even to an integer (the
   added constant is even), and the low byte of its bits is ``q + 8``; the uint8 nibbles are then
   paired as int16 (``w | w >> 4``, low byte) straight into the int32 words' bytes (little-endian:
   byte ``i`` of a word holds elements ``2i``, ``2i + 1``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

import conversion_core as cc
from conversion_core.formats.cpu_chunks import CHUNK_ELEMENTS, run_chunks, thread_scratch

BF16 = torch.bfloat16
#: ``finfo(bfloat16).eps``: the scale of a group whose scale computes to 0 (``_get_dtype_eps``).
ZERO_SCALE = 2.0**-7
Q_MIN, Q_MAX, OFFSET = -8.0, 7.0, 8
#: The largest scale whose largest dequantized value stays finite in bf16: ``-8 * s`` (symmetric),
#: ``(q - zp) * s`` with ``|q - zp| <= 15`` (asymmetric).
MAX_SCALE = torch.finfo(BF16).max / 8
MAX_SCALE_ASYM = torch.finfo(BF16).max / 15
#: Eight 4-bit values per int32 word.
PER_WORD = 8


def non_finite_error(
    name: str, shape: tuple[int, ...] | torch.Size, why: str = "holds NaN or Inf"
) -> cc.ConversionInputError:
    return cc.ConversionInputError(
        f"conversion {name!r}: source tensor of shape {tuple(shape)} {why}; refusing to write int4 bytes"
    )


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to bf16 (nearest-even) and back: the rounding of one bf16 op."""
    return t.to(BF16).float()


def bf16_groups(src: torch.Tensor, group: int, name: str) -> torch.Tensor:
    """float32 copy of ``bf16(src)`` shaped ``(..., N, K/g, g)``; refuses NaN/Inf (also bf16 overflow)."""
    x = src.to(BF16).float()
    if not bool(torch.isfinite(x).all()):
        overflow = bool(torch.isfinite(src).all())
        raise non_finite_error(name, src.shape, "overflows bfloat16" if overflow else "holds NaN or Inf")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def symmetric_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 holding the bf16 scale ``bf16(amax / 7.5)``, 0 replaced by 2^-7 (amax: bf16 values)."""
    s = _bf16(amax / 7.5)
    return torch.where(s == 0, torch.full_like(s, ZERO_SCALE), s)


def asymmetric_params(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` as float32 from per-group min and max (bf16 values), as ``calculate_qparams``."""
    mn = mn.clamp(max=0.0)
    mx = mx.clamp(min=0.0)
    s = _bf16(_bf16(mx - mn) / 15.0)
    zp = _bf16(-8.0 - _bf16(mn / s)).clamp(Q_MIN, Q_MAX)
    zp = torch.where(torch.isnan(zp), torch.zeros_like(zp), zp).round()
    s = torch.where(s == 0, torch.full_like(s, ZERO_SCALE), s)
    return s, zp


def check_scales(s: torch.Tensor, name: str, shape: tuple[int, ...] | torch.Size, limit: float = MAX_SCALE) -> None:
    """Refuse scales whose dequantized values overflow bf16 (|x| near bf16 max): finite bytes, Inf weights.

    llm-compressor writes such bytes; an engine dequantizing them in bf16 gets -Inf. Only groups
    with an amax above ``7.5/8`` of bf16's max (symmetric) or a range near it (asymmetric) hit this.
    """
    if bool((s > limit).any()):
        raise non_finite_error(name, shape, "has a group so large that its dequantized values overflow bfloat16")


def quantize_values(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """``round_half_even(clamp(bf16(x / s) [+ zp, rounded to bf16], -8, 7))`` as float32."""
    v = _bf16(x / s)
    if zp is not None:
        v = _bf16(v + zp)
    return v.clamp(Q_MIN, Q_MAX).round()


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) as the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_k(q: torch.Tensor) -> torch.Tensor:
    """int4 values (float, ``(..., K)``, K a multiple of 8) -> int32 words ``(..., K/8)``, lowest nibble first."""
    u = (q.to(torch.int64) + OFFSET).reshape(*q.shape[:-1], q.shape[-1] // PER_WORD, PER_WORD)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    return _to_int32_bits((u << shifts).sum(dim=-1))


def pack_rows(zp: torch.Tensor) -> torch.Tensor:
    """int4 zero points ``(..., N, G)`` -> int32 words ``(..., ceil(N/8), G)`` packed along N (zero-padded)."""
    *lead, n, g = zp.shape
    words = -(-n // PER_WORD)
    u = torch.zeros((*lead, words * PER_WORD, g), dtype=torch.int64, device=zp.device)
    u[..., :n, :] = zp.to(torch.int64) + OFFSET
    u = u.reshape(*lead, words, PER_WORD, g)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=zp.device).reshape(PER_WORD, 1)
    return _to_int32_bits((u << shifts).sum(dim=-2))


def unpack_k(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_k`: int32 ``(..., W)`` -> int64 values in [-8, 7], ``(..., 8W)``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device)
    u = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return u.reshape(*words.shape[:-1], -1) - OFFSET


def unpack_rows(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``(..., ceil(N/8), G)`` -> int64 ``(..., N, G)``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device).reshape(PER_WORD, 1)
    u = (words.to(torch.int64).unsqueeze(-2) >> shifts) & 0xF
    return u.reshape(*words.shape[:-2], -1, words.shape[-1])[..., :n, :] - OFFSET


def write_shape(shape_out: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> None:
    """``weight_shape``: the unpacked shape as int64 (compressed-tensors' ``torch.tensor(weight.shape)``)."""
    shape_out.copy_(torch.tensor(tuple(shape), dtype=torch.int64))


def reference_quantize(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp_out: torch.Tensor | None,
    group: int,
    name: str,
) -> None:
    """The definition: write every output from float32 copies; nothing is written when the source is refused."""
    x = bf16_groups(src, group, name)
    if zp_out is None:
        s = symmetric_scale(x.abs().amax(dim=-1))
        check_scales(s, name, src.shape)
        q = quantize_values(x, s.unsqueeze(-1), None)
    else:
        s, zp = asymmetric_params(x.amin(dim=-1), x.amax(dim=-1))
        if not bool(torch.isfinite(s).all()):
            raise non_finite_error(name, src.shape, "has a group whose range max - min overflows bfloat16")
        check_scales(s, name, src.shape, MAX_SCALE_ASYM)
        q = quantize_values(x, s.unsqueeze(-1), zp.unsqueeze(-1))
        zp_out.copy_(pack_rows(zp))
    packed.copy_(pack_k(q.reshape(*q.shape[:-2], -1)))
    scale.copy_(s)
    write_shape(shape_out, src.shape)


#: ``1.5 * 2**23 + 8``: ``v + ROUND_MAGIC`` (float32, ``|v| <= 8``) is ``2**23 + 2**22 + 8 + rne(v)``.
ROUND_MAGIC = 1.5 * 2.0**23 + OFFSET
_CHUNKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# (plane, first row, end row, the plane's global index of its first row)
_Task = tuple[int, int, int, int]


def quantize(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp_out: torch.Tensor | None,
    group: int,
    name: str,
) -> None:
    """Write every output (the core checked the buffers); nothing is written when the source is refused.

    CPU sources take the chunked path (the module docstring), other devices the reference.
    """
    if src.device.type != "cpu" or src.dtype not in _CHUNKED_DTYPES or src.numel() == 0 or sys.byteorder != "little":
        reference_quantize(src, packed, scale, shape_out, zp_out, group, name)
        return
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    groups = k // group
    planes = _planes(x, packed.view(torch.uint8).view(e, n, k // 2))
    rows_per_chunk = max(1, CHUNK_ELEMENTS // k)
    tasks: list[_Task] = [
        (p, r0, min(xp.shape[0], r0 + rows_per_chunk), first)
        for p, (xp, _, first) in enumerate(planes)
        for r0 in range(0, xp.shape[0], rows_per_chunk)
    ]
    chunk_rows = min(rows_per_chunk, planes[0][0].shape[0])
    widen = src.dtype != BF16
    symmetric = zp_out is None
    lo = torch.empty(e * n, groups, dtype=torch.int16)  # asymmetric: min key
    hi = torch.empty(e * n, groups, dtype=torch.int16)  # max |x| bits, or max key

    def bf16_chunk(xs: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        return xs if scratch is None else scratch[: xs.shape[0]].copy_(xs)  # round to bf16 (nearest even)

    def statistics(chunks: Iterable[_Task]) -> None:
        scratch = thread_scratch("int4.bf16", chunk_rows * k, BF16).view(chunk_rows, k) if widen else None
        bits = thread_scratch("int4.bits", chunk_rows * k, torch.int16).view(chunk_rows, k)
        for p, r0, r1, first in chunks:
            xb = bf16_chunk(planes[p][0][r0:r1], scratch).view(torch.int16)
            b = bits[: r1 - r0]
            if symmetric:
                torch.bitwise_and(xb, 0x7FFF, out=b)
                torch.amax(b.view(-1, groups, group), dim=-1, out=hi[first + r0 : first + r1])
                continue
            torch.bitwise_right_shift(xb, 15, out=b).bitwise_and_(0x7FFF).bitwise_xor_(xb)
            torch.amin(b.view(-1, groups, group), dim=-1, out=lo[first + r0 : first + r1])
            torch.amax(b.view(-1, groups, group), dim=-1, out=hi[first + r0 : first + r1])

    run_chunks(tasks, statistics)
    zp: torch.Tensor | None = None
    zp_b: torch.Tensor | None = None
    if symmetric:
        amax = hi.view(BF16)
        if not bool(torch.isfinite(amax).all()):
            raise _non_finite_source(src, name)
        s = symmetric_scale(amax.float())
        check_scales(s, name, src.shape)
    else:
        mn, mx = _from_ordered(lo), _from_ordered(hi)
        if not bool((torch.isfinite(mn) & torch.isfinite(mx)).all()):
            raise _non_finite_source(src, name)
        s, zp = asymmetric_params(mn.float(), mx.float())
        if not bool(torch.isfinite(s).all()):
            raise non_finite_error(name, src.shape, "has a group whose range max - min overflows bfloat16")
        check_scales(s, name, src.shape, MAX_SCALE_ASYM)
        zp_b = zp.to(BF16)  # integers in [-8, 7]: exact
    s_b = s.to(BF16)  # bf16 values: exact

    def values(chunks: Iterable[_Task]) -> None:
        scratch = thread_scratch("int4.bf16", chunk_rows * k, BF16).view(chunk_rows, k) if widen else None
        v = thread_scratch("int4.v", chunk_rows * k, BF16).view(chunk_rows, groups, group)
        f = thread_scratch("int4.f", chunk_rows * k, torch.float32).view(chunk_rows, k)
        codes = thread_scratch("int4.codes", chunk_rows * k, torch.uint8).view(chunk_rows, k)
        pairs = thread_scratch("int4.pairs", chunk_rows * k // 2, torch.int16).view(chunk_rows, k // 2)
        for p, r0, r1, first in chunks:
            m = r1 - r0
            xb = bf16_chunk(planes[p][0][r0:r1], scratch).unflatten(-1, (groups, group))
            vs = torch.div(xb, s_b[first + r0 : first + r1].unsqueeze(-1), out=v[:m])
            if zp_b is not None:
                vs.add_(zp_b[first + r0 : first + r1].unsqueeze(-1))
            fs = f[:m].copy_(vs.view(m, k)).clamp_(Q_MIN, Q_MAX).add_(ROUND_MAGIC)
            c = codes[:m].copy_(fs.view(torch.int32))  # the low byte: q + 8
            w = c.view(torch.int16)
            t = torch.bitwise_right_shift(w, 4, out=pairs[:m]).bitwise_or_(w)
            planes[p][1][r0:r1].copy_(t)  # the low byte: element 2i | element 2i+1 << 4

    run_chunks(tasks, values)
    if zp_out is not None and zp is not None:
        zp_out.copy_(pack_rows(zp.view(*scale.shape)))
    scale.view(e * n, groups).copy_(s)
    write_shape(shape_out, src.shape)


def _planes(x: torch.Tensor, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """2-D (source rows, packed byte rows, global index of the first row): the whole stack when strides allow."""
    e, n, k = x.shape
    try:
        return [(x.view(e * n, k), out.view(e * n, -1), 0)]
    except RuntimeError:  # strides that do not merge experts into rows: one plane per expert
        return [(x[i], out[i], i * n) for i in range(e)]


def _from_ordered(key: torch.Tensor) -> torch.Tensor:
    """bf16 values of int16 ordered keys (``b ^ ((b >> 15) & 0x7FFF)`` is its own inverse)."""
    return torch.bitwise_right_shift(key, 15).bitwise_and_(0x7FFF).bitwise_xor_(key).view(BF16)


def _non_finite_source(src: torch.Tensor, name: str) -> cc.ConversionInputError:
    """The reference's error: a finite source whose bf16 rounding is Inf overflows, else it holds NaN/Inf."""
    overflow = src.dtype != BF16 and bool(torch.isfinite(src).all())
    return non_finite_error(name, src.shape, "overflows bfloat16" if overflow else "holds NaN or Inf")


def apply_sharded(
    x: torch.Tensor,
    amax: torch.Tensor,
    grid: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    group: int,
    name: str,
) -> None:
    """``cc.BlockAmax.apply`` of the symmetric format: ``amax`` is each element's global group amax.

    ``max |bf16(x)| = bf16(max |x|)`` (rounding is monotonic), so the fp32 amax the core reduced
    gives the bf16 statistic exactly. The core calls this only when shards cut groups, so the
    ``per_block`` scale and the ``replicated`` shape are whole on every rank: the global shape is the
    scale grid's with its last dim times the group size.
    """
    grid_b = grid.to(BF16).float()
    if not bool(torch.isfinite(grid_b).all()):  # the same reduced grid on every rank: all raise together
        raise non_finite_error(name, (*grid.shape[:-1], grid.shape[-1] * group), "overflows bfloat16")
    check_scales(symmetric_scale(grid_b), name, (*grid.shape[:-1], grid.shape[-1] * group))
    xb = x.to(BF16).float()
    q = quantize_values(xb, symmetric_scale(amax.to(BF16).float()), None)
    packed.copy_(pack_k(q))
    scale.copy_(symmetric_scale(grid_b).reshape(scale.shape))
    write_shape(shape_out, (*scale.shape[:-1], scale.shape[-1] * group))


def dequantize(
    packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor, zp: torch.Tensor | None, group: int
) -> torch.Tensor:
    """float32 ``(q - zp) * s`` of the unpacked shape (compressed-tensors ``_dequantize``, in float32)."""
    q = unpack_k(packed).float()
    s = scale.float().repeat_interleave(group, dim=-1)
    if zp is not None:
        z = unpack_rows(zp, packed.shape[-2]).float().repeat_interleave(group, dim=-1)
        q = q - z
    return (q * s).reshape(tuple(int(d) for d in shape.tolist()))
