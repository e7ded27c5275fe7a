"""Issue 17 in one run on one GPU: bytes of every kernel variant and of grouped launches, speed
against the same run's copy, the checked fn and convert_many, and whole-model steps.

Sections (each catches and reports its own failures, so one broken variant never ends the run):

1. ``check``: on shapes that are and are not multiples of the block (2D, 3D stacks, one row,
   strided views), every kernel variant (the block kernel's :class:`BlockConfig` sweep, the row
   kernel's launch shapes), the UE8M0 block kernel and the grouped launches (per-expert views of
   one stack, mixed shapes) write exactly the CPU torch path's bytes.
2. ``quant``: per bench shape (``bench_quant.SHAPES``), ``triton.testing.do_bench`` medians of a
   device-to-device copy of the same input, every kernel variant (each one's bytes compared with
   the default variant's, which section 1 ties to the CPU), the checked ``Conversion.fn``,
   ``convert_many`` over the per-expert views of a 3D stack (against ``fn`` per expert), and
   torchao's / fbgemm's Triton quantizers when importable. GB/s = bytes read + written / time
   (copy 4 B/element, bf16 -> e4m3 3 B/element); ratios are to the copy.
3. ``model``: ``bench_model.py``'s Qwen3-30B-A3B-shaped step, both layouts and formats: fixed
   sources (replayed graphs), the first step, the capture step, and (at ``--moving-layers``)
   sources at new addresses every step (grouped launches), each as a ratio to the floor.

    python benchmarks/gpu_grouped.py [--json out.json] [--sections check,quant,model] [--quick]
    TRITON_INTERPRET=1 CONVERSION_CORE_BACKEND=triton python benchmarks/gpu_grouped.py --dry-run

Exit status: 1 when any bytes differ, 3 when a section or variant failed to run, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

BLOCK = "fp8_128x128"
UE8M0 = "fp8_128x128_ue8m0"
CHANNEL = "cutlass_fp8_e4m3_per_channel"
HERE = Path(__file__).resolve().parent


class Report:
    """What the run found: rows per section, byte mismatches, failures (printed as they happen)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"check": [], "quant": [], "model": [], "errors": []}
        self.mismatches = 0

    def error(self, where: str, exc: BaseException) -> None:
        line = f"{where}: {type(exc).__name__}: {str(exc)[:300]}"
        self.data["errors"].append({"where": where, "error": line, "trace": traceback.format_exc()[-2000:]})
        print(f"  ERROR {line}", flush=True)

    def guard(self, where: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a variant that fails is a data point, never the end of the run
            self.error(where, exc)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None


def _load(name: str) -> ModuleType:
    """A sibling benchmark file as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_gpu_grouped_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # bench_model's NamedTuple and dataclasses need it
    spec.loader.exec_module(module)
    return module


# ---- timing -----------------------------------------------------------------------------------


def _bench(fn: Callable[[], Any], dry: bool, rep: int = 100) -> float:
    """Median ms: ``triton.testing.do_bench`` on a GPU (L2 flushed before each call), wall clock dry."""
    if dry:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def _gbps(nbytes: float, ms: float | None) -> float | None:
    return None if not ms else nbytes / ms / 1e6


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


# ---- the kernels and their variants -----------------------------------------------------------


def _block_kernels() -> ModuleType:
    from conversion_core_deepgemm_fp8 import triton_kernels

    return triton_kernels


def _row_kernels() -> ModuleType:
    from conversion_core_cutlass_fp8 import triton_kernels

    return triton_kernels


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def block_variants(quick: bool, name: str = BLOCK, device: torch.device | None = None) -> list[Any]:
    """The block kernel's launch shapes worth timing: this device's default first, then the H100 pick.

    From the 2026-12-04 H200 probe (benchmarks/results/h200_2026-12-04_fp8k/variant_probe.txt):
    4 warps beat 8 and 16 everywhere, a persistent grid ties one tile per program, 4 stages and
    32 warps lose badly (dropped). So the sweep is 4 warps around that, the flags left out one at
    a time, and the old picks for reference. The check section takes ``[:2]`` plus the first
    persistent one for UE8M0 and dry runs: those carry every new flag.
    """
    tk = _block_kernels()
    device = device or _default_device()
    new = {"short_div": True, "pow2_mul": True, "tile_base": True}
    four = tk.BlockConfig(num_warps=4, **new)
    out = [tk.config_for(device), four, tk.BlockConfig(num_warps=4, programs_per_sm=4, num_stages=3, **new)]
    if not quick:
        out += [
            tk.BlockConfig(num_warps=4, programs_per_sm=2, num_stages=3, **new),
            tk.BlockConfig(num_warps=4, programs_per_sm=8, num_stages=2, **new),
            tk.BlockConfig(num_warps=8, programs_per_sm=2, num_stages=3, **new),
            dataclasses.replace(four, evict_first=False),
        ]
        out += [dataclasses.replace(four, **{flag: False}) for flag in new]  # one flag left out at a time
    out += [tk.BlockConfig(), tk.BlockConfig(num_warps=8, programs_per_sm=4, num_stages=3)]  # old default, old best
    if name != UE8M0:  # pow2_mul changes nothing there
        out = [dataclasses.replace(v, pow2_mul=False) for v in out]
    unique: list[Any] = []
    for v in out:
        if v not in unique:
            unique.append(v)
    return unique


def row_variants(shape: Sequence[int], quick: bool, device: torch.device | None = None) -> list[Any]:
    """The per-channel kernel's launch shapes for rows of ``shape[-1]``: this device's first, then the H100 pick.

    From the 2026-12-04 H200 probe: fewer warps and rows per program won (K = 2048: 2 rows, 4
    warps; long rows: 8-warp chunks), ``short_div`` helped everywhere; around those.
    """
    tk = _row_kernels()
    k = shape[-1]
    device = device or _default_device()
    pick = tk.pick_config(k)
    out = [tk.config_for(k, device), pick, dataclasses.replace(pick, short_div=True)]
    extra: list[Any] = []
    if k <= 4096 and k & (k - 1) == 0:
        for rows, nw in ((1, 4), (2, 2), (1, 2), (4, 4)):
            extra.append(tk.RowConfig(rows=rows, block_k=k, single=True, num_warps=nw, short_div=True))
        extra.append(dataclasses.replace(pick, programs_per_sm=8, short_div=True))
    elif k <= 4096:
        chunk = 512 if k % 512 == 0 else 256
        for rows, nw in ((8, 4), (32, 8), (4, 4)):
            extra.append(tk.RowConfig(rows=rows, block_k=chunk, single=False, num_warps=nw, short_div=True))
        bk = 1 << (k - 1).bit_length()
        extra.append(tk.RowConfig(rows=max(1, 4096 // bk), block_k=bk, single=True, num_warps=4, short_div=True))
    else:
        for bk, nw, pps in ((8192, 8, 0), (16384, 8, 0), (8192, 4, 0), (16384, 8, 4), (4096, 4, 0)):
            extra.append(
                tk.RowConfig(rows=1, block_k=bk, single=False, num_warps=nw, programs_per_sm=pps, short_div=True)
            )
    out += extra[:2] if quick else extra
    unique: list[Any] = []
    for v in out:
        if v not in unique:
            unique.append(v)
    return unique


def variant_label(variant: Any) -> str:
    """The fields that differ from the class's own defaults (``rows``-style fields always)."""
    fields = dataclasses.fields(variant)
    parts = []
    for f in fields:
        value = getattr(variant, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            parts.append(f"{f.name}={value}")
    return ",".join(parts) or "defaults"


def launch_variant(name: str, variant: Any, src: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, flag):
    if name == CHANNEL:
        return lambda: _row_kernels().launch_rows(src, out, scale, flag, variant)
    return lambda: _block_kernels().launch_blocks(
        src, out, scale, flag, (128, 128), ue8m0=name == UE8M0, config=variant
    )


def cpu_path(conversion: Any, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU torch path's bytes (the definition) for ``src``, wherever ``src`` lives."""
    saved = os.environ.get("CONVERSION_CORE_BACKEND")
    os.environ["CONVERSION_CORE_BACKEND"] = "torch"
    try:
        out, scale = conversion.convert(src.detach().cpu())
    finally:
        if saved is None:
            os.environ.pop("CONVERSION_CORE_BACKEND", None)
        else:
            os.environ["CONVERSION_CORE_BACKEND"] = saved
    return out, scale


def same_bytes(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.uint8).cpu(), b[0].view(torch.uint8).cpu()) and torch.equal(
        a[1].view(torch.int32).cpu(), b[1].view(torch.int32).cpu()
    )


def _weights(shape: Sequence[int], dtype: torch.dtype, seed: int, device: torch.device) -> torch.Tensor:
    """Many magnitudes per row and element (every e4m3 regime), a signed zero (as tests/gpu)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    x = torch.randn(shape, generator=g)
    x *= torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-6, 6, generator=g))
    x *= torch.exp(torch.empty(shape).uniform_(-4, 0, generator=g))
    x.view(-1)[0] = -0.0
    return x.to(dtype).to(device)


# ---- 1. bytes ---------------------------------------------------------------------------------


def check_sources(device: torch.device, dry: bool) -> list[tuple[str, torch.Tensor]]:
    big = (1, 1) if dry else (8, 8)
    stack = _weights((3, 130, 257), torch.bfloat16, 1, device)
    return [
        ("(2048,2048) bf16", _weights((256 * big[0], 256 * big[1]), torch.bfloat16, 2, device)),
        ("(1000,1500) fp16", _weights((100 * big[0], 150 * big[1]), torch.float16, 3, device)),
        ("(3,130,257) bf16", stack),
        ("(1,700) fp32", _weights((1, 700), torch.float32, 4, device)),
        ("(130,9000) bf16", _weights((13 if dry else 130, 9000), torch.bfloat16, 5, device)),
        ("transposed", _weights((300, 140), torch.bfloat16, 6, device).t()),
        ("column slice", _weights((140, 600), torch.bfloat16, 7, device)[:, ::2]),
        ("experts permuted", _weights((130, 3, 200), torch.bfloat16, 8, device).permute(1, 0, 2)),
    ]


def check_section(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    import conversion_core as cc

    registry = cc.load_registry()
    sources = check_sources(device, args.dry_run)
    for name in (BLOCK, UE8M0, CHANNEL):
        if name not in registry.names():
            print(f"check: {name} not installed, skipped")
            continue
        conversion = registry.get(name)
        for label, src in sources:
            want = report.guard(f"check {name} {label} cpu path", lambda: cpu_path(conversion, src))  # noqa: B023
            if want is None:
                continue
            variants = block_variants(args.quick, name) if name != CHANNEL else row_variants(src.shape, args.quick)
            if name == UE8M0 or args.dry_run:  # the tile function is shared: a few launch shapes suffice
                variants = variants[:2] + [v for v in variants if getattr(v, "programs_per_sm", 0)][:1]
            bad: list[str] = []
            for variant in variants:

                def run(variant: Any = variant) -> bool:
                    out, scale = conversion.allocate(src.shape, device)  # noqa: B023
                    out.view(torch.uint8).fill_(0x7F)
                    scale.fill_(float("nan"))
                    flag = torch.zeros(1, dtype=torch.int32, device=device)
                    launch_variant(name, variant, src, out, scale, flag)()  # noqa: B023
                    return same_bytes((out, scale), want) and int(flag) == 0  # noqa: B023

                ok = report.guard(f"check {name} {label} {variant}", run)
                if ok is False:
                    bad.append(str(variant))
            fn_ok = report.guard(f"check {name} {label} fn", lambda: same_bytes(conversion.convert(src), want))  # noqa: B023
            row = {"format": name, "source": label, "variants": len(variants), "mismatched": bad, "fn": fn_ok}
            report.mismatches += len(bad) + (fn_ok is False)
            report.data["check"].append(row)
            print(f"check {name:<30} {label:<18} variants {len(variants):>3}  fn {fn_ok}  mismatched {bad or 'none'}")
        # grouped: per-expert views of one stack, mixed shapes and layouts in one launch_group
        members = [src[j] for j in range(3) for _, src in sources[2:3]] + [src for _, src in sources]

        def grouped(conversion: Any = conversion, members: list[torch.Tensor] = members) -> bool:
            items = []
            for src in members:
                out, scale = conversion.allocate(src.shape, device)
                out.view(torch.uint8).fill_(0x7F)
                scale.fill_(float("nan"))
                items.append((src, out, scale))
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            conversion.launch_group(items, flag)
            ok = int(flag) == 0
            for src, out, scale in items:
                ok &= same_bytes((out, scale), cpu_path(conversion, src))
            many = [(src, *conversion.allocate(src.shape, device)) for src in members]
            conversion.convert_many(many)
            for (_, o1, s1), (_, o2, s2) in zip(items, many, strict=True):
                ok &= same_bytes((o1, s1), (o2, s2))
            return ok

        ok = report.guard(f"check {name} grouped", grouped)
        report.mismatches += ok is False
        report.data["check"].append({"format": name, "source": "grouped", "members": len(members), "ok": ok})
        print(f"check {name:<30} grouped launch of {len(members)} tensors + convert_many == cpu path: {ok}")


# ---- 2. speed per shape -----------------------------------------------------------------------


#: fbgemm's Triton quantizers index with int32 offsets: on a tensor of 2^31 elements or more (the
#: (256, 2048, 7168) DeepSeek stack) its kernel hit an illegal memory access on the H200 (run of
#: 2026-12-04), which kills the CUDA context and every later row. Not timed there.
FBGEMM_MAX_NUMEL = 2**31 - 1


def peers(name: str, numel: int = 0) -> dict[str, Callable[[torch.Tensor], Any]]:
    """torchao's and fbgemm's Triton quantizers that import here (benchmark only, never a dependency)."""
    found: dict[str, Callable[[torch.Tensor], Any]] = {}
    if numel > FBGEMM_MAX_NUMEL:
        print(f"  fbgemm not timed: {numel} elements >= 2^31 (its int32 offsets fault)", flush=True)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  (their kernels take 2D)
    if name == BLOCK:
        for module, attr in (
            ("torchao.prototype.blockwise_fp8_inference.blockwise_quantization", "fp8_blockwise_weight_quant"),
            ("torchao.prototype.blockwise_fp8.blockwise_quantization", "fp8_blockwise_weight_quant"),
        ):
            fn = _try_import(module, attr)
            if fn is not None:
                found["torchao"] = lambda x, fn=fn: fn(flat(x), 128)
                break
        fn = _try_import("fbgemm_gpu.experimental.gemm.triton_gemm.fp8_gemm", "quantize_fp8_block")
        if fn is not None and numel <= FBGEMM_MAX_NUMEL:
            found["fbgemm"] = lambda x, fn=fn: fn(flat(x), 128, 128)
    elif name == CHANNEL:
        fn = _try_import("fbgemm_gpu.experimental.gemm.triton_gemm.fp8_gemm", "quantize_fp8_row")
        if fn is not None and numel <= FBGEMM_MAX_NUMEL:
            found["fbgemm"] = lambda x, fn=fn: fn(flat(x))
    return found


def _try_import(module: str, attr: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:
        return None


def quant_section(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    import conversion_core as cc

    bq = _load("bench_quant")
    registry = cc.load_registry()
    dry = args.dry_run
    wanted = set(args.shapes.split(",")) if args.shapes else None
    for label, shape, _ in bq.SHAPES:
        if wanted and label not in wanted:
            continue
        if dry:  # the structure (experts, partial blocks, long rows), tiny sizes
            shape = tuple(max(1, d // 64) + (3 if i == len(shape) - 1 else 0) for i, d in enumerate(shape))
        src = report.guard(f"quant {label} source", lambda: torch.randn(shape, dtype=torch.bfloat16, device=device))  # noqa: B023
        if src is None:
            continue
        numel = src.numel()
        copy_ms = _copy_ms(src, dry)
        copy_gbps = _gbps(4 * numel, copy_ms)
        print(f"\n{label} {tuple(shape)}: copy {_fmt(copy_gbps)} GB/s", flush=True)
        for name in (BLOCK, UE8M0, CHANNEL):
            if name not in registry.names():
                continue
            report.guard(f"quant {label} {name}", lambda: _quant_one(report, args, device, label, name, src, copy_gbps))  # noqa: B023
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _same_on_device(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """``same_bytes`` without the copies to the host (gigabytes per variant on the big shapes)."""
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(
        a[1].view(torch.int32), b[1].view(torch.int32)
    )


def _copy_ms(src: torch.Tensor, dry: bool) -> float:
    dst = torch.empty_like(src)
    return _bench(lambda: dst.copy_(src), dry)


def _quant_one(
    report: Report, args: argparse.Namespace, device: torch.device, label: str, name: str, src: torch.Tensor, copy_gbps
) -> None:
    import conversion_core as cc

    dry = args.dry_run
    conversion = cc.load_registry().get(name)
    numel = src.numel()
    out, scale = conversion.allocate(src.shape, device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    variants = (
        block_variants(args.quick, name, device) if name != CHANNEL else row_variants(src.shape, args.quick, device)
    )
    if not args.sweep:
        variants = variants[:1]
    default = launch_variant(name, variants[0], src, out, scale, flag)
    default()
    ref = (out.clone(), scale.clone())
    row: dict[str, Any] = {"shape_name": label, "shape": list(src.shape), "format": name, "copy_gbps": copy_gbps}

    def ratio(ms: float | None) -> float | None:
        g = _gbps(3 * numel, ms)
        return None if g is None or not copy_gbps else g / copy_gbps

    row["kernel_ms"] = _bench(default, dry)
    row["kernel_ratio"] = ratio(row["kernel_ms"])
    row["default_variant"] = str(variants[0])
    sweep = [{"variant": str(variants[0]), "label": variant_label(variants[0]), "ms": row["kernel_ms"],
              "ratio": row["kernel_ratio"], "same_bytes": True}]  # fmt: skip
    for variant in variants[1:]:

        def timed(variant: Any = variant) -> dict[str, Any]:
            v_out, v_scale = torch.empty_like(out), torch.empty_like(scale)
            run = launch_variant(name, variant, src, v_out, v_scale, flag)
            run()
            same = _same_on_device((v_out, v_scale), ref)
            ms = _bench(run, dry, rep=50)
            return {"variant": str(variant), "label": variant_label(variant), "ms": ms, "ratio": ratio(ms),
                    "same_bytes": same}  # fmt: skip

        result = report.guard(f"quant {label} {name} {variant}", timed)
        if result is not None:
            sweep.append(result)
            report.mismatches += not result["same_bytes"]
    best = min((s for s in sweep if s["same_bytes"] and s["ms"]), key=lambda s: s["ms"], default=sweep[0])
    row["best_variant"], row["best_ratio"] = best["variant"], best["ratio"]
    row["sweep"] = sweep
    if len(sweep) > 1:  # the per-variant table, fastest first
        print(f"  {name}: {len(sweep)} variants (ratio to copy, bytes == default variant's)", flush=True)
        for s_ in sorted(sweep, key=lambda s: s["ms"] or float("inf")):
            same = "same" if s_["same_bytes"] else "DIFF"
            print(f"    {_fmt(s_['ms'], '.3f'):>8} ms  {_fmt(s_['ratio'], '.3f')}  {same}  {s_['label']}", flush=True)
    # The checked fn against the plugin's own function (same arguments; both end with the flag
    # read): the difference is what the core's checks add per call. ``launch`` is the plugin's
    # sync-free launch (its default configuration, no flag read) and ``host`` the checks' host
    # time alone (perf_counter over many calls, nothing queued): the four split fn / kernel.
    row["raw_fn_ms"] = report.guard(
        f"quant {label} {name} raw_fn", lambda: _bench(lambda: conversion.raw_fn(src, out, scale), dry)
    )
    row["fn_ms"] = report.guard(f"quant {label} {name} fn", lambda: _bench(lambda: conversion.fn(src, out, scale), dry))
    if conversion.launch is not None:
        row["launch_ms"] = report.guard(
            f"quant {label} {name} launch", lambda: _bench(lambda: conversion.launch(src, out, scale, flag), dry)
        )
    row["fn_ratio"] = ratio(row["fn_ms"])
    row["fn_over_kernel"] = row["kernel_ms"] / row["fn_ms"] if row["fn_ms"] else None
    if row["fn_ms"] and row["raw_fn_ms"]:
        row["fn_added_us"] = (row["fn_ms"] - row["raw_fn_ms"]) * 1e3
    row["fn_check_host_us"] = report.guard(
        f"quant {label} {name} fn checks host", lambda: _host_us(lambda: conversion.fn.__cc_check__(src, (out, scale)))
    )
    if src.dim() == 3:  # per-expert views: convert_many (grouped) against fn per expert
        experts = [(src[j], out[j], scale[j]) for j in range(src.shape[0])]
        row["experts"] = len(experts)
        row["many_ms"] = report.guard(
            f"quant {label} {name} convert_many", lambda: _bench(lambda: conversion.convert_many(experts), dry)
        )
        if conversion.launch_group is not None:  # the grouped kernels alone: tables built, no checks, no flag read
            row["group_launch_ms"] = report.guard(
                f"quant {label} {name} launch_group",
                lambda: _bench(lambda: conversion.launch_group(experts, flag), dry),
            )
            row["group_tables_host_us_per_item"] = report.guard(
                f"quant {label} {name} group tables host",
                lambda: _host_us(lambda: _group_tables(experts), calls=20) / len(experts),
            )
        check = conversion.fn.__cc_check__
        row["many_checks_host_us_per_item"] = report.guard(
            f"quant {label} {name} convert_many checks host",
            lambda: _host_us(lambda: [check(e[0], e[1:]) for e in experts], calls=20) / len(experts),
        )
        row["fn_loop_ms"] = report.guard(
            f"quant {label} {name} fn loop",
            lambda: _bench(lambda: [conversion.fn(*e) for e in experts], dry, rep=30),
        )
        row["many_ratio"], row["fn_loop_ratio"] = ratio(row["many_ms"]), ratio(row["fn_loop_ms"])
        row["group_launch_ratio"] = ratio(row.get("group_launch_ms"))
        if row["many_ms"] and row.get("group_launch_ms"):
            row["many_over_group_launch"] = row["group_launch_ms"] / row["many_ms"]
    for peer, fn in peers(name, numel).items():
        row[f"{peer}_ms"] = report.guard(f"quant {label} {peer}", lambda fn=fn: _bench(lambda: fn(src), dry))
        row[f"{peer}_ratio"] = ratio(row[f"{peer}_ms"])
    report.data["quant"].append(row)
    peer_text = "  ".join(
        f"{p} {_fmt(row.get(f'{p}_ratio'), '.3f')}" for p in ("torchao", "fbgemm") if f"{p}_ms" in row
    )
    peer_best = max((row[f"{p}_ratio"] for p in ("torchao", "fbgemm") if row.get(f"{p}_ratio")), default=None)
    row["target_met"] = bool(
        row["best_ratio"] and row["best_ratio"] >= 0.95 and (peer_best is None or row["best_ratio"] >= peer_best)
    )
    peer_text += f"  target(>=0.95{', >=peers' if peer_best else ''}) {'MET' if row['target_met'] else 'missed'}"
    many = ""
    if "many_ms" in row:
        many = (
            f"\n    {row['experts']} experts: convert_many {_fmt(row.get('many_ratio'), '.3f')}"
            f" (launch_group alone {_fmt(row.get('group_launch_ratio'), '.3f')}, host per item: checks"
            f" {_fmt(row.get('many_checks_host_us_per_item'), '.2f')} us + tables"
            f" {_fmt(row.get('group_tables_host_us_per_item'), '.2f')} us)"
            f"  fn-loop {_fmt(row.get('fn_loop_ratio'), '.3f')}"
        )
    print(
        f"  {name:<30} kernel {_fmt(_gbps(3 * numel, row['kernel_ms']))} GB/s ratio {_fmt(row['kernel_ratio'], '.3f')}"
        f"  best {_fmt(row['best_ratio'], '.3f')} [{best['label']}]  launch {_fmt(ratio(row.get('launch_ms')), '.3f')}"
        f"  raw_fn {_fmt(ratio(row.get('raw_fn_ms')), '.3f')}  fn {_fmt(row['fn_ratio'], '.3f')}"
        f" (fn/kernel {_fmt(row['fn_over_kernel'], '.3f')}, fn adds {_fmt(row.get('fn_added_us'), '.1f')} us/call,"
        f" checks {_fmt(row.get('fn_check_host_us'), '.2f')} us host){many}  {peer_text}",
        flush=True,
    )


def _host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Median host microseconds per ``fn()`` (perf_counter, 5 rounds of ``calls``; nothing waited for)."""
    fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[2]


def _group_tables(items: Sequence[tuple[Any, ...]]) -> Any:
    from conversion_core.formats import group_table

    return group_table.groups(items)


# ---- 3. whole-model steps ---------------------------------------------------------------------


def model_section(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    import conversion_core as cc

    bm = _load("bench_model")
    cc.load_registry()
    tiny = bm.ModelShape(layers=1, hidden=256, heads=2, kv_heads=1, head_dim=128, experts=4, inter=128, vocab=256)
    runs = [(False, args.layers), (True, args.moving_layers)]
    print(f"\n{bm.HEADER}", flush=True)
    for moving, layers in runs:
        if layers <= 0:
            continue
        model = tiny if args.dry_run else bm.ModelShape(layers=layers)
        margs = argparse.Namespace(device=str(device), reps=1 if args.dry_run else args.reps, growth=None,
                                   moving=moving, check=True)  # fmt: skip
        for layout in ("per_expert", "fused"):

            def one(layout: str = layout, model: Any = model, margs: argparse.Namespace = margs) -> None:
                sd = bm.build_state_dict(model, layout == "fused", device)
                total = sum(t.numel() * t.element_size() for t in sd.values())
                gbps = bm.copy_gbps(device, min(total, 8 << 30) if device.type == "cuda" else total, margs.reps)
                for fmt in bm.FORMATS:

                    def step(fmt: str = fmt, sd: dict[str, torch.Tensor] = sd) -> None:
                        row = bm.bench_one(model, layout, fmt, 8, bm.GRAPH_FIRST_SEGMENT, sd, margs)
                        row["layers"], row["copy_gbps"] = model.layers, gbps
                        row["floor_ms"] = row["bytes"] / (gbps * 1e6)
                        for key in ("step_ms", "first_step_ms", "capture_step_ms", "moving_step_ms", "replay_ms"):
                            if row.get(key) is not None:
                                row[key.replace("_ms", "_ratio")] = row[key] / row["floor_ms"]
                        row["ratio"] = row["step_ratio"]
                        report.mismatches += row["mismatched_outputs"] or 0
                        report.data["model"].append(row)
                        bm.print_row(row)
                        print(
                            f"    {model.layers} layers, floor {row['floor_ms']:.2f} ms: fixed {row['step_ratio']:.2f}x"
                            f"  first {row['first_step_ratio']:.1f}x  capture {row['capture_step_ratio']:.1f}x"
                            + (f"  moving {row['moving_step_ratio']:.2f}x" if row.get("moving_step_ratio") else ""),
                            flush=True,
                        )

                    report.guard(f"model {layout} {fmt} layers={model.layers} moving={margs.moving}", step)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                sd.clear()  # the sources, freed before the next layout's

            report.guard(f"model {layout} layers={model.layers}", one)
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_grouped", description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="check,quant,model", help="comma list of check, quant, model")
    p.add_argument("--shapes", help="comma list of bench_quant shape names (default: all)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="time only the default kernel variant")
    p.add_argument("--quick", action="store_true", help="fewer kernel variants")
    p.add_argument("--layers", type=int, default=24, help="layers of the fixed-source model step (0: skip)")
    p.add_argument("--moving-layers", type=int, default=12, help="layers of the moving-source step (0: skip)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes (proves the script)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("CONVERSION_CORE_BACKEND") != "triton":
            print("--dry-run needs TRITON_INTERPRET=1 and CONVERSION_CORE_BACKEND=triton", file=sys.stderr)
            return 2
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    import triton

    report = Report()
    card = "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name(device)
    report.data["meta"] = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "args": vars(args)}
    print(f"{card}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    sections = {"check": check_section, "quant": quant_section, "model": model_section}
    for section in args.sections.split(","):
        if section not in sections:
            print(f"unknown section {section!r}; known: {', '.join(sections)}", file=sys.stderr)
            return 2
        print(f"\n== {section} ==", flush=True)
        report.guard(f"section {section}", lambda section=section: sections[section](report, args, device))
        if args.json:  # written after every section: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(report.data, indent=2, default=str) + "\n")
    errors = len(report.data["errors"])
    print(f"\nbyte mismatches: {report.mismatches}; failures: {errors}")
    if report.mismatches:
        return 1
    return 3 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
