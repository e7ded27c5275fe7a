"""Launches that a CUDA graph captures: what they build before the capture, and who keeps it.

A graph replays the addresses it recorded. A ``launch_group`` reads a small device table (its
tensors' offsets and strides) that must be copied to the device, and a host-to-device copy cannot
be recorded in a capture. So the plan captures a segment inside one :func:`session`: the segment's
launches run once eagerly (which compiles the kernels), and a launch may :meth:`~Session.keep`
what it built, under a key that names its exact inputs; inside the capture that follows, the same
launch finds it with :meth:`~Session.find` and records only its kernels. The session lives as long
as the segment's graph, so a table a graph reads is never freed while the graph can replay.

A launch captured outside a session (a caller capturing launches itself) gets a clear error from
the plugin, never a graph that reads freed memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any


class Session:
    """What one segment's launches built before its capture, held as long as its graph."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, Any] = {}

    def keep(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` (outside a capture), kept under ``key`` for the capture to :meth:`find`."""
        value = build()
        self._kept[key] = value
        return value

    def find(self, key: Hashable) -> Any:
        """What :meth:`keep` built under ``key``, or None when the eager run built nothing so."""
        return self._kept.get(key)


_current: ContextVar[Session | None] = ContextVar("conversion_core_capture_session", default=None)


@contextmanager
def session() -> Iterator[Session]:
    """The plan's eager run of a segment and its capture happen inside one session."""
    s = Session()
    token = _current.set(s)
    try:
        yield s
    finally:
        _current.reset(token)


def current() -> Session | None:
    """The session of the capture under way, if a plan is capturing."""
    return _current.get()


__all__ = ["Session", "current", "session"]
