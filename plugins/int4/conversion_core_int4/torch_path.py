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
"""

from __future__ import annotations

import torch

import conversion_core as cc

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


def quantize(
    src: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape_out: torch.Tensor,
    zp_out: torch.Tensor | None,
    group: int,
    name: str,
) -> None:
    """Write every output (the core checked the buffers); nothing is written when the source is refused."""
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
