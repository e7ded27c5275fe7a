"""int4 W4A16 kernels on the GPU: bytes against the CPU path, then bandwidth against a device copy.

    python benchmarks/gpu_int4.py              # on CUDA: checks, then the timing table
    python benchmarks/gpu_int4.py --sweep      # also time a few tile configurations
    python benchmarks/gpu_int4.py --dry-run    # on CPU: TRITON_INTERPRET=1, tiny shapes

1. For every conversion (group 128 and 32, symmetric and asymmetric) and several shapes (rows and
   groups that are not multiples of the tile, 3D stacks, a strided view), the Triton kernel's
   bytes on the device must equal the torch path's bytes on the CPU, output by output.
2. Each kernel (``launch``: the sync-free step the plan and CUDA graphs use) is timed with
   ``triton.testing.do_bench`` (median) against a device-to-device copy of the same source in the
   same run. Bytes moved: source in plus every output out (the copy: in plus out). Prints GB/s and
   the ratio to the copy (target >= 0.9).
3. Exits 1 on any byte mismatch (the table is still printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CHECK_SHAPES = [(4097, 384), (7, 256), (3, 13, 512), (2, 1, 128), (129, 1024)]
BENCH_SHAPES = {
    "experts.gate_up (128,1536,2048)": (128, 1536, 2048),
    "experts.down (128,2048,768)": (128, 2048, 768),
    "q_proj (4096,2048)": (4096, 2048),
    "mlp.up (28672,8192)": (28672, 8192),
    "mlp.down (8192,28672)": (8192, 28672),
}
DRY_BENCH = {"tiny (2,16,256)": (2, 16, 256), "tiny (32,128)": (32, 128)}
NAMES = ["int4_w4a16_g128", "int4_w4a16_g32", "int4_w4a16_asym_g128", "int4_w4a16_asym_g32"]
SWEEP = [(8, None, 4), (16, None, 8), (32, None, 8), (16, None, 16), (32, None, 16), (64, None, 16)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--sweep", action="store_true", help="also time (rows, warps) tile variants")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from conversion_core_int4 import FORMATS, triton_kernels

    import conversion_core as cc

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    os.environ["CONVERSION_CORE_BACKEND"] = "triton"
    registry = cc.load_registry()
    mismatches = 0

    def bits(t: torch.Tensor) -> torch.Tensor:
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).cpu()

    print("== bytes: device kernel vs CPU torch path")
    shapes = CHECK_SHAPES if not args.dry_run else [(9, 256), (2, 3, 128)]
    for name in NAMES:
        conversion = registry.get(name)
        for shape in shapes:
            g = torch.Generator().manual_seed(hash((name, shape)) % 1000)
            cpu = torch.randn(shape, generator=g) * 0.02
            cpu[..., 0, :] = 0
            cpu[..., -1, -1] = 4.0
            for dtype in (torch.bfloat16, torch.float32):
                src_cpu = cpu.to(dtype)
                os.environ["CONVERSION_CORE_BACKEND"] = "torch"
                want = conversion.convert(src_cpu)
                os.environ["CONVERSION_CORE_BACKEND"] = "triton"
                for label, src in (("contig", src_cpu.to(device)), ("strided", src_cpu.to(device).mT.contiguous().mT)):
                    got = conversion.convert(src)
                    bad = [
                        o.name
                        for o, a, b in zip(conversion.outputs, got, want, strict=True)
                        if not torch.equal(bits(a), bits(b))
                    ]
                    if bad:
                        mismatches += 1
                        print(f"MISMATCH {name} {shape} {dtype} {label}: {bad}")
    print(f"   {mismatches} mismatches")

    print("== bandwidth (median ms; GB/s = bytes in + out per second)")
    if args.dry_run:

        def bench(fn) -> float:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench

        def bench(fn) -> float:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    header = f"{'kernel':<22} {'shape':<34} {'tile':<16} {'ms':>8} {'GB/s':>8} {'copy GB/s':>10} {'ratio':>6}"
    print(header)
    worst = float("inf")
    for label, shape in (DRY_BENCH if args.dry_run else BENCH_SHAPES).items():
        src = (torch.randn(shape, device=device) * 0.02).to(torch.bfloat16)
        dst = torch.empty_like(src)
        copy_ms = bench(lambda dst=dst, src=src: dst.copy_(src))
        copy_gbs = 2 * src.numel() * 2 / copy_ms / 1e6
        for name in NAMES:
            conversion, fmt = registry.get(name), FORMATS[name]
            buffers = conversion.allocate(shape, device)
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            moved = src.numel() * 2 + sum(b.numel() * b.element_size() for b in buffers)
            configs = [(None, None, None)] + (SWEEP if args.sweep else [])
            for rows, groups, warps in configs:

                def run(src=src, buffers=buffers, flag=flag, fmt=fmt, rows=rows, groups=groups, warps=warps) -> None:
                    packed, scale, shape_out, *zp = buffers
                    triton_kernels.launch(
                        src,
                        packed,
                        scale,
                        shape_out,
                        zp[0] if zp else None,
                        flag,
                        fmt.group,
                        block_r=rows,
                        block_g=groups,
                        num_warps=warps,
                    )

                tile = "default" if rows is None else f"r{rows} w{warps}"
                timings = [("launch", bench(run))]
                if device == "cuda":  # the plan's step replays CUDA graphs: no host launch cost in the timing
                    run()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        run()
                    timings.append(("graph", bench(graph.replay)))
                for how, ms in timings:
                    gbs = moved / ms / 1e6
                    ratio = gbs / copy_gbs
                    if rows is None:
                        worst = min(worst, ratio)
                    print(
                        f"{name:<22} {label:<34} {tile + ' ' + how:<16} {ms:8.3f} {gbs:8.0f} {copy_gbs:10.0f} "
                        f"{ratio:6.2f}"
                    )
            if int(flag.item()):
                print(f"FLAG set for {name} {label}: NaN/Inf flagged on finite data")
                mismatches += 1
    print(f"worst default-tile ratio to copy: {worst:.2f} (target >= 0.9)")
    if not args.dry_run:
        mismatches += plan_step_check(registry, torch)
    return 1 if mismatches else 0


def plan_step_check(registry: object, torch: object) -> int:
    """The whole-model plan on CUDA (launch, then CUDA-graph capture and replay) gives ``convert``'s bytes."""
    import torch as t

    from conversion_core.plan import build_plan

    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "pack-quantized",
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
            }
        },
        "ignore": ["lm_head"],
    }
    state = {
        f"model.layers.{i}.mlp.{p}.weight": (t.randn(shape, device="cuda") * 0.02).to(t.bfloat16)
        for i in range(2)
        for p, shape in (("up_proj", (1536, 2048)), ("down_proj", (2048, 768)))
    }
    state["model.layers.0.mlp.experts.gate_up_proj"] = (t.randn(8, 512, 1024, device="cuda") * 0.02).to(t.bfloat16)
    plan = build_plan(state, qc)
    outputs = plan.allocate("cuda")
    bad = 0
    for step in range(4):  # eager, eager, capture, replay
        for v in state.values():
            v.mul_(1.01)
        plan.run(state)
        conversion = registry.get("int4_w4a16_g128")  # type: ignore[attr-defined]
        for name, src in state.items():
            for suffix, want in zip(("_packed", "_scale", "_shape"), conversion.convert(src), strict=True):
                key = name + suffix  # a.weight -> a.weight_packed; experts.gate_up_proj -> ..._packed
                if not t.equal(outputs[key].view(-1).cpu().view(t.uint8), want.reshape(-1).cpu().view(t.uint8)):
                    print(f"MISMATCH plan step {step}: {key}")
                    bad += 1
    print(f"== plan step (CUDA graphs after two steps): {bad} mismatches")
    return bad


if __name__ == "__main__":
    sys.exit(main())
