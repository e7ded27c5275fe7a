"""Sets of tensors whose bytes share one whole-tensor statistic (``Conversion.shared_amax``).

A fused inference kernel reads one value for several tensors (one global scale for q, k and v),
so each member's bytes depend on ``max |x|`` over the whole set. The plan knows the sets from the
target format (``PlanEntry.shared_with``); this module takes the max over a set's members, wherever
they are (the step's state dict, or values the caller computed, e.g. from other checkpoint shards),
and calls the conversion's ``shared_amax.apply`` (``launch`` in the whole-model step) with it.
Nothing here knows a format: the statistic is a plain float32 abs-max.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..contract import Conversion
from ..errors import ConversionInputError
from .calls import non_finite_source
from .decide import PlanEntry


def source_amax(src: torch.Tensor) -> torch.Tensor:
    """float32 ``(1,)`` ``max |x|`` of a whole tensor; NaN anywhere gives NaN (torch's amax keeps it)."""
    if src.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=src.device)
    return src.abs().amax().float().reshape(1)


def _member_amax(
    name: str, member: str, state_dict: Mapping[str, Any], given: Mapping[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    if member in state_dict:
        return source_amax(state_dict[member])
    if member in given:
        value = given[member]
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConversionInputError(f"shared_amax[{member!r}] must be a one-element tensor, got {value!r}")
        return value.detach().float().reshape(1).to(device)
    raise ConversionInputError(
        f"tensor {name!r} shares its amax with {member!r}, which is neither in the state dict nor in shared_amax"
    )


def set_amaxes(
    entries: Sequence[PlanEntry],
    state_dict: Mapping[str, Any],
    given: Mapping[str, torch.Tensor] | None,
    *,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """Per entry that shares a statistic, the float32 ``(1,)`` max over its set.

    ``check``: refuse a non-finite member, naming it (one host sync per member); off in the
    launched step, whose conversions flag NaN/Inf on the device instead.
    """
    given = given or {}
    per_member: dict[str, torch.Tensor] = {}
    per_set: dict[tuple[str, ...], torch.Tensor] = {}
    result: dict[str, torch.Tensor] = {}
    for e in entries:
        if not e.shared_with:
            continue
        if e.shared_with not in per_set:
            device = state_dict[e.name].device if e.name in state_dict else torch.device("cpu")
            values = []
            for member in e.shared_with:
                if member not in per_member:
                    per_member[member] = _member_amax(e.name, member, state_dict, given, device)
                    if check and not bool(torch.isfinite(per_member[member]).all()):
                        src = state_dict.get(member)
                        raise non_finite_source(member, src if isinstance(src, torch.Tensor) else per_member[member])
                values.append(per_member[member])
            per_set[e.shared_with] = torch.cat(values).amax().reshape(1)
        result[e.name] = per_set[e.shared_with]
    return result


def apply_checked(conversion: Conversion, src: torch.Tensor, amax: torch.Tensor, buffers: Sequence[Any]) -> None:
    """``shared_amax.apply`` behind the same argument checks as ``fn``."""
    assert conversion.shared_amax is not None
    conversion.check_buffers(src, *buffers)
    conversion.shared_amax.apply(src, amax, *buffers)


def launchable(entries: Sequence[PlanEntry]) -> bool:
    """Every entry that shares a statistic has a sync-free ``shared_amax.launch``."""
    return all(
        e.conversion.shared_amax is not None and e.conversion.shared_amax.launch is not None
        for e in entries
        if e.shared_with
    )
