"""The torch path of the MX quantizers: exact, chunked, runs on any device; it defines the bytes.

The source is viewed as rows of K elements (``(E*N, K)``, or one plane per expert when its
strides do not merge), cut into chunks of whole rows of about ``CHUNK_ELEMENTS``. Two passes:

1. every chunk's group abs-max, as an integer max over the sign-masked float bits (exact, and a
   NaN or Inf cannot hide in it), into a small ``(rows, K/32)`` buffer; then one NaN/Inf check
   over all groups, so a non-finite source raises before anything is written;
2. every chunk again: widen to float32, multiply by its groups' ``2**(127 - byte)``, clamp, round
   (:func:`.numerics.quantize_groups`), write values and scale bytes.

On CPU the chunks run on a few threads (:mod:`conversion_core.formats.cpu_chunks`); elsewhere
(the fallback when Triton is missing) the same code runs chunk after chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from conversion_core.formats.cpu_chunks import CHUNK_ELEMENTS, run_chunks, thread_scratch
from conversion_core.formats.e8m0 import MX_GROUP
from conversion_core.formats.fp4 import E2m1Scratch
from conversion_core.formats.fp8 import ABS_BITS, abs_bits_into

from .numerics import MxFormat, check_k, non_finite_error, quantize_groups, quantize_groups_into

# (plane, first row, end row)
_Task = tuple[int, int, int]


def _planes(
    src: torch.Tensor, q: torch.Tensor, s: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """2-D (source rows, value rows, scale rows): the whole stack when its strides merge."""
    x = src if src.dim() == 3 else src.unsqueeze(0)
    e, n, k = x.shape
    qv, sv = q.view(e, n, q.shape[-1]), s.view(e, n, s.shape[-1])
    try:
        return [(x.view(e * n, k), qv.view(e * n, -1), sv.view(e * n, -1))]
    except RuntimeError:  # strides that do not merge experts into rows: one plane per expert
        return [(x[i], qv[i], sv[i]) for i in range(e)]


def reference_quantize(src: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor, fmt: MxFormat) -> None:
    """The definition over a float32 copy of the whole tensor: group amax, NaN/Inf check, :func:`quantize_groups`.

    Kept as the eager formulation the chunked :func:`quantize` is timed and tested against.
    """
    check_k(fmt.name, tuple(src.shape))
    x = src.float().unflatten(-1, (-1, MX_GROUP))
    amax = x.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf
        raise non_finite_error(fmt.name, src.shape)
    quantize_groups(x, amax, q_out.view(*amax.shape, -1), s_out.view(amax.shape), fmt)


def quantize(src: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor, fmt: MxFormat) -> None:
    """Write the MX values into ``q_out`` and the E8M0 bytes into ``s_out`` (buffers checked by the core)."""
    check_k(fmt.name, tuple(src.shape))
    if src.numel() == 0:
        return
    planes = _planes(src, q_out, s_out)
    k = src.shape[-1]
    groups = k // MX_GROUP
    rows_per_chunk = max(1, CHUNK_ELEMENTS // k)
    tasks: list[_Task] = [
        (p, r0, min(r0 + rows_per_chunk, plane[0].shape[0]))
        for p, plane in enumerate(planes)
        for r0 in range(0, plane[0].shape[0], rows_per_chunk)
    ]
    int_dtype, _, inf_bits = ABS_BITS[src.dtype]
    amax_bits = [torch.empty(plane[0].shape[0], groups, dtype=int_dtype, device=src.device) for plane in planes]
    scratch_elements = min(rows_per_chunk, max(plane[0].shape[0] for plane in planes)) * k

    def group_amax(chunks: Iterable[_Task]) -> None:
        scratch = _scratch("mx.bits", scratch_elements, int_dtype, src.device)
        for p, r0, r1 in chunks:
            xs = planes[p][0][r0:r1]
            bits = abs_bits_into(xs, scratch[: xs.numel()].view(xs.shape))
            torch.amax(bits.view(r1 - r0, groups, MX_GROUP), dim=-1, out=amax_bits[p][r0:r1])

    _run(src, tasks, group_amax)
    if any(bool((bits >= inf_bits).any()) for bits in amax_bits):  # NaN sorts above Inf
        raise non_finite_error(fmt.name, src.shape)
    amax = [bits.view(src.dtype).float() for bits in amax_bits]

    cpu = src.device.type == "cpu"

    def group_quantize(chunks: Iterable[_Task]) -> None:
        scratch = _scratch("mx.f", scratch_elements, torch.float32, src.device)
        e2m1 = E2m1Scratch(scratch_elements, src.device) if cpu and fmt.per_byte == 2 else None
        for p, r0, r1 in chunks:
            xs, qs, ss = planes[p][0][r0:r1], planes[p][1][r0:r1], planes[p][2][r0:r1]
            f = scratch[: xs.numel()].view(xs.shape)
            f.copy_(xs)
            fg, qg = f.view(r1 - r0, groups, MX_GROUP), qs.view(r1 - r0, groups, -1)
            if cpu:
                quantize_groups_into(fg, amax[p][r0:r1], qg, ss, fmt, e2m1)
            else:
                quantize_groups(fg, amax[p][r0:r1], qg, ss, fmt)

    _run(src, tasks, group_quantize)


def _scratch(key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This CPU thread's kept buffer (no page faults per call), or a fresh one on other devices."""
    return thread_scratch(key, numel, dtype) if device.type == "cpu" else torch.empty(numel, dtype=dtype, device=device)


def _run(src: torch.Tensor, tasks: list[_Task], worker: Callable[[Iterable[_Task]], None]) -> None:
    if src.device.type == "cpu":
        run_chunks(tasks, worker)
    else:
        worker(tasks)
