"""When a captured step may replay which segment: the checks of conversion_core.plan.graph_step on CPU.

A CUDA graph cannot be captured here, so the graphs are stand-ins that record their replays;
tests/gpu/test_model_step_gpu.py runs the real graphs and checks the bytes they write.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion_core.plan.graph_step import CapturedStep, segment_bounds


@given(st.integers(0, 5000), st.integers(1, 64), st.sampled_from([1.25, 1.5, 2.0]))
def test_segments_cover_every_tensor_once_growing(count: int, first: int, growth: float) -> None:
    bounds = segment_bounds(count, first, growth)
    covered = [i for a, b in bounds for i in range(a, b)]
    assert covered == list(range(count))
    sizes = [b - a for a, b in bounds]
    if sizes:
        assert sizes[0] == min(first, count)
    for before, size in zip(sizes[:-2], sizes[1:-1], strict=True):
        assert size == math.ceil(before * growth)  # each full segment grows by the factor
    if len(sizes) > 1:
        assert 0 < sizes[-1] <= math.ceil(sizes[-2] * growth)


def test_first_segment_must_hold_a_tensor_and_segments_must_grow() -> None:
    with pytest.raises(ValueError, match="at least one tensor, got 0"):
        segment_bounds(10, 0)
    with pytest.raises(ValueError, match="must grow, got a growth factor of 1"):
        segment_bounds(10, 4, 1)


class RecordingStep(CapturedStep):
    """Captures stand-in graphs; logs which segment was launched eagerly, captured, replayed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, int]] = []

    def index(self, calls: slice) -> int:
        return next(i for i, seg in enumerate(self.segments) if seg.calls == calls)

    def queue(self, calls: slice, streams: Sequence[Any]) -> None:
        assert streams == (), "eager launches go to the current stream"
        self.log.append(("launch", self.index(calls)))

    def _capture(self, calls: slice, queue: Any, zero_flag: bool) -> Any:
        index = self.index(calls)
        assert zero_flag == (index == 0), "only the first segment clears the NaN/Inf flag"
        self.log.append(("capture", index))
        step = self

        class Graph:
            def replay(self) -> None:
                step.log.append(("replay", index))

        return Graph()

    def step(self, sd: Any) -> list[tuple[str, int]]:
        """One step as Plan.run takes it (replay, else the validated path); returns its log."""
        self.log.clear()
        if not self.replay_if_unchanged(sd, strict=True):
            self.log.append(("run", -1))
            self.run(sd, self.queue)
        return list(self.log)


def make(names: Sequence[str]) -> tuple[RecordingStep, dict[str, torch.Tensor]]:
    flag = torch.zeros(1, dtype=torch.int32)
    step = RecordingStep(names, [1] * len(names), flag, streams=2, first_segment=1, growth=2)
    return step, {n: torch.randn(4, 4) for n in names}


NAMES = [f"t{i}" for i in range(7)]  # segments of 1, 2, 4 tensors: t0 | t1 t2 | t3 .. t6
REPLAY_ALL = [("replay", 0), ("replay", 1), ("replay", 2)]


def captured(step: RecordingStep, sd: dict[str, torch.Tensor]) -> tuple[RecordingStep, dict[str, torch.Tensor]]:
    """After two steps on the same tensors, every segment replays."""
    step.step(sd)
    step.step(sd)
    assert step.step(sd) == [("replay", i) for i in range(len(step.segments))]
    return step, sd


def test_launched_first_captured_when_seen_again_then_replayed() -> None:
    step, sd = make(NAMES)
    assert step.step(sd) == [("run", -1), ("launch", 0), ("launch", 1), ("launch", 2)]
    assert step.step(sd) == [("run", -1)] + [(what, i) for i in range(3) for what in ("capture", "replay")]
    for t in sd.values():
        t.mul_(2)
    assert step.step(dict(sd)) == REPLAY_ALL  # another dict, the same tensors updated in place


def test_sources_moving_every_step_are_launched_never_captured() -> None:
    step, sd = make(NAMES)
    other = {n: t.clone() for n, t in sd.items()}
    for state in [sd, other, sd, other, sd]:
        assert step.step(state) == [("run", -1), ("launch", 0), ("launch", 1), ("launch", 2)]


def test_new_tensors_at_the_same_addresses_are_replayed_without_capture() -> None:
    step, sd = captured(*make(NAMES))
    views = {n: t.view(4, 4) for n, t in sd.items()}  # new objects, same storage and layout
    assert step.step(views) == [("run", -1)] + REPLAY_ALL  # validated once, then
    assert step.step(views) == REPLAY_ALL


@pytest.mark.parametrize("change", ["missing", "extra", "not_a_mapping"])
def test_another_set_of_names_is_refused_before_any_replay(change: str) -> None:
    step, sd = captured(*make(NAMES))
    step.log.clear()
    state: Any = dict(sd)
    if change == "missing":
        del state["t2"]
    elif change == "extra":
        state["unplanned"] = torch.zeros(1)
    else:
        state = list(sd.values())
    assert not step.replay_if_unchanged(state, strict=True)
    assert step.log == []
    if change == "extra":  # strict=False ignores tensors the plan does not know
        assert step.replay_if_unchanged(state, strict=False)
    if change == "missing":  # strict=False: found missing at its segment
        assert not step.replay_if_unchanged(state, strict=False)
        assert step.log == [("replay", 0)]


@pytest.mark.parametrize(
    ("mutate", "segment", "moved"),
    [
        (lambda t: t.set_(torch.randn(4, 4)), 2, True),  # new storage, same object
        (lambda t: t.resize_(2, 8), 2, False),  # same address, another shape
        (lambda t: t.t_(), 1, False),  # same address and shape, other strides
        (lambda t: setattr(t, "data", t.data.view(torch.int32)), 0, False),  # same bytes read as another dtype
    ],
)
def test_a_source_changed_in_place_is_caught_and_converted_again(mutate: Any, segment: int, moved: bool) -> None:
    step, sd = captured(*make(NAMES))
    name = NAMES[{0: 0, 1: 2, 2: 6}[segment]]
    address = sd[name].data_ptr()
    mutate(sd[name])
    held = {storage.data_ptr() for seg in step.segments for storage in seg.storages}
    assert address in held, "the memory a graph reads stays allocated until its segment is captured again"
    # an address is checked before its segment's replay; dtype, shape, strides after the last
    before = [("replay", i) for i in range(segment if moved else 3)]
    until_changed = [("replay", i) for i in range(segment)]
    # then the validated step: the changed segment launched eagerly, captured at the next step
    launched = [("launch", i) if i == segment else ("replay", i) for i in range(3)]
    assert step.step(sd) == before + [("run", -1)] + launched
    captured_again = [e for i in range(3) for e in ([("capture", i)] if i == segment else []) + [("replay", i)]]
    assert step.step(sd) == until_changed + [("run", -1)] + captured_again
    assert step.step(sd) == REPLAY_ALL


def test_checking_a_step_leaves_the_cyclic_gc_nothing_to_collect() -> None:
    """A check that kept a tuple per tensor would trigger full collections every few steps of a
    10k-tensor model (tens of ms each): tracked objects allocated and not freed must stay O(1)."""
    names = [f"t{i}" for i in range(3000)]
    step, sd = captured(*make(names))
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        assert step.replay_if_unchanged(sd, strict=True)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert grown < 50, f"{grown} tracked objects left behind by checking {len(names)} tensors"
