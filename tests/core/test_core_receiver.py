"""``accepts``: the receiver refuses bytes converted for another kernel."""

from __future__ import annotations

import json

import pytest

import conversion_core as cc

TAGS = {
    "compile_target": "zz_kernel",
    "compile_metadata": {"block_size": [128, 128], "dtype": "e4m3", "layout": {"axes": [0, 1], "kind": "blocks"}},
}


@pytest.mark.parametrize("target_filter", [None, ["zz_kernel"], ("other", "zz_kernel"), {"zz_kernel"}])
def test_filter_none_or_containing_the_target_accepts(target_filter: object) -> None:
    assert cc.accepts(TAGS, target_filter) is True


@pytest.mark.parametrize("target_filter", [[], ["other"], ("zz_kernel_v2", "hf_raw")])
def test_filter_not_containing_the_target_refuses(target_filter: object) -> None:
    assert cc.accepts(TAGS, target_filter) is False


@pytest.mark.parametrize(
    "required",
    [
        None,
        {},
        {"dtype": "e4m3"},
        {"block_size": [128, 128]},
        {"block_size": (128, 128)},  # lists and tuples compare equal
        {"layout": {"axes": (0, 1), "kind": "blocks"}},  # at any depth
        {"dtype": "e4m3", "block_size": (128, 128)},
    ],
)
def test_required_metadata_subset_accepts(required: object) -> None:
    assert cc.accepts(TAGS, ["zz_kernel"], required) is True


@pytest.mark.parametrize(
    "required",
    [
        {"scale_layout": "blockwise"},  # missing key
        {"dtype": "e5m2"},  # wrong value
        {"block_size": [128, 64]},
        {"block_size": [128]},
        {"layout": {"axes": [0, 1]}},  # nested values are compared whole, not as subsets
        {"dtype": "e4m3", "block_size": [64, 64]},  # one of two wrong
    ],
)
def test_required_metadata_missing_or_different_refuses(required: object) -> None:
    assert cc.accepts(TAGS, None, required) is False


def test_tuples_in_tags_match_lists_in_requirement() -> None:
    tags = {"compile_target": "zz_kernel", "compile_metadata": {"block_size": (128, 128)}}
    assert cc.accepts(tags, None, {"block_size": [128, 128]}) is True


def test_target_and_metadata_must_both_pass() -> None:
    assert cc.accepts(TAGS, ["other"], {"dtype": "e4m3"}) is False
    assert cc.accepts(TAGS, ["zz_kernel"], {"dtype": "e5m2"}) is False


def test_tags_that_went_through_json_are_still_accepted() -> None:
    conversion = cc.Conversion(
        name="zz_tagged",
        fn=lambda src, out, scale: None,
        requires_scale=False,
        compile_target="zz_kernel",
        compile_metadata={"block_size": (128, 128), "dtype": "e4m3"},
    )
    wire = json.loads(json.dumps(conversion.tags))
    assert cc.accepts(wire, ["zz_kernel"], {"block_size": (128, 128), "dtype": "e4m3"}) is True
    assert cc.accepts(conversion.tags, ["zz_kernel"], {"block_size": [128, 128]}) is True
    assert cc.accepts(wire, ["hf_raw"]) is False


def test_a_single_string_filter_is_a_type_error() -> None:
    # "zz_kernel" would otherwise be read as the set of its characters
    with pytest.raises(TypeError) as info:
        cc.accepts(TAGS, "zz_kernel")
    assert isinstance(info.value, cc.ConversionCoreError)


def test_tags_must_be_a_mapping() -> None:
    with pytest.raises(TypeError):
        cc.accepts([("compile_target", "zz_kernel")])  # type: ignore[arg-type]


def test_tags_without_metadata_refuse_any_requirement() -> None:
    assert cc.accepts({"compile_target": "zz_kernel"}, ["zz_kernel"], {"dtype": "e4m3"}) is False
    assert cc.accepts({"compile_target": "zz_kernel"}, ["zz_kernel"]) is True
