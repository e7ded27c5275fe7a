# ruff: noqa: B023 -- the timed lambdas are called inside the loop iteration that makes them
"""MX kernels on the GPU: bytes equal the CPU torch path, then bandwidth against a device copy.

Run on CUDA (the lead's H200 batch)::

    python benchmarks/gpu_mx.py            # checks, then the table; exit 1 on any byte mismatch
    python benchmarks/gpu_mx.py --tune     # also sweeps tile shapes/warps per shape and prints the best

and on CPU, to prove the script end to end (Triton interpreter, tiny shapes)::

    TRITON_INTERPRET=1 python benchmarks/gpu_mx.py --dry-run

(1) For every kernel (``mxfp8``, ``mxfp4``) and several shapes, including rows that are not a
multiple of the tile, 3D expert stacks and a transposed source, the GPU kernel's value and scale
bytes must equal the CPU torch path's on the same bf16 input. (2) Each kernel is timed with
``triton.testing.do_bench`` (median) against ``dst.copy_(src)`` of the same input in the same run;
GB/s counts bytes in plus bytes out (bf16 source; e4m3 or packed e2m1 values; one scale byte per 32).
The launch path (``launch`` with a device flag, what the whole-model plan calls) is timed, and the
checked ``Conversion.fn`` too. Target: kernel >= 0.92 of copy on the bench shapes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

CHECK_SHAPES = [(4096, 2048), (1000, 96), (3, 129, 320), (1, 32), (7, 8, 64)]
BENCH_SHAPES = [(4096, 2048), (28672, 8192), (8192, 28672), (128, 1536, 2048), (128, 2048, 768)]
DRY_CHECK = [(33, 96), (2, 5, 64), (1, 32)]
DRY_BENCH = [(64, 128), (2, 16, 64)]
TUNE = [(br, bc, w) for br in (8, 16, 32) for bc in (128, 256, 512) for w in (4, 8)]


def _source(shape: tuple[int, ...], device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 8, shape, generator=g).float())
    x.view(-1, shape[-1])[0, :32] = 0.0
    x.view(-1, shape[-1])[-1, 1] = 3.0e4
    return x.to(torch.bfloat16).to(device)


def check_bytes(conversions: dict, shapes: list, device: str) -> int:
    from conversion_core_mx import torch_path, triton_kernels
    from conversion_core_mx.numerics import MXFP4, MXFP8

    bad = 0
    for name, fmt in (("mxfp8", MXFP8), ("mxfp4", MXFP4)):
        conv = conversions[name]
        for i, shape in enumerate(shapes):
            for transposed in (False, True):
                src = _source(shape, device, i)
                if transposed and len(shape) == 2:
                    src = src.t().contiguous().t()
                gq, gs = conv.allocate(src.shape, device)
                triton_kernels.quantize(src, gq, gs, fmt)
                cpu = src.cpu()
                cq, cs = conv.allocate(cpu.shape, "cpu")
                torch_path.quantize(cpu, cq, cs, fmt)
                ok = torch.equal(gq.cpu().view(torch.uint8), cq.view(torch.uint8)) and torch.equal(gs.cpu(), cs)
                bad += not ok
                print(
                    f"bytes {name:6s} {str(shape):18s} {'transposed' if transposed else 'contiguous':10s} "
                    f"{'ok' if ok else 'MISMATCH'}"
                )
    return bad


def _median_ms(fn, device: str) -> float:
    """``triton.testing.do_bench`` median on CUDA; on CPU (dry run: no Triton driver) a median of 3 calls."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    import statistics
    import time

    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(conversions: dict, shapes: list, device: str, tune: bool) -> None:
    from conversion_core_mx import triton_kernels
    from conversion_core_mx.numerics import MXFP4, MXFP8

    rows = []
    for shape in shapes:
        src = _source(shape, device, 0)
        copy_dst = torch.empty_like(src)
        t_copy = _median_ms(lambda: copy_dst.copy_(src), device)
        copy_gbs = 2 * src.numel() * 2 / t_copy / 1e6
        for name, fmt in (("mxfp8", MXFP8), ("mxfp4", MXFP4)):
            conv = conversions[name]
            q, s = conv.allocate(src.shape, device)
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            moved = src.numel() * 2 + q.numel() * q.element_size() + s.numel()
            configs = TUNE if tune else [(None, None, None)]
            best = None
            for br, bc, w in configs:
                t = _median_ms(lambda: triton_kernels.launch(src, q, s, flag, fmt, br, bc, w), device)
                if best is None or t < best[0]:
                    best = (t, br, bc, w)
            t_launch = _median_ms(lambda: conv.launch(src, q, s, flag), device)
            t_fn = _median_ms(lambda: conv.fn(src, q, s), device)
            gbs = moved / t_launch / 1e6
            rows.append((name, shape, gbs, gbs / copy_gbs, moved / t_fn / 1e6, copy_gbs, best, moved))
    print()
    print(
        f"{'kernel':7s} {'shape':18s} {'launch GB/s':>11s} {'/copy':>6s} {'fn GB/s':>8s} {'copy GB/s':>9s}  best tile"
    )
    for name, shape, gbs, ratio, fn_gbs, copy_gbs, best, moved in rows:
        tile = f"{best[1]}x{best[2]} w{best[3]}: {moved / best[0] / 1e6:.0f} GB/s" if best[1] else "default"
        print(f"{name:7s} {str(shape):18s} {gbs:11.0f} {ratio:6.2f} {fn_gbs:8.0f} {copy_gbs:9.0f}  {tile}")
    print(
        f"defaults: BLOCK_R={triton_kernels.BLOCK_R} BLOCK_C={triton_kernels.BLOCK_C} "
        f"NUM_WARPS={triton_kernels.NUM_WARPS}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--tune", action="store_true", help="sweep tile shapes and warps per bench shape")
    args = parser.parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
            return 2
        device, check_shapes, bench_shapes = "cpu", DRY_CHECK, DRY_BENCH
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run (and TRITON_INTERPRET=1) on CPU")
            return 2
        device, check_shapes, bench_shapes = "cuda", CHECK_SHAPES, BENCH_SHAPES
    import conversion_core as cc

    registry = cc.load_registry()
    conversions = {name: registry.get(name) for name in ("mxfp8", "mxfp4")}
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}, "
        f"torch {torch.__version__}"
    )
    bad = check_bytes(conversions, check_shapes, device)
    if bad:
        print(f"{bad} byte mismatch(es): GPU bytes differ from the CPU path")
        return 1
    if args.dry_run:
        os.environ["CONVERSION_CORE_BACKEND"] = "triton"  # fn on CPU tensors takes the kernel too
    bench(conversions, bench_shapes, device, args.tune and not args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
