"""Issues 15-17 in one run: the 24-layer Qwen3-30B-A3B-shaped whole-model step of every format,
both layouts, each step kind against its floor, with a few tensors' bytes checked against the CPU.

The model, the floor and the step come from ``bench_model.py`` (imported, never copied): random
bf16 weights named as transformers writes them, per-expert 2D tensors (views of one stack per
projection) or fused 3D stacks; ``Plan.run`` timed by wall clock (it ends with the step's one
host sync, the NaN/Inf flag read); floor = the bytes the step must move (sources read once,
outputs and scales written once) at the device copy bandwidth measured in the same run
(``bench_model.copy_gbps``, a copy of min(model bytes, 8 GiB)).

Step kinds, per format and layout, in this order on source set A, then B:

- ``first``: the first step (kernels compiled, unless an earlier row compiled them; on CUDA
  launched eagerly, nothing captured);
- ``capture``: the second, same addresses, so each graph segment is captured then replayed;
- ``fixed``: median of later steps on the same tensors (captured graphs replayed);
- ``replay``: the graphs alone, CUDA events around them (no host checks, no flag read);
- ``moving``: median of steps alternating between two state dicts (A, B): sources at new
  addresses every step, as after an FSDP all-gather, so every segment is launched eagerly:
  grouped launches where the conversion has ``launch_group``, else one launch per tensor;
- ``first*``: last, the first step of the same plan after ``allocate`` again (new buffers, no
  graphs) with its kernels compiled: what a trainer's first step costs once warmed up.

A format without ``launch`` (the asymmetric int4 conversions today) runs the plan's checked path
(one ``fn`` call and host sync per tensor, no graphs); its rows say so. The ``launches`` column
counts what one eager (moving) step queues, from the plan's own segments and calls: grouped
kernels (counted with ``conversion_core.formats.group_table.groups``, the grouping the FP8
plugins' ``launch_group`` uses), per-tensor launches, and copies of kept tensors (each a copy
plus a NaN/Inf check); a fused set's statistic kernels (NVFP4's shared amax) are not counted.

``cpu``: the outputs of a few tensors after that step kind, byte for byte against a CPU plan of
the same conversion over the same sources (``CONVERSION_CORE_BACKEND=torch``: the torch path,
the definition). The sample: layer 0's and the last layer's attention projections (q/k/v a full
fused set), a norm, and per-expert two experts' gate/up/down, or, fused, two experts of each
stack (expert 0 and the one holding the stack's max |x|: every per-expert statistic, and the
stack-wide one of NVFP4's global scale, is then that of the full stack).

Memory: both state dicts of a layout (2 x ~31 GB at 24 layers) stay on the device while the
formats run one at a time, each plan freed before the next (outputs <= ~16 GB).

    python3 benchmarks/gpu_model_formats.py [--layers 24] [--reps 3] [--json out.json]
    TRITON_INTERPRET=1 CONVERSION_CORE_BACKEND=triton python benchmarks/gpu_model_formats.py --dry-run

Exit status: 1 when any checked bytes differ, 3 when a row failed to run, else 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
FP8 = ["fp8_128x128", "fp8_128x128_ue8m0", "cutlass_fp8_e4m3_per_channel"]
NEW = ["mxfp8", "mxfp4", "nvfp4", "nvfp4_modelopt", "int4_w4a16_g128", "int4_w4a16_g32", "int4_w4a16_asym_g128"]
LAYOUTS = ["fused", "per_expert"]
#: The dry run's model: every kind of tensor, few programs to interpret (K a multiple of 128, as
#: int4's group of 128 needs and as every K of the real model is).
TINY = dict(hidden=128, heads=1, kv_heads=1, head_dim=128, experts=3, inter=128, vocab=64)


def _load_bench_model() -> Any:
    spec = importlib.util.spec_from_file_location("_gpu_model_formats_bench_model", HERE / "bench_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its NamedTuple needs a registered module
    spec.loader.exec_module(module)
    return module


bm = _load_bench_model()


class Report:
    """Rows, byte mismatches and failures (each printed as it happens)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, str]] = []
        self.mismatches = 0

    def guard(self, where: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a failing row is a data point, never the end of the run
            line = f"{where}: {type(exc).__name__}: {str(exc)[:300]}"
            self.errors.append({"where": where, "error": line, "trace": traceback.format_exc()[-2000:]})
            print(f"  ERROR {line}", flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None


@contextmanager
def torch_backend() -> Iterator[None]:
    """The CPU torch path (the definition of the bytes) for what runs inside."""
    saved = os.environ.get("CONVERSION_CORE_BACKEND")
    os.environ["CONVERSION_CORE_BACKEND"] = "torch"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CONVERSION_CORE_BACKEND", None)
        else:
            os.environ["CONVERSION_CORE_BACKEND"] = saved


# ---- the CPU check ------------------------------------------------------------------------------


def sample(sd: Mapping[str, torch.Tensor], model: Any, fused: bool) -> dict[str, tuple[torch.Tensor, Any]]:
    """A few sources of the step, on the CPU: name -> (tensor, expert index into the full output or None)."""
    picked: dict[str, tuple[torch.Tensor, Any]] = {}
    for layer in sorted({0, model.layers - 1}):
        p = f"model.layers.{layer}."
        names = [p + f"self_attn.{x}_proj.weight" for x in "qkvo"] + [p + "input_layernorm.weight"]
        if fused:
            for proj in ("gate_up_proj", "down_proj"):
                stack = sd[p + f"mlp.experts.{proj}"]
                top = int(stack.abs().amax(dim=(1, 2)).argmax())
                index = torch.tensor(sorted({0, top}))
                picked[p + f"mlp.experts.{proj}"] = (stack[index.to(stack.device)].cpu(), index)
        else:
            for j in sorted({0, model.experts - 1}):
                names += [p + f"mlp.experts.{j}.{x}_proj.weight" for x in ("gate", "up", "down")]
        for n in names:
            picked[n] = (sd[n].cpu(), None)
    return picked


def cpu_outputs(fmt: str, picked: Mapping[str, tuple[torch.Tensor, Any]], fused_shards: Any) -> dict[str, torch.Tensor]:
    """The CPU plan's outputs over the sample (same conversion, same decisions, torch path)."""
    from conversion_core.plan import build_plan

    sources = {n: t for n, (t, _) in picked.items()}
    kwargs = {} if fused_shards is None else {"fused_shards": fused_shards}
    with torch_backend():
        plan = build_plan(sources, conversion=fmt, **kwargs)
        plan.allocate("cpu")
        return {k: v.clone() for k, v in plan.run(sources).items()}


def same_as_cpu(plan: Any, picked: Mapping[str, tuple[torch.Tensor, Any]], want: Mapping[str, torch.Tensor]) -> int:
    """Outputs of the sampled tensors that differ from the CPU plan's (0 is right)."""
    bad = 0
    for name, (src, index) in picked.items():
        for out_name in plan[name].output_names:
            got, ref = plan.outputs[out_name], want[out_name]
            if index is not None and got.shape != ref.shape:  # per expert: the sampled experts, one by one
                pairs = [(got[int(i)], ref[k]) for k, i in enumerate(index.tolist())]  # basic slicing: any dtype
            elif index is not None and ref.dim() == 1 and torch.equal(ref, _shape_of(src, ref)):
                pairs = [(got, torch.tensor(plan[name].src_shape, dtype=ref.dtype))]  # the full stack's shape
            else:
                pairs = [(got, ref)]
            ok = all(_same_bytes(g.detach().cpu(), r) for g, r in pairs)
            if not ok:
                print(f"    bytes differ from the CPU path: {out_name}", flush=True)
            bad += not ok
    return bad


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _shape_of(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(src.shape, dtype=like.dtype) if like.numel() == src.dim() else like.new_full(like.shape, -1)


# ---- what one eager step launches ---------------------------------------------------------------


def eager_launches(plan: Any, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Launches one eager (moving-source) step queues, segment by segment as ``Plan._queue`` does;
    grouped calls are split as ``group_table.groups`` splits them (source shape, dtype, K contiguous)."""
    from conversion_core.formats.group_table import MAX_GROUP
    from conversion_core.plan.graph_step import segment_bounds

    if not plan._launchable():
        return {"checked_calls": len(plan._calls)}
    per_entry: dict[str, int] = {}
    for call in plan._calls:
        per_entry[call.name] = per_entry.get(call.name, 0) + 1
    starts = [0]
    for e in plan.entries:
        starts.append(starts[-1] + per_entry.get(e.name, 0))
    cuts = [slice(None)]
    if plan.device is not None and plan.device.type == "cuda":  # the captured step's segments
        bounds = segment_bounds(len(plan.entries), plan.graph_first_segment, plan.graph_segment_growth)
        cuts = [slice(starts[a], starts[b]) for a, b in bounds]
    counts = {"grouped": 0, "per_tensor": 0, "copies": 0}
    for cut in cuts:
        keys: dict[tuple[Any, ...], int] = {}
        for call in plan._calls[cut]:
            e = plan[call.name]
            c = e.conversion
            src = state[call.name][call.index] if call.index else state[call.name]
            if not e.shared_with and c.launch_group is not None:
                if src.numel():
                    key = (id(c), src.shape, src.dtype, src.stride(-1) == 1)
                    keys[key] = keys.get(key, 0) + 1
            elif c.launch is not None or e.shared_with:
                counts["per_tensor"] += 1
            else:
                counts["copies"] += 1
        counts["grouped"] += sum(-(-n // MAX_GROUP) for n in keys.values())
    return counts


def _launch_text(counts: Mapping[str, int] | None) -> str:
    if not counts:
        return "-"
    if "checked_calls" in counts:
        return f"{counts['checked_calls']} fn+sync"
    parts = []
    if counts["grouped"]:
        parts.append(f"{counts['grouped']}g")
    if counts["per_tensor"]:
        parts.append(f"{counts['per_tensor']}t")
    parts.append(f"{counts['copies']}c")
    return "+".join(parts)


# ---- one format, one layout ---------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_format(
    report: Report,
    fmt: str,
    layout: str,
    sds: Sequence[dict[str, torch.Tensor]],
    picked: Sequence[dict[str, tuple[torch.Tensor, Any]]],
    gbps: float,
    args: argparse.Namespace,
    device: torch.device,
) -> None:
    from conversion_core.errors import ConversionInputError
    from conversion_core.plan import build_plan

    a, b = sds
    fused_shards = None
    label = layout
    try:
        plan = build_plan(a, conversion=fmt)
    except ConversionInputError as exc:
        if layout != "fused":
            raise
        # gate_up halves converted apart are refused (one whole-tensor output, e.g. weight_shape)
        print(f"  {fmt} fused: {str(exc)[:140]}; planned with fused_shards={{}} (gate_up whole)", flush=True)
        fused_shards, label = {}, "fused*"
        plan = build_plan(a, conversion=fmt, fused_shards={})
    plan.allocate(device)
    floor = bm.step_bytes(plan, a) / (gbps * 1e6)
    launched = plan._launchable()
    reps = args.reps if launched else 1
    want_a = cpu_outputs(fmt, picked[0], fused_shards)

    def timed(state: dict[str, torch.Tensor]) -> float:
        _sync(device)
        start = time.perf_counter()
        plan.run(state)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    def emit(kind: str, ms: float | None, bad: int | None, **extra: Any) -> None:
        row = {"format": fmt, "layout": label, "step": kind, "ms": ms, "floor_ms": floor,
               "ratio": None if ms is None else ms / floor, "cpu_mismatched": bad,
               "tensors": len(plan.entries), "calls": len(plan._calls), "launched": launched, **extra}  # fmt: skip
        report.rows.append(row)
        report.mismatches += bad or 0
        print_row(row)

    def check(which: int) -> int:
        want = want_a if which == 0 else cpu_outputs(fmt, picked[1], fused_shards)
        return same_as_cpu(plan, picked[which], want)

    emit("first", timed(a), check(0))
    if launched and device.type == "cuda":  # elsewhere nothing is captured: the same step again
        emit("capture", timed(a), check(0))
    fixed = [timed(a) for _ in range(reps)]
    graphs = len(plan._step.segments) if plan._step is not None and plan._step.complete else 0
    emit("fixed", statistics.median(fixed), check(0), graphs=graphs if plan._step is not None else 0)
    step = plan._step
    if step is not None and all(seg.graph is not None for seg in step.segments):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = []
        for _ in range(reps):
            start.record()
            step.replay()
            end.record()
            end.synchronize()
            replays.append(start.elapsed_time(end))
        emit("replay", statistics.median(replays), None, graphs=len(step.segments))
    moving = [timed(b if i % 2 == 0 else a) for i in range(2 * reps - 1)]  # B, A, ..., B: ends on B
    emit("moving", statistics.median(moving), check(1), launches=_launch_text(eager_launches(plan, b)))
    if launched:  # new buffers, nothing captured: the first step of a plan whose kernels are compiled
        plan.allocate(device)
        emit("first*", timed(a), check(0))


# ---- the run ------------------------------------------------------------------------------------

HEADER = (
    f"{'format':<29}{'layout':<11}{'step':<17}{'ms':>9}{'floor':>9}{'ratio':>9}"
    f"{'tensors':>8}{'graphs':>7}{'  launches (moving)':<22}{'cpu':>5}"
)


def print_row(r: Mapping[str, Any]) -> None:
    """One row: ms of the step kind, the floor, ratio, and ``cpu``: yes when the sampled outputs
    equal the CPU path's byte for byte (``-`` not checked)."""
    ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
    bad = r["cpu_mismatched"]
    cpu = "-" if bad is None else ("yes" if bad == 0 else f"NO:{bad}")
    path = "" if r["launched"] else " (checked)"
    graphs = r.get("graphs", "")
    print(
        f"{r['format']:<29}{r['layout']:<11}{r['step'] + path:<17}{ms:>9}{r['floor_ms']:>9.3f}{ratio:>9}"
        f"{r['tensors']:>8}{graphs!s:>7}  {r.get('launches', ''):<20}{cpu:>5}",
        flush=True,
    )


def run(report: Report, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import conversion_core as cc

    registry = cc.load_registry()
    model = bm.ModelShape(layers=args.layers, **TINY) if args.dry_run else bm.ModelShape(layers=args.layers)
    formats = [f for f in args.formats if f in registry.names()]
    for f in args.formats:
        if f not in formats:
            print(f"{f}: not installed, skipped", flush=True)
    state: dict[str, Any] = {"gbps": None}
    print(HEADER, flush=True)
    t0 = time.perf_counter()

    def one_layout(layout: str) -> None:
        fused = layout == "fused"
        sds = [bm.build_state_dict(model, fused, device, seed=s) for s in (0, 1)]
        picked = [sample(sd, model, fused) for sd in sds]
        if state["gbps"] is None:
            total = sum(t.numel() * t.element_size() for t in sds[0].values())
            size = min(total, 8 << 30) if device.type == "cuda" else total
            state["gbps"] = bm.copy_gbps(device, size, max(3, args.reps))
            print(f"copy {state['gbps']:.4g} GB/s (of {size / 1e6:.4g} MB)", flush=True)
        for fmt in formats:
            where = f"{fmt} {layout}"
            if args.budget and time.perf_counter() - t0 > args.budget:
                report.errors.append({"where": where, "error": f"skipped: past the --budget of {args.budget:.0f} s"})
                print(f"  SKIPPED {where}: past the --budget of {args.budget:.0f} s", flush=True)
                continue
            report.guard(where, lambda: bench_format(report, fmt, layout, sds, picked, state["gbps"], args, device))  # noqa: B023
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"    [{time.perf_counter() - t0:.0f} s]", flush=True)
        for sd in sds:
            sd.clear()

    for layout in args.layouts:
        report.guard(f"{layout} layout", lambda layout=layout: one_layout(layout))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gbps = state["gbps"]
    return {"model": model._asdict(), "copy_gbps": gbps, "seconds": time.perf_counter() - t0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_model_formats", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, help="layers of the model (default 24; 1 with --dry-run)")
    p.add_argument("--reps", type=int, default=3, help="steps per median (fixed, replay; moving: 2*reps-1)")
    p.add_argument("--formats", type=lambda s: s.split(","), default=FP8 + NEW)
    p.add_argument("--layouts", type=lambda s: s.split(","), default=LAYOUTS)
    p.add_argument("--budget", type=float, default=0, help="seconds after which rows left are skipped (0: none)")
    p.add_argument("--json", help="write every row here")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, a tiny model (proves the script)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("CONVERSION_CORE_BACKEND") != "triton":
            print("--dry-run needs TRITON_INTERPRET=1 and CONVERSION_CORE_BACKEND=triton", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        args.layers = args.layers or 1
        args.reps = 1
    elif not torch.cuda.is_available():
        print("no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        args.layers = args.layers or 24
    import triton

    card = "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"{card}  torch {torch.__version__}  triton {triton.__version__}  layers {args.layers}", flush=True)
    report = Report()
    meta = report.guard("run", lambda: run(report, args, device)) or {}
    print(
        "\nms: Plan.run wall clock (ends with its flag read), median; replay: the graphs alone (CUDA events);"
        "\nfloor: bytes in + out at the same run's copy bandwidth; launches per moving step: g grouped kernels,"
        "\nt per-tensor launches, c kept-tensor copies; cpu: sampled outputs == CPU torch path byte for byte."
    )
    print(f"cpu byte mismatches: {report.mismatches}; failures: {len(report.errors)}; {meta.get('seconds', 0):.0f} s")
    if args.json:
        data = {"meta": {"card": card, "torch": torch.__version__, "args": vars(args), **meta}, "rows": report.rows,
                "errors": report.errors}  # fmt: skip
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
    if report.mismatches:
        return 1
    return 3 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
