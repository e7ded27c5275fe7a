"""CPU section of the quantization benchmark: the chunked torch path against the eager reference.

Times, in one process, each plugin's kept eager formulation (float32 copies of the whole tensor:
``reference_quantize_blocks`` / ``reference_quantize_rows`` for FP8, int4's
``torch_path.reference_quantize``, NVFP4's ``numerics.reference_quantize_with_amax``, MX's
``torch_path.reference_quantize``) and the registry's checked ``fn`` (the chunked CPU path) on an
8192x8192 weight and a (32, 1536, 2048) expert stack, bf16 in. Effective bandwidth counts the bf16
source plus every output written. Goals: >= 8x the reference (issue 18), and for FP8 >= 2.5 GB/s
(issue 6). Each row is guarded: an error prints one line and the table goes on. On a shared
machine every figure moves run to run: medians and the min..max spread are printed; pass
``--threads 1`` for an A/B there, rerun on a quiet machine for absolute figures.

    python benchmarks/_cpu_bench.py [--json out.json] [--reps N] [--only a,b] [--shape 4096x4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

import conversion_core as cc

SHAPES: list[tuple[int, ...]] = [(8192, 8192), (32, 1536, 2048)]
FORMATS = [
    "fp8_128x128",
    "cutlass_fp8_e4m3_per_channel",
    "int4_w4a16_g128",
    "int4_w4a16_asym_g128",
    "nvfp4",
    "mxfp4",
    "mxfp8",
]
GOAL_SPEEDUP = 8.0
GOAL_GBPS = 2.5  # issue 6's bandwidth goal: the FP8 formats only


def _times(fn: Callable[[], object], reps: int) -> list[float]:
    fn()  # warm-up: first-touch of buffers, thread pool start
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


Buffers = Sequence[torch.Tensor]


def _reference(name: str) -> Callable[[torch.Tensor, Buffers], None]:
    """Each plugin's kept eager formulation (float32 copies of the whole tensor), writing ``buffers``."""
    if name == "fp8_128x128":
        from conversion_core_deepgemm_fp8.torch_path import reference_quantize_blocks

        return lambda src, b: reference_quantize_blocks(src, b[0], b[1], (128, 128), name)
    if name == "cutlass_fp8_e4m3_per_channel":
        from conversion_core_cutlass_fp8.torch_path import reference_quantize_rows

        return lambda src, b: reference_quantize_rows(src, b[0], b[1], name)
    if name.startswith("int4_"):
        from conversion_core_int4 import FORMATS as INT4
        from conversion_core_int4.torch_path import reference_quantize

        fmt = INT4[name]
        return lambda src, b: reference_quantize(src, b[0], b[1], b[2], b[3] if len(b) > 3 else None, fmt.group, name)
    if name == "nvfp4":
        from conversion_core_nvfp4.numerics import reference_quantize_with_amax

        def nvfp4(src: torch.Tensor, b: Buffers) -> None:
            b[2].copy_(reference_quantize_with_amax(src, src.abs().amax().float().reshape(1), b[0], b[1], name))

        return nvfp4
    if name in ("mxfp4", "mxfp8"):
        from conversion_core_mx.numerics import MXFP4, MXFP8
        from conversion_core_mx.torch_path import reference_quantize as mx_reference

        mx = MXFP4 if name == "mxfp4" else MXFP8
        return lambda src, b: mx_reference(src, b[0], b[1], mx)
    raise KeyError(f"no eager reference for {name!r}")


def _buffers(conversion: cc.Conversion, shape: tuple[int, ...]) -> list[torch.Tensor]:
    allocated = conversion.allocate(shape)
    return [b for b in (allocated if isinstance(allocated, tuple | list) else (allocated,)) if b is not None]


def _same(a: Buffers, b: Buffers) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)) for x, y in zip(a, b, strict=True)
    )


def run_cpu_section(
    json_out: str | None = None,
    reps: int = 7,
    reference_reps: int = 3,
    formats: Sequence[str] = FORMATS,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
) -> list[dict]:
    """Time reference and chunked path for every (format, shape); print a table; return the rows.

    Effective bandwidth counts the bytes read (the bf16 source) and written (every output).
    """
    registry = cc.load_registry()
    rows: list[dict] = []
    print(f"CPU torch path vs eager reference (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(
        f"{'conversion':30s} {'shape':16s} {'ref ms':>8s} {'path ms':>8s} "
        f"{'path GB/s (min..max)':>24s} {'speedup':>8s}  goal"
    )
    for shape in shapes:
        src = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=torch.Generator().manual_seed(0))
        for name in formats:
            try:
                conversion = registry.get(name)
                out, ref_out = _buffers(conversion, shape), _buffers(conversion, shape)
                gbytes = (src.numel() * src.element_size() + sum(b.numel() * b.element_size() for b in out)) / 1e9
                reference = _reference(name)
                ref_times = _times(lambda: reference(src, ref_out), reference_reps)  # noqa: B023
                path_times = _times(lambda: conversion.fn(src, *out), reps)  # noqa: B023
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the table
                print(f"{name:30s} {'x'.join(map(str, shape)):16s} error: {type(exc).__name__}: {exc}")
                continue
            same = _same(out, ref_out)
            ref_s, path_s = statistics.median(ref_times), statistics.median(path_times)
            fp8 = name in ("fp8_128x128", "cutlass_fp8_e4m3_per_channel")
            goal_met = ref_s / path_s >= GOAL_SPEEDUP and (not fp8 or gbytes / path_s >= GOAL_GBPS)
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
                "goal_met": goal_met,
            }
            rows.append(row)
            spread = f"{gbytes / max(path_times):.2f}..{gbytes / min(path_times):.2f}"
            print(
                f"{name:30s} {'x'.join(map(str, shape)):16s} {ref_s * 1e3:8.1f} {path_s * 1e3:8.1f} "
                f"{row['path_gbps']:8.3f} ({spread:>13s}) {row['speedup']:7.1f}x  "
                f"{'met' if goal_met else 'NOT met'}{'' if same else '  BYTES DIFFER'}"
            )
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--reps", type=int, default=7, help="timed runs of the chunked path (median)")
    parser.add_argument("--reference-reps", type=int, default=3, help="timed runs of the eager reference (median)")
    parser.add_argument("--only", help="comma-separated conversions (default: all)")
    parser.add_argument("--shape", action="append", help="e.g. 4096x4096 (repeatable; default: the two above)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads first (1: A/B on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = args.only.split(",") if args.only else FORMATS
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shape] if args.shape else SHAPES
    rows = run_cpu_section(
        args.json, reps=args.reps, reference_reps=args.reference_reps, formats=formats, shapes=shapes
    )
    return 0 if all(r["bytes_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
