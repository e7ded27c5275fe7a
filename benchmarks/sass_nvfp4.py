"""Static sm_90 instruction counts of the NVFP4 words kernel variants (no GPU: triton ships ptxas, nvdisasm).

``python3 benchmarks/sass_nvfp4.py`` compiles ``_nvfp4_words_kernel`` for sm_90 with the
divisibility hints a launch on 16-divisible shapes gets, disassembles it and prints, per
variant and tile, the SASS instructions per element (the whole kernel, the division slow paths
included, over the elements one thread owns), register spills, and whether any FMUL flushes
subnormals (.FTZ: words_recip relies on none). "recip_only" is words_recip's product path
without its division fallback (RECIP=2, not exact): the cost of a program that keeps the
products. The quantizer is issue-bound when this count is high: at 0.9 of the H200's copy
rate (~3.8 TB/s of 2.5625 bytes per element) 132 SMs at ~1.9 GHz retire 128 lanes x ~22
instructions per element.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from conversion_core_nvfp4 import triton_kernels as tk
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SIGNATURE = {
    "w_ptr": "*i32",
    "packed_ptr": "*u8",
    "scale_ptr": "*fp8e4nv",
    "gs_ptr": "*fp32",
    "flag_ptr": "*i32",
    "count_ptr": "*i32",
    "global_ptr": "*fp32",
    "ROWS": "i32",
    "N": "i32",
    "GK": "i32",
    "stride_e": "i32",
    "stride_n": "i32",
}
VARIANTS = {"words": (False, False, 0), "words_magic": (True, False, 0), "words_recip": (True, False, 1)}
VARIANTS["recip_only"] = (True, False, 2)
TILES = [(16, 16, 4), (16, 32, 4), (8, 32, 2), (16, 64, 8)]


def sass(block_r: int, groups: int, warps: int, magic: bool, fast: bool, recip: int) -> str:
    names = list(SIGNATURE)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names}
    constexprs = {
        "BLOCK_R": block_r,
        "GROUPS": groups,
        "MAGIC": magic,
        "FAST_DIV": fast,
        "RECIP": recip,
        "COUNT": False,
        "FUSED_GS": 0,
        "INT64": False,
        "SOFT_ROUND": False,
    }
    sig = {**SIGNATURE, **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(fn=tk._nvfp4_words_kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def main() -> None:
    print(f"{'variant':>12} {'tile':>10} {'instr/elem':>10} {'spills':>6} FMUL.FTZ")
    for name, (magic, fast, recip) in VARIANTS.items():
        for br, g, w in TILES:
            text = sass(br, g, w, magic, fast, recip)
            lines = [ln for ln in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
            per_thread = br * g * 16 / (32 * w)
            spills = sum(" STL" in ln or " LDL" in ln for ln in lines)
            ftz = any("FMUL.FTZ" in ln for ln in lines)
            print(f"{name:>12} {f'{br}x{g * 16} w{w}':>10} {len(lines) / per_thread:10.1f} {spills:6d} {ftz}")


if __name__ == "__main__":
    main()
