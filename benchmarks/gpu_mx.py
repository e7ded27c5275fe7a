# ruff: noqa: B023 -- the timed lambdas are called inside the loop iteration that makes them
"""MX kernels on the GPU: bytes equal the CPU torch path, then bandwidth against a device copy.

Run on CUDA (the lead's H200 batch)::

    python benchmarks/gpu_mx.py --quick    # checks, then the table (always); exit 1 on any byte mismatch
    python benchmarks/gpu_mx.py --tune     # also sweeps tile shapes/warps per shape and prints the best

and on CPU, to prove the script end to end (Triton interpreter, tiny shapes)::

    TRITON_INTERPRET=1 python benchmarks/gpu_mx.py --dry-run

(1) For every kernel (``mxfp8``, ``mxfp4``) and several shapes, including rows that are not a
multiple of the tile, 3D expert stacks and a transposed source, the GPU kernel's value and scale
bytes must equal the CPU torch path's on the same bf16 input. Every distinct variant of the format
that applies is checked (``triton_kernels.FORMAT_VARIANTS``; ``words*``: bf16 with K contiguous;
``generic``: every source, the transposed and fp32 ones too); a failing check prints its first
mismatching bytes (flat index, source bits, CPU byte, GPU byte) and the timing runs all the same.
(2) Each variant and tile of :data:`VARIANT_CONFIGS` is timed with
``triton.testing.do_bench`` (median) against ``dst.copy_(src)`` of the same input in the same run,
its bytes checked against the CPU torch path on the bench shape; GB/s counts bytes in plus bytes out
(bf16 source; e4m3 or packed e2m1 values; one scale byte per 32). The plugin's launch path
(``conv.launch``, what the whole-model plan calls) and the checked ``Conversion.fn`` are timed too,
and so is the grouped launch (``conv.launch_group``, what the plan's moving-source step and
``convert_many`` call): on a 3D stack it takes the per-expert views (one table row each, as a
trainer's per-expert weights reach it), next to ``conv.launch per expert``, the loop it replaces
(the gap is host time per launch); on a 2D source it takes the one call (the table's own cost).
One row per (kernel, shape, variant), then a "best" line per kernel and shape. Target: kernel >= 0.92
of copy on the bench shapes. ``--quick``: the default tiles and 32x512 w8 only (the lead's run, < 90 s);
``--tune``: also sweep the tiles.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

CHECK_SHAPES = [(4096, 2048), (1000, 96), (3, 129, 320), (1, 32), (7, 8, 64)]
BENCH_SHAPES = [(4096, 2048), (28672, 8192), (8192, 28672), (128, 1536, 2048), (128, 2048, 768)]
DRY_CHECK = [(33, 96), (2, 5, 64), (1, 32)]
DRY_BENCH = [(64, 128), (2, 16, 64)]
TUNE = [(br, bc, w) for br in (8, 16, 32) for bc in (128, 256, 512) for w in (4, 8)]
WORDS_TUNE = [(br, bc, w) for br in (8, 16, 32, 64) for bc in (256, 512, 1024) for w in (4, 8)]
#: (variant, block_r, block_c, num_warps) timed on every bench shape; None: the variant's default tile.
VARIANT_CONFIGS = [
    ("generic", None, None, None),
    ("words", None, None, None),
    ("words_magic", None, None, None),
    ("words_int", None, None, None),
    ("words_cvt", None, None, None),
    ("words", 32, 512, 8),
    ("words_int", 32, 512, 8),
    ("words_cvt", 32, 512, 8),
    ("words", 8, 1024, 4),
    ("words_int", 8, 1024, 4),
    ("words_cvt", 8, 1024, 4),
    ("words_int", 32, 1024, 8),
    ("words_cvt", 32, 1024, 8),
]
#: ``--quick``: the default tiles and one larger tile of each format's candidates.
QUICK_TILES = {(None, None, None), (32, 512, 8)}
#: Mismatching bytes printed per failing check (flat index, source bits, CPU byte, GPU byte).
SHOW_MISMATCHES = 3


def _source(shape: tuple[int, ...], device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 8, shape, generator=g).float())
    x.view(-1, shape[-1])[0, :32] = 0.0
    x.view(-1, shape[-1])[-1, 1] = 3.0e4
    return x.to(torch.bfloat16).to(device)


def _variants(src: torch.Tensor, name: str) -> list[str]:
    """The format's distinct variants that apply to ``src`` (words*: bf16 with K contiguous)."""
    from conversion_core_mx import triton_kernels

    from conversion_core.formats.fp4_triton import bf16_words

    x = src if src.dim() == 3 else src.unsqueeze(0)
    return list(triton_kernels.FORMAT_VARIANTS[name]) if bf16_words(x) is not None else ["generic"]


def mismatch_lines(src: torch.Tensor, fmt, cpu_q, cpu_s, gpu_q, gpu_s, limit: int = SHOW_MISMATCHES) -> list[str]:
    """The first ``limit`` differing value bytes and scale bytes: flat index, source element(s) bits, CPU, GPU.

    A value byte ``i`` of MXFP8 is source element ``i``; of MXFP4 it packs elements ``2i`` (low
    nibble) and ``2i + 1``. A scale byte ``g`` covers elements ``32g .. 32g + 31`` (its amax shown).
    """
    x = src.detach().cpu().contiguous().view(-1)
    bits_dtype = {2: torch.int16, 4: torch.int32}[x.element_size()]
    width = 2 * x.element_size()

    def bits(j: int) -> int:
        return int(x[j : j + 1].view(bits_dtype)) & ((1 << (8 * x.element_size())) - 1)

    lines = []
    for what, c, g in (("value", cpu_q, gpu_q), ("scale", cpu_s, gpu_s)):
        c8, g8 = c.contiguous().view(torch.uint8).view(-1), g.cpu().contiguous().view(torch.uint8).view(-1)
        diff = (c8 != g8).nonzero().view(-1)
        for i in diff[:limit].tolist():
            if what == "scale":
                grp = x[32 * i : 32 * i + 32].float()
                about = f"group amax {float(grp.abs().max()):.6g}"
            else:
                idx = [i] if fmt.per_byte == 1 else [2 * i, 2 * i + 1]
                about = " ".join(f"x[{j}]=0x{bits(j):0{width}x} ({float(x[j]):.6g})" for j in idx)
            lines.append(f"    {what} byte {i}: {about}: CPU 0x{int(c8[i]):02x} GPU 0x{int(g8[i]):02x}")
        if len(diff) > limit:
            lines.append(f"    ... {len(diff)} {what} bytes differ of {c8.numel()}")
    return lines


def check_bytes(conversions: dict, shapes: list, device: str) -> int:
    """Every variant that applies (words: bf16 with K contiguous; generic: all) against the CPU torch path."""
    from conversion_core_mx import torch_path, triton_kernels
    from conversion_core_mx.numerics import MXFP4, MXFP8

    bad = 0
    for name, fmt in (("mxfp8", MXFP8), ("mxfp4", MXFP4)):
        conv = conversions[name]
        for i, shape in enumerate(shapes):
            for layout in ("contiguous", "transposed", "fp32"):
                src = _source(shape, device, i)
                if layout == "transposed" and len(shape) == 2:
                    src = src.t().contiguous().t()
                if layout == "fp32":
                    src = src.float()
                cpu = src.cpu()
                cq, cs = conv.allocate(cpu.shape, "cpu")
                torch_path.quantize(cpu, cq, cs, fmt)
                for variant in _variants(src, name):
                    try:
                        gq, gs = conv.allocate(src.shape, device)
                        triton_kernels.quantize(src, gq, gs, fmt, variant=variant)
                        ok = torch.equal(gq.cpu().view(torch.uint8), cq.view(torch.uint8)) and torch.equal(gs.cpu(), cs)
                        verdict = "ok" if ok else "MISMATCH"
                        details = [] if ok else mismatch_lines(src, fmt, cq, cs, gq, gs)
                    except Exception as exc:  # noqa: BLE001 -- report and go on
                        ok, verdict = (
                            False,
                            f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}",
                        )
                        details = []
                    bad += not ok
                    print(f"bytes {name:6s} {str(shape):18s} {layout:10s} {variant:12s} {verdict}")
                    for line in details:
                        print(line)
    return bad


def _median_ms(fn, device: str) -> float:
    """``triton.testing.do_bench`` median on CUDA; on CPU (dry run: no Triton driver) a median of 3 calls."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    import statistics
    import time

    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def expert_calls(src: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """``(src, q, s)`` per expert of a 3D stack (views into the stack and its buffers, so together
    they write every byte of ``q`` and ``s``), or the one call of a 2D source."""
    if src.dim() == 3:
        return [(src[i], q[i], s[i]) for i in range(src.shape[0])]
    return [(src, q, s)]


def _timed(conv, triton_kernels, variant: str, args: tuple):
    """The call a row times: the plugin's launch, fn or launch_group (:func:`expert_calls`), a loop of
    launches per expert, or ``triton_kernels.launch`` with a variant and tile."""
    src, q, s, flag, fmt, br, bc, w = args
    if variant == "conv.launch":
        return lambda: conv.launch(src, q, s, flag)
    if variant == "conv.fn":
        return lambda: conv.fn(src, q, s)
    if variant == "conv.launch_group":
        calls = expert_calls(src, q, s)
        return lambda: conv.launch_group(calls, flag)
    if variant == "conv.launch per expert":
        calls = expert_calls(src, q, s)
        return lambda: [conv.launch(*call, flag) for call in calls]
    return lambda: triton_kernels.launch(src, q, s, flag, fmt, br, bc, w, variant=variant)


def bench(conversions: dict, shapes: list, device: str, tune: bool, quick: bool, deadline: float = float("inf")) -> int:
    """One row per (shape, kernel, variant); every variant's bytes equal the CPU torch path's. Returns mismatches."""
    from conversion_core_mx import torch_path, triton_kernels
    from conversion_core_mx.numerics import MXFP4, MXFP8

    rows = []
    bad = 0
    for shape in shapes:
        if time.monotonic() > deadline:
            print(f"bench {shape}: skipped (past --budget; the table below still prints)")
            continue
        start = time.monotonic()
        src = _source(shape, device, 0)
        cpu = src.cpu()
        copy_dst = torch.empty_like(src)
        t_copy = _median_ms(lambda: copy_dst.copy_(src), device)
        copy_gbs = 2 * src.numel() * 2 / t_copy / 1e6
        for name, fmt in (("mxfp8", MXFP8), ("mxfp4", MXFP4)):
            conv = conversions[name]
            cq, cs = conv.allocate(cpu.shape, "cpu")
            torch_path.quantize(cpu, cq, cs, fmt)
            q, s = conv.allocate(src.shape, device)
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            moved = src.numel() * 2 + q.numel() * q.element_size() + s.numel()
            configs = [
                c
                for c in VARIANT_CONFIGS
                if c[0] in triton_kernels.FORMAT_VARIANTS[name] and (not quick or c[1:] in QUICK_TILES)
            ]
            if tune:
                configs += [("generic", br, bc, w) for br, bc, w in TUNE]
                best_words = "words_cvt" if name == "mxfp8" else "words_int"
                configs += [(best_words, br, bc, w) for br, bc, w in WORDS_TUNE]
            configs += [("conv.launch", None, None, None), ("conv.fn", None, None, None)]
            configs += [("conv.launch_group", None, None, None)]
            if src.dim() == 3:
                configs += [("conv.launch per expert", None, None, None)]
            for variant, br, bc, w in configs:
                label = variant + ("" if br is None else f" {br}x{bc} w{w}")
                fn = _timed(conv, triton_kernels, variant, (src, q, s, flag, fmt, br, bc, w))
                try:
                    q.view(torch.uint8).fill_(0x7F)
                    s.fill_(0xFF)
                    flag.zero_()
                    fn()
                    ok = (
                        torch.equal(q.cpu().view(torch.uint8), cq.view(torch.uint8))
                        and torch.equal(s.cpu(), cs)
                        and int(flag.item()) == 0
                    )
                    if not ok:
                        print(f"bench bytes {name} {shape} {label}: MISMATCH (timed all the same)")
                        for line in mismatch_lines(src, fmt, cq, cs, q, s):
                            print(line)
                    t = _median_ms(fn, device)
                    gbs = moved / t / 1e6
                    rows.append((name, str(shape), label, t, gbs, gbs / copy_gbs, "yes" if ok else "NO"))
                except Exception as exc:  # noqa: BLE001 -- one variant's failure must not end the run
                    ok = False
                    msg = str(exc).splitlines()[0][:150] if str(exc) else ""
                    rows.append((name, str(shape), label, float("nan"), float("nan"), float("nan"), f"ERROR {msg}"))
                bad += not ok
        print(f"bench {shape}: {time.monotonic() - start:.1f} s")
    print()
    print(f"{'kernel':7s} {'shape':18s} {'variant':>26s} {'ms':>9s} {'GB/s':>8s} {'/copy':>6s} bytes==CPU")
    for name, shape, label, t, gbs, ratio, ok in rows:
        print(f"{name:7s} {shape:18s} {label:>26s} {t:9.4f} {gbs:8.0f} {ratio:6.2f} {ok}")
    print()
    for name in ("mxfp8", "mxfp4"):
        for shape in dict.fromkeys(r[1] for r in rows):
            good = [
                r for r in rows if r[0] == name and r[1] == shape and r[6] == "yes" and not r[2].startswith("conv.")
            ]
            if good:
                best = min(good, key=lambda r: r[3])
                print(f"best {name} {shape:18s}: {best[2]} {best[3]:.4f} ms {best[4]:.0f} GB/s {best[5]:.2f} of copy")
    tk = triton_kernels
    print(
        f"defaults: VARIANT={tk.VARIANT} MXFP8_VARIANT={tk.MXFP8_VARIANT} "
        f"words {tk.WORDS_BLOCK_R}x{tk.WORDS_BLOCK_C} w{tk.WORDS_NUM_WARPS}; "
        f"generic BLOCK_R={tk.BLOCK_R} BLOCK_C={tk.BLOCK_C} NUM_WARPS={tk.NUM_WARPS}"
    )
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--tune", action="store_true", help="sweep tile shapes and warps per bench shape")
    parser.add_argument("--quick", action="store_true", help="the default tile and 32x512 w8 of each variant")
    parser.add_argument(
        "--budget", type=float, default=70.0, help="seconds; bench shapes that would start later are skipped"
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
            return 2
        device, check_shapes, bench_shapes = "cpu", DRY_CHECK, DRY_BENCH
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run (and TRITON_INTERPRET=1) on CPU")
            return 2
        device, check_shapes, bench_shapes = "cuda", CHECK_SHAPES, BENCH_SHAPES
    import conversion_core as cc

    registry = cc.load_registry()
    conversions = {name: registry.get(name) for name in ("mxfp8", "mxfp4")}
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}, "
        f"torch {torch.__version__}"
    )
    t0 = time.monotonic()
    bad_check = check_bytes(conversions, check_shapes, device)
    print(f"checks took {time.monotonic() - t0:.1f} s")
    if bad_check:
        print(f"{bad_check} byte mismatch(es): GPU bytes differ from the CPU path; timing every variant all the same")
    if args.dry_run:
        os.environ["CONVERSION_CORE_BACKEND"] = "triton"  # fn on CPU tensors takes the kernel too
    t0 = time.monotonic()
    bad = bench(conversions, bench_shapes, device, args.tune and not args.dry_run, args.quick, began + args.budget)
    print(f"bench took {time.monotonic() - t0:.1f} s (whole run {time.monotonic() - began:.1f} s)")
    if bad:
        print(f"{bad} benchmarked variant(s) with bytes != CPU torch path (or errors)")
    return 1 if bad or bad_check else 0


if __name__ == "__main__":
    sys.exit(main())
