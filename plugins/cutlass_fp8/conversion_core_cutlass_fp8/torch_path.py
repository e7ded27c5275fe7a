"""The torch path of the per-channel quantizer: runs on any device, defines the bytes.

``reference_quantize_rows`` is the definition: one vectorised formulation over float32 copies of
the whole tensor. On CPU, ``quantize_rows`` writes the same bytes in chunks of whole rows on a few
threads, with no full-size temporary:

1. every row's abs-max, as an integer max over the sign-masked float bits (exact, and NaN or Inf
   cannot hide in it), into a small ``(E*N,)`` buffer;
2. NaN/Inf check and ``scale_from_amax`` over all rows at once;
3. every chunk again: widen to float32 scratch, divide by its rows' scales, cast (no clamp pass:
   every ``|x|`` is at most its row's amax, so the quotient cannot leave the range the clamp
   keeps; ``conversion_core.formats.fp8.UNCLAMPED_BOUND`` says why the bytes are the same).

A non-finite source raises in step 2, before anything is written: ``out`` and ``scale_out`` are
left untouched, as with the reference. Other devices (the fallback when Triton is missing) run
the reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from conversion_core.formats.cpu_chunks import CHUNK_ELEMENTS, run_chunks
from conversion_core.formats.fp8 import (
    ABS_BITS,
    abs_bits_into,
    amax_from_abs_bits,
    non_finite_error,
    quantize_chunk_into,
    quantize_into,
    scale_from_amax,
)

# (plane, first row, end row, the plane's global index of its first row)
_Task = tuple[int, int, int, int]


def reference_quantize_rows(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, name: str) -> None:
    """Write e4m3 bytes into ``out`` and one float32 scale per row into ``scale_out``."""
    x = src.float()
    amax = x.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf
        raise non_finite_error(name, src.shape)
    scale = scale_from_amax(amax)
    quantize_into(x, scale.unsqueeze(-1), out)
    scale_out.copy_(scale)


def quantize_rows(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, name: str) -> None:
    """Write e4m3 bytes into ``out`` and one float32 scale per row into ``scale_out``."""
    if src.device.type != "cpu" or src.dtype not in ABS_BITS or src.numel() == 0:
        reference_quantize_rows(src, out, scale_out, name)
        return
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    planes = _planes(x, out.view(e, n, k))
    rows_per_chunk = max(1, CHUNK_ELEMENTS // k)
    tasks: list[_Task] = [
        (p, r0, min(xp.shape[0], r0 + rows_per_chunk), first)
        for p, (xp, _, first) in enumerate(planes)
        for r0 in range(0, xp.shape[0], rows_per_chunk)
    ]
    scratch_elements = min(rows_per_chunk, planes[0][0].shape[0]) * k
    int_dtype = ABS_BITS[src.dtype][0]
    amax_bits = torch.empty(e * n, dtype=int_dtype)

    def row_amax(chunks: Iterable[_Task]) -> None:
        bits_scratch = torch.empty(scratch_elements, dtype=int_dtype)
        for p, r0, r1, first in chunks:
            xs = planes[p][0][r0:r1]
            bits = abs_bits_into(xs, bits_scratch[: xs.numel()].view(xs.shape))
            torch.amax(bits, dim=1, out=amax_bits[first + r0 : first + r1])

    run_chunks(tasks, row_amax)
    scale = scale_from_amax(amax_from_abs_bits(amax_bits, src.dtype, name, src.shape))

    def row_quantize(chunks: Iterable[_Task]) -> None:
        scratch = torch.empty(scratch_elements, dtype=torch.float32)
        for p, r0, r1, first in chunks:
            xs, qs = planes[p][0][r0:r1], planes[p][1][r0:r1]
            s = scale[first + r0 : first + r1].unsqueeze(1)
            quantize_chunk_into(xs, s, scratch[: xs.numel()].view(xs.shape), qs, clamp=False)

    run_chunks(tasks, row_quantize)
    scale_out.view(e * n).copy_(scale)


def _planes(x: torch.Tensor, q: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """2-D (source, out, global index of the first row) pieces: the whole stack when strides allow."""
    e, n, k = x.shape
    try:
        return [(x.view(e * n, k), q.view(e * n, k), 0)]
    except RuntimeError:  # strides that do not merge experts into rows: one plane per expert
        return [(x[i], q[i], i * n) for i in range(e)]
