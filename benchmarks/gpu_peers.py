"""The peers' published quantizers for the new formats, timed against the same run's device copy.

Yardsticks for ``gpu_mx.py``, ``gpu_nvfp4.py`` and ``gpu_int4.py``: fbgemm's Triton NVFP4 and MX4
quantizers and torchao's Triton MXFP8 kernel, on the bench shapes, bf16 in. Their layouts and
roundings differ from ours (fbgemm's MX4 rounds the scale up, torchao's default ``rceil``), so this
script compares speed only: GB/s of the bytes each reads plus the bytes it returns, and the ratio to
a device copy of the source timed in the same process.

Peers are benchmark-only: they are imported when present (carried on ``PYTHONPATH`` for the GPU
run, never a dependency of any package here); a missing or failing peer prints one line and the
table goes on.

    python3 benchmarks/gpu_peers.py            # on a CUDA machine
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import torch

SHAPES = [(4096, 2048), (28672, 8192), (8192, 28672), (128, 1536, 2048), (128, 2048, 768)]


def _attr(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:  # a peer that does not import is reported, not fatal
        print(f"peer {module}.{name} not available: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return None


def peers() -> dict[str, Callable[[torch.Tensor], Any]]:
    found: dict[str, Callable[[torch.Tensor], Any]] = {}
    fb = "fbgemm_gpu.experimental.gemm.triton_gemm.fp4_quantize"
    nv = _attr(fb, "triton_scale_nvfp4_quant")
    if nv is not None:
        found["fbgemm nvfp4 (with amax)"] = lambda x: nv(x, 2688.0 / x.abs().amax().float().reshape(1))
        found["fbgemm nvfp4 (given gs)"] = lambda x: nv(x, _GS[id(x)])
    mx4 = _attr(fb, "triton_quantize_mx4_unpack")
    if mx4 is not None:
        found["fbgemm mxfp4"] = lambda x: mx4(x)
    ao = _attr("torchao.prototype.mx_formats.kernels", "triton_to_mxfp8_dim0")
    if ao is not None:
        found["torchao mxfp8"] = lambda x: ao(x, 32, "floor")
    return found


_GS: dict[int, torch.Tensor] = {}


def _nbytes(result: Any) -> int:
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, (tuple, list)):
        return sum(_nbytes(r) for r in result)
    return 0


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_peers: needs a CUDA device")
        return 0
    from triton.testing import do_bench

    found = peers()
    print(f"\n{'peer':<26} {'shape':<20} {'ms':>8} {'GB/s':>7} {'copy GB/s':>9} {'/copy':>6}")
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16).reshape(-1, shape[-1])
        _GS[id(x)] = torch.tensor([448.0 * 6.0], device="cuda") / x.abs().amax().float()
        dst = torch.empty_like(x)
        copy_ms = do_bench(lambda x=x, dst=dst: dst.copy_(x), warmup=10, rep=60)
        copy_gbps = 2 * x.numel() * x.element_size() / copy_ms / 1e6
        for name, fn in found.items():
            try:
                out = fn(x)
                torch.cuda.synchronize()
                ms = do_bench(lambda fn=fn, x=x: fn(x), warmup=10, rep=60)
            except Exception as exc:
                print(f"{name:<26} {str(shape):<20} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            gbps = (x.numel() * x.element_size() + _nbytes(out)) / ms / 1e6
            print(f"{name:<26} {str(shape):<20} {ms:>8.4f} {gbps:>7.0f} {copy_gbps:>9.0f} {gbps / copy_gbps:>6.2f}")
        _GS.clear()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
