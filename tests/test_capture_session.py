"""A grouped launch's device tables across a CUDA-graph capture (conversion_core.contract.capture).

A table cannot be copied to the device while a stream is captured: the plan's eager run builds it
and the capture must find that very table again, kept as long as the graph. Here the capture is
simulated (``group_table._capturing``), so the rules run on CPU: built once per session, found
by the capture for the same tensors only, refused outside a session; tests/gpu replays real graphs.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.contract import capture
from conversion_core.formats import group_table


def _calls(seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randn(8, 32, generator=g, dtype=torch.float32).to(torch.bfloat16) for _ in range(3)]
    return [(s, torch.empty(8, 32, dtype=torch.uint8), torch.empty(1, 1)) for s in srcs]


@pytest.fixture
def capturing(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    state = {"on": False}
    monkeypatch.setattr(group_table, "_capturing", lambda calls: state["on"])
    return state


def test_outside_a_session_each_call_builds_new_tables(capturing: dict[str, bool]) -> None:
    calls = _calls()
    a, b = group_table.groups(calls), group_table.groups(calls)
    assert a is not b and a[0].table is not b[0].table
    assert torch.equal(a[0].table, b[0].table)


def test_capture_finds_the_tables_the_eager_run_built(capturing: dict[str, bool]) -> None:
    calls = _calls()
    with capture.session() as s:
        eager = group_table.groups(calls)
        capturing["on"] = True
        captured = group_table.groups(calls)
    assert captured is eager  # the very tables the graph will read, held by the session
    assert capture.current() is None
    assert s.find(next(iter(s._kept))) is eager


def test_capture_of_other_tensors_than_the_eager_run_is_refused(capturing: dict[str, bool]) -> None:
    with capture.session():
        group_table.groups(_calls(0))
        capturing["on"] = True
        with pytest.raises(RuntimeError, match="without an eager launch of the same tensors"):
            group_table.groups(_calls(1))


def test_a_view_at_other_strides_is_other_tensors(capturing: dict[str, bool]) -> None:
    calls = _calls()
    moved = [(c[0].t(), *c[1:]) for c in calls]  # same storage and address, other strides
    with capture.session():
        group_table.groups(calls)
        capturing["on"] = True
        with pytest.raises(RuntimeError, match="without an eager launch"):
            group_table.groups(moved)


def test_a_capture_outside_any_session_is_refused(capturing: dict[str, bool]) -> None:
    capturing["on"] = True
    with pytest.raises(RuntimeError, match="not a plan's capture session"):
        group_table.groups(_calls())


def test_sessions_nest_and_end_with_their_block() -> None:
    with capture.session() as outer:
        with capture.session() as inner:
            assert capture.current() is inner
        assert capture.current() is outer
    assert capture.current() is None
