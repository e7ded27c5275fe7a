"""The calls of a plan's step: which source rows go into which output buffers.

Shared by the local step and the sharded (DTensor) one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..contract import all_finite
from ..errors import ConversionInputError
from . import geometry
from .decide import PlanEntry


@dataclass(frozen=True)
class Call:
    """One call of a conversion: the source rows it reads (``()``: all) and the buffers it writes
    (in the conversion's calling order, ``(out, None)`` for a scale-less short form)."""

    name: str
    index: tuple[Any, ...]
    buffers: tuple[Any, ...]
    #: (staging, strided view) pairs copied after the call (sharded fused pieces).
    copies: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()


def entry_calls(e: PlanEntry, tensors: Sequence[Any]) -> list[Call]:
    """The calls that fill entry ``e``'s outputs ``tensors`` (one per output, buffer shapes)."""
    c = e.conversion
    if e.shards is None or len(e.shards) == 1 or geometry.shards_align(c, e.src_shape, e.shards):
        return [Call(e.name, (), c.calling(tensors))]  # one call writes the same bytes as one per shard
    return [
        Call(e.name, index, c.calling(views))
        for index, views in geometry.shard_views(c, e.src_shape, e.shards, tensors)
    ]


def non_finite_output(name: str, src: torch.Tensor, out: torch.Tensor) -> ConversionInputError:
    """A copy or cast wrote a NaN or Inf: from its source, or finite values beyond ``out``'s range."""
    if not all_finite(src):
        return non_finite_source(name, src)
    return ConversionInputError(
        f"tensor {name!r} of shape {tuple(src.shape)} holds finite values beyond {out.dtype}'s range, which "
        "became Inf; refusing to write it"
    )


def non_finite_source(name: str, src: torch.Tensor) -> ConversionInputError:
    return ConversionInputError(
        f"tensor {name!r} of shape {tuple(src.shape)} holds NaN or Inf; refusing to write it "
        "(kept and cast tensors are checked like quantized ones)"
    )
