"""Cost of sharded (DTensor) conversion against local conversion of the same shard.

One Qwen3-30B-A3B-shaped decoder layer (hidden 2048, 32 query / 4 KV heads of 128, 128 experts
with moe_intermediate 768; experts stacked ``(E, N, K)``, gate and up fused) sharded over a 1-D
mesh, for both FP8 conversions. Per scenario and conversion it prints, for the whole layer:

- ``local``:   ``conversion.fn(shard, out, scale)`` on each rank's plain local tensors (no scale is
               shared, so the bytes are wrong wherever a block is cut: the floor, not an alternative);
- ``sharded``: ``conversion.fn(dtensor, out, scale)`` tensor by tensor (global scales);
- ``batched``: ``distributed.convert_many`` over the layer (one all-reduce for all that need one);
- ``plan``:    the whole-model plan over the layer's DTensor state dict (``allocate(like=...)``,
               ``run``), which batches the same way and refills one local arena;

with the ratio to ``local`` and the all-reduces per layer. It also checks, once, that the sharded
bytes equal the unsharded conversion of the full tensor.

Run (2 GPUs of one host, NCCL):   torchrun --nproc-per-node 2 benchmarks/bench_sharded.py
Logic check on CPU (gloo, tiny):  torchrun --nproc-per-node 2 benchmarks/bench_sharded.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode

import conversion_core as cc
from conversion_core.plan import build_plan
from conversion_core.plan import sharded as distributed

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, MOE_INTER = 2048, 32, 4, 128, 128, 768


def layer_shapes(tiny: bool) -> dict[str, tuple[int, ...]]:
    """Qwen3-30B-A3B decoder layer weights (``--tiny``: dims / 8, experts / 32, moe_intermediate 256)."""
    d = 8 if tiny else 1
    e = EXPERTS // (32 if tiny else 1)
    moe = 256 * d if tiny else MOE_INTER  # 768 / 8 would cut the fused gate/up blocks, which 768 does not
    return {
        "q_proj": (HEADS * HEAD_DIM // d, HIDDEN // d),
        "k_proj": (KV_HEADS * HEAD_DIM // d, HIDDEN // d),
        "v_proj": (KV_HEADS * HEAD_DIM // d, HIDDEN // d),
        "o_proj": (HIDDEN // d, HEADS * HEAD_DIM // d),
        "experts.gate_up_proj": (e, 2 * moe // d, HIDDEN // d),
        "experts.down_proj": (e, HIDDEN // d, moe // d),
        "cut.experts.down_proj": (e, HIDDEN // d, moe // 2 // d),
    }


#: Placement per weight, per scenario. ``tp``: column-parallel (N) for q/k/v/gate_up, row-parallel
#: (K) for o/down. ``cut``: down_proj's K halved (what one of 2 pairs of 4-way TP ranks holds) and
#: sharded again, so each rank's 192 columns cut a 128-wide block: the all-reduce path for blocks.
SCENARIOS: dict[str, dict[str, Callable[[int], list]]] = {
    "fsdp": {name: (lambda nd: [Shard(0)]) for name in layer_shapes(False) if not name.startswith("cut.")},
    "ep": {
        **{name: (lambda nd: [Replicate()]) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "experts.gate_up_proj": lambda nd: [Shard(0)],
        "experts.down_proj": lambda nd: [Shard(0)],
    },
    "tp": {
        **{name: (lambda nd: [Shard(nd - 2)]) for name in ("q_proj", "k_proj", "v_proj", "experts.gate_up_proj")},
        "o_proj": lambda nd: [Shard(nd - 1)],
        "experts.down_proj": lambda nd: [Shard(nd - 1)],
    },
    "cut": {"cut.experts.down_proj": lambda nd: [Shard(nd - 1)]},
}


def timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median seconds per call, the slowest rank's (collectives make ranks wait for each other)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(iters):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    median = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median.item())


def bench(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    )
    mesh = init_device_mesh(device.type, (world,))
    registry = cc.load_registry()
    shapes = layer_shapes(args.tiny)
    gen = torch.Generator(device="cpu").manual_seed(0)
    fulls = {
        name: torch.randn(shape, generator=gen).to(device=device, dtype=torch.bfloat16)
        for name, shape in shapes.items()
    }
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(
            f"world {world} on {device.type} ({name}), "
            f"backend {os.environ.get('CONVERSION_CORE_BACKEND', 'auto')}, torch {torch.__version__}"
        )
        print(
            f"{'scenario':8} {'conversion':30} {'MB/rank':>8} {'local ms':>9} {'sharded ms':>10} {'x':>5} "
            f"{'batched ms':>10} {'x':>5} {'plan ms':>8} {'x':>5} {'allreduce':>9} {'exact':>5}"
        )
    for scenario in args.scenarios:
        plan = SCENARIOS[scenario]
        srcs = {
            name: distribute_tensor(fulls[name], mesh, plan[name](len(shapes[name])), src_data_rank=None)
            for name in plan
        }
        for conv_name in args.conversions:
            row = bench_one(registry.get(conv_name), srcs, fulls, device, args.iters)
            if rank == 0:
                print(f"{scenario:8} {conv_name:30} {row}")


def bench_one(
    conv: cc.Conversion, srcs: dict[str, DTensor], fulls: dict[str, torch.Tensor], device: torch.device, iters: int
) -> str:
    """One scenario and conversion over the layer: the printed row."""
    bufs = {name: distributed.allocate(conv, src) for name, src in srcs.items()}
    plain = [(src.to_local(), *conv.allocate(src.to_local().shape, device)) for src in srcs.values()]
    items = [(conv, src, *bufs[name]) for name, src in srcs.items()]

    def local() -> None:
        for x, out, scale in plain:
            if x.numel():
                conv.fn(x, out, scale)

    def sharded() -> None:
        for name, src in srcs.items():
            conv.fn(src, *bufs[name])

    def batched() -> None:
        distributed.convert_many(items)

    state_dict = {hf_name(name): src for name, src in srcs.items()}
    plan = build_plan(state_dict, conversion=conv.name)
    plan.allocate(like=state_dict)

    def whole_plan() -> None:
        plan.run(state_dict)

    with CommDebugMode() as comm:
        batched()
    exact = all(_matches(conv, fulls[name], *bufs[name]) for name in srcs)
    t_local, t_sharded, t_batched, t_plan = (timed(f, device, iters) for f in (local, sharded, batched, whole_plan))
    mb = sum(x.numel() * x.element_size() for x, _, _ in plain) / 1e6
    return (
        f"{mb:8.1f} {t_local * 1e3:9.3f} {t_sharded * 1e3:10.3f} {t_sharded / t_local:5.2f} "
        f"{t_batched * 1e3:10.3f} {t_batched / t_local:5.2f} {t_plan * 1e3:8.3f} {t_plan / t_local:5.2f} "
        f"{comm.get_total_counts():9d} {str(exact):>5}"
    )


def hf_name(short: str) -> str:
    """The transformers name of a layer weight (so the plan treats it as in a real checkpoint)."""
    short = short.removeprefix("cut.")
    if short.startswith("experts."):
        return f"model.layers.0.mlp.{short}"
    return f"model.layers.0.self_attn.{short}.weight"


def _matches(conv: cc.Conversion, full: torch.Tensor, out, scale) -> bool:
    """Sharded bytes == unsharded conversion of the full tensor (compared on this rank's shard)."""
    ref_out, ref_scale = conv.convert(full)
    want = distribute_tensor(ref_out.view(torch.uint8), out.device_mesh, out.placements, src_data_rank=None)
    ok = torch.equal(out.to_local().view(torch.uint8), want.to_local())
    if scale is not None:
        want_scale = distribute_tensor(ref_scale, scale.device_mesh, scale.placements, src_data_rank=None)
        ok = ok and torch.equal(scale.to_local().view(torch.int32), want_scale.to_local().view(torch.int32))
    flag = torch.tensor([0.0 if ok else 1.0], device=full.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="shapes divided by 8 (CPU logic check)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--conversions", nargs="+", default=["fp8_128x128", "cutlass_fp8_e4m3_per_channel"])
    args = parser.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        bench(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
