"""Peak memory an into-buffer CPU conversion adds, measured in a fresh process per case.

Each case runs in a new interpreter: allocate ``src`` (bf16, filled in place) and touch ``out`` and
``scale``, convert a small tensor once (thread pool, lazy imports), then reset the kernel's peak-RSS
mark (``/proc/self/clear_refs``), note the resident size, convert, and read the peak (``VmHWM``).
Where the mark cannot be reset, ``ru_maxrss`` is used, which can only overstate what was added.
Goal (issue 6): the chunked path adds <= 25% of the input's size; the eager reference is shown
for comparison.

    python benchmarks/rss_cpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CASES = [
    ("fp8_128x128", (8192, 8192)),
    ("cutlass_fp8_e4m3_per_channel", (8192, 8192)),
    ("fp8_128x128", (32, 1536, 2048)),
    ("cutlass_fp8_e4m3_per_channel", (32, 1536, 2048)),
]
GOAL_FRACTION = 0.25


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(name: str, shape: tuple[int, ...], path: str) -> dict:
    import torch

    import conversion_core as cc

    conversion = cc.load_registry().get(name)
    src = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=torch.Generator().manual_seed(0))
    out, scale = conversion.allocate(shape)
    assert scale is not None
    out.view(torch.uint8).fill_(0)
    scale.fill_(0)
    if path == "reference":
        from conversion_core_cutlass_fp8.torch_path import reference_quantize_rows
        from conversion_core_deepgemm_fp8.torch_path import reference_quantize_blocks

        def convert(s, o, sc):
            if name == "fp8_128x128":
                reference_quantize_blocks(s, o, sc, (128, 128), name)
            else:
                reference_quantize_rows(s, o, sc, name)
    else:
        convert = conversion.fn
    small = torch.ones(*shape[:-2], 256, 256, dtype=torch.bfloat16)
    convert(small, *conversion.allocate(small.shape))  # warm-up: imports, thread pool
    del small
    reset = _reset_peak()
    before_kib = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    convert(src, out, scale)
    peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    input_mb = src.numel() * src.element_size() / 2**20
    added_mb = max(0, peak_kib - before_kib) / 1024
    return {
        "conversion": name,
        "shape": list(shape),
        "path": path,
        "input_mb": input_mb,
        "rss_before_mb": before_kib / 1024,
        "peak_mb": peak_kib / 1024,
        "added_mb": added_mb,
        "added_fraction": added_mb / input_mb,
        "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss",
    }


def run(paths: tuple[str, ...] = ("path", "reference")) -> list[dict]:
    rows = []
    print(f"{'conversion':30s} {'shape':14s} {'path':10s} {'input MB':>9s} {'added MB':>9s} {'added/input':>11s}")
    for name, shape in CASES:
        for path in paths:
            cmd = [sys.executable, __file__, "--child", name, "x".join(map(str, shape)), path]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["goal_met"] = row["added_fraction"] <= GOAL_FRACTION if path == "path" else None
            rows.append(row)
            verdict = "" if path != "path" else ("  met" if row["goal_met"] else "  NOT met")
            print(
                f"{name:30s} {'x'.join(map(str, shape)):14s} {path:10s} {row['input_mb']:9.1f} "
                f"{row['added_mb']:9.1f} {row['added_fraction']:10.1%}{verdict}"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("CONVERSION", "SHAPE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, shape, path = args.child
        print(json.dumps(child(name, tuple(int(s) for s in shape.split("x")), path)))
        return 0
    rows = run()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0 if all(r["goal_met"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
