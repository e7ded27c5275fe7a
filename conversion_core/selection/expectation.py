"""What a receiver expects to be sent: per tensor its dtype, shape and tags, before any byte arrives.

An inference engine already knows two things: its own ``quantization_config`` and the parameters
it allocated for it (names, dtypes, shapes: the quantized layout its kernels read). From those
alone, through the same registry the sender uses, :func:`expectations` derives the tags each
parameter must arrive with: the resolved conversion's ``compile_target`` and ``compile_metadata``
for the tensors of a quantized module, ``hf_raw`` with no metadata for the rest. The receiver never
trusts the sender's word for what a tensor is; the check (:mod:`.verdict`) compares the two.

A module counts as quantized when the receiver holds every output the conversion writes for it,
under the names the conversion's target format gives (``x.weight`` and its companions). A
conversion with a single output has no companion to tell quantized from kept modules by name: a
parameter then counts as quantized when its dtype is that output's dtype and not the dtype the
receiver keeps plain tensors in (``kept_dtypes``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract import Conversion, output_tensor_name
from ..contract.tags import thaw
from ..errors import ConversionTypeError
from ..loading.registry import Registry, load_registry
from .config import quantization_config_of
from .resolver import select_default_conversion

#: The tag of bytes that are read as they are (kept or cast tensors).
RAW_TARGET = "hf_raw"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ExpectedTensor:
    """One receiver parameter: the dtype, shape and tags its bytes must arrive with."""

    name: str
    dtype: torch.dtype
    shape: Shape
    compile_target: str = RAW_TARGET
    compile_metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Expectations:
    """Every tensor a receiver expects, by name, and the conversion its config resolved to."""

    tensors: Mapping[str, ExpectedTensor]
    #: The conversion the receiver's config selects (None when given tensor by tensor).
    conversion: str | None = None


def _spec(name: str, value: Any) -> tuple[torch.dtype, Shape]:
    if isinstance(value, torch.Tensor):
        return value.dtype, tuple(value.shape)
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], torch.dtype):
        return value[1], tuple(int(s) for s in value[0])
    raise ConversionTypeError(
        f"receiver parameter {name!r}: expected a torch.Tensor or (shape, dtype), got {type(value).__name__}"
    )


def _sources(name: str, suffixes: list[str]) -> set[str]:
    """Source names whose output under one of ``suffixes`` could be ``name``."""
    found = {name}
    for suffix in suffixes:
        if name.endswith("." + suffix):
            found.add(name[: -len(suffix)] + "weight")
        tail = suffix[len("weight") :] if suffix.startswith("weight_") else "_" + suffix
        if suffix != "weight" and name.endswith(tail):
            found.add(name[: -len(tail)])
    return found


def quantized_names(
    conversion: Conversion,
    qc: Mapping[str, Any],
    specs: Mapping[str, tuple[torch.dtype, Shape]],
    kept_dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float16, torch.float32),
) -> set[str]:
    """The parameters that belong to modules the conversion quantizes (see the module docstring)."""
    if not conversion.quantizes:
        return set()
    target = conversion.target_format(dict(qc))
    suffixes = list(target.output_names or [o.name for o in conversion.outputs])
    if len(suffixes) == 1:
        kept = set(kept_dtypes)
        dtype = conversion.outputs[0].dtype
        return {n for n, (d, _) in specs.items() if d == dtype and d not in kept}
    found: set[str] = set()
    for name in specs:
        for source in _sources(name, suffixes):
            outputs = [output_tensor_name(source, s) for s in suffixes]
            if all(o in specs for o in outputs):
                found.update(outputs)
    return found


def expectations(
    params: Mapping[str, Any],
    config: Any,
    *,
    registry: Registry | None = None,
    conversion: str | None = None,
) -> Expectations:
    """The receiver's expectations from its own parameters and its own inference config.

    :param params: name -> tensor (its buffers, meta is fine) or ``(shape, dtype)``, in the quantized
        layout the engine allocated (``x.weight`` and its companions, in their quantized dtypes).
    :param config: the receiver's model config in any form ``quantization_config_of`` reads.
    :param conversion: a conversion name, overriding what the config selects.
    """
    if not isinstance(params, Mapping):
        raise ConversionTypeError(f"receiver parameters must be a mapping of names, got {type(params).__name__}")
    registry = registry or load_registry()
    qc = quantization_config_of(config)
    chosen = registry.get(conversion or select_default_conversion(qc, registry))
    specs = {name: _spec(name, value) for name, value in params.items()}
    quantized = quantized_names(chosen, qc, specs)
    tags = chosen.tags
    tensors = {}
    for name, (dtype, shape) in specs.items():
        if name in quantized:
            target, metadata = tags["compile_target"], thaw(tags["compile_metadata"])
        else:
            target, metadata = RAW_TARGET, {}
        tensors[name] = ExpectedTensor(name, dtype, shape, target, metadata)
    return Expectations(tensors, chosen.name)
