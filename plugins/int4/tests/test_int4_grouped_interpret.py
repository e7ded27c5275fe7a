"""int4 grouped launches write the bytes of one launch per tensor, under Triton's interpreter.

``launch_group`` converts a whole run of ``int4_w4a16*`` calls in one kernel launch per group of
like sources (shape, dtype, K contiguous, and the view the single launch reads: int32 pairs for
bf16 with K contiguous and 4-byte aligned rows, int16 bits for other bf16, fp16 / fp32 as they
are), each program finding its tensor in a small device table. As for the MX plugin
(plugins/mx/tests/test_mx_grouped_interpret.py), these tests hold it to two independent
expectations on awkward inputs (per-expert views of one stack, 3D stacks, a transposed source,
column slices with K strided and offset by one element, fp16 / fp32, shapes that split into
several groups): the bytes of one ``launch`` per tensor and the torch path's bytes. NaN/Inf in
one member raises the flag the single launch raises and ``convert_many`` names it; ``convert_many``
and the plan's moving-source step are checked to use the grouped launch. Shapes are tiny: the
interpreter runs every program in numpy. A normal pytest run re-runs this file in a child with
``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()
SYM = ["int4_w4a16_g128", "int4_w4a16_g32"]
ASYM = ["int4_w4a16_asym_g128", "int4_w4a16_asym_g32"]

if not INTERPRETING:

    def test_int4_grouped_launches_under_interpreter() -> None:
        rerun_under_triton_interpreter(__file__, timeout_s=600)

else:
    from conversion_core_int4 import FORMATS, triton_kernels

    import conversion_core as cc
    from conversion_core.plan import build_plan
    from conversion_core.testing import check_grouped_launch, convert_on_backend, record_calls

    def _conversion(name: str) -> cc.Conversion:
        return cc.load_registry().get(name)

    def _source(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Rows of very different magnitude, a zero row, a positive row (asymmetric: min = 0), a
        subnormal row and an outlier: every regime of the scale and the zero point."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 4, (*shape[:-1], 1), generator=g))
        x[..., 0, :] = 0
        x[..., -1, 7] = -6.0
        if shape[-2] > 3:
            x[..., 1, :] = x[..., 1, :].abs()
            x[..., 2, :] = 1e-40
        return x.to(dtype)

    def _sources() -> list[torch.Tensor]:
        stack = _source((3, 9, 128), torch.bfloat16, seed=1)
        wide = _source((9, 256), torch.bfloat16, seed=2)
        return [
            stack[0],  # per-expert views of one stack: one pairs group, three table rows
            stack[1],
            stack[2],
            wide[:, 128:],  # column slice, K contiguous: the same pairs group, rows 256 apart
            wide[:, 1:129],  # column slice one element in: int16 bits (no pairs), alignment hint off
            wide[:, ::2],  # column slice, K strided
            _source((128, 9), torch.bfloat16, seed=3).t(),  # transposed: K strided
            _source((2, 9, 128), torch.bfloat16, seed=4),  # a 3D stack: shape output (3,)
            _source((2, 16, 128), torch.float32, seed=5),  # fp32 stack, rows a tile multiple (no masks)
            _source((16, 128), torch.float16, seed=6),
            _source((8, 256), torch.bfloat16, seed=7),  # several group blocks (g32) per row
        ]

    def _allocated(conversion: cc.Conversion, sources: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        calls = []
        for src in sources:
            buffers = conversion.allocate(src.shape)
            for b in buffers:  # garbage wherever nothing is written
                b.view(torch.uint8).fill_(0xA5)
            calls.append((src, *buffers))
        return calls

    def _bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int16) if t.dtype == torch.bfloat16 else t

    def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], what: str) -> None:
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: output {i} dtype/shape"
            assert torch.equal(_bits(x), _bits(y)), f"{what}: output {i} bytes differ"

    def _count_kernel_launches(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
        """Record the plugin's grouped launches (their sizes) and its single launches."""
        seen = record_calls(triton_kernels, "launch_group", "launch", patch=monkeypatch.setattr)
        return seen["launch_group"], seen["launch"]

    @pytest.mark.parametrize("name", SYM + ASYM)
    def test_grouped_bytes_equal_one_launch_per_tensor_and_the_torch_path(name) -> None:
        check_grouped_launch(_conversion(name), _sources())

    def test_groups_split_by_shape_dtype_and_layout() -> None:
        """Mixed shapes, dtypes and layouts split into several launches; like calls share one."""
        fmt = FORMATS["int4_w4a16_asym_g32"]
        calls = _allocated(fmt.conversion(), _sources())
        launched = triton_kernels.launch_group(calls, torch.zeros(1, dtype=torch.int32), fmt.group)
        assert sorted(launched) == sorted(
            [
                ("pairs", 4),  # stack[0..2] and wide[:, 128:]: (9, 128) as (9, 64) words
                ("bf16", 1),  # wide[:, 1:129]: K contiguous but one element in
                ("bf16", 2),  # wide[:, ::2] and the transposed source: (9, 128), K strided
                ("pairs", 1),  # the (2, 9, 128) stack
                ("float", 1),
                ("float", 1),
                ("pairs", 1),  # (8, 256)
            ]
        )

    @pytest.mark.parametrize(
        "variant",
        [
            triton_kernels.Variant(uniform=False, flag_red=False, pairs=False),
            triton_kernels.Variant(wt=1, i32=False, even=False),
        ],
        ids=["flag-store-no-pairs", "wt1-i64-no-even"],
    )
    def test_explicit_variant_grouped_equals_single(variant) -> None:
        """A variant reaches the grouped kernel as it reaches the single one (64-bit offsets included)."""
        fmt = FORMATS["int4_w4a16_asym_g32"]
        conversion = fmt.conversion()
        sources = _sources()[2:8]
        grouped = _allocated(conversion, sources)
        single = _allocated(conversion, sources)
        flag = torch.zeros(1, dtype=torch.int32)
        triton_kernels.launch_group(grouped, flag, fmt.group, variant)
        for src, packed, scale, shape_out, zp in single:
            triton_kernels.launch(src, packed, scale, shape_out, zp, flag, fmt.group, variant)
        assert int(flag) == 0
        for g, s in zip(grouped, single, strict=True):
            _same(g[1:], s[1:], f"{variant.name} {tuple(g[0].shape)} stride {g[0].stride()}")
        with pytest.raises(ValueError, match="Variant only"):
            triton_kernels.launch_group(grouped, flag, fmt.group, triton_kernels.V1_DEFAULT)  # type: ignore[arg-type]

    @pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_asym_g32"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3.4e38], ids=["nan", "inf", "beyond-bf16"])
    def test_non_finite_in_one_member_is_flagged_as_by_launch_and_named(name, bad) -> None:
        conversion = _conversion(name)
        dtype = torch.float32 if bad == 3.4e38 else torch.bfloat16  # 3.4e38 rounds to bf16 Inf
        sources = [_source((9, 128), dtype, seed=s) for s in range(3)]
        sources[1][-1, -5] = bad  # in the last, partial row block of the middle member
        flag = torch.zeros(1, dtype=torch.int32)
        conversion.launch_group(_allocated(conversion, [sources[0], sources[2]]), flag)
        assert int(flag) == 0
        single = torch.zeros(1, dtype=torch.int32)
        conversion.launch(*_allocated(conversion, [sources[1]])[0], single)
        assert int(single) == 1
        conversion.launch_group(_allocated(conversion, sources), flag)
        assert int(flag) == 1
        with pytest.raises(cc.ConversionInputError, match=r"convert_many item 1: .*\(9, 128\) holds NaN or Inf"):
            conversion.convert_many(_allocated(conversion, sources))
        ok = _allocated(conversion, [sources[0]])
        conversion.convert_many(ok)  # the reused flag was cleared: the next call is clean
        _same(ok[0][1:], conversion.convert(sources[0]), "after a flagged convert_many")

    def test_empty_group_and_empty_sources_launch_nothing() -> None:
        conversion = _conversion("int4_w4a16_asym_g128")
        flag = torch.zeros(1, dtype=torch.int32)
        assert triton_kernels.launch_group([], flag, 128) == []
        conversion.launch_group([], flag)
        # sources without elements (the core never hands them over: it refuses to allocate for them)
        # have no programs in a single launch and none here; the buffers stand in for any
        empty = [torch.empty(0, 128, dtype=torch.bfloat16), torch.empty(2, 0, 128)]
        stand_in = _allocated(conversion, [_source((8, 128), torch.bfloat16, 1)] * 2)
        calls = [(e, *c[1:]) for e, c in zip(empty, stand_in, strict=True)]
        assert triton_kernels.launch_group(calls, flag, 128) == []
        assert int(flag) == 0
        assert all(bool((b.view(torch.uint8) == 0xA5).all()) for c in calls for b in c[1:])
        real = _allocated(conversion, [_source((8, 128), torch.bfloat16, 2)])
        assert triton_kernels.launch_group([calls[0], *real], flag, 128) == [("pairs", 1)]
        assert int(flag) == 0
        assert all(bool((b.view(torch.uint8) == 0xA5).all()) for b in calls[0][1:])

    def test_refusals_name_the_cause_before_any_launch() -> None:
        conversion = _conversion("int4_w4a16_g128")
        calls = _allocated(conversion, [_source((8, 128), torch.bfloat16, seed=s) for s in range(2)])
        odd_k = _source((8, 160), torch.bfloat16, seed=9)
        flag = torch.zeros(1, dtype=torch.int32)
        with pytest.raises(cc.ConversionInputError, match=r"\(8, 160\) has K=160, not a multiple of group_size 128"):
            conversion.launch_group([*calls, (odd_k, *conversion.allocate(odd_k.shape))], flag)
        asym = _allocated(_conversion("int4_w4a16_asym_g128"), [_source((8, 128), torch.bfloat16, seed=3)])
        with pytest.raises(ValueError, match="mix symmetric and asymmetric"):
            triton_kernels.launch_group([*asym, *calls], flag, 128)
        assert all(bool((b.view(torch.uint8) == 0xA5).all()) for c in calls for b in c[1:]), "a refused group wrote"

    def test_convert_many_matches_fn_and_launches_grouped(monkeypatch) -> None:
        conversion = _conversion("int4_w4a16_g32")
        sources = _sources()[5:9]
        seen, singles = _count_kernel_launches(monkeypatch)
        calls = _allocated(conversion, sources)
        conversion.convert_many(calls)
        assert seen == [len(sources)] and not singles
        monkeypatch.undo()
        for src, *buffers in calls:
            _same(tuple(buffers), conversion.convert(src), f"{tuple(src.shape)} convert_many vs fn")

    def _moe_state(experts: int, seed: int) -> dict[str, torch.Tensor]:
        stack = _source((experts, 2, 32, 128), torch.bfloat16, seed=seed)
        sd = {"model.layers.0.input_layernorm.weight": _source((4, 64), torch.bfloat16, seed=seed + 1)[0]}
        for j in range(experts):
            sd[f"model.layers.0.mlp.experts.{j}.gate_proj.weight"] = stack[j, 0]
            sd[f"model.layers.0.mlp.experts.{j}.down_proj.weight"] = stack[j, 1, :, :64].t()  # (64, 32), K strided
        return sd

    def test_plan_step_with_moving_sources_uses_grouped_launches(monkeypatch) -> None:
        name = "int4_w4a16_asym_g32"
        conversion = _conversion(name)
        experts = 2
        plan = build_plan(_moe_state(experts, 0), conversion=name)
        plan.allocate("cpu")
        groups, singles = _count_kernel_launches(monkeypatch)
        for seed in (10, 20):  # new tensors, new addresses, every step
            sd = _moe_state(experts, seed)
            plan.run(sd)
            assert not singles
            assert len(plan.quantized) == 2 * experts
            for e in plan.quantized:
                got = tuple(plan.outputs[n] for n in e.output_names)
                _same(got, convert_on_backend(conversion, sd[e.name], "torch"), e.name)
        assert groups == [2 * experts, 2 * experts]
