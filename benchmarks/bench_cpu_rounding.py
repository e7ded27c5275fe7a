"""float32 -> e4m3fn rounding on CPU: torch's cast against exact vectorised alternatives.

One thread, one cache-sized chunk (2**20 float32 values, already clamped to ±448 as the
quantizers do), median of ``--reps`` runs in one process. Each alternative is first checked
bit for bit against ``x.to(torch.float8_e4m3fn)`` on the chunk and on every float32 value whose
low 16 bits are 0, 1, 0x7FFF, 0x8000, 0x8001 or 0xFFFF (ties, tie +- 1 ulp, sticky bits) in
±448; NaN is excluded (the callers refuse NaN before quantizing).

- ``cast``: ``out.copy_(x)``, what ``quantize_chunk_into`` does.
- ``lut``: round-to-odd to the top 16 bits (``t = (b | ((b & 0xFFFF) + 0xFFFF)) >> 16``, exact
  because e4m3 keeps <= 3 of bf16's 7 mantissa bits and ties need only round + sticky bits),
  then a 65536-entry table (torch's cast of each bf16 value) through ``index_select``.
- ``int``: integer round-to-nearest-even on the bits (Giesen's float->half method): normals
  ``(a + 0x7FFFF - (120 << 23) + ((a >> 20) & 1)) >> 20``, below 2**-6 the float add of 2**14
  (whose float32 spacing is the e4m3 subnormal spacing 2**-9), ``where`` between them, sign OR'ed.

    python benchmarks/bench_cpu_rounding.py [--reps N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

N = 1 << 20
E4M3 = torch.float8_e4m3fn


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _table() -> torch.Tensor:
    bf16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return bf16.nan_to_num(0.0).clamp(-448.0, 448.0).to(E4M3).view(torch.uint8)


def make_lut(n: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    table, c = _table(), torch.empty(n, dtype=torch.int32)

    def lut(x: torch.Tensor, out: torch.Tensor) -> None:
        b = x.view(torch.int32)
        torch.bitwise_and(b, 0xFFFF, out=c)
        c.add_(0xFFFF).bitwise_or_(b).bitwise_right_shift_(16).bitwise_and_(0xFFFF)
        torch.index_select(table, 0, c, out=out)

    return lut


def make_int(n: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    a, r, s = (torch.empty(n, dtype=torch.int32) for _ in range(3))
    magic = torch.tensor(16384.0).view(torch.int32).item()

    def rne(x: torch.Tensor, out: torch.Tensor) -> None:
        b = x.view(torch.int32)
        torch.bitwise_and(b, 0x7FFFFFFF, out=a)
        torch.bitwise_right_shift(a, 20, out=r)
        r.bitwise_and_(1).add_(a).add_(0x7FFFF - (120 << 23)).bitwise_right_shift_(20)
        torch.add(a.view(torch.float32), 16384.0, out=s.view(torch.float32))
        s.sub_(magic)
        torch.where(a < (121 << 23), s, r, out=r)
        torch.bitwise_right_shift(b, 24, out=s)
        r.bitwise_or_(s.bitwise_and_(0x80))
        out.copy_(r)

    return rne


def _check_values() -> torch.Tensor:
    high = torch.arange(1 << 16, dtype=torch.int32) << 16
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int32)
    x = (high.unsqueeze(1) | lows).flatten().view(torch.float32)
    x = x[~x.isnan()]
    return x.clamp(-448.0, 448.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = (torch.randn(N, generator=torch.Generator().manual_seed(0)) * 100.0).clamp_(-448.0, 448.0)
    check = _check_values()
    out = torch.empty(N, dtype=torch.uint8)
    ref = x.to(E4M3).view(torch.uint8)
    print(f"float32 -> e4m3 on one thread, {N} values (torch {torch.__version__})")
    print(f"{'method':8s} {'ms/chunk':>9s} {'Gvalues/s':>10s}  exact")
    cast_ms = _median_ms(lambda: out.view(E4M3).copy_(x), args.reps)
    print(f"{'cast':8s} {cast_ms:9.3f} {N / cast_ms / 1e6:10.2f}  (definition)")
    for name, make in [("lut", make_lut), ("int", make_int)]:
        fn = make(N)
        fn(x, out)
        exact = torch.equal(out, ref)
        check_out = torch.empty(check.numel(), dtype=torch.uint8)
        make(check.numel())(check, check_out)
        exact = exact and torch.equal(check_out, check.to(E4M3).view(torch.uint8))
        ms = _median_ms(lambda: fn(x, out), args.reps)  # noqa: B023
        print(f"{name:8s} {ms:9.3f} {N / ms / 1e6:10.2f}  {exact}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
