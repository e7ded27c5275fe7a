"""The Triton kernels under TRITON_INTERPRET=1 give the torch path's bytes (small shapes: the interpreter is slow).

Every variant of :func:`conversion_core_nvfp4.triton_kernels.launch_values` ("generic", "words",
"words_magic", "words_fastdiv", "words_recip", their fallbacks to div_rn too) is checked against
:func:`conversion_core_nvfp4.numerics.quantize_with_amax` on odd row counts, K = 32/48/96/2064,
3-D stacks (merged and split experts), a transposed source and fp16/fp32 sources (which only the
generic kernel takes); the shared e2m1 code helpers against
:func:`conversion_core.formats.fp4.e2m1_codes` on every tie, its neighbours and every bf16 value;
the amax pass against :func:`.numerics.tensor_amax`; NaN/Inf raise the device flag in every variant.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from conversion_core_nvfp4 import numerics, triton_kernels  # noqa: E402

from conversion_core.formats import fp4  # noqa: E402
from conversion_core.formats.fp4_triton import _e2m1_code, bf16_words  # noqa: E402

TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]


def _source(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 4, shape, generator=g).float())
    flat = x.reshape(-1, shape[-1])
    flat[0, :16] = 0.0
    flat[-1, -1] = 500.0
    if shape[-1] > 17:
        flat[0, 17] = -0.0
    if shape[-1] >= 48:  # a group whose amax is 6: the grid's ties land on the step's multiples
        flat[0, 32:48] = torch.tensor([*TIES, *(-t for t in TIES[:-1]), -0.0])
    return x.to(dtype)


def _expected(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    amax = numerics.tensor_amax(src)
    k = src.shape[-1]
    want_p = torch.empty(*src.shape[:-1], k // 2, dtype=torch.uint8)
    want_s = torch.empty(*src.shape[:-1], k // 16, dtype=torch.float8_e4m3fn)
    gs = numerics.quantize_with_amax(src, amax, want_p, want_s, "nvfp4")
    return amax, want_p, want_s, gs


def _variants(src: torch.Tensor) -> list[str]:
    x = src if src.dim() == 3 else src.unsqueeze(0)
    return list(triton_kernels.VARIANTS) if bf16_words(x) is not None else ["generic"]


def _split_experts(shape: tuple[int, int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A stack whose experts do not merge into rows (one spare row per expert), K contiguous."""
    e, n, k = shape
    return _source((e, n + 1, k), dtype, seed)[:, :n, :]


def _with_tiny(x: torch.Tensor) -> torch.Tensor:
    x[1, 3] = 1e-39  # a bf16 subnormal
    x[2, 40] = -3e-25
    return x


CASES = [
    ("8x128 bf16", lambda: _source((8, 128), torch.bfloat16, 1)),
    ("9x48 bf16 (odd rows, K not a tile)", lambda: _source((9, 48), torch.bfloat16, 2)),
    ("5x32 bf16", lambda: _source((5, 32), torch.bfloat16, 3)),
    ("7x96 bf16", lambda: _source((7, 96), torch.bfloat16, 4)),
    ("3x2064 bf16", lambda: _source((3, 2064), torch.bfloat16, 5)),
    ("3x5x96 bf16 stack", lambda: _source((3, 5, 96), torch.bfloat16, 6)),
    ("3x5x48 bf16 split experts", lambda: _split_experts((3, 5, 48), torch.bfloat16, 7)),
    ("row-strided bf16", lambda: _source((6, 96), torch.bfloat16, 8)[:, 32:]),
    ("bf16 with subnormals (fastdiv falls back)", lambda: _with_tiny(_source((4, 64), torch.bfloat16, 20))),
    (
        "bf16 of amax 1e-30 (steps out of the fastdiv range)",
        lambda: (_source((4, 64), torch.float32, 21) * 1e-33).bfloat16(),
    ),
    ("3x5x32 fp16 stack", lambda: _source((3, 5, 32), torch.float16, 9)),
    ("16x160 fp32 transposed", lambda: _source((160, 16), torch.float32, 10).t()),
    ("12x64 bf16 transposed", lambda: _source((64, 12), torch.bfloat16, 11).t()),
    ("9x48 fp32", lambda: _source((9, 48), torch.float32, 12)),
]


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_every_variant_equals_torch_path(make) -> None:
    src = make()
    amax, want_p, want_s, gs = _expected(src)
    variants = _variants(src)
    if src.dtype == torch.bfloat16 and src.stride(-1) == 1:
        assert "words" in variants  # the fast path applies to every bf16 case with K contiguous here
    for variant in variants:
        got_p, got_s = torch.full_like(want_p, 0xFF), torch.empty_like(want_s)
        got_gs = triton_kernels.quantize_with_amax(src, amax, got_p, got_s, "nvfp4", variant=variant)
        assert torch.equal(got_p, want_p), variant
        assert torch.equal(got_s.view(torch.uint8), want_s.view(torch.uint8)), variant
        assert torch.equal(got_gs, gs), variant


@pytest.mark.parametrize(("block_r", "block_c", "num_warps"), [(1, 16, 1), (4, 64, 2), (16, 512, 8)])
def test_words_tiles(block_r: int, block_c: int, num_warps: int) -> None:
    src = _source((2, 7, 96), torch.bfloat16, 13)
    amax, want_p, want_s, _ = _expected(src)
    gs = numerics.global_scale(amax)
    for variant in ("words", "words_magic", "words_fastdiv", "words_recip"):
        p, s = torch.full_like(want_p, 0xFF), torch.empty_like(want_s)
        flag = torch.zeros(1, dtype=torch.int32)
        ran = triton_kernels.launch_values(
            src, gs, p, s, flag, variant=variant, block_r=block_r, block_c=block_c, num_warps=num_warps
        )
        assert ran == variant and int(flag) == 0
        assert torch.equal(p, want_p) and torch.equal(s.view(torch.uint8), want_s.view(torch.uint8))


def test_auto_picks_words_for_bf16_and_generic_otherwise() -> None:
    flag = torch.zeros(1, dtype=torch.int32)
    gs = torch.ones(1)
    for src, want in (
        (torch.ones(4, 32, dtype=torch.bfloat16), triton_kernels.VARIANT),
        (torch.ones(4, 32), "generic"),
    ):
        p, s = torch.empty(4, 16, dtype=torch.uint8), torch.empty(4, 2, dtype=torch.float8_e4m3fn)
        assert triton_kernels.launch_values(src, gs, p, s, flag) == want
    with pytest.raises(ValueError, match="needs a bf16 source"):
        triton_kernels.launch_values(torch.ones(4, 32), gs, p, s, flag, variant="words")


@pytest.mark.parametrize("variant", triton_kernels.VARIANTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_launch_flags_non_finite(variant: str, bad: float) -> None:
    src = _source((4, 32), torch.bfloat16, seed=1)
    src[2, 3] = bad
    p = torch.empty(4, 16, dtype=torch.uint8)
    s = torch.empty(4, 2, dtype=torch.float8_e4m3fn)
    g = torch.empty(1)
    flag = torch.zeros(1, dtype=torch.int32)
    triton_kernels.launch(src, numerics.tensor_amax(src), p, s, g, flag, multiplier=False, variant=variant)
    assert int(flag.item()) > 0
    # the kernel itself flags it, not only the amax check in launch:
    flag.zero_()
    triton_kernels.launch_values(src, torch.ones(1), p, s, flag, variant=variant)
    assert int(flag.item()) > 0


@triton.jit
def _code_kernel(v_ptr, out_ptr, limit, n, MAGIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, _e2m1_code(v, limit, MAGIC).to(tl.uint8), mask=offs < n)


def _code_inputs() -> torch.Tensor:
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, *TIES, 5.5, 7.0, 1e30, 1e-30, 1e-45])
    near = torch.cat([torch.nextafter(grid, torch.tensor(-1.0)), torch.nextafter(grid, torch.tensor(100.0))])
    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[torch.isfinite(bf16)]
    g = torch.Generator().manual_seed(0)
    rnd = (torch.rand(20000, generator=g) * 14 - 7).float()
    v = torch.cat([grid, near, bf16, rnd, torch.tensor([-0.0])])
    return torch.cat([v, -v])


@pytest.mark.parametrize("limit", [6.0, 3.0])
@pytest.mark.parametrize("magic", [False, True])
def test_e2m1_code_helpers_equal_torch_codes(magic: bool, limit: float) -> None:
    v = _code_inputs()
    out = torch.empty(v.shape, dtype=torch.uint8)
    block = 4096
    _code_kernel[(triton.cdiv(v.numel(), block),)](v, out, limit, v.numel(), MAGIC=magic, BLOCK=block)
    want = fp4.e2m1_codes(v.clamp(-limit, limit))
    assert torch.equal(out, want)


@pytest.mark.parametrize(
    "src",
    [
        _source((9, 48), torch.bfloat16, 14),
        _source((3, 5, 2064), torch.bfloat16, 15),
        -_source((3, 64), torch.bfloat16, 16).abs(),
        torch.zeros(2, 32, dtype=torch.bfloat16),
        _source((9, 48), torch.float32, 17),
        _source((64, 12), torch.bfloat16, 18).t(),
        _source((1, 1 + 9 * 48), torch.bfloat16, 19)[0, 1:].view(9, 48),  # contiguous, no int32 view
    ],
    ids=["bf16", "bf16-stack", "negative", "zeros", "fp32-torch", "transposed-torch", "odd-offset-torch"],
)
def test_tensor_amax_equals_torch(src: torch.Tensor) -> None:
    want = numerics.tensor_amax(src)
    for block, programs, unroll in ((None, None, None), (8, 3, 1), (64, 1, 1), (8, 2, 3), (16, 5, 2)):
        assert torch.equal(triton_kernels.tensor_amax(src, block=block, programs=programs, unroll=unroll), want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tensor_amax_keeps_non_finite(bad: float) -> None:
    src = _source((9, 48), torch.bfloat16, 19)
    src[4, 7] = bad
    got = triton_kernels.tensor_amax(src, block=16, programs=2)
    assert torch.isnan(got).all() if bad != bad else torch.isinf(got).all()


def _recip_run(src: torch.Tensor, **tile: int) -> tuple[int, int]:
    """words_recip on ``src`` against the torch path: asserts the bytes; returns (programs, programs not dividing)."""
    amax, want_p, want_s, _ = _expected(src)
    gs = numerics.global_scale(amax)
    p, s = torch.full_like(want_p, 0xFF), torch.empty_like(want_s)
    flag, count = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    assert (
        triton_kernels.launch_values(src, gs, p, s, flag, variant="words_recip", fast_count=count, **tile)
        == "words_recip"
    )
    assert int(flag) == 0
    assert torch.equal(p, want_p) and torch.equal(s.view(torch.uint8), want_s.view(torch.uint8))
    x = src if src.dim() == 3 else src.unsqueeze(0)
    br = tile.get("block_r", triton_kernels.RECIP_BLOCK_R)
    groups = min(tile.get("block_c", 16 * triton_kernels.RECIP_GROUPS) // 16, triton.next_power_of_2(x.shape[-1] // 16))
    programs = triton.cdiv(x.shape[0] * x.shape[1], br) * triton.cdiv(x.shape[-1] // 16, groups)
    return programs, int(count)


def _smooth(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).bfloat16()


@pytest.mark.parametrize(
    ("make", "tile"),
    [
        (lambda: _smooth((33, 2064), 30, 1.37), {}),
        (lambda: _smooth((3, 17, 512), 31, 1.37e3), {}),
        (lambda: _smooth((48, 256), 32, 1.37e-3).t().contiguous(), {"block_r": 4, "block_c": 64, "num_warps": 1}),
        (lambda: _smooth((4, 9, 1024), 33)[:, 1:8, :], {"block_r": 8, "block_c": 256, "num_warps": 2}),
    ],
    ids=["randn-2064", "stack-1e3", "small-1e-3", "split-experts"],
)
def test_recip_products_path_runs_and_equals_torch(make, tile) -> None:
    """On smooth data most programs keep the products (no division), and their bytes are the torch path's.

    The scales are picked so that gs is not a short binary number: with gs = 576 (randn of scale 1)
    steps like s3 / gs = 1/2 or 1/3 put 0.2% of the elements on or next to an edge, and then
    nearly every program divides (still the same bytes: see the "gs=576" case).
    """
    programs, fast = _recip_run(make(), **tile)
    assert fast >= programs // 2, (fast, programs)


def test_recip_short_global_scale_divides_and_equals_torch() -> None:
    src = _smooth((33, 2064), 30)
    assert float(numerics.global_scale(numerics.tensor_amax(src))) == 576.0
    programs, fast = _recip_run(src)
    assert fast < programs


def test_recip_edges_divide_and_equal_torch() -> None:
    """Values on the grid's midpoints (ties) and next to them send their program to the division, bytes unchanged."""
    mids = torch.tensor(TIES[:-1])
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(9.0))])
    src = _smooth((8, 512), 34)
    row = torch.cat([near, -near, torch.tensor([6.0] * 11)])  # 53 values, the group with 6 has step 1
    src[3, : row.numel()] = row.bfloat16()
    src[3, 48:64] = torch.tensor([6.0, *TIES[:-1], *(-t for t in TIES[:-1]), 0.0]).bfloat16()
    programs, fast = _recip_run(src, block_r=2, block_c=128, num_warps=1)
    assert fast < programs


@pytest.mark.parametrize(
    ("scale", "expect_fast"),
    [(2.0**-100, False), (2.0**20, False), (1.37, True)],
    ids=["r-above-2**60", "step-above-2**16", "plain"],
)
def test_recip_range_guard(scale: float, expect_fast: bool) -> None:
    """Programs with a group whose r = gs/s3 leaves [2**-16, 2**60] divide (tiny tensors, steps above 2**16)."""
    programs, fast = _recip_run(_smooth((4, 256), 35, scale), block_r=4, block_c=256, num_warps=1)
    assert (fast == programs) == expect_fast, (fast, programs)
    assert expect_fast or fast == 0


@triton.jit
def _recip_index_kernel(a_ptr, r, idx_ptr, dist_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs, mask=offs < n)
    i, d = triton_kernels._recip_index(a, r)
    tl.store(idx_ptr + offs, i, mask=offs < n)
    tl.store(dist_ptr + offs, d, mask=offs < n)


@pytest.mark.parametrize("seed", [0, 1])
def test_recip_index_equals_division_codes(seed: int) -> None:
    """Every finite bf16 magnitude, several (s3, gs): unflagged indices are those of clamp(x / step, 6)."""
    a = (torch.arange(0, 0x7F80, dtype=torch.int32) << 16).view(torch.float32)
    e4m3 = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (float(e4m3[torch.randint(0, e4m3.numel(), (1,), generator=g)]), float(gs))
        for gs in (torch.rand(6, generator=g) * 30 - 15).exp2().bfloat16().float()
    ] + [(448.0, 6.0), (0.125, 1.0), (3.0, 2688.0)]
    block = 8192
    for s3, gs in pairs:
        step = torch.div(torch.tensor(s3), torch.tensor(gs))
        r = float(torch.div(torch.tensor(gs), torch.tensor(s3)))
        idx, dist = torch.empty(a.shape, dtype=torch.int32), torch.empty(a.shape, dtype=torch.int32)
        _recip_index_kernel[(triton.cdiv(a.numel(), block),)](a, r, idx, dist, a.numel(), BLOCK=block)
        want = (fp4.e2m1_codes(torch.div(a, step).clamp(max=6.0)) & 7).int()
        kept = dist > 2 * triton_kernels.RECIP_TOL
        assert torch.equal(idx[kept], want[kept]), (s3, gs)
        ties = (torch.div(a, step).unsqueeze(-1) == torch.tensor(TIES[:-1])).any(-1)
        assert not kept[ties].any(), (s3, gs)  # an exact tie is always flagged


def _launch_outputs(fn, src: torch.Tensor, amax: torch.Tensor, multiplier: bool, variant: str) -> tuple:
    k = src.shape[-1]
    p = torch.full((*src.shape[:-1], k // 2), 0xFF, dtype=torch.uint8)
    s = torch.empty((*src.shape[:-1], k // 16), dtype=torch.float8_e4m3fn)
    g, flag = torch.full((1,), -1.0), torch.zeros(1, dtype=torch.int32)
    fn(src, amax, p, s, g, flag, multiplier=multiplier, variant=variant)
    return p, s.view(torch.uint8), g, int(flag) > 0


def _with_nan(x: torch.Tensor) -> torch.Tensor:
    x[1, 3] = float("nan")
    return x


@pytest.mark.parametrize(
    "make",
    [
        lambda: _source((5, 64), torch.bfloat16, 40),
        lambda: _source((2, 3, 48), torch.bfloat16, 41),
        lambda: torch.zeros(3, 32, dtype=torch.bfloat16),
        lambda: (_source((4, 32), torch.float32, 42) * 1e-37).bfloat16(),
        lambda: (_source((4, 32), torch.float32, 43) * 1e35).bfloat16(),
        lambda: _with_nan(_source((4, 32), torch.bfloat16, 44)),
        lambda: _source((64, 12), torch.bfloat16, 45).t(),  # no words layout: launch_fused is launch
    ],
    ids=["bf16", "stack", "zeros", "tiny-amax", "huge-amax", "nan", "transposed"],
)
@pytest.mark.parametrize("multiplier", [False, True])
def test_launch_fused_equals_launch(make, multiplier: bool) -> None:
    """The kernel-side global scale gives launch's bytes, flag and global_out (divisor and multiplier)."""
    src = make()
    amax = numerics.tensor_amax(src)
    for variant in ("auto", "words_recip"):
        if variant != "auto" and bf16_words(src if src.dim() == 3 else src.unsqueeze(0)) is None:
            continue
        want = _launch_outputs(triton_kernels.launch, src, amax, multiplier, variant)
        got = _launch_outputs(triton_kernels.launch_fused, src, amax, multiplier, variant)
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g, variant


@triton.jit
def _gs_kernel(amax_ptr, flag_ptr, out_ptr, n):
    i = tl.program_id(0)
    g = triton_kernels._global_scale(amax_ptr + i, flag_ptr + i, out_ptr + i, 1, False)
    tl.store(out_ptr + i, g)


def test_kernel_global_scale_equals_torch_on_every_bf16_amax() -> None:
    """The in-kernel gs of bf16 amaxes over the whole range (every 41st, float32 ones between) is torch's."""
    a = (torch.arange(0, 0x7F80, 41, dtype=torch.int32) << 16).view(torch.float32)
    a = torch.cat([a, a * 1.0001, torch.tensor([0.0, 1e-45, 3.4e38])])
    out, flag = torch.empty_like(a), torch.zeros(a.shape, dtype=torch.int32)
    _gs_kernel[(a.numel(),)](a, flag, out, a.numel())
    assert torch.equal(out, numerics.global_scale(a)) and not flag.any()
