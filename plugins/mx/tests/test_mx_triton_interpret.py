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

    import triton
    import triton.language as tl
    from conversion_core_mx import torch_path, triton_kernels
    from conversion_core_mx.numerics import MXFP4, MXFP8

    from conversion_core.formats.fp4_triton import bf16_words

    def _split_experts(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
        """A bf16 stack whose experts do not merge into rows (a spare row per expert), K contiguous."""
        e, n, k = shape
        return _weights((e, n + 1, k), torch.bfloat16, seed)[:, :n, :]

    def _top_scale(shape: tuple[int, ...]) -> torch.Tensor:
        x = _weights(shape, torch.bfloat16, seed=5)
        x[1, :] = float(torch.finfo(torch.bfloat16).max)  # the top scale: limit 3 (e2m1), 240 (e4m3)
        x[2, :32] = -float(torch.finfo(torch.bfloat16).max)
        return x

    VARIANT_CASES = [
        ("1x32 bf16", lambda: _weights((1, 32), torch.bfloat16, 1)),
        ("17x96 bf16 (odd rows)", lambda: _weights((17, 96), torch.bfloat16, 2)),
        ("3x2048 bf16", lambda: _weights((3, 2048), torch.bfloat16, 3)),
        ("2x2080 bf16 (K not a tile)", lambda: _weights((2, 2080), torch.bfloat16, 4)),
        ("3x5x320 bf16 stack", lambda: _weights((3, 5, 320), torch.bfloat16, 5)),
        ("3x5x64 bf16 split experts", lambda: _split_experts((3, 5, 64), 6)),
        ("row-strided bf16", lambda: _weights((6, 160), torch.bfloat16, 7)[:, 64:]),
        ("top scale bf16", lambda: _top_scale((4, 64))),
        ("transposed bf16", lambda: _weights((64, 12), torch.bfloat16, 8).t()),
        ("9x64 fp32", lambda: _weights((9, 64), torch.float32, 9)),
        ("3x5x96 fp16", lambda: _weights((3, 5, 96), torch.float16, 10)),
    ]

    @pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
    @pytest.mark.parametrize("make", [c[1] for c in VARIANT_CASES], ids=[c[0] for c in VARIANT_CASES])
    def test_every_variant_equals_torch_path(fmt, make):
        src = make()
        conversion = cc.load_registry().get(fmt.name)
        want_q, want_s = conversion.allocate(src.shape, "cpu")
        torch_path.quantize(src, want_q, want_s, fmt)
        x = src if src.dim() == 3 else src.unsqueeze(0)
        words = bf16_words(x) is not None
        assert words == (src.dtype == torch.bfloat16 and src.stride(-1) == 1)
        for variant in triton_kernels.FORMAT_VARIANTS[fmt.name] if words else ("generic",):
            tiles = [(None, None, None), (32, 1024, 8)] + ([(1, 32, 1), (4, 64, 2)] if src.numel() <= 2048 else [])
            for tile in tiles:
                q, s = conversion.allocate(src.shape, "cpu")
                q.view(torch.uint8).fill_(0x7F)
                s.fill_(0xFF)
                flag = torch.zeros(1, dtype=torch.int32)
                assert triton_kernels.launch(src, q, s, flag, fmt, *tile, variant=variant) == variant
                assert int(flag) == 0
                assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), (variant, tile)
                assert torch.equal(s, want_s), (variant, tile)
        if not words:
            with pytest.raises(ValueError, match="needs a bf16 source"):
                triton_kernels.launch(src, q, s, flag, fmt, variant="words")

    def _every_bf16_under(anchors: list[float], subnormals: bool = True) -> torch.Tensor:
        """Groups of 32: one anchor (the group amax, so the scale) then every finite bf16 of magnitude <= it.

        Every bf16 bit pattern at or below the anchor appears, both signs, ``-0.0`` included, so
        each scale's rounding meets every mantissa, the e4m3/e2m1 subnormal range and its ties.
        """
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        every = every[torch.isfinite(every)]
        if not subnormals:
            every = every[(every == 0) | (every.abs() >= 2.0**-126)]
        groups = []
        for anchor in anchors:
            a = torch.tensor(anchor, dtype=torch.bfloat16)
            vals = every[every.abs() <= a]
            pad = (-len(vals)) % 31
            vals = torch.cat([vals, torch.zeros(pad, dtype=torch.bfloat16)]).view(-1, 31)
            groups.append(torch.cat([a.expand(len(vals), 1), vals], dim=1))
        g = torch.cat(groups)
        g = torch.cat([g, torch.zeros((-len(g)) % 8, 32, dtype=torch.bfloat16)])
        return g.reshape(-1, 256)

    #: Group amaxes: bf16's smallest subnormal and normal, tiny (scale byte 0), 1, 448, 3e4, bf16 max (top scale).
    ANCHORS = [2.0**-133, 2.0**-126, 2.0**-110, 1.0, 448.0, 3.0e4, float(torch.finfo(torch.bfloat16).max)]

    @pytest.mark.parametrize(
        ("fmt", "variant"),
        [(f, v) for f in (MXFP8, MXFP4) for v in triton_kernels.FORMAT_VARIANTS[f.name]],
        ids=lambda x: getattr(x, "name", x),
    )
    def test_every_bf16_value(fmt, variant):
        # The interpreter's own bf16 -> float32 cast mangles bf16 subnormals (the GPU's is exact), and
        # only the generic kernel uses that cast (words read the bits): it gets no subnormal.
        if variant == "generic":
            src = _every_bf16_under([a for a in ANCHORS if a >= 2.0**-126], subnormals=False)
        else:
            src = _every_bf16_under(ANCHORS)
        conversion = cc.load_registry().get(fmt.name)
        want_q, want_s = conversion.allocate(src.shape, "cpu")
        torch_path.quantize(src, want_q, want_s, fmt)
        q, s = conversion.allocate(src.shape, "cpu")
        flag = torch.zeros(1, dtype=torch.int32)
        assert triton_kernels.launch(src, q, s, flag, fmt, variant=variant) == variant
        assert int(flag) == 0
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(s, want_s)

    @triton.jit
    def _e4m3_byte_kernel(v_ptr, out_ptr, limit, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, triton_kernels._e4m3_byte(v, limit), mask=offs < n)

    def _e4m3_edges() -> torch.Tensor:
        """float32 values at and around every e4m3 value and midpoint, float32 subnormals, random ones."""
        grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
        mids = (grid[:-1] + grid[1:]) / 2  # exact in float32: the ties
        base = torch.cat([grid, mids, torch.tensor([464.0, 480.0, 1.0e4, 2.0**-10, 2.0**-11, 3 * 2.0**-11])])
        near = base.view(torch.int32)
        around = torch.cat([near - 1, near, near + 1]).clamp(min=0).view(torch.float32)
        sub = torch.tensor([1, 2, 0x7FFFFF, 0x800000, 0x800001], dtype=torch.int32).view(torch.float32)
        rnd = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 2.0 ** torch.randint(
            -20, 9, (4096,), generator=torch.Generator().manual_seed(1)
        )
        x = torch.cat([around, sub, rnd, torch.tensor([0.0])])
        return torch.cat([x, -x])

    @pytest.mark.parametrize("limit", [448.0, 240.0])
    def test_e4m3_byte_is_torch_cast(limit):
        """:func:`_e4m3_byte` (clamp to ±limit, RNE) equals torch's clamp then float8_e4m3fn cast, bit for bit."""
        v = _e4m3_edges()
        out = torch.empty(v.shape, dtype=torch.int32)
        _e4m3_byte_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, limit, v.numel(), BLOCK=1024)
        want = v.clamp(-limit, limit).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
        bad = (out != want).nonzero().view(-1)[:5]
        assert bad.numel() == 0, [(float(v[i]), int(out[i]), int(want[i])) for i in bad]

    @pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
    def test_every_variant_name_is_accepted(fmt):
        """Aliases (a variant that does not change this format) run the same kernel: same bytes."""
        src = _weights((3, 64), torch.bfloat16, 11)
        conversion = cc.load_registry().get(fmt.name)
        want_q, want_s = conversion.allocate(src.shape, "cpu")
        torch_path.quantize(src, want_q, want_s, fmt)
        for variant in triton_kernels.VARIANTS:
            q, s = conversion.allocate(src.shape, "cpu")
            flag = torch.zeros(1, dtype=torch.int32)
            assert triton_kernels.launch(src, q, s, flag, fmt, variant=variant) == variant
            assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s), variant
        assert set(triton_kernels.FORMAT_VARIANTS[fmt.name]) <= set(triton_kernels.VARIANTS)

    @pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
    @pytest.mark.parametrize("variant", ["words", "words_magic", "words_int", "words_cvt"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_words_flag_non_finite(fmt, variant, bad):
        src = torch.ones(5, 64, dtype=torch.bfloat16)
        src[4, 41] = bad
        q, s = cc.load_registry().get(fmt.name).allocate(src.shape, "cpu")
        flag = torch.zeros(1, dtype=torch.int32)
        triton_kernels.launch(src, q, s, flag, fmt, variant=variant)
        assert int(flag) > 0
