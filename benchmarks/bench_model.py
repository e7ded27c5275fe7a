"""Whole-model conversion step of a Qwen3-30B-A3B-shaped model against the memory-bandwidth floor.

Builds the model's weights (random bf16 values, names as transformers writes them) on one device
in both layouts trainers use, per-expert 2D tensors and fused 3D expert stacks ``(E, 2I, H)`` /
``(E, H, I)``; for each FP8 format plans once, allocates once, runs the first step (kernels
launched one by one on CUDA) and the second (captured in CUDA graphs), then times ``Plan.run``
(wall clock, median; it ends with the step's one host sync, the NaN/Inf flag read). The bytes of
the first and of the replayed steps are checked against converting each tensor (each fused
shard) on its own. The floor is the bytes a step must move (sources read + outputs and scales
written) at the copy bandwidth measured in the same run. ``--moving`` also times steps whose
sources sit at new addresses every step (launched, never captured).

    python benchmarks/bench_model.py [--json out.json] [--layers 24] [--reps 7]
    python benchmarks/bench_model.py --layers 12 --moving --layouts per_expert
    python benchmarks/bench_model.py --device cpu --small     # scaled-down model, CPU copy as floor
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

import conversion_core as cc
from conversion_core.plan import GRAPH_FIRST_SEGMENT, Plan, build_plan

FORMATS = ["fp8_128x128", "cutlass_fp8_e4m3_per_channel"]
LAYOUTS = ["per_expert", "fused"]
GOAL_RATIO = 1.2


class ModelShape(NamedTuple):
    """Qwen3-30B-A3B (of its 48 layers, 24 fit an 80 GB card with their outputs).

    A NamedTuple, not a dataclass: ``conversion-core bench --model`` loads this file without
    registering it in ``sys.modules``, which dataclasses need."""

    layers: int = 24
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    experts: int = 128
    inter: int = 768
    vocab: int = 151936


SMALL = ModelShape(layers=2, hidden=512, heads=4, kv_heads=2, head_dim=128, experts=8, inter=256, vocab=1024)


def build_state_dict(m: ModelShape, fused: bool, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights; per-expert tensors are views of one stack per projection (like a flat param)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(m.vocab, m.hidden), "lm_head.weight": w(m.vocab, m.hidden)}
    sd["model.norm.weight"] = w(m.hidden)
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    for i in range(m.layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"] = w(m.hidden)
        for proj, shape in (("q", (q, m.hidden)), ("k", (kv, m.hidden)), ("v", (kv, m.hidden)), ("o", (m.hidden, q))):
            sd[p + f"self_attn.{proj}_proj.weight"] = w(*shape)
        sd[p + "self_attn.q_norm.weight"] = w(m.head_dim)
        sd[p + "self_attn.k_norm.weight"] = w(m.head_dim)
        sd[p + "mlp.gate.weight"] = w(m.experts, m.hidden)
        if fused:
            sd[p + "mlp.experts.gate_up_proj"] = w(m.experts, 2 * m.inter, m.hidden)
            sd[p + "mlp.experts.down_proj"] = w(m.experts, m.hidden, m.inter)
        else:
            stacks = {"gate_proj": w(m.experts, m.inter, m.hidden), "up_proj": w(m.experts, m.inter, m.hidden)}
            stacks["down_proj"] = w(m.experts, m.hidden, m.inter)
            for j in range(m.experts):
                for proj, stack in stacks.items():
                    sd[p + f"mlp.experts.{j}.{proj}.weight"] = stack[j]
    return sd


def step_bytes(plan: Plan, sd: dict[str, torch.Tensor]) -> int:
    """Bytes a step must move: every source read once, every output and scale written once."""
    read = sum(sd[e.name].numel() * sd[e.name].element_size() for e in plan.entries)
    written = sum(t.numel() * t.element_size() for t in plan.outputs.values())
    return read + written


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def copy_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    """Device copy bandwidth (read + write counted) on a buffer well past any cache."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = statistics.median(wall_ms(lambda: dst.copy_(src), device, reps))
    return 2 * nbytes / (ms * 1e6)


def check_bytes(plan: Plan, sd: dict[str, torch.Tensor]) -> int:
    """Outputs differing from converting each tensor (each fused gate/up half) on its own; 0 is right."""
    conversion, outputs, bad = plan.conversion, plan.outputs, 0
    for e in plan.entries:
        src = sd[e.name]
        if e.kept is not None:
            bad += not torch.equal(outputs[e.name].view(torch.uint8), src.view(torch.uint8))
            continue
        if e.shards is not None and len(e.shards) > 1:
            parts = [conversion.convert(h.contiguous()) for h in src.split(list(e.shards), dim=-2)]
            q = torch.cat([p[0] for p in parts], dim=-2)
            scales = [p[1] for p in parts]
            assert scales[0] is not None  # rows grow along the scale's -2 (blocks) or -1 (per row)
            s = torch.cat(scales, dim=-2 if scales[0].dim() == src.dim() else -1)  # type: ignore[arg-type]
        else:
            q, s = conversion.convert(src)
        assert e.scale_name is not None and s is not None
        bad += not torch.equal(outputs[e.name].view(torch.uint8), q.view(torch.uint8))
        bad += not torch.equal(outputs[e.scale_name].view(torch.int32), s.reshape(e.scale_shape).view(torch.int32))
    return bad


def bench_one(
    model: ModelShape,
    layout: str,
    fmt: str,
    streams: int,
    segment: int,
    sd: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> dict:
    device = torch.device(args.device)
    plan = build_plan(sd, conversion=fmt)
    plan.graph_streams, plan.graph_first_segment = streams, segment
    if args.growth is not None:
        plan.graph_segment_growth = args.growth
    plan.allocate(device)

    def timed_run(state: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        plan.run(state)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    first_ms = timed_run(sd)  # kernels compiled, launched one by one (CUDA: nothing captured yet)
    mismatched = check_bytes(plan, sd) if args.check else None
    capture_ms = timed_run(sd)  # CUDA: the same addresses again, so the step is captured
    times = wall_ms(lambda: plan.run(sd), device, args.reps)  # replayed
    if args.check:
        assert mismatched is not None
        mismatched += check_bytes(plan, sd)
    validate = statistics.median(wall_ms(lambda: plan.validate(sd), device, args.reps))
    replay_ms = None
    if plan._step is not None:  # the GPU part alone: every segment replayed, events around them
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = []
        for _ in range(args.reps):
            start.record()
            plan._step.replay()
            end.record()
            end.synchronize()
            replays.append(start.elapsed_time(end))
        replay_ms = statistics.median(replays)
    graph_segments = len(plan._step.segments) if plan._step is not None else 0
    moving = None
    if args.moving:  # sources at new addresses every step: two state dicts, alternately
        other = build_state_dict(model, layout == "fused", device, seed=1)
        moving = [timed_run(other if i % 2 else sd) for i in range(args.reps + 1)][1:]
        if args.check:
            mismatched += check_bytes(plan, other if args.reps % 2 else sd)
        del other
    nbytes = step_bytes(plan, sd)
    row = {
        "layout": layout,
        "format": fmt,
        "streams": streams,
        "first_segment": segment,
        "segment_growth": plan.graph_segment_growth,
        "tensors": len(plan.entries),
        "calls": len(plan._calls),
        "graph_segments": graph_segments,
        "step_ms": statistics.median(times),
        "step_ms_min": min(times),
        "step_ms_max": max(times),
        "validate_ms": validate,
        "first_step_ms": first_ms,
        "capture_step_ms": capture_ms,
        "moving_step_ms": statistics.median(moving) if moving else None,
        "bytes": nbytes,
        "mismatched_outputs": mismatched,
    }
    if replay_ms is not None:
        row["replay_ms"] = replay_ms
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model = SMALL if args.small else ModelShape(layers=args.layers)
    result: dict[str, Any] = {
        "model": model._asdict(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "timing": f"Plan.run wall clock (ends with its one flag read), median of {args.reps}",
        "rows": [],
    }
    gbps = None
    for layout in args.layouts:
        sd = build_state_dict(model, layout == "fused", device)
        if gbps is None:
            total = sum(t.numel() * t.element_size() for t in sd.values())
            gbps = copy_gbps(device, min(total, 8 << 30) if device.type == "cuda" else total, args.reps)
            result["copy_gbps"] = gbps
        for fmt, streams, segment in itertools.product(args.formats, args.streams, args.first_segment):
            row = bench_one(model, layout, fmt, streams, segment, sd, args)
            row["floor_ms"] = row["bytes"] / (gbps * 1e6)
            row["ratio"] = row["step_ms"] / row["floor_ms"]
            if row["moving_step_ms"] is not None:
                row["moving_ratio"] = row["moving_step_ms"] / row["floor_ms"]
            if "replay_ms" in row:
                row["replay_ratio"] = row["replay_ms"] / row["floor_ms"]
            result["rows"].append(row)
            print_row(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del sd
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _triton_version() -> str | None:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return None


HEADER = (
    f"{'layout':<11}{'format':<30}{'str':>4}{'seg':>6}{'graphs':>7}{'tensors':>8}{'step ms':>9}{'replay':>8}"
    f"{'floor':>8}{'ratio':>7}{'first':>8}{'capture':>9}{'moving':>8}{'bad':>5}"
)


def print_row(r: dict[str, Any]) -> None:
    """One row; first: the first step (kernels compiled, launched one by one), capture: the
    second (captured), moving: median step with sources at new addresses (--moving), all ms."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    bad = "-" if r["mismatched_outputs"] is None else str(r["mismatched_outputs"])
    print(
        f"{r['layout']:<11}{r['format']:<30}{r['streams']:>4}{r['first_segment']:>6}{r['graph_segments']:>7}"
        f"{r['tensors']:>8}{r['step_ms']:>9.2f}{ms(r.get('replay_ms')):>8}{r['floor_ms']:>8.2f}{r['ratio']:>7.2f}"
        f"{r['first_step_ms']:>8.0f}{r['capture_step_ms']:>9.0f}{ms(r['moving_step_ms']):>8}{bad:>5}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_model", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--small", action="store_true", help="scaled-down model (2 layers, 8 experts)")
    p.add_argument("--layers", type=int, default=24, help="layers of the full-size model (default 24 of 48)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--formats", type=lambda s: s.split(","), default=FORMATS)
    p.add_argument("--layouts", type=lambda s: s.split(","), default=LAYOUTS)
    p.add_argument(
        "--streams",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[8],
        help="comma list of stream counts a captured step spreads its launches over (default 8)",
    )
    p.add_argument(
        "--first-segment",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[GRAPH_FIRST_SEGMENT],
        help=f"comma list of first graph segment sizes, in tensors (default {GRAPH_FIRST_SEGMENT}; "
        "a size above the tensor count gives one graph checked whole before its replay)",
    )
    p.add_argument("--growth", type=float, help="factor each graph segment grows by (default: the plan's)")
    p.add_argument(
        "--moving",
        action="store_true",
        help="also time steps whose sources sit at new addresses every step (two state dicts in turn; "
        "needs twice the source memory: use --layers 12 on an 80 GB card)",
    )
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the byte check")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cc.load_registry()
    print(HEADER, flush=True)
    result = run(args)
    print(
        f"device {result['device']}, torch {result['torch']}, triton {result['triton']}, "
        f"copy {result['copy_gbps']:.0f} GB/s; goal ratio <= {GOAL_RATIO}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    bad = sum(r["mismatched_outputs"] or 0 for r in result["rows"])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
