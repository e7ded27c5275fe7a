"""Host time the checked ``Conversion.fn`` adds per call over the plugin's own function (CPU, tiny tensors).

The checks run on the host before any kernel, so on a GPU they add to every call's latency; this
measures them where nothing else moves: a tiny tensor, the torch path, ``fn`` against ``raw_fn``
(same arguments), and ``convert_many`` over a batch against ``raw_fn`` over the same batch.
``noop_rows_launched`` is the same no-op with a ``launch_group`` that does nothing and the
backend told to launch (as on a GPU): its ``many/item`` is convert_many's check pass and its one
flag read per batch, shared by the batch.

    python benchmarks/bench_call_overhead.py [--calls 20000] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

import conversion_core as cc


def _per_call_us(fn: Callable[[], None], calls: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def _noop_conversion() -> cc.Conversion:
    """Two outputs (a value and a per-row scale) and a function that does nothing: ``fn - raw_fn`` is
    then exactly the checks' host time."""

    def noop(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor) -> None:
        return None

    return cc.Conversion(
        name="noop_rows",
        fn=noop,
        requires_scale=True,
        dst_dtype=torch.float32,
        scale_shape=lambda shape: tuple(shape[:-1]),
        scale_name="weight_s",
        compile_target="noop_rows",
        src_ndims=(2, 3),
    )


def _launched_noop() -> cc.Conversion:
    def launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, flag: torch.Tensor) -> None:
        return None

    def launch_group(items: Sequence[tuple[torch.Tensor, ...]], flag: torch.Tensor) -> None:
        return None

    return _noop_conversion().replace(name="noop_rows_launched", launch=launch, launch_group=launch_group)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_call_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--names", default="noop_rows,noop_rows_launched,bf16_cast,fp8_128x128,cutlass_fp8_e4m3_per_channel")
    args = p.parse_args(argv)
    backend = os.environ.setdefault("CONVERSION_CORE_BACKEND", "torch")
    registry = cc.load_registry()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, source (16, 32) bf16; us per call (median of 5)")
    print(f"{'conversion':<32}{'raw_fn':>9}{'fn':>9}{'added':>9}{'many/item':>11}{'added':>9}")
    for name in args.names.split(","):
        fakes = {"noop_rows": _noop_conversion, "noop_rows_launched": _launched_noop}
        conversion = fakes[name]() if name in fakes else registry.get(name)
        # the launched fake: the backend picks Triton for CPU tensors (its launches run nothing)
        os.environ["CONVERSION_CORE_BACKEND"] = "triton" if name == "noop_rows_launched" else backend
        if name == "noop_rows_launched":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        src = torch.randn(16, 32, dtype=torch.bfloat16)
        buffers = conversion.allocate(src.shape)
        raw = conversion.raw_fn
        raw_us = _per_call_us(lambda: raw(src, *buffers), args.calls)  # noqa: B023
        fn_us = _per_call_us(lambda: conversion.fn(src, *buffers), args.calls)  # noqa: B023
        row = f"{name:<32}{raw_us:>9.2f}{fn_us:>9.2f}{fn_us - raw_us:>9.2f}"
        many = getattr(conversion, "convert_many", None)
        if many is not None:
            items = [(src, *conversion.allocate(src.shape)) for _ in range(args.batch)]
            n = max(1, args.calls // args.batch)
            many_us = _per_call_us(lambda: many(items), n) / args.batch  # noqa: B023
            row += f"{many_us:>11.2f}{many_us - raw_us:>9.2f}"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
