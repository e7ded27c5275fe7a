"""When a captured step may replay which segment: the checks of conversion_core.graph_step on CPU.

A CUDA graph cannot be captured here, so the graphs are stand-ins that record their replays;
tests/gpu/test_model_step_gpu.py runs the real graphs and checks the bytes they write.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion_core.graph_step import CapturedStep, segment_bounds


@given(st.integers(0, 5000), st.integers(1, 64))
def test_segments_cover_every_tensor_once_doubling(count: int, first: int) -> None:
    bounds = segment_bounds(count, first)
    covered = [i for a, b in bounds for i in range(a, b)]
    assert covered == list(range(count))
    sizes = [b - a for a, b in bounds]
    assert all(size == first * 2**k for k, size in enumerate(sizes[:-1]))
    if sizes:
        assert 0 < sizes[-1] <= first * 2 ** (len(sizes) - 1)


def test_first_segment_must_hold_a_tensor() -> None:
    with pytest.raises(ValueError, match="at least one tensor, got 0"):
        segment_bounds(10, 0)


class RecordingStep(CapturedStep):
    """Captures stand-in graphs that log which segment replayed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, int]] = []

    def _capture(self, calls: slice, queue: Any, zero_flag: bool) -> Any:
        index = next(i for i, seg in enumerate(self.segments) if seg.calls == calls)
        assert zero_flag == (index == 0), "only the first segment clears the NaN/Inf flag"
        self.log.append(("capture", index))
        step = self

        class Graph:
            def replay(self) -> None:
                step.log.append(("replay", index))

        return Graph()


def make(names: Sequence[str]) -> tuple[RecordingStep, dict[str, torch.Tensor]]:
    step = RecordingStep(names, [1] * len(names), torch.zeros(1, dtype=torch.int32), streams=2, first_segment=1)
    return step, {n: torch.randn(4, 4) for n in names}


NAMES = [f"t{i}" for i in range(7)]  # segments of 1, 2, 4 tensors


def replays(log: list[tuple[str, int]]) -> list[int]:
    return [i for what, i in log if what == "replay"]


def test_in_place_updates_replay_every_segment_without_capturing() -> None:
    step, sd = make(NAMES)
    assert not step.replay_if_unchanged(sd, strict=True)  # nothing captured yet
    step.capture_and_replay(sd, lambda calls, streams: None)
    assert step.log == [("capture", 0), ("capture", 1), ("capture", 2), ("replay", 0), ("replay", 1), ("replay", 2)]
    step.log.clear()
    for t in sd.values():
        t.mul_(2)
    assert step.replay_if_unchanged(dict(sd), strict=True)  # another dict, the same tensors
    assert step.log == [("replay", 0), ("replay", 1), ("replay", 2)]


@pytest.mark.parametrize("change", ["missing", "extra", "not_a_mapping"])
def test_another_set_of_names_is_refused_before_any_replay(change: str) -> None:
    step, sd = make(NAMES)
    step.capture_and_replay(sd, lambda calls, streams: None)
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
    if change == "missing":  # strict=False: found missing at its segment (t0 | t1 t2 | ...)
        assert not step.replay_if_unchanged(state, strict=False)
        assert replays(step.log) == [0]


@pytest.mark.parametrize(
    ("mutate", "segment"),
    [
        (None, 2),  # another tensor object, equal in everything else
        (lambda t: t.set_(torch.randn(4, 4)), 2),  # new storage, same object
        (lambda t: t.resize_(2, 8), 2),  # same address, another shape
        (lambda t: t.t_(), 1),  # same address and shape, other strides
        (lambda t: setattr(t, "data", t.data.view(torch.int32)), 0),  # same bytes read as another dtype
    ],
)
def test_a_source_changed_in_place_stops_the_replays_at_its_segment(mutate: Any, segment: int) -> None:
    step, sd = make(NAMES)
    step.capture_and_replay(sd, lambda calls, streams: None)
    step.log.clear()
    name = NAMES[{0: 0, 1: 2, 2: 6}[segment]]  # segments hold t0 | t1 t2 | t3 .. t6
    if mutate is None:
        sd[name] = sd[name].view(4, 4)  # a view: the same storage, address, dtype, shape, strides
    else:
        mutate(sd[name])
    assert not step.replay_if_unchanged(sd, strict=True)
    assert replays(step.log) == list(range(segment))  # earlier segments ran on their unchanged sources
    step.log.clear()
    step.capture_and_replay(sd, lambda calls, streams: None)
    # a view reads the same bytes the graph reads: held from now on, nothing captured again
    captured = [] if mutate is None else [("capture", segment)]
    assert step.log == captured + [("replay", i) for i in range(3)]
    step.log.clear()
    assert step.replay_if_unchanged(sd, strict=True)


def test_checking_a_step_leaves_the_cyclic_gc_nothing_to_collect() -> None:
    """A check that kept a tuple per tensor would trigger full collections every few steps of a
    10k-tensor model (tens of ms each): tracked objects allocated and not freed must stay O(1)."""
    names = [f"t{i}" for i in range(3000)]
    step, sd = make(names)
    step.capture_and_replay(sd, lambda calls, streams: None)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        assert step.replay_if_unchanged(sd, strict=True)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert grown < 50, f"{grown} tracked objects left behind by checking {len(names)} tensors"
