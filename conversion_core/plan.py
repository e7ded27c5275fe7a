"""The whole-model plan: which conversion each tensor gets, under which names, into which buffers.

A trainer converts its whole model every step into buffers it allocated once. :func:`build_plan`
decides per tensor, from names, shapes and dtypes alone (a state dict, meta tensors or
``name -> (shape, dtype)``), what the inference side expects:

- quantized: the model's conversion (from its inference config, or named explicitly);
- kept: what published FP8 checkpoints leave unquantized — embeddings, ``lm_head``, norms,
  biases, 1-D tensors, MoE router gates (``mlp.gate``, ``shared_expert_gate``, ``router``),
  non-float tensors, and whatever the config's ignore lists name (``modules_to_not_convert``,
  ``ignored_layers``, compressed-tensors ``ignore`` with its ``re:`` patterns). Kept tensors
  stay in their own dtype, bit-identical (the core's ``keep`` copy, tagged ``hf_raw``): casting
  them would change bytes the inference side reads as they are. A conversion without a scale
  (``bf16_cast``) is a cast of the whole model, so it applies to every float tensor it accepts.

Scale tensors are named the way the target checkpoint format loads them:
``<module>.weight_scale_inv`` (DeepSeek ``fp8``), ``<module>.weight_scale`` (per-channel), always
``weight_scale`` with per-row scales stored ``(N, 1)`` for compressed-tensors and fbgemm configs;
a fused parameter without ``.weight`` (``mlp.experts.gate_up_proj``) gets ``gate_up_proj_scale_inv``
as transformers names it. Fused stacks (``(E, 2I, H)`` gate+up) are converted shard by shard into
views of one buffer so no scale block straddles the gate/up boundary: scales
``(E, 2*ceil(I/128), ceil(H/128))`` as vLLM expects.

:meth:`Plan.allocate` allocates every output once (one arena, so it can be registered for RDMA in
one call); :meth:`Plan.run` validates the inputs, then refills the same buffers through each
conversion's checked ``fn``, or, when every conversion can queue its kernels without a host sync,
in one launched step (on CUDA, replayed CUDA graphs: :mod:`conversion_core.graph_step`). Any
failure raises and leaves the plan not ready.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import quantization_config_of
from .errors import ConfigError, ConversionCoreError, ConversionInputError, ConversionTypeError
from .graph_step import SEGMENT_GROWTH, CapturedStep
from .registry import Registry, load_registry
from .types import Conversion, Shape

#: Manifest format written by :meth:`Plan.manifest`.
MANIFEST_VERSION = 1
#: Name of the conversion that keeps a tensor bit-identical (not a plugin: it has no format).
KEEP = "keep"
#: Fused parameters split into equal shards by default: transformers' stacked experts ``(E, 2I, H)``.
DEFAULT_FUSED_SHARDS: Mapping[str, int | Sequence[int]] = {r"re:(.*\.)?gate_up_proj$": 2}
#: Quantization methods whose checkpoints name every scale ``weight_scale`` and store per-row scales (N, 1).
WEIGHT_SCALE_METHODS = ("compressed-tensors", "fbgemm_fp8")
#: Streams a captured CUDA step spreads its launches over (see :meth:`Plan.run`).
GRAPH_STREAMS = 8
#: Tensors in the first graph segment of a captured step; each next one holds
#: :data:`~conversion_core.graph_step.SEGMENT_GROWTH` times as many (see :mod:`conversion_core.graph_step`).
GRAPH_FIRST_SEGMENT = 32
#: Arena alignment in bytes (covers every dtype and vectorised kernels' loads).
ALIGN = 256

_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|embeddings?|embed_positions|word_embeddings|wte|wpe|tok_embeddings)(\.|$)"
)
_LM_HEAD = re.compile(r"(^|\.)lm_head(\.|$)")
_NORM = re.compile(r"(^|\.)([^.]*norm[^.]*|ln_[^.]*)\.[^.]+$")
_ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)\.[^.]+$")
_BIAS = re.compile(r"(^|[._])bias$")

_DTYPE_NAMES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a source tensor: all a plan needs to decide and allocate."""

    shape: Shape
    dtype: torch.dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_safetensors(code: str) -> torch.dtype:
    """torch dtype of a safetensors header dtype code (``BF16``, ``F32``, ...)."""
    try:
        return _DTYPE_NAMES[code]
    except KeyError:
        raise ConversionInputError(f"safetensors dtype {code!r} is not one of {', '.join(_DTYPE_NAMES)}") from None


def _copy(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    out.copy_(src)


_KEEPERS: dict[torch.dtype, Conversion] = {}


def keep_conversion(dtype: torch.dtype) -> Conversion:
    """The exact copy a kept tensor of ``dtype`` goes through (checked like every conversion)."""
    if dtype not in _KEEPERS:
        _KEEPERS[dtype] = Conversion(name=KEEP, fn=_copy, requires_scale=False, dst_dtype=dtype, src_dtypes=(dtype,))
    return _KEEPERS[dtype]


@dataclass(frozen=True)
class ScaleNaming:
    """How the target checkpoint format names and shapes scale tensors."""

    #: Suffix replacing ``weight`` in ``<module>.weight``: ``weight_scale_inv`` or ``weight_scale``.
    suffix: str
    #: Store per-row scales with a trailing unit dim, ``(N, 1)`` (compressed-tensors, fbgemm).
    rows_as_column: bool = False

    def tensor_name(self, weight_name: str) -> str:
        """``a.weight`` -> ``a.weight_scale_inv``; ``experts.gate_up_proj`` -> ``experts.gate_up_proj_scale_inv``."""
        if weight_name.endswith(".weight"):
            return weight_name[: -len("weight")] + self.suffix
        tail = self.suffix[len("weight") :] if self.suffix.startswith("weight_") else "_" + self.suffix
        return weight_name + tail


def scale_naming_for(conversion: Conversion, qc: Mapping[str, Any]) -> ScaleNaming | None:
    """The scale naming of the checkpoint format ``qc`` describes (None when ``conversion`` has no scale)."""
    if not conversion.requires_scale:
        return None
    if qc.get("quant_method") in WEIGHT_SCALE_METHODS:
        return ScaleNaming("weight_scale", rows_as_column=True)
    assert conversion.scale_name is not None  # Conversion guarantees it when requires_scale
    return ScaleNaming(conversion.scale_name)


def ignore_patterns(qc: Mapping[str, Any]) -> list[str]:
    """Every module the config says to leave unquantized, in the config's own spelling."""
    patterns: list[str] = []
    for key in ("modules_to_not_convert", "ignored_layers", "ignore"):
        value = qc.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"quantization_config[{key!r}] must be a list of module names, got {value!r}")
        patterns.extend(value)
    return patterns


def _module_candidates(name: str) -> list[str]:
    parts = name.split(".")
    candidates = [name]
    if len(parts) > 1:
        candidates.append(".".join(parts[:-1]))
    return candidates


def matches_module(pattern: str, name: str) -> bool:
    """Whether a config's ignore entry names the module holding tensor ``name``.

    ``re:<regex>`` is matched from the start (as compressed-tensors and vLLM do) against the
    module and the tensor name; a plain entry matches a run of whole dotted components, so
    ``lm_head``, ``mlp.gate`` and ``model.layers.0.mlp.gate`` match, but ``gate`` never matches
    ``gate_proj``.
    """
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"ignore pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return any(regex.match(c) for c in _module_candidates(name))
    if not pattern:
        return False
    for candidate in _module_candidates(name):
        if candidate == pattern or f".{candidate}.".find(f".{pattern}.") >= 0:
            return True
    return False


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
class PlanEntry:
    """One source tensor: the conversion it gets and the outputs it fills."""

    name: str
    src_shape: Shape
    src_dtype: torch.dtype
    conversion: Conversion
    #: Why the tensor is kept as it is; None when the plan's conversion applies.
    kept: str | None
    out_shape: Shape
    #: Output name of the scale tensor, None when the conversion writes none.
    scale_name: str | None = None
    #: Shape the scale is stored under (the conversion's, or with a trailing unit dim).
    scale_shape: Shape | None = None
    #: Shape of the scale buffer the conversion writes.
    scale_buffer_shape: Shape | None = None
    #: Row counts of fused shards along dim -2, converted separately; None when not fused.
    shards: tuple[int, ...] | None = None

    @property
    def tags(self) -> dict[str, Any]:
        """What a publisher stamps on this tensor's outputs (weight and scale alike)."""
        return self.conversion.tags

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.name,) if self.scale_name is None else (self.name, self.scale_name)

    def to_json(self) -> dict[str, Any]:
        tags = self.tags
        return {
            "name": self.name,
            "src_shape": list(self.src_shape),
            "src_dtype": dtype_name(self.src_dtype),
            "shape": list(self.out_shape),
            "dtype": dtype_name(self.conversion.dst_dtype),
            "conversion": self.conversion.name,
            "kept": self.kept,
            "scale_name": self.scale_name,
            "scale_shape": None if self.scale_shape is None else list(self.scale_shape),
            "scale_dtype": None if self.scale_name is None else dtype_name(self.conversion.scale_dtype),
            "fused_shards": None if self.shards is None else list(self.shards),
            "compile_target": tags["compile_target"],
            "compile_metadata": tags["compile_metadata"],
        }


def keep_reason(name: str, spec: TensorSpec, conversion: Conversion, ignore: Sequence[str]) -> str | None:
    """Why ``name`` stays unquantized under ``conversion``, or None when the conversion applies."""
    if not spec.dtype.is_floating_point:
        return f"non-float dtype {dtype_name(spec.dtype)}"
    if not conversion.requires_scale:  # a plain cast applies to the whole model
        ranks = conversion.src_ndims
        return None if ranks is None or len(spec.shape) in ranks else f"{len(spec.shape)}-D tensor"
    if len(spec.shape) not in (conversion.src_ndims or (2, 3)):
        return f"{len(spec.shape)}-D tensor"
    if _BIAS.search(name):
        return "bias"
    if _EMBEDDING.search(name):
        return "embedding"
    if _LM_HEAD.search(name):
        return "lm_head"
    if _NORM.search(name):
        return "norm"
    if _ROUTER.search(name):
        return "router gate"
    for pattern in ignore:
        if matches_module(pattern, name):
            return f"ignored by config: {pattern}"
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


def _row_scale_axis(conversion: Conversion, k: int) -> int:
    """The scale axis (negative) that grows with the rows N of a 2-D source, for stacking shards."""
    small = conversion.expected_scale_shape((1, k))
    large = conversion.expected_scale_shape((1 << 20, k))
    assert small is not None and large is not None
    differing = [i for i, (a, b) in enumerate(zip(small, large, strict=False)) if a != b]
    if len(small) != len(large) or len(differing) != 1:
        raise ConversionInputError(
            f"conversion {conversion.name!r}: its scale shape {small} does not grow along one axis with the "
            "rows, so fused shards cannot be stacked; convert the shards as separate tensors"
        )
    return differing[0] - len(small)


def _rows_independent(conversion: Conversion, k: int) -> bool:
    """True when each row has its own scale (or none): shards then need no separate calls."""
    if not conversion.requires_scale:
        return True
    axis = _row_scale_axis(conversion, k)
    return all((conversion.expected_scale_shape((n, k)) or ())[axis] == n for n in (1, 127, 1 << 20))


def _shards_align(e: PlanEntry) -> bool:
    """True when one call over a fused tensor writes the bytes of one call per shard.

    Rows independent (per-row scales, or none), or every shard boundary on a scale-block
    boundary (``ceil((r+1)/B) == ceil(r/B) + 1`` exactly when B divides r) with the whole
    tensor's scale shape equal to the stacked shards' (Qwen3's gate_up_proj: 768 = 6 x 128).
    """
    assert e.shards is not None
    k = e.src_shape[-1]
    if _rows_independent(e.conversion, k):
        return True
    if e.scale_buffer_shape != e.conversion.expected_scale_shape(e.src_shape):
        return False
    axis = _row_scale_axis(e.conversion, k)

    def scale_rows(rows: int) -> int:
        return (e.conversion.expected_scale_shape((rows, k)) or (0,))[axis]

    return all(scale_rows(rows + 1) == scale_rows(rows) + 1 for rows in e.shards[:-1])


def _fused_layout(entry_name: str, conversion: Conversion, shape: Shape, sizes: tuple[int, ...]) -> Shape:
    """Scale buffer shape of a fused tensor whose shards are quantized separately."""
    if len(shape) not in (2, 3):
        raise ConversionInputError(f"tensor {entry_name!r}: fused shards need a 2-D or 3-D tensor, got {shape}")
    k = shape[-1]
    for rows in sizes:
        if tuple(conversion.out_shape((rows, k)))[0] != rows:
            raise ConversionInputError(
                f"tensor {entry_name!r}: conversion {conversion.name!r} changes the row count, so fused shards "
                "cannot share one output buffer"
            )
    axis = _row_scale_axis(conversion, k)
    per_shard = [conversion.expected_scale_shape((rows, k)) for rows in sizes]
    first = list(per_shard[0] or ())
    first[axis] = sum((s or ())[axis] for s in per_shard)
    return (*shape[:-2], *first)


def resolve_conversion(
    config: Any = None, conversion: str | None = None, registry: Registry | None = None
) -> tuple[Conversion, dict[str, Any]]:
    """The conversion to apply (named, or selected from ``config``) and the config's quantization_config."""
    from .resolver import select_default_conversion

    registry = registry or load_registry()
    qc = quantization_config_of(config) if config is not None else {}
    if conversion is None:
        if config is None:
            raise ConversionInputError("a plan needs an inference config or an explicit conversion name")
        conversion = select_default_conversion(qc, registry)
    return registry.get(conversion), qc


def build_plan(
    tensors: Mapping[str, Any],
    config: Any = None,
    *,
    conversion: str | None = None,
    registry: Registry | None = None,
    fused_shards: Mapping[str, int | Sequence[int]] | None = None,
    keep: Iterable[str] = (),
    scale_naming: ScaleNaming | None = None,
) -> Plan:
    """Decide per tensor which conversion applies and under which output names.

    :param tensors: a state dict, or ``name -> TensorSpec | (shape, dtype) | tensor`` (meta is fine).
    :param config: the inference model's config in any form ``quantization_config_of`` reads;
        selects the conversion (unless ``conversion`` names one), its ignore lists and scale naming.
    :param conversion: a registered conversion name, overriding the config's choice.
    :param fused_shards: ``name pattern -> shard count or row sizes`` (dim -2) of fused tensors whose
        shards must be quantized separately; a pattern is a dotted-name suffix or ``re:<regex>``.
        Default :data:`DEFAULT_FUSED_SHARDS` (stacked ``gate_up_proj`` in two halves); ``{}``: none.
    :param keep: extra module patterns to leave unquantized (same syntax as the config's ignore list).
    :param scale_naming: override the scale naming derived from the config.
    """
    chosen, qc = resolve_conversion(config, conversion, registry)
    ignore = ignore_patterns(qc) + list(keep)
    naming = scale_naming or scale_naming_for(chosen, qc)
    fused = DEFAULT_FUSED_SHARDS if fused_shards is None else fused_shards
    entries = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ConversionTypeError(f"tensor names must be str, got {name!r}")
        spec = _spec_of(name, value)
        reason = keep_reason(name, spec, chosen, ignore)
        if reason is not None:
            entries.append(PlanEntry(name, spec.shape, spec.dtype, keep_conversion(spec.dtype), reason, spec.shape))
            continue
        if spec.dtype not in chosen.src_dtypes:
            accepted = ", ".join(dtype_name(d) for d in chosen.src_dtypes)
            raise ConversionInputError(
                f"tensor {name!r}: dtype {dtype_name(spec.dtype)} is not accepted by conversion {chosen.name!r} "
                f"(expected one of {accepted}); keep it with keep=[{name!r}] or fix the source"
            )
        entries.append(_converted_entry(name, spec, chosen, naming, _fused_spec(name, fused)))
    return Plan(entries, chosen)


def _converted_entry(
    name: str,
    spec: TensorSpec,
    conversion: Conversion,
    naming: ScaleNaming | None,
    fused: int | Sequence[int] | None,
) -> PlanEntry:
    out_shape = tuple(conversion.out_shape(spec.shape))
    shards = None if fused is None else _shard_rows(name, spec.shape[-2], fused)
    if not conversion.requires_scale:
        return PlanEntry(name, spec.shape, spec.dtype, conversion, None, out_shape, shards=shards)
    assert naming is not None
    if shards is not None and len(shards) > 1:
        buffer_shape = _fused_layout(name, conversion, spec.shape, shards)
    else:
        buffer_shape = conversion.expected_scale_shape(spec.shape)  # type: ignore[assignment]
    assert buffer_shape is not None
    stored = buffer_shape
    if naming.rows_as_column and len(buffer_shape) == len(spec.shape) - 1:
        stored = (*buffer_shape, 1)
    return PlanEntry(
        name,
        spec.shape,
        spec.dtype,
        conversion,
        None,
        out_shape,
        scale_name=naming.tensor_name(name),
        scale_shape=stored,
        scale_buffer_shape=buffer_shape,
        shards=shards,
    )


@dataclass(frozen=True)
class _Call:
    """One call of a conversion's checked fn: source index, output views."""

    name: str
    index: tuple[Any, ...]
    out: torch.Tensor
    scale: torch.Tensor | None


class Plan:
    """Per-tensor decisions, then buffers allocated once and refilled every step."""

    def __init__(self, entries: Sequence[PlanEntry], conversion: Conversion):
        self.entries: tuple[PlanEntry, ...] = tuple(entries)
        self.conversion = conversion
        self._by_name = {e.name: e for e in self.entries}
        if len(self._by_name) != len(self.entries):
            raise ConversionInputError("a plan cannot hold two tensors with one name")
        outputs = [n for e in self.entries for n in e.output_names]
        clash = sorted(n for n, count in Counter(outputs).items() if count > 1)
        if clash:
            raise ConversionInputError(
                f"output names collide: {clash[:5]} (a source tensor already carries a scale's name; "
                "is the source already quantized?)"
            )
        self.device: torch.device | None = None
        self.arena: torch.Tensor | None = None
        self._outputs: dict[str, torch.Tensor] = {}
        self._calls: list[_Call] = []
        self._sharded = False
        self._ready = False
        #: Streams a captured step spreads its launches over (concurrent small kernels).
        self.graph_streams = GRAPH_STREAMS
        #: Tensors in the first graph segment (the GPU starts once they are checked), and the
        #: factor each next segment grows by. Changing a setting makes the next step start anew.
        self.graph_first_segment = GRAPH_FIRST_SEGMENT
        self.graph_segment_growth = SEGMENT_GROWTH
        self._flag: torch.Tensor | None = None
        self._step: CapturedStep | None = None
        conversions = {id(e.conversion): e.conversion for e in self.entries}.values()
        self._all_launch = all(c.launch is not None or not c.requires_scale for c in conversions)

    # ---- decisions -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> PlanEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConversionInputError(f"tensor {name!r} is not in the plan") from None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kept is None and e.conversion.requires_scale]

    @property
    def kept(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kept is not None]

    def kept_modules(self) -> list[str]:
        """Modules of kept matrices (2-D and up), for a checkpoint config's ignore list."""
        modules = {e.name.removesuffix(".weight") for e in self.kept if len(e.src_shape) >= 2}
        return sorted(modules)

    def subset(self, names: Iterable[str]) -> Plan:
        """A plan over some of the tensors (e.g. one checkpoint shard), with the same decisions."""
        return Plan([self[n] for n in names], self.conversion)

    def output_tags(self) -> dict[str, dict[str, Any]]:
        """Tags of every output tensor (a scale carries its weight's tags)."""
        return {n: e.tags for e in self.entries for n in e.output_names}

    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": MANIFEST_VERSION,
            "conversion": self.conversion.name,
            "tags": self.conversion.tags,
            "tensors": [e.to_json() for e in self.entries],
        }

    def write_manifest(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.manifest(), indent=2) + "\n", encoding="utf-8")

    # ---- buffers ---------------------------------------------------------------------------
    def allocate(
        self, device: torch.device | str | None = None, *, like: Mapping[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Allocate every output once, as views of one arena on ``device``; returns the outputs.

        ``like``: a state dict of DTensors (FSDP2, tensor or expert parallel): the outputs are then
        DTensors placed like their sources, carved from one arena of local shards, and each
        :meth:`run` batches its collectives (see :mod:`conversion_core.distributed`).
        """
        self._step = None  # graphs write into the old buffers: never replayed again
        if like is not None:
            from .distributed import allocate_plan

            self.arena, self._calls, self._outputs = allocate_plan(self, like, ALIGN)
            self.device, self._ready, self._sharded = self.arena.device, False, True
            return dict(self._outputs)
        self._sharded = False
        device = torch.device(device if device is not None else "cpu")
        layout: list[tuple[str, Shape, torch.dtype]] = []
        for e in self.entries:
            layout.append((e.name, e.out_shape, e.conversion.dst_dtype))
            if e.scale_name is not None:
                assert e.scale_buffer_shape is not None
                layout.append((e.scale_name, e.scale_buffer_shape, e.conversion.scale_dtype))
        offsets, total = [], 0
        for _, shape, dtype in layout:
            offsets.append(total)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            total += -(-nbytes // ALIGN) * ALIGN
        arena = torch.empty(max(total, ALIGN), dtype=torch.uint8, device=device)
        buffers: dict[str, torch.Tensor] = {}
        for (name, shape, dtype), offset in zip(layout, offsets, strict=True):
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            buffers[name] = arena[offset : offset + size].view(dtype).view(shape)
        self.arena, self.device, self._ready = arena, arena.device, False  # cuda -> cuda:0
        self._calls = [call for e in self.entries for call in self._calls_of(e, buffers)]
        self._flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._outputs = {}
        for e in self.entries:
            self._outputs[e.name] = buffers[e.name]
            if e.scale_name is not None:
                assert e.scale_shape is not None
                self._outputs[e.scale_name] = buffers[e.scale_name].view(e.scale_shape)
        return dict(self._outputs)

    @staticmethod
    def _calls_of(e: PlanEntry, buffers: Mapping[str, torch.Tensor]) -> list[_Call]:
        out = buffers[e.name]
        scale = buffers[e.scale_name] if e.scale_name is not None else None
        if e.shards is None or len(e.shards) == 1 or _shards_align(e):
            return [_Call(e.name, (), out, scale)]  # one call writes the same bytes as one per shard
        axis = _row_scale_axis(e.conversion, e.src_shape[-1]) if scale is not None else 0
        experts = [(i,) for i in range(e.src_shape[0])] if len(e.src_shape) == 3 else [()]
        calls = []
        for lead in experts:
            row = scale_row = 0
            for rows in e.shards:
                rows_index = (*lead, slice(row, row + rows))
                scale_view = None
                if scale is not None:
                    shard_scale = e.conversion.expected_scale_shape((rows, e.src_shape[-1]))
                    assert shard_scale is not None
                    n = shard_scale[axis]
                    per_expert = scale[lead] if lead else scale
                    scale_view = per_expert.narrow(axis, scale_row, n)
                    scale_row += n
                calls.append(_Call(e.name, rows_index, out[rows_index], scale_view))
                row += rows
        return calls

    def dequantize(self, name: str) -> torch.Tensor:
        """float32 reading of a tensor's current output, shard by shard for fused tensors (verification)."""
        entry = self[name]
        if self.arena is None:
            raise ConversionInputError("the plan has no buffers yet: call allocate(device) first")
        if self._sharded:
            raise ConversionInputError(f"tensor {name!r}: a sharded plan's outputs are DTensors: read .full_tensor()")
        result = torch.empty(entry.src_shape, dtype=torch.float32, device=self.device)
        for call in self._calls:
            if call.name == name:
                value = entry.conversion.dequantize(call.out, call.scale)
                if call.index:
                    result[call.index] = value
                else:
                    result.copy_(value)
        return result

    @property
    def ready(self) -> bool:
        """True only after a run that converted every tensor."""
        return self._ready

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """Output name -> preallocated tensor (the same tensors after every run)."""
        if self.arena is None:
            raise ConversionInputError("the plan has no buffers yet: call allocate(device) first")
        return dict(self._outputs)

    def validate(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Check names, types, shapes, dtypes and devices of every input; write nothing."""
        if self.arena is None:
            raise ConversionInputError("the plan has no buffers yet: call allocate(device) first")
        if not isinstance(state_dict, Mapping):
            raise ConversionTypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict)}")
        missing = [n for n in self._by_name if n not in state_dict]
        if missing:
            raise ConversionInputError(
                f"{len(missing)} planned tensor(s) missing from the state dict, e.g. {missing[:5]}"
            )
        if strict:
            extra = [n for n in state_dict if n not in self._by_name]
            if extra:
                raise ConversionInputError(
                    f"{len(extra)} tensor(s) the plan does not know, e.g. {extra[:5]}; rebuild the plan "
                    "for this model (or run with strict=False to ignore them)"
                )
        for e in self.entries:
            src = state_dict[e.name]
            if not isinstance(src, torch.Tensor):
                raise ConversionTypeError(f"tensor {e.name!r}: expected a torch.Tensor, got {type(src).__name__}")
            got = (tuple(src.shape), src.dtype, src.device)
            want = (e.src_shape, e.src_dtype, self.device)
            if got != want:
                raise ConversionInputError(
                    f"tensor {e.name!r}: got shape {got[0]}, dtype {dtype_name(got[1])}, device {got[2]}; "
                    f"the plan expects shape {want[0]}, dtype {dtype_name(want[1])}, device {want[2]}"
                )

    def run(self, state_dict: Mapping[str, Any], strict: bool = True) -> dict[str, torch.Tensor]:
        """Refill every output from ``state_dict``; no allocation of outputs, no silent fallback.

        Inputs are validated before they are converted (names, types, shapes, dtypes, devices);
        a conversion that fails midway (NaN/Inf in a weight) raises naming the tensor. After any
        failure the plan is not ready and its outputs are unspecified (some may hold this run's
        bytes, others earlier ones) until a later run succeeds whole.

        When every conversion has a ``launch`` and the backend picks Triton, the step queues all
        kernels with no host sync and reads one NaN/Inf flag at the end (on a flag, it converts
        tensor by tensor to name the culprit). On CUDA the step is captured in CUDA graphs
        (launches spread over :attr:`graph_streams` streams) once its sources have sat at the
        same addresses in two steps running, and replayed while the state dict holds the same
        tensor objects at the same addresses, dtypes, shapes and strides (a trainer updating in
        place); sources that move every step are launched eagerly instead. Objects and addresses
        are checked segment by segment, each while the GPU runs the one before; dtypes, shapes and
        strides after the last replay (:mod:`conversion_core.graph_step`). A source that changed
        is thus found after some or all segments were replayed; the whole state dict is then
        validated and the step run again. A state dict that fails that validation leaves those
        segments holding replayed bytes (the plan is not ready, as after any failure).
        """
        self._ready = False
        settings = (self.graph_streams, self.graph_first_segment, self.graph_segment_growth)
        if self._step is not None and self._step.settings != settings:
            self._step = None  # a graph setting changed: segments cut and captured anew
        if self._step is not None and self._step.replay_if_unchanged(state_dict, strict):
            outputs = dict(self._outputs)  # built while the GPU works
            self._check_flag(state_dict)
            self._ready = True
            return outputs
        self.validate(state_dict, strict)
        if self._sharded:
            from .distributed import run_plan

            run_plan(self, self._calls, state_dict)
            self._ready = True
            return dict(self._outputs)
        if self._launchable():
            self._run_launched(state_dict)
        else:
            self._run_checked(state_dict)
        self._ready = True
        return dict(self._outputs)

    # ---- the step ---------------------------------------------------------------------------
    def _launchable(self) -> bool:
        """Every conversion has a sync-free ``launch`` (scale-free ones are plain copies) and the
        backend picks Triton for the plan's device (CUDA; CPU only under Triton's interpreter)."""
        from .backend import use_triton

        assert self.arena is not None
        return self._all_launch and use_triton(self.arena)

    def _queue(self, state_dict: Mapping[str, Any], calls: slice, streams: Sequence[Any] = ()) -> None:
        """Queue a range of calls, no host sync; round-robin over ``streams`` when given (graph capture)."""
        import contextlib

        assert self._flag is not None
        for i, call in enumerate(self._calls[calls]):
            src = state_dict[call.name]
            src = src[call.index] if call.index else src
            conversion = self._by_name[call.name].conversion
            ctx = torch.cuda.stream(streams[i % len(streams)]) if streams else contextlib.nullcontext()
            with ctx:
                if conversion.launch is not None:
                    conversion.launch(src, call.out, call.scale, self._flag)
                else:
                    conversion.raw_fn(src, call.out, call.scale)

    def _run_launched(self, state_dict: Mapping[str, Any]) -> None:
        """The fast step: every kernel queued (CUDA: graph replays), then one flag read.

        ``state_dict`` is validated. On CUDA, graph segments are replayed, captured or launched
        eagerly as :meth:`CapturedStep.run` decides; never replayed on stale addresses.
        """
        assert self._flag is not None and self.device is not None
        if self.device.type == "cuda":
            if self._step is None:
                calls_per_entry = Counter(call.name for call in self._calls)
                self._step = CapturedStep(
                    [e.name for e in self.entries],
                    [calls_per_entry[e.name] for e in self.entries],
                    self._flag,
                    self.graph_streams,
                    self.graph_first_segment,
                    self.graph_segment_growth,
                )
            self._step.run(state_dict, lambda calls, streams: self._queue(state_dict, calls, streams))
        else:
            self._flag.zero_()
            self._queue(state_dict, slice(None))
        self._check_flag(state_dict)

    def _check_flag(self, state_dict: Mapping[str, Any]) -> None:
        """The one host sync of a launched step: on NaN/Inf, convert tensor by tensor to name it."""
        assert self._flag is not None
        if int(self._flag.item()):
            self._run_checked(state_dict)
            raise ConversionCoreError("a NaN/Inf was flagged during the step but no tensor failed when re-checked")

    def _run_checked(self, state_dict: Mapping[str, Any]) -> None:
        """Tensor by tensor through each conversion's checked ``fn`` (one host sync per call)."""
        for call in self._calls:
            src = state_dict[call.name]
            conversion = self._by_name[call.name].conversion
            try:
                conversion.fn(src[call.index] if call.index else src, call.out, call.scale)
            except ConversionCoreError as exc:
                raise ConversionInputError(f"tensor {call.name!r}: {exc}") from exc
            except Exception as exc:
                raise ConversionCoreError(
                    f"tensor {call.name!r}: conversion {conversion.name!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
