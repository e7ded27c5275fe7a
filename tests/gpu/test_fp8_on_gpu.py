"""On a CUDA GPU: the Triton kernels write the CPU torch path's exact bytes, and real FP8 matmul
kernels accept those bytes (error no worse than 1.1x dequantize-then-bf16-matmul).

Skipped without CUDA. Run on an H100: ``pytest -q tests/gpu``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import conversion_core as cc
from conversion_core.errors import ConversionInputError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BLOCK = "fp8_128x128"
UE8M0 = "fp8_128x128_ue8m0"
CHANNEL = "cutlass_fp8_e4m3_per_channel"
E4M3 = torch.float8_e4m3fn


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """CPU weights over many magnitudes (rows and elements), so every e4m3 rounding regime
    shows up, subnormals and ties included; a signed zero too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x *= torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-6, 6, generator=g))
    x *= torch.exp(torch.empty(shape).uniform_(-4, 0, generator=g))
    x.view(-1)[0] = -0.0
    return x.to(dtype)


def _convert(name: str, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conversion = cc.load_registry().get(name)
    out, scale = conversion.allocate(src.shape, src.device)
    assert scale is not None
    out.view(torch.uint8).fill_(0x7F)  # poison: e4m3 NaN wherever nothing is written
    scale.fill_(float("nan"))
    conversion.fn(src, out, scale)
    return out, scale


def _assert_gpu_equals_cpu(name: str, src_cpu: torch.Tensor, gpu_view=lambda t: t) -> None:
    q_cpu, s_cpu = _convert(name, src_cpu)  # CPU tensors take the torch path
    q_gpu, s_gpu = _convert(name, gpu_view(src_cpu.cuda()))  # CUDA tensors take the Triton kernels
    differing = int((q_gpu.view(torch.uint8).cpu() != q_cpu.view(torch.uint8)).sum())
    assert differing == 0, f"{differing} of {q_cpu.numel()} bytes differ"
    assert torch.equal(s_gpu.cpu().view(torch.int32), s_cpu.view(torch.int32))


@pytest.mark.parametrize("name", [BLOCK, UE8M0, CHANNEL])
@pytest.mark.parametrize(
    "shape",
    [(4096, 4096), (3, 1000, 1500), (130, 28700), (257, 200)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_gpu_bytes_equal_cpu_bytes(name: str, shape: tuple[int, ...]) -> None:
    _assert_gpu_equals_cpu(name, _weights(shape, torch.bfloat16, seed=sum(shape)))


@pytest.mark.parametrize("name", [BLOCK, UE8M0, CHANNEL])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gpu_bytes_equal_cpu_bytes_other_dtypes(name: str, dtype: torch.dtype) -> None:
    _assert_gpu_equals_cpu(name, _weights((2, 700, 900), dtype, seed=3))


@pytest.mark.parametrize("name", [BLOCK, UE8M0, CHANNEL])
def test_gpu_bytes_equal_cpu_bytes_non_contiguous(name: str) -> None:
    src = _weights((900, 700), torch.bfloat16, seed=4)
    q_cpu, s_cpu = _convert(name, src.t())
    q_gpu, s_gpu = _convert(name, src.cuda().t())
    assert torch.equal(q_gpu.view(torch.uint8).cpu(), q_cpu.view(torch.uint8))
    assert torch.equal(s_gpu.cpu(), s_cpu)


@pytest.mark.parametrize("module", ["deepgemm", "deepgemm-ue8m0", "cutlass"])
def test_every_kernel_variant_equals_cpu(module: str) -> None:
    """The division and rounding variants the benchmark may pick all write the same bytes."""
    src = _weights((64, 128, 2048), torch.bfloat16, seed=5)  # 16.7M elements
    if module.startswith("deepgemm"):
        from conversion_core_deepgemm_fp8 import triton_kernels

        ue8m0 = module == "deepgemm-ue8m0"
        q_cpu, s_cpu = _convert(UE8M0 if ue8m0 else BLOCK, src)
        variants = [
            dict(fast_div=f, soft_round=r, num_warps=w, ue8m0=ue8m0) for f in (0, 1) for r in (0, 1) for w in (4, 8)
        ]
    else:
        from conversion_core_cutlass_fp8 import triton_kernels

        q_cpu, s_cpu = _convert(CHANNEL, src)
        base = triton_kernels.pick_config(src.shape[-1])
        variants = [dataclasses.replace(base, fast_div=bool(f), soft_round=bool(r)) for f in (0, 1) for r in (0, 1)]
        variants.append(triton_kernels.RowConfig(rows=1, block_k=512, single=False, num_warps=4, programs_per_sm=2))
    x = src.cuda()
    for variant in variants:
        out = torch.full(x.shape, float("nan"), dtype=E4M3, device="cuda")
        scale = torch.full(s_cpu.shape, float("nan"), device="cuda")
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        if module.startswith("deepgemm"):
            triton_kernels.launch_blocks(x, out, scale, flag, (128, 128), **variant)
        else:
            triton_kernels.launch_rows(x, out, scale, flag, variant)
        assert flag.item() == 0
        assert torch.equal(out.view(torch.uint8).cpu(), q_cpu.view(torch.uint8)), variant
        assert torch.equal(scale.cpu(), s_cpu), variant


@pytest.mark.parametrize("name", [BLOCK, UE8M0, CHANNEL])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_on_gpu(name: str, bad: float) -> None:
    src = torch.randn(3, 300, 500, device="cuda", dtype=torch.bfloat16)
    src[2, 299, 499] = bad
    conversion = cc.load_registry().get(name)
    out, scale = conversion.allocate(src.shape, "cuda")
    with pytest.raises(ConversionInputError, match=r"NaN or Inf") as info:
        conversion.fn(src, out, scale)
    assert "(3, 300, 500)" in str(info.value)


@pytest.mark.parametrize("name", [BLOCK, UE8M0, CHANNEL])
def test_ties_zeros_and_the_448_boundary_on_gpu(name: str) -> None:
    """Halfway cases (RNE), signed zeros, subnormals, amax elements that land a hair above 448
    before the cast, and values near FLT_MAX: the GPU cast must agree with torch on all."""
    row = torch.tensor([448.0, 17.0, 19.0, -17.0, 3 * 2.0**-10, 2.0**-10, -(2.0**-10), 0.0, -0.0, 240.0, 232.0])
    special = torch.stack([row, row * 2.0**-20, row * 2.0**60, -row * 3.1])
    amax_rows = torch.linspace(0.5, 1000.0, 4096)[:, None] * torch.tensor([1.0, -0.999, 0.5, 1e-3])
    huge = torch.full((2, 11), 3.0e38)
    huge[1, 2] = -3.4028234663852886e38
    for src in (special, amax_rows, huge):
        _assert_gpu_equals_cpu(name, src)


def test_torch_backend_on_gpu_equals_cpu(monkeypatch) -> None:
    """CONVERSION_CORE_BACKEND=torch on CUDA tensors: the torch path itself must match the CPU.
    (torch divides a CUDA tensor by a Python scalar as a multiplication by its reciprocal.)"""
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
    for name in (BLOCK, UE8M0, CHANNEL):
        _assert_gpu_equals_cpu(name, _weights((3, 300, 700), torch.bfloat16, seed=9))


# ---- real consumers -------------------------------------------------------------------------


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def _rowwise_activations(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantization, written here in plain torch."""
    scale = a.float().abs().amax(dim=-1).clamp_min(1e-12) / 448.0
    return (a.float() / scale[:, None]).clamp(-448, 448).to(E4M3), scale


def _activations_1x128(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = a.shape
    g = a.float().view(m, k // 128, 128)
    scale = g.abs().amax(dim=-1).clamp_min(1e-12) / 448.0
    q = (g / scale[..., None]).clamp(-448, 448).to(E4M3).view(m, k)
    return q, scale


def test_rowwise_scaled_mm_accepts_per_channel_bytes() -> None:
    torch.manual_seed(0)
    a = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    conversion = cc.load_registry().get(CHANNEL)
    w_q, w_s = conversion.convert(w)
    a_q, a_s = _rowwise_activations(a)
    out = torch._scaled_mm(a_q, w_q.t(), scale_a=a_s[:, None], scale_b=w_s[None, :], out_dtype=torch.bfloat16)
    ref = a.float() @ w.float().t()
    dequant = (a_q.float() * a_s[:, None]).bfloat16() @ conversion.dequantize(w_q, w_s).bfloat16().t()
    err, err_dequant = _rel_err(out, ref), _rel_err(dequant, ref)
    print(f"\nrowwise _scaled_mm rel err {err:.4f}  dequantize+bf16 matmul {err_dequant:.4f}")
    assert err <= 1.1 * err_dequant and err < 0.1


def test_grouped_scaled_mm_accepts_per_channel_expert_bytes() -> None:
    torch.manual_seed(1)
    experts, n, k, m_per = 4, 512, 1024, 64
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(experts * m_per, k, device="cuda", dtype=torch.bfloat16)
    conversion = cc.load_registry().get(CHANNEL)
    w_q, w_s = conversion.convert(w)
    assert w_s.shape == (experts, n)
    a_q, a_s = _rowwise_activations(a)
    offs = torch.arange(m_per, experts * m_per + 1, m_per, device="cuda", dtype=torch.int32)
    out = torch._scaled_grouped_mm(a_q, w_q.transpose(-2, -1), a_s, w_s, offs=offs, out_dtype=torch.bfloat16)
    w_deq = conversion.dequantize(w_q, w_s).bfloat16()
    a_deq = (a_q.float() * a_s[:, None]).bfloat16()
    rows = [slice(i * m_per, (i + 1) * m_per) for i in range(experts)]
    ref = torch.cat([a[r].float() @ w[i].float().t() for i, r in enumerate(rows)])
    dequant = torch.cat([a_deq[r] @ w_deq[i].t() for i, r in enumerate(rows)])
    err, err_dequant = _rel_err(out, ref), _rel_err(dequant, ref)
    print(f"\ngrouped _scaled_grouped_mm rel err {err:.4f}  dequantize+bf16 matmul {err_dequant:.4f}")
    assert err <= 1.1 * err_dequant and err < 0.1


@pytest.mark.parametrize("name", [BLOCK, UE8M0])  # power-of-two scales are float32 scales to this kernel
@pytest.mark.parametrize("n,k", [(1536, 2048), (1008, 640)], ids=["kblocks16", "kblocks5-padded-partial"])
def test_blockwise_scaled_mm_accepts_128x128_bytes(n: int, k: int, name: str) -> None:
    from torch.nn.functional import ScalingType, scaled_mm

    torch.manual_seed(2)
    m = 256  # a multiple of 4, as the 1x128 activation scales need
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    conversion = cc.load_registry().get(name)
    w_q, w_s = conversion.convert(w)
    nb, kb = w_s.shape
    assert (nb, kb) == (-(-n // 128), -(-k // 128))
    # the checkpoint keeps (nb, kb); the kernel wants rows padded to a multiple of 4 K-blocks
    w_s_padded = torch.zeros(nb, -(-kb // 4) * 4, device="cuda")
    w_s_padded[:, :kb] = w_s
    a_q, a_s = _activations_1x128(a)
    out = scaled_mm(
        a_q,
        w_q.t(),
        a_s.t().contiguous().t(),  # (m, kb) column-major
        ScalingType.BlockWise1x128,
        w_s_padded.t(),
        ScalingType.BlockWise128x128,
        output_dtype=torch.bfloat16,
    )
    ref = a.float() @ w.float().t()
    a_deq = (a_q.float().view(m, kb, 128) * a_s[..., None]).view(m, k).bfloat16()
    dequant = a_deq @ conversion.dequantize(w_q, w_s).bfloat16().t()
    err, err_dequant = _rel_err(out, ref), _rel_err(dequant, ref)
    print(f"\nblockwise scaled_mm ({n}x{k}) rel err {err:.4f}  dequantize+bf16 matmul {err_dequant:.4f}")
    assert err <= 1.1 * err_dequant and err < 0.1
