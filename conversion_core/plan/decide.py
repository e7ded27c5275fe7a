"""The plan's decisions: which conversion each tensor gets, under which names, in which shapes.

:func:`build_plan` decides per tensor, from names, shapes and dtypes alone (a state dict, meta
tensors or ``name -> (shape, dtype)``), what the inference side expects:

- quantized: the model's conversion (from its inference config, or named explicitly), its
  outputs named and shaped as the target checkpoint convention stores them (the conversion's
  ``target_format``, owned by its plugin);
- kept: what published quantized checkpoints leave unquantized — embeddings, ``lm_head``,
  norms, biases, 1-D tensors, MoE router gates (``mlp.gate``, ``shared_expert_gate``,
  ``router``), non-float tensors — plus whatever the target format keeps (the config's ignore
  lists and targets, read by the plugin) and the caller's ``keep`` patterns. Kept tensors stay in
  their own dtype, bit-identical (the core's ``keep`` copy, tagged ``hf_raw``). A conversion
  that is a plain cast (``bf16_cast``) applies to every float tensor it accepts.

Fused stacks (``(E, 2I, H)`` gate+up) whose shards must be converted separately get stacked
output buffers (:mod:`conversion_core.plan.geometry`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..contract import Conversion, TargetFormat, output_tensor_name
from ..errors import ConfigError, ConversionCoreError, ConversionInputError, ConversionTypeError
from ..loading import Registry, load_registry
from ..selection import quantization_config_of, select_default_conversion
from ..selection.prequantized import refuse_quantized_tensors
from . import geometry

Shape = tuple[int, ...]

#: Name of the conversion that keeps a tensor bit-identical (not a plugin: it has no format).
KEEP = "keep"
#: Fused parameters split into equal shards by default: transformers' stacked experts ``(E, 2I, H)``.
DEFAULT_FUSED_SHARDS: Mapping[str, int | Sequence[int]] = {r"re:(.*\.)?gate_up_proj$": 2}

_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|embeddings?|embed_positions|word_embeddings|wte|wpe|tok_embeddings)(\.|$)"
)
_LM_HEAD = re.compile(r"(^|\.)lm_head(\.|$)")
_NORM = re.compile(r"(^|\.)([^.]*norm[^.]*|ln_[^.]*)\.[^.]+$")
_ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)\.[^.]+$")
_BIAS = re.compile(r"(^|[._])bias$")


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a source tensor: all a plan needs to decide and allocate."""

    shape: Shape
    dtype: torch.dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _copy(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    out.copy_(src)


_KEEPERS: dict[torch.dtype, Conversion] = {}


def keep_conversion(dtype: torch.dtype) -> Conversion:
    """The exact copy a kept tensor of ``dtype`` goes through (checked like every conversion)."""
    if dtype not in _KEEPERS:
        _KEEPERS[dtype] = Conversion(name=KEEP, fn=_copy, requires_scale=False, dst_dtype=dtype, src_dtypes=(dtype,))
    return _KEEPERS[dtype]


def _module_candidates(name: str) -> list[str]:
    parts = name.split(".")
    return [name, ".".join(parts[:-1])] if len(parts) > 1 else [name]


def matches_module(pattern: str, name: str) -> bool:
    """Whether a caller's ``keep`` pattern names the module holding tensor ``name``.

    ``re:<regex>`` is matched from the start against the module and the tensor name; a plain
    entry matches a run of whole dotted components, so ``lm_head``, ``mlp.gate`` and
    ``model.layers.0.mlp.gate`` match, but ``gate`` never matches ``gate_proj``. (A config's own
    ignore lists are read by the plugin that owns the format, with the engines' semantics.)
    """
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"keep pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return any(regex.match(c) for c in _module_candidates(name))
    if not pattern:
        return False
    return any(c == pattern or f".{c}.".find(f".{pattern}.") >= 0 for c in _module_candidates(name))


def _spec_of(name: str, value: Any) -> TensorSpec:
    if isinstance(value, TensorSpec):
        return value
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], torch.dtype):
        return TensorSpec(tuple(int(s) for s in value[0]), value[1])
    raise ConversionTypeError(
        f"tensor {name!r}: expected a torch.Tensor, a TensorSpec or (shape, dtype), got {type(value).__name__}"
    )


@dataclass(frozen=True)
class PlannedOutput:
    """One output tensor of a plan entry: its name, dtype, stored shape and written shape."""

    name: str
    dtype: torch.dtype
    #: The shape the output is published under (a view of the buffer).
    shape: Shape
    #: The shape the conversion writes.
    buffer_shape: Shape


@dataclass(frozen=True)
class PlanEntry:
    """One source tensor: the conversion it gets and the outputs it fills."""

    name: str
    src_shape: Shape
    src_dtype: torch.dtype
    conversion: Conversion
    #: Why the tensor is kept as it is; None when the plan's conversion applies.
    kept: str | None
    outputs: tuple[PlannedOutput, ...]
    #: Row counts of fused shards along dim -2, converted separately; None when not fused.
    shards: tuple[int, ...] | None = None
    #: Every member (this one included) of the set whose whole-tensor amax its bytes share
    #: (``Conversion.shared_amax``); empty when the tensor stands alone.
    shared_with: tuple[str, ...] = ()

    @property
    def tags(self) -> dict[str, Any]:
        """What a publisher stamps on this tensor's outputs (every output alike)."""
        return self.conversion.tags

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def out_shape(self) -> Shape:
        return self.outputs[0].shape

    @property
    def scale_name(self) -> str | None:
        """Name of the second output (the scale of the one-scale form), None when there is none."""
        return self.outputs[1].name if len(self.outputs) > 1 else None

    @property
    def scale_shape(self) -> Shape | None:
        return self.outputs[1].shape if len(self.outputs) > 1 else None

    @property
    def scale_buffer_shape(self) -> Shape | None:
        return self.outputs[1].buffer_shape if len(self.outputs) > 1 else None

    def to_json(self) -> dict[str, Any]:
        tags = self.tags
        scale = self.outputs[1] if len(self.outputs) > 1 else None
        return {
            "name": self.name,
            "src_shape": list(self.src_shape),
            "src_dtype": dtype_name(self.src_dtype),
            "shape": list(self.out_shape),
            "dtype": dtype_name(self.outputs[0].dtype),
            "conversion": self.conversion.name,
            "kept": self.kept,
            "scale_name": None if scale is None else scale.name,
            "scale_shape": None if scale is None else list(scale.shape),
            "scale_dtype": None if scale is None else dtype_name(scale.dtype),
            "outputs": [{"name": o.name, "shape": list(o.shape), "dtype": dtype_name(o.dtype)} for o in self.outputs],
            "fused_shards": None if self.shards is None else list(self.shards),
            "shares_amax_with": list(self.shared_with),
            "compile_target": tags["compile_target"],
            "compile_metadata": tags["compile_metadata"],
        }


def target_of(conversion: Conversion, qc: Mapping[str, Any]) -> TargetFormat:
    """The conversion's target format for ``qc``, with a plugin's failure named in one line."""
    try:
        target = conversion.target_format(dict(qc))
    except ConversionCoreError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"conversion {conversion.name!r}: target_format failed for quantization_config {dict(qc)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(target, TargetFormat):
        raise ConversionTypeError(
            f"conversion {conversion.name!r}: target_format returned {type(target).__name__}; "
            "expected a conversion_core.TargetFormat"
        )
    names = target.output_names
    if names is not None and (len(names) != len(conversion.outputs) or not all(isinstance(n, str) for n in names)):
        raise ConversionTypeError(
            f"conversion {conversion.name!r}: target_format gives {len(names)} output names for "
            f"{len(conversion.outputs)} outputs"
        )
    return target


def keep_reason(
    name: str, spec: TensorSpec, conversion: Conversion, keep: Sequence[str], target: TargetFormat
) -> str | None:
    """Why ``name`` stays unquantized under ``conversion``, or None when the conversion applies."""
    if not spec.dtype.is_floating_point:
        return f"non-float dtype {dtype_name(spec.dtype)}"
    if not conversion.quantizes:  # a plain cast applies to the whole model
        ranks = conversion.src_ndims
        return None if ranks is None or len(spec.shape) in ranks else f"{len(spec.shape)}-D tensor"
    if len(spec.shape) not in (conversion.src_ndims or (2, 3)):
        return f"{len(spec.shape)}-D tensor"
    for structural, why in ((_BIAS, "bias"), (_EMBEDDING, "embedding"), (_LM_HEAD, "lm_head"), (_NORM, "norm")):
        if structural.search(name):
            return why
    if _ROUTER.search(name):
        return "router gate"
    if target.keep is not None:
        by_config = target.keep(name)
        if by_config is not None:
            return str(by_config)
    for pattern in keep:
        if matches_module(pattern, name):
            return f"kept: {pattern}"
    return None


def _fused_spec(name: str, fused: Mapping[str, int | Sequence[int]]) -> int | Sequence[int] | None:
    for pattern, spec in fused.items():
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return spec
        elif name == pattern or name.endswith("." + pattern):
            return spec
    return None


def _shard_rows(name: str, rows: int, spec: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1 or rows % spec:
            raise ConversionInputError(
                f"tensor {name!r}: {rows} rows cannot be split into {spec} equal fused shards; "
                "declare the shard sizes explicitly in fused_shards"
            )
        return (rows // spec,) * spec
    if isinstance(spec, bool):
        raise ConversionInputError(f"tensor {name!r}: fused shard spec must be a count or row sizes, got {spec!r}")
    sizes = tuple(int(s) for s in spec)
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != rows:
        raise ConversionInputError(
            f"tensor {name!r}: fused shard sizes {list(sizes)} must be positive and sum to its {rows} rows (dim -2)"
        )
    return sizes


def resolve_conversion(
    config: Any = None, conversion: str | None = None, registry: Registry | None = None
) -> tuple[Conversion, dict[str, Any]]:
    """The conversion to apply (named, or selected from ``config``) and the config's quantization_config."""
    registry = registry or load_registry()
    qc = quantization_config_of(config) if config is not None else {}
    if conversion is None:
        if config is None:
            raise ConversionInputError("a plan needs an inference config or an explicit conversion name")
        conversion = select_default_conversion(qc, registry)
    return registry.get(conversion), qc


def converted_entry(
    name: str, spec: TensorSpec, conversion: Conversion, target: TargetFormat, fused: int | Sequence[int] | None
) -> PlanEntry:
    """The entry of a tensor the conversion applies to: outputs named and shaped for ``target``."""
    try:
        conversion.check_shape(spec.shape)
        conversion.output_shapes(spec.shape)
    except ConversionCoreError as exc:  # the same one line, naming the tensor
        raise type(exc)(f"tensor {name!r}: {exc}") from exc
    shards = None if fused is None else _shard_rows(name, spec.shape[-2], fused)
    if shards is not None and len(shards) > 1 and not geometry.shards_align(conversion, spec.shape, shards):
        buffers = geometry.fused_output_shapes(conversion, spec.shape, shards)
    else:
        buffers = conversion.output_shapes(spec.shape)
    suffixes = target.output_names or [o.name for o in conversion.outputs]
    outputs = []
    for i, (output, suffix, buffer_shape) in enumerate(zip(conversion.outputs, suffixes, buffers, strict=True)):
        stored = tuple(buffer_shape if target.stored_shape is None else target.stored_shape(i, buffer_shape))
        if _numel(stored) != _numel(buffer_shape):
            raise ConversionTypeError(
                f"conversion {conversion.name!r}: target_format stores output {output.name!r} of shape "
                f"{buffer_shape} as {stored}, which holds another number of elements"
            )
        outputs.append(PlannedOutput(output_tensor_name(name, suffix), output.dtype, stored, tuple(buffer_shape)))
    return PlanEntry(name, spec.shape, spec.dtype, conversion, None, tuple(outputs), shards)


def kept_entry(name: str, spec: TensorSpec, reason: str) -> PlanEntry:
    output = PlannedOutput(name, spec.dtype, spec.shape, spec.shape)
    return PlanEntry(name, spec.shape, spec.dtype, keep_conversion(spec.dtype), reason, (output,))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def decide(
    tensors: Mapping[str, Any],
    config: Any = None,
    *,
    conversion: str | None = None,
    registry: Registry | None = None,
    fused_shards: Mapping[str, int | Sequence[int]] | None = None,
    keep: Iterable[str] = (),
    target: TargetFormat | None = None,
) -> tuple[list[PlanEntry], Conversion, TargetFormat]:
    """Per tensor, the entry :func:`~conversion_core.plan.build_plan` puts in the plan."""
    chosen, qc = resolve_conversion(config, conversion, registry)
    target = target if target is not None else target_of(chosen, qc)
    patterns = list(keep)
    fused = DEFAULT_FUSED_SHARDS if fused_shards is None else fused_shards
    entries = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ConversionTypeError(f"tensor names must be str, got {name!r}")
        spec = _spec_of(name, value)
        refuse_quantized_tensors([(name, spec.dtype)])  # a quantizer's output never passes as a weight
        reason = keep_reason(name, spec, chosen, patterns, target)
        if reason is not None:
            entries.append(kept_entry(name, spec, reason))
            continue
        if spec.dtype not in chosen.src_dtypes:
            accepted = ", ".join(dtype_name(d) for d in chosen.src_dtypes)
            raise ConversionInputError(
                f"tensor {name!r}: dtype {dtype_name(spec.dtype)} is not accepted by conversion {chosen.name!r} "
                f"(expected one of {accepted}); keep it with keep=[{name!r}] or fix the source"
            )
        entries.append(converted_entry(name, spec, chosen, target, _fused_spec(name, fused)))
    return with_shared_sets(entries, chosen, target), chosen, target


def with_shared_sets(entries: list[PlanEntry], conversion: Conversion, target: TargetFormat) -> list[PlanEntry]:
    """Mark the members of every set the target format says share the conversion's ``shared_amax``."""
    if conversion.shared_amax is None or target.shared_sets is None:
        return entries
    quantized = [e.name for e in entries if e.kept is None]
    try:
        sets = [tuple(str(n) for n in members) for members in target.shared_sets(quantized)]
    except ConversionCoreError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"conversion {conversion.name!r}: target_format's shared_sets failed: {type(exc).__name__}: {exc}"
        ) from exc
    known, seen = set(quantized), set[str]()
    membership: dict[str, tuple[str, ...]] = {}
    for members in sets:
        stray = [n for n in members if n not in known or n in seen]
        if stray:
            raise ConversionTypeError(
                f"conversion {conversion.name!r}: shared_sets gives {list(members)}, whose {stray} are not "
                "quantized tensors of the plan or already in another set"
            )
        seen.update(members)
        if len(members) > 1:
            membership.update({n: members for n in members})
    return [dataclasses.replace(e, shared_with=membership[e.name]) if e.name in membership else e for e in entries]
