"""Run a CPU conversion's chunks on a few threads that each use one intra-op thread.

Why not torch's own intra-op parallelism: a chunked conversion issues thousands of small ops,
each an OpenMP fork/join, and on a loaded machine (CI, a trainer's busy host) every barrier waits
for a descheduled thread; measured on a shared 2-core machine that ran 10x slower than one thread.
Threads that each take whole chunks never wait on each other, and torch ops release the GIL, so
the work uses every core on a quiet machine and degrades gracefully on a busy one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")

# Elements per chunk: its float32 scratch (4 MiB a worker) stays in the last-level cache while the chunk
# is divided, clamped and cast, and a chunk is big enough that the ops' per-call overhead is small.
# Best of 2**19..2**21 on a 2-core AMD EPYC (bf16 4096x8192, 128x128 blocks); about flat on 2 Xeon cores.
CHUNK_ELEMENTS = 1 << 20

_lock = threading.Lock()
_local = threading.local()
_executor: ThreadPoolExecutor | None = None
_executor_size = 0


def _start_executor(size: int) -> ThreadPoolExecutor:
    keep = torch.get_num_threads()
    barrier = threading.Barrier(size)

    def one_intra_op_thread() -> None:
        torch.get_num_threads()  # torch sizes a thread's OpenMP team on first use: settle that first
        torch.set_num_threads(1)  # per thread under OpenMP; also changes the default for later threads
        barrier.wait()  # every initializer on its own thread

    executor = ThreadPoolExecutor(size, thread_name_prefix="conversion-core-cpu")
    for future in [executor.submit(one_intra_op_thread) for _ in range(size)]:
        future.result()
    torch.set_num_threads(keep)  # give later threads the default they had
    return executor


def _pool(size: int) -> ThreadPoolExecutor:
    global _executor, _executor_size
    with _lock:
        if _executor is None or _executor_size < size:
            old, _executor, _executor_size = _executor, _start_executor(size), size
            if old is not None:
                old.shutdown(wait=False)
        return _executor


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _executor, _executor_size
    _executor, _executor_size = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def thread_scratch(key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU buffer of ``numel`` elements, kept per thread and ``(key, dtype)`` across calls.

    Why: a fresh multi-MB ``torch.empty`` is a new mmap, so every conversion paid the page faults
    of its scratch again on first touch (measured: the first op over each buffer ran several times
    slower than the next). Grows only; a few chunk-sized buffers per worker thread stay allocated.
    A key must not be in use twice at once on one thread.
    """
    cache: dict[tuple[str, torch.dtype], torch.Tensor] | None = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get((key, dtype))
    if buf is None or buf.numel() < numel:
        buf = cache[(key, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class _SharedTasks(Iterator[T]):
    """One task list drained by several workers; ``close`` stops them after their current task."""

    def __init__(self, tasks: Sequence[T]) -> None:
        self._tasks = tasks
        self._next = 0
        self._lock = threading.Lock()

    def __next__(self) -> T:
        with self._lock:
            if self._next >= len(self._tasks):
                raise StopIteration
            self._next += 1
            return self._tasks[self._next - 1]

    def close(self) -> None:
        with self._lock:
            self._next = len(self._tasks)


def run_chunks(tasks: Sequence[T], worker: Callable[[Iterable[T]], None]) -> None:
    """Call ``worker(tasks_iterator)`` on up to ``torch.get_num_threads()`` threads sharing ``tasks``.

    Each worker allocates its own scratch once and loops over the tasks it draws. Returns when
    every worker has finished (none is still writing); re-raises the first worker error.
    """
    workers = min(len(tasks), torch.get_num_threads())
    if workers <= 1:
        worker(tasks)
        return
    shared = _SharedTasks(tasks)

    def run() -> None:
        try:
            worker(shared)
        except BaseException:
            shared.close()
            raise

    futures = [_pool(workers).submit(run) for _ in range(workers)]
    wait(futures, return_when=FIRST_EXCEPTION)
    wait(futures)
    for future in futures:
        future.result()
