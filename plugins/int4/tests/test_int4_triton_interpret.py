"""The Triton kernel under TRITON_INTERPRET=1 gives the torch path's bytes (small shapes: the interpreter is slow).

Every launch variant (``triton_kernels.VARIANTS``) is checked on odd rows, 3D stacks, a transposed
source, fp32 and fp16 sources, zero, subnormal and tiny-scale groups, and NaN/Inf of any payload;
the default kernel's shortcuts also on their own (roundings against torch's cast on 2^19 values,
a reciprocal 4 ulp off, asymmetric ties present in the sources, too-large groups refused).
The interpreter runs numpy: it cannot show what only the GPU compiler does (fused multiply-add,
NVIDIA's NaN bits). The kernel has no float ``a * b + c`` and launches with
``enable_fp_fusion=False``; ``test_bf16_rounding_keeps_nan`` feeds the GPU's NaN bits explicitly.
On a GPU, ``benchmarks/gpu_int4.py`` checks the compiled variants against the CPU bytes.
"""

from __future__ import annotations

import os

import pytest
import torch

import conversion_core as cc

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from conversion_core_int4.triton_kernels import _bf16, _bf16_magic, _bf16_nt, _bf16_split  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def source(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.03
    x[..., 0, :] = 0
    x[..., -1, 7] = -6.0
    if shape[-2] > 2:
        x[..., 1, :] = x[..., 1, :].abs()
        x[..., 2, :64] = 1e-40
    return x.to(dtype)


def run(conversion: cc.Conversion, src: torch.Tensor, backend: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", backend)
    return conversion.convert(src)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = (lambda t: t.view(torch.int16)) if a.dtype == torch.bfloat16 else (lambda t: t)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(view(a), view(b))


@pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_g32", "int4_w4a16_asym_g128", "int4_w4a16_asym_g32"])
@pytest.mark.parametrize("shape", [(19, 256), (1, 128), (2, 13, 128), (3, 9, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_bytes_equal_torch_path(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversion = cc.load_registry().get(name)
    if shape[-1] % conversion.compile_metadata["group_size"]:
        pytest.skip("K not a multiple of the group: refused by both paths")
    src = source(shape, dtype, hash((name, shape)) % 997)
    want = run(conversion, src, "torch", monkeypatch)
    got = run(conversion, src, "triton", monkeypatch)
    for w, g, out in zip(want, got, conversion.outputs, strict=True):
        assert same(w, g), f"{name} {shape} {dtype}: {out.name} differs"


def test_triton_strided_source(monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = cc.load_registry().get("int4_w4a16_asym_g32")
    src = source((64, 24), torch.bfloat16, 1).t()  # (24, 64), column-major
    want = run(conversion, src.contiguous(), "torch", monkeypatch)
    got = run(conversion, src, "triton", monkeypatch)
    assert all(same(w, g) for w, g in zip(want, got, strict=True))


@pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_asym_g32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_flags_non_finite(name: str, bad: float, monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = cc.load_registry().get(name)
    src = source((9, 128), torch.float32, 2)
    src[4, 77] = bad
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
    with pytest.raises(cc.ConversionInputError, match=r"\(9, 128\)"):
        conversion.convert(src)


def test_launch_sets_flag_without_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = cc.load_registry().get("int4_w4a16_g128")
    src = source((8, 128), torch.bfloat16, 3)
    buffers = conversion.allocate(src.shape)
    flag = torch.zeros(1, dtype=torch.int32)
    conversion.launch(src, *buffers, flag)
    assert int(flag) == 0
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
    for got, want in zip(buffers, conversion.convert(src), strict=True):
        assert same(got, want)
    src[0, 0] = float("nan")
    conversion.launch(src, *buffers, flag)
    assert int(flag) == 1


def kernels():  # imported late: the plugin module imports triton
    from conversion_core_int4 import triton_kernels

    return triton_kernels


@triton.jit
def bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(y_ptr + i, _bf16(x), mask=i < n)


from conversion_core_int4.triton_kernels import VARIANTS  # noqa: E402

VARIANT_NAMES = sorted(VARIANTS)


def variant_sources() -> list[tuple[str, torch.Tensor]]:
    """Odd rows, 3D stacks (one a strided expert view), a transposed view, fp32 and fp16, K = 160 (not a
    multiple of 128: group 32 only), zero, subnormal, tiny-scale (around 2^-64), negative-subnormal and
    constant groups, an outlier, quotients through every half-integer, and asymmetric ``bf16(v + zp)`` ties.
    """
    stack = source((2, 13, 256), torch.bfloat16, 11)
    stack[1, 5, 128:] = 1e-38  # a subnormal scale: the scaled path (x * 2^64)
    stack[0, 6, :128] = torch.linspace(-1, 1, 128) * 2.0**-62  # scales around 2^-64
    stack[0, 7, :] = -1e-40  # asymmetric: min < 0 and s = 0, so min / 0 = -inf and zp = 7
    stack[1, 8, :] = 0.25  # constant groups
    stack[1, 9, :] = -3.0
    wide = source((19, 128), torch.float32, 12)
    wide[3, :] = torch.linspace(-1, 1, 128)  # quotients through every half-integer
    t = source((256, 24), torch.bfloat16, 13).t()  # (24, 256), column-major
    half = source((9, 128), torch.float16, 14)
    experts = source((3, 10, 128), torch.bfloat16, 15)[::2]  # expert stride twice the expert size
    k160 = source((7, 160), torch.bfloat16, 16)
    return [
        ("stack", stack),
        ("fp32", wide),
        ("transposed", t),
        ("fp16", half),
        ("expert view", experts),
        ("K=160", k160),
    ]


def convert_variant(name: str, src: torch.Tensor, variant: object) -> list[torch.Tensor]:
    from conversion_core_int4 import FORMATS

    fmt, tk = FORMATS[name], kernels()
    got = fmt.conversion().allocate(src.shape)
    packed, scale, shape_out, *zp = got
    tk.quantize(src, packed, scale, shape_out, zp[0] if zp else None, fmt.group, name, variant)
    return got


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_g32", "int4_w4a16_asym_g128", "int4_w4a16_asym_g32"])
def test_variant_bytes_equal_torch_path(variant: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every launch variant (the benchmark picks among them) writes the torch path's bytes."""
    from conversion_core_int4 import FORMATS

    conversion, tk = FORMATS[name].conversion(), kernels()
    for label, src in variant_sources():
        if src.shape[-1] % FORMATS[name].group:
            continue
        want = run(conversion, src.contiguous(), "torch", monkeypatch)
        got = convert_variant(name, src, tk.VARIANTS[variant])
        for w, g, out in zip(want, got, conversion.outputs, strict=True):
            assert same(w, g), f"{name} {variant} {label}: {out.name} differs"


@pytest.mark.parametrize("nudge", [-4, 4])
@pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_asym_g32"])
def test_reciprocal_error_does_not_change_bytes(nudge: int, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's ``1 / d`` (``div.full.f32``) is within 2 ulp; a reciprocal 4 ulp off still gives the bytes.

    The interpreter divides exactly (numpy), so the kernel's test-only ``nudge`` moves the reciprocal.
    """
    import dataclasses

    from conversion_core_int4 import FORMATS

    conversion, tk = FORMATS[name].conversion(), kernels()
    for uniform in (True, False):
        variant = dataclasses.replace(tk.DEFAULT, nudge=nudge, uniform=uniform)
        for label, src in variant_sources()[:2]:
            want = run(conversion, src.contiguous(), "torch", monkeypatch)
            got = convert_variant(name, src, variant)
            for w, g, out in zip(want, got, conversion.outputs, strict=True):
                assert same(w, g), f"{name} nudge {nudge} uniform {uniform} {label}: {out.name} differs"


def test_asymmetric_sources_hold_ties() -> None:
    """The variant sources do exercise ``bf16(v + zp)`` on exact bf16 midpoints (the magic rounding's ties)."""
    from conversion_core_int4 import torch_path as tp

    x = variant_sources()[0][1].float().to(torch.bfloat16).float().reshape(2, 13, 8, 32)
    s, zp = tp.asymmetric_params(x.amin(-1), x.amax(-1))
    y = (x / s.unsqueeze(-1)).to(torch.bfloat16).float() + zp.unsqueeze(-1)
    ties = (y.view(torch.int32) & 0xFFFF) == 0x8000
    assert int(ties.sum()) > 10


@triton.jit
def rounding_kernel(x_ptr, y_ptr, n, HOW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    if HOW == 0:
        y = _bf16_nt(x)
    elif HOW == 1:
        y = _bf16_split(x)
    else:
        y = _bf16_magic(x)
    tl.store(y_ptr + i, y, mask=i < n)


def rounding_inputs(midpoints: bool) -> torch.Tensor:
    """float32 values in [2^-126, 32), both signs: random bits, plus every bf16 midpoint there if asked."""
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(0x00800000, 0x42000000, (1 << 18,), generator=g, dtype=torch.int64)
    near = torch.randint(0x3F000000, 0x41800000, (1 << 16,), generator=g, dtype=torch.int64) & ~0xFFFF
    parts = [bits, near + 0x7FFF, near + 0x8001, near + 0x0001, near + 0xFFFF]
    if midpoints:
        parts.append(torch.arange(0x3F000000, 0x41800000, 0x10000, dtype=torch.int64) + 0x8000)
    b = torch.cat(parts).to(torch.int32)
    x = b.view(torch.float32)
    return torch.cat([x, -x])


@pytest.mark.parametrize("how", [0, 1, 2])
def test_rounding_helpers_equal_torch_cast(how: int) -> None:
    """The kernel's shortcut roundings equal torch's cast.

    ``_bf16_nt`` and ``_bf16_split`` on inputs that are never bf16 midpoints (as the quotients they
    round), ``_bf16_magic`` on midpoints too (``bf16(v + zp)`` ties).
    """
    x = rounding_inputs(midpoints=how == 2)
    if how < 2:
        x = x[(x.view(torch.int32) & 0xFFFF) != 0x8000]
    y = torch.empty_like(x)
    rounding_kernel[(triton.cdiv(x.numel(), 1 << 16),)](x, y, x.numel(), HOW=how, BLOCK=1 << 16)
    want = x.to(torch.bfloat16).float()
    bad = (y.view(torch.int32) != want.view(torch.int32)).nonzero()
    assert not len(bad), f"{len(bad)} differ, first x={x[bad[0]].item()!r} got {y[bad[0]].item()!r}"


@pytest.mark.parametrize("variant", ["default", "no-uniform", "v1"])
def test_group_too_large_is_refused(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group whose scale makes ``-8 s`` overflow bf16 is refused by the kernel as by the torch path."""
    tk = kernels()
    src = source((8, 128), torch.bfloat16, 7)
    src[3, 5] = 3.3e38  # symmetric: s = bf16(3.3e38 / 7.5) > bf16 max / 8
    src[3, 6] = -1e38  # asymmetric: the range max - min overflows bf16
    for name in ("int4_w4a16_g128", "int4_w4a16_asym_g128"):
        with pytest.raises(cc.ConversionInputError):
            run(cc.load_registry().get(name), src, "torch", monkeypatch)
        with pytest.raises(cc.ConversionInputError, match=r"\(8, 128\)"):
            convert_variant(name, src, tk.VARIANTS[variant])


@pytest.mark.parametrize("variant", ["default", "no-uniform", "flag-store", "no-pairs", "v1", "v1-ref"])
@pytest.mark.parametrize("name", ["int4_w4a16_g32", "int4_w4a16_asym_g128"])
@pytest.mark.parametrize(
    "bits", [0x7FC00000, 0x7FFFFFFF, -1, 0x7F800001, 0x7F800000, -0x800000, 0x7FC1, 0xFFFF, 0x7F80, 0xFF80]
)
def test_variant_flags_nan_bits(variant: str, name: str, bits: int) -> None:
    """NaN of any payload (NVIDIA's canonical 0x7FFFFFFF, 0xFFFFFFFF) and +-Inf set the flag.

    Rounding such a NaN to bf16 by adding the bias carried it into -0.0 or 0 before the fix. Bits
    below 2^16 are bf16 words (a bf16 source: the int32-pairs path of the default kernel).
    """
    from conversion_core_int4 import FORMATS

    fmt, tk = FORMATS[name], kernels()
    if 0 <= bits < 1 << 16:
        src = source((9, 128), torch.bfloat16, 2)
        src.view(torch.int16)[4, 77] = bits - (1 << 16) if bits >= 1 << 15 else bits
    else:
        src = source((9, 128), torch.float32, 2)
        src.view(torch.int32)[4, 77] = bits
    packed, scale, shape_out, *zp = fmt.conversion().allocate(src.shape)
    flag = torch.zeros(1, dtype=torch.int32)
    tk.launch(src, packed, scale, shape_out, zp[0] if zp else None, flag, fmt.group, tk.VARIANTS[variant])
    assert int(flag) == 1


def test_bf16_rounding_keeps_nan() -> None:
    """The kernel's bf16 rounding equals torch's cast on every special bit pattern, NaN payloads included.

    ``0x7FFFFFFF`` is the NaN an NVIDIA GPU returns for ``0 / 0`` (a zero group's ``min / s``); the
    interpreter's numpy NaN is ``0xFFC00000``, so only explicit bits show the carry into -0.0.
    """
    words = [
        0x7FFFFFFF,
        -1,
        0x7FC00000,
        0x7F800001,
        0xFFFF8000 - 2**32,
        0x7F7FFFFF,
        0x3F808000,
        0x3F818000,
        0x00008000,
        1,
    ]
    x = torch.tensor(words, dtype=torch.int64).to(torch.int32).view(torch.float32)
    y = torch.empty_like(x)
    bf16_kernel[(1,)](x, y, x.numel(), BLOCK=16)
    want = x.to(torch.bfloat16).float()
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    keep = ~torch.isnan(want)
    assert torch.equal(y[keep].view(torch.int32), want[keep].view(torch.int32))


def test_k_not_a_multiple_of_the_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """K = 96 with group 128 (or 40 with 32): both backends refuse with the one-line error."""
    conversion = cc.load_registry().get("int4_w4a16_asym_g128")
    for backend in ("torch", "triton"):
        with pytest.raises(cc.ConversionInputError, match="not a multiple of group_size"):
            run(conversion, source((5, 96), torch.bfloat16, 4), backend, monkeypatch)
