"""CPU section of the quantization benchmark: the chunked torch path against the eager reference.

Times, in one process, the kept reference formulation (``reference_quantize_blocks`` /
``reference_quantize_rows``, float32 copies of the whole tensor) and the registry's checked
``fn`` (the chunked CPU path) on an 8192x8192 weight and a (32, 1536, 2048) expert stack, bf16 in,
FP8 e4m3 + float32 scales out. Effective bandwidth counts 3 bytes per element (bf16 read, e4m3
written). Goal (issue 6): >= 8x the reference and >= 2.5 GB/s. On a shared machine every figure
moves run to run: medians and the min..max spread are printed, rerun on a quiet machine.

    python benchmarks/_cpu_bench.py [--json out.json] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

import conversion_core as cc

SHAPES: list[tuple[int, ...]] = [(8192, 8192), (32, 1536, 2048)]
FORMATS = ["fp8_128x128", "cutlass_fp8_e4m3_per_channel"]
GOAL_SPEEDUP = 8.0
GOAL_GBPS = 2.5
BYTES_PER_ELEMENT = 3  # bf16 in + e4m3 out


def _times(fn: Callable[[], object], reps: int) -> list[float]:
    fn()  # warm-up: first-touch of buffers, thread pool start
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _reference(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    if name == "fp8_128x128":
        from conversion_core_deepgemm_fp8.torch_path import reference_quantize_blocks

        return lambda src, out, scale: reference_quantize_blocks(src, out, scale, (128, 128), name)
    from conversion_core_cutlass_fp8.torch_path import reference_quantize_rows

    return lambda src, out, scale: reference_quantize_rows(src, out, scale, name)


def run_cpu_section(json_out: str | None = None, reps: int = 7, reference_reps: int = 3) -> list[dict]:
    """Time reference and chunked path for every (format, shape); print a table; return the rows."""
    registry = cc.load_registry()
    rows: list[dict] = []
    print(f"CPU torch path vs eager reference (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'conversion':30s} {'shape':16s} {'ref GB/s':>9s} {'path GB/s (min..max)':>24s} {'speedup':>8s}  goal")
    for shape in SHAPES:
        src = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=torch.Generator().manual_seed(0))
        gbytes = BYTES_PER_ELEMENT * src.numel() / 1e9
        for name in FORMATS:
            conversion = registry.get(name)
            out, scale = conversion.allocate(shape)
            ref_out, ref_scale = conversion.allocate(shape)
            assert scale is not None and ref_scale is not None
            reference = _reference(name)
            ref_times = _times(lambda: reference(src, ref_out, ref_scale), reference_reps)  # noqa: B023
            path_times = _times(lambda: conversion.fn(src, out, scale), reps)  # noqa: B023
            same = torch.equal(out.view(torch.uint8), ref_out.view(torch.uint8)) and torch.equal(scale, ref_scale)
            ref_s, path_s = statistics.median(ref_times), statistics.median(path_times)
            row = {
                "section": "cpu",
                "conversion": name,
                "shape": list(shape),
                "dtype": "bfloat16",
                "threads": torch.get_num_threads(),
                "reference_s": ref_s,
                "path_s": path_s,
                "path_s_min": min(path_times),
                "path_s_max": max(path_times),
                "reference_gbps": gbytes / ref_s,
                "path_gbps": gbytes / path_s,
                "speedup": ref_s / path_s,
                "bytes_identical": same,
                "goal_met": ref_s / path_s >= GOAL_SPEEDUP and gbytes / path_s >= GOAL_GBPS,
            }
            rows.append(row)
            spread = f"{gbytes / max(path_times):.2f}..{gbytes / min(path_times):.2f}"
            print(
                f"{name:30s} {'x'.join(map(str, shape)):16s} {row['reference_gbps']:9.3f} "
                f"{row['path_gbps']:8.3f} ({spread:>13s}) {row['speedup']:7.1f}x  "
                f"{'met' if row['goal_met'] else 'NOT met'}{'' if same else '  BYTES DIFFER'}"
            )
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--reps", type=int, default=7, help="timed runs of the chunked path (median)")
    args = parser.parse_args(argv)
    rows = run_cpu_section(args.json, reps=args.reps)
    return 0 if all(r["bytes_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
