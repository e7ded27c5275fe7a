"""Device tables for grouped launches: one kernel launch converts a run of same-shaped tensors.

A step whose sources sit at new addresses every step (after an FSDP all-gather) cannot replay a
CUDA graph, and one launch per tensor costs ~35 µs of host time each: thousands per step. A
grouped kernel instead reads, per program, which tensor it works on from a small int64 table:
element offsets of the source and of every buffer from the group's first item (so the kernel
does plain pointer arithmetic on typed pointers, no integer-to-pointer casts), and the source's
strides. Tensors are grouped by source shape, dtype and whether K is contiguous, so every
program of a launch sees one geometry and the kernels keep their compile-time specialisations.

Inside a CUDA-graph capture a table cannot be copied to the device: the plan captures a segment
inside a :func:`conversion_core.contract.capture.session`, after one eager run of the same calls,
and :func:`groups` then returns the groups (and device tables) that run built, kept by the session
as long as the graph. Outside a session nothing is kept (sources moving every step never pay for it).

Format-free: the FP8 plugins' kernels use it, and any plugin's ``launch_group`` may.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from conversion_core.contract import capture

#: The most tensors one launch takes (a CUDA grid's second dimension holds 65535 programs).
MAX_GROUP = 65535
#: Alignment, in elements, that lets a kernel promise vectorised loads and stores
#: (``tl.multiple_of``): every offset and every source stride but the last a multiple of it.
ALIGN_ELEMENTS = 16


@dataclass(frozen=True)
class Group:
    """Same-shaped calls converted by one launch.

    ``bases``: the first call's source and buffers (the kernel's typed pointers); ``table``: int64
    ``(len(calls), len(bases) + 3)`` on the calls' device, per call the element offsets of its
    source and buffers from ``bases``, then the source's strides ``(stride_e, stride_n, stride_k)``
    of its ``(E, N, K)`` view; ``aligned``: every offset and ``stride_e``/``stride_n`` a multiple
    of :data:`ALIGN_ELEMENTS` and every base 16-byte aligned; ``contiguous_k``: ``stride_k == 1``.
    """

    shape: tuple[int, int, int]
    calls: Sequence[tuple[Any, ...]]
    bases: tuple[torch.Tensor, ...]
    table: torch.Tensor
    aligned: bool
    contiguous_k: bool


def groups(calls: Sequence[tuple[Any, ...]], max_group: int = MAX_GROUP) -> list[Group]:
    """Split ``calls`` (``(src, *buffers)``, one device, no ``None`` buffer) into launchable groups.

    Inside a capture session: built (and kept) by the eager run, found again by the capture.
    """
    session = capture.current()
    capturing = _capturing(calls)
    if session is None:
        if capturing:
            raise RuntimeError(
                "grouped launch inside a CUDA graph capture that is not a plan's capture session: its device "
                "tables cannot be copied during a capture (see conversion_core.contract.capture)"
            )
        return _build(calls, max_group)
    key = ("group_table", max_group, *(tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in c) for c in calls))
    if not capturing:
        return session.keep(key, lambda: _build(calls, max_group))  # type: ignore[no-any-return]
    built = session.find(key)
    if built is None:
        raise RuntimeError(
            f"grouped launch of {len(calls)} tensors captured in a CUDA graph without an eager launch of the "
            "same tensors in the same capture session first (it builds the device tables the graph reads)"
        )
    return built  # type: ignore[no-any-return]


def _capturing(calls: Sequence[tuple[Any, ...]]) -> bool:
    """True while the current CUDA stream is being captured into a graph (calls on a CUDA device)."""
    return bool(calls) and calls[0][0].is_cuda and torch.cuda.is_current_stream_capturing()


def _build(calls: Sequence[tuple[Any, ...]], max_group: int) -> list[Group]:
    """One pass over the calls gathers, per group key, the calls and the ints of their table rows
    (every tensor's address, then the source's ``(E, N, K)`` strides) in an ``array`` of int64;
    each group's table is then that buffer as a tensor and a few whole-table ops (:func:`_group`)."""
    by_key: dict[tuple[Any, ...], tuple[list[tuple[Any, ...]], array[int]]] = {}
    address = torch.Tensor.data_ptr
    for call in calls:
        src = call[0]
        stride = src.stride()
        key = (src.shape, src.dtype, stride[-1] == 1)
        found = by_key.get(key)
        if found is None:
            found = by_key[key] = ([], array("q"))
        found[0].append(call)
        ints = found[1]
        ints.extend(map(address, call))
        if len(stride) == 2:
            ints.append(0)
        ints.extend(stride)
    out: list[Group] = []
    for members, ints in by_key.values():
        row = len(ints) // len(members)
        if len(members) <= max_group:
            out.append(_group(members, ints))
            continue
        for start in range(0, len(members), max_group):
            out.append(_group(members[start : start + max_group], ints[start * row : (start + max_group) * row]))
    return out


def _group(calls: Sequence[tuple[Any, ...]], ints: array[int]) -> Group:
    first = calls[0]
    bases = tuple(first)
    width = len(bases)
    table = torch.frombuffer(ints, dtype=torch.int64).view(len(calls), width + 3)  # shares ``ints``
    sizes = torch.tensor([t.element_size() for t in bases], dtype=torch.int64)
    delta = table[:, :width] - table[0, :width]
    if bool((delta % sizes).any()):  # only a misaligned view (frombuffer at an odd address) does this
        raise ValueError("grouped launch: a tensor's address is not a multiple of its element size")
    table[:, :width] = delta // sizes
    aligned = bool((table[:, : width + 2] % ALIGN_ELEMENTS == 0).all()) and all(ints[i] % 16 == 0 for i in range(width))
    src = first[0]
    shape3 = tuple(src.shape) if src.dim() == 3 else (1, *src.shape)
    device_table = table
    if src.device.type == "cuda":  # staged in pinned memory: the copy is queued, the host goes on
        device_table = table.pin_memory().to(src.device, non_blocking=True)
    elif src.device.type != "cpu":
        device_table = table.to(src.device)
    return Group(
        shape=shape3,  # type: ignore[arg-type]
        calls=calls,
        bases=bases,
        table=device_table,
        aligned=aligned,
        contiguous_k=src.stride(-1) == 1,
    )


__all__ = ["ALIGN_ELEMENTS", "MAX_GROUP", "Group", "groups"]
