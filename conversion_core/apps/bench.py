"""``conversion-core bench``: run the repository's benchmark scripts.

The benchmarks live in ``benchmarks/`` of a source checkout (they are not part of the wheel:
they need triton, a GPU for the main figures, and write result files); ``bench`` looks for
that folder in the current directory, then beside an editable install of the package. ``bench`` runs
``benchmarks/bench_quant.py`` and ``bench --model`` runs ``benchmarks/bench_model.py``; every
other argument is passed on to the script (``conversion-core bench -- --help`` shows them).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from ..errors import ConversionCoreError


def _find_script(name: str) -> Path:
    places = [Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"]
    for place in places:
        if (place / name).is_file():
            return place / name
    raise ConversionCoreError(
        f"benchmarks/{name} not found in {' or '.join(str(p) for p in places)}: `conversion-core bench` "
        "runs the benchmarks of a source checkout (run it from the repository's root)"
    )


def _run_script(name: str, argv: list[str]) -> int:
    path = _find_script(name)
    spec = importlib.util.spec_from_file_location(f"conversion_core_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


def _cmd_bench(args: argparse.Namespace) -> int:
    rest = [a for a in args.script_args if a != "--"]
    return _run_script("bench_model.py" if args.model else "bench_quant.py", rest)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="time the kernels against a device copy (benchmarks/bench_quant.py; --model: whole model)"
    )
    p.add_argument("--model", action="store_true", help="whole-model step (benchmarks/bench_model.py)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=_cmd_bench)
    return p
