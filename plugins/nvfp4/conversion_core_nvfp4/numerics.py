"""NVFP4 numerics: the exact torch path, every rounding as compressed-tensors 0.19 takes it.

For a weight ``(N, K)`` (or stacked experts ``(E, N, K)``), ``K`` a multiple of 16, and the amax
``A`` of its fused set (q/k/v, gate/up share one; see :mod:`conversion_core.formats.fused`):

1. **Global scale** (``weight_global_scale``, a divisor), from llm-compressor's
   ``Observer.get_global_scale`` -> compressed-tensors ``generate_gparam``: the observer's
   statistics are in the weight's dtype (bf16), so ``a = max(bf16(A), finfo(bf16).tiny)`` and
   ``gs = 448 * 6 / a`` is bf16 arithmetic. ``float / tensor`` is torch's ``__rtruediv__``,
   ``a.reciprocal() * 2688``: two bf16 roundings (``bf16(bf16(1 / a) * 2688)``; a plain
   ``bf16(2688 / a)`` differs for 13% of bf16 values). ``nan_to_num(posinf=1.0)`` then turns an
   overflow (an all-zero tensor, ``A < ~8e-36``) into 1.0. Stored as float32 ``(1,)``.
2. **Group scale** (``weight_scale``, e4m3, one per 16 elements along K), from
   ``calculate_qparams``: ``s = max_val_pos / (bit_range / 2)`` with ``bit_range = 12`` cast to
   the statistics' dtype, so ``s = bf16(amax_g / 6)``; then ``global_scale * s`` in float32 (exact:
   two 8-bit mantissas), ``round_to_quantized_type_dtype``: ``clamp(±448)`` and torch's e4m3 cast
   (round to nearest even); then ``_get_dtype_eps``: a scale that is 0 becomes 0.125 (zero groups,
   and groups whose scale underflows e4m3).
3. **Values** (``weight_packed``), from ``_quantize``: ``v = x / (s_e4m3 / gs)`` (two IEEE float32
   divisions), ``clamp(±6)``, ``FP4_E2M1_DATA.cast_to_fp4`` (round to nearest even on
   0, .5, 1, 1.5, 2, 3, 4, 6, value * ``sign(v)``), then ``pack_fp4_to_uint8``: the code is the
   magnitude's index, bit 3 the sign (``signbit`` of the rounded value: set for ``v < 0`` even when
   it rounds to 0, clear for ``-0.0`` since ``sign(-0.0) = 0``); element ``2j`` in the low nibble.

Every source dtype goes through the same bf16 statistics (bf16(amax) for fp16/fp32 sources), so
the bytes depend on the values only; llm-compressor run on an fp32 checkpoint would compute them
in fp32 instead (documented in the plugin README row).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from conversion_core.errors import ConversionInputError
from conversion_core.formats.cpu_chunks import run_chunks, thread_scratch
from conversion_core.formats.fp4 import E2m1Scratch
from conversion_core.formats.fp8 import ABS_BITS, abs_bits_into

GROUP = 16
FP4_MAX = 6.0
E4M3_MAX = 448.0
#: 448 * 6: maps a group at the tensor's amax onto the top of both grids.
GLOBAL_NUMERATOR = E4M3_MAX * FP4_MAX
#: compressed-tensors' ``_get_dtype_eps(float8_e4m3fn)``: what a zero group scale becomes.
ZERO_SCALE = 0.125
BF16_TINY = torch.finfo(torch.bfloat16).tiny
#: Rows of a (rows, K) view converted per chunk: about 1M elements of float32 scratch.
CHUNK_ELEMENTS = 1 << 20


def non_finite_error(conversion: str, shape: torch.Size | tuple[int, ...]) -> ConversionInputError:
    return ConversionInputError(
        f"conversion {conversion!r}: source tensor of shape {tuple(shape)} holds NaN or Inf; "
        "refusing to write NVFP4 bytes (fix the weights, e.g. check the training step for divergence)"
    )


def check_k(conversion: str, shape: tuple[int, ...]) -> None:
    """K must be a whole number of 16-groups (compressed-tensors' ``_process_group`` refuses the rest)."""
    if len(shape) < 2 or shape[-1] % GROUP:
        raise ConversionInputError(
            f"conversion {conversion!r}: source of shape {tuple(shape)} has K = {shape[-1] if shape else None}; "
            f"NVFP4 needs K (the last dim) to be a multiple of {GROUP} (keep this tensor unquantized)"
        )


def tensor_amax(src: torch.Tensor) -> torch.Tensor:
    """float32 ``(1,)`` max |x| of the whole tensor; NaN when it holds a NaN, Inf for an Inf.

    On CPU an integer max over the sign-masked bits, chunk by chunk (they order like ``|x|``, NaN
    above Inf): the same value with no full-size ``abs`` copy.
    """
    if src.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=src.device)
    if src.device.type != "cpu" or src.dtype not in ABS_BITS or src.dim() < 1:
        return src.abs().amax().float().reshape(1)  # amax propagates NaN
    x = src.reshape(-1, src.shape[-1]) if src.dim() > 1 else src.reshape(1, -1)
    rows = max(1, CHUNK_ELEMENTS // max(x.shape[1], 1))
    tasks = [(r, min(r + rows, x.shape[0])) for r in range(0, x.shape[0], rows)]
    maxima = torch.zeros(len(tasks), dtype=ABS_BITS[src.dtype][0])

    def worker(chunks: Iterable[tuple[int, int]]) -> None:
        bits = thread_scratch("nvfp4.amax", min(rows, x.shape[0]) * x.shape[1], maxima.dtype)
        for a, b in chunks:
            xs = x[a:b]
            maxima[a // rows] = abs_bits_into(xs, bits[: xs.numel()].view(xs.shape)).amax()

    run_chunks(tasks, worker)
    return maxima.amax().view(src.dtype).float().reshape(1)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 divisor ``gs`` from a float32 amax (any shape): step 1 of the module docstring."""
    a = torch.clamp(amax.to(torch.bfloat16), min=BF16_TINY)
    g = a.reciprocal() * GLOBAL_NUMERATOR  # torch's own bf16 ops: two roundings, as in generate_gparam
    g = torch.where(torch.isinf(g), torch.ones_like(g), g)
    return g.float()


def group_scales(group_amax: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """float32 values of the e4m3 group scales (exact in e4m3) from float32 group amaxes: step 2."""
    s = group_amax.to(torch.bfloat16) / torch.tensor(FP4_MAX, dtype=torch.bfloat16, device=group_amax.device)
    s = (gs * s.float()).clamp_(-E4M3_MAX, E4M3_MAX)
    s = s.to(torch.float8_e4m3fn).float()
    return torch.where(s == 0, torch.full_like(s, ZERO_SCALE), s)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes of float32 ``v`` (already clamped to ±6): round to nearest even, sign ``v < 0``.

    The thresholds are the midpoints of 0, .5, 1, 1.5, 2, 3, 4, 6; a midpoint goes to the even
    code (0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
    """
    a = v.abs()
    code = (a > 0.25).to(torch.uint8)
    for bound, inclusive in ((0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
        code += (a >= bound) if inclusive else (a > bound)
    return code | ((v < 0).to(torch.uint8) << 3)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim, element ``2j`` in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def quantize_rows(x: torch.Tensor, gs: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> bool:
    """One chunk ``x (rows, K)`` (any float dtype) -> ``packed (rows, K/2)`` uint8, ``scales (rows, K/16)`` e4m3.

    Returns False when the chunk holds NaN or Inf (its bytes are then garbage: the caller raises).
    """
    g = x.float().unflatten(-1, (-1, GROUP))
    group_amax = g.abs().amax(dim=-1)
    finite = bool(torch.isfinite(group_amax).all()) if group_amax.numel() else True
    s = group_scales(group_amax, gs)
    v = torch.div(g, torch.div(s, gs).unsqueeze(-1)).clamp_(-FP4_MAX, FP4_MAX)
    packed.copy_(pack_codes(e2m1_codes(v).flatten(-2)))
    scales.copy_(s.to(torch.float8_e4m3fn))
    return finite


class _RowScratch:
    """One CPU worker's buffers for :meth:`quantize_rows`: the same bytes as :func:`quantize_rows`.

    Group amax as an integer max over the sign-masked source bits (exact; NaN/Inf sort above every
    finite value, so a non-finite chunk returns before writing), the values divided in place in a
    float32 scratch (the same two IEEE divisions), e2m1 through :class:`E2m1Scratch` (no ``where``
    or comparisons; equal to :func:`e2m1_codes` on every float32 input, see its tests).
    """

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self.f = thread_scratch("nvfp4.f", numel, torch.float32)
        self.bits = thread_scratch("nvfp4.bits", numel, ABS_BITS[dtype][0])
        self.e2m1 = E2m1Scratch(numel)
        self.inf_bits = ABS_BITS[dtype][2]

    def quantize_rows(self, x: torch.Tensor, gs: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> bool:
        rows, k = x.shape
        groups = k // GROUP
        bits = abs_bits_into(x, self.bits[: x.numel()].view(x.shape)).view(rows, groups, GROUP).amax(dim=-1)
        if bool((bits >= self.inf_bits).any()):
            return False
        s = group_scales(bits.view(x.dtype).float(), gs)
        v = self.f[: x.numel()].view(rows, groups, GROUP)
        v.copy_(x.view(rows, groups, GROUP)).div_(torch.div(s, gs).unsqueeze(-1))
        self.e2m1.pack_into(v, packed.view(rows, groups, GROUP // 2))
        scales.copy_(s.to(torch.float8_e4m3fn))
        return True


def quantize_with_amax(
    src: torch.Tensor, amax: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, conversion: str
) -> torch.Tensor:
    """Write ``packed`` and ``scales`` of ``src`` given its set's float32 amax; returns ``gs`` (float32 (1,)).

    Chunked over rows: float32 scratch stays cache-sized whatever the tensor's size. A NaN/Inf in
    ``amax`` or in ``src`` raises (after writing: callers own the buffers and publish nothing).
    """
    if not bool(torch.isfinite(amax).all()):
        raise non_finite_error(conversion, src.shape)
    gs = global_scale(amax.reshape(1))
    k = src.shape[-1]
    x = src.reshape(-1, k) if src.numel() else src.reshape(0, k)
    p = packed.view(-1, k // 2)
    s = scales.view(-1, k // GROUP)
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    tasks = [(r, min(r + rows, x.shape[0])) for r in range(0, x.shape[0], rows)]

    bad: list[tuple[int, int]] = []
    fast = x.device.type == "cpu" and x.dtype in ABS_BITS and x.numel() > 0

    def worker(chunks: Iterable[tuple[int, int]]) -> None:
        scratch = _RowScratch(min(rows, x.shape[0]) * k, x.dtype) if fast else None
        for a, b in chunks:
            if scratch is not None:
                ok = scratch.quantize_rows(x[a:b], gs, p[a:b], s[a:b])
            else:
                ok = quantize_rows(x[a:b], gs, p[a:b], s[a:b])
            if not ok:
                bad.append((a, b))

    run_chunks(tasks, worker)
    if bad:
        raise non_finite_error(conversion, src.shape)
    return gs


def reference_quantize_with_amax(
    src: torch.Tensor, amax: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, conversion: str
) -> torch.Tensor:
    """:func:`quantize_with_amax` as one eager :func:`quantize_rows` over the whole tensor (float32 copies).

    Kept as the plain formulation the chunked path is timed and tested against; returns ``gs``.
    """
    if not bool(torch.isfinite(amax).all()):
        raise non_finite_error(conversion, src.shape)
    gs = global_scale(amax.reshape(1))
    k = src.shape[-1]
    if not quantize_rows(src.reshape(-1, k), gs, packed.view(-1, k // 2), scales.view(-1, k // GROUP)):
        raise non_finite_error(conversion, src.shape)
    return gs


def dequantize(packed: torch.Tensor, scales: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """float32 ``e2m1 * (scale / gs)``: what compressed-tensors' ``_dequantize`` computes (in float32)."""
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()
    values = table[codes & 7] * torch.where((codes & 8) > 0, -1.0, 1.0)
    step = scales.float() / gs.float().reshape(-1)[0]
    return (values.unflatten(-1, (-1, GROUP)) * step.unsqueeze(-1)).flatten(-2)
