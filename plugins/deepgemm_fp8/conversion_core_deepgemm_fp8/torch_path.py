"""The torch path of the 128x128 block quantizer: runs on any device, defines the bytes.

``reference_quantize_blocks`` is the definition: one vectorised formulation over float32 copies of
the whole tensor. On CPU, ``quantize_blocks`` writes the same bytes chunk by chunk (bands of 128
rows, split by columns when a band is large) on a few threads, with no full-size temporary:

1. every chunk's block abs-max, as an integer max over the sign-masked float bits (exact, and NaN
   or Inf cannot hide in it), into a small ``(E*ceil(N/128), ceil(K/128))`` buffer;
2. NaN/Inf check and the scale step (``scale_fn``, default ``scale_from_amax``) over all blocks at once;
3. every chunk again: widen to float32 scratch, divide by its blocks' scales, clamp, cast (the
   clamp pass is skipped for the default ``scale_from_amax``, whose quotients stay in range:
   ``conversion_core.formats.fp8.UNCLAMPED_BOUND``; another ``scale_fn`` keeps it).

A non-finite source raises in step 2, before anything is written: ``out`` and ``scale_out`` are
left untouched, as with the reference. Other devices (the fallback when Triton is missing) run
the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

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

# (plane, first row, end row, first column, end column, the plane's global index of the first band)
_Task = tuple[int, int, int, int, int, int]

#: float32 block amax (any shape) -> float32 dequantization scale (same shape): the one step in
#: which block formats differ (``scale_from_amax`` for plain float32 scales, a power-of-two
#: rounding for UE8M0 scales); everything else (amax, NaN check, division, clamp, cast) is shared.
ScaleFn = Callable[[torch.Tensor], torch.Tensor]


def reference_quantize_blocks(
    src: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    block: tuple[int, int],
    name: str,
    scale_fn: ScaleFn = scale_from_amax,
) -> None:
    """Write e4m3 bytes into ``out`` and per-block float32 scales (``scale_fn(amax)``) into ``scale_out``."""
    x = src.reshape(-1, *src.shape[-2:]).float()  # (E, N, K); a copy for non-float32 sources
    e, n, k = x.shape
    br, bc = block
    nb, kb = -(-n // br), -(-k // bc)
    padded = F.pad(x.abs(), (0, kb * bc - k, 0, nb * br - n))  # zeros never raise a block's amax
    amax = padded.view(e, nb, br, kb, bc).amax(dim=(2, 4))
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf
        raise non_finite_error(name, src.shape)
    scale = scale_fn(amax)
    full = scale.repeat_interleave(br, dim=1).repeat_interleave(bc, dim=2)[:, :n, :k]
    quantize_into(x, full, out.view(e, n, k))
    scale_out.view(e, nb, kb).copy_(scale)


def quantize_blocks(
    src: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    block: tuple[int, int],
    name: str,
    scale_fn: ScaleFn = scale_from_amax,
) -> None:
    """Write e4m3 bytes into ``out`` and per-block float32 scales (``scale_fn(amax)``) into ``scale_out``."""
    if src.device.type != "cpu" or src.dtype not in ABS_BITS or src.numel() == 0:
        reference_quantize_blocks(src, out, scale_out, block, name, scale_fn)
        return
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    br, bc = block
    nb, kb = -(-n // br), -(-k // bc)
    planes = _planes(x, out.view(e, n, k), br)
    tasks = _tasks(planes, k, block)
    scratch_elements = max((r1 - r0) * (c1 - c0) for _, r0, r1, c0, c1, _ in tasks)
    int_dtype = ABS_BITS[src.dtype][0]
    amax_bits = torch.empty(e * nb, kb, dtype=int_dtype)

    def block_amax(chunks: Iterable[_Task]) -> None:
        bits_scratch = torch.empty(scratch_elements, dtype=int_dtype)
        for p, r0, r1, c0, c1, band in chunks:
            xs = planes[p][0][r0:r1, c0:c1]
            rows, cols = xs.shape
            bands, kblocks = -(-rows // br), -(-cols // bc)
            bits = abs_bits_into(xs, bits_scratch[: rows * cols].view(rows, cols))
            if bands == 1:
                col_max = bits.amax(dim=0, keepdim=True)
            else:  # only full bands are grouped
                col_max = bits.view(bands, br, cols).amax(dim=1)
            if cols % bc:
                col_max = F.pad(col_max, (0, kblocks * bc - cols))  # zeros never raise a block's amax
            k0 = c0 // bc
            torch.amax(col_max.view(bands, kblocks, bc), dim=-1, out=amax_bits[band : band + bands, k0 : k0 + kblocks])

    run_chunks(tasks, block_amax)
    scale = scale_fn(amax_from_abs_bits(amax_bits, src.dtype, name, src.shape))
    clamp = scale_fn is not scale_from_amax

    def block_quantize(chunks: Iterable[_Task]) -> None:
        scratch = torch.empty(scratch_elements, dtype=torch.float32)
        for p, r0, r1, c0, c1, band in chunks:
            xs, qs = planes[p][0][r0:r1, c0:c1], planes[p][1][r0:r1, c0:c1]
            rows, cols = xs.shape
            bands, kblocks = -(-rows // br), -(-cols // bc)
            s = scale[band : band + bands, c0 // bc : c0 // bc + kblocks]
            f = scratch[: rows * cols]
            shape: tuple[int, ...]
            if cols % bc == 0:  # (bands, rows per band, blocks, block columns) / (bands, 1, blocks, 1)
                shape = (bands, rows // bands, kblocks, bc)
                s = s.view(bands, 1, kblocks, 1)
            else:  # a ragged last column chunk: one scale per column
                shape = (bands, rows // bands, cols)
                s = s.repeat_interleave(bc, dim=-1)[:, :cols].unsqueeze(1)
            quantize_chunk_into(xs.view(shape), s, f.view(shape), qs.view(shape), clamp)

    run_chunks(tasks, block_quantize)
    scale_out.view(e * nb, kb).copy_(scale)


def _planes(x: torch.Tensor, q: torch.Tensor, br: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """2-D (source, out, first global band) pieces: the whole stack when bands align with experts."""
    e, n, k = x.shape
    if n % br == 0:
        try:
            return [(x.view(e * n, k), q.view(e * n, k), 0)]
        except RuntimeError:  # strides that do not merge experts into rows: one plane per expert
            pass
    nb = -(-n // br)
    return [(x[i], q[i], i * nb) for i in range(e)]


def _tasks(planes: list[tuple[torch.Tensor, torch.Tensor, int]], k: int, block: tuple[int, int]) -> list[_Task]:
    """Chunks of about CHUNK_ELEMENTS: whole bands grouped, or one band split by columns."""
    br, bc = block
    if br * k <= CHUNK_ELEMENTS:
        group, cols = max(1, CHUNK_ELEMENTS // (br * k)), k
    else:
        group, cols = 1, max(bc, CHUNK_ELEMENTS // br // bc * bc)
    tasks: list[_Task] = []
    for p, (xp, _, first_band) in enumerate(planes):
        rows = xp.shape[0]
        full = rows // br
        for b0 in range(0, full, group):
            b1 = min(full, b0 + group)
            tasks += [(p, b0 * br, b1 * br, c0, min(k, c0 + cols), first_band + b0) for c0 in range(0, k, cols)]
        if rows % br:  # the ragged last band, alone
            tasks += [(p, full * br, rows, c0, min(k, c0 + cols), first_band + full) for c0 in range(0, k, cols)]
    return tasks
