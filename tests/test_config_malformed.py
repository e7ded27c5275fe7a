"""Malformed configs end in ``ConfigError`` (a ValueError) naming the key and what was expected."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import conversion_core as cc

FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _whole(qc: object) -> dict:
    return {"model_type": "llama", "quantization_config": qc}


# (config, words the message must contain): each message names the key at fault and what was expected
MALFORMED = {
    "quantization_config is a list": (_whole([1, 2]), ["quantization_config", "mapping"]),
    "quantization_config is a string": (_whole('{"quant_method": "fp8"}'), ["quantization_config", "mapping"]),
    "quantization_config is a number": (_whole(8), ["quantization_config", "mapping"]),
    "quant_method missing in whole config": (_whole({"bits": 4}), ["quant_method", "string"]),
    "quant_method missing in bare config": ({"bits": 4, "group_size": 128}, ["quant_method"]),
    "quant_method null": ({"quant_method": None}, ["quant_method", "string"]),
    "quant_method a number": ({"quant_method": 8}, ["quant_method", "string"]),
    "quant_method a list": ({"quant_method": ["fp8"]}, ["quant_method", "string"]),
    "quant_method empty": ({"quant_method": ""}, ["quant_method", "non-empty"]),
    "weight_block_size one int": ({**FP8, "weight_block_size": 128}, ["weight_block_size", "two positive ints"]),
    "weight_block_size length 1": ({**FP8, "weight_block_size": [128]}, ["weight_block_size", "two positive ints"]),
    "weight_block_size length 3": ({**FP8, "weight_block_size": [1, 128, 128]}, ["weight_block_size", "two"]),
    "weight_block_size strings": ({**FP8, "weight_block_size": ["128", "128"]}, ["weight_block_size", "ints"]),
    "weight_block_size floats": ({**FP8, "weight_block_size": [128.0, 128.0]}, ["weight_block_size", "ints"]),
    "weight_block_size bools": ({**FP8, "weight_block_size": [True, True]}, ["weight_block_size", "ints"]),
    "weight_block_size zero": ({**FP8, "weight_block_size": [0, 128]}, ["weight_block_size", "positive"]),
    "weight_block_size negative": ({**FP8, "weight_block_size": [-128, 128]}, ["weight_block_size", "positive"]),
    "weight_block_size a string": ({**FP8, "weight_block_size": "128x128"}, ["weight_block_size", "list"]),
    "weight_block_size a mapping": ({**FP8, "weight_block_size": {"n": 128}}, ["weight_block_size", "list"]),
    "fmt a number": ({**FP8, "fmt": 4}, ["fmt", "string"]),
    "scale_fmt a list": ({**FP8, "scale_fmt": ["ue8m0"]}, ["scale_fmt", "string"]),
    "activation_scheme a bool": ({**FP8, "activation_scheme": True}, ["activation_scheme", "string"]),
    "ignored_layers a string": ({**FP8, "ignored_layers": "lm_head"}, ["ignored_layers", "list of module names"]),
    "modules_to_not_convert with ints": ({**FP8, "modules_to_not_convert": [0]}, ["modules_to_not_convert", "list"]),
    "ignore a mapping": (
        {"quant_method": "compressed-tensors", "ignore": {"lm_head": True}},
        ["ignore", "list of module names"],
    ),
    "config_groups a list": (
        {"quant_method": "compressed-tensors", "config_groups": [{"weights": {}}]},
        ["config_groups", "mapping"],
    ),
    "config group a string": (
        {"quant_method": "compressed-tensors", "config_groups": {"group_0": "fp8"}},
        ["config_groups", "group_0", "mapping"],
    ),
    "non-string key": ({**FP8, 1: "x"}, ["non-string key", "1"]),
    "a lock value": ({**FP8, "extra": threading.Lock()}, ["extra", "lock", "cannot be copied"]),
    "fmt as bytes": ({**FP8, "fmt": b"e4m3"}, ["fmt", "string"]),
    "neither a model config nor a quantization_config": ({"hidden_size": 4096}, ["quant_method", "model_type"]),
    "a list instead of a config": ([FP8], ["list", "expected a dict"]),
    "None instead of a config": (None, ["NoneType", "expected a dict"]),
    "an int instead of a config": (42, ["int", "expected a dict"]),
    "bytes instead of a config": (b"config.json", ["bytes", "expected a dict"]),
    "empty string": ("", ["empty", "config.json"]),
    "blank string": ("   ", ["empty", "config.json"]),
    "path with a NUL byte": ("/tmp/a\x00b/config.json", ["/tmp/a"]),
    "missing json path": ("/nonexistent-dir-for-cc-tests/config.json", ["does not exist"]),
}


@pytest.mark.parametrize("config, words", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_config_is_a_config_error_naming_the_key(config, words):
    for call in (cc.select_default_conversion, cc.explain):
        with pytest.raises(cc.ConfigError) as excinfo:
            call(config)
        assert isinstance(excinfo.value, ValueError)
        assert isinstance(excinfo.value, cc.ConversionCoreError)
        message = str(excinfo.value)
        for word in words:
            assert word in message, f"{word!r} missing from: {message}"


def test_deeply_nested_config_is_refused_not_a_recursion_error():
    nested: dict = {}
    inner = nested
    for _ in range(5000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(cc.ConfigError, match="nested"):
        cc.select_default_conversion({**FP8, "extra": nested})


def test_self_referencing_config_is_refused():
    qc: dict = dict(FP8)
    qc["self"] = qc
    with pytest.raises(cc.ConfigError, match="nested"):
        cc.select_default_conversion(qc)


def _write(tmp_path: Path, text: str | bytes, name: str = "config.json") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


FILES = {
    "not JSON": ("{'quant_method': 'fp8'}", ["not valid JSON"]),
    "truncated JSON": ('{"quantization_config": {"quant_method": "fp8"', ["not valid JSON"]),
    "empty file": ("", ["not valid JSON"]),
    "a JSON list": ("[1, 2]", ["JSON object", "list"]),
    "a JSON string": ('"fp8"', ["JSON object", "str"]),
    "not UTF-8": (b'{"model_type": "\xff\xfe"}', ["cannot read"]),
    "quantization_config a list": (json.dumps(_whole([])), ["quantization_config", "mapping"]),
    "weight_block_size of length 3": (json.dumps(_whole({**FP8, "weight_block_size": [1, 2, 3]})), ["two positive"]),
    "deeply nested JSON": ('{"model_type": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested"]),
}


@pytest.mark.parametrize("text, words", FILES.values(), ids=FILES.keys())
def test_bad_config_json_file_is_a_config_error(tmp_path, text, words):
    path = _write(tmp_path, text)
    for location in (path, str(path), tmp_path):
        with pytest.raises(cc.ConfigError) as excinfo:
            cc.select_default_conversion(location)
        message = str(excinfo.value)
        assert "config.json" in message
        for word in words:
            assert word in message, f"{word!r} missing from: {message}"


def test_model_directory_without_config_json(tmp_path):
    _write(tmp_path, "{}", name="generation_config.json")
    with pytest.raises(cc.ConfigError, match="has no config.json") as excinfo:
        cc.select_default_conversion(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_unreadable_config_json(tmp_path, monkeypatch):
    """An OSError while reading (permissions, I/O) is reported with the path; simulated so root runs it too."""
    path = _write(tmp_path, json.dumps(_whole(FP8)))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(cc.ConfigError, match="cannot read .*config.json.*Permission denied"):
        cc.select_default_conversion(path)


def test_config_json_that_is_a_directory(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(cc.ConfigError, match="config.json"):
        cc.select_default_conversion(tmp_path)


def test_valid_file_forms_still_work(tmp_path):
    """The refusals above are not a blanket refusal: the same forms resolve when well formed."""
    _write(tmp_path, json.dumps(_whole(FP8)))
    assert cc.select_default_conversion(tmp_path) == "fp8_128x128"
    assert cc.select_default_conversion(tmp_path / "config.json") == "fp8_128x128"
    assert cc.select_default_conversion({"quantization_config": None, "model_type": "llama"}) == "bf16_cast"
    assert cc.select_default_conversion({}) == "bf16_cast"
    assert cc.select_default_conversion({**FP8, "weight_block_size": (128, 128)}) == "fp8_128x128"


def test_predicates_see_a_plain_copy():
    """Str-valued enums (transformers' QuantizationMethod) reach predicates as plain str."""
    import enum

    from conversion_core.selection.config import quantization_config_of

    class Method(str, enum.Enum):
        FP8 = "fp8"

    qc = quantization_config_of({**FP8, "quant_method": Method.FP8, "weight_block_size": (128, 128)})
    assert type(qc["quant_method"]) is str and qc["quant_method"] == "fp8"
    assert qc["weight_block_size"] == [128, 128]
    assert json.loads(json.dumps(qc)) == qc


def test_non_json_leaves_reach_no_match_not_a_crash():
    """Objects a quantizer's to_dict() may leave (a dtype, a set) are copied, not refused: no
    built-in rule matches them, and the no-match error still names the config."""
    import torch

    qc = {"quant_method": "torchao", "quant_type": {"dtype": torch.int8, "layers": {1, 2}}}
    with pytest.raises(cc.NoMatchingConversionError, match="torchao"):
        cc.select_default_conversion(qc)
    assert qc["quant_type"]["layers"] == {1, 2}  # the caller's config is untouched
