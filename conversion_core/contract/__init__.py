"""The contract plugins program against: conversions, their outputs, rules and hooks."""

from .conversion import FLOAT_SOURCE_DTYPES, RAW_TARGET, Conversion, ConvertFn, LaunchFn, check_buffer, is_dtensor
from .flags import all_finite
from .outputs import (
    ELEMENTWISE,
    PER_BLOCK,
    REPLICATED,
    WEIGHT,
    BlockAmax,
    Output,
    Shape,
    SharedAmax,
    TargetFormat,
    output_tensor_name,
)
from .rule import Rule

__all__ = [
    "ELEMENTWISE",
    "FLOAT_SOURCE_DTYPES",
    "PER_BLOCK",
    "RAW_TARGET",
    "REPLICATED",
    "WEIGHT",
    "BlockAmax",
    "Conversion",
    "ConvertFn",
    "LaunchFn",
    "Output",
    "Rule",
    "Shape",
    "SharedAmax",
    "TargetFormat",
    "all_finite",
    "check_buffer",
    "is_dtensor",
    "output_tensor_name",
]
