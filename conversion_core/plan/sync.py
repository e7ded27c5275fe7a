"""One weight sync: a trainer's plan converted bucket by bucket, each bucket sent while the next converts.

Sender (every trainer rank runs :meth:`BucketSender.step`; one of them holds the transport)::

    sender = BucketSender(plan, bucket_bytes=256 << 20, like=state_dict, transport=DistTransport(dst=r))
    stats = sender.step(state_dict)        # raises SyncRefused (with the receiver's diff) if refused

Receiver (the inference process)::

    receiver = Receiver(engine_buffers, inference_config)        # conversion_core.selection
    result = receive_update(receiver, src=0)                     # check, then buckets applied

The protocol, over any :class:`Transport` (torch.distributed point-to-point on gloo or NCCL here):

1. the sender sends one JSON message: the plan's manifest (names, dtypes, shapes, tags of every
   output) and the bucket layout;
2. the receiver checks it against its own expectations and answers with the verdict and its diff;
   a refusal ends the update there, before any tensor byte is sent;
3. the sender converts bucket 0 and sends it; then, per bucket, converts bucket k+1 while bucket k
   is on the wire (``isend``), and waits for bucket k before sending k+1. Each bucket's payload is
   followed by the int64 digests of its outputs, computed where the bytes live;
4. the receiver receives bucket k+1 while it applies bucket k (digests checked first).

Memory: the sender holds at most two buckets of converted bytes (the one on the wire and the one
converting), plus, for DTensor sources, the bucket's local shards and one gathered output at a time
(gathered whole for the receiver, which is not sharded). Every buffer is the size of one bucket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConversionCoreError, ConversionInputError
from ..selection.digest import digest_on_device
from ..selection.update import Receiver
from ..selection.verdict import Problem, Verdict
from .buckets import Bucket, bucket_layout, layout_from_json, layout_to_json
from .local import Plan


class SyncRefused(ConversionCoreError):
    """The receiver refused the update before any byte was sent; the message holds its diff."""


class Handle(Protocol):
    def wait(self) -> Any: ...


class Transport(Protocol):
    """Moves byte tensors between the two ends; ``isend`` may return before the bytes left."""

    def isend(self, payload: torch.Tensor) -> Handle: ...
    def recv(self, payload: torch.Tensor) -> None: ...
    def irecv(self, payload: torch.Tensor) -> Handle: ...


class DistTransport:
    """torch.distributed point-to-point to one peer rank (gloo: CPU tensors; NCCL: CUDA tensors)."""

    def __init__(self, peer: int, group: Any = None, device: torch.device | str = "cpu"):
        import torch.distributed as dist

        self.dist, self.peer, self.group, self.device = dist, peer, group, torch.device(device)

    def isend(self, payload: torch.Tensor) -> Handle:
        work = self.dist.isend(payload, dst=self.peer, group=self.group)
        assert work is not None  # None only on ranks outside the group, which never send
        return work

    def recv(self, payload: torch.Tensor) -> None:
        self.dist.recv(payload, src=self.peer, group=self.group)

    def irecv(self, payload: torch.Tensor) -> Handle:
        work = self.dist.irecv(payload, src=self.peer, group=self.group)
        assert work is not None
        return work


def send_json(transport: Transport, value: Any, device: torch.device | str = "cpu") -> None:
    data = json.dumps(value).encode("utf-8")
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    transport.isend(size).wait()
    transport.isend(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)).wait()


def recv_json(transport: Transport, device: torch.device | str = "cpu") -> Any:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    transport.recv(size)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    transport.recv(data)
    return json.loads(bytes(data.cpu().numpy()).decode("utf-8"))


@dataclass
class StepStats:
    """One sender step: seconds converting, packing, blocked on the wire, in all; bytes sent."""

    convert_s: float = 0.0
    pack_s: float = 0.0
    wait_s: float = 0.0
    total_s: float = 0.0
    bytes_sent: int = 0
    buckets: int = 0
    #: Largest payload this step held alive at once (bytes), counted at each allocation.
    peak_payload_bytes: int = 0


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _gathered(out: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor output (a collective on its mesh), plain outputs as they are."""
    from torch.distributed.tensor import DTensor

    if not isinstance(out, DTensor):
        return out
    local = out.to_local()
    if local.element_size() == 1 and local.dtype not in (torch.uint8, torch.int8):
        # gloo cannot move every one-byte dtype: gather the same bytes as uint8 (same shape at one byte per element)
        local = local.view(torch.uint8)
        whole = DTensor.from_local(local, out.device_mesh, out.placements, shape=out.shape, stride=out.stride())
        return whole.full_tensor().view(out.dtype)
    return out.full_tensor()


class BucketSender:
    """Converts a plan bucket by bucket and sends each bucket while the next converts (module docstring).

    :param plan: the whole-model plan (its decisions; its own buffers are never allocated).
    :param bucket_bytes: the bucket size; see :func:`~conversion_core.plan.buckets.bucket_layout`.
    :param like: DTensor state dict (sharded sources), as for ``Plan.allocate(like=...)``.
    :param device: where plain sources' outputs are converted (default: the first source's device).
    :param transport: the link to the receiver; None on trainer ranks that only help convert.
    :param digests: send per-output digests after each bucket.
    """

    def __init__(
        self,
        plan: Plan,
        bucket_bytes: int,
        *,
        like: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        transport: Transport | None = None,
        digests: bool = True,
        control_device: torch.device | str = "cpu",
    ):
        self.plan, self.like, self.transport, self.digests = plan, like, transport, digests
        self.device = None if device is None else torch.device(device)
        self.control_device = torch.device(control_device)
        self.buckets: list[Bucket] = bucket_layout(plan, bucket_bytes)
        self.bucket_bytes = bucket_bytes
        #: Called with each payload before it is sent (tests: a corrupting wire).
        self.on_payload: Callable[[int, torch.Tensor], None] | None = None

    def message(self) -> dict[str, Any]:
        """What the receiver checks before any byte is sent: manifest and bucket layout."""
        return {"manifest": self.plan.manifest(), "buckets": layout_to_json(self.buckets), "digests": self.digests}

    def offer(self) -> None:
        """Steps 1-2: send the manifest, wait for the verdict; raise :class:`SyncRefused` on a refusal."""
        if self.transport is None:
            return
        send_json(self.transport, self.message(), self.control_device)
        answer = recv_json(self.transport, self.control_device)
        if not answer.get("accepted"):
            raise SyncRefused("the receiver refused the update before any byte was sent:\n" + answer.get("diff", ""))

    def _convert(self, k: int, state_dict: Mapping[str, Any], stats: StepStats) -> torch.Tensor | None:
        """Bucket k's payload: the sub-plan's own arena when it matches the layout, else packed."""
        bucket = self.buckets[k]
        sub = self.plan.subset(bucket.entries)  # a fresh plan: its buffers die with the payload
        start = time.perf_counter()
        if self.like is not None:
            outputs = sub.allocate(like=self.like)
        else:
            device = self.device or next(iter(state_dict[n] for n in bucket.entries)).device
            outputs = sub.allocate(device)
        sub.run(state_dict, strict=False)
        stats.convert_s += time.perf_counter() - start
        start = time.perf_counter()
        arena = sub.arena
        assert arena is not None
        direct = self.like is None and all(
            outputs[s.name].data_ptr() - arena.data_ptr() == s.offset for s in bucket.slots
        )
        if direct:
            payload: torch.Tensor | None = arena[: bucket.nbytes]
        else:
            payload = None
            if self.transport is not None:
                payload = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=arena.device)
            for s in bucket.slots:  # every rank joins each gather; only the sending one keeps the bytes
                whole = _gathered(outputs[s.name])
                if payload is not None:
                    payload[s.offset : s.offset + s.nbytes].copy_(_byte_view(whole.contiguous()))
        stats.peak_payload_bytes = max(stats.peak_payload_bytes, int(arena.numel()) + (0 if direct else bucket.nbytes))
        stats.pack_s += time.perf_counter() - start
        return payload

    def _send(self, k: int, payload: torch.Tensor) -> list[Handle]:
        assert self.transport is not None
        sums = None
        if self.digests:  # of the bytes as converted, before they touch the wire
            bucket = self.buckets[k]
            sums = torch.stack([digest_on_device(payload[s.offset : s.offset + s.nbytes]) for s in bucket.slots])
        if self.on_payload is not None:
            self.on_payload(k, payload)
        handles = [self.transport.isend(payload)]
        if sums is not None:
            handles.append(self.transport.isend(sums.to(self.control_device)))
        return handles

    def step(self, state_dict: Mapping[str, Any], *, offer: bool = True) -> StepStats:
        """One update: offer, then every bucket converted and sent, conversion overlapping the wire.

        ``offer=False`` skips the check round trip (a transport with no receiver behind it: benchmarks).
        """
        stats = StepStats(buckets=len(self.buckets))
        start = time.perf_counter()
        if offer:
            self.offer()
        in_flight: list[Handle] = []
        alive: list[torch.Tensor] = []
        for k in range(len(self.buckets)):
            payload = self._convert(k, state_dict, stats)  # overlaps bucket k-1 on the wire
            wait = time.perf_counter()
            for handle in in_flight:
                handle.wait()
            stats.wait_s += time.perf_counter() - wait
            in_flight, alive = [], []
            if payload is not None and self.transport is not None:
                in_flight = self._send(k, payload)
                alive = [payload]  # kept until its send completes
                stats.bytes_sent += payload.numel()
        wait = time.perf_counter()
        for handle in in_flight:
            handle.wait()
        stats.wait_s += time.perf_counter() - wait
        del alive
        stats.total_s = time.perf_counter() - start
        return stats


@dataclass
class ReceiveResult:
    verdict: Verdict
    apply_s: float = 0.0
    recv_wait_s: float = 0.0
    bytes_received: int = 0
    tensors: int = 0
    layout_problems: list[str] = field(default_factory=list)


def _layout_problems(verdict: Verdict, buckets: Sequence[Bucket], receiver: Receiver) -> list[Problem]:
    """Every announced tensor placed exactly once, in a slot of exactly its size."""
    problems = []
    seen: dict[str, int] = {}
    for b in buckets:
        for s in b.slots:
            if s.name in seen:
                problems.append(Problem("manifest", s.name, f"placed in buckets {seen[s.name]} and {b.index}"))
            seen[s.name] = b.index
            want = receiver.expected.tensors.get(s.name)
            if want is not None and s.nbytes != want.nbytes:
                problems.append(Problem("manifest", s.name, f"slot of {s.nbytes} bytes, the tensor has {want.nbytes}"))
    problems += [Problem("manifest", n, "announced but in no bucket") for n in verdict.sent if n not in seen]
    return problems


def receive_update(
    receiver: Receiver, transport: Transport, control_device: torch.device | str = "cpu"
) -> ReceiveResult:
    """The receiving end of one update (module docstring): check, answer, then buckets applied as they arrive.

    Returns the verdict (refused: nothing was received or written). A digest mismatch raises,
    naming the tensor, after the earlier buckets were applied.
    """
    message = recv_json(transport, control_device)
    manifest = message.get("manifest") if isinstance(message, dict) else None
    verdict = receiver.check(manifest if manifest is not None else {})
    buckets: list[Bucket] = []
    if verdict.accepted:
        try:
            buckets = layout_from_json(message.get("buckets"))
            extra = _layout_problems(verdict, buckets, receiver)
        except ConversionInputError as exc:
            extra = [Problem("manifest", "buckets", str(exc))]
        if extra:
            verdict = Verdict(verdict.problems + tuple(extra), verdict.sent)
    send_json(transport, {"accepted": verdict.accepted, "diff": verdict.diff()}, control_device)
    result = ReceiveResult(verdict)
    if not verdict.accepted:
        return result
    with_digests = bool(message.get("digests"))
    device = next(iter(receiver.buffers.values())).device if receiver.buffers else torch.device("cpu")

    def post(b: Bucket) -> tuple[torch.Tensor, torch.Tensor | None, list[Handle]]:
        payload = torch.empty(b.nbytes, dtype=torch.uint8, device=device)
        handles = [transport.irecv(payload)]
        sums = None
        if with_digests:
            sums = torch.empty((len(b.slots), 2), dtype=torch.int64, device=control_device)
            handles.append(transport.irecv(sums))
        return payload, sums, handles

    pending = post(buckets[0]) if buckets else None
    for k, b in enumerate(buckets):
        assert pending is not None
        payload, sums, handles = pending
        wait = time.perf_counter()
        for h in handles:
            h.wait()
        result.recv_wait_s += time.perf_counter() - wait
        pending = post(buckets[k + 1]) if k + 1 < len(buckets) else None  # arrives while this one applies
        start = time.perf_counter()
        incoming = {s.name: payload[s.offset : s.offset + s.nbytes] for s in b.slots}
        digests = None
        if sums is not None:
            digests = {
                s.name: (int(a) % (1 << 64), int(c) % (1 << 64))
                for s, (a, c) in zip(b.slots, sums.tolist(), strict=True)
            }
        result.bytes_received += receiver.apply(verdict, incoming, digests)
        result.tensors += len(incoming)
        result.apply_s += time.perf_counter() - start
    return result
