"""NVFP4's grouped launch writes the bytes of one launch per tensor, under Triton's interpreter.

``launch_group`` converts a run of standalone tensors in two launches per group of same-shaped
sources: a grouped amax pass (every member's own tensor amax) and a grouped quantizer (the words
kernel where every member's bf16 source reads as int32 words, the generic kernel otherwise), each
program finding its tensor in a device table. As tests/test_grouped_launch.py does for the FP8
plugins, these tests hold every output (packed values, e4m3 group scales, the global scale) of
both conversions to one ``launch`` per tensor and to the torch path on awkward inputs: per-expert
views of one stack, 3D stacks, one-row tensors, transposed / sliced / permuted views, offsets that
break the alignment hint (odd: no words layout at all; even: words without the hint), mixed
dtypes, rows long enough for several amax tiles. NaN/Inf in one member is flagged and
``convert_many`` names it; ``convert_many`` and the plan's step take the grouped launch, and the
plan keeps launching fused-set members (one global scale for q/k/v, gate/up) one by one with the
set's amax. A normal pytest run re-runs this file in a child with ``TRITON_INTERPRET=1`` and
``CONVERSION_CORE_BACKEND=triton``. Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()
NAMES = ["nvfp4", "nvfp4_modelopt"]


if not INTERPRETING:

    def test_nvfp4_grouped_launches_under_interpreter() -> None:
        rerun_under_triton_interpreter(__file__, timeout_s=600)

else:
    from conversion_core_nvfp4 import triton_kernels

    import conversion_core as cc
    from conversion_core.formats import group_table
    from conversion_core.plan import build_plan
    from conversion_core.testing import check_grouped_launch, record_calls, spread_weights

    def _conversion(name: str) -> cc.Conversion:
        return cc.load_registry().get(name)

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Rows of very different magnitude (zero-scale, subnormal and saturated e4m3 group scales), a -0."""
        return spread_weights(shape, dtype, seed)

    def _sources() -> list[torch.Tensor]:
        stack = _weights((3, 20, 64), torch.bfloat16, seed=1)
        odd = _weights((1, 1 + 16 * 32), torch.bfloat16, seed=2)[0]
        even = _weights((1, 2 + 8 * 64), torch.bfloat16, seed=3)[0]
        return [
            stack[0],  # per-expert views of one stack: one group, three table rows
            stack[1],
            stack[2],
            _weights((9, 48), torch.float16, seed=4),  # other dtypes: the generic kernel
            _weights((3, 32), torch.float32, seed=5),
            _weights((1, 96), torch.bfloat16, seed=6),  # one row
            _weights((2, 5, 96), torch.bfloat16, seed=7),  # a 3D stack
            _weights((48, 32), torch.bfloat16, seed=8).t(),  # transposed
            _weights((20, 128), torch.bfloat16, seed=9)[:, ::2],  # column slice: K not contiguous
            _weights((6, 128), torch.bfloat16, seed=10)[:, 32:],  # row-strided, K contiguous: words
            _weights((6, 3, 32), torch.bfloat16, seed=11).permute(1, 0, 2),  # experts permuted
            odd[1:].view(16, 32),  # one element in: no words view, the alignment hint off
            _weights((16, 32), torch.bfloat16, seed=12),  # same shape: shares the odd one's group
            even[2:].view(8, 64),  # two elements in: words without the alignment hint
            _weights((8, 64), torch.bfloat16, seed=13),
            _weights((2, 2064), torch.bfloat16, seed=14),  # several amax tiles per row (programs > 1)
            _weights((2, 4096), torch.float32, seed=15),  # more amax tiles than programs
        ]

    def _bits(t: torch.Tensor) -> torch.Tensor:
        """The bytes of ``t`` (a view: ModelOpt's 0-dim ``weight_scale_2`` too)."""
        return t.reshape(-1).view(torch.uint8)

    def _allocated(conversion: cc.Conversion, sources: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Buffers filled with bytes no conversion writes (0x7F: NaN in e4m3 and float32 halves)."""
        calls = []
        for src in sources:
            buffers = conversion.allocate(src.shape)
            for b in buffers:
                _bits(b).fill_(0x7F)
            calls.append((src, *buffers))
        return calls

    def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], what: str) -> None:
        for name, x, y in zip(("packed", "scales", "global scale"), a, b, strict=True):
            assert torch.equal(_bits(x), _bits(y)), f"{what}: {name} differ"

    def _count(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
        """Record the grouped launches (their sizes) and the one-tensor launches of the plugin."""
        seen = record_calls(triton_kernels, "launch_group", "launch_fused", patch=monkeypatch.setattr)
        return seen["launch_group"], seen["launch_fused"]

    @pytest.mark.parametrize("name", NAMES)
    def test_grouped_bytes_equal_one_launch_per_tensor_and_the_torch_path(name) -> None:
        check_grouped_launch(_conversion(name), _sources())

    def test_each_group_takes_the_words_kernel_exactly_where_its_members_have_the_words_layout() -> None:
        conversion = _conversion("nvfp4")
        groups = {
            (g.shape, g.calls[0][0].dtype, g.contiguous_k): g
            for g in group_table.groups(_allocated(conversion, _sources()))
        }
        bf16 = torch.bfloat16
        words = {key for key, g in groups.items() if triton_kernels._group_words(g) is not None}
        assert ((1, 20, 64), bf16, True) in words and len(groups[((1, 20, 64), bf16, True)].calls) == 3
        assert ((3, 6, 32), bf16, True) in words  # permuted experts: strided, still words
        assert ((1, 6, 96), bf16, True) in words  # row-strided
        assert ((1, 8, 64), bf16, True) in words and not groups[((1, 8, 64), bf16, True)].aligned
        assert ((1, 16, 32), bf16, True) not in words  # one member starts at an odd element
        assert ((1, 20, 64), bf16, False) not in words  # column slice
        assert not any(key[1] != bf16 for key in words)

    @pytest.mark.parametrize("variant", triton_kernels.VARIANTS)
    def test_every_variant_grouped_equals_launch_fused(variant: str) -> None:
        """A forced variant runs on every words group (the others take generic): launch_fused's bytes."""
        conversion = _conversion("nvfp4")
        sources = [s for s in _sources() if s.dtype == torch.bfloat16][:6]
        grouped = _allocated(conversion, sources)
        single = _allocated(conversion, sources)
        flag = torch.zeros(1, dtype=torch.int32)
        triton_kernels.launch_group(grouped, flag, multiplier=False, variant=variant)
        for src, *buffers in single:
            amax = triton_kernels.tensor_amax(src)
            words = triton_kernels.bf16_words(src if src.dim() == 3 else src.unsqueeze(0)) is not None
            triton_kernels.launch_fused(
                src, amax, *buffers, flag, multiplier=False, variant=variant if words else "generic"
            )
        assert int(flag) == 0
        for g, s in zip(grouped, single, strict=True):
            _same(g[1:], s[1:], f"{variant} {tuple(g[0].shape)} stride {g[0].stride()}")

    def test_unknown_variant_refused() -> None:
        with pytest.raises(ValueError, match="unknown variant 'fast'"):
            triton_kernels.launch_group([], torch.zeros(1, dtype=torch.int32), multiplier=False, variant="fast")

    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["words", "generic"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_in_one_member_is_flagged_and_named(name, dtype, bad) -> None:
        conversion = _conversion(name)
        sources = [_weights((20, 64), dtype, seed=s) for s in range(3)]
        sources[1].view(-1)[-5] = bad  # in the last row of the middle member
        flag = torch.zeros(1, dtype=torch.int32)
        conversion.launch_group(_allocated(conversion, sources), flag)
        assert int(flag) != 0
        with pytest.raises(cc.ConversionInputError, match=r"convert_many item 1: .*NaN or Inf") as info:
            conversion.convert_many(_allocated(conversion, sources))
        assert "(20, 64)" in str(info.value)
        ok = _allocated(conversion, [sources[0]])
        conversion.convert_many(ok)  # the reused flag was cleared: the next call is clean
        assert torch.isfinite(ok[0][3]).all()

    @pytest.mark.parametrize("name", NAMES)
    def test_convert_many_matches_fn_and_launches_grouped(name, monkeypatch) -> None:
        conversion = _conversion(name)
        sources = _sources()[:9]
        groups, singles = _count(monkeypatch)
        calls = _allocated(conversion, sources)
        conversion.convert_many(calls)
        assert groups == [len(sources)] and not singles
        for src, *buffers in calls:
            _same(tuple(buffers), conversion.convert(src), f"{name} {tuple(src.shape)} convert_many vs fn")

    def _layer(seed: int) -> dict[str, torch.Tensor]:
        """One decoder layer: two fused sets (q/k/v, gate/up), standalone o/down, and per-expert views."""
        w = lambda shape, s: _weights(shape, torch.bfloat16, seed + s)  # noqa: E731
        experts = w((3, 32, 48), 0)
        sd = {
            "model.layers.0.self_attn.q_proj.weight": w((32, 32), 1),
            "model.layers.0.self_attn.k_proj.weight": w((16, 32), 2),
            "model.layers.0.self_attn.v_proj.weight": w((16, 32), 3),
            "model.layers.0.self_attn.o_proj.weight": w((32, 32), 4),
            "model.layers.0.mlp.gate_proj.weight": w((48, 32), 5),
            "model.layers.0.mlp.up_proj.weight": w((48, 32), 6),
            "model.layers.0.mlp.down_proj.weight": w((32, 48), 7),
            "model.layers.0.input_layernorm.weight": w((32,), 8),
        }
        sd.update({f"model.layers.1.mlp.experts.{j}.down_proj.weight": experts[j] for j in range(3)})
        return sd

    @pytest.mark.parametrize("name", NAMES)
    def test_plan_step_groups_standalone_tensors_and_keeps_shared_sets_apart(name, monkeypatch) -> None:
        """Fused-set members go through ``shared_amax.launch`` with the set's amax, one launch each,
        the other tensors through one grouped launch; every output is the torch path's plan's."""
        plan = build_plan(_layer(0), conversion=name)
        members = {m for e in plan.quantized for m in e.shared_with}
        assert len(members) == 5
        standalone = [e.name for e in plan.quantized if not e.shared_with]
        assert len(standalone) == 5
        plan.allocate("cpu")
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
        reference = build_plan(_layer(0), conversion=name)
        reference.allocate("cpu")
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
        groups, singles = _count(monkeypatch)
        for seed in (10, 20):  # new tensors at new addresses every step
            sd = _layer(seed)
            got = plan.run(sd)
            monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
            try:
                want = reference.run(sd)
            finally:
                monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
            assert set(got) == set(want)
            for out in got:
                assert torch.equal(_bits(got[out]), _bits(want[out])), f"{name} step {seed}: {out}"
        assert groups == [len(standalone)] * 2 and singles == [1] * (2 * len(members))
