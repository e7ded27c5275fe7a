"""MX grouped launches write the bytes of one launch per tensor, under Triton's interpreter.

``launch_group`` converts a whole run of ``mxfp8`` / ``mxfp4`` calls in one kernel launch per
group of like sources (shape, dtype, K contiguous, and which kernel: the int32 ``words`` one for
bf16 with 4-byte aligned rows, ``generic`` for the rest), each program finding its tensor in a
small device table. As in tests/test_grouped_launch.py for the FP8 plugins, these tests hold it to
two independent expectations on awkward inputs (3D stacks, per-expert views of one stack,
transposed / sliced / permuted views, sources offset by one element (generic, alignment hint off)
and by one word (words, alignment hint off), mixed dtypes, rows longer than a tile, the top
scale): the bytes of one ``launch`` per tensor and the torch path's bytes (the definition). NaN/Inf
in one member is flagged and ``convert_many`` names it; ``convert_many`` and the plan's
moving-source step are checked to use the grouped launch. A normal pytest run re-runs this file in
a child with ``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()
NAMES = ["mxfp8", "mxfp4"]

if not INTERPRETING:

    def test_mx_grouped_launches_under_interpreter() -> None:
        rerun_under_triton_interpreter(__file__, timeout_s=600)

else:
    from conversion_core_mx import triton_kernels
    from conversion_core_mx.numerics import MXFP4, MXFP8

    import conversion_core as cc
    from conversion_core.formats import group_table
    from conversion_core.plan import build_plan
    from conversion_core.testing import check_grouped_launch, convert_on_backend, record_calls, spread_weights

    FORMATS = {"mxfp8": MXFP8, "mxfp4": MXFP4}
    BF16_MAX = float(torch.finfo(torch.bfloat16).max)

    def _conversion(name: str) -> cc.Conversion:
        return cc.load_registry().get(name)

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Rows and elements of very different magnitude (every e4m3 / e2m1 rounding regime, the
        scale floor) and a signed zero; no bf16 subnormal (the interpreter's bf16 cast mangles them)."""
        return spread_weights(shape, dtype, seed, row_exponents=(-8.0, 8.0), element_exponents=(-6.0, 0.0))

    def _top_scale(shape: tuple[int, int], seed: int) -> torch.Tensor:
        """bf16 max in a row: the top scale, where the limit drops to 240 (e4m3) or 3 (e2m1)."""
        x = _weights(shape, torch.bfloat16, seed)
        x[1, :] = BF16_MAX
        x[2, :32] = -BF16_MAX
        return x

    def _sources() -> list[torch.Tensor]:
        stack = _weights((3, 20, 96), torch.bfloat16, seed=1)
        flat = _weights((2 + 16 * 64,), torch.bfloat16, seed=2)
        return [
            stack[0],  # per-expert views of one stack: one words group, three table rows
            stack[1],
            stack[2],
            _weights((2, 9, 64), torch.bfloat16, seed=3),  # a 3D stack, rows not a tile multiple
            _weights((3, 6, 64), torch.bfloat16, seed=4)[:, :5],  # experts that do not merge into rows
            _weights((12, 3, 64), torch.bfloat16, seed=5).permute(1, 0, 2),  # experts permuted, K contiguous
            _weights((1, 320), torch.bfloat16, seed=6),  # one row
            _weights((2, 2080), torch.bfloat16, seed=7),  # long rows, K not a tile multiple (words)
            _weights((3, 608), torch.float16, seed=8),  # long rows (generic: several column blocks)
            _weights((9, 64), torch.float16, seed=9),
            _weights((1, 32), torch.float32, seed=10),
            _weights((16, 64), torch.float32, seed=11),  # same shape as the bf16 ones below: its own group
            _weights((64, 40), torch.bfloat16, seed=12).t(),  # transposed: generic, K strided
            _weights((10, 192), torch.bfloat16, seed=13)[:, ::2],  # column slice: generic, K strided
            flat[1 : 1 + 1024].view(16, 64),  # offset by one element: generic, alignment hint off
            flat[2 : 2 + 1024].view(16, 64),  # offset by one word: words, alignment hint off
            _weights((16, 64), torch.bfloat16, seed=14),  # same shape, aligned: the words group's other row
            _top_scale((4, 64), seed=15),
        ]

    def _allocated(conversion: cc.Conversion, sources: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        calls = []
        for src in sources:
            q, s = conversion.allocate(src.shape)
            q.view(torch.uint8).fill_(0x7F)  # e4m3 NaN / an unlikely e2m1 pair wherever nothing is written
            s.fill_(0xFF)  # E8M0 NaN
            calls.append((src, q, s))
        return calls

    def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], what: str) -> None:
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)), f"{what}: value bytes differ"
        assert torch.equal(a[1], b[1]), f"{what}: scale bytes differ"

    def _count_kernel_launches(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
        """Record the plugin's grouped launches (their sizes) and its single launches."""
        seen = record_calls(triton_kernels, "launch_group", "launch", patch=monkeypatch.setattr)
        return seen["launch_group"], seen["launch"]

    @pytest.mark.parametrize("name", NAMES)
    def test_grouped_bytes_equal_one_launch_per_tensor_and_the_torch_path(name) -> None:
        check_grouped_launch(_conversion(name), _sources())

    @pytest.mark.parametrize("name", NAMES)
    def test_groups_split_by_kernel_shape_dtype_and_layout(name, monkeypatch) -> None:
        """Words calls are grouped by their int32 views (offsets in words), the rest by their sources."""
        built: list[group_table.Group] = []
        original = group_table.groups

        def spy(calls, *args, **kwargs):
            out = original(calls, *args, **kwargs)
            built.extend(out)
            return out

        monkeypatch.setattr(group_table, "groups", spy)
        conversion = _conversion(name)
        calls = _allocated(conversion, _sources())
        launched = triton_kernels.launch_group(calls, torch.zeros(1, dtype=torch.int32), FORMATS[name])
        assert len(launched) == len(built) and sum(n for _, n in launched) == len(calls)
        words_variant = triton_kernels.MXFP8_VARIANT if name == "mxfp8" else triton_kernels.VARIANT
        assert {v for v, _ in launched} == {"generic", words_variant}
        by_key = {(g.shape, g.calls[0][0].dtype, g.contiguous_k): g for g in built}
        assert len(by_key) == len(built)
        stack = by_key[((1, 20, 48), torch.int32, True)]  # three experts of one stack, K = 96 as 48 words
        assert len(stack.calls) == 3
        offset_word = by_key[((1, 16, 32), torch.int32, True)]
        assert len(offset_word.calls) == 2 and not offset_word.aligned  # one source starts one word in
        assert len(by_key[((1, 16, 64), torch.bfloat16, True)].calls) == 1  # one element in: generic
        assert len(by_key[((1, 16, 64), torch.float32, True)].calls) == 1
        assert not by_key[((1, 40, 64), torch.bfloat16, False)].contiguous_k  # transposed
        assert all(g.table.dtype == torch.int64 and g.table.shape == (len(g.calls), 6) for g in built)

    @pytest.mark.parametrize("name", NAMES)
    def test_every_variant_and_tile_grouped_equals_single(name) -> None:
        """An explicit variant and tile reach the grouped kernels as they reach the single ones."""
        fmt = FORMATS[name]
        conversion = _conversion(name)
        sources = [s for s in _sources() if s.dtype == torch.bfloat16 and s.stride(-1) == 1][:6]
        for variant in triton_kernels.FORMAT_VARIANTS[name]:
            for tile in [(None, None, None), (4, 64, 2)]:
                grouped = _allocated(conversion, sources)
                single = _allocated(conversion, sources)
                flag = torch.zeros(1, dtype=torch.int32)
                launched = triton_kernels.launch_group(grouped, flag, fmt, *tile, variant=variant)
                assert {v for v, _ in launched} == {variant}
                for call in single:
                    assert triton_kernels.launch(*call, flag, fmt, *tile, variant=variant) == variant
                assert int(flag) == 0
                for g, s in zip(grouped, single, strict=True):
                    _same(g[1:], s[1:], f"{name} {variant} {tile} {tuple(g[0].shape)}")

    @pytest.mark.parametrize("name", NAMES)
    def test_refusals_name_the_cause_before_any_launch(name) -> None:
        fmt = FORMATS[name]
        conversion = _conversion(name)
        calls = _allocated(conversion, [_weights((4, 64), torch.bfloat16, seed=s) for s in range(2)])
        flag = torch.zeros(1, dtype=torch.int32)
        odd_k = _weights((4, 40), torch.bfloat16, seed=9)
        with pytest.raises(cc.ConversionInputError, match=r"\(4, 40\) has K=40 .* not a multiple of the MX group"):
            triton_kernels.launch_group([*calls, (odd_k, *calls[0][1:])], flag, fmt)
        transposed = _weights((64, 4), torch.bfloat16, seed=10).t()
        with pytest.raises(ValueError, match=r"variant 'words' needs a bf16 source .*\(4, 64\), strides \(1, 4\)"):
            triton_kernels.launch_group([*calls, (transposed, *calls[0][1:])], flag, fmt, variant="words")
        with pytest.raises(ValueError, match="unknown variant 'fast'"):
            triton_kernels.launch_group(calls, flag, fmt, variant="fast")
        assert bool((calls[0][1].view(torch.uint8) == 0x7F).all()), "a refused group wrote bytes"
        assert triton_kernels.launch_group([], flag, fmt) == []

    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["words", "generic"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_in_one_member_is_flagged_and_named(name, dtype, bad) -> None:
        conversion = _conversion(name)
        sources = [_weights((9, 96), dtype, seed=s) for s in range(3)]
        sources[1].view(-1)[-5] = bad  # in the last, partial row block of the middle member
        flag = torch.zeros(1, dtype=torch.int32)
        conversion.launch_group(_allocated(conversion, sources), flag)
        assert int(flag) == 1
        with pytest.raises(cc.ConversionInputError, match=r"convert_many item 1: .*\(9, 96\) holds NaN or Inf"):
            conversion.convert_many(_allocated(conversion, sources))
        ok = _allocated(conversion, [sources[0]])
        conversion.convert_many(ok)  # the reused flag was cleared: the next call is clean
        _same(ok[0][1:], conversion.convert(sources[0]), "after a flagged convert_many")

    @pytest.mark.parametrize("name", NAMES)
    def test_convert_many_matches_fn_and_launches_grouped(name, monkeypatch) -> None:
        conversion = _conversion(name)
        sources = _sources()
        seen, singles = _count_kernel_launches(monkeypatch)
        calls = _allocated(conversion, sources)
        conversion.convert_many(calls)
        assert seen == [len(sources)] and not singles
        for src, q, s in calls:
            _same((q, s), conversion.convert(src), f"{name} {tuple(src.shape)} convert_many vs fn")

    def _moe_state(experts: int, seed: int) -> dict[str, torch.Tensor]:
        stack = _weights((experts, 2, 40, 64), torch.bfloat16, seed=seed)
        sd = {"model.layers.0.input_layernorm.weight": _weights((64,), torch.bfloat16, seed=seed + 1)}
        for j in range(experts):
            sd[f"model.layers.0.mlp.experts.{j}.gate_proj.weight"] = stack[j, 0]
            sd[f"model.layers.0.mlp.experts.{j}.down_proj.weight"] = stack[j, 1, :32].t()  # (64, 32), K strided
        return sd

    def _plan_outputs(plan, entry) -> tuple[torch.Tensor, ...]:
        return tuple(plan.outputs[n] for n in entry.output_names)

    @pytest.mark.parametrize("name", NAMES)
    def test_plan_step_with_moving_sources_uses_grouped_launches(name, monkeypatch) -> None:
        conversion = _conversion(name)
        experts = 3
        plan = build_plan(_moe_state(experts, 0), conversion=name)
        plan.allocate("cpu")
        groups, singles = _count_kernel_launches(monkeypatch)
        for seed in (10, 20):  # new tensors, new addresses, every step
            sd = _moe_state(experts, seed)
            plan.run(sd)
            assert not singles
            assert len(plan.quantized) == 2 * experts
            for e in plan.quantized:
                _same(_plan_outputs(plan, e), convert_on_backend(conversion, sd[e.name], "torch"), e.name)
        assert groups == [2 * experts, 2 * experts]

    def test_capture_warm_up_launches_grouped_with_the_same_bytes(monkeypatch) -> None:
        """The eager run before a capture (``streams=None``) takes the grouped launch too: it builds
        the tables the capture then records (only a GPU run can replay them)."""
        name = "mxfp8"
        conversion = _conversion(name)
        stack = _weights((3, 20, 64), torch.bfloat16, seed=30)
        sd = {f"model.layers.0.mlp.experts.{j}.down_proj.weight": stack[j] for j in range(3)}
        plan = build_plan(sd, conversion=name)
        plan.allocate("cpu")
        groups, singles = _count_kernel_launches(monkeypatch)
        assert plan._flag is not None
        plan._flag.zero_()
        plan._queue(sd, slice(None), None)
        assert groups == [3] and not singles
        for e in plan.quantized:
            _same(_plan_outputs(plan, e), convert_on_backend(conversion, sd[e.name], "torch"), e.name)

    def test_group_int64_bound_covers_every_member() -> None:
        """One member whose rows lie 2**31 words apart switches the whole group's words launch to INT64."""
        from types import SimpleNamespace

        def view(stride_n: int) -> torch.Tensor:
            return torch.empty_strided((1, 2, 32), (0, stride_n, 1), dtype=torch.int32, device="meta")

        near, far = (view(32), None, None), (view(2**31), None, None)
        needs = triton_kernels._group_needs_int64
        assert not needs(SimpleNamespace(shape=(1, 2, 32), calls=[near, near]), 64)  # type: ignore[arg-type]
        assert needs(SimpleNamespace(shape=(1, 2, 32), calls=[near, far]), 64)  # type: ignore[arg-type]
        assert needs(SimpleNamespace(shape=(1, 2, 32), calls=[near]), 2**31)  # type: ignore[arg-type]
