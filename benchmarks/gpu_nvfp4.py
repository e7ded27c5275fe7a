# ruff: noqa: B023 -- the timed lambdas are called inside the loop iteration that makes them
"""NVFP4 on the GPU: every kernel variant's bytes equal the CPU torch path, and its speed against a same-run copy.

``python3 benchmarks/gpu_nvfp4.py`` on a CUDA machine, for several shapes (some not multiples of
the tile, 3-D expert stacks):

1. the CPU torch path's packed values, e4m3 scales, global scale and amax are computed once;
2. every variant is run and checked byte for byte: the amax pass (torch's ``abs().amax()`` and
   the Triton words pass with a few grid sizes), the quantizer given the amax
   (``triton_kernels.launch_values`` with ``variant`` = generic / words / words_magic /
   words_fastdiv / words_recip and a few tiles; words_recip's row also says how many programs kept
   the products, the rest divided), and the whole conversion (``triton_kernels.launch`` and
   ``launch_fused``, gs derived in the kernel, with the torch and the Triton amax);
3. each is timed by ``triton.testing.do_bench`` (median) next to ``dst.copy_(src)`` of the same
   input; GB/s counts bytes in + bytes out (the amax pass: bytes in), ``/copy`` is the ratio;
4. one table row per (shape, variant), then a "best" line per shape and kernel, and per shape the
   whole conversion's ceiling in this metric: two passes (the amax reads the source, the
   quantizer reads it again and writes), so at the same-run copy's byte rate for both it is
   ``(in + out) / (2 in + out)`` = 0.56 of copy; also the ceiling from this run's best amax and
   quantizer times. Exit 1 on any byte mismatch (its first 3 bytes are printed: flat index, CPU
   byte, GPU byte). A variant that raises prints its error in its row and the run goes on; past
   ``--budget`` seconds the remaining shapes are skipped (said so in the output).

On a 3-D shape the experts are also converted as per-expert views, each with its own amax (what
``convert_many`` and the plan's step do for standalone tensors): ``launch_group`` (a grouped amax
pass and a grouped quantizer: two launches) against one ``tensor_amax`` + ``launch_fused`` per
expert (2 E launches), both timed as they run, host work included; bytes: grouped == per expert on
the device, and expert 0 == the CPU torch path with its own amax.

Also checked (bytes only): the generic fallback on a transposed bf16 and an fp32 source.
``--dry-run``: the same on CPU under TRITON_INTERPRET=1 with tiny shapes (proves the script, not the
speed). ``--quick``: only the default tile of each variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

SHAPES = [(4096, 2048), (28672, 8192), (8192, 28672), (128, 1536, 2048), (128, 2048, 768), (4095, 2064)]
DRY_SHAPES = [(16, 64), (9, 48), (2, 5, 32)]
#: (variant, block_r, block_c, num_warps); None: the module default.
QUANT_CONFIGS = [
    ("generic", None, None, None),
    ("words", None, None, None),
    ("words_magic", None, None, None),
    ("words_magic", 8, 256, 4),
    ("words_magic", 32, 256, 8),
    ("words_magic", 16, 512, 8),
    ("words_magic", 8, 128, 4),
    ("words_magic", 32, 256, 4),
    ("words", 32, 256, 8),
    ("words_fastdiv", None, None, None),
    ("words_fastdiv", 32, 256, 8),
    ("words_fastdiv", 16, 512, 8),
    ("words_fastdiv", 8, 256, 4),
    ("words_recip", None, None, None),
    ("words_recip", 16, 256, 4),
    ("words_recip", 8, 512, 4),
    ("words_recip", 32, 512, 8),
    ("words_recip", 16, 512, 8),
    ("words_recip", 8, 256, 2),
]
#: (block, programs per multiprocessor, num_warps, unroll) of the Triton amax pass.
AMAX_CONFIGS = [
    (None, None, None, None),
    (8192, 4, 8, 1),
    (4096, 8, 8, 1),
    (2048, 8, 4, 1),
    (8192, 2, 16, 1),
    (4096, 4, 8, 2),
    (4096, 8, 8, 2),
    (2048, 16, 4, 2),
    (4096, 4, 8, 4),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--quick", action="store_true", help="default tiles only")
    parser.add_argument("--budget", type=float, default=80.0, help="seconds after which remaining shapes are skipped")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton
    from conversion_core_nvfp4 import numerics, triton_kernels

    device = "cpu" if args.dry_run else "cuda"
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    quant_configs = [c for c in QUANT_CONFIGS if not args.quick or c[1] is None]
    amax_configs = AMAX_CONFIGS[:1] if args.quick or args.dry_run else AMAX_CONFIGS
    if args.dry_run:
        amax_configs = [(None, None, None, None), (16, 1, 1, 1), (16, 2, 1, 3)]

    def bench(fn: Callable[[], object], nbytes: int) -> float:  # milliseconds
        if args.dry_run:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return float(triton.testing.do_bench(fn, warmup=10, rep=30 if nbytes < (1 << 28) else 60, return_mode="median"))

    if not args.dry_run:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    mismatches = 0
    rows: list[tuple[str, str, str, float, float, float, str]] = []
    notes: list[str] = []

    def first_diffs(label: str, got: torch.Tensor, want: torch.Tensor) -> str:
        """The first 3 differing bytes of two same-shape tensors: flat index, CPU byte, GPU byte."""
        g, w = got.cpu().reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        idx = (g != w).nonzero().flatten()[:3].tolist()
        return f"{label}: " + ", ".join(f"[{i}] cpu 0x{int(w[i]):02x} gpu 0x{int(g[i]):02x}" for i in idx)

    def row(shape: tuple[int, ...], kernel: str, name: str, t: float, nbytes: int, copy_gbs: float, ok: bool) -> None:
        gbs = nbytes / t / 1e6
        rows.append((str(shape), kernel, name, t, gbs, gbs / copy_gbs, "yes" if ok else "NO"))

    def grouped_experts(shape: tuple[int, ...], src: torch.Tensor, cpu: torch.Tensor, nbytes: int, copy_gbs: float):
        """Rows "experts, own amax": launch_group of the E per-expert views against E launch_fused."""
        nonlocal mismatches
        e, n, k = src.shape

        def buffers() -> list[tuple[torch.Tensor, ...]]:
            packed = torch.full((e, n, k // 2), 0xFF, dtype=torch.uint8, device=device)
            scales = torch.full((e, n, k // 16), 0xFF, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
            globals_ = torch.full((e, 1), float("nan"), device=device)
            return [(src[j], packed[j], scales[j], globals_[j]) for j in range(e)]

        grouped, single = buffers(), buffers()
        flag = torch.zeros(1, dtype=torch.int32, device=device)

        def per_expert() -> None:
            for x, packed, scales, global_out in single:
                amax = triton_kernels.tensor_amax(x)
                triton_kernels.launch_fused(x, amax, packed, scales, global_out, flag, multiplier=False)

        def group() -> None:
            triton_kernels.launch_group(grouped, flag, multiplier=False)

        try:
            per_expert()
            group()
            ok = int(flag.item()) == 0 and all(
                torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                for g, o in zip(grouped, single, strict=True)
                for a, b in zip(g[1:], o[1:], strict=True)
            )
            wp = torch.empty(n, k // 2, dtype=torch.uint8)
            ws = torch.empty(n, k // 16, dtype=torch.float8_e4m3fn)
            wg = numerics.quantize_with_amax(cpu[0], numerics.tensor_amax(cpu[0]), wp, ws, "nvfp4")
            ok = ok and torch.equal(grouped[0][1].cpu(), wp) and torch.equal(grouped[0][3].cpu(), wg)
            ok = ok and torch.equal(grouped[0][2].cpu().view(torch.uint8), ws.view(torch.uint8))
            mismatches += not ok
            if not ok:
                notes.append(f"{shape} experts, own amax: grouped bytes != per-expert launches or the CPU path")
            for name, fn in ((f"tensor_amax + launch_fused x {e}", per_expert), ("launch_group (2 launches)", group)):
                row(shape, "experts, own amax", name, bench(fn, nbytes), nbytes, copy_gbs, ok)
        except Exception as exc:  # noqa: BLE001 -- the grouped rows must not end the run
            mismatches += 1
            notes.append(f"{shape} experts, own amax: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")

    # The generic fallback on sources without the words layout: bytes only.
    for label, make in (
        ("transposed bf16", lambda: torch.randn(96, 64).bfloat16().t()),
        ("fp32", lambda: torch.randn(64, 96)),
    ):
        cpu = make()
        a = numerics.tensor_amax(cpu)
        wp = torch.empty(*cpu.shape[:-1], cpu.shape[-1] // 2, dtype=torch.uint8)
        ws = torch.empty(*cpu.shape[:-1], cpu.shape[-1] // 16, dtype=torch.float8_e4m3fn)
        numerics.quantize_with_amax(cpu, a, wp, ws, "nvfp4")
        src = cpu.to(device)
        p, s = (
            torch.empty(wp.shape, dtype=torch.uint8, device=device),
            torch.empty(ws.shape, dtype=ws.dtype, device=device),
        )
        triton_kernels.quantize_with_amax(src, a.to(device), p, s, "nvfp4")
        ok = torch.equal(p.cpu(), wp) and torch.equal(s.cpu().view(torch.uint8), ws.view(torch.uint8))
        mismatches += not ok
        print(f"bytes generic fallback, {label}: {'ok' if ok else 'MISMATCH'}")

    for shape in shapes:
        if time.perf_counter() - started > args.budget:
            print(f"skipped {shape}: past the {args.budget:.0f} s budget")
            continue
        g = torch.Generator().manual_seed(sum(shape))
        cpu = (
            torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 4, shape, generator=g).float())
        ).bfloat16()
        cpu.reshape(-1, shape[-1])[0, :16] = 0
        cpu.reshape(-1, shape[-1])[0, 16] = -0.0
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
        gs = numerics.global_scale(amax_cpu.to(device))
        copy_dst = torch.empty_like(src)
        n_in = src.numel() * src.element_size()
        n_out = p.numel() + s.numel() + 4
        t_copy = bench(lambda: copy_dst.copy_(src), n_in)
        copy_gbs = 2 * n_in / t_copy / 1e6

        want_p_dev, want_s_dev = want_p.to(device), want_s.view(torch.uint8).to(device)  # compared on the device

        def same_values() -> bool:
            return torch.equal(p, want_p_dev) and torch.equal(s.view(torch.uint8), want_s_dev)

        def attempt(kernel: str, name: str, fn: Callable[[], object], check: Callable[[], bool], nbytes: int) -> None:
            nonlocal mismatches
            try:
                p.fill_(0xFF)
                s.view(torch.uint8).fill_(0xFF)
                flag.zero_()
                fn()
                ok = check() and int(flag.item()) == 0
                mismatches += not ok
                if not ok:
                    where = f"{shape} {kernel} {name}"
                    if kernel != "amax":
                        notes.append(first_diffs(f"{where} packed", p, want_p))
                        notes.append(first_diffs(f"{where} scales", s, want_s))
                    if int(flag.item()):
                        notes.append(f"{where}: NaN/Inf flag raised on finite data")
                t = bench(fn, nbytes)
                row(shape, kernel, name, t, nbytes, copy_gbs, ok)
            except Exception as exc:  # noqa: BLE001 -- one variant's failure must not end the run
                mismatches += 1
                rows.append(
                    (
                        str(shape),
                        kernel,
                        name,
                        float("nan"),
                        float("nan"),
                        float("nan"),
                        f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}",
                    )
                )

        attempt("amax", "torch abs().amax()", lambda: numerics.tensor_amax(src), lambda: True, n_in)
        for blk, per_sm, nw, unr in amax_configs:
            progs = (
                None
                if per_sm is None
                else (
                    torch.cuda.get_device_properties(src.device).multi_processor_count * per_sm
                    if device == "cuda"
                    else per_sm
                )
            )
            name = "triton words" + ("" if blk is None else f" b{blk} p{per_sm}/SM w{nw} u{unr}")
            attempt(
                "amax",
                name,
                lambda: triton_kernels.tensor_amax(src, block=blk, programs=progs, num_warps=nw, unroll=unr),
                lambda: torch.equal(
                    triton_kernels.tensor_amax(src, block=blk, programs=progs, num_warps=nw, unroll=unr).cpu(),
                    amax_cpu,
                ),
                n_in,
            )
        for variant, br, bc, nw in quant_configs:
            name = variant + ("" if br is None else f" {br}x{bc} w{nw}")
            attempt(
                "quantize given amax",
                name,
                lambda: triton_kernels.launch_values(
                    src, gs, p, s, flag, variant=variant, block_r=br, block_c=bc, num_warps=nw
                ),
                same_values,
                n_in + n_out,
            )
            if variant == "words_recip":
                try:
                    count = torch.zeros(1, dtype=torch.int32, device=device)
                    triton_kernels.launch_values(
                        src, gs, p, s, flag, variant=variant, block_r=br, block_c=bc, num_warps=nw, fast_count=count
                    )
                    x3 = src if src.dim() == 3 else src.unsqueeze(0)
                    rb = br or triton_kernels.RECIP_BLOCK_R
                    gk = shape[-1] // 16
                    grp = min((bc // 16) if bc else triton_kernels.RECIP_GROUPS, triton.next_power_of_2(gk))
                    programs = triton.cdiv(x3.shape[0] * x3.shape[1], rb) * triton.cdiv(gk, grp)
                    notes.append(f"{shape} {name}: {int(count.item())} of {programs} programs kept the products")
                except Exception as exc:  # noqa: BLE001 -- a diagnostic only
                    notes.append(f"{shape} {name}: fast_count failed: {type(exc).__name__}: {exc}")
        whole = [
            ("launch, torch amax", triton_kernels.launch, numerics.tensor_amax, "auto"),
            ("launch, triton amax", triton_kernels.launch, triton_kernels.tensor_amax, "auto"),
            ("launch words_recip, triton amax", triton_kernels.launch, triton_kernels.tensor_amax, "words_recip"),
            ("fused, triton amax", triton_kernels.launch_fused, triton_kernels.tensor_amax, "auto"),
            ("fused words_recip, triton amax", triton_kernels.launch_fused, triton_kernels.tensor_amax, "words_recip"),
        ]
        for name, launch_fn, amax_fn, variant in whole:
            attempt(
                "whole conversion",
                name,
                lambda: launch_fn(src, amax_fn(src), p, s, gout, flag, multiplier=False, variant=variant),
                lambda: same_values() and torch.equal(gout.cpu(), want_g),
                n_in + n_out,
            )
        if src.dim() == 3:
            grouped_experts(shape, src, cpu, n_in + n_out, copy_gbs)
        best_t = {
            kernel: min((r[3] for r in rows if r[0] == str(shape) and r[1] == kernel and r[6] == "yes"), default=None)
            for kernel in ("amax", "quantize given amax")
        }
        ceiling = (n_in + n_out) / (2 * n_in + n_out)
        line = f"ceiling {str(shape):>18}: two passes at copy speed {ceiling:.2f} of copy"
        if best_t["amax"] is not None and best_t["quantize given amax"] is not None:
            t2 = best_t["amax"] + best_t["quantize given amax"]
            line += f"; this run's best amax + best quantizer {t2:.4f} ms = {(n_in + n_out) / t2 / 1e6 / copy_gbs:.2f}"
        notes.append(line)

    print(f"{'shape':>18} {'kernel':>19} {'variant':>30} {'ms':>9} {'GB/s':>8} {'/copy':>6} bytes==CPU")
    for r in rows:
        print(f"{r[0]:>18} {r[1]:>19} {r[2]:>30} {r[3]:9.4f} {r[4]:8.1f} {r[5]:6.2f} {r[6]}")
    print()
    for shape in dict.fromkeys(r[0] for r in rows):
        for kernel in ("amax", "quantize given amax", "whole conversion", "experts, own amax"):
            good = [r for r in rows if r[0] == shape and r[1] == kernel and r[6] == "yes"]
            if good:
                best = min(good, key=lambda r: r[3])
                print(f"best {kernel:>19} {shape:>18}: {best[2]} {best[3]:.4f} ms {best[5]:.2f} of copy")
    print()
    for note in notes:
        print(note)
    tk = triton_kernels
    print(
        f"defaults: VARIANT={tk.VARIANT} words {tk.WORDS_BLOCK_R}x{tk.WORDS_GROUPS * 16} w{tk.WORDS_NUM_WARPS}; "
        f"generic {tk.BLOCK_R}x{tk.BLOCK_C} w{tk.NUM_WARPS}; "
        f"amax b{tk.AMAX_BLOCK} p{tk.AMAX_PROGRAMS_PER_SM}/SM w{tk.AMAX_NUM_WARPS} u{tk.AMAX_UNROLL}; "
        f"words_recip {tk.RECIP_BLOCK_R}x{tk.RECIP_GROUPS * 16} w{tk.RECIP_NUM_WARPS}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    if mismatches:
        print(f"{mismatches} variant(s) with GPU bytes != CPU torch-path bytes (or errors)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
