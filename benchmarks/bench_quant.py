"""Quantizer speed against the memory-bandwidth ceiling, on one GPU in one run.

For every shape and both FP8 formats, times (``triton.testing.do_bench``, median, L2 flushed
before every call, so each call reads its input from HBM): a device-to-device copy of the
same bf16 tensor, the eager torch path, ``torch.compile`` of the same math, the Triton kernel
alone, and the public checked ``Conversion.fn`` (which adds the argument checks and the one
host sync of the NaN/Inf check). GB/s count bytes read plus bytes written: 4 per element for
the bf16 copy, 3 for bf16 -> e4m3 (scales are noise). The ratio that matters is the kernel's
GB/s over the copy's on the same shape. Bytes are checked against the torch path first.

    python benchmarks/bench_quant.py [--json results.json] [--shapes q_proj,mlp.up] [--sweep]
    python benchmarks/bench_quant.py --cpu     # also the CPU section, where benchmarks/_cpu_bench.py exists
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BLOCK = "fp8_128x128"
CHANNEL = "cutlass_fp8_e4m3_per_channel"
FORMATS = (BLOCK, CHANNEL)
#: --dry-run: CPU tensors through Triton's interpreter, tiny shapes, wall-clock timing; proves the
#: script end to end without a GPU (the numbers mean nothing).
DRY_RUN = False

#: (name, shape, shard used for the eager and torch.compile references when the full tensor's
#: float32 temporaries would not fit next to it)
SHAPES: list[tuple[str, tuple[int, ...], tuple[int, ...] | None]] = [
    ("experts.gate_up", (128, 1536, 2048), None),
    ("experts.down", (128, 2048, 768), None),
    ("q_proj", (4096, 2048), None),
    ("mlp.up", (28672, 8192), None),
    ("mlp.down", (8192, 28672), None),
    ("deepseek.experts", (256, 2048, 7168), (32, 2048, 7168)),
]


def _bench(fn: Callable[[], Any], rep: int = 200) -> float:
    """Median milliseconds of ``fn`` (L2 flushed before each call)."""
    if DRY_RUN:
        return _wall_clock_ms(fn)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _wall_clock_ms(fn: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _copy_ms(src: torch.Tensor) -> float:
    dst = torch.empty_like(src)
    return _bench(lambda: dst.copy_(src))


def _gbps(nbytes: float, ms: float | None) -> float | None:
    return None if ms is None else nbytes / ms / 1e6


# ---- the references -------------------------------------------------------------------------


def _reference_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path's math, out of place and without the raise, for torch.compile."""
    x = x.reshape(-1, *x.shape[-2:]).float()
    e, n, k = x.shape
    nb, kb = -(-n // 128), -(-k // 128)
    padded = torch.nn.functional.pad(x.abs(), (0, kb * 128 - k, 0, nb * 128 - n))
    amax = padded.view(e, nb, 128, kb, 128).amax(dim=(2, 4))
    scale = amax.clamp_min(1e-12) / 448.0
    full = scale.repeat_interleave(128, dim=1).repeat_interleave(128, dim=2)[:, :n, :k]
    return (x / full).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def _reference_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 448.0
    return (x / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


REFERENCES = {BLOCK: _reference_block, CHANNEL: _reference_channel}


# ---- kernel variants ------------------------------------------------------------------------


def _kernels(name: str):
    if name == BLOCK:
        from conversion_core_deepgemm_fp8 import triton_kernels
    else:
        from conversion_core_cutlass_fp8 import triton_kernels
    return triton_kernels


def _default_variant(name: str, shape: Sequence[int]) -> dict[str, Any]:
    tk = _kernels(name)
    if name == BLOCK:
        return {"num_warps": tk.BLOCK_NUM_WARPS, "fast_div": tk.BLOCK_FAST_DIV, "soft_round": tk.GPU_SOFT_ROUND}
    return dataclasses.asdict(tk.pick_config(shape[-1]))


def _variants(name: str, shape: Sequence[int]) -> list[dict[str, Any]]:
    """Launch shapes worth timing for this tensor shape (the default first)."""
    default = _default_variant(name, shape)
    out = [default]
    if name == BLOCK:
        for nw in (4, 8, 16, 32):
            for fd in (False, True):
                out.append({"num_warps": nw, "fast_div": fd, "soft_round": False})
        out.append({**default, "soft_round": True})
    else:
        import triton

        k = shape[-1]
        for fd in (False, True):
            for sr in (False, True):
                out.append({**default, "fast_div": fd, "soft_round": sr})
        if k <= 8192:
            bk = triton.next_power_of_2(k)
            for elems in (2048, 4096, 8192, 16384):
                for nw in (4, 8, 16):
                    out.append(dict(rows=max(1, elems // bk), block_k=bk, single=True, num_warps=nw))
            chunk = 256 if k % 512 else 512  # rows in L1-sized tiles, no masked lanes
            for rows in (8, 16, 32):
                for nw in (4, 8):
                    out.append(dict(rows=rows, block_k=chunk, single=False, num_warps=nw))
        else:
            for nw in (16, 32):
                out.append(dict(rows=1, block_k=triton.next_power_of_2(k), single=True, num_warps=nw))
        for bk in (4096, 8192, 16384) if k > 4096 else ():
            for nw in (8, 16):
                for pps in (0, 3, 4, 6):
                    out.append(dict(rows=1, block_k=bk, single=False, num_warps=nw, programs_per_sm=pps))
    unique: list[dict[str, Any]] = []
    for v in out:
        if v not in unique:
            unique.append(v)
    return unique


def _launcher(name: str, src: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, flag: torch.Tensor, variant):
    tk = _kernels(name)
    if name == BLOCK:
        return lambda: tk.launch_blocks(src, out, scale, flag, (128, 128), **variant)
    cfg = tk.RowConfig(**variant)
    return lambda: tk.launch_rows(src, out, scale, flag, cfg)


# ---- the GPU section ------------------------------------------------------------------------


def _same_bytes_as_torch_path(name: str, src: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> bool:
    """Our bytes against the torch path, a few experts / rows at a time to bound the temporaries."""
    import conversion_core as cc

    conversion = cc.load_registry().get(name)
    x = src if src.dim() == 3 else src.unsqueeze(0)
    q = out if out.dim() == 3 else out.unsqueeze(0)
    s = scale.view(x.shape[0], -1, scale.shape[-1]) if name == BLOCK else scale.view(x.shape[0], -1)
    step = max(1, (1 << 28) // max(1, x[0].numel()))
    for e0 in range(0, x.shape[0], step):
        ref_q, ref_s = conversion.allocate(x[e0 : e0 + step].shape, src.device)
        assert ref_s is not None
        _torch_path(name)(x[e0 : e0 + step], ref_q, ref_s)
        if not torch.equal(ref_q.view(torch.uint8), q[e0 : e0 + step].view(torch.uint8)):
            return False
        if not torch.equal(ref_s, s[e0 : e0 + step]):
            return False
    return True


def _torch_path(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    if name == BLOCK:
        from conversion_core_deepgemm_fp8 import torch_path

        return lambda x, q, s: torch_path.quantize_blocks(x, q, s, (128, 128), name)
    from conversion_core_cutlass_fp8 import torch_path as channel_path

    return lambda x, q, s: channel_path.quantize_rows(x, q, s, name)


def gpu_section(args: argparse.Namespace) -> dict[str, Any]:
    import triton

    import conversion_core as cc

    torch.manual_seed(0)
    dev = torch.device("cpu" if DRY_RUN else "cuda")
    props = None if DRY_RUN else torch.cuda.get_device_properties(dev)
    result: dict[str, Any] = {
        "card": "cpu (dry run, Triton interpreter)" if props is None else props.name,
        "sms": None if props is None else props.multi_processor_count,
        "l2_mb": None if props is None else getattr(props, "L2_cache_size", 0) / 2**20,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "timing": "triton.testing.do_bench median, L2 flushed before each call",
        "bytes_counted": "copy 4 B/elem (bf16 read+write), quantizer 3 B/elem (bf16 read + e4m3 write)",
        "rows": [],
        "sweep": [],
    }
    big = torch.empty(1 << (12 if DRY_RUN else 30), dtype=torch.bfloat16, device=dev)
    result["copy_peak_gbps"] = _gbps(4 * big.numel(), _copy_ms(big))
    big = None
    print(
        f"{result['card']}  torch {torch.__version__}  triton {triton.__version__}  "
        f"copy 2 GiB: {result['copy_peak_gbps']:.0f} GB/s",
        flush=True,
    )

    registry = cc.load_registry()
    wanted = set(args.shapes.split(",")) if args.shapes else None
    for label, shape, shard in SHAPES:
        if wanted and label not in wanted:
            continue
        if DRY_RUN:  # keep the structure (experts, partial blocks, long rows), shrink the sizes
            shape = tuple(max(1, d // 64) + (3 if i == len(shape) - 1 else 0) for i, d in enumerate(shape))
            shard = None
        src = torch.randn(shape, dtype=torch.bfloat16, device=dev)
        numel = src.numel()
        copy_ms = _copy_ms(src)
        copy_gbps = _gbps(4 * numel, copy_ms)
        for name in FORMATS:
            conversion = registry.get(name)
            out, scale = conversion.allocate(shape, dev)
            assert scale is not None
            flag = torch.zeros(1, dtype=torch.int32, device=dev)
            default = _default_variant(name, shape)
            kernel = _launcher(name, src, out, scale, flag, default)
            kernel()
            exact = _same_bytes_as_torch_path(name, src, out, scale) if args.check else None
            row: dict[str, Any] = {
                "shape_name": label,
                "shape": list(shape),
                "format": name,
                "variant": default,
                "bytes_equal_torch_path": exact,
                "copy_ms": copy_ms,
                "copy_gbps": copy_gbps,
            }
            row["triton_ms"] = _bench(kernel)
            row["triton_gbps"] = _gbps(3 * numel, row["triton_ms"])
            row["api_ms"] = _bench(functools.partial(conversion.fn, src, out, scale))
            row["api_gbps"] = _gbps(3 * numel, row["api_ms"])
            row["ratio_to_copy"] = row["triton_gbps"] / copy_gbps
            row["ratio_to_peak_copy"] = row["triton_gbps"] / result["copy_peak_gbps"]
            if args.sweep:
                best = (row["triton_ms"], default)
                for variant in _variants(name, shape)[1:]:
                    v_out, v_scale = torch.empty_like(out), torch.empty_like(scale)
                    try:
                        run = _launcher(name, src, v_out, v_scale, flag, variant)
                        run()
                        same = torch.equal(v_out.view(torch.uint8), out.view(torch.uint8)) and torch.equal(
                            v_scale, scale
                        )
                        ms = _bench(run, rep=100)
                    except Exception as exc:  # a variant that does not compile is a data point, not a crash
                        result["sweep"].append(
                            {
                                "shape_name": label,
                                "format": name,
                                "variant": variant,
                                "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                            }
                        )
                        continue
                    result["sweep"].append(
                        {
                            "shape_name": label,
                            "format": name,
                            "variant": variant,
                            "ms": ms,
                            "gbps": _gbps(3 * numel, ms),
                            "same_bytes": same,
                            "ratio_to_copy": _gbps(3 * numel, ms) / copy_gbps,
                        }
                    )
                    if same and ms < best[0]:
                        best = (ms, variant)
                row["best_variant"] = best[1]
                row["best_gbps"] = _gbps(3 * numel, best[0])
                row["best_ratio_to_copy"] = row["best_gbps"] / copy_gbps
            ref_src = src if shard is None else src[: shard[0]]
            ref_numel = ref_src.numel()
            row["reference_shape"] = list(ref_src.shape)
            path = _torch_path(name)
            if args.eager:
                try:
                    r_out, r_scale = conversion.allocate(ref_src.shape, dev)
                    row["eager_gbps"] = _gbps(3 * ref_numel, _bench(lambda: path(ref_src, r_out, r_scale)))  # noqa: B023
                    del r_out, r_scale
                except torch.cuda.OutOfMemoryError:
                    row["eager_gbps"] = None
                torch.cuda.empty_cache()
            if args.compile:
                try:
                    compiled = torch.compile(REFERENCES[name], dynamic=False)
                    compiled(ref_src)
                    row["compile_gbps"] = _gbps(3 * ref_numel, _bench(lambda: compiled(ref_src)))  # noqa: B023
                except torch.cuda.OutOfMemoryError:
                    row["compile_gbps"] = None
                torch.cuda.empty_cache()
            result["rows"].append(row)
            _print_row(row)
        torch.cuda.empty_cache()
    return result


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _print_row(r: dict[str, Any]) -> None:
    best = f"  best {_fmt(r.get('best_gbps'))} ({_fmt(r.get('best_ratio_to_copy'), '.3f')})" if "best_gbps" in r else ""
    print(
        f"{r['shape_name']:<17} {str(tuple(r['shape'])):<18} {r['format']:<29} copy {_fmt(r['copy_gbps']):>5}  "
        f"eager {_fmt(r.get('eager_gbps')):>4}  compile {_fmt(r.get('compile_gbps')):>5}  "
        f"triton {_fmt(r['triton_gbps']):>5}  api {_fmt(r['api_gbps']):>5}  "
        f"ratio {_fmt(r['ratio_to_copy'], '.3f')}  exact {r['bytes_equal_torch_path']}{best}",
        flush=True,
    )


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['card']}, torch {result['torch']}, triton {result['triton']}, CUDA {result['cuda']}; "
        f"GB/s = bytes read + written / median time; 2 GiB copy {result['copy_peak_gbps']:.0f} GB/s"
    )
    print(
        f"{'shape':<17} {'dims':<18} {'format':<29} {'copy':>5} {'eager':>5} {'compile':>7} {'triton':>6} "
        f"{'api':>5} {'ratio':>6} exact"
    )
    for r in result["rows"]:
        print(
            f"{r['shape_name']:<17} {str(tuple(r['shape'])):<18} {r['format']:<29} {_fmt(r['copy_gbps']):>5} "
            f"{_fmt(r.get('eager_gbps')):>5} {_fmt(r.get('compile_gbps')):>7} {_fmt(r['triton_gbps']):>6} "
            f"{_fmt(r['api_gbps']):>5} {_fmt(r['ratio_to_copy'], '.3f'):>6} {r['bytes_equal_torch_path']}"
        )


def _cpu_section() -> Callable[..., Any] | None:
    """benchmarks/_cpu_bench.py's run_cpu_section, when that file exists."""
    path = Path(__file__).with_name("_cpu_bench.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_cpu_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "run_cpu_section", None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_quant", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--shapes", help="comma list of shape names: " + ",".join(s[0] for s in SHAPES))
    p.add_argument("--sweep", action="store_true", help="also time every kernel launch variant")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the eager torch path")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the byte check")
    p.add_argument("--cpu", action="store_true", help="also run the CPU section (benchmarks/_cpu_bench.py)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    global DRY_RUN
    args = build_parser().parse_args(argv)
    results: dict[str, Any] = {}
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("CONVERSION_CORE_BACKEND") != "triton":
            print("--dry-run needs TRITON_INTERPRET=1 and CONVERSION_CORE_BACKEND=triton set", file=sys.stderr)
            return 2
        DRY_RUN = True
        args.compile = False
    if torch.cuda.is_available() or DRY_RUN:
        results["gpu"] = gpu_section(args)
        print_table(results["gpu"])
    else:
        print("no CUDA device: GPU section skipped", file=sys.stderr)
    if args.cpu:
        run_cpu_section = _cpu_section()
        if run_cpu_section is None:
            print("benchmarks/_cpu_bench.py (run_cpu_section) not found: CPU section skipped", file=sys.stderr)
        else:
            results["cpu"] = run_cpu_section()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
