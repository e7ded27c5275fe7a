"""The convert loop as a pipeline: read, convert and write overlap, within bounded memory.

Three things run at once:

- **read**: the source shards are memory-mapped; before a tensor is converted the kernel is asked
  to read it and the next :data:`READ_AHEAD_BYTES` (``posix_fadvise(WILLNEED)``, into the next
  shard at a shard's end), so disk reads run while the CPU converts;
- **convert**: on the calling thread, one tensor at a time, through the plan (each conversion's
  checked ``fn``; the plugins' CPU paths may spread their chunks over every core);
- **write**: one writer thread puts each output at its offset in the output shard (whose header
  was written first from the plan), starts its writeback to disk at once and frees it; a second
  thread makes each finished shard durable (``fdatasync``), so the writer goes on with the next
  shard's outputs while the disk catches up.

Memory stays bounded: at most :data:`IN_FLIGHT_BYTES` of converted outputs wait for the writer
(the converter blocks beyond that, except that one output of any size may always be in flight),
and a source tensor's pages are dropped from this process once it is converted. A tensor kept as
it is goes file to file without a copy in this process, after the same NaN/Inf check as the
plan's. ``on_shard_written`` is called on the calling thread, in shard order, as each shard
becomes durable; an error anywhere (a NaN in a weight, a full disk) stops the pipeline, waits for
the writer and raises.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..contract import all_finite
from ..errors import ConversionInputError
from ..plan import Plan
from ..plan.calls import non_finite_source
from ..plan.decide import PlanEntry
from .shard_files import MappedShard, ShardWriter

#: Converted bytes allowed to wait for the writer.
IN_FLIGHT_BYTES = 128 << 20
#: Source bytes asked of the disk ahead of the tensor being converted (at least the next tensor):
#: page cache, not this process's memory, until a tensor is converted.
READ_AHEAD_BYTES = 128 << 20


class _Budget:
    """Bytes in flight to the writer: ``take`` blocks while over budget (one item always passes)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def passthrough(entry: PlanEntry) -> bool:
    """A tensor kept as it is, under its own name, dtype and shape: its bytes go file to file."""
    if entry.kept is None or len(entry.outputs) != 1:
        return False
    out = entry.outputs[0]
    return (out.name, out.dtype, out.shape) == (entry.name, entry.src_dtype, entry.src_shape)


def _finite(name: str, src: torch.Tensor) -> None:
    """Refuse a NaN or Inf anywhere in ``src`` (a kept tensor: nothing else reads all of it)."""
    if not all_finite(src):
        raise non_finite_source(name, src)


#: Output dtypes whose NaN/Inf the pipeline looks for (narrower formats are the plugins' to keep finite).
CHECKED_OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _finite_output(entry: PlanEntry, name: str, out: torch.Tensor) -> None:
    """Refuse a NaN or Inf in a written float output: a finite source can overflow a narrower dtype."""
    if out.dtype in CHECKED_OUTPUT_DTYPES and not all_finite(out):
        raise ConversionInputError(
            f"tensor {entry.name!r}: output {name!r} of conversion {entry.conversion.name!r} holds NaN or Inf "
            f"although the source is finite (a value past the range of {str(out.dtype).removeprefix('torch.')}, "
            "or the conversion's own fault); refusing to write it"
        )


def run_pipeline(
    plan: Plan,
    src_dir: Path,
    dst_dir: Path,
    shards: Sequence[tuple[str, Sequence[str]]],
    *,
    device: str | torch.device = "cpu",
    on_tensor: Callable[[int], None] = lambda nbytes: None,
    on_shard_written: Callable[[str], None] = lambda file: None,
    in_flight_bytes: int | None = None,
    shared_amax: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Convert every shard of ``src_dir`` into the same file name in ``dst_dir``.

    Returns ``{"weight_map": {output -> file}, "bytes_in": int, "bytes_out": int}``.
    ``in_flight_bytes``: default :data:`IN_FLIGHT_BYTES`. ``shared_amax``: the whole-tensor amax
    of every member of a shared-statistic set (each tensor is converted alone, so the set's other
    members are given to ``Plan.run``).
    """
    shared = dict(shared_amax or {})
    device = torch.device(device)
    budget = _Budget(IN_FLIGHT_BYTES if in_flight_bytes is None else in_flight_bytes)
    writer = ThreadPoolExecutor(1, thread_name_prefix="conversion-core-writer")
    syncer = ThreadPoolExecutor(1, thread_name_prefix="conversion-core-sync")
    # (file, the writer's hand-over of its finish to the syncer) in shard order
    pending: list[tuple[str, Future[Future[None]]]] = []
    jobs: list[Future[None]] = []
    weight_map: dict[str, str] = {}
    bytes_in = bytes_out = 0

    def submit(fn: Callable[[], None], nbytes: int) -> None:
        budget.take(nbytes)

        def job() -> None:
            try:
                fn()
            finally:
                budget.give(nbytes)

        jobs.append(writer.submit(job))

    def drain(block: bool) -> None:
        """Raise the writer's first error; report shards that became durable, in order."""
        for job in [j for j in jobs if j.done()]:
            job.result()
            jobs.remove(job)
        while pending and (block or _finished(pending[0][1])):
            file, handed = pending.pop(0)
            handed.result().result()
            on_shard_written(file)

    def hand_over(shard: MappedShard, out_writer: ShardWriter) -> Future[None]:
        """On the writer, after the shard's last write: its ``fdatasync`` goes to the syncer."""
        return syncer.submit(_finish, shard, out_writer)

    subs = [(file, plan.subset(names)) for file, names in shards]
    order = [(k, entry.name) for k, (_, sub) in enumerate(subs) for entry in sub.entries]
    sources: dict[int, MappedShard] = {}  # opened on first use (a prefetch may open the next one)
    writers: list[ShardWriter] = []  # closed by their finish, or here on an error

    def source(k: int) -> MappedShard:
        if k not in sources:
            sources[k] = MappedShard(src_dir / subs[k][0])
        return sources[k]

    ahead, asked = -1, 0  # the last position whose read was started; bytes started beyond the current one

    def prefetch(position: int) -> None:
        """Start reading :data:`READ_AHEAD_BYTES` of tensors after ``position``, across shard boundaries."""
        nonlocal ahead, asked
        if 0 <= position <= ahead:
            k, name = order[position]
            asked -= source(k).stored(name).nbytes
        while ahead + 1 < len(order) and (ahead <= position + 1 or asked < READ_AHEAD_BYTES):
            ahead += 1
            k, name = order[ahead]
            source(k).prefetch(name)
            if ahead > position:
                asked += source(k).stored(name).nbytes

    try:
        position = -1
        for k, (file, sub) in enumerate(subs):
            shard = source(k)
            layout = [(o.name, o.dtype, o.shape) for e in sub.entries for o in e.outputs]
            out_writer = ShardWriter(dst_dir / file, layout)
            writers.append(out_writer)
            for entry in sub.entries:
                position += 1
                prefetch(position)
                src = shard.tensor(entry.name)
                nbytes = shard.stored(entry.name).nbytes
                if passthrough(entry):
                    _finite(entry.name, src)
                    del src
                    submit(functools.partial(out_writer.copy, entry.name, shard, entry.name), 0)
                    bytes_out += nbytes
                else:
                    one = sub.subset([entry.name])
                    one.allocate(device)
                    given = {m: v for m, v in shared.items() if m != entry.name}
                    outputs = one.run({entry.name: src.to(device)}, shared_amax=given or None)
                    del src, one
                    for name, out in outputs.items():
                        host = out.cpu()
                        _finite_output(entry, name, host)
                        size = host.numel() * host.element_size()
                        submit(functools.partial(out_writer.write, name, host), size)
                        bytes_out += size
                    del outputs
                shard.release(entry.name)
                weight_map.update({o.name: file for o in entry.outputs})
                bytes_in += nbytes
                on_tensor(nbytes)
                drain(block=False)
            pending.append((file, writer.submit(hand_over, shard, out_writer)))
        drain(block=True)
        for job in jobs:
            job.result()
    finally:
        writer.shutdown(wait=True, cancel_futures=True)  # first: it hands work to the syncer
        syncer.shutdown(wait=True, cancel_futures=True)
        for out_writer in writers:
            out_writer.close()
        for shard in sources.values():
            shard.close()
    return {"weight_map": weight_map, "bytes_in": bytes_in, "bytes_out": bytes_out}


def _finished(handed: Future[Future[None]]) -> bool:
    if not handed.done():
        return False
    return handed.exception() is not None or handed.result().done()


def _finish(shard: MappedShard, out_writer: ShardWriter) -> None:
    try:
        out_writer.finish()
    finally:
        out_writer.close()
        shard.close()


__all__ = ["IN_FLIGHT_BYTES", "READ_AHEAD_BYTES", "passthrough", "run_pipeline"]
