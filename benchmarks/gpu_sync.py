"""GPU figures of one weight sync: bytes checked against the CPU path, kernels timed against a copy,
and a bucketed step of the Qwen3-30B-A3B-shaped model whose "send" overlaps its conversion.

One process, one device. Three parts:

1. bytes: every kernel a sync runs on the device (the two FP8 conversions, the digest) gives the
   same bytes as the CPU path, on shapes that are and are not multiples of the 128 block, 2D and
   3D; and the bucketed step's received bytes equal the whole-plan step's bytes. Any mismatch makes
   the script exit 1.
2. kernels: each timed with ``triton.testing.do_bench`` (median) against a device-to-device copy of
   the same input in the same run (bytes in + bytes out); GB/s and ratio to the copy.
3. the step: the model (``bench_model.py``'s shape, fused 3D experts) converted bucket by bucket
   by :class:`~conversion_core.plan.sync.BucketSender`; the stand-in send copies each bucket on a
   side CUDA stream into the receiver's buffer (``--send device``: another device buffer, as the
   brief asks; ``--send host``: pinned host memory, a network-like link that does not share the
   GPU's memory bandwidth). Printed: convert alone, send alone, both overlapped, and the ratio of
   overlapped to max(convert, send) (target <= 1.15). With ``--send device`` both halves are
   bound by the same HBM bandwidth, so the table also prints the floor of doing both at once:
   (convert bytes + send bytes) / copy bandwidth.

    python benchmarks/gpu_sync.py                    # on the GPU (H200): exits 1 on a byte mismatch
    python benchmarks/gpu_sync.py --send host --bucket-mib 512,2048
    python benchmarks/gpu_sync.py --dry-run          # CPU, TRITON_INTERPRET=1, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CONVERSION_CORE_BACKEND"] = "triton"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import ModelShape, build_state_dict  # noqa: E402

import conversion_core as cc  # noqa: E402
from conversion_core.plan import build_plan  # noqa: E402
from conversion_core.plan.sync import BucketSender, StepStats  # noqa: E402
from conversion_core.selection.digest import digest_on_device  # noqa: E402

FORMATS = ("fp8_128x128", "cutlass_fp8_e4m3_per_channel")
GOAL = 1.15
GPU_SHAPES = [(4096, 2048), (2048, 7168), (4095, 2049), (1, 4096), (7, 129), (128, 1536, 2048), (3, 300, 520)]
DRY_SHAPES = [(130, 257), (1, 136), (2, 129, 136)]
#: The dry run's model: one small layer (Triton's interpreter is slow).
TINY = ModelShape(layers=1, hidden=256, heads=2, kv_heads=1, head_dim=128, experts=2, inter=160, vocab=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, reps: int = 20) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=reps * 5, return_mode="median"))
    fn()
    times = []
    for _ in range(max(3, reps // 5)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """The torch (CPU path) backend for a moment; the dry run sets ``triton`` for everything else."""
    old = os.environ.get("CONVERSION_CORE_BACKEND")
    os.environ["CONVERSION_CORE_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ["CONVERSION_CORE_BACKEND"]
        else:
            os.environ["CONVERSION_CORE_BACKEND"] = old


# ---- 1 and 2: kernels ---------------------------------------------------------------------------


def kernels(device: torch.device, shapes: Sequence[tuple[int, ...]], reps: int) -> tuple[list[list[str]], int]:
    registry = cc.load_registry()
    rows, bad = [], 0
    for shape in shapes:
        src = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + shape[-1]))
        src = src.to(torch.bfloat16)
        src[..., -1] *= 256  # outliers: the rest of their group goes subnormal
        dev = src.to(device)
        copy_dst = torch.empty_like(dev)
        copy_ms = median_ms(lambda: copy_dst.copy_(dev), device, reps)  # noqa: B023
        copy_gbps = 2 * nbytes(dev) / (copy_ms * 1e6)
        for name in FORMATS:
            conversion = registry.get(name)
            with torch_path():
                want = conversion.convert(src)  # the CPU path: the torch reference, whatever the backend
            got = conversion.convert(dev)
            ok = all(same(g, w) for g, w in zip(got, want, strict=True))
            bad += not ok
            buffers = conversion.allocate(tuple(dev.shape), device)
            ms = median_ms(lambda: conversion.fn(dev, *buffers), device, reps)  # noqa: B023
            gbps = (nbytes(dev) + nbytes(*buffers)) / (ms * 1e6)
            rows.append(
                [
                    name,
                    str(list(shape)),
                    "ok" if ok else "MISMATCH",
                    f"{gbps:.1f}",
                    f"{copy_gbps:.1f}",
                    f"{gbps / copy_gbps:.2f}",
                ]
            )
        want_d = digest_on_device(src)
        got_d = digest_on_device(dev)
        ok = torch.equal(got_d.cpu(), want_d)
        bad += not ok
        ms = median_ms(lambda: digest_on_device(dev), device, reps)  # noqa: B023
        gbps = nbytes(dev) / (ms * 1e6)
        rows.append(
            [
                "digest",
                str(list(shape)),
                "ok" if ok else "MISMATCH",
                f"{gbps:.1f}",
                f"{copy_gbps:.1f}",
                f"{gbps / copy_gbps:.2f}",
            ]
        )
    return rows, bad


# ---- 3: the bucketed step -----------------------------------------------------------------------


class Done:
    def wait(self) -> None:
        return None


class StreamCopy:
    """The stand-in send: each payload copied on a side stream into the receiver's buffer.

    ``isend`` returns at once; the copy waits for the conversion that wrote the payload (an event on
    the current stream), and ``wait`` makes the current stream, not the host, wait for the copy.
    """

    def __init__(self, capacity: int, device: torch.device, host: bool):
        self.device = device
        pin = host and device.type == "cuda"
        where = "cpu" if host else device
        self.dst = torch.empty(capacity, dtype=torch.uint8, device=where, pin_memory=pin)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.position = 0

    def rewind(self) -> None:
        self.position = 0

    def isend(self, payload: torch.Tensor) -> Any:
        n = payload.numel()
        dst = self.dst[self.position : self.position + n]
        self.position += n
        if self.stream is None:
            dst.copy_(payload)
            return Done()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(payload, non_blocking=True)
        payload.record_stream(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        return _StreamWait(event, self.device)

    def recv(self, payload: torch.Tensor) -> None:
        raise AssertionError("the stand-in link has no receiver to answer")

    def irecv(self, payload: torch.Tensor) -> Any:
        raise AssertionError("the stand-in link has no receiver to answer")


class _StreamWait:
    def __init__(self, event: Any, device: torch.device):
        self.event, self.device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


class Sink:
    def isend(self, payload: torch.Tensor) -> Any:
        return Done()


def timed_step(
    sender: BucketSender, state: dict[str, torch.Tensor], device: torch.device, reps: int
) -> tuple[float, StepStats]:
    times, stats = [], StepStats()
    for i in range(reps + 1):
        if isinstance(sender.transport, StreamCopy):
            sender.transport.rewind()
        sync(device)
        start = time.perf_counter()
        stats = sender.step(state, offer=False)
        sync(device)
        if i:  # the first step warms up (Triton compiles, the allocator grows)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), stats


def copy_bandwidth(size: int, device: torch.device, reps: int) -> float:
    """GB/s of a device copy (read + write counted) in this run."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / (median_ms(lambda: dst.copy_(src), device, reps) * 1e6)


def send_all(link: StreamCopy, layout: Sequence[Any], payloads: Sequence[torch.Tensor]) -> None:
    """The send half alone: every bucket's bytes through the stand-in link."""
    link.rewind()
    for k, b in enumerate(layout):
        link.isend(payloads[k % 2][: b.nbytes]).wait()


def step_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[list[str]], int]:
    shape = TINY if args.dry_run else ModelShape(layers=args.layers)
    state = build_state_dict(shape, fused=True, device=device)
    plan = build_plan(
        state, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    )
    whole = plan.allocate(device)
    plan.run(state)
    out_bytes = nbytes(*whole.values())
    in_bytes = sum(nbytes(state[e.name]) for e in plan.entries)
    copy_gbps = copy_bandwidth(min(out_bytes, 1 << 30), device, args.reps)
    rows, bad = [], 0
    for mib in args.bucket_mib:
        bucket = (mib << 20) if not args.dry_run else (mib << 10)  # dry run: KiB
        layout = BucketSender(plan, bucket).buckets
        capacity = sum(b.nbytes for b in layout)
        link = StreamCopy(capacity, device, host=args.send == "host")
        sender = BucketSender(plan, bucket, transport=link, digests=False)
        alone = BucketSender(plan, bucket, transport=Sink(), digests=False)  # type: ignore[arg-type]
        convert_ms, _ = timed_step(alone, state, device, args.reps)
        payloads = [torch.empty(b.nbytes, dtype=torch.uint8, device=device) for b in layout[:2]]
        send_ms = median_ms(lambda: send_all(link, layout, payloads), device, args.reps)  # noqa: B023
        both_ms, stats = timed_step(sender, state, device, args.reps)
        # bytes: what arrived equals the whole plan's outputs, slot by slot
        for b in layout:
            base = sum(x.nbytes for x in layout[: b.index])
            for s in b.slots:
                got = link.dst[base + s.offset : base + s.offset + s.nbytes]
                bad += not same(got, whole[s.name])
        floor_ms = (in_bytes + out_bytes + (2 * out_bytes if args.send == "device" else 0)) / (copy_gbps * 1e6)
        ratio = both_ms / max(convert_ms, send_ms)
        rows.append(
            [
                f"{mib} {'KiB' if args.dry_run else 'MiB'}",
                str(len(layout)),
                f"{convert_ms:.2f}",
                f"{send_ms:.2f}",
                f"{both_ms:.2f}",
                f"{ratio:.2f}" + (" ok" if ratio <= GOAL else " >goal"),
                f"{floor_ms:.2f}" if args.send == "device" else "-",
                f"{stats.peak_payload_bytes / 2**20:.0f}",
            ]
        )
    print(
        f"model {shape.layers} layers, fused experts: {in_bytes / 1e9:.3f} GB in, {out_bytes / 1e9:.3f} GB out; "
        f"copy {copy_gbps:.1f} GB/s; send={args.send}"
    )
    return rows, bad


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--bucket-mib", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 2048])
    p.add_argument("--send", choices=["device", "host"], default="device")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    if args.dry_run:
        device, shapes, args.reps = torch.device("cpu"), DRY_SHAPES, 1
        args.bucket_mib = [64, 1024]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
            return 2
        device, shapes = torch.device("cuda"), GPU_SHAPES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}")
    rows, bad = kernels(device, shapes, args.reps)
    print(table(["kernel", "shape", "bytes vs CPU", "GB/s", "copy GB/s", "ratio"], rows))
    step, bad_step = step_rows(args, device)
    print(
        table(
            [
                "bucket",
                "buckets",
                "convert ms",
                "send ms",
                "overlapped ms",
                "/max(convert,send)",
                "shared-HBM floor ms",
                "peak payload MiB",
            ],
            step,
        )
    )
    bad += bad_step
    if bad:
        print(f"FAILED: {bad} byte mismatch(es)", file=sys.stderr)
        return 1
    print("bytes: all identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
