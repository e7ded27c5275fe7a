"""Offline conversion as whole processes, cold page cache: ``cp``, ``conversion-core convert``, llm-compressor.

One run, one generated checkpoint (a llama-style bf16 model from a transformers config, random
weights, 3 shards: ~2 GB, or ~100 MB with ``--small``; generated once and cached under ``--dir``),
and for every round of ``--repeat`` (rounds interleave the commands, so a load change on a shared
machine hits all of them alike), each command as its own process:

- start-up: ``python -c "import torch, conversion_core, safetensors"`` (and llm-compressor's own);
- ``cp -r`` of the checkpoint, and ``cp -r`` followed by ``sync`` (convert makes its shards
  durable with ``fdatasync``; a bare ``cp`` leaves its pages dirty);
- ``conversion-core convert --conversion NAME`` for every format llm-compressor also writes;
- llm-compressor's ``model_free_ptq`` for the same schemes, in its own virtualenv
  (``--llmc-python``: a benchmark-only dependency, never a project one), 2 worker threads (this
  machine's cores), on CPU.

Before each process: ``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only; where that is refused
the table says ``warm``, not ``cold``). Each process's wall time and peak RSS (``os.wait4``'s
``ru_maxrss``: the process and its waited-for children; llm-compressor's workers are threads) are
taken; GB/s counts the source checkpoint's bytes. Medians of the rounds. Printed ratios (issue 18):

- ``(convert - start-up) / cp`` <= 1.3 for the FP8 formats;
- ``llm-compressor / convert`` >= 5 (whole processes); and the same ratio counting each process
  until its output is on disk: after every process a timed ``sync`` (column ``+sync s``) flushes
  what it left dirty (``convert`` leaves nothing; llm-compressor's ``save_file`` does not sync);
- convert's peak RSS <= the largest source shard + its converted output + 256 MB.

Python children run without ``PYTHONDONTWRITEBYTECODE`` (an installed package ships byte-compiled
modules; otherwise every run would time the compiler), after one untimed warm-up of every command
on a tiny checkpoint, which also writes those caches.

    python benchmarks/bench_convert.py [--small] [--repeat 3] [--dir /tmp/bench_convert]
        [--llmc-python /work/lcvenv/bin/python] [--only fp8_128x128,...] [--no-llmc] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: (llm-compressor preset scheme, the conversion that writes the same format)
SCHEMES = [
    ("FP8_BLOCK", "fp8_128x128"),
    ("FP8_DYNAMIC", "cutlass_fp8_e4m3_per_channel"),
    ("NVFP4A16", "nvfp4"),
    ("W4A16", "int4_w4a16_g128"),
    ("MXFP8", "mxfp8"),
    ("MXFP4", "mxfp4"),
]
FP8 = ("fp8_128x128", "cutlass_fp8_e4m3_per_channel")
#: model_free_ptq matches tensors by name only: without these it would also quantize the embedding
#: and lm_head, which our Linear targets (and vLLM) leave in bf16.
LLMC_IGNORE = ["lm_head", "re:.*embed_tokens$"]
LLMC_WORKERS = 2
GOAL_CP = 1.3
GOAL_LLMC = 5.0
RSS_SLACK = 256 << 20

#: llama-style shapes: hidden 2048 / MLP 5632 (multiples of 128), GQA 16/8 heads.
SIZES = {
    "full": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18},  # ~2.0 GB
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8},  # ~110 MB
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2},  # warm-up only
}
SHARDS = 3

OURS_STARTUP = "import torch, conversion_core, safetensors"
LLMC_STARTUP = "import torch, llmcompressor, safetensors"
OURS_CONVERT = "import sys; from conversion_core.apps.cli import main; sys.exit(main())"
LLMC_CONVERT = f"""
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3], ignore={LLMC_IGNORE!r}, max_workers={LLMC_WORKERS},
               device="cpu")
"""


# ---- the checkpoint ---------------------------------------------------------------------------


def generate(path: Path, size: str) -> None:
    """A bf16 llama checkpoint with random weights in :data:`SHARDS` shards, written once (``.done``)."""
    if (path / ".done").is_file():
        return
    import torch
    import transformers
    from safetensors.torch import save_file

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = transformers.LlamaConfig(
        **SIZES[size],
        num_attention_heads=16 if size == "full" else 8,
        num_key_value_heads=8 if size == "full" else 4,
        vocab_size=32000 if size != "tiny" else 1024,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    specs = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    total = sum(2 * _numel(shape) for _, shape in specs)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in specs:  # greedy, in file order, into SHARDS roughly equal shards
        if filled >= total * len(groups) / SHARDS and len(groups) < SHARDS:
            groups.append([])
        groups[-1].append((name, shape))
        filled += 2 * _numel(shape)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(path)
    (path / ".done").write_text("")


def _generate_elsewhere(path: Path, size: str) -> None:
    """:func:`generate` in a child process, so this one never imports torch.

    Linux carries a process's peak RSS across ``execve``: every child spawned from here would
    report at least this process's peak, which importing torch and transformers would make ~600 MB.
    """
    if not (path / ".done").is_file():
        subprocess.run([sys.executable, __file__, "--generate", str(path), size], check=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shard_sizes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))}


# ---- processes --------------------------------------------------------------------------------


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False where that is not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


@dataclass
class Proc:
    seconds: float
    rss: int  # bytes
    rc: int
    tail: str


def run_process(argv: list[str], env: dict[str, str], cold: bool) -> Proc:
    """One whole process: wall time from spawn to reaped, peak RSS from ``wait4``."""
    if cold:
        drop_caches()
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-600:]
    return Proc(seconds, usage.ru_maxrss * 1024, rc, tail)


@dataclass
class Command:
    key: str  # row label
    scheme: str
    argv: list[str]  # {src} / {dst} substituted per run
    env: dict[str, str]
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    error: str = ""
    out_sizes: dict[str, int] = field(default_factory=dict)
    #: seconds of a ``sync`` run right after the process: what its output still needed to be on
    #: disk (``convert`` makes its output durable itself; llm-compressor and ``cp -r`` do not)
    syncs: list[float] = field(default_factory=list)

    def run(self, src: Path, dst: Path, cold: bool) -> None:
        if self.error:
            return
        shutil.rmtree(dst, ignore_errors=True)
        argv = [a.format(src=src, dst=dst) for a in self.argv]
        try:
            p = run_process(argv, self.env, cold)
        except Exception as exc:  # noqa: BLE001 - one failed command must not end the benchmark
            self.error = f"{type(exc).__name__}: {exc}"
            return
        if p.rc != 0:
            self.error = f"exit {p.rc}: " + " | ".join(p.tail.strip().splitlines()[-3:])
        else:
            self.times.append(p.seconds)
            self.rss.append(p.rss)
            start = time.perf_counter()
            os.sync()
            self.syncs.append(time.perf_counter() - start)
            if dst.is_dir():
                self.out_sizes = _shard_sizes(dst)
        shutil.rmtree(dst, ignore_errors=True)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def durable(self) -> float:
        """Median of the process's time plus the ``sync`` after it: time until its output is on disk."""
        if not self.times:
            return float("nan")
        return statistics.median(t + s for t, s in zip(self.times, self.syncs, strict=True))


def commands(args: argparse.Namespace) -> tuple[list[Command], Command, Command | None]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    llmc_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    llmc_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    py = sys.executable
    wanted = [(s, c) for s, c in SCHEMES if not args.only or c in args.only.split(",")]
    startup = Command("start-up", "-", [py, "-c", OURS_STARTUP], env)
    cmds = [
        startup,
        Command("cp -r", "-", ["cp", "-r", "{src}", "{dst}"], env),
        Command("cp -r + sync", "-", ["sh", "-c", 'cp -r "$0" "$1" && sync', "{src}", "{dst}"], env),
    ]
    for _, conversion in wanted:
        argv = [py, "-c", OURS_CONVERT, "convert", "{src}", "{dst}", "--conversion", conversion, "--no-progress"]
        cmds.append(Command("convert", conversion, argv, env))
    llmc_startup = None
    if not args.no_llmc:
        if not Path(args.llmc_python).is_file():
            print(f"llm-compressor: {args.llmc_python} does not exist; its rows are left out", file=sys.stderr)
        else:
            llmc_startup = Command("llmc start-up", "-", [args.llmc_python, "-c", LLMC_STARTUP], llmc_env)
            cmds.append(llmc_startup)
            for scheme, _ in wanted:
                argv = [args.llmc_python, "-c", LLMC_CONVERT, "{src}", "{dst}", scheme]
                cmds.append(Command("llmc model_free_ptq", scheme, argv, llmc_env))
    return cmds, startup, llmc_startup


# ---- the report -------------------------------------------------------------------------------


def report(cmds: list[Command], startup: Command, src: Path, cache: str, load: tuple[str, str]) -> list[dict]:
    sizes = _shard_sizes(src)
    gb_in = sum(sizes.values()) / 1e9
    largest = max(sizes, key=lambda f: sizes[f])
    print(
        f"\nsource: {src} ({gb_in:.2f} GB in {len(sizes)} shards, largest {largest} {sizes[largest] / 1e6:.0f} MB); "
        f"page cache: {cache} per process; load average before/after: {load[0]} / {load[1]}; "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'command':20s} {'scheme/conversion':30s} {'cache':5s} {'median s':>9s} {'min..max':>13s} "
        f"{'-start-up':>9s} {'GB/s in':>8s} {'peak RSS MB':>11s} {'+sync s':>7s}"
    )
    rows = []
    for c in cmds:
        med = c.median
        less = med - startup.median if c.key == "convert" else float("nan")
        spread = f"{min(c.times):.2f}..{max(c.times):.2f}" if c.times else ""
        rss = statistics.median(c.rss) / 1e6 if c.rss else float("nan")
        gbps = gb_in / med if c.key not in ("start-up", "llmc start-up") and c.times else float("nan")
        sync = statistics.median(c.syncs) if c.syncs else float("nan")
        line = (
            f"{c.key:20s} {c.scheme:30s} {cache:5s} {med:9.2f} {spread:>13s} {less:9.2f} {gbps:8.2f} {rss:11.0f} "
            f"{sync:7.2f}"
        )
        print(line.replace("nan", "  -") + (f"  FAILED: {c.error}" if c.error else ""))
        rows.append(
            {
                "command": c.key,
                "scheme": c.scheme,
                "cache": cache,
                "times_s": c.times,
                "median_s": med,
                "rss_bytes": c.rss,
                "sync_after_s": c.syncs,
                "error": c.error,
                "out_sizes": c.out_sizes,
            }
        )
    by_key = {(c.key, c.scheme): c for c in cmds}
    cp = by_key[("cp -r", "-")]
    print("\nratios (issue 18 goals)")
    for scheme, conversion in SCHEMES:
        ours = by_key.get(("convert", conversion))
        if ours is None or not ours.times:
            continue
        parts = []
        if conversion in FP8 and cp.times:
            r = (ours.median - startup.median) / cp.median
            parts.append(
                f"(convert - start-up)/cp = {r:.2f} (goal <= {GOAL_CP}: {'met' if r <= GOAL_CP else 'NOT met'})"
            )
        theirs = by_key.get(("llmc model_free_ptq", scheme))
        if theirs is not None and theirs.times:
            r = theirs.median / ours.median
            parts.append(f"llmc/convert = {r:.1f}x (goal >= {GOAL_LLMC}: {'met' if r >= GOAL_LLMC else 'NOT met'})")
            parts.append(f"until on disk (+ sync) {theirs.durable / ours.durable:.1f}x")
        elif theirs is not None:
            parts.append(f"llmc: {theirs.error or 'no run'}")
        out = ours.out_sizes.get(largest, 0)
        bound = sizes[largest] + out + RSS_SLACK
        peak = max(ours.rss)
        parts.append(
            f"peak RSS {peak / 1e6:.0f} MB vs bound {bound / 1e6:.0f} MB (shard {sizes[largest] / 1e6:.0f} + "
            f"output {out / 1e6:.0f} + 256 MB: {'met' if peak <= bound else 'NOT met'})"
        )
        print(f"  {conversion:30s} / {scheme:12s} " + "; ".join(parts))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        default=os.path.join(tempfile.gettempdir(), "bench_convert"),
        help="where the checkpoints are cached and outputs written (default: %(default)s)",
    )
    parser.add_argument("--small", action="store_true", help="a ~110 MB checkpoint instead of ~2 GB")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians are printed)")
    parser.add_argument(
        "--llmc-python",
        default="/work/lcvenv/bin/python",
        help="python of a virtualenv with llmcompressor (default: %(default)s)",
    )
    parser.add_argument("--no-llmc", action="store_true", help="leave llm-compressor out")
    parser.add_argument("--only", help="comma-separated conversions to run (default: all of SCHEMES)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up on a tiny checkpoint")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--generate", nargs=2, metavar=("DIR", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.generate:
        generate(Path(args.generate[0]), args.generate[1])
        return 0
    root = Path(args.dir)
    size = "small" if args.small else "full"
    src, dst = root / f"src-{size}", root / "out"
    t0 = time.perf_counter()
    _generate_elsewhere(src, size)
    print(f"checkpoint {src} ready ({time.perf_counter() - t0:.1f} s)")
    cmds, startup, _ = commands(args)
    cold = drop_caches()
    cache = "cold" if cold else "warm"
    if not cold:
        print("drop_caches is not permitted here (not root?): every figure below is WARM page cache")
    if not args.no_warmup:
        tiny = root / "src-tiny"
        _generate_elsewhere(tiny, "tiny")
        for c in cmds:
            c.run(tiny, dst, cold=False)
            c.times.clear()
            c.rss.clear()
            c.out_sizes.clear()
        failed = [f"{c.key} {c.scheme}: {c.error}" for c in cmds if c.error]
        if failed:
            print("warm-up failures (those commands are left out):\n  " + "\n  ".join(failed))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for round_ in range(args.repeat):
        for c in cmds:
            c.run(src, dst, cold)
            got = f"{c.times[-1]:.2f} s, {c.rss[-1] / 1e6:.0f} MB" if c.times and not c.error else c.error
            print(f"  {c.key} {c.scheme}: {got}", flush=True)
        print(f"round {round_ + 1}/{args.repeat} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = report(cmds, startup, src, cache, (load_before, load_after))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"(peak RSS includes this launcher's own before exec: {own:.0f} MB)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    with contextlib.suppress(OSError):
        shutil.rmtree(dst)
    return 1 if any(c.error for c in cmds) else 0


if __name__ == "__main__":
    sys.exit(main())
