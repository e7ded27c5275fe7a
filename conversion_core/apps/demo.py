"""``conversion-core demo``: one trainer step's conversion of a small MoE model, end to end.

Builds a Qwen3-MoE-style model from the config shipped in ``conversion_core/data`` with random
weights (transformers, no download), resolves the conversion from a shipped quantized inference config,
plans, allocates once, converts twice (the second run refills the same buffers), checks every
output's tags with :func:`accepts` and prints a short table. Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionCoreError
from ..loading.registry import load_registry
from ..plan import Plan, build_plan
from ..selection.receiver import accepts
from ..selection.resolver import select_default_conversion
from .demo_model import INFERENCE_CONFIGS, MODEL_CONFIG, build_model_state, data_path, load_json


def relative_bound(dtype: torch.dtype) -> float:
    """Largest relative error of one element against its scale group's max |x|: the kit's bound."""
    from ..testing import DEFAULT_BOUNDS

    bound = DEFAULT_BOUNDS.get(dtype)
    return 0.0 if bound is None else bound.relative


@dataclass
class DemoReport:
    conversion: str
    compile_target: str
    quantized: int
    kept: Counter[str]
    bytes_in: int
    bytes_out: int
    seconds: float
    max_relative_error: float
    #: The format's own relative rounding bound (the conformance kit's, from the output dtype).
    relative_bound: float
    accepted: int
    outputs: int
    refused_by_other: bool
    buffers_reused: bool
    fused: list[str]

    @property
    def ok(self) -> bool:
        return (
            self.accepted == self.outputs
            and self.buffers_reused
            and self.max_relative_error <= self.relative_bound * (1 + 1e-6)
        )


def run_demo(inference_config: str | Path, device: str = "cpu", seed: int = 0) -> tuple[DemoReport, Plan]:
    state = build_model_state(load_json(data_path(MODEL_CONFIG)), seed)
    registry = load_registry()
    name = select_default_conversion(inference_config, registry)
    plan = build_plan(state, inference_config, conversion=name, registry=registry)
    state = {k: v.to(device) for k, v in state.items()}
    outputs = plan.allocate(device)
    pointers = {k: t.data_ptr() for k, t in outputs.items()}
    plan.run(state)  # first step: warms up whatever the backend caches
    start = time.perf_counter()
    plan.run(state)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    outputs = plan.outputs

    conversion = plan.conversion
    tags = plan.output_tags()
    # quantized outputs go to the conversion's kernel, kept ones are read as they are (hf_raw)
    accepted = sum(
        accepts(t, ["hf_raw"])
        if t["compile_target"] == "hf_raw"
        else accepts(t, [conversion.compile_target], conversion.compile_metadata)
        for t in tags.values()
    )
    other = conversion.compile_target + "-other-kernel"
    refused = not any(accepts(t, [other]) for t in tags.values())

    worst = 0.0
    for entry in plan.quantized:
        src = state[entry.name].float()
        err = (plan.dequantize(entry.name) - src).abs().max().item()
        worst = max(worst, err / max(src.abs().max().item(), 1e-30))
    report = DemoReport(
        conversion=conversion.name,
        compile_target=conversion.compile_target,
        quantized=len(plan.quantized),
        kept=Counter((e.kept or "").split(":")[0] for e in plan.kept),
        bytes_in=sum(t.numel() * t.element_size() for t in state.values()),
        bytes_out=sum(t.numel() * t.element_size() for t in outputs.values()),
        seconds=seconds,
        max_relative_error=worst,
        relative_bound=relative_bound(conversion.dst_dtype),
        accepted=accepted,
        outputs=len(outputs),
        refused_by_other=refused,
        buffers_reused=all(outputs[k].data_ptr() == p for k, p in pointers.items()),
        fused=[f"{e.name} {list(e.shards or ())}" for e in plan.quantized if e.shards],
    )
    return report, plan


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def format_report(report: DemoReport, inference_config: str | Path, device: str) -> str:
    kept = ", ".join(f"{reason} {n}" for reason, n in sorted(report.kept.items()))
    rows = [
        ("model", f"{MODEL_CONFIG} (random weights, bf16, {device})"),
        ("inference config", f"{Path(inference_config).name} -> {report.conversion} [{report.compile_target}]"),
        ("tensors quantized", f"{report.quantized}" + (f" ({len(report.fused)} fused gate/up)" * bool(report.fused))),
        ("tensors kept", f"{sum(report.kept.values())} ({kept})"),
        ("bytes in / out", f"{report.bytes_in / 1e6:.2f} MB / {report.bytes_out / 1e6:.2f} MB (with scales)"),
        ("convert time", f"{report.seconds * 1e3:.1f} ms (second run, same buffers: {_yes(report.buffers_reused)})"),
        (
            "max dequantize error",
            f"{report.max_relative_error:.4f} of max|w| (bound {report.relative_bound:.4f})",
        ),
        (
            "receiver accepts",
            f"{report.accepted}/{report.outputs} outputs; another kernel's receiver refuses them: "
            f"{_yes(report.refused_by_other)}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.sync:
        from .demo_sync import format_sync_report, ok, run_sync_demo

        sync_report = run_sync_demo(args.format, steps=args.steps, bucket_bytes=args.bucket_kib << 10, seed=args.seed)
        print(format_sync_report(sync_report))
        if not ok(sync_report):
            raise ConversionCoreError("demo --sync check failed: see the table above (verdicts, logits or refusal)")
        return 0
    inference_config = args.config or data_path(INFERENCE_CONFIGS[args.format])
    report, _ = run_demo(inference_config, device=args.device, seed=args.seed)
    print(format_report(report, inference_config, args.device))
    if not report.ok:
        raise ConversionCoreError("demo check failed: see the table above (tags, buffers or dequantize error)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="convert a small Qwen3-MoE-style model built from a shipped config (needs transformers)"
    )
    p.add_argument("--format", choices=sorted(INFERENCE_CONFIGS), default="block", help="shipped inference config")
    p.add_argument("--config", help="your own inference config (config.json or quantization_config JSON) instead")
    p.add_argument("--device", default="cpu", help="device of the weights and buffers (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--sync",
        action="store_true",
        help="the whole weight-sync loop: 2 trainer ranks (DTensor, gloo) send bucketed updates to a receiver process",
    )
    p.add_argument("--steps", type=int, default=3, help="--sync: optimizer steps synced")
    p.add_argument("--bucket-kib", type=int, default=512, help="--sync: bucket size in KiB")
    p.set_defaults(func=_cmd_demo)
    return p
