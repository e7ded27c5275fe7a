"""Conformance kit: the checks every conversion must pass, for plugin authors and for our own plugins.

Run it from a test (pytest or anything else; this module does not import pytest)::

    import conversion_core as cc
    from conversion_core.testing import check_conversion

    def test_my_conversion_conforms():
        check_conversion(cc.load_registry(reload=True).get("my_fp8"))

Each check raises ``AssertionError`` naming the conversion, the check and what differed. The
checks use small shapes (2D and 3D, multiples of 128 and not) so the whole kit runs in seconds
on a CPU. ``docs/plugin-authors.md`` explains every check and how the error bounds are derived.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .backend import BACKEND_ENV
from .contract import Conversion
from .errors import ConversionCoreError
from .selection import accepts

Shape = tuple[int, ...]

#: Small shapes that cross 128-element block edges, 2D and stacked-expert 3D.
DEFAULT_SHAPES: tuple[Shape, ...] = ((16, 32), (130, 257), (2, 129, 136))

#: Source dtypes the kit feeds a conversion (those it declares in ``src_dtypes``).
KIT_SOURCE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

#: Every byte 0xFF is NaN in float32, float16, bfloat16, float8_e4m3fn, float8_e5m2 and e8m0:
#: an element the conversion forgot to write stays NaN and is caught.
NAN_POISON = 0xFF
#: A second poison pattern: an unwritten element differs between the two poisoned runs even
#: when the output dtype has no NaN (integer or packed formats).
OTHER_POISON = 0x5A


@dataclass(frozen=True)
class ErrorBound:
    """Per element, ``|dequantize(out, scale) - x| <= relative*|x| + scale_units*s + absolute``.

    ``s`` is the element's dequantization scale, found as ``dequantize(ones, scale)`` (1 for
    unscaled formats), so the ``scale_units`` term is the format's underflow floor measured in
    the element's own scale. See docs/plugin-authors.md for the derivation of each bound.
    """

    relative: float
    scale_units: float
    absolute: float = 0.0
    #: ``buffers -> each element's dequantization multiplier`` for formats whose dequantize is not
    #: ``q * broadcast(scale)`` (packed values); None: :func:`element_scale`.
    element_scale: Callable[..., torch.Tensor] | None = None

    def allowed(self, x: torch.Tensor, element_scale: torch.Tensor) -> torch.Tensor:
        """The allowed absolute error per element (float64)."""
        return self.relative * x.double().abs() + self.scale_units * element_scale.double().abs() + self.absolute


#: float32 arithmetic slack: x/s and q*s are each one float32 rounding (2^-24 relative).
_F32_SLACK = 2.0**-20

#: e4m3: 3 mantissa bits, so rounding to nearest moves a normal value by at most half an ulp,
#: 2^-4 of its magnitude; below the smallest normal (2^-6) the spacing is 2^-9, half of it 2^-10.
E4M3_BOUND = ErrorBound(relative=2.0**-4 + _F32_SLACK, scale_units=2.0**-10 + _F32_SLACK)
#: e5m2: 2 mantissa bits (2^-3 of the value), subnormal spacing 2^-16 (half: 2^-17).
E5M2_BOUND = ErrorBound(relative=2.0**-3 + _F32_SLACK, scale_units=2.0**-17 + _F32_SLACK)
#: bfloat16: 7 mantissa bits (2^-8), subnormal spacing 2^-133 (half: 2^-134).
BF16_BOUND = ErrorBound(relative=2.0**-8, scale_units=2.0**-134)
#: float16: 10 mantissa bits (2^-11), subnormal spacing 2^-24 (half: 2^-25).
FP16_BOUND = ErrorBound(relative=2.0**-11, scale_units=2.0**-25)
#: float32 holds every bf16, fp16 and fp32 source value exactly.
EXACT = ErrorBound(relative=0.0, scale_units=0.0)

DEFAULT_BOUNDS: dict[torch.dtype, ErrorBound] = {
    torch.float8_e4m3fn: E4M3_BOUND,
    torch.float8_e5m2: E5M2_BOUND,
    torch.bfloat16: BF16_BOUND,
    torch.float16: FP16_BOUND,
    torch.float32: EXACT,
}

#: The checks :func:`check_conversion` runs, in order (``only=`` selects some).
CHECKS: tuple[str, ...] = (
    "fields",
    "tags",
    "allocate",
    "agreement",
    "writes_every_element",
    "non_contiguous",
    "source_dtypes",
    "zeros",
    "huge_values",
    "round_trip",
    "refusals",
    "nonfinite_refused",
    "device_agreement",
)


def check_conversion(
    conversion: Conversion,
    *,
    error_bound: ErrorBound | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    device: str | torch.device = "cpu",
    refuse_nonfinite: bool | None = None,
    only: Iterable[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """Run every conformance check (or those named in ``only``) on ``conversion``.

    :param error_bound: the format's round-trip bound; default from ``dst_dtype`` (see
        ``DEFAULT_BOUNDS``); required for other output dtypes (packed formats).
    :param shapes: source shapes; default ``DEFAULT_SHAPES`` restricted to ``src_ndims``.
    :param device: where the sources and buffers live; off the CPU, bytes are also compared
        with the CPU's (``device_agreement``).
    :param refuse_nonfinite: NaN/Inf sources must be refused; default: True for conversions
        with a scale (a quantizer must never put NaN bytes on the wire), False otherwise.
    :returns: the names of the checks that ran (checks that do not apply are skipped).
    """
    device = torch.device(device)
    selected = list(CHECKS if only is None else only)
    unknown = [name for name in selected if name not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance checks {unknown}; known: {', '.join(CHECKS)}")
    shapes = _shapes_for(conversion, shapes)
    bound = _bound_for(conversion, error_bound)
    if refuse_nonfinite is None:
        refuse_nonfinite = conversion.requires_scale
    runners: dict[str, Callable[[], object]] = {
        "fields": lambda: check_fields(conversion, shapes),
        "tags": lambda: check_tags(conversion),
        "allocate": lambda: check_allocate(conversion, shapes, device),
        "agreement": lambda: check_agreement(conversion, shapes, device, seed),
        "writes_every_element": lambda: check_writes_every_element(conversion, shapes, device, seed),
        "non_contiguous": lambda: check_non_contiguous(conversion, shapes, device, seed),
        "source_dtypes": lambda: check_source_dtypes(conversion, shapes, device, bound, seed),
        "zeros": lambda: check_zeros(conversion, shapes, device),
        "huge_values": lambda: check_huge_values(conversion, shapes, device, bound, seed),
        "round_trip": lambda: check_round_trip(conversion, shapes, device, bound, seed),
        "refusals": lambda: check_refusals(conversion, shapes[0], device, seed),
        "nonfinite_refused": lambda: check_nonfinite_refused(conversion, shapes, device, seed),
        "device_agreement": lambda: check_device_agreement(conversion, shapes, device, seed),
    }
    ran = []
    for name in selected:
        if name == "nonfinite_refused" and not refuse_nonfinite:
            continue
        if name == "device_agreement" and device.type == "cpu":
            continue
        runners[name]()
        ran.append(name)
    return ran


# --------------------------------------------------------------------------- sources and bytes


def random_source(
    shape: Sequence[int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> torch.Tensor:
    """Weights-like values over a wide dynamic range, the same in bf16, fp16 and fp32.

    Magnitudes span 2^-10..2^5 times a normal draw, row 1 is zero (a zero scale group) and the
    last column is 256x larger (outliers push the small values of a group into subnormals).
    Every value is a bf16 value inside fp16's normal range, so all three source dtypes hold the
    exact same numbers and must give the exact same bytes.
    """
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-10, 6, shape, generator=g).float())
    if len(shape) >= 2 and shape[-2] > 1:
        x[..., 1, :] = 0.0
    if len(shape) >= 1 and shape[-1] > 1:
        x[..., -1] *= 256.0
    x = x.to(torch.bfloat16).float()
    x = torch.where(x.abs() < 2.0**-14, torch.zeros_like(x), x)  # keep fp16 exact: no fp16 subnormals
    return x.to(dtype).to(device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor, as a flat uint8 tensor on the CPU."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def poison(t: torch.Tensor, byte: int = NAN_POISON) -> torch.Tensor:
    """Fill every byte of ``t`` with ``byte`` (in place) and return it."""
    t.reshape(-1).view(torch.uint8).fill_(byte)
    return t


def element_scale(conversion: Conversion, *buffers: torch.Tensor | None) -> torch.Tensor:
    """Each element's dequantization multiplier: ``dequantize`` of a main output of ones.

    Valid for formats whose dequantize is ``q * broadcast(companions)`` (every float format); an
    unscaled format gives 1 everywhere. Packed formats pass ``ErrorBound.element_scale``.
    """
    out = buffers[0]
    assert out is not None
    ones = torch.ones(out.shape, dtype=out.dtype, device=out.device)
    return conversion.dequantize(ones, *buffers[1:])


def e4m3_magnitudes() -> torch.Tensor:
    """The 127 finite non-negative e4m3fn values, indexed by their byte (float64).

    Built from the format's definition (1 sign, 4 exponent bits with bias 7, 3 mantissa bits;
    exponent 0 is subnormal; byte 0x7F is NaN), not from torch's float8 cast.
    """
    values = []
    for byte in range(0x7F):
        exponent, mantissa = byte >> 3, byte & 7
        values.append(mantissa * 2.0**-9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


def e4m3_reference_bytes(values: torch.Tensor) -> torch.Tensor:
    """e4m3fn bytes (uint8, same shape, on the CPU) of ``values`` rounded to nearest, ties to even.

    An encoder independent of torch's float8 cast, for byte-exact tests of FP8 conversions.
    ``values`` must be finite with ``|v| <= 448`` (clamp first, as the conversions do).
    """
    v = values.detach().cpu().reshape(-1)
    magnitude = v.double().abs()
    if not bool(torch.isfinite(magnitude).all()) or bool((magnitude > 448.0).any()):
        raise ValueError("e4m3_reference_bytes needs finite values with |v| <= 448 (clamp first)")
    table = e4m3_magnitudes()
    hi = torch.searchsorted(table, magnitude).clamp_(max=len(table) - 1)  # first value >= magnitude
    lo = (hi - 1).clamp_(min=0)
    below, above = magnitude - table[lo], table[hi] - magnitude
    take_hi = (above < below) | ((above == below) & (hi % 2 == 0))  # ties go to the even mantissa
    byte = torch.where(take_hi, hi, lo) | (torch.signbit(v).long() << 7)
    return byte.to(torch.uint8).reshape(values.shape)


# --------------------------------------------------------------------------- kernels under Triton's interpreter

#: The environment of a run whose Triton kernels execute in Triton's CPU interpreter.
INTERPRETER_ENV = {"TRITON_INTERPRET": "1", "CONVERSION_CORE_BACKEND": "triton"}


def under_triton_interpreter() -> bool:
    """True in a process started with :data:`INTERPRETER_ENV`.

    ``TRITON_INTERPRET`` is read when a kernel is decorated, so it cannot be switched on inside a
    running test: a test file checks this at import, defines its real tests only when it holds and
    otherwise one test that calls :func:`rerun_under_triton_interpreter`.
    """
    return all(os.environ.get(k) == v for k, v in INTERPRETER_ENV.items())


def rerun_under_triton_interpreter(test_file: str, timeout_s: float = 900) -> None:
    """Run ``test_file``'s tests in a child pytest with :data:`INTERPRETER_ENV`; raise unless all passed.

    A child in which every test was skipped (Triton missing, a plugin not installed) fails here
    too: it would prove nothing about the kernels. The error carries the tail of the child's output.
    """
    env = dict(os.environ, **INTERPRETER_ENV)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", test_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise AssertionError(proc.stdout[-6000:] + proc.stderr[-2000:])
    if " passed" not in proc.stdout or "skipped" in proc.stdout.splitlines()[-1]:
        raise AssertionError(f"{test_file}: the interpreted run passed nothing or skipped: {proc.stdout[-2000:]}")


def spread_weights(
    shape: Sequence[int],
    dtype: torch.dtype,
    seed: int,
    row_exponents: tuple[float, float] = (-14.0, 6.0),
    element_exponents: tuple[float, float] | None = (-4.0, 0.0),
) -> torch.Tensor:
    """A normal draw times ``e**u`` per row (``u`` uniform in ``row_exponents``) and per element
    (``element_exponents``; None: no per-element factor), element 3 set to -0.0.

    Rows and scale blocks of very different size reach every rounding regime of a low-precision
    format (subnormals, the scale floor); the signed zero checks the sign bit of a zero code.
    """
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x *= torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(*row_exponents, generator=g))
    if element_exponents is not None:
        x *= torch.exp(torch.empty(shape).uniform_(*element_exponents, generator=g))
    x.view(-1)[min(3, x.numel() - 1)] = -0.0
    return x.to(dtype)


#: The strided layouts a kernel must read correctly (:func:`non_contiguous_view`).
NON_CONTIGUOUS_VIEWS = ("transposed", "column_slice", "experts_permuted")


def non_contiguous_view(
    view: str, make: Callable[[tuple[int, ...], torch.dtype, int], torch.Tensor], seed: int = 1
) -> torch.Tensor:
    """A non-contiguous source of ``make(shape, dtype, seed)``: ``"transposed"`` (a bf16 300x140
    transposed: 140x300), ``"column_slice"`` (every second column of fp16 140x600) or
    ``"experts_permuted"`` (a bf16 130x3x200 with its first two dims swapped: 3 experts whose rows
    are 600 elements apart). Seeds ``seed``, ``seed + 1``, ``seed + 2`` in that order.

    Each crosses 128-element block edges, so the kernels' strided loads and masks both show.
    """
    if view == "transposed":
        src = make((300, 140), torch.bfloat16, seed).t()
    elif view == "column_slice":
        src = make((140, 600), torch.float16, seed + 1)[:, ::2]
    elif view == "experts_permuted":
        src = make((130, 3, 200), torch.bfloat16, seed + 2).permute(1, 0, 2)
    else:
        raise ValueError(f"view {view!r} is not one of {', '.join(NON_CONTIGUOUS_VIEWS)}")
    assert not src.is_contiguous(), view
    return src


def e4m3_rounding_row() -> torch.Tensor:
    """Eleven float32 values whose amax is 448 (scale 1): ties to even (17, 19, -17 between 16, 18
    and 20; 232 between 224 and 240), subnormal ties (3 * 2^-10, ±2^-10), ±0 and 240.

    Scaled by a power of two the row keeps its ties, so one row shows rounding at any scale.
    """
    return torch.tensor([448.0, 17.0, 19.0, -17.0, 3 * 2.0**-10, 2.0**-10, -(2.0**-10), 0.0, -0.0, 240.0, 232.0])


def poisoned_allocate(
    conversion: Conversion, shape: Sequence[int], device: str | torch.device = "cpu", byte: int = NAN_POISON
) -> tuple[torch.Tensor, ...]:
    """``conversion.allocate(shape, device)`` with every byte of every buffer set to ``byte``.

    With :data:`NAN_POISON` an element a kernel forgot to write stays NaN, so it differs from any
    real result when bytes are compared.
    """
    buffers = conversion.allocate(tuple(shape), torch.device(device))
    return tuple(poison(b, byte) for b in buffers if b is not None)


def convert_on_backend(conversion: Conversion, src: torch.Tensor, backend: str) -> tuple[torch.Tensor, ...]:
    """``conversion.fn`` into poisoned buffers with ``CONVERSION_CORE_BACKEND=backend``, then restored.

    The same source through ``"torch"`` and ``"triton"`` (under the interpreter) is the test that a
    kernel writes its torch path's bytes.
    """
    buffers = poisoned_allocate(conversion, src.shape, src.device)
    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend
    try:
        conversion.fn(src, *buffers)
    finally:
        if old is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = old
    return buffers


def check_grouped_launch(conversion: Conversion, sources: Sequence[torch.Tensor]) -> None:
    """``conversion.launch_group`` of ``sources`` writes, into poisoned buffers, the bytes of one
    ``launch`` per source and of the torch path (the definition), with no flag raised for finite
    sources; a NaN in one member raises the flag. Where Triton launches: on CUDA, or on CPU under
    the interpreter (:func:`rerun_under_triton_interpreter`). Give it awkward sources: per-expert
    views of one stack, 3-D stacks, transposed and sliced views, offsets that break alignment,
    mixed dtypes, shapes that split the run into several groups."""
    if conversion.launch_group is None or conversion.launch is None:
        raise AssertionError(f"{conversion.name}: has no launch_group (and launch) to check")
    if not sources:
        raise ValueError("check_grouped_launch needs at least one source")
    device = sources[0].device

    def allocated(srcs: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        return [(s, *poisoned_allocate(conversion, s.shape, s.device)) for s in srcs]

    grouped, single = allocated(sources), allocated(sources)
    grouped_flag, single_flag = (torch.zeros(1, dtype=torch.int32, device=device) for _ in range(2))
    conversion.launch_group(grouped, grouped_flag)
    for call in single:
        conversion.launch(*call, single_flag)
    assert int(single_flag.item()) == 0, f"{conversion.name}: launch flagged finite sources"
    assert int(grouped_flag.item()) == 0, f"{conversion.name}: launch_group flagged finite sources"
    for g, s in zip(grouped, single, strict=True):
        what = f"{conversion.name} {g[0].dtype} {tuple(g[0].shape)} stride {g[0].stride()}"
        assert_same_bytes(g[1:], s[1:], what + ": launch_group vs one launch per tensor")
        assert_same_bytes(
            g[1:], convert_on_backend(conversion, g[0], "torch"), what + ": launch_group vs the torch path"
        )
    poisoned = list(sources)
    nan = poisoned[-1].clone()
    nan[tuple(d // 2 for d in nan.shape)] = float("nan")
    poisoned[-1] = nan
    conversion.launch_group(allocated(poisoned), grouped_flag)
    assert int(grouped_flag.item()) != 0, f"{conversion.name}: launch_group missed a NaN in its last member"


def record_calls(owner: Any, *names: str, patch: Callable[[Any, str, Any], None] = setattr) -> dict[str, list[int]]:
    """Make each ``owner.<name>`` (a plugin's kernel launchers) record its calls, then run as
    before: ``{name: [len(first argument) or 1, ...]}`` (a grouped launcher's first argument is its
    calls). ``patch``: pytest's ``monkeypatch.setattr``, which undoes it after the test."""
    seen: dict[str, list[int]] = {name: [] for name in names}

    def recording(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else None
            seen[name].append(len(first) if isinstance(first, Sequence) else 1)
            return original(*args, **kwargs)

        return call

    for name in names:
        patch(owner, name, recording(name, getattr(owner, name)))
    return seen


def assert_same_bytes(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], what: str) -> None:
    """Every buffer of ``got`` has the bytes of the same buffer of ``want``; the error names ``what``,
    the output's index and how many bytes differ."""
    assert len(got) == len(want), f"{what}: {len(got)} buffers, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        bg, bw = as_bytes(g), as_bytes(w)
        assert bg.shape == bw.shape, f"{what}: output {i} has {bg.numel()} bytes, expected {bw.numel()}"
        differing = int((bg != bw).sum())
        assert differing == 0, f"{what}: output {i}: {differing} of {bw.numel()} bytes differ"


# --------------------------------------------------------------------------- DTensor worlds on gloo

#: What a world's body records per case: ``"ok"`` or the traceback (:func:`record`), or any JSON value.
WorldResults = dict[str, object]


def dtensor_placements(spec: str | Sequence[str]) -> list:
    """``"S1"`` or ``("S0", "R")`` (one per mesh dim) as DTensor placements: ``Shard(1)`` / ``Replicate()``."""
    from torch.distributed.tensor import Replicate, Shard

    specs = [spec] if isinstance(spec, str) else list(spec)
    return [Replicate() if p == "R" else Shard(int(p[1:])) for p in specs]


def local_bytes(ref: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's bytes of the unsharded ``ref`` cut as the DTensor ``like`` is (DTensor's own slicing,
    ``src_data_rank=None``: no communication), an expectation independent of the sharded code."""
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = like.device_mesh, like.placements  # type: ignore[attr-defined]
    return as_bytes(distribute_tensor(ref, mesh, placements, src_data_rank=None).to_local())


def assert_sharded_outputs(
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    placements: Sequence[Sequence[object]],
    what: str,
    gathered: bool = False,
) -> None:
    """Each DTensor output of ``got`` has the shape, dtype and ``placements[i]`` expected, and this
    rank's bytes of the unsharded ``want``; ``gathered``: its gathered whole too (one collective per
    output, so only for dtypes gloo can gather)."""
    from torch.distributed.tensor import DTensor

    assert len(got) == len(want) == len(placements), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert isinstance(g, DTensor), f"{what}: output {i} is a {type(g).__name__}, not a DTensor"
        assert tuple(g.shape) == tuple(w.shape) and g.dtype == w.dtype, (what, i, g.shape, g.dtype)
        assert list(g.placements) == list(placements[i]), (what, i, g.placements)
        assert torch.equal(as_bytes(g.to_local()), local_bytes(w, g)), f"{what}: output {i}: this rank's bytes differ"
        if gathered:
            assert torch.equal(as_bytes(g.full_tensor()), as_bytes(w)), f"{what}: output {i}: gathered bytes differ"


def record(results: WorldResults, key: str, fn: Callable[..., object], *args: object) -> None:
    """Run ``fn(*args)``; ``results[key]`` is ``"ok"`` or its traceback, so one case's failure leaves
    the world running the rest and reaches the test that names the case.

    pytest's ``fail`` and ``raises`` failures are BaseExceptions, so everything but an interrupt
    or an exit is recorded.
    """
    try:
        fn(*args)
        results[key] = "ok"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        results[key] = traceback.format_exc()


def _world_worker(
    rank: int, world: int, body: Callable[[int, int, WorldResults], None], store: str, result_dir: str
) -> None:
    import torch.distributed as dist

    from . import load_registry

    torch.set_num_threads(1)  # the ranks share the machine's cores
    load_registry()
    results: WorldResults = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        try:
            body(rank, world, results)
        finally:
            dist.destroy_process_group()
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


def run_gloo_world(
    body: Callable[[int, int, WorldResults], None], world: int, deadline_s: float = 240
) -> list[WorldResults]:
    """Run ``body(rank, world, results)`` on ``world`` forked CPU processes in one gloo process group;
    return each rank's ``results`` (JSON round-tripped), rank by rank.

    One world runs every case of a test file (starting processes costs seconds), and each case is its
    own test reading :func:`world_failures`. Fork: the children reuse the parent's imported torch
    and DTensor modules (import them at module level, before the fixture runs). Raises
    ``AssertionError`` when the world passes ``deadline_s`` (its processes are killed) or when a
    rank failed outside :func:`record` (``results["error"]``).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _world_worker,
            args=(world, body, os.path.join(tmp, "store"), tmp),
            nprocs=world,
            start_method="fork",
            join=False,
        )
        deadline = time.monotonic() + deadline_s
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise AssertionError(f"the {world}-process gloo world did not finish within {deadline_s} s")
        out = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                out.append(json.load(f))
    for rank, res in enumerate(out):
        assert "error" not in res, f"rank {rank}: {res['error']}"
    return out


def world_failures(results: Sequence[WorldResults], key: str) -> str:
    """The ranks on which case ``key`` was not ``"ok"``, with their tracebacks ("" when none)."""
    return "\n".join(
        f"rank {r}: {res.get(key, 'did not run')}" for r, res in enumerate(results) if res.get(key) != "ok"
    )


# --------------------------------------------------------------------------- checks


def check_fields(conversion: Conversion, shapes: Sequence[Shape] | None = None) -> None:
    """The declared fields agree with one another, and every output shape function answers.

    ``shapes``: the sources to ask about (default ``DEFAULT_SHAPES``); a format that refuses some
    shapes (MX needs K % 32 == 0) passes the shapes it accepts.
    """
    name = conversion.name
    if conversion.requires_scale:
        _expect(
            isinstance(conversion.scale_name, str) and bool(conversion.scale_name),
            name,
            "fields",
            f"requires_scale=True but scale_name is {conversion.scale_name!r}",
        )
    for shape in DEFAULT_SHAPES if shapes is None else shapes:
        if conversion.src_ndims is not None and len(shape) not in conversion.src_ndims:
            continue
        if not conversion.declares_outputs:
            got = conversion.scale_shape(shape) if conversion.requires_scale else None
            _expect(
                (got is not None) == conversion.requires_scale,
                name,
                "fields",
                f"scale_shape({shape}) is {got!r} but requires_scale is {conversion.requires_scale}",
            )
        for output in conversion.outputs:
            got_shape = output.shape(shape)
            _expect(
                isinstance(got_shape, (tuple, list, torch.Size))
                and all(isinstance(d, int) and d >= 0 for d in got_shape),
                name,
                "fields",
                f"output {output.name!r}: shape({shape}) is {got_shape!r}, not a tuple of sizes",
            )


def check_tags(conversion: Conversion) -> None:
    """``tags`` are plain JSON, equal to compile_target/compile_metadata, and pass ``accepts``."""
    name = conversion.name
    tags = conversion.tags
    try:
        text = json.dumps(tags, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{name}: tags: {tags!r} are not JSON-serialisable: {exc}") from None
    _expect(json.loads(text) == tags, name, "tags", f"tags change in a JSON round trip: {tags!r} -> {text}")
    _expect(set(tags) == {"compile_target", "compile_metadata"}, name, "tags", f"unexpected keys {sorted(tags)}")
    _expect(
        tags["compile_target"] == conversion.compile_target,
        name,
        "tags",
        f"tags['compile_target'] {tags['compile_target']!r} != compile_target {conversion.compile_target!r}",
    )
    metadata = json.loads(json.dumps(_plain(conversion.compile_metadata)))
    _expect(
        tags["compile_metadata"] == metadata,
        name,
        "tags",
        f"tags['compile_metadata'] {tags['compile_metadata']!r} != compile_metadata {metadata!r}",
    )
    _expect(
        accepts(tags, [conversion.compile_target], tags["compile_metadata"]),
        name,
        "tags",
        "a receiver filtering on the conversion's own compile_target and metadata refuses its tags",
    )
    _expect(
        not accepts(tags, [conversion.compile_target + "-other"]),
        name,
        "tags",
        "a receiver filtering on another compile_target accepts the tags",
    )
    tags["compile_metadata"]["__kit_probe__"] = 1
    _expect(
        "__kit_probe__" not in conversion.tags["compile_metadata"],
        name,
        "tags",
        "changing the returned tags changed the conversion's own metadata",
    )


def check_allocate(conversion: Conversion, shapes: Sequence[Shape], device: torch.device) -> None:
    """``allocate`` gives buffers of the declared shapes, dtypes and device."""
    for shape in shapes:
        buffers = conversion.allocate(shape, device)
        where = f"allocate({shape})"
        tensors = _tensors(conversion, buffers)
        if not conversion.declares_outputs:
            scale = buffers[1]
            _expect(
                len(buffers) == 2, conversion.name, where, f"returned {len(buffers)} buffers, expected (out, scale)"
            )
            if conversion.requires_scale:
                _expect(scale is not None, conversion.name, where, "returned no scale buffer")
            else:
                _expect(
                    scale is None, conversion.name, where, f"returned a scale buffer {scale!r} for a scale-less format"
                )
        _expect(
            len(tensors) == len(conversion.outputs),
            conversion.name,
            where,
            f"returned {len(tensors)} buffers for {len(conversion.outputs)} outputs",
        )
        for output, want, buf in zip(conversion.outputs, conversion.output_shapes(shape), tensors, strict=False):
            _expect_buffer(conversion, where, _label(conversion, output.name), buf, want, output.dtype, device)


def check_agreement(conversion: Conversion, shapes: Sequence[Shape], device: torch.device, seed: int = 0) -> None:
    """``allocate`` + ``fn``, ``convert`` and a repeated ``fn`` write the same bytes; src untouched."""
    for i, shape in enumerate(shapes):
        src = random_source(shape, torch.bfloat16, device, seed + i)
        before = src.clone()
        buffers = conversion.allocate(shape, device)
        fn: Callable[..., object] = conversion.fn
        result = fn(src, *buffers)
        where = f"agreement {shape}"
        _expect(result is None, conversion.name, where, f"fn returned {type(result).__name__}; it must return None")
        _expect(torch.equal(src, before), conversion.name, where, "fn modified its source tensor")
        again = conversion.convert(src)
        _expect_same_bytes(conversion, where + ": convert() vs allocate()+fn", buffers, again)
        conversion.fn(src, *again)
        _expect_same_bytes(conversion, where + ": second fn call", buffers, again)


def check_writes_every_element(
    conversion: Conversion, shapes: Sequence[Shape], device: torch.device, seed: int = 0
) -> None:
    """Every element of every output is written: poisoned buffers keep no poison."""
    for i, shape in enumerate(shapes):
        src = random_source(shape, torch.bfloat16, device, seed + i)
        results = []
        for byte in (NAN_POISON, OTHER_POISON):
            buffers = conversion.allocate(shape, device)
            for buf in _tensors(conversion, buffers):
                poison(buf, byte)
            conversion.fn(src, *buffers)
            results.append(buffers)
        where = f"writes_every_element {shape}"
        for output, buf in zip(conversion.outputs, _tensors(conversion, results[0]), strict=True):
            if buf.dtype.is_floating_point:
                nan = torch.isnan(buf.float())
                if bool(nan.any()):
                    index = tuple(int(v) for v in nan.nonzero()[0])
                    raise AssertionError(
                        f"{conversion.name}: {where}: {_label(conversion, output.name)} holds NaN at {index} "
                        f"({int(nan.sum())} of {nan.numel()} elements) after a buffer poisoned with NaN: "
                        "element not written"
                    )
        _expect_same_bytes(conversion, where + ": buffers poisoned with two patterns", results[0], results[1])


def check_non_contiguous(conversion: Conversion, shapes: Sequence[Shape], device: torch.device, seed: int = 0) -> None:
    """Transposed, sliced and permuted sources give the bytes of their contiguous copy."""
    for i, shape in enumerate(shapes):
        base = random_source(shape, torch.bfloat16, device, seed + i)
        views = {
            "transposed": base.transpose(-1, -2).contiguous().transpose(-1, -2),
            "sliced": _widen(base)[..., 1::2],
        }
        if base.dim() == 3:
            views["experts-last"] = base.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        want = conversion.convert(base.contiguous())
        for kind, view in views.items():
            if view.is_contiguous():  # e.g. a single column: nothing non-contiguous to test
                continue
            got = conversion.convert(view)
            _expect_same_bytes(conversion, f"non_contiguous {shape} ({kind}, strides {view.stride()})", want, got)


def check_source_dtypes(
    conversion: Conversion, shapes: Sequence[Shape], device: torch.device, bound: ErrorBound, seed: int = 0
) -> None:
    """bf16, fp16 and fp32 sources holding the same values give the same bytes."""
    dtypes = [d for d in KIT_SOURCE_DTYPES if d in conversion.src_dtypes]
    _expect(bool(dtypes), conversion.name, "source_dtypes", f"accepts none of {KIT_SOURCE_DTYPES}")
    for i, shape in enumerate(shapes):
        reference = random_source(shape, torch.float32, device, seed + i)
        results = {}
        for dtype in dtypes:
            src = reference.to(dtype)
            assert torch.equal(src.float(), reference), "kit bug: source values not exact in " + str(dtype)
            results[dtype] = conversion.convert(src)
        first = dtypes[0]
        for dtype in dtypes[1:]:
            _expect_same_bytes(
                conversion, f"source_dtypes {shape}: {first} vs {dtype} sources", results[first], results[dtype]
            )
        _expect_round_trip(conversion, f"source_dtypes {shape}", reference, results[first], bound)


def check_zeros(conversion: Conversion, shapes: Sequence[Shape], device: torch.device) -> None:
    """All-zero sources give finite bytes that dequantize to exactly zero."""
    for shape in shapes:
        for dtype in [d for d in KIT_SOURCE_DTYPES if d in conversion.src_dtypes]:
            buffers = conversion.convert(torch.zeros(shape, dtype=dtype, device=device))
            where = f"zeros {shape} {dtype}"
            _expect_finite(conversion, where, buffers)
            back = conversion.dequantize(*buffers)
            _expect(
                bool((back == 0).all()),
                conversion.name,
                where,
                f"dequantize gives {int((back != 0).sum())} non-zero elements, e.g. {back[back != 0][:3].tolist()}",
            )


def huge_value(dtype: torch.dtype) -> float:
    """The largest magnitude a bf16 trainer holds, or the source dtype's own max if smaller."""
    return min(torch.finfo(dtype).max, torch.finfo(torch.bfloat16).max)


def check_huge_values(
    conversion: Conversion, shapes: Sequence[Shape], device: torch.device, bound: ErrorBound, seed: int = 0
) -> None:
    """The largest finite source values saturate: finite output within the format's range.

    Scaled formats must also keep the round-trip bound (the scale absorbs the magnitude).
    """
    for i, shape in enumerate(shapes):
        for dtype in [d for d in KIT_SOURCE_DTYPES if d in conversion.src_dtypes]:
            big = huge_value(dtype)
            x = random_source(shape, torch.float32, "cpu", seed + i)
            x[..., 0, :] = big
            x[..., 0, ::2] = -big
            x[..., :, 0] = big
            src = x.to(dtype).to(device)
            where = f"huge_values {shape} {dtype} (|x| up to {big:.4g})"
            buffers = conversion.convert(src)
            out = buffers[0]
            _expect_finite(conversion, where, buffers)
            if out.dtype.is_floating_point:
                limit = torch.finfo(out.dtype).max
                worst = float(out.float().abs().max())
                _expect(worst <= limit, conversion.name, where, f"|out| reaches {worst}, beyond the format max {limit}")
            back = conversion.dequantize(*buffers)
            _expect(bool(torch.isfinite(back).all()), conversion.name, where, "dequantize gives non-finite values")
            if conversion.requires_scale:
                _expect_round_trip(conversion, where, src.float(), buffers, bound)


def check_round_trip(
    conversion: Conversion, shapes: Sequence[Shape], device: torch.device, bound: ErrorBound, seed: int = 0
) -> None:
    """``dequantize(convert(x))`` is within the format's error bound of ``x``, element by element."""
    for i, shape in enumerate(shapes):
        for dtype in [d for d in KIT_SOURCE_DTYPES if d in conversion.src_dtypes]:
            src = random_source(shape, dtype, device, seed + 100 + i)
            buffers = conversion.convert(src)
            back = conversion.dequantize(*buffers)
            where = f"round_trip {shape} {dtype}"
            _expect(
                back.dtype == torch.float32 and tuple(back.shape) == tuple(shape),
                conversion.name,
                where,
                f"dequantize returned {back.dtype} {tuple(back.shape)}; expected float32 {tuple(shape)}",
            )
            _expect_round_trip(conversion, where, src.float(), buffers, bound)


def check_refusals(conversion: Conversion, shape: Shape, device: torch.device, seed: int = 0) -> None:
    """Bad buffers and sources raise a ConversionCoreError that is a ValueError/TypeError,
    and leave the buffers untouched."""
    if conversion.declares_outputs:
        _check_refusals_of_outputs(conversion, shape, device, seed)
        return
    name = conversion.name
    src = random_source(shape, torch.bfloat16, device, seed)
    out_shape = tuple(conversion.out_shape(shape))
    good_out, good_scale = conversion.allocate(shape, device)
    wrong_dtype = torch.float32 if conversion.dst_dtype != torch.float32 else torch.bfloat16
    cases: list[tuple[str, Callable[[], object], list[torch.Tensor]]] = []

    def call(s: object, o: object, sc: object) -> Callable[[], object]:
        return lambda: conversion.fn(s, o, sc)  # type: ignore[arg-type]

    bad = torch.empty(out_shape, dtype=wrong_dtype, device=device)
    cases.append((f"out of dtype {wrong_dtype}", call(src, bad, good_scale), [bad]))
    bad = torch.empty((*out_shape[:-1], out_shape[-1] + 1), dtype=conversion.dst_dtype, device=device)
    cases.append(("out one column too wide", call(src, bad, good_scale), [bad]))
    if len(out_shape) >= 2 and out_shape[-1] > 1:
        bad = torch.empty((*out_shape[:-2], out_shape[-1], out_shape[-2]), dtype=conversion.dst_dtype, device=device)
        bad = bad.transpose(-1, -2)
        cases.append(("non-contiguous out", call(src, bad, good_scale), [bad]))
    cases.append(("out=None", call(src, None, good_scale), []))
    if device.type != "cpu":
        bad = torch.empty(out_shape, dtype=conversion.dst_dtype)
        cases.append(("out on the CPU for a source on " + str(device), call(src, bad, good_scale), [bad]))
    if conversion.requires_scale:
        scale_shape = conversion.expected_scale_shape(shape)
        assert scale_shape is not None
        cases.append(("scale_out=None (missing scale)", call(src, good_out, None), [good_out]))
        wrong_scale = torch.float64 if conversion.scale_dtype != torch.float64 else torch.float32
        bad = torch.empty(scale_shape, dtype=wrong_scale, device=device)
        cases.append((f"scale_out of dtype {wrong_scale}", call(src, good_out, bad), [good_out, bad]))
        bad = torch.empty((*scale_shape, 2), dtype=conversion.scale_dtype, device=device)
        cases.append((f"scale_out of shape {tuple(bad.shape)}", call(src, good_out, bad), [good_out, bad]))
    else:
        bad = torch.empty(1, dtype=torch.float32, device=device)
        cases.append(("a scale_out for a scale-less format", call(src, good_out, bad), [good_out]))
    cases += _source_refusals(conversion, src, device, lambda s: call(s, good_out, good_scale), [good_out])
    _run_refusals(name, cases)


def _source_refusals(
    conversion: Conversion,
    src: torch.Tensor,
    device: torch.device,
    call: Callable[[torch.Tensor], Callable[[], object]],
    touched: list[torch.Tensor],
) -> list[tuple[str, Callable[[], object], list[torch.Tensor]]]:
    cases: list[tuple[str, Callable[[], object], list[torch.Tensor]]] = []
    for dtype in (torch.float64, torch.int32):
        if dtype not in conversion.src_dtypes:
            s = src.to(dtype)
            cases.append((f"src of dtype {dtype}", call(s), touched))
            cases.append((f"convert() of a {dtype} src", functools.partial(conversion.convert, s), []))
    if conversion.src_ndims is not None:
        for rank in (1, 2, 3, 4):
            if rank not in conversion.src_ndims:
                s = torch.ones((3,) * rank, dtype=torch.bfloat16, device=device)
                cases.append((f"{rank}-D src of shape {tuple(s.shape)}", functools.partial(conversion.convert, s), []))
    cases.append(("src that is not a tensor", lambda: conversion.convert([[1.0]]), []))  # type: ignore[arg-type]
    return cases


def _check_refusals_of_outputs(conversion: Conversion, shape: Shape, device: torch.device, seed: int) -> None:
    """``check_refusals`` for a conversion that declares its outputs: each buffer wrong in turn."""
    src = random_source(shape, torch.bfloat16, device, seed)
    good = list(conversion.allocate(shape, device))
    cases: list[tuple[str, Callable[[], object], list[torch.Tensor]]] = []

    def call(s: object, buffers: Sequence[object]) -> Callable[[], object]:
        return lambda: conversion.fn(s, *buffers)  # type: ignore[arg-type]

    for i, (output, want) in enumerate(zip(conversion.outputs, conversion.output_shapes(shape), strict=True)):
        others = [b for j, b in enumerate(good) if j != i]

        def with_bad(bad: object, i: int = i) -> list[object]:
            return [bad if j == i else b for j, b in enumerate(good)]

        wrong = torch.float64 if output.dtype != torch.float64 else torch.float32
        bad = torch.empty(want, dtype=wrong, device=device)
        cases.append((f"output {output.name!r} of dtype {wrong}", call(src, with_bad(bad)), [*others, bad]))
        bad = torch.empty((*want, 2), dtype=output.dtype, device=device)
        cases.append((f"output {output.name!r} of shape {tuple(bad.shape)}", call(src, with_bad(bad)), [*others, bad]))
        if len(want) >= 2 and want[-1] > 1 and want[-2] > 1:
            bad = torch.empty((*want[:-2], want[-1], want[-2]), dtype=output.dtype, device=device).transpose(-1, -2)
            cases.append((f"non-contiguous output {output.name!r}", call(src, with_bad(bad)), [*others, bad]))
        cases.append((f"output {output.name!r}=None", call(src, with_bad(None)), others))
        if device.type != "cpu":
            bad = torch.empty(want, dtype=output.dtype)
            cases.append((f"output {output.name!r} on the CPU", call(src, with_bad(bad)), [*others, bad]))
    cases.append(("one buffer too few", call(src, good[:-1]), good[:-1]))
    extra = torch.empty(1, dtype=torch.float32, device=device)
    cases.append(("one buffer too many", call(src, [*good, extra]), good))
    cases += _source_refusals(conversion, src, device, lambda s: call(s, good), good)
    _run_refusals(conversion.name, cases)


def _run_refusals(name: str, cases: list[tuple[str, Callable[[], object], list[torch.Tensor]]]) -> None:
    for what, run, buffers in cases:
        for b in buffers:
            poison(b)
        snapshot = [as_bytes(b) for b in buffers]
        _expect_refused(name, f"refusals: {what}", run)
        for b, before in zip(buffers, snapshot, strict=True):
            _expect(torch.equal(as_bytes(b), before), name, f"refusals: {what}", "a refused call wrote into a buffer")


def check_nonfinite_refused(
    conversion: Conversion, shapes: Sequence[Shape], device: torch.device, seed: int = 0
) -> None:
    """NaN, +Inf or -Inf anywhere in the source is refused with an error naming the shape."""
    for i, shape in enumerate(shapes):
        for bad in (float("nan"), float("inf"), float("-inf")):
            x = random_source(shape, torch.float32, "cpu", seed + i)
            flat = x.view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=torch.Generator().manual_seed(seed + i)))] = bad
            src = x.to(torch.bfloat16).to(device)
            where = f"nonfinite_refused {shape} ({bad})"
            exc = _expect_refused(conversion.name, where, functools.partial(conversion.convert, src))
            _expect(
                str(tuple(shape)) in str(exc),
                conversion.name,
                where,
                f"the error does not name the source shape {tuple(shape)}: {exc}",
            )


def check_device_agreement(
    conversion: Conversion, shapes: Sequence[Shape], device: torch.device, seed: int = 0
) -> None:
    """The bytes written on ``device`` equal the bytes written on the CPU."""
    for i, shape in enumerate(shapes):
        src = random_source(shape, torch.bfloat16, "cpu", seed + i)
        want = conversion.convert(src)
        got = conversion.convert(src.to(device))
        _expect_same_bytes(conversion, f"device_agreement {shape} cpu vs {device}", want, got)


# --------------------------------------------------------------------------- helpers


def _shapes_for(conversion: Conversion, shapes: Sequence[Sequence[int]] | None) -> list[Shape]:
    chosen = [tuple(int(s) for s in shape) for shape in (shapes if shapes is not None else DEFAULT_SHAPES)]
    if conversion.src_ndims is not None:
        chosen = [s for s in chosen if len(s) in conversion.src_ndims]
    if not chosen or any(len(s) < 2 for s in chosen):
        raise ValueError(
            f"conformance kit: need source shapes of rank >= 2 that {conversion.name!r} accepts "
            f"(src_ndims={conversion.src_ndims}); got {shapes!r}"
        )
    return chosen


def _bound_for(conversion: Conversion, error_bound: ErrorBound | None) -> ErrorBound:
    if error_bound is not None:
        return error_bound
    try:
        return DEFAULT_BOUNDS[conversion.dst_dtype]
    except KeyError:
        raise ValueError(
            f"conformance kit: no default error bound for dst_dtype {conversion.dst_dtype} of "
            f"{conversion.name!r}; pass error_bound=ErrorBound(relative=..., scale_units=...)"
        ) from None


def _plain(value: object) -> object:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}  # type: ignore[attr-defined]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _widen(t: torch.Tensor) -> torch.Tensor:
    """A tensor twice as wide whose odd columns are ``t`` (so ``[..., 1::2]`` is a strided view of t)."""
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    wide[..., 1::2] = t
    return wide


def _expect(ok: bool, name: str, where: str, message: str) -> None:
    if not ok:
        raise AssertionError(f"{name}: {where}: {message}")


def _expect_buffer(
    conversion: Conversion, where: str, what: str, buf: object, shape: Shape, dtype: torch.dtype, device: torch.device
) -> None:
    ok = (
        isinstance(buf, torch.Tensor)
        and tuple(buf.shape) == shape
        and buf.dtype == dtype
        and buf.device.type == device.type
        and buf.is_contiguous()
    )
    got = f"{tuple(buf.shape)} {buf.dtype} {buf.device}" if isinstance(buf, torch.Tensor) else repr(buf)
    _expect(ok, conversion.name, where, f"{what} is {got}; expected contiguous {shape} {dtype} on {device}")


def _tensors(conversion: Conversion, buffers: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """The real output tensors of a call's buffers (a scale-less short form's None dropped)."""
    return [b for b in buffers if b is not None] if not conversion.declares_outputs else list(buffers)  # type: ignore[arg-type]


def _label(conversion: Conversion, output: str) -> str:
    """How the kit names an output: ``out``/``scale`` in the one-scale form, else its declared name."""
    if conversion.declares_outputs:
        return f"output {output!r}"
    return "out" if output == conversion.outputs[0].name else "scale"


def _expect_same_bytes(
    conversion: Conversion,
    where: str,
    a: Sequence[torch.Tensor | None],
    b: Sequence[torch.Tensor | None],
) -> None:
    names = (
        [_label(conversion, o.name) for o in conversion.outputs] if conversion.declares_outputs else ["out", "scale"]
    )
    _expect(len(a) == len(b), conversion.name, where, f"{len(a)} buffers in one result, {len(b)} in the other")
    for what, x, y in zip(names, a, b, strict=False):
        if x is None or y is None:
            _expect(x is None and y is None, conversion.name, where, f"{what} present in one result only")
            continue
        bx, by = as_bytes(x), as_bytes(y)
        if not torch.equal(bx, by):
            diff = (bx != by).nonzero()
            first = int(diff[0]) // x.element_size()
            index = tuple(int(v) for v in torch.unravel_index(torch.tensor(first), x.shape))
            raise AssertionError(
                f"{conversion.name}: {where}: {what} bytes differ in {diff.numel()} of {bx.numel()} bytes, "
                f"first at element {index}: {x.reshape(-1)[first].item()!r} vs {y.reshape(-1)[first].item()!r}"
            )


def _expect_finite(conversion: Conversion, where: str, buffers: Sequence[torch.Tensor | None]) -> None:
    for output, buf in zip(conversion.outputs, _tensors(conversion, buffers), strict=False):
        if buf.dtype.is_floating_point:
            bad = ~torch.isfinite(buf.float())
            what = _label(conversion, output.name)
            _expect(not bool(bad.any()), conversion.name, where, f"{what} holds {int(bad.sum())} non-finite elements")


def _expect_round_trip(
    conversion: Conversion,
    where: str,
    x: torch.Tensor,
    buffers: Sequence[torch.Tensor | None],
    bound: ErrorBound,
) -> None:
    back = conversion.dequantize(*buffers).double()
    s = (bound.element_scale or functools.partial(element_scale, conversion))(*buffers)
    allowed = bound.allowed(x, s)
    err = (back - x.double()).abs()
    over = err > allowed
    if bool(over.any()):
        index = tuple(int(v) for v in over.nonzero()[0])
        raise AssertionError(
            f"{conversion.name}: {where}: dequantize is outside the error bound at {int(over.sum())} of "
            f"{over.numel()} elements; first at {index}: x={x[index].item()!r}, "
            f"dequantized={back[index].item()!r}, element scale={s[index].item()!r}, "
            f"|error|={err[index].item()!r} > allowed {allowed[index].item()!r} ({bound})"
        )


def _expect_refused(name: str, where: str, run: Callable[[], object]) -> BaseException:
    try:
        run()
    except ConversionCoreError as exc:
        if not isinstance(exc, (ValueError, TypeError)):
            raise AssertionError(
                f"{name}: {where}: raised {type(exc).__name__}, a ConversionCoreError that is neither "
                "a ValueError nor a TypeError"
            ) from exc
        return exc
    except Exception as exc:
        raise AssertionError(
            f"{name}: {where}: raised {type(exc).__name__} ({exc}); expected a ConversionCoreError "
            "that is a ValueError or TypeError"
        ) from exc
    raise AssertionError(f"{name}: {where}: was accepted; expected a ConversionCoreError (ValueError/TypeError)")
