"""Buckets: a plan's outputs cut into groups of bounded size, laid out as one byte buffer each.

A weight sync sends a step's outputs bucket by bucket, so the trainer never holds more than a
bucket or two of converted bytes (not a whole converted model). A bucket holds whole source
tensors (every output of a tensor together: one conversion call writes them), in plan order;
a tensor whose outputs alone exceed the bucket size gets a bucket of its own, so the bound is
``max(bucket_bytes, largest tensor's outputs)``. Within a bucket each output sits at an offset
aligned to :data:`~conversion_core.plan.arena.ALIGN`, exactly as a plan over the bucket's tensors
carves its arena, so that arena is the payload itself when the outputs are local (no packing copy).
Sender and receiver agree on the layout through :func:`layout_to_json` / :func:`layout_from_json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConversionInputError
from .arena import ALIGN, nbytes
from .local import Plan


@dataclass(frozen=True)
class Slot:
    """One output inside a bucket's payload."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    index: int
    #: Source tensors converted for this bucket (plan entry names).
    entries: tuple[str, ...]
    slots: tuple[Slot, ...]
    #: Payload size in bytes (the last slot's end, aligned).
    nbytes: int


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def bucket_layout(plan: Plan, bucket_bytes: int) -> list[Bucket]:
    """The plan's outputs in buckets of at most ``bucket_bytes`` (see the module docstring)."""
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < ALIGN:
        raise ConversionInputError(f"bucket_bytes must be an int of at least {ALIGN}, got {bucket_bytes!r}")
    buckets: list[Bucket] = []
    entries: list[str] = []
    slots: list[Slot] = []
    used = 0

    def close() -> None:
        nonlocal entries, slots, used
        if entries:
            buckets.append(Bucket(len(buckets), tuple(entries), tuple(slots), max(used, ALIGN)))
        entries, slots, used = [], [], 0

    for e in plan.entries:
        sizes = [nbytes(o.buffer_shape, o.dtype) for o in e.outputs]
        need = sum(_aligned(s) for s in sizes)
        if entries and used + need > bucket_bytes:
            close()
        for o, size in zip(e.outputs, sizes, strict=True):
            slots.append(Slot(o.name, used, size))
            used += _aligned(size)
        entries.append(e.name)
    close()
    return buckets


def layout_to_json(buckets: Sequence[Bucket]) -> list[dict[str, Any]]:
    return [{"nbytes": b.nbytes, "slots": [[s.name, s.offset, s.nbytes] for s in b.slots]} for b in buckets]


def layout_from_json(data: Any) -> list[Bucket]:
    """The buckets a sender announced; malformed layouts are refused with the bucket named."""
    if not isinstance(data, list):
        raise ConversionInputError(f"bucket layout must be a list of buckets, got {type(data).__name__}")
    buckets = []
    for i, raw in enumerate(data):
        try:
            size = raw["nbytes"]
            slots = tuple(Slot(str(n), int(o), int(s)) for n, o, s in raw["slots"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionInputError(f"bucket {i}: malformed ({type(exc).__name__}: {exc})") from None
        if not isinstance(size, int) or size < 0:
            raise ConversionInputError(f"bucket {i}: nbytes must be a non-negative int, got {size!r}")
        end = 0
        for s in slots:
            if s.offset < end or s.nbytes < 0 or s.offset + s.nbytes > size:
                raise ConversionInputError(
                    f"bucket {i}: slot {s.name!r} at [{s.offset}, {s.offset + s.nbytes}) overlaps another or "
                    f"leaves the bucket's {size} bytes"
                )
            end = s.offset + s.nbytes
        buckets.append(Bucket(i, (), slots, size))
    return buckets
