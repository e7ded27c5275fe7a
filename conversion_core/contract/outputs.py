"""What a conversion declares about its outputs: names, dtypes, shapes, and how they are placed.

A conversion writes one or more named tensors per source weight (values and a scale; packed
values, block scales and a global scale; packed words, scales and the unpacked shape). The core
allocates, checks, names, shards and writes them from these declarations alone, so a new format
needs no core change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConversionTypeError

Shape = tuple[int, ...]

#: Placement of an output when the source is sharded (a DTensor):
#: one element per source element (or per fixed group of them along K): placed like the source;
ELEMENTWISE = "elementwise"
#: one value per statistic block (a scale grid): sharded where blocks are whole, else replicated;
PER_BLOCK = "per_block"
#: a fixed-shape value for the whole tensor (a global scale, the unpacked shape): replicated.
REPLICATED = "replicated"
PLACEMENTS = (ELEMENTWISE, PER_BLOCK, REPLICATED)

#: The name the main output of a source ``<module>.weight`` keeps.
WEIGHT = "weight"


def output_tensor_name(source_name: str, suffix: str) -> str:
    """The tensor name an output is stored under, relative to the source's own name.

    ``suffix`` replaces ``weight`` in ``<module>.weight`` (``weight_packed``, ``weight_s``);
    for a fused parameter without ``.weight`` (``experts.gate_up_proj``) the part after ``weight``
    is appended, as transformers names it (``experts.gate_up_proj_scale_inv``).
    """
    if suffix == WEIGHT:
        return source_name
    if source_name.endswith("." + WEIGHT):
        return source_name[: -len(WEIGHT)] + suffix
    tail = suffix[len(WEIGHT) :] if suffix.startswith(WEIGHT + "_") else "_" + suffix
    return source_name + tail


@dataclass(frozen=True)
class Output:
    """One tensor a conversion writes for every source tensor.

    ``name`` is relative to the source's last name component ``weight``: ``"weight"`` keeps the
    source's name, ``"weight_packed"`` renames it, ``"weight_absmax"`` adds a companion.
    ``shape`` maps the source shape to this output's shape.
    """

    name: str
    dtype: torch.dtype
    shape: Callable[[Shape], Shape]
    placement: str = ELEMENTWISE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "." in self.name:
            raise ConversionTypeError(f"Output.name must be a non-empty name without dots, got {self.name!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ConversionTypeError(f"Output {self.name!r}: dtype must be a torch.dtype, got {self.dtype!r}")
        if not callable(self.shape):
            raise ConversionTypeError(f"Output {self.name!r}: shape must be a function of the source shape")
        if self.placement not in PLACEMENTS:
            raise ConversionTypeError(f"Output {self.name!r}: placement must be one of {PLACEMENTS}")


@dataclass(frozen=True)
class TargetFormat:
    """How one inference checkpoint convention stores a conversion's outputs (plugin-owned).

    A conversion's ``target_format(quantization_config)`` returns one; the whole-model plan and
    ``convert`` follow it. Every field defaults to "nothing format-specific".
    """

    #: Per output, the suffix it is stored under (a checkpoint convention may name every scale
    #: alike); None: each ``Output.name``.
    output_names: Sequence[str] | None = None
    #: ``(output index, buffer shape) -> stored shape`` (a view of the same elements: per-row
    #: scales stored ``(N, 1)``); None: as written.
    stored_shape: Callable[[int, Shape], Shape] | None = None
    #: Modules kept as they are -> the ``quantization_config`` a converted checkpoint carries
    #: (None for an unquantized checkpoint). Unset: the ``--like`` config as given.
    quantization_config: Callable[[list[str]], dict[str, Any] | None] | None = None
    #: Tensor name -> why the config leaves it unquantized (its ignore list, its targets), or None.
    keep: Callable[[str], str | None] | None = None
    #: Names of the tensors a plan quantizes -> the sets of them whose members share the
    #: conversion's :class:`SharedAmax` statistic (fused q/k/v, gate/up: engine knowledge, owned
    #: by the plugin); None: every tensor on its own.
    shared_sets: Callable[[Sequence[str]], Sequence[Sequence[str]]] | None = None


def no_target_format(quantization_config: dict[str, Any]) -> TargetFormat:
    """The default: outputs under their own names, nothing kept by config, no config writer."""
    return TargetFormat()


@dataclass(frozen=True)
class BlockAmax:
    """How a conversion of a sharded source (DTensor) gets the statistic its bytes depend on.

    ``block(src_shape)`` gives, per source dim, how many elements one statistic covers (``0``:
    the whole dim): ``(1, 128, 128)`` for 128x128 blocks of stacked experts, ``(1, 0)`` for one
    scale per row, ``(0, 0)`` for one per tensor. Each rank takes ``max |x|`` of its part of
    every block it touches; ranks that share a block all-reduce MAX (exact, so bit-identical);
    then ``apply(x, amax, grid, *outputs)`` writes this rank's outputs: ``x`` the local source,
    ``amax`` float32 per element of ``x`` (its block's global amax), ``grid`` the float32 amax
    grid laid out like the local ``per_block`` outputs (reshape it to theirs), ``outputs`` the
    local buffers in declared order. Shards that own whole blocks skip all this and run ``fn``.
    """

    block: Callable[[Shape], Sequence[int]]
    apply: Callable[..., None]

    def __post_init__(self) -> None:
        if not callable(self.block) or not callable(self.apply):
            raise ConversionTypeError("BlockAmax needs callables block(src_shape) and apply(x, amax, grid, *outputs)")


@dataclass(frozen=True)
class SharedAmax:
    """A statistic of the whole source tensor, ``max |x|``, that a set of tensors shares.

    Fused inference kernels read one value for several tensors (one global scale for q, k and v):
    each member's bytes then depend on the max over the set, not on the member alone. Which
    tensors form a set comes from the target format (:attr:`TargetFormat.shared_sets`); the core
    takes the max over the set (across checkpoint shards, and across ranks for DTensor sources)
    and calls, instead of ``fn``:

    - ``apply(src, amax, *buffers)``: ``amax`` the set's float32 ``(1,)`` statistic, on ``src``'s
      device; ``fn(src, *buffers)`` must write what ``apply(src, max|src|, *buffers)`` writes, and
      ``apply`` refuses NaN/Inf like ``fn``;
    - ``launch(src, amax, *buffers, flag)``: its sync-free twin for the whole-model step (None: a
      plan with shared sets runs tensor by tensor);
    - ``sharded_apply(x, amax, block_amax, grid, *buffers)``: the DTensor form for shards whose
      :class:`BlockAmax` blocks are cut: ``BlockAmax.apply``'s arguments after the set's amax.
    """

    apply: Callable[..., None]
    launch: Callable[..., None] | None = None
    sharded_apply: Callable[..., None] | None = None

    def __post_init__(self) -> None:
        if not callable(self.apply) or any(
            f is not None and not callable(f) for f in (self.launch, self.sharded_apply)
        ):
            raise ConversionTypeError(
                "SharedAmax needs a callable apply(src, amax, *buffers) (launch, sharded_apply: callables or None)"
            )
