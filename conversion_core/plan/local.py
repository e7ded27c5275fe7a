"""The whole-model plan's buffers and its step: allocated once, refilled every training step.

:meth:`Plan.allocate` allocates every output once (one arena, so it can be registered for RDMA in
one call); :meth:`Plan.run` validates the inputs, then refills the same buffers through each
conversion's checked ``fn``, or, when every conversion can queue its kernels without a host sync,
in one launched step (on CUDA, replayed CUDA graphs: :mod:`conversion_core.plan.graph_step`). Any
failure raises and leaves the plan not ready. A tensor that is copied or cast rather than
quantized is checked for NaN/Inf by the core (a quantizing conversion refuses them itself).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backend import use_triton
from ..contract import Conversion, all_finite
from ..contract.runs import RunLayout, SourceRun
from ..errors import ConversionCoreError, ConversionInputError, ConversionTypeError, plugin_failure
from . import arena as arenas
from . import shared
from .calls import Call, entry_calls, non_finite_output
from .decide import PlanEntry, dtype_name
from .graph_step import SEGMENT_GROWTH, CapturedStep

#: Manifest format written by :meth:`Plan.manifest` (2: every entry lists all its outputs).
MANIFEST_VERSION = 2
#: Streams a captured CUDA step spreads its launches over (see :meth:`Plan.run`).
GRAPH_STREAMS = 8
#: NaN/Inf flags of a plan: one per capture stream (more streams share them round-robin).
FLAG_SLOTS = 64
#: Tensors in the first graph segment of a captured step; each next one holds
#: :data:`~conversion_core.plan.graph_step.SEGMENT_GROWTH` times as many.
GRAPH_FIRST_SEGMENT = 32


class Plan:
    """Per-tensor decisions, then buffers allocated once and refilled every step."""

    def __init__(self, entries: Sequence[PlanEntry], conversion: Conversion, target: Any = None):
        self.entries: tuple[PlanEntry, ...] = tuple(entries)
        self.conversion = conversion
        #: The :class:`~conversion_core.TargetFormat` the outputs were named for.
        self.target = target
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
        self._calls: list[Call] = []
        self._sharded = False
        self._ready = False
        #: Streams a captured step spreads its launches over (concurrent small kernels).
        self.graph_streams = GRAPH_STREAMS
        #: Tensors in the first graph segment (the GPU starts once they are checked), and the
        #: factor each next segment grows by. Changing a setting makes the next step start anew.
        self.graph_first_segment = GRAPH_FIRST_SEGMENT
        self.graph_segment_growth = SEGMENT_GROWTH
        #: NaN/Inf flags: one int32 slot per capture stream (:data:`FLAG_SLOTS`), views of one tensor
        #: that a step clears and reads at once; a step on one stream ORs into slot 0.
        self._flags: torch.Tensor = torch.zeros(1, dtype=torch.int32)
        self._flag_slots: list[torch.Tensor] = []
        #: Per call of ``_calls``, what the queue needs of it (:meth:`_queue_records`), built once.
        self._records: list[tuple[Any, ...]] | None = None
        #: Per range of calls (and set of shared statistics): :meth:`_queue_split`.
        self._splits: dict[tuple[Any, ...], tuple[list[tuple[int, tuple[Any, ...]]], list[tuple[Any, ...]]]] = {}
        #: Per entry, (name, source shape, source dtype), for :meth:`validate`.
        self._expected = [(e.name, e.src_shape, e.src_dtype) for e in self.entries]
        self._step: CapturedStep | None = None
        conversions = {id(e.conversion): e.conversion for e in self.entries}.values()
        self._all_launch = all(c.launch is not None or not c.quantizes for c in conversions) and shared.launchable(
            self.entries
        )
        self._shares = any(e.shared_with for e in self.entries)
        #: Statistics of set members outside this run's state dict (``run(shared_amax=...)``).
        self._given_amax: Mapping[str, torch.Tensor] = {}

    @property
    def _flag(self) -> torch.Tensor | None:
        """The flag slot of a step on one stream (None before :meth:`allocate`)."""
        return self._flag_slots[0] if self._flag_slots else None

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
        return [e for e in self.entries if e.kept is None and e.conversion.quantizes]

    @property
    def kept(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kept is not None]

    def kept_modules(self) -> list[str]:
        """Modules of kept matrices (2-D and up), for a checkpoint config's ignore list."""
        modules = {e.name.removesuffix(".weight") for e in self.kept if len(e.src_shape) >= 2}
        return sorted(modules)

    def subset(self, names: Iterable[str]) -> Plan:
        """A plan over some of the tensors (e.g. one checkpoint shard), with the same decisions."""
        return Plan([self[n] for n in names], self.conversion, self.target)

    def output_tags(self) -> dict[str, dict[str, Any]]:
        """Tags of every output tensor (a companion carries its weight's tags)."""
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
        :meth:`run` batches its collectives (see :mod:`conversion_core.plan.sharded`).
        """
        self._step = None  # graphs write into the old buffers: never replayed again
        if like is not None:
            from .sharded import allocate_plan

            self.arena, self._calls, self._outputs = allocate_plan(self, like)
            self._records, self._splits = None, {}
            self.device, self._ready, self._sharded = self.arena.device, False, True
            return dict(self._outputs)
        self._sharded = False
        device = torch.device(device if device is not None else "cpu")
        layout = [(o.buffer_shape, o.dtype) for e in self.entries for o in e.outputs]
        arena, views = arenas.carve(layout, device)
        self.arena, self.device, self._ready = arena, arena.device, False  # cuda -> cuda:0
        self._calls, self._outputs = [], {}
        position = 0
        for e in self.entries:
            tensors = views[position : position + len(e.outputs)]
            position += len(e.outputs)
            self._calls.extend(entry_calls(e, tensors))
            for o, t in zip(e.outputs, tensors, strict=True):
                self._outputs[o.name] = t.view(o.shape)
        # One NaN/Inf flag per capture stream: a torch-op launch ORs into its flag with a
        # read-modify-write (``flag.add_``), which two streams running at once could lose.
        self._flags = torch.zeros(FLAG_SLOTS, dtype=torch.int32, device=self.device)
        self._flag_slots = [self._flags[i : i + 1] for i in range(FLAG_SLOTS)]
        self._records, self._splits = None, {}
        return dict(self._outputs)

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
                value = entry.conversion.dequantize(*call.buffers)
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
        if strict and len(state_dict) != len(self._by_name):  # every name present, as many: no extra
            extra = [n for n in state_dict if n not in self._by_name]
            if extra:
                raise ConversionInputError(
                    f"{len(extra)} tensor(s) the plan does not know, e.g. {extra[:5]}; rebuild the plan "
                    "for this model (or run with strict=False to ignore them)"
                )
        device = self.device
        tensor = torch.Tensor
        for name, shape, dtype in self._expected:  # per tensor: the reads, compared in place
            src = state_dict[name]
            if not isinstance(src, tensor) or src.dtype != dtype or src.shape != shape or src.device != device:
                self._refuse(name, src, shape, dtype)

    def _refuse(self, name: str, src: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """The one-line error for a source that is not what the plan expects."""
        if not isinstance(src, torch.Tensor):
            raise ConversionTypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(src).__name__}")
        raise ConversionInputError(
            f"tensor {name!r}: got shape {tuple(src.shape)}, dtype {dtype_name(src.dtype)}, device {src.device}; "
            f"the plan expects shape {shape}, dtype {dtype_name(dtype)}, device {self.device}"
        )

    def run(
        self,
        state_dict: Mapping[str, Any],
        strict: bool = True,
        *,
        shared_amax: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Refill every output from ``state_dict``; no allocation of outputs, no silent fallback.

        ``shared_amax``: ``name -> max |x|`` of members of a shared-statistic set that are not in
        ``state_dict`` (a set spanning checkpoint shards, converted one shard at a time).

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
        self._given_amax = dict(shared_amax or {})
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
            from .sharded import run_plan

            run_plan(self, self._calls, state_dict, self._given_amax)
            self._ready = True
            return dict(self._outputs)
        if self._launchable() and not self._given_amax:  # given statistics: the checked path (convert)
            self._run_launched(state_dict)
        else:
            self._run_checked(state_dict)
        self._ready = True
        return dict(self._outputs)

    # ---- the step ---------------------------------------------------------------------------
    def _launchable(self) -> bool:
        """Every conversion has a sync-free ``launch`` (scale-free ones are plain copies) and the
        backend picks Triton for the plan's device (CUDA; CPU only under Triton's interpreter)."""
        assert self.arena is not None
        return self._all_launch and use_triton(self.arena)

    def _queue(self, state_dict: Mapping[str, Any], calls: slice, streams: Sequence[Any] | None = ()) -> None:
        """Queue a range of calls, no host sync.

        A conversion with ``launch_group`` gets all its calls of the range in one grouped launch
        (a table update and a few launches, not one launch per tensor); the others get one
        launch per call. ``streams`` empty: eagerly on the current stream (sources at new
        addresses). Non-empty: a graph capture, launches round-robin over the streams (grouped
        launches find the tables the warm-up built in the capture session). None: on the current
        stream, the capture's warm-up (compiles the kernels the capture records). A copy or cast
        (no ``launch``) ORs a NaN/Inf in its source into the flag as well."""
        assert self._flag_slots
        if self._records is None:
            self._records = self._queue_records()
        chosen = self._records[calls]
        amaxes = {}
        if self._shares:  # the sets' statistics first (sync-free: a NaN reaches the flag through launch)
            entries = [self._by_name[n] for n in dict.fromkeys(r[0] for r in chosen)]
            amaxes = shared.set_amaxes(entries, state_dict, self._given_amax, check=False)
            if streams:  # computed on this stream: the other streams' launches read them after
                here = torch.cuda.current_stream()
                for side in streams[1:]:
                    side.wait_stream(here)
        slots = self._flag_slots if streams else self._flag_slots[:1]
        current: Conversion | None = None  # whose launch runs: named if it raises SystemExit or worse
        current_name: str | None = None  # the tensor it converts (None: a grouped launch)
        try:
            # a trainer's requires_grad sources: bytes out, never an autograd graph on the outputs
            # (the torch-op launches and copies), as in the checked fn; one switch for the whole range
            with torch.no_grad():
                singles, runs = self._queue_split(calls, chosen, amaxes)
                finite: list[torch.Tensor] = []  # copies and casts: is the source all finite (one stream)
                for i, (name, index, conversion, buffers, _, _) in singles:
                    current, current_name = conversion, name
                    src = state_dict[name]  # the per-tensor work: look the source up, gather it
                    if index:
                        src = src[index]
                    with torch.cuda.stream(streams[i % len(streams)]) if streams else contextlib.nullcontext():
                        slot = slots[i % len(slots)]
                        if name in amaxes:
                            assert conversion.shared_amax is not None and conversion.shared_amax.launch is not None
                            conversion.shared_amax.launch(src, amaxes[name], *buffers, slot)
                        elif conversion.launch is not None:
                            conversion.launch(src, *buffers, slot)
                        else:  # the output is checked: a NaN/Inf copied, or a cast beyond its dtype's range
                            conversion.raw_fn(src, *buffers)
                            out = buffers[0]
                            if out.dtype.is_floating_point:
                                if streams:  # each stream ORs into its own slot
                                    slot.add_(torch.isfinite(out).all().logical_not())
                                else:  # one stream: every copy's verdict reduced at once below
                                    finite.append(torch.isfinite(out).all())
                if finite:
                    slots[0].add_(torch.stack(finite).logical_not().any())
                for j, (conversion, names, indexed, layout) in enumerate(runs):
                    assert conversion.launch_group is not None
                    current, current_name = conversion, None
                    sources = list(map(state_dict.__getitem__, names))  # the per-tensor work, in C
                    for k, index in indexed:  # fused shards: the rows each reads
                        sources[k] = sources[k][index]
                    with torch.cuda.stream(streams[j % len(streams)]) if streams else contextlib.nullcontext():
                        conversion.launch_group(SourceRun(sources, layout), slots[j % len(slots)])
        except ConversionCoreError as exc:  # a copy's or cast's own refusal: name the tensor
            if current_name is None:
                raise
            raise type(exc)(f"tensor {current_name!r}: {exc}") from exc
        except (Exception, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: B036  sys.exit(0) in a plugin's launch: a failure, never an exit
            raise plugin_failure(f"conversion {current.name if current else '?'!r}: launch", exc) from exc

    def _queue_records(self) -> list[tuple[Any, ...]]:
        """Per call, what :meth:`_queue` reads every step, looked up once: its name, source index,
        conversion, buffers, for a ``launch_group`` conversion whether the source has elements
        (None: launched on its own), and the shape of what it reads (a fused shard's rows). The
        sources' shapes are the plan's: :meth:`validate` holds every step to them."""
        records = []
        for call in self._calls:
            entry = self._by_name[call.name]
            conversion = entry.conversion
            shape = entry.src_shape
            if call.index:  # a fused shard: the rows it reads
                shape = tuple(torch.empty(shape, device="meta")[call.index].shape)
            group = None if conversion.launch_group is None else math.prod(shape) > 0
            records.append((call.name, call.index, conversion, call.buffers, group, shape))
        return records

    def _queue_split(
        self, calls: slice, chosen: list[tuple[Any, ...]], amaxes: Mapping[str, Any]
    ) -> tuple[list[tuple[int, tuple[Any, ...]]], list[tuple[Any, ...]]]:
        """The calls of a range split, once per range (and set of shared statistics), into those
        launched one by one (``(position, record)``) and one run per grouped conversion:
        ``(conversion, source names, (run position, index) of fused shards, RunLayout)``. A run
        holds a grouped conversion's calls with elements and no shared statistic."""
        key = (calls.start, calls.stop, calls.step, frozenset(amaxes))
        split = self._splits.get(key)
        if split is not None:
            return split
        singles: list[tuple[int, tuple[Any, ...]]] = []
        picked: dict[int, tuple[Conversion, list[tuple[Any, ...]]]] = {}
        for i, record in enumerate(chosen):
            name, _, conversion, _, group, _ = record
            if group is None or name in amaxes:
                singles.append((i, record))
            elif group:  # a source with no elements has nothing to launch
                picked.setdefault(id(conversion), (conversion, []))[1].append(record)
        runs = []
        for conversion, records in picked.values():
            layout = RunLayout(
                [r[3] for r in records], [r[5] for r in records], [self._by_name[r[0]].src_dtype for r in records]
            )
            indexed = [(k, r[1]) for k, r in enumerate(records) if r[1]]
            runs.append((conversion, [r[0] for r in records], indexed, layout))
        split = self._splits[key] = (singles, runs)
        return split

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
                    self._flags,  # every slot: the step clears them all
                    self.graph_streams,
                    self.graph_first_segment,
                    self.graph_segment_growth,
                )
            self._step.run(state_dict, lambda calls, streams: self._queue(state_dict, calls, streams))
        else:
            self._flags.zero_()
            self._queue(state_dict, slice(None))
        self._check_flag(state_dict)

    def _check_flag(self, state_dict: Mapping[str, Any]) -> None:
        """The one host sync of a launched step: on NaN/Inf, convert tensor by tensor to name it."""
        assert self._flag is not None
        if bool(self._flags.any()):
            self._run_checked(state_dict)
            raise ConversionCoreError("a NaN/Inf was flagged during the step but no tensor failed when re-checked")

    def _run_checked(self, state_dict: Mapping[str, Any]) -> None:
        """Tensor by tensor through each conversion's checked ``fn`` (one host sync per call)."""
        amaxes = shared.set_amaxes(self.entries, state_dict, self._given_amax) if self._shares else {}
        for call in self._calls:
            src = state_dict[call.name]
            conversion = self._by_name[call.name].conversion
            src = src[call.index] if call.index else src
            try:
                if call.name in amaxes:
                    shared.apply_checked(conversion, src, amaxes[call.name], call.buffers)
                else:
                    conversion.fn(src, *call.buffers)
            except ConversionCoreError as exc:
                raise ConversionInputError(f"tensor {call.name!r}: {exc}") from exc
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: B036  SystemExit or worse from plugin code: never a silent success
                raise plugin_failure(f"tensor {call.name!r}: conversion {conversion.name!r}", exc) from exc
            if not conversion.quantizes and not all_finite(call.buffers[0]):  # a copy or cast: its output
                raise non_finite_output(call.name, src, call.buffers[0])
