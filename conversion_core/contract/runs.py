"""What a plan hands a ``launch_group``: calls whose buffers and source shapes stay fixed.

A step whose sources sit at new addresses every step (after an FSDP all-gather) is made of host
work per tensor: a per-expert MoE state dict holds ~10k of them. Of a plan's calls only the
sources change from step to step: the buffers are the plan's, allocated once, and every source
was validated to the shape and dtype the plan expects. So the plan hands its grouped launches a
:class:`SourceRun`, a plain sequence of ``(src, *buffers)`` to any plugin, over a
:class:`RunLayout` built once: the calls' buffers and their grouping by source shape and dtype.
A helper building a launch's tables (``conversion_core.formats.group_table``) then reads of each
source only its address and strides, and may keep what it derives from the layout in
:attr:`RunLayout.derived`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import torch


class RunLayout:
    """The fixed part of a run of calls: each call's buffers (every call the same count), and the
    calls grouped by their sources' shape and dtype (:attr:`groups`: ``(shape, dtype, indices)``)."""

    def __init__(
        self,
        buffers: Sequence[tuple[torch.Tensor, ...]],
        shapes: Sequence[tuple[int, ...]],
        dtypes: Sequence[torch.dtype],
    ):
        if not len(buffers) == len(shapes) == len(dtypes):
            raise ValueError(
                f"a run layout needs one shape and dtype per call: {len(buffers)} calls, "
                f"{len(shapes)} shapes, {len(dtypes)} dtypes"
            )
        self.buffers = list(buffers)
        by_key: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = {}
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True)):
            by_key.setdefault((tuple(shape), dtype), []).append(i)
        self.groups = [(shape, dtype, indices) for (shape, dtype), indices in by_key.items()]
        #: What helpers derive from the layout once (keyed by the helper), e.g. buffer addresses.
        self.derived: dict[str, Any] = {}


class SourceRun(Sequence[tuple[Any, ...]]):
    """A step's calls ``(src, *buffers)`` over a :class:`RunLayout`: this step's sources, the
    layout's buffers. Whoever builds one (a plan) has checked every source to its layout's shape
    and dtype; its tuples are built only when read."""

    def __init__(self, sources: Sequence[torch.Tensor], layout: RunLayout):
        if len(sources) != len(layout.buffers):
            raise ValueError(f"{len(sources)} sources for a run layout of {len(layout.buffers)} calls")
        self.sources = sources
        self.layout = layout

    def __len__(self) -> int:
        return len(self.sources)

    @overload
    def __getitem__(self, i: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, i: slice) -> list[tuple[Any, ...]]: ...

    def __getitem__(self, i: int | slice) -> tuple[Any, ...] | list[tuple[Any, ...]]:
        if isinstance(i, slice):
            return [(s, *b) for s, b in zip(self.sources[i], self.layout.buffers[i], strict=True)]
        return (self.sources[i], *self.layout.buffers[i])


__all__ = ["RunLayout", "SourceRun"]
