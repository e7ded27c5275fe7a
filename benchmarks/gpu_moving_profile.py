"""Where a moving-source step's time goes (GPU): host submission, device work, and the ops between.

A step whose sources sit at new addresses every step (after an FSDP all-gather) cannot replay a
graph; on the H200 the 12-layer per-expert Qwen3-30B-A3B step measured 6.1x its floor with
grouped launches, while the host part alone (``bench_step_host.py``) is ~13 ms on a 2-core CPU.
This prints, per format, on the per-expert layout:

- ``wall``: ``Plan.run`` with moving sources, ends with its flag read (median);
- ``device``: the kernels' total time in the step (torch.profiler, summed over CUDA kernels);
- the top host ops by self CPU time, from one profiled step.

    python benchmarks/gpu_moving_profile.py [--layers 12] [--formats fp8_128x128,mxfp8]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def _bench_model():
    spec = importlib.util.spec_from_file_location("bench_model", Path(__file__).with_name("bench_model.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--formats", type=lambda s: s.split(","), default=["fp8_128x128", "mxfp8", "nvfp4", "int4_w4a16_g128"]
    )
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()

    import conversion_core as cc
    from conversion_core.plan import build_plan

    bm = _bench_model()
    cc.load_registry()
    device = torch.device("cuda")
    model = bm.ModelShape(layers=args.layers)
    sd = bm.build_state_dict(model, False, device)
    other = bm.build_state_dict(model, False, device, seed=1)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    gbps = bm.copy_gbps(device, min(total, 8 << 30), 3)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {len(sd)} tensors, copy {gbps:.0f} GB/s")
    for fmt in args.formats:
        plan = build_plan(sd, conversion=fmt)
        plan.allocate(device)
        floor = bm.step_bytes(plan, sd) / (gbps * 1e6)
        for state in (sd, sd, other, sd):  # compile, capture, then moving
            plan.run(state)
        torch.cuda.synchronize()
        walls = []
        for i in range(args.reps):
            state = other if i % 2 == 0 else sd
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            plan.run(state)
            walls.append((time.perf_counter() - t0) * 1e3)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            plan.run(other)
            torch.cuda.synchronize()
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        wall = statistics.median(walls)
        print(
            f"\n== {fmt}: floor {floor:.2f} ms, moving wall {wall:.2f} ms ({wall / floor:.2f}x), "
            f"device {device_us / 1e3:.2f} ms in {kernels} device ops (profiled step)"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        del plan
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
