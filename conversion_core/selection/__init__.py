"""Choosing and checking formats: a model's quantization_config, the resolver, the receiver's filter."""

from .config import quantization_config_of
from .receiver import accepts
from .resolver import RuleOutcome, explain, select_default_conversion

__all__ = ["RuleOutcome", "accepts", "explain", "quantization_config_of", "select_default_conversion"]
