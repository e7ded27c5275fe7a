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

A plan hands its launches a :class:`conversion_core.contract.runs.SourceRun`: calls whose
buffers (the plan's, allocated once) and sources' shapes and dtypes (validated every step) are
fixed. The grouping and the buffers' address columns are then worked out once per layout, and a
step reads of each source only its address and strides, in C-level passes.

Format-free: the FP8 plugins' kernels use it, and any plugin's ``launch_group`` may.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, overload

import torch

from conversion_core.contract import capture
from conversion_core.contract.runs import SourceRun

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
        if isinstance(calls, SourceRun):
            return _build_run(calls, max_group)
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
        table = torch.frombuffer(ints, dtype=torch.int64).view(len(members), -1)  # shares ``ints``
        out.extend(_split(members, table, max_group))
    return out


def _split(calls: Sequence[tuple[Any, ...]], table: torch.Tensor, max_group: int) -> list[Group]:
    """Groups of at most ``max_group`` calls, from one run's table of absolute addresses."""
    if len(calls) <= max_group:
        return [_group(calls, table)]
    return [_group(calls[a : a + max_group], table[a : a + max_group]) for a in range(0, len(calls), max_group)]


def _group(calls: Sequence[tuple[Any, ...]], table: torch.Tensor) -> Group:
    """``table``: per call the absolute addresses of its tensors, then its source's ``(E, N, K)``
    strides; rewritten in place into element offsets from the first call's tensors."""
    first = calls[0]
    bases = tuple(first)
    width = len(bases)
    sizes = torch.tensor([t.element_size() for t in bases], dtype=torch.int64)
    based = bool((table[0, :width] % 16 == 0).all())
    delta = table[:, :width] - table[0, :width]
    if bool((delta % sizes).any()):  # only a misaligned view (frombuffer at an odd address) does this
        raise ValueError("grouped launch: a tensor's address is not a multiple of its element size")
    table[:, :width] = delta // sizes
    aligned = based and bool((table[:, : width + 2] % ALIGN_ELEMENTS == 0).all())
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


def _build_run(run: SourceRun, max_group: int) -> list[Group]:
    """:func:`_build` for a :class:`SourceRun`: per group of its layout, the sources' addresses and
    strides in two C-level passes beside the buffers' address columns (read once per layout). A
    group whose sources disagree on whether K is contiguous (a kernel specialisation) is split
    the way :func:`_build` splits it."""
    columns = run.layout.derived.get("group_table")
    if columns is None:
        columns = [_buffer_columns(run, indices) for *_, indices in run.layout.groups]
        run.layout.derived["group_table"] = columns
    address, strides_of = torch.Tensor.data_ptr, torch.Tensor.stride
    out: list[Group] = []
    for (shape, _, indices), buffer_columns in zip(run.layout.groups, columns, strict=True):
        if len(shape) not in (2, 3):
            raise ValueError(f"grouped launch: sources must be 2-D or 3-D, got shape {shape}")
        sources = [run.sources[i] for i in indices]
        strides = torch.frombuffer(array("q", chain.from_iterable(map(strides_of, sources))), dtype=torch.int64)
        strides = strides.view(len(indices), len(shape))
        inner = strides[:, -1] == 1
        if bool(inner.any()) and not bool(inner.all()):  # mixed: grouped by that too
            out.extend(_build(_Picked(run, indices), max_group))
            continue
        width = 1 + buffer_columns.shape[1]
        table = torch.empty(len(indices), width + 3, dtype=torch.int64)
        table[:, 0] = torch.frombuffer(array("q", map(address, sources)), dtype=torch.int64)
        table[:, 1:width] = buffer_columns
        if len(shape) == 2:
            table[:, width] = 0
        table[:, width + 3 - len(shape) :] = strides
        out.extend(_split(_Picked(run, indices), table, max_group))
    return out


def _buffer_columns(run: SourceRun, indices: Sequence[int]) -> torch.Tensor:
    """``(len(indices), buffers)`` int64: the absolute addresses of those calls' buffers."""
    buffers = run.layout.buffers
    ints = array("q", (t.data_ptr() for i in indices for t in buffers[i]))
    return torch.frombuffer(ints, dtype=torch.int64).view(len(indices), len(buffers[indices[0]]))


class _Picked(Sequence[tuple[Any, ...]]):
    """Some calls of a :class:`SourceRun`, by index, built as tuples only when read (a kernel
    launch reads ``len`` and the first call)."""

    def __init__(self, run: SourceRun, indices: Sequence[int]):
        self.run, self.indices = run, indices

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, i: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, i: slice) -> _Picked: ...

    def __getitem__(self, i: int | slice) -> tuple[Any, ...] | _Picked:
        if isinstance(i, slice):
            return _Picked(self.run, self.indices[i])
        return self.run[self.indices[i]]


__all__ = ["ALIGN_ELEMENTS", "MAX_GROUP", "Group", "groups"]
