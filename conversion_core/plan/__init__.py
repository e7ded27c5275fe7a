"""The whole-model plan: which conversion each tensor gets, under which names, into which buffers.

A trainer converts its whole model every step into buffers it allocated once::

    plan = build_plan(model.state_dict(), "path/to/inference/config.json")  # decisions, once
    outputs = plan.allocate("cuda")  # name -> tensor, views of one arena
    plan.run(model.state_dict())     # every step: refills the same buffers

Decisions (:mod:`.decide`), fused-shard geometry (:mod:`.geometry`), the arena (:mod:`.arena`),
the local step (:mod:`.local`), its CUDA graphs (:mod:`.graph_step`) and the sharded (DTensor)
form (:mod:`.sharded`, imported only for DTensor inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..contract import TargetFormat
from ..loading import Registry
from .decide import (
    DEFAULT_FUSED_SHARDS,
    KEEP,
    PlanEntry,
    PlannedOutput,
    TensorSpec,
    decide,
    dtype_name,
    keep_conversion,
    matches_module,
    resolve_conversion,
    target_of,
)
from .local import GRAPH_FIRST_SEGMENT, GRAPH_STREAMS, MANIFEST_VERSION, Call, Plan


def build_plan(
    tensors: Mapping[str, Any],
    config: Any = None,
    *,
    conversion: str | None = None,
    registry: Registry | None = None,
    fused_shards: Mapping[str, int | Sequence[int]] | None = None,
    keep: Iterable[str] = (),
    target: TargetFormat | None = None,
) -> Plan:
    """Decide per tensor which conversion applies and under which output names.

    :param tensors: a state dict, or ``name -> TensorSpec | (shape, dtype) | tensor`` (meta is fine).
    :param config: the inference model's config in any form ``quantization_config_of`` reads;
        selects the conversion (unless ``conversion`` names one) and, through the conversion's
        ``target_format``, the output names and the modules the config keeps.
    :param conversion: a registered conversion name, overriding the config's choice.
    :param fused_shards: ``name pattern -> shard count or row sizes`` (dim -2) of fused tensors whose
        shards must be quantized separately; a pattern is a dotted-name suffix or ``re:<regex>``.
        Default :data:`DEFAULT_FUSED_SHARDS` (stacked ``gate_up_proj`` in two halves); ``{}``: none.
    :param keep: extra module patterns to leave unquantized (whole dotted components, or ``re:``).
    :param target: override the target format the conversion derives from the config.
    """
    entries, chosen, chosen_target = decide(
        tensors,
        config,
        conversion=conversion,
        registry=registry,
        fused_shards=fused_shards,
        keep=keep,
        target=target,
    )
    return Plan(entries, chosen, chosen_target)


__all__ = [
    "DEFAULT_FUSED_SHARDS",
    "GRAPH_FIRST_SEGMENT",
    "GRAPH_STREAMS",
    "KEEP",
    "MANIFEST_VERSION",
    "Call",
    "Plan",
    "PlanEntry",
    "PlannedOutput",
    "TensorSpec",
    "build_plan",
    "dtype_name",
    "keep_conversion",
    "matches_module",
    "resolve_conversion",
    "target_of",
]
