"""A plan's CUDA step recorded once in CUDA graphs and replayed every training step.

A graph reads the addresses it was captured with, so a replay is right only when every source is
the tensor it was captured from, at the same address, dtype, shape and strides. That proof costs
~1 µs of Python per tensor on an H100 host, and a per-expert MoE state dict holds ~10k tensors:
done for the whole model before the first replay, it would add ~9 ms to an 18 ms step. So the
step is cut into segments of consecutive tensors. Before segment k+1 is replayed, while the GPU
runs segment k, its sources are checked to be the same objects at the same addresses (a quarter
of the cost: the memory read is then the current tensors' own); dtypes, shapes and strides are
checked after the last replay, while the GPU works, and any difference converts the step again.
Segments grow geometrically (``first`` tensors, then four times the one before): the GPU starts
after a few dozen checks, and a model of n tensors has about log4(n / first) graph boundaries.

A segment is captured once its sources were found at the same addresses in two steps running;
until then, and whenever they move, it is launched eagerly. Either way a conversion with a
``launch_group`` gets one launch per run of same-shaped tensors (else one launch per tensor): a
graph of ~10k single launches replays at ~1.8 µs per launch of small per-expert kernels and costs
about a second to capture, a graph of grouped launches holds a few kernels that fill the GPU. A
capture runs inside a :func:`conversion_core.contract.capture.session` that the segment keeps with
its graph: the grouped launches' device tables, built by the warm-up just before, live as long as
the graph that reads them. Each segment is captured and dropped on its own; the others keep their
graphs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract import capture

#: What must not change for a replay to read the right bytes: address, dtype, shape, strides.
_LAYOUT: tuple[Callable[[torch.Tensor], Any], ...] = (
    torch.Tensor.data_ptr,
    operator.attrgetter("dtype"),
    operator.attrgetter("shape"),
    torch.Tensor.stride,
)
#: Queues the launches of a range of calls (grouped where a conversion has ``launch_group``):
#: ``()`` eagerly, streams: round-robin over them (capture), None: on the current stream (a
#: capture's warm-up: compiles what the capture records and builds the grouped launches' tables).
Queue = Callable[[slice, Sequence[Any] | None], None]


def layout(tensors: Sequence[torch.Tensor]) -> list[list[Any]]:
    """Addresses, dtypes, shapes and strides of ``tensors``, one list each."""
    return [list(map(get, tensors)) for get in _LAYOUT]


def same_layout(tensors: Sequence[torch.Tensor], want: list[list[Any]]) -> bool:
    """``layout(tensors) == want``, compared item by item without keeping what it reads: a step
    that built ~10k tuples would hand Python's cyclic GC survivors enough to trigger a full
    collection every few steps (tens of ms each)."""
    return len(tensors) == len(want[0]) and all(
        all(map(operator.eq, map(get, tensors), values)) for get, values in zip(_LAYOUT, want, strict=True)
    )


def _settled(tensors: Sequence[torch.Tensor], seg: Segment) -> bool:
    """The segment's sources sit where the last step's sat (recorded addresses), with the dtypes,
    shapes and strides those tensors have now: worth a capture. Read lazily, so a step whose
    sources moved pays one address read per tensor, not four reads (a capture records the full
    layout itself)."""
    addresses = seg.layout[0]
    return (
        len(tensors) == len(addresses) == len(seg.sources)
        and all(map(operator.eq, map(_LAYOUT[0], tensors), addresses))
        and same_layout(tensors, layout(seg.sources))
    )


#: Each graph segment holds this many times the tensors of the one before. Checking a segment's
#: objects and addresses (~0.26 µs of host time per tensor on an H100 host) must take no longer
#: than the GPU converting the one before (~1.9 µs per per-expert tensor), and every graph
#: boundary costs the GPU ~0.05-0.1 ms: on an H100, 4x (5 graphs for 9435 tensors) gave steps
#: 0.1-0.2 ms faster than 2x (9 graphs) and as fast as 8x (benchmarks/bench_model.py --growth).
SEGMENT_GROWTH = 4.0


def segment_bounds(count: int, first: int, growth: float = SEGMENT_GROWTH) -> list[tuple[int, int]]:
    """Cut ``count`` items into consecutive ranges of ``first`` items, then each ``growth`` times
    (rounded up) the one before; the last range holds what is left."""
    if first < 1:
        raise ValueError(f"the first graph segment must hold at least one tensor, got {first}")
    if growth <= 1:
        raise ValueError(f"graph segments must grow, got a growth factor of {growth}")
    bounds, start, size = [], 0, first
    while start < count:
        bounds.append((start, min(count, start + size)))
        start, size = start + size, math.ceil(size * growth)
    return bounds


@dataclass
class Segment:
    """Consecutive plan entries, their calls, and the graph captured from their sources."""

    entries: slice
    calls: slice
    names: list[str]
    graph: Any = None
    #: The tensors of the last step, and the storages the graph was captured from: held, so
    #: the memory a replay reads before the full check stays allocated.
    sources: list[torch.Tensor] = field(default_factory=list)
    storages: list[Any] = field(default_factory=list)
    #: The capture session of the graph: what its launches built before the capture (device tables).
    session: Any = None
    layout: list[list[Any]] = field(default_factory=lambda: [[] for _ in _LAYOUT])


class CapturedStep:
    """The graphs of one plan's step, and the sources they were captured from (held alive)."""

    def __init__(
        self,
        names: Sequence[str],
        calls_per_entry: Sequence[int],
        flag: torch.Tensor,
        streams: int,
        first_segment: int,
        growth: float = SEGMENT_GROWTH,
    ):
        self.names = list(names)
        self.flag = flag
        #: What the segments were cut and captured with.
        self.settings = (streams, first_segment, growth)
        self.streams = max(1, streams)
        self.segments: list[Segment] = []
        call_starts = [0]
        for n in calls_per_entry:
            call_starts.append(call_starts[-1] + n)
        for a, b in segment_bounds(len(self.names), first_segment, growth):
            self.segments.append(Segment(slice(a, b), slice(call_starts[a], call_starts[b]), self.names[a:b]))
        #: A whole step went through :meth:`run` (each segment holds its sources alive).
        self.complete = False

    def replay_if_unchanged(self, state_dict: Mapping[str, Any], strict: bool) -> bool:
        """Replay every segment while ``state_dict`` holds the captured tensors, unchanged.

        Just before a segment is replayed (while the GPU runs the ones before it), its tensors
        are looked up and checked to be the same objects at the same addresses: cheap checks,
        so the GPU never waits on the host. Their dtypes, shapes and strides, which cost five
        times as much to read, are checked after the last replay, while the GPU works; the
        memory a graph reads is then the current tensors' own, or storage held since the capture.
        False means the caller must validate and convert everything again: some or all segments
        have been replayed, and the conversion that follows rewrites them.
        """
        if not self.complete or not isinstance(state_dict, Mapping):
            return False
        if strict and len(state_dict) != len(self.names):
            return False
        for seg in self.segments:
            try:
                srcs = [state_dict[name] for name in seg.names]
            except KeyError:
                return False
            if seg.graph is None or not all(map(operator.is_, srcs, seg.sources)):
                return False
            if not all(map(operator.eq, map(torch.Tensor.data_ptr, srcs), seg.layout[0])):
                return False
            seg.graph.replay()
        return all(same_layout(seg.sources, seg.layout) for seg in self.segments)

    def run(self, state_dict: Mapping[str, Any], queue: Queue) -> None:
        """The step after a full validation of ``state_dict``, segment by segment:

        - replay its graph when the segment's sources sit where the graph reads;
        - capture it, then replay, when they sit where they sat in the previous step too (a
          trainer updating in place, or allocating the same way every step);
        - otherwise launch it eagerly: sources that move every step would pay a capture (about
          three eager steps' worth of host time) every step.
        """
        srcs = [state_dict[name] for name in self.names]
        self.complete = False
        self.flag.zero_()
        for i, seg in enumerate(self.segments):
            seg_srcs = srcs[seg.entries]
            if seg.graph is not None and same_layout(seg_srcs, seg.layout):
                seg.graph.replay()
            elif seg.graph is None and _settled(seg_srcs, seg):
                seg.layout = layout(seg_srcs)  # what a replay is checked against
                with capture.session() as session:  # held with the graph: its launches' tables
                    seg.graph = self._capture(seg.calls, queue, zero_flag=i == 0)
                seg.session = session
                seg.storages = [t.untyped_storage() for t in seg_srcs]
                seg.graph.replay()
            else:  # moved: only the addresses are recorded (one read per tensor), for the next step
                seg.graph, seg.session, seg.storages = None, None, []
                seg.layout = [list(map(_LAYOUT[0], seg_srcs))] + [[] for _ in _LAYOUT[1:]]
                queue(seg.calls, ())
            seg.sources = seg_srcs
        self.complete = True

    def replay(self) -> None:
        for seg in self.segments:
            seg.graph.replay()

    def _capture(self, calls: slice, queue: Queue, zero_flag: bool) -> Any:
        """One eager run of the calls (compiles the kernels, builds grouped launches' tables), then
        the calls captured in a graph, spread over ``streams`` streams, both inside the caller's
        capture session; the first segment also clears the NaN/Inf flag."""
        device = self.flag.device
        main = torch.cuda.current_stream(device)
        sides = [torch.cuda.Stream(device) for _ in range(self.streams)]
        warm = sides[0]
        warm.wait_stream(main)
        try:
            with torch.cuda.stream(warm):
                queue(calls, None)
        finally:  # even when a launch raised: what was queued ends before main reuses memory
            main.wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=warm):
            capture = torch.cuda.current_stream(device)
            if zero_flag:
                self.flag.zero_()
            for side in sides[1:]:
                side.wait_stream(capture)
            queue(calls, [capture, *sides[1:]])
            for side in sides[1:]:
                capture.wait_stream(side)
        return graph
