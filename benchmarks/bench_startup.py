"""Start-up cost of conversion-core beyond ``import torch``.

Runs, in fresh interpreters (alternating, median of ``--repeat`` runs each):

- baseline: ``import torch``
- core:     ``import torch; import conversion_core; conversion_core.load_registry()``

and prints the difference of the medians. It also times ``import conversion_core`` +
``load_registry()`` inside the second interpreter, after torch (wall and CPU): the same quantity
without the noise of two whole torch imports. Every installed plugin is loaded (install the
three built-in plugins first) unless ``CONVERSION_CORE_PLUGINS`` says otherwise. Times are taken
inside each interpreter, so interpreter start-up is excluded. Goal: <= 150 ms on the 2-core CI
machine.

    python benchmarks/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

GOAL_MS = 150.0

BASELINE = """
import time
w0, c0 = time.perf_counter(), time.process_time()
import torch
print((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3)
"""

CORE = """
import json, sys, time
w0, c0 = time.perf_counter(), time.process_time()
import torch
w1, c1 = time.perf_counter(), time.process_time()
import conversion_core
registry = conversion_core.load_registry()
w2, c2 = time.perf_counter(), time.process_time()
print((w2 - w0) * 1e3, (c2 - c0) * 1e3, (w2 - w1) * 1e3, (c2 - c1) * 1e3)
print(json.dumps([[i.name, i.status] for i in registry.plugins()]), file=sys.stderr)
"""


#: An installed wheel ships byte-compiled modules; PYTHONDONTWRITEBYTECODE (set on the shared
#: machine) would make every run recompile conversion-core's sources and time the compiler.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_once(script: str) -> tuple[list[float], str]:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=ENV)
    return [float(v) for v in result.stdout.split()], result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    run_once(CORE)  # warm the OS file cache for both variants, and write the .pyc files
    base_wall, base_cpu, core_wall, core_cpu, own_wall, own_cpu = ([] for _ in range(6))
    plugins: list[list[str]] = []
    for _ in range(args.repeat):  # alternate, so a burst of load on the machine hits both
        (wall, cpu), _ = run_once(BASELINE)
        base_wall.append(wall)
        base_cpu.append(cpu)
        (wall, cpu, own_w, own_c), stderr = run_once(CORE)
        core_wall.append(wall)
        core_cpu.append(cpu)
        own_wall.append(own_w)
        own_cpu.append(own_c)
        plugins = json.loads(stderr.strip().splitlines()[-1])
    med = statistics.median
    print("plugins (entry point=status): " + (", ".join(f"{n}={s}" for n, s in plugins) or "none"))
    print(f"import torch alone                        wall median {med(base_wall):7.0f} ms  ({_fmt(base_wall)})")
    print(f"import torch + conversion_core + registry wall median {med(core_wall):7.0f} ms  ({_fmt(core_wall)})")
    print(
        f"difference of medians, wall: {med(core_wall) - med(base_wall):7.1f} ms; CPU: "
        f"{med(core_cpu) - med(base_cpu):7.1f} ms  (noisy: two populations of whole torch imports)"
    )
    extra = med(own_wall)
    print(
        f"conversion_core + load_registry() after torch, same process: wall median {extra:.1f} ms "
        f"({_fmt(own_wall)}), CPU median {med(own_cpu):.1f} ms"
    )
    verdict = "within" if extra <= GOAL_MS else "OVER"
    print(f"start-up beyond torch: {extra:.1f} ms (goal <= {GOAL_MS:.0f} ms: {verdict})")


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    main()
