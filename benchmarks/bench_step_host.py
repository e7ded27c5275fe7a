"""Host time per tensor of a plan's launched step whose sources sit at new addresses every step (CPU).

After an FSDP all-gather every source is a new tensor: no graph can replay, and the step is the
host path alone, ``validate``, the queue loop gathering each call's tensors, and per run of
same-shaped tensors one grouped launch that builds its device table. On a GPU that host time is
the step's floor once the kernels are quick (a 24-layer per-expert Qwen3-30B-A3B step holds ~9.4k
tensors). This measures it where no kernel runs: a Qwen3-MoE-shaped state dict of tiny tensors,
a format-free conversion whose ``launch_group`` builds the real tables
(:func:`conversion_core.formats.group_table.groups`) and launches nothing, two state dicts
alternating (new addresses every step). Rows:

- ``step``: ``Plan.run`` as on CPU (validate, queue, the flag read);
- ``cuda-like step``: what ``Plan.run`` does on CUDA for moving sources (validate, the captured
  step's layout check and record per segment, the queue, the flag read), driven on CPU;
- ``validate``, ``queue``, ``tables``: the parts (``tables``: ``group_table.groups`` over every
  grouped call of the step as plain tuples, once; ``run tables``: the same calls as the plan
  hands them, a ``SourceRun`` over its fixed layout).

    python benchmarks/bench_step_host.py [--layers 24] [--experts 128] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

# the launched step on CPU: Triton "picked" (nothing here runs a kernel; set before the import)
os.environ["CONVERSION_CORE_BACKEND"] = "triton"
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import conversion_core as cc  # noqa: E402
from conversion_core.contract.runs import SourceRun  # noqa: E402
from conversion_core.formats import group_table  # noqa: E402
from conversion_core.plan import build_plan  # noqa: E402
from conversion_core.plan.graph_step import CapturedStep  # noqa: E402


def _noop(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor) -> None:
    return None


def _noop_launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, flag: torch.Tensor) -> None:
    return None


def _tables_only(items: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
    """A grouped launch's host work without its kernel: the device tables of every group."""
    group_table.groups(items)


def conversion() -> cc.Conversion:
    return cc.Conversion(
        name="noop_rows_grouped",
        fn=_noop,
        requires_scale=True,
        dst_dtype=torch.float8_e4m3fn,
        scale_shape=lambda shape: (*shape[:-1], 1),
        scale_name="weight_scale",
        compile_target="noop_rows",
        src_ndims=(2, 3),
        launch=_noop_launch,
        launch_group=_tables_only,
    )


def state_dict(layers: int, experts: int, seed: int) -> dict[str, torch.Tensor]:
    """Qwen3-MoE names and layout (per-expert views of one stack per projection), tiny shapes."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    hidden, inter, head, heads, kv = 64, 32, 16, 4, 2
    sd = {"model.embed_tokens.weight": w(128, hidden), "lm_head.weight": w(128, hidden), "model.norm.weight": w(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"] = w(hidden)
        for proj, rows, cols in (("q", heads * head, hidden), ("k", kv * head, hidden), ("v", kv * head, hidden),
                                 ("o", hidden, heads * head)):  # fmt: skip
            sd[p + f"self_attn.{proj}_proj.weight"] = w(rows, cols)
        sd[p + "self_attn.q_norm.weight"] = w(head)
        sd[p + "self_attn.k_norm.weight"] = w(head)
        sd[p + "mlp.gate.weight"] = w(experts, hidden)
        stacks = {"gate_proj": w(experts, inter, hidden), "up_proj": w(experts, inter, hidden)}
        stacks["down_proj"] = w(experts, hidden, inter)
        for j in range(experts):
            for proj, stack in stacks.items():
                sd[p + f"mlp.experts.{j}.{proj}.weight"] = stack[j]
    return sd


def median_ms(fn: Callable[[int], Any], reps: int) -> float:
    """Median wall ms of ``fn(i)`` over ``reps`` runs after one warm-up (``i``: the run's index)."""
    fn(-1)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_step_host", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    conv = conversion()
    registry = cc.Registry([], [(conv, "bench")], [])
    sds = [state_dict(args.layers, args.experts, seed) for seed in (0, 1)]  # alternating: new addresses
    plan = build_plan(sds[0], conversion=conv.name, registry=registry)
    plan.allocate("cpu")
    n = len(plan.entries)
    grouped_calls = sum(1 for e in plan.entries if e.kept is None)
    print(f"torch {torch.__version__}, one thread; {args.layers} layers x {args.experts} experts: {n} tensors "
          f"({grouped_calls} grouped, {n - grouped_calls} copied); median of {args.reps}, sources moving")  # fmt: skip
    calls_per_entry = Counter(call.name for call in plan._calls)
    step = CapturedStep(
        [e.name for e in plan.entries], [calls_per_entry[e.name] for e in plan.entries], plan._flags, 8, 32
    )

    def cuda_like(i: int) -> None:
        sd = sds[i % 2]
        plan.validate(sd)
        step.run(sd, lambda calls, streams: plan._queue(sd, calls, streams))
        plan._check_flag(sd)

    def tables(i: int) -> None:
        sd = sds[i % 2]
        group_table.groups([(sd[c.name], *c.buffers) for c in plan._calls if plan[c.name].kept is None])

    def run_tables(i: int) -> None:
        sd = sds[i % 2]
        assert plan._records is not None
        for _, names, _, layout in plan._queue_split(slice(None), plan._records, {})[1]:
            group_table.groups(SourceRun([sd[n] for n in names], layout))

    rows = [
        ("step (Plan.run)", lambda i: plan.run(sds[i % 2])),
        ("cuda-like step", cuda_like),
        ("validate", lambda i: plan.validate(sds[i % 2])),
        ("queue", lambda i: plan._queue(sds[i % 2], slice(None))),
        ("tables", tables),
        ("run tables", run_tables),
    ]
    print(f"{'part':<18}{'ms':>9}{'us/tensor':>11}")
    for label, fn in rows:
        ms = median_ms(fn, args.reps)
        print(f"{label:<18}{ms:>9.2f}{ms * 1e3 / n:>11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
