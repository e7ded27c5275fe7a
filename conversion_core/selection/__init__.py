"""Choosing and checking formats: a model's quantization_config, the resolver, the receiver's side."""

from .config import quantization_config_of
from .digest import digest
from .expectation import Expectations, ExpectedTensor, expectations
from .receiver import accepts
from .resolver import RuleOutcome, explain, select_default_conversion
from .update import Receiver, apply
from .verdict import Problem, Verdict, check

__all__ = [
    "Expectations",
    "ExpectedTensor",
    "Problem",
    "Receiver",
    "RuleOutcome",
    "Verdict",
    "accepts",
    "apply",
    "check",
    "digest",
    "expectations",
    "explain",
    "quantization_config_of",
    "select_default_conversion",
]
