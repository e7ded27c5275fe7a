"""Start-up cost of conversion-core beyond ``import torch``.

Runs, in fresh interpreters (alternating, median of ``--repeat`` runs each):

- baseline: ``import torch``
- core:     ``import torch; import conversion_core; conversion_core.load_registry()``

and prints the difference. Every installed plugin is loaded (install the three built-in plugins
first), unless ``CONVERSION_CORE_PLUGINS`` says otherwise. Goal: <= 150 ms on the 2-core CI
machine. Times are wall-clock of the whole interpreter, measured inside it (start to end of the
statements), so interpreter start-up itself is excluded from both.

    python benchmarks/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

GOAL_MS = 150.0

TIMER = """
import time
t0 = time.perf_counter()
{body}
t1 = time.perf_counter()
print((t1 - t0) * 1000.0)
"""

BASELINE = "import torch"
CORE = (
    "import torch\n"
    "import conversion_core\n"
    "registry = conversion_core.load_registry()\n"
    "import sys, json\n"
    "print(json.dumps([[i.name, i.status] for i in registry.plugins()]), file=sys.stderr)"
)


def run_once(body: str) -> tuple[float, str]:
    result = subprocess.run([sys.executable, "-c", TIMER.format(body=body)], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1]), result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    run_once(CORE)  # warm the OS file cache for both variants
    baseline, core = [], []
    plugins = ""
    for _ in range(args.repeat):
        baseline.append(run_once(BASELINE)[0])
        ms, stderr = run_once(CORE)
        core.append(ms)
        plugins = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    base_ms, core_ms = statistics.median(baseline), statistics.median(core)
    extra = core_ms - base_ms
    print(f"plugins (entry point, status): {', '.join(f'{n}={s}' for n, s in json.loads(plugins or '[]'))}")
    print(f"import torch                                   median {base_ms:8.1f} ms  (runs: {_fmt(baseline)})")
    print(f"import torch + conversion_core + load_registry median {core_ms:8.1f} ms  (runs: {_fmt(core)})")
    verdict = "within" if extra <= GOAL_MS else "OVER"
    print(f"conversion-core start-up beyond torch: {extra:.1f} ms (goal <= {GOAL_MS:.0f} ms: {verdict})")


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    main()
