"""Property tests of both FP8 conversions, reached through the installed registry.

For random 2-D/3-D shapes (1, multiples and non-multiples of 128), bf16/fp16/fp32 sources,
magnitudes across each dtype's range (subnormals to the largest finite value), zero rows and
zero blocks, and transposed (non-contiguous) sources:

- q holds no NaN, scales are finite and positive, shapes are the documented ones;
- each scale is ``max(amax, 1e-12) / 448`` (float32) of its block or row, computed here;
- every element dequantizes within the e4m3 bound for its scale ``s`` (derivation below);
- the largest element of every non-zero block or row lands on ±448 exactly.

Error bound. ``y = fl(x / s)`` with ``|y| <= 448`` (clamped; 448 is an e4m3 value). e4m3
(3 mantissa bits, minimum normal 2^-6, subnormal spacing 2^-9) rounds to nearest, so
``|q - y| <= 2^-4 |y|`` for normal ``y`` (half a spacing of 2^(e-3) with ``|y| >= 2^e``) and
``|q - y| <= 2^-10`` for subnormal ``y``; hence ``|q - y| <= max(2^-4 |y|, 2^-10)``. The float32
division adds ``|y s - x| <= 2^-24 |x|`` and the float32 product ``q * s`` another 2^-24
relative, so ``|q s - x| <= max(2^-4 |x|, 2^-10 s) + 2^-20 (|x| + s)`` (2^-20 covers both
float32 roundings and the factor (1 + 2^-24) on the first term with room to spare).

The Triton property (same bytes from the torch path and the interpreted Triton kernels) runs
in a subprocess, because ``TRITON_INTERPRET=1`` must be set before triton is first imported.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conversion_core as cc

BLOCK = "fp8_128x128"
CHANNEL = "cutlass_fp8_e4m3_per_channel"
E4M3_MAX = 448.0
MIN_AMAX = 1e-12
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}

#: CI-sized by default; set CONVERSION_CORE_HYPOTHESIS_EXAMPLES for a longer local run.
EXAMPLES = int(os.environ.get("CONVERSION_CORE_HYPOTHESIS_EXAMPLES", "30"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.one_of(st.sampled_from([1, 2, 127, 128, 129, 255, 256, 257]), st.integers(1, 300))


@st.composite
def sources(draw) -> torch.Tensor:
    """A finite source tensor with magnitudes spread over its dtype's range."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)),) if draw(st.booleans()) else ()
    shape += (draw(dims), draw(dims))
    info = torch.finfo(dtype)
    lo = math.floor(math.log2(info.smallest_normal)) - MANTISSA_BITS[dtype]  # smallest subnormal's exponent
    hi = math.floor(math.log2(info.max))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    style = draw(st.sampled_from(["one magnitude", "per-row magnitudes", "per-element magnitudes"]))
    if style == "one magnitude":
        exponent = torch.tensor(float(draw(st.integers(lo, hi))), dtype=torch.float64)
    elif style == "per-row magnitudes":
        exponent = torch.randint(lo, hi + 1, (*shape[:-1], 1), generator=generator).double()
    else:
        exponent = torch.randint(lo, hi + 1, shape, generator=generator).double()
    x = (x * torch.exp2(exponent)).clamp(-info.max, info.max)
    if draw(st.booleans()):  # at the very top of the range
        x.view(-1)[0] = info.max * draw(st.sampled_from([1.0, -1.0]))
    x = x.to(dtype)
    n, k = shape[-2:]
    if draw(st.booleans()):  # zero rows
        x[..., torch.randint(0, n, (max(1, n // 4),), generator=generator), :] = 0
    if draw(st.booleans()):  # a zero 128x128 block (whole or the partial edge one)
        bi, bj = draw(st.integers(0, (n - 1) // 128)), draw(st.integers(0, (k - 1) // 128))
        x[..., bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128] = 0
    if draw(st.booleans()):  # any strides: the same values through a transposed view
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.isfinite(x).all()
    return x


def _expected_block_scales(x: torch.Tensor) -> torch.Tensor:
    """``max(amax, 1e-12) / 448`` per 128x128 block, block by block."""
    x3 = x.reshape(-1, *x.shape[-2:]).float()
    e, n, k = x3.shape
    scales = torch.empty(e, -(-n // 128), -(-k // 128), dtype=torch.float32)
    for i in range(e):
        for bi in range(scales.shape[1]):
            for bj in range(scales.shape[2]):
                amax = x3[i, bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128].abs().max()
                scales[i, bi, bj] = torch.clamp(amax, min=MIN_AMAX) / E4M3_MAX
    return scales.reshape(*x.shape[:-2], *scales.shape[1:])


def _expected_row_scales(x: torch.Tensor) -> torch.Tensor:
    amax = x.float().abs().amax(dim=-1)
    return torch.clamp(amax, min=MIN_AMAX) / E4M3_MAX


def _per_element(name: str, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if name == CHANNEL:
        return scale.unsqueeze(-1).expand(shape)
    full = scale.repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)
    return full[..., : shape[-2], : shape[-1]]


def _check_properties(name: str, x: torch.Tensor) -> None:
    conversion = cc.load_registry().get(name)
    q, scale = conversion.convert(x)
    assert scale is not None
    n, k = x.shape[-2:]
    lead = tuple(x.shape[:-2])
    if name == BLOCK:
        assert scale.shape == (*lead, -(-n // 128), -(-k // 128))
        expected = _expected_block_scales(x)
    else:
        assert scale.shape == (*lead, n)
        expected = _expected_row_scales(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32
    assert not torch.isnan(q.float()).any(), "NaN bytes in q"
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(scale, expected), (scale - expected).abs().max()

    xf = x.float()
    s = _per_element(name, scale, x.shape).double()
    deq = conversion.dequantize(q, scale).double()
    assert deq.shape == x.shape
    err = (deq - xf.double()).abs()
    ax = xf.double().abs()
    bound = torch.maximum(ax * 2.0**-4, s * 2.0**-10) + 2.0**-20 * (ax + s)
    worst = (err - bound).max()
    assert worst <= 0, f"dequantize error exceeds the e4m3 bound by {worst.item()}"

    # the largest |x| of every block / row with amax >= 1e-12 lands on ±448
    qa = q.float().abs()
    if name == BLOCK:
        reduced = torch.nn.functional.pad(qa.reshape(-1, n, k), (0, (-k) % 128, 0, (-n) % 128))
        e = reduced.shape[0]
        qmax = reduced.view(e, -(-n // 128), 128, -(-k // 128), 128).amax(dim=(2, 4)).reshape(expected.shape)
    else:
        qmax = qa.amax(dim=-1)
    big = expected > MIN_AMAX / E4M3_MAX
    assert (qmax[big] == E4M3_MAX).all()
    assert (qmax[~big] <= E4M3_MAX).all()


@PROPERTY_SETTINGS
@given(sources())
def test_fp8_128x128_properties(x):
    _check_properties(BLOCK, x)


@PROPERTY_SETTINGS
@given(sources())
def test_cutlass_per_channel_properties(x):
    _check_properties(CHANNEL, x)


@pytest.mark.parametrize("name", [BLOCK, CHANNEL])
def test_all_zero_source_gives_zero_bytes_and_the_floor_scale(name):
    conversion = cc.load_registry().get(name)
    q, scale = conversion.convert(torch.zeros(3, 130, 260, dtype=torch.bfloat16))
    assert scale is not None
    assert not q.view(torch.uint8).any()
    floor = torch.tensor(MIN_AMAX, dtype=torch.float32) / E4M3_MAX
    assert (scale == floor).all()


@pytest.mark.parametrize("name", [BLOCK, CHANNEL])
@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_finite_values_stay_finite(name, dtype):
    """amax at the dtype's maximum: the scale and q * scale must not overflow float32."""
    top = torch.finfo(dtype).max
    x = torch.tensor([[top, top / 3, -top], [-top, 1.0, 0.0]], dtype=dtype)
    _check_properties(name, x)
    conversion = cc.load_registry().get(name)
    q, scale = conversion.convert(x)
    assert torch.isfinite(conversion.dequantize(q, scale)).all()


@pytest.mark.parametrize("name", [BLOCK, CHANNEL])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_source_is_refused(name, bad):
    x = torch.ones(2, 129, 130)
    x[1, 128, 129] = bad
    with pytest.raises(cc.ConversionInputError, match=r"\(2, 129, 130\).*NaN or Inf"):
        cc.load_registry().get(name).convert(x)


# --------------------------------------------------------------------------- torch path vs interpreted Triton

TRITON_MODULES = {
    BLOCK: "conversion_core_deepgemm_fp8.triton_kernels",
    CHANNEL: "conversion_core_cutlass_fp8.triton_kernels",
}
TRITON_EXAMPLES = int(os.environ.get("CONVERSION_CORE_HYPOTHESIS_EXAMPLES", "12"))  # the interpreter is slow

CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch
    from hypothesis import given, settings, strategies as st, HealthCheck
    import conversion_core as cc
    from conversion_core.backend import use_triton

    NAME, EXAMPLES = sys.argv[1], int(sys.argv[2])
    conversion = cc.load_registry().get(NAME)
    dims = st.one_of(st.sampled_from([1, 127, 128, 129, 257]), st.integers(1, 260))

    def convert(src, backend):
        os.environ["CONVERSION_CORE_BACKEND"] = backend
        assert use_triton(src) is (backend == "triton")
        return conversion.convert(src)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
        st.lists(dims, min_size=2, max_size=2),
        st.integers(1, 3) | st.none(),
        st.integers(-20, 12),
        st.integers(0, 2**31 - 1),
        st.booleans(),
        st.booleans(),
    )
    def same_bytes(dtype, nk, experts, exponent, seed, transposed, zero_rows):
        shape = tuple(nk) if experts is None else (experts, *nk)
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=g) * 2.0**exponent).to(dtype)
        if zero_rows:
            x[..., : max(1, shape[-2] // 3), :] = 0
        if transposed:
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        q_torch, s_torch = convert(x, "torch")
        q_triton, s_triton = convert(x, "triton")
        assert torch.equal(q_torch.view(torch.uint8), q_triton.view(torch.uint8)), (NAME, shape, dtype)
        assert torch.equal(s_torch.view(torch.int32), s_triton.view(torch.int32)), (NAME, shape, dtype)

    same_bytes()
    print("same bytes on", EXAMPLES, "examples")
    """
)


@pytest.mark.parametrize("name", [BLOCK, CHANNEL])
def test_torch_path_and_interpreted_triton_give_the_same_bytes(name):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if importlib.util.find_spec(TRITON_MODULES[name]) is None:
        pytest.skip(f"{TRITON_MODULES[name]} does not exist yet (Triton kernels land with the gpu branch)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("CONVERSION_CORE_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(TRITON_EXAMPLES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert f"same bytes on {TRITON_EXAMPLES} examples" in result.stdout
