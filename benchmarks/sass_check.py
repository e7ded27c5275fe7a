"""Compile the MX Triton kernels to sm_90a SASS on CPU and flag reads of registers nothing wrote.

Why: the MXFP8 "words" kernel of 2026-12-04 wrote wrong bytes on the H200 while its PTX was
right; ptxas had fused the e4m3 pack into ``F2FP...PACK_AB_MERGE_C`` fed by ``R1`` (the stack
pointer) or a never-written register. This script needs no GPU: Triton lowers to PTX without a
driver, and its wheel ships ``ptxas`` and ``nvdisasm``. Run it with the Triton the GPU runs::

    python benchmarks/sass_check.py            # every MX words/generic variant, default tiles

It prints one line per kernel configuration: SASS instruction count, F2FP count, and the
suspicious reads (a register read before any instruction wrote it, or ``R1`` used as data).
Exit 1 when any words configuration (straight-line code) has one. The scan is linear (branches
ignored), so on the branchy generic kernel its hits are only shown; no hit on straight-line code
is good evidence, a hit a lead to read the SASS. On the 2026-12-04 words kernel it flags the
``LOP3.LUT Rx, R1, 0xffff`` feeding each F2FP merge.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend


@triton.jit
def _old_pack_control(w_ptr, q_ptr, BLOCK: tl.constexpr):
    """The 2026-12-04 MXFP8 words pack (fp8 cast, bitcast, int16 pack): the positive control."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs)
    lo = (w << 16).to(tl.float32, bitcast=True).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    hi = (w & -65536).to(tl.float32, bitcast=True).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    tl.store(q_ptr + offs, (lo | (hi << 8)).to(tl.int16))


_NO_DEST = ("ST", "RED", "BAR", "EXIT", "BRA", "RET", "NOP", "WARPSYNC", "MEMBAR", "CCTL", "ERRBAR", "DEPBAR")


def _regs(tok: str) -> list[int]:
    m = re.fullmatch(r"-?\|?R(\d+)(?:\.reuse)?(?:\.(64|128))?\|?(?:\.reuse)?", tok)
    if not m:
        return []
    width = {"64": 2, "128": 4}.get(m.group(2) or "", 1)
    return [int(m.group(1)) + i for i in range(width)]


def scan(sass: str) -> tuple[int, int, list[str]]:
    """(instructions, F2FP count, suspicious lines) of nvdisasm output."""
    written: set[int] = set()
    bad: list[str] = []
    count = f2fp = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*(.*?);", line)
        if not m:
            continue
        op, rest = m.group(2), m.group(3)
        count += 1
        f2fp += op.startswith("F2FP")
        rest = re.sub(r"desc\[[^\]]*\]", "", rest)
        addr = re.findall(r"\[([^\]]*)\]", rest)
        ops = [t.strip() for t in re.sub(r"\[[^\]]*\]", "ADDR", rest).split(",")]
        dest: list[int] = []
        if op.startswith("SHFL") and ops and not _regs(ops[0]):
            ops = ops[1:]  # SHFL writes a predicate, then its register
        if ops and not op.startswith(_NO_DEST):
            dest = _regs(ops[0])
            width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
            if dest and width > 1:
                dest = [dest[0] + i for i in range(width)]
            ops = ops[1:]
        reads = [r for t in ops for r in _regs(t)]
        reads += [r for a in addr for t in re.split(r"[+\s]", a) for r in _regs(t)]
        if op == "LDC" and dest == [1]:
            written.add(1)
            continue
        data_r1 = 1 in [r for t in ops for r in _regs(t)]
        unread = [r for r in reads if r not in written and r != 1]
        if data_r1 or unread:
            bad.append(line.strip())
        written.update(dest)
    return count, f2fp, bad


def compile_sass(fn, signature: dict, constexprs: dict, num_warps: int) -> str:
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if sig[k] != "constexpr"}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    opts = backend.parse_options({"num_warps": num_warps})
    from triton._C.libtriton import ir

    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    meta: dict = {}
    for name in ("ttir", "ttgir", "llir", "ptx"):
        mod = stages[name](mod, meta)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(str(mod))
        subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-o", cubin, ptx], check=True)
        return subprocess.run(
            [os.path.join(bin_dir, "nvdisasm"), "-c", cubin], check=True, capture_output=True, text=True
        ).stdout


def main() -> int:
    from conversion_core_mx import triton_kernels as tk
    from conversion_core_mx.numerics import MXFP4, MXFP8

    print(f"triton {triton.__version__}")
    bad_total = 0
    words_sig = {
        "w_ptr": "*i32",
        "q_ptr": "*i16",
        "s_ptr": "*u8",
        "flag_ptr": "*i32",
        "ROWS": "i32",
        "N": "i32",
        "GK": "i32",
        "stride_e": "i32",
        "stride_n": "i32",
    }
    generic_sig = {
        "src_ptr": "*bf16",
        "q_ptr": "*fp8e4nv",
        "s_ptr": "*u8",
        "flag_ptr": "*i32",
        "ROWS": "i32",
        "N": "i32",
        "K": "i32",
        "stride_e": "i32",
        "stride_n": "i32",
        "stride_k": "i32",
    }
    configs = []
    for fmt in (MXFP8, MXFP4):
        fp4 = fmt is MXFP4
        common = dict(OFFSET=fmt.offset, QMAX=fmt.qmax, SATURATE=fmt.saturate, FP4=fp4, SOFT_ROUND=False)
        for variant in ("words", "words_magic", "words_int", "words_cvt"):
            if (fp4 and variant == "words_cvt") or (not fp4 and variant != "words" and variant != "words_cvt"):
                continue
            for br, groups, warps in ((16, 1, 4), (tk.WORDS_BLOCK_R, tk.WORDS_BLOCK_C // 32, tk.WORDS_NUM_WARPS)):
                ce = dict(common, MAGIC=variant == "words_magic", CVT=variant == "words_cvt", INT64=False)
                ce.update(E2M1_INT=variant == "words_int")
                ce.update(BLOCK_R=br, GROUPS=groups)
                sig = dict(words_sig, q_ptr="*u8" if fp4 else "*i16")
                label = f"{fmt.name} {variant} {br}x{groups * 32} w{warps}"
                configs.append((label, tk._mx_words_kernel, sig, ce, warps, True))
        ce = dict(common, BLOCK_R=tk.BLOCK_R, BLOCK_C=tk.BLOCK_C)
        sig = dict(generic_sig, q_ptr="*u8" if fp4 else "*fp8e4nv")
        # Branches and masked loads' "other" halves make the linear scan report reads that are not bugs.
        configs.append((f"{fmt.name} generic (branchy: info)", tk._mx_kernel, sig, ce, tk.NUM_WARPS, False))
    # Expected to show suspicious reads with the ptxas of Triton 3.6 (12.8): the old pattern.
    control = ("control: old fp8 cast+pack", _old_pack_control, {"w_ptr": "*i32", "q_ptr": "*i16"}, {"BLOCK": 1024}, 4)
    configs.append((*control, False))
    for label, fn, sig, ce, warps, strict in configs:
        try:
            count, f2fp, bad = scan(compile_sass(fn, sig, ce, warps))
        except Exception as exc:  # noqa: BLE001 -- report and go on
            print(f"{label:34s} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}")
            bad_total += 1
            continue
        bad_total += bool(bad) and strict
        print(f"{label:34s} {count:5d} SASS, {f2fp:3d} F2FP, {len(bad)} suspicious read(s)")
        for line in bad[:3]:
            print(f"    {line}")
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
