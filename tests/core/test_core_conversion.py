"""``Conversion``: defaults, the argument checks every plugin gets, read-only metadata, tags."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

import conversion_core as cc


class Recorder:
    """A plugin ``fn`` that records its calls, so a test can prove it never ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def __call__(self, src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
        self.calls.append((tuple(src.shape), scale_out is not None))
        out.copy_(src)
        if scale_out is not None:
            scale_out.fill_(2.0)


def scaled(recorder: Recorder, **changes: Any) -> cc.Conversion:
    """A conversion to float16 with one float32 scale per row (shape (N,))."""
    fields: dict[str, Any] = dict(
        name="zz_rowscale",
        fn=recorder,
        requires_scale=True,
        dst_dtype=torch.float16,
        scale_shape=lambda shape: shape[:-1],
        scale_name="weight_scale",
        compile_target="zz_kernel",
        compile_metadata={"block_size": [1, 8], "nested": {"axes": [0, 1]}},
        src_ndims=(2, 3),
    )
    fields.update(changes)
    return cc.Conversion(**fields)


SRC = torch.ones(4, 8, dtype=torch.bfloat16)


def test_defaults_need_only_name_fn_requires_scale() -> None:
    conversion = cc.Conversion("zz_min", Recorder(), False)
    assert conversion.compile_target == "hf_raw"
    assert dict(conversion.compile_metadata) == {}
    assert conversion.scale_dtype == torch.float32
    assert conversion.dst_dtype == torch.bfloat16
    assert conversion.scale_name is None
    assert conversion.tags == {"compile_target": "hf_raw", "compile_metadata": {}}
    out, scale = conversion.allocate((3, 5))
    assert out.shape == (3, 5) and out.dtype == torch.bfloat16 and scale is None


def test_allocate_and_convert_follow_the_declared_shapes() -> None:
    recorder = Recorder()
    conversion = scaled(recorder)
    out, scale = conversion.allocate((2, 4, 8), "cpu")
    assert (out.shape, out.dtype) == ((2, 4, 8), torch.float16)
    assert scale is not None and (scale.shape, scale.dtype) == ((2, 4), torch.float32)
    out, scale = conversion.convert(SRC)
    assert recorder.calls == [((4, 8), True)]
    assert torch.equal(out, torch.ones(4, 8, dtype=torch.float16))
    assert scale is not None and torch.equal(scale, torch.full((4,), 2.0))


BAD_OUT = {
    "dtype": torch.empty(4, 8, dtype=torch.float32),
    "shape": torch.empty(8, 4, dtype=torch.float16),
    "device": torch.empty(4, 8, dtype=torch.float16, device="meta"),
    "non-contiguous": torch.empty(8, 4, dtype=torch.float16).t(),
}


@pytest.mark.parametrize("problem", sorted(BAD_OUT))
def test_wrong_out_is_refused_naming_expected_shape_and_dtype(problem: str) -> None:
    recorder = Recorder()
    with pytest.raises(cc.ConversionInputError) as info:
        scaled(recorder).fn(SRC, BAD_OUT[problem], torch.empty(4))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'zz_rowscale'" in message and "out" in message
    assert "expected shape (4, 8), dtype torch.float16" in message
    assert recorder.calls == []


BAD_SCALE = {
    "dtype": torch.empty(4, dtype=torch.float16),
    "shape": torch.empty(4, 1),
    "device": torch.empty(4, device="meta"),
    "non-contiguous": torch.empty(4, 2)[:, 0],
}


@pytest.mark.parametrize("problem", sorted(BAD_SCALE))
def test_wrong_scale_out_is_refused_naming_expected_shape_and_dtype(problem: str) -> None:
    recorder = Recorder()
    out = torch.empty(4, 8, dtype=torch.float16)
    with pytest.raises(cc.ConversionInputError) as info:
        scaled(recorder).fn(SRC, out, BAD_SCALE[problem])
    message = str(info.value)
    assert "scale_out" in message and "expected shape (4,), dtype torch.float32" in message
    assert recorder.calls == []


def test_missing_scale_buffer_names_what_to_pass() -> None:
    recorder = Recorder()
    with pytest.raises(cc.ConversionInputError) as info:
        scaled(recorder).fn(SRC, torch.empty(4, 8, dtype=torch.float16), None)
    message = str(info.value)
    assert "requires a scale buffer" in message and "(4,)" in message and "torch.float32" in message
    assert recorder.calls == []


def test_scaled_conversion_without_scale_shape_blames_the_conversion() -> None:
    recorder = Recorder()
    conversion = cc.Conversion(
        "zz_noshape", recorder, True, dst_dtype=torch.float16, scale_name="weight_scale", compile_target="zz_kernel"
    )
    with pytest.raises(cc.ConversionTypeError, match=r"'zz_noshape'.*scale_shape\(\(4, 8\)\) returned None"):
        conversion.convert(SRC)
    assert recorder.calls == []


def test_scale_passed_to_a_no_scale_conversion_is_refused() -> None:
    recorder = Recorder()
    conversion = cc.Conversion("zz_plain", recorder, False, dst_dtype=torch.float32)
    with pytest.raises(cc.ConversionInputError, match="writes no scale"):
        conversion.fn(SRC, torch.empty(4, 8), torch.empty(4))
    assert recorder.calls == []


def test_non_tensor_buffer_is_a_type_error() -> None:
    recorder = Recorder()
    with pytest.raises(cc.ConversionTypeError) as info:
        scaled(recorder).fn(SRC, [0.0] * 32, torch.empty(4))
    assert isinstance(info.value, TypeError) and "expected shape (4, 8)" in str(info.value)


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        (torch.ones(8), r"1-D; expected 2-D or 3-D"),
        (torch.ones(1, 1, 4, 8), "4-D"),
        (torch.ones(4, 8, dtype=torch.int32), "int32"),
    ],
    ids=["1d", "4d", "int"],
)
def test_unsupported_source_is_refused(src: torch.Tensor, expected: str) -> None:
    recorder = Recorder()
    with pytest.raises(cc.ConversionInputError, match=expected):
        scaled(recorder).convert(src)
    assert recorder.calls == []


def test_compile_metadata_is_read_only_and_a_private_copy() -> None:
    metadata = {"block_size": [1, 8], "nested": {"axes": [0, 1]}}
    conversion = scaled(Recorder(), compile_metadata=metadata)
    with pytest.raises(TypeError):
        conversion.compile_metadata["block_size"] = [2, 2]  # type: ignore[index]
    with pytest.raises(TypeError):
        conversion.compile_metadata["nested"]["axes"] = [1, 0]
    with pytest.raises(AttributeError):
        conversion.compile_metadata["block_size"].append(3)
    metadata["block_size"].append(99)
    metadata["nested"]["axes"] = []
    assert conversion.tags["compile_metadata"] == {"block_size": [1, 8], "nested": {"axes": [0, 1]}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        conversion.compile_target = "other"  # type: ignore[misc]


def test_tags_are_json_serialisable_and_a_fresh_copy() -> None:
    conversion = scaled(Recorder())
    tags = conversion.tags
    assert json.loads(json.dumps(tags)) == {
        "compile_target": "zz_kernel",
        "compile_metadata": {"block_size": [1, 8], "nested": {"axes": [0, 1]}},
    }
    tags["compile_metadata"]["block_size"].append(5)
    assert conversion.tags["compile_metadata"]["block_size"] == [1, 8]


@pytest.mark.parametrize("value", [torch.float32, {1, 2}, b"raw", float("nan")])
def test_compile_metadata_that_cannot_travel_as_json_is_refused(value: Any) -> None:
    with pytest.raises(cc.ConversionTypeError, match="compile_metadata"):
        scaled(Recorder(), compile_metadata={"zz_key": value})


def test_replace_keeps_the_checks_bound_to_the_copy() -> None:
    recorder = Recorder()
    original = scaled(recorder)
    copy = original.replace(name="zz_rowscale_fp32", dst_dtype=torch.float32)
    assert copy.raw_fn is recorder and original.raw_fn is recorder  # not wrapped twice
    with pytest.raises(cc.ConversionInputError, match=r"'zz_rowscale_fp32'.*dtype torch.float32"):
        copy.fn(SRC, torch.empty(4, 8, dtype=torch.float16), torch.empty(4))
    with pytest.raises(cc.ConversionInputError, match=r"'zz_rowscale'.*dtype torch.float16"):
        original.fn(SRC, torch.empty(4, 8, dtype=torch.float32), torch.empty(4))
    assert recorder.calls == []
    copy.fn(SRC, torch.empty(4, 8, dtype=torch.float32), torch.empty(4))
    assert recorder.calls == [((4, 8), True)]
    assert dict(copy.compile_metadata) == dict(original.compile_metadata)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"name": ""}, "name"),
        ({"fn": "not callable"}, "fn must be callable"),
        ({"requires_scale": 1}, "requires_scale"),
        ({"dst_dtype": "float16"}, "dst_dtype"),
        ({"scale_name": None}, "scale_name"),
        ({"compile_target": ""}, "compile_target"),
        ({"compile_metadata": [("a", 1)]}, "compile_metadata"),
    ],
)
def test_malformed_conversion_is_refused_at_construction(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(cc.ConversionTypeError, match=expected):
        scaled(Recorder(), **changes)


def test_rule_fields_and_checks() -> None:
    rule = cc.Rule("zz_conv", bool)
    assert (rule.priority, rule.name) == (0, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.priority = 5  # type: ignore[misc]
    with pytest.raises(cc.ConversionTypeError, match="priority"):
        cc.Rule("zz_conv", bool, priority=True)  # type: ignore[arg-type]
    with pytest.raises(cc.ConversionTypeError, match="predicate"):
        cc.Rule("zz_conv", "always")  # type: ignore[arg-type]


def test_every_error_derives_from_the_one_base() -> None:
    for error in (
        cc.ConfigError,
        cc.ConversionInputError,
        cc.ConversionTypeError,
        cc.DuplicateConversionError,
        cc.NoMatchingConversionError,
        cc.PluginError,
        cc.UnknownConversionError,
    ):
        assert issubclass(error, cc.ConversionCoreError)
    assert issubclass(cc.ConversionInputError, ValueError) and issubclass(cc.ConfigError, ValueError)
    assert issubclass(cc.ConversionTypeError, TypeError) and issubclass(cc.UnknownConversionError, KeyError)


def test_allocate_refuses_a_rank_the_conversion_does_not_handle():
    import pytest
    import torch

    import conversion_core as cc

    conv = cc.Conversion(
        name="two_d_only", fn=lambda s, o, sc: None, requires_scale=False, dst_dtype=torch.float32, src_ndims=(2,)
    )
    with pytest.raises(cc.ConversionInputError, match=r"\(8,\) is 1-D; expected 2-D"):
        conv.allocate((8,))
    out, scale = conv.allocate((4, 8))
    assert out.shape == (4, 8) and scale is None
