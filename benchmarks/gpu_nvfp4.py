# ruff: noqa: B023 -- the timed lambdas are called inside the loop iteration that makes them
"""NVFP4 on the GPU: bytes equal to the CPU torch path, and speed against a device copy in the same run.

``python benchmarks/gpu_nvfp4.py`` on a CUDA machine: (1) for every kernel (the global-scale amax
pass, the one-pass quantizer given the amax, and the whole conversion) and several shapes, some not
multiples of the tile, the GPU's packed values, e4m3 scales and global scale equal the CPU torch
path's bytes; (2) ``triton.testing.do_bench`` medians of each kernel and of a device-to-device copy
of the same input, GB/s counted as bytes in + bytes out, and the ratio to the copy; (3) exit code 1
on any byte mismatch. ``--dry-run``: the same on CPU under TRITON_INTERPRET=1 with tiny shapes
(proves the script, not the speed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton
    from conversion_core_nvfp4 import numerics, triton_kernels

    device = "cpu" if args.dry_run else "cuda"
    shapes = (
        [(16, 64), (9, 48), (2, 5, 32)]
        if args.dry_run
        else [(4096, 2048), (28672, 8192), (8192, 28672), (128, 1536, 2048), (128, 2048, 768), (4095, 2064)]
    )

    def bench(fn, reps: int) -> float:  # milliseconds
        if args.dry_run:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return float(triton.testing.do_bench(fn, rep=reps, return_mode="median"))

    mismatches = 0
    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(sum(shape))
        cpu = (
            torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 4, shape, generator=g).float())
        ).bfloat16()
        cpu.reshape(-1, shape[-1])[0, :16] = 0
        k = shape[-1]
        lead = shape[:-1]
        amax_cpu = numerics.tensor_amax(cpu)
        want_p = torch.empty(*lead, k // 2, dtype=torch.uint8)
        want_s = torch.empty(*lead, k // 16, dtype=torch.float8_e4m3fn)
        want_g = numerics.quantize_with_amax(cpu, amax_cpu, want_p, want_s, "nvfp4")
        src = cpu.to(device)
        p = torch.empty(want_p.shape, dtype=torch.uint8, device=device)
        s = torch.empty(want_s.shape, dtype=torch.float8_e4m3fn, device=device)
        gout = torch.empty(1, device=device)
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        amax = numerics.tensor_amax(src)
        triton_kernels.launch(src, amax, p, s, gout, flag, multiplier=False)
        same = (
            torch.equal(p.cpu(), want_p)
            and torch.equal(s.cpu().view(torch.uint8), want_s.view(torch.uint8))
            and torch.equal(gout.cpu(), want_g)
            and torch.equal(amax.cpu(), amax_cpu)
        )
        mismatches += not same
        gs = numerics.global_scale(amax)
        copy_dst = torch.empty_like(src)
        n_in = src.numel() * src.element_size()
        n_out = p.numel() + s.numel() + 4
        reps = 50 if src.numel() < (1 << 26) else 200
        t_copy = bench(lambda: copy_dst.copy_(src), reps)  # noqa: B023 (called in this iteration)
        t_amax = bench(lambda: numerics.tensor_amax(src), reps)  # noqa: B023 (called in this iteration)
        t_quant = bench(lambda: triton_kernels.launch_values(src, gs, p, s, flag), reps)  # noqa: B023 (called in this iteration)
        t_all = bench(
            lambda: triton_kernels.launch(src, numerics.tensor_amax(src), p, s, gout, flag, multiplier=False),  # noqa: B023
            reps,
        )
        copy_gbs = 2 * n_in / t_copy / 1e6
        for kernel, t, nbytes in (
            ("amax (read only)", t_amax, n_in),
            ("quantize given amax", t_quant, n_in + n_out),
            ("whole conversion", t_all, n_in + n_out),
        ):
            gbs = nbytes / t / 1e6
            rows.append((str(shape), kernel, t, gbs, copy_gbs, gbs / copy_gbs, "yes" if same else "NO"))
    print(f"{'shape':>20} {'kernel':>22} {'ms':>9} {'GB/s':>9} {'copy GB/s':>10} {'/copy':>6} bytes==CPU")
    for r in rows:
        print(f"{r[0]:>20} {r[1]:>22} {r[2]:9.4f} {r[3]:9.1f} {r[4]:10.1f} {r[5]:6.2f} {r[6]}")
    if mismatches:
        print(f"{mismatches} shape(s) with GPU bytes != CPU torch-path bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
