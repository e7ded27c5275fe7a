"""A plan's grouped launches get a SourceRun: the tables group_table builds from its fixed layout
are the tables it builds from the same calls as plain tuples (the generic path, the judge)."""

from __future__ import annotations

import pytest
import torch

from conversion_core.contract.runs import RunLayout, SourceRun
from conversion_core.formats import group_table


def _calls() -> list[tuple[torch.Tensor, ...]]:
    """2-D and 3-D sources, two dtypes, per-expert views of one stack, a transposed source among
    contiguous ones of its shape (a group split by K's contiguity), buffers of two dtypes."""
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(4, 48, 32, generator=g).to(torch.bfloat16)
    sources = [stack[i] for i in range(4)]
    sources.append(torch.randn(32, 48, generator=g).to(torch.bfloat16).t())  # (48, 32), K strided
    sources.append(torch.randn(3, 16, 32, generator=g).to(torch.bfloat16))
    sources.append(torch.randn(48, 32, generator=g).half())
    sources.append(torch.randn(3, 16, 32, generator=g).to(torch.bfloat16))
    return [
        (s, torch.empty(s.shape, dtype=torch.uint8), torch.empty((*s.shape[:-1], 1), dtype=torch.float32))
        for s in sources
    ]


def _run(calls: list[tuple[torch.Tensor, ...]]) -> SourceRun:
    layout = RunLayout([c[1:] for c in calls], [tuple(c[0].shape) for c in calls], [c[0].dtype for c in calls])
    return SourceRun([c[0] for c in calls], layout)


def _canonical(groups: list[group_table.Group]) -> list[tuple]:
    return sorted(
        (
            g.shape,
            g.aligned,
            g.contiguous_k,
            tuple(t.data_ptr() for t in g.bases),
            tuple(tuple(c[0].data_ptr() for c in g.calls)),
            tuple(map(tuple, g.table.tolist())),
        )
        for g in groups
    )


@pytest.mark.parametrize("max_group", [group_table.MAX_GROUP, 2])
def test_a_source_run_builds_the_tables_of_its_calls_as_tuples(max_group: int) -> None:
    calls = _calls()
    run = _run(calls)
    fast = group_table.groups(run, max_group)
    generic = group_table.groups(list(calls), max_group)
    assert _canonical(fast) == _canonical(generic)
    assert len(fast) == len(generic) >= 4  # shape, dtype and K's contiguity each split a group


def test_a_source_run_reused_with_new_sources_reads_the_new_addresses() -> None:
    """The layout's buffer columns are derived once; the sources' columns are read every step."""
    calls = _calls()
    run = _run(calls)
    group_table.groups(run)
    moved = [c[0].clone() if c[0].is_contiguous() else c[0] for c in calls]  # new addresses
    again = SourceRun(moved, run.layout)
    assert "group_table" in run.layout.derived
    expected = [(s, *c[1:]) for s, c in zip(moved, calls, strict=True)]
    assert _canonical(group_table.groups(again)) == _canonical(group_table.groups(expected))


def test_a_source_run_is_a_sequence_of_its_calls() -> None:
    calls = _calls()
    run = _run(calls)
    assert len(run) == len(calls)
    for got, want in zip(run, calls, strict=True):
        assert all(a is b for a, b in zip(got, want, strict=True))
    assert [tuple(c) for c in run[1:3]] == [tuple(c) for c in calls[1:3]]


def test_a_run_layout_or_source_run_of_mismatched_lengths_is_refused() -> None:
    calls = _calls()
    with pytest.raises(ValueError, match="one shape and dtype per call"):
        RunLayout([c[1:] for c in calls], [tuple(c[0].shape) for c in calls[1:]], [c[0].dtype for c in calls])
    with pytest.raises(ValueError, match="sources for a run layout"):
        SourceRun([c[0] for c in calls[1:]], _run(calls).layout)
