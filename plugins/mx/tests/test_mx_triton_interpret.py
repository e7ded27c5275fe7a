"""The MX Triton kernel, run by Triton's CPU interpreter, writes the torch path's bytes.

``TRITON_INTERPRET`` must be set before the kernels are decorated, so a normal pytest run re-runs
this file in a child process with ``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``.
The interpreter proves the kernel's logic (exponent choice, saturation, e2m1 buckets, nibble
packing, masks, expert strides); only a GPU run (``benchmarks/gpu_mx.py``) proves the GPU's cast.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("CONVERSION_CORE_BACKEND") == "triton"

if not INTERPRETING:

    def test_kernel_matches_torch_path_under_interpreter() -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", CONVERSION_CORE_BACKEND="triton")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]

else:
    import conversion_core as cc
    from conversion_core.backend import use_triton

    def _convert(name: str, src: torch.Tensor, backend: str, monkeypatch: pytest.MonkeyPatch):
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", backend)
        conversion = cc.load_registry().get(name)
        q, s = conversion.allocate(src.shape, src.device)
        q.view(torch.uint8).fill_(0x7F)
        s.fill_(0xFF)
        conversion.fn(src, q, s)
        return q.view(torch.uint8).clone(), s.clone()

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 8, shape, generator=g).float())
        flat = x.view(-1, shape[-1])
        flat[0, :32] = 0.0
        flat[-1, 3] = 2.0e4
        flat[0, 32:40] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0]) if shape[-1] > 32 else 0.0
        return x.to(dtype)

    CASES = [
        ((1, 32), torch.bfloat16),
        ((17, 96), torch.bfloat16),
        ((3, 5, 320), torch.float16),
        ((9, 64), torch.float32),
    ]

    @pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
    @pytest.mark.parametrize(("shape", "dtype"), CASES, ids=str)
    def test_same_bytes_as_torch_path(name, shape, dtype, monkeypatch):
        src = _weights(shape, dtype, seed=shape[-1])
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
        assert use_triton(src)
        assert [
            torch.equal(a, b)
            for a, b in zip(
                _convert(name, src, "triton", monkeypatch), _convert(name, src, "torch", monkeypatch), strict=True
            )
        ] == [True, True]

    @pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
    def test_strided_experts_and_huge_values(name, monkeypatch):
        src = _weights((4, 6, 64), torch.bfloat16, seed=3).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        src[1, 2, :] = float(torch.finfo(torch.bfloat16).max)
        got, want = _convert(name, src, "triton", monkeypatch), _convert(name, src, "torch", monkeypatch)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    @pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_flagged(name, bad, monkeypatch):
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
        src = torch.ones(5, 64)
        src[4, 40] = bad
        with pytest.raises(cc.ConversionInputError, match=r"\(5, 64\) holds NaN or Inf"):
            cc.load_registry().get(name).convert(src)
